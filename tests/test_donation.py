"""Donation: ``fr.donated_update`` and ``make_step(donate=True)`` equal the pure path, and are refused
where writing into the caller's tensors would be wrong.

The pure path (``tx.update`` + ``apply_updates``) is the oracle: it is itself tested against
torch.optim elsewhere. Donation changes where results are written, not the arithmetic, so the
trajectories must agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from helpers import SLOW_OK, TRANSFORMS, assert_trees_close, keep_buffers
from hypothesis import example, given, settings
from hypothesis import strategies as st

import funcreg as fr
from funcreg.testing import tensors

# aliases (and alias + penalty-form chains) whose donated step runs torch.optim's own arithmetic
# (funcreg/_src/kernels/fused.py, fused_forms.py): equal to the pure update to rounding, and to torch.optim
# bit for bit (tested below and in test_fused_forms.py)
TORCH_KERNELS = {"adam", "adamw", "adamw_amsgrad_masked", "sgd", "sgd_momentum", "proximal_l1", "coupled_l2"}

F32, F64 = torch.float32, torch.float64


def _clone(tree):
    return torch.utils._pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def _assert_equal_trees(a, b, what):
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    assert len(la) == len(lb), what
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{what}: {x} != {y}"


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("dtype", [F32, F64])
@settings(deadline=None, max_examples=6, suppress_health_check=SLOW_OK)
@given(data=st.data())
def test_donated_update_equals_the_pure_path(name, dtype, data):
    params = {
        "w": data.draw(tensors((2, 3), dtype=dtype, max_abs=3.0)),
        "b": data.draw(tensors((3,), dtype=dtype, max_abs=3.0)),
    }
    tx = TRANSFORMS[name]()
    pure_p, pure_s = params, tx.init(params)
    don_p, don_s = _clone(params), tx.init(params)
    for t in range(data.draw(st.integers(1, 5))):
        grads = {k: data.draw(tensors(tuple(v.shape), dtype=dtype, max_abs=2.0)) for k, v in params.items()}
        if data.draw(st.booleans()) and name not in ("partition",):
            grads["b"] = None  # a frozen parameter at this step
        kept = _clone(grads)
        u, pure_s = tx.update(grads, pure_s, pure_p)
        pure_p = fr.apply_updates(pure_p, u)
        don_p, don_s = fr.donated_update(tx, grads, don_s, don_p)
        _assert_equal_trees(grads, kept, "the gradients are only read")
        same = assert_trees_close if name in TORCH_KERNELS else _assert_equal_trees
        same(don_p, pure_p, f"params after step {t + 1}")
        same(don_s, pure_s, f"state after step {t + 1}")


def test_donated_update_writes_into_the_donated_tensors():
    tx = fr.adamw(0.1)
    params = {"w": torch.ones(3)}
    state = tx.init(params)
    buffers = (params["w"], state.mu["w"], state.nu["w"], state.steps["w"])
    params, state = fr.donated_update(tx, {"w": torch.ones(3)}, state, params)
    assert params["w"] is buffers[0] and state.mu["w"] is buffers[1] and state.nu["w"] is buffers[2]
    assert state.steps["w"] is buffers[3] and int(state.steps["w"]) == 1


def test_donation_is_refused_where_autograd_needs_the_old_values():
    w = torch.ones(3, requires_grad=True)
    tx = fr.sgd(0.1)
    with pytest.raises(ValueError, match=r"cannot donate params 'w': autograd needs its value"):
        fr.donated_update(tx, {"w": torch.ones(3)}, tx.init({"w": w}), {"w": w})
    with torch.no_grad():  # what TorchOptimizer does: no history is recorded, so writing is fine
        out, _ = fr.donated_update(tx, {"w": torch.ones(3)}, tx.init({"w": w}), {"w": w})
    assert out["w"] is w


def test_donating_one_tensor_twice_is_refused():
    w = torch.ones(2)
    tx = fr.sgd(0.1)
    with pytest.raises(ValueError, match="'a' and 'b' are the same tensor"):
        fr.donated_update(tx, {"a": torch.ones(2), "b": torch.ones(2)}, tx.init(None), {"a": w, "b": w})


def test_apply_if_finite_keeps_its_inner_state_under_donation():
    tx = fr.apply_if_finite(fr.adam(0.1), max_consecutive_errors=3)
    params = {"w": torch.ones(2)}
    state = tx.init(params)
    params, state = fr.donated_update(tx, {"w": torch.ones(2)}, state, params)
    mu, w = state.inner_state.mu["w"].clone(), params["w"].clone()
    params, state = fr.donated_update(tx, {"w": torch.tensor([float("nan"), 1.0])}, state, params)
    assert torch.equal(state.inner_state.mu["w"], mu) and torch.equal(params["w"], w)  # the step was skipped
    assert int(state.total_notfinite) == 1


def _state_tensors(state):
    return [x for x in torch.utils._pytree.tree_leaves(state) if isinstance(x, torch.Tensor)]


@settings(deadline=None, max_examples=30)
@given(
    kinds=st.lists(st.sampled_from(["finite", "nan", "huge"]), min_size=1, max_size=6),
    values=st.lists(st.floats(-2.0, 2.0, width=32), min_size=3, max_size=3),
    adam=st.booleans(),
)
@example(kinds=["huge", "huge", "finite"], values=[0.5, -1.0, 2.0], adam=False)
def test_donated_apply_if_finite_equals_the_pure_one_and_restores_a_skipped_inner_step(kinds, values, adam):
    # "huge" gradients are finite, but twice in a row they overflow SGD's momentum (float32): the inner
    # step has already written its state when its update turns out non-finite, and must be undone
    inner = (lambda: fr.adam(0.1)) if adam else (lambda: fr.sgd(1.0, momentum=1.0))
    grads = []
    for k in kinds:
        g = torch.tensor(values, dtype=torch.float32)
        if k == "nan":
            g[1] = float("nan")
        elif k == "huge":
            g = torch.full((3,), 2e38)
        grads.append({"w": g, "b": torch.tensor(values[:1], dtype=torch.float32)})
    runs = []
    for donate in (False, True):
        tx = fr.apply_if_finite(inner(), max_consecutive_errors=2)
        params = {"w": torch.zeros(3), "b": torch.ones(1)}
        state = tx.init(params)
        held = [x.data_ptr() for x in _state_tensors(state.inner_state) if x.ndim]
        for g in grads:
            if donate:
                params, state = fr.donated_update(tx, g, state, params)
                # written into the storages it was given, whether the step was applied or undone
                assert [x.data_ptr() for x in _state_tensors(state.inner_state) if x.ndim] == held
            else:
                updates, state = tx.update(g, state, params)
                params = fr.apply_updates(params, updates)
        runs.append((params, state))
    (p0, s0), (p1, s1) = runs
    for a, b in zip([*p0.values(), *_state_tensors(s0)], [*p1.values(), *_state_tensors(s1)]):
        assert (
            torch.equal(a, b)
            or torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.nan_to_num(), b.nan_to_num())
        )


def _problem(dtype=F64):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(16, 3, generator=g, dtype=dtype), torch.randn(16, generator=g, dtype=dtype)
    return X, y, {"w": torch.randn(3, generator=g, dtype=dtype), "b": torch.zeros((), dtype=dtype)}


def _loss(p, X, y):
    return ((X @ p["w"] + p["b"] - y) ** 2).mean()


@pytest.mark.parametrize("form", ["loss", "coupled", "decoupled", "proximal"])
@pytest.mark.parametrize(
    "make_tx", [lambda: fr.adamw(0.05), lambda: fr.sgd(0.05, momentum=0.9)], ids=["adamw", "sgd"]
)
def test_make_step_donate_equals_the_pure_step(form, make_tx):
    X, y, p0 = _problem()
    states = []
    for donate in (False, True):
        step = fr.make_step(
            _loss, make_tx(), penalty=fr.l1(0.01), form=form, learning_rate=0.05, donate=donate
        )
        state = step.init(p0)
        for _ in range(4):
            state, metrics = step(state, X, y)
        states.append((state, metrics))
    # the donated adamw and sgd steps, alone or with an L1 prox folded in, are torch's arithmetic
    # (equal to rounding); the L1 coupled/decoupled chains run the generic donated path (bitwise,
    # tested over TRANSFORMS above)
    same = assert_trees_close
    same(states[1][0].params, states[0][0].params, "params")
    same(states[1][0].opt_state, states[0][0].opt_state, "opt_state")
    same(states[1][1], states[0][1], "metrics")


def test_make_step_donate_owns_its_tensors_and_refuses_a_consumed_state():
    X, y, p0 = _problem()
    model = torch.nn.Linear(3, 1)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    step = fr.make_step(
        lambda p, X, y: ((fr.functional_model(model)(p, {}, X)[0].squeeze(-1) - y) ** 2).mean(),
        fr.adam(0.1),
        donate=True,
    )
    state = step.init(fr.params_of(model))
    new, _ = step(state, X.float(), y.float())
    for k, v in model.named_parameters():  # init copied the parameters: the module is untouched
        assert torch.equal(v.detach(), before[k])
    with pytest.raises(ValueError, match="donated to an earlier step"):
        step(state, X.float(), y.float())
    step(new, X.float(), y.float())  # the returned state is the one to step


def test_donated_ensemble_step_equals_the_pure_one():
    X, y, p0 = _problem()
    out = []
    for donate in (False, True):
        step = fr.make_step(_loss, lambda h: fr.adamw(0.05, weight_decay=h["wd"]), donate=donate)
        ens = fr.ensemble_step(step)
        state = ens.init(fr.stack([p0, p0, p0]), hparams={"wd": torch.tensor([0.0, 0.1, 0.2], dtype=F64)})
        for _ in range(3):
            state, _ = ens(state, X, y)
        out.append(state)
    _assert_equal_trees(out[1].params, out[0].params, "params")
    _assert_equal_trees(out[1].opt_state, out[0].opt_state, "opt_state")


def test_donated_step_under_torch_compile_equals_eager():
    X, y, p0 = _problem(F32)
    tx = fr.adamw(0.05, weight_decay=0.1)
    eager_p, eager_s = _clone(p0), tx.init(p0)
    comp_p, comp_s = _clone(p0), tx.init(p0)
    compiled = torch.compile(lambda g, s, p: fr.donated_update(tx, g, s, p))
    for _ in range(3):
        g = torch.func.grad(_loss)(eager_p, X, y)
        eager_p, eager_s = fr.donated_update(tx, g, eager_s, eager_p)
        g2 = torch.func.grad(_loss)(comp_p, X, y)
        comp_p, comp_s = compiled(g2, comp_s, comp_p)
    for k in p0:
        torch.testing.assert_close(comp_p[k], eager_p[k], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(comp_s.nu["w"], eager_s.nu["w"], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("buffers", ["allocated", "kept"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize("alias", ["adam", "adamw", "adamw_masked"])
@pytest.mark.parametrize("dtype", [F32, F64])
@settings(deadline=None, max_examples=6, suppress_health_check=SLOW_OK)
@given(data=st.data())
def test_donated_adam_equals_torch_optim_bitwise(buffers, fused, alias, dtype, data):
    """A donated adam/adamw step runs torch.optim's arithmetic: with fused=True torch's fused kernel,
    else its foreach sequence; either equals torch.optim (fused=... / foreach=True) bit for bit
    (parameters and moments), with the decay mask as two param groups; its temporaries in fresh or in
    kept buffers (reused across the steps)."""
    shapes = {"w": (3, 2), "b": (2,), "k": (2, 2, 2)}
    params = {k: data.draw(tensors(s, dtype=dtype, max_abs=2.0)) for k, s in shapes.items()}
    amsgrad, maximize = data.draw(st.booleans()), data.draw(st.booleans())
    wd = data.draw(st.sampled_from([0.0, 0.01, 0.3]))
    mask = {"w": True, "b": False, "k": True} if alias == "adamw_masked" else None
    leaves = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    if alias == "adam":
        tx = fr.adam(0.01, weight_decay=wd, amsgrad=amsgrad, maximize=maximize, fused=fused)
        opt = torch.optim.Adam(
            leaves.values(),
            lr=0.01,
            weight_decay=wd,
            amsgrad=amsgrad,
            maximize=maximize,
            fused=fused,
            foreach=not fused,
        )
    else:
        tx = fr.adamw(0.01, weight_decay=wd, amsgrad=amsgrad, maximize=maximize, mask=mask, fused=fused)
        groups = [{"params": [leaves[k] for k in shapes if mask is None or mask[k]], "weight_decay": wd}]
        if mask is not None:
            groups.append({"params": [leaves[k] for k in shapes if not mask[k]], "weight_decay": 0.0})
        opt = torch.optim.AdamW(
            groups, lr=0.01, amsgrad=amsgrad, maximize=maximize, fused=fused, foreach=not fused
        )
    keep_buffers(tx, buffers == "kept")
    state, current = tx.init(params), {k: v.clone() for k, v in params.items()}
    for _ in range(data.draw(st.integers(1, 4))):
        grads = {k: data.draw(tensors(s, dtype=dtype, max_abs=2.0)) for k, s in shapes.items()}
        if data.draw(st.booleans()):
            grads["b"] = None  # torch skips a parameter without a gradient; funcreg a None gradient
        for k, p in leaves.items():
            p.grad = None if grads[k] is None else grads[k].clone()
        opt.step()
        current, state = fr.donated_update(tx, grads, state, current)
    for k, p in leaves.items():
        assert torch.equal(current[k], p.detach()), k
        if p in opt.state:
            assert torch.equal(state.mu[k], opt.state[p]["exp_avg"]) and torch.equal(
                state.nu[k], opt.state[p]["exp_avg_sq"]
            )
            assert int(state.steps[k]) == int(opt.state[p]["step"])


def test_fused_falls_back_where_the_kernel_does_not_apply():
    """Complex parameters are not the fused kernel's: the donated step falls back to the foreach path."""
    tx = fr.adam(0.1, fused=True)
    z = {"z": torch.tensor([1 + 1j, 2 - 1j])}
    pure_p, pure_s = z, tx.init(z)
    don_p, don_s = _clone(z), tx.init(z)
    for _ in range(3):
        g = {"z": torch.tensor([0.5 - 1j, 1 + 2j])}
        u, pure_s = tx.update(g, pure_s, pure_p)
        pure_p = fr.apply_updates(pure_p, u)
        don_p, don_s = fr.donated_update(tx, g, don_s, don_p)
    assert torch.equal(don_p["z"], pure_p["z"])


@pytest.mark.parametrize(
    "make",
    [
        lambda: fr.adamw(0.05, weight_decay=0.1, amsgrad=True, mask={"w": True, "b": False}),
        lambda: fr.adam(0.05, weight_decay=0.1, maximize=True),
    ],
    ids=["adamw_amsgrad_masked", "adam_coupled_maximize"],
)
def test_compiled_donated_adam_traces_torchs_sequence_in_one_graph(make):
    """Under torch.compile a donated adam/adamw traces torch's foreach sequence (its capturable
    branch): one graph, and the eager donated step's results to float32 rounding."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    X, y, p0 = _problem(F32)
    tx = make()
    eager_p, eager_s = _clone(p0), tx.init(p0)
    comp_p, comp_s = _clone(p0), tx.init(p0)
    compiled = torch.compile(lambda g, s, p: fr.donated_update(tx, g, s, p))
    for _ in range(4):
        g = torch.func.grad(_loss)(eager_p, X, y)
        eager_p, eager_s = fr.donated_update(tx, g, eager_s, eager_p)
        held = comp_p["w"]
        comp_p, comp_s = compiled(torch.func.grad(_loss)(comp_p, X, y), comp_s, comp_p)
        assert comp_p["w"] is held  # written into the donated tensor
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["graph_break"])
    for k in p0:
        torch.testing.assert_close(comp_p[k], eager_p[k], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(comp_s.nu["w"], eager_s.nu["w"], atol=1e-7, rtol=1e-5)
    assert torch.equal(comp_s.steps["w"], eager_s.steps["w"]) and torch.equal(comp_s.count, eager_s.count)


def test_a_compiled_pure_step_writes_into_none_of_its_inputs():
    # under torch.compile the donation flag is a plain object the graph reads while tracing: it
    # starts off, so a compiled pure step stays pure (its inputs keep their values)
    tx = fr.sgd(0.1, momentum=0.9)
    params = {"w": torch.ones(3)}
    state = tx.init(params)
    _, state = tx.update({"w": torch.ones(3)}, state, params)  # a momentum buffer to write into

    @torch.compile(backend="eager", fullgraph=False)
    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return fr.apply_updates(params, updates), state

    before = [x.clone() for x in (*params.values(), *_state_tensors(state))]
    new_params, new_state = step({"w": torch.full((3,), 2.0)}, state, params)
    after = [*params.values(), *_state_tensors(state)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not torch.equal(new_params["w"], params["w"])
