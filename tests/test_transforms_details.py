"""Details of the transforms checked against torch.optim or the published update rules."""

from __future__ import annotations

import pytest
import torch

import funcreg as fr


def _torch_steps(opt_cls, param0, grads, **kw):
    """The displacements ``p_{t-1} - p_t`` of ``opt_cls(lr=1)`` over ``grads``."""
    p = torch.nn.Parameter(param0.clone())
    opt = opt_cls([p], lr=1.0, **kw)
    out = []
    for g in grads:
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        out.append(before - p.detach())
    return out


def test_adam_repr_shows_amsgrad_when_on():
    assert "amsgrad=True" in repr(fr.scale_by_adam(amsgrad=True))
    assert "amsgrad" not in repr(fr.scale_by_adam())


def test_radam_count_counts_updates():
    tx = fr.scale_by_radam()
    params = {"w": torch.zeros(2)}
    state = tx.init(params)
    for k in range(1, 4):
        _, state = tx.update({"w": torch.ones(2) * k}, state)
        assert int(state.count) == k


@pytest.mark.parametrize("lr_decay", [1.0, 0.5])
def test_adagrad_lr_decay_matches_torch(lr_decay):
    g0 = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    grads = [g0, -0.5 * g0, 2.0 * g0 + 0.1, g0 - 0.7]
    want = _torch_steps(torch.optim.Adagrad, torch.zeros(3, dtype=torch.float64), grads, lr_decay=lr_decay)
    tx = fr.scale_by_adagrad(lr_decay=lr_decay)
    state = tx.init({"w": torch.zeros(3, dtype=torch.float64)})
    for g, w in zip(grads, want):
        u, state = tx.update({"w": g}, state)
        torch.testing.assert_close(u["w"], w, atol=1e-12, rtol=1e-10)


def test_repr_shows_tensor_hyperparameter_even_if_equal_to_default():
    # a tensor hyperparameter is always shown, its value compared with the default or not
    assert "weight_decay=tensor(0.0)" in repr(fr.adamax(weight_decay=torch.tensor(0.0)))


def _adam_reference(params, grads_seq):
    """torch.optim.Adam (lr=1) displacements, per name, over a sequence of gradient dicts."""
    ps = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.Adam(list(ps.values()), lr=1.0)
    outs = []
    for grads in grads_seq:
        before = {k: p.detach().clone() for k, p in ps.items()}
        for k, p in ps.items():
            p.grad = grads[k].clone()
        opt.step()
        outs.append({k: before[k] - ps[k].detach() for k in ps})
    return outs


def _mixed():
    params = {
        "r": torch.tensor([0.5, -1.0], dtype=torch.float64),
        "z": torch.tensor([1 + 1j, -2j], dtype=torch.complex128),
    }
    grads_seq = [
        {
            "r": torch.tensor([0.3, -0.8], dtype=torch.float64),
            "z": torch.tensor([3 - 4j, 0.5 + 0.1j], dtype=torch.complex128),
        },
        {
            "r": torch.tensor([-0.1, 0.4], dtype=torch.float64),
            "z": torch.tensor([-1 + 2j, 0.2 - 0.7j], dtype=torch.complex128),
        },
    ]
    return params, grads_seq


@pytest.mark.parametrize("pass_params", [True, False])
def test_adam_mixed_real_and_complex_matches_torch(pass_params):
    params, grads_seq = _mixed()
    want = _adam_reference(params, grads_seq)
    tx = fr.scale_by_adam()
    state = tx.init(params)
    for grads, w in zip(grads_seq, want):
        u, state = tx.update(grads, state, params if pass_params else None)
        assert u["r"].dtype == torch.float64 and u["z"].dtype == torch.complex128
        for k in ("r", "z"):
            torch.testing.assert_close(u[k], w[k], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("pass_params", [True, False])
def test_adam_complex_only_matches_torch(pass_params):
    params, grads_seq = _mixed()
    params = {"z": params["z"]}
    grads_seq = [{"z": g["z"]} for g in grads_seq]
    want = _adam_reference(params, grads_seq)
    tx = fr.scale_by_adam()
    state = tx.init(params)
    for grads, w in zip(grads_seq, want):
        u, state = tx.update(grads, state, params if pass_params else None)
        torch.testing.assert_close(u["z"], w["z"], atol=1e-10, rtol=1e-8)


def test_muon_ns_coefficients_refuse_tensors():
    with pytest.raises(TypeError, match=r"ns_coefficients\[1\]"):
        fr.scale_by_muon(ns_coefficients=(3.4445, torch.tensor(-4.775), 2.0315))


def test_muon_default_is_nesterov_as_torch():
    g1 = torch.tensor([[1.0, 0.2, -0.3], [0.1, -2.0, 0.5]])
    g2 = torch.tensor([[-0.4, 1.5, 0.3], [2.0, 0.1, -1.0]])
    want = _torch_steps(torch.optim.Muon, torch.zeros(2, 3), [g1, g2], weight_decay=0.0)
    tx = fr.scale_by_muon()
    state = tx.init({"w": torch.zeros(2, 3)})
    for g, w in zip([g1, g2], want):
        u, state = tx.update({"w": g}, state)
        torch.testing.assert_close(u["w"], w, atol=1e-5, rtol=1e-4)


def test_scale_by_layer_refuses_tensor_factors():
    with pytest.raises(TypeError, match=r"scales\['a'\]"):
        fr.scale_by_layer({"a": torch.tensor(0.5)})


@pytest.mark.parametrize("etas", [(0.0, 1.2), (1.0, 1.2), (0.5, 1.0)])
def test_rprop_etas_bounds_are_strict_as_torch(etas):
    with pytest.raises(ValueError):
        torch.optim.Rprop([torch.nn.Parameter(torch.zeros(1))], etas=etas)
    with pytest.raises(ValueError, match="Invalid etas"):
        fr.scale_by_rprop(etas=etas)


def test_rprop_first_step_under_vmap_is_initial_step_size():
    tx = fr.scale_by_rprop(0.1)
    params = {"w": torch.zeros(3)}
    state = tx.init(params)
    batch = 2
    states = torch.utils._pytree.tree_map(
        lambda x: torch.stack([x] * batch) if isinstance(x, torch.Tensor) else x, state
    )
    grads = torch.tensor([[1.0, -2.0, 3.0], [-1.0, 2.0, 0.5]])

    def step(g, s):
        u, _ = tx.update({"w": g}, s)
        return u["w"]

    out = torch.func.vmap(step)(grads, states)
    # torch.optim.Rprop's first step: step_size = lr, update = sign(g) * lr (prev = 0, no eta applied)
    torch.testing.assert_close(out, 0.1 * torch.sign(grads))
    for g, o in zip(grads, out):
        p = torch.nn.Parameter(torch.zeros(3))
        opt = torch.optim.Rprop([p], lr=0.1)
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(o, -p.detach())
