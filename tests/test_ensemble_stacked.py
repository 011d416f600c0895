"""An eager ensemble step runs its optimizer once on the stacked tensors (``funcreg/_src/training/stacked.py``).

Oracle: each member trained alone by the same :class:`funcreg.Step` (no vmap), and the fully vmapped
ensemble step. The stacked kernel reorders no arithmetic between members but is torch's foreach
sequence, so it equals them to rounding (atol+rtol for a few roundings per step).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcreg as fr
from funcreg._src.training.stacked import stacked_kernel, stacked_step

F32, F64 = torch.float32, torch.float64


def _loss(p, x, y):
    return ((x @ p["w"] + p["b"] - y) ** 2).mean()


ALIASES = {
    "adamw": lambda: fr.adamw(0.05, weight_decay=0.1),
    "adamw_masked_fused": lambda: fr.adamw(0.05, weight_decay=0.1, mask={"w": True, "b": False}, fused=True),
    "adam_amsgrad_wd": lambda: fr.adam(0.05, weight_decay=0.01, amsgrad=True),
    "sgd_nesterov": lambda: fr.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd_fused_momentum": lambda: fr.sgd(0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, fused=True),
    "sgd_schedule": lambda: fr.sgd(fr.linear_schedule(0.1, 0.01, 3)),
}


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-4) if dtype == F32 else dict(atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name", sorted(ALIASES))
@pytest.mark.parametrize("dtype", [F32, F64])
@settings(deadline=None, max_examples=5)
@given(data=st.data())
def test_stacked_step_equals_each_member_trained_alone(name, dtype, data):
    n = data.draw(st.integers(1, 4), label="members")
    per_member = data.draw(st.booleans(), label="per-member batches")
    donate = data.draw(st.booleans(), label="donate")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    as_t = lambda a: torch.from_numpy(a.astype(np.float64)).to(dtype)  # noqa: E731
    params = {"w": as_t(rng.normal(size=(n, 3, 2))), "b": as_t(rng.normal(size=(n, 2)))}
    shape = (n, 5) if per_member else (5,)
    batches = [(as_t(rng.normal(size=(*shape, 3))), as_t(rng.normal(size=(*shape, 2)))) for _ in range(3)]
    step = fr.make_step(_loss, ALIASES[name](), donate=donate)
    ens = fr.ensemble_step(step, batch="per_member" if per_member else "shared")
    assert ens._stacked is not None
    state = ens.init({k: v.clone() for k, v in params.items()})
    before = {k: v.clone() for k, v in state.params.items()}
    held = dict(state.params)
    for x, y in batches:
        state, metrics = ens(state, x, y)
    if not donate:  # the pure ensemble step wrote into nothing it was given
        for k in params:
            assert torch.equal(held[k], before[k]), k
    for m in range(n):
        alone = fr.make_step(_loss, ALIASES[name]())
        s = alone.init({k: v[m].clone() for k, v in params.items()})
        for x, y in batches:
            s, mm = alone(s, x[m] if per_member else x, y[m] if per_member else y)
        for k in params:
            torch.testing.assert_close(state.params[k][m], s.params[k], **_tol(dtype))
        torch.testing.assert_close(metrics["data_loss"][m], mm["data_loss"], **_tol(dtype))


def test_stacked_step_equals_the_vmapped_step_and_is_the_path_taken():
    params, _, model = fr.init_members(lambda: torch.nn.Linear(3, 2), seeds=[0, 1, 2])
    x, y = torch.linspace(-1, 1, 15).reshape(5, 3), torch.linspace(0, 1, 10).reshape(5, 2)

    def loss(p, x, y):
        return ((torch.func.functional_call(model, p, (x,)) - y) ** 2).mean()

    step = fr.make_step(loss, fr.adamw(0.05, weight_decay=0.1), penalty=fr.l1(0.01))  # a loss-term penalty
    fast, slow = fr.ensemble_step(step), fr.ensemble_step(step)
    slow._stacked = None  # the fully vmapped step, as under torch.compile
    a, b = fast.init(params), slow.init(params)
    for _ in range(4):
        assert stacked_step(step, fast._stacked, a, (x, y), (0, None, None)) is not None
        a, ma = fast(a, x, y)
        b, mb = slow(b, x, y)
    for k in params:
        torch.testing.assert_close(a.params[k], b.params[k], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.opt_state.nu["weight"], b.opt_state.nu["weight"], atol=1e-8, rtol=1e-5)
    assert torch.equal(a.opt_state.steps["weight"], b.opt_state.steps["weight"])
    torch.testing.assert_close(ma["penalty"], mb["penalty"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        # a callable mask would see the member axis (ndim + 1)
        lambda: fr.make_step(_loss, fr.adamw(0.05, mask=lambda p: {k: v.ndim >= 2 for k, v in p.items()})),
        # a factory of hyperparameters: a transform per member
        lambda: fr.make_step(_loss, lambda h: fr.sgd(0.1, weight_decay=h["wd"])),
        # a gradient-edit form reports the penalty per member
        lambda: fr.make_step(_loss, fr.adam(0.05), penalty=fr.l2(0.1), form="coupled"),
        # a chain is not an alias with a kernel
        lambda: fr.make_step(_loss, fr.chain(fr.clip_by_global_norm(1.0), fr.adam(0.05))),
    ],
)
def test_where_the_stacked_kernel_does_not_apply_the_whole_step_is_vmapped(make):
    assert stacked_kernel(make()) is None


def test_members_at_different_steps_run_the_vmapped_step():
    step = fr.make_step(_loss, fr.adam(0.05))
    ens = fr.ensemble_step(step)
    state = ens.init({"w": torch.ones(2, 3, 2), "b": torch.zeros(2, 2)})
    state.opt_state.steps["w"][1] += 1  # member 1 has taken one more step
    x, y = torch.ones(4, 3), torch.zeros(4, 2)
    assert stacked_step(step, ens._stacked, state, (x, y), (0, None, None)) is None
    new, _ = ens(state, x, y)  # still steps, through vmap
    assert new.opt_state.steps["w"].tolist() == [1, 2]


def test_a_step_autograd_records_is_vmapped_and_stays_differentiable():
    """The stacked kernel runs under no_grad: differentiating through a pure ensemble step takes the
    vmapped path. Closed form: loss (w.x - 1)^2 at w.x = 1 has zero gradient and Hessian 2 x x^T, so
    d sum(w - lr * grad) / dw_j = 1 - lr * 2 x_j sum(x) = 1 - 0.1 * 2 * 0.5 * 1 = 0.9."""

    def loss(p, x):
        return ((p["w"] * x).sum() - 1.0) ** 2

    ens = fr.ensemble_step(fr.make_step(loss, fr.sgd(0.1)))
    w = torch.ones(3, 2, requires_grad=True)
    state = ens.init({"w": w})._replace(params={"w": w})
    x = torch.tensor([0.5, 0.5])
    assert stacked_step(ens.step, ens._stacked, state, (x,), (0, None)) is None
    new, _ = ens(state, x)
    (g,) = torch.autograd.grad(new.params["w"].sum(), w)
    torch.testing.assert_close(g, torch.full((3, 2), 0.9), atol=1e-6, rtol=1e-6)


class _Net(torch.nn.Module):
    """A BatchNorm (running statistics: buffers) and a parameter the loss never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2, bias=False)  # a bias before BatchNorm: gradient 0 up to rounding
        self.bn = torch.nn.BatchNorm1d(2)
        self.unused = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.bn(self.lin(x))


STACKED_TX = {
    # (the transform, the unused parameter after 3 steps from 1): Adam's step does not scale with the
    # gradient, SGD's does
    "adamw": (lambda: fr.adamw(0.05, weight_decay=0.1), (1 - 0.05 * 0.1) ** 3),
    "sgd_momentum": (lambda: fr.sgd(0.05, momentum=0.9), 1.0),
}


@pytest.mark.parametrize("tx_name", sorted(STACKED_TX))
@pytest.mark.parametrize("constant", [False, True], ids=["loss", "constant_loss"])
def test_stacked_gradients_with_buffers_aux_and_unused_parameters_equal_members_alone(constant, tx_name):
    """The stacked path differentiates the vmapped objective with autograd: buffers (BatchNorm's
    running statistics), aux outputs, a parameter the loss does not use (zero gradient: only weight
    decay moves it) and a loss that depends on no parameter give what each member trained alone
    by the same step gets."""
    seeds = [0, 1, 2]
    params, buffers, model = fr.init_members(_Net, seeds=seeds)
    gen = np.random.default_rng(3)
    x = torch.from_numpy(gen.standard_normal((6, 3)))
    y = torch.from_numpy(gen.standard_normal((6, 2)))
    params = {k: v.double() for k, v in params.items()}
    buffers = {k: v.double() if v.is_floating_point() else v for k, v in buffers.items()}

    apply = fr.functional_model(model)

    def loss(p, b, x, y):
        out, new_buffers = apply(p, b, x)
        value = (y**2).mean() if constant else ((out - y) ** 2).mean()
        return value, new_buffers, {"mean_out": out.mean()}

    make_tx, unused_after = STACKED_TX[tx_name]
    step = fr.make_step(loss, make_tx(), has_aux=True, buffers=True)
    ens = fr.ensemble_step(step)
    assert ens._stacked is not None
    state = ens.init(params, buffers)
    alone = [
        step.init({k: v[i].clone() for k, v in params.items()}, {k: v[i].clone() for k, v in buffers.items()})
        for i in range(len(seeds))
    ]
    for _ in range(3):
        assert stacked_step(step, ens._stacked, state, (x, y), (0, None, None)) is not None
        state, metrics = ens(state, x, y)
        outs = [step(s, x, y) for s in alone]
        alone = [s for s, _ in outs]
        for i, (s, m) in enumerate(outs):
            for k in params:
                torch.testing.assert_close(state.params[k][i], s.params[k], atol=1e-12, rtol=1e-10)
            for k, v in s.buffers.items():
                torch.testing.assert_close(state.buffers[k][i], v, atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(
                metrics["aux"]["mean_out"][i], m["aux"]["mean_out"], atol=1e-12, rtol=1e-10
            )
            torch.testing.assert_close(metrics["data_loss"][i], m["data_loss"], atol=1e-12, rtol=1e-10)
    # the unused parameter moved by weight decay alone
    want = torch.full((len(seeds), 2), unused_after, dtype=torch.float64)
    torch.testing.assert_close(state.params["unused"], want, atol=1e-12, rtol=1e-10)
    assert not any(v.requires_grad for v in state.params.values())
