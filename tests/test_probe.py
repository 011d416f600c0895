"""fr.probe: the weight-decay convention of an optimizer, found by stepping it with a zero data gradient.

Every expected trajectory below is written out in closed form (numpy, float64) from the update rule of
the optimizer, so a probe that runs the optimizer wrongly (None grads, float32, lr not overridden) or
classifies wrongly fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import funcreg as fr
from funcreg import DecayKind as K

W0 = np.array([-3.0, -1.5, -0.5, 0.5, 1.0, 2.0, 4.0])
LRS = (0.1, 0.01)
STEPS = 8


# ----------------------------------------------------------------------------------------------------
# Hand-written SGDW variants: SGD with heavy-ball momentum (torch's convention: first buffer = grad)
# plus one decay line each, applied before the gradient step.


class _SGDWBase(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.1, weight_decay: float = 0.1, momentum: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})

    def decay(self, p: torch.Tensor, lr: float, wd: float) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.decay(p, lr, wd)
                d = p.grad
                if mu:
                    state = self.state[p]
                    if "buf" not in state:
                        state["buf"] = d.clone()
                    else:
                        state["buf"].mul_(mu).add_(d)
                    d = state["buf"]
                p.add_(d, alpha=-lr)


class SGDWShift(_SGDWBase):
    """The buggy third-party SGDW: a constant shift."""

    def decay(self, p, lr, wd):
        p.add_(-lr * wd)


class SGDWIndependent(_SGDWBase):
    """Story 2's own SGDW: ``w <- w - wd * w``, lr not involved."""

    def decay(self, p, lr, wd):
        p.mul_(1 - wd)


class SGDWLr(_SGDWBase):
    """Decoupled decay multiplied by lr (Loshchilov & Hutter's SGDW with the lr as multiplier)."""

    def decay(self, p, lr, wd):
        p.mul_(1 - lr * wd)


class SGDL1(_SGDWBase):
    """Story 2's decoupled L1: ``w <- w - lr * wd * sign(w)``."""

    def decay(self, p, lr, wd):
        p.add_(-lr * wd * torch.sign(p))


class NoLr(torch.optim.Optimizer):
    def __init__(self, params) -> None:
        super().__init__(params, {"step_size": 0.1})

    def step(self, closure=None):
        pass


def steps_column() -> np.ndarray:
    return np.arange(STEPS + 1, dtype=np.float64)[:, None]


def assert_traj(
    result: fr.ProbeResult,
    expected: list[np.ndarray],
    atol: float = 1e-12,
    rtol: float = 1e-12,
) -> None:
    assert len(result.trajectories) == len(expected)
    for got, want in zip(result.trajectories, expected):
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), want, atol=atol, rtol=rtol)


def heavy_ball_l2(lr: float, wd: float, mu: float, nesterov: bool = False) -> np.ndarray:
    """torch.optim.SGD(weight_decay=wd, momentum=mu) with zero data gradient, written out."""
    w, buf, rows = W0.copy(), None, [W0.copy()]
    for _ in range(STEPS):
        g = wd * w
        buf = g.copy() if buf is None else mu * buf + g
        w = w - lr * (g + mu * buf if nesterov else buf)
        rows.append(w.copy())
    return np.stack(rows)


def adam_l2(lr: float, wd: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> np.ndarray:
    """torch.optim.Adam(weight_decay=wd) with zero data gradient, written out."""
    w, m, v, rows = W0.copy(), np.zeros(7), np.zeros(7), [W0.copy()]
    for t in range(1, STEPS + 1):
        g = wd * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr / (1 - b1**t) * m / (np.sqrt(v) / math.sqrt(1 - b2**t) + eps)
        rows.append(w.copy())
    return np.stack(rows)


# ----------------------------------------------------------------------------------------------------
# The required classifications, with closed-form trajectories.


def test_adamw_is_decoupled_lr_scaled():
    r = fr.probe(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1))
    assert r.kind is K.DECOUPLED_LR and r.lr_scaled is True and r.equivalent == ()
    assert r.coefficient == pytest.approx(0.1, rel=1e-12)
    assert_traj(r, [W0 * (1 - lr * 0.1) ** steps_column() for lr in LRS])
    assert r.optimizer == "AdamW" and r.learning_rates == LRS and r.weights == tuple(W0)


def test_adamw_class_itself_uses_torch_default_decay():
    r = fr.probe(torch.optim.AdamW)
    assert r.kind is K.DECOUPLED_LR and r.coefficient == pytest.approx(0.01, rel=1e-12)


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_constructor_lr_is_overridden(lr_kind):
    lr = 123.0 if lr_kind == "float" else torch.tensor(0.5, dtype=torch.float64)
    r = fr.probe(lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.2))
    assert r.kind is K.DECOUPLED_LR
    assert_traj(r, [W0 * (1 - lr_ * 0.2) ** steps_column() for lr_ in LRS])


def test_plain_sgd_coupled_equals_decoupled():
    r = fr.probe(lambda ps: torch.optim.SGD(ps, lr=0.5, weight_decay=0.3))
    assert r.kind is K.COUPLED_L2 and r.lr_scaled is True
    assert r.equivalent == (K.DECOUPLED_LR,)
    assert r.coefficient == pytest.approx(0.3, rel=1e-12)
    assert_traj(r, [W0 * (1 - lr * 0.3) ** steps_column() for lr in LRS])
    assert "same map" in r.explanation


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_coupled(nesterov):
    r = fr.probe(lambda ps: torch.optim.SGD(ps, lr=0.5, weight_decay=0.3, momentum=0.9, nesterov=nesterov))
    assert r.kind is K.COUPLED_L2 and r.equivalent == () and r.lr_scaled is True
    # Nesterov's first step is (1 + mu) * lr * wd * w, yet the cancellation finds wd itself.
    assert r.coefficient == pytest.approx(0.3, rel=1e-12)
    assert_traj(r, [heavy_ball_l2(lr, 0.3, 0.9, nesterov) for lr in LRS])
    assert "momentum" in r.explanation


def test_adam_coupled_is_normalised():
    r = fr.probe(lambda ps: torch.optim.Adam(ps, weight_decay=0.1))
    assert r.kind is K.COUPLED_L2 and r.equivalent == () and r.lr_scaled is True
    assert r.coefficient == pytest.approx(0.1, rel=1e-9)
    assert_traj(r, [adam_l2(lr, 0.1) for lr in LRS], atol=1e-12, rtol=1e-10)
    # First step: lr * sign(w) up to eps, not lr * wd * w.
    first = r.trajectories[0][1].numpy() - W0
    np.testing.assert_allclose(first, -0.1 * np.sign(W0), rtol=1e-6)
    assert "sign(w)" in r.explanation


def test_sgd_without_decay_is_none():
    r = fr.probe(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    assert r.kind is K.NONE and r.coefficient == 0.0
    assert_traj(r, [np.repeat(W0[None], STEPS + 1, axis=0)] * 2, atol=0, rtol=0)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgdw_constant_shift_is_flagged(momentum):
    r = fr.probe(lambda ps: SGDWShift(ps, weight_decay=0.2, momentum=momentum))
    assert r.kind is K.CONSTANT_SHIFT and r.lr_scaled is True
    assert r.coefficient == pytest.approx(0.2, rel=1e-9)
    assert_traj(r, [W0 - lr * 0.2 * steps_column() for lr in LRS])
    assert "not a weight decay" in r.explanation


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgdw_independent_of_lr(momentum):
    r = fr.probe(lambda ps: SGDWIndependent(ps, weight_decay=0.05, momentum=momentum))
    assert r.kind is K.DECOUPLED_INDEPENDENT and r.lr_scaled is False
    assert r.coefficient == pytest.approx(0.05, rel=1e-9)
    assert_traj(r, [W0 * 0.95 ** steps_column()] * 2)


def test_sgdw_lr_scaled_with_momentum_is_decoupled():
    r = fr.probe(lambda ps: SGDWLr(ps, weight_decay=0.3, momentum=0.9))
    assert r.kind is K.DECOUPLED_LR and r.lr_scaled is True and r.equivalent == ()
    assert r.coefficient == pytest.approx(0.3, rel=1e-9)
    assert_traj(r, [W0 * (1 - lr * 0.3) ** steps_column() for lr in LRS])


def test_sgdw_lr_scaled_without_momentum_is_indistinguishable_from_coupled():
    r = fr.probe(lambda ps: SGDWLr(ps, weight_decay=0.3, momentum=0.0))
    assert r.kind is K.COUPLED_L2 and r.equivalent == (K.DECOUPLED_LR,)
    assert r.coefficient == pytest.approx(0.3, rel=1e-9)


def test_l1_sign():
    r = fr.probe(lambda ps: SGDL1(ps, weight_decay=0.2, momentum=0.0))
    assert r.kind is K.L1_SIGN and r.lr_scaled is True
    assert r.coefficient == pytest.approx(0.2, rel=1e-9)
    # lr = 0.01: no weight reaches zero in 8 steps, so the trajectory is linear for every weight.
    np.testing.assert_allclose(
        r.trajectories[1].numpy(),
        W0 - 0.01 * 0.2 * np.sign(W0) * steps_column(),
        atol=1e-12,
        rtol=0,
    )
    # lr = 0.1: 0.02 per step; w = 0.5 would reach zero at step 25, so also linear here.
    np.testing.assert_allclose(
        r.trajectories[0].numpy(),
        W0 - 0.1 * 0.2 * np.sign(W0) * steps_column(),
        atol=1e-12,
        rtol=0,
    )


def test_report_prints_kind_coefficient_and_tables():
    r = fr.probe(lambda ps: SGDWShift(ps, weight_decay=0.1, momentum=0.0))
    text = str(r)
    assert "kind:        constant shift" in text
    assert "coefficient: 0.1" in text
    assert "lr = 0.1, zero data gradient" in text and "lr = 0.01, zero data gradient" in text
    assert text.count("\n   8 ") == 2  # the last step of each table
    assert "-3.08" in text and "3.992" in text  # -3 - 8 * 0.01 and 4 - 8 * 0.001
    lines = r.table.splitlines()
    assert lines[1].split() == [
        "step",
        "w=-3",
        "w=-1.5",
        "w=-0.5",
        "w=0.5",
        "w=1",
        "w=2",
        "w=4",
    ]
    assert str(K.COUPLED_L2) == "coupled L2"


def test_gradients_are_zero_tensors_in_float64():
    seen = []

    class Recorder(torch.optim.SGD):
        def step(self, closure=None):
            p = self.param_groups[0]["params"][0]
            seen.append(None if p.grad is None else p.grad.clone())
            return super().step(closure)

    fr.probe(lambda ps: Recorder(ps, lr=0.1, weight_decay=0.1), steps=3)
    assert len(seen) >= 6
    for g in seen[:6]:  # the two zero-gradient runs come first
        assert (
            g is not None and g.dtype == torch.float64 and torch.equal(g, torch.zeros(7, dtype=torch.float64))
        )


def test_custom_weights_and_steps():
    r = fr.probe(
        lambda ps: torch.optim.AdamW(ps, weight_decay=0.5),
        steps=3,
        learning_rates=(0.2, 0.05),
        weights=[-2.0, 1.0, 3.0],
    )
    assert r.kind is K.DECOUPLED_LR and r.coefficient == pytest.approx(0.5, rel=1e-12)
    np.testing.assert_allclose(
        r.trajectories[1].numpy()[-1],
        np.array([-2.0, 1.0, 3.0]) * (1 - 0.05 * 0.5) ** 3,
    )


def test_adamw_with_tiny_decay_is_not_mistaken_for_coupled():
    # For |g| << eps Adam's step lr * g / (|g| + eps) is linear in g, so the data gradient
    # -wd * eps * w cancels AdamW's decay for a while; the extra common gradient rules that out.
    r = fr.probe(
        lambda ps: torch.optim.AdamW(ps, weight_decay=5.5e-5),
        learning_rates=(0.04, 0.0036),
    )
    assert r.kind is K.DECOUPLED_LR and r.coefficient == pytest.approx(5.5e-5, rel=1e-9)


@pytest.mark.parametrize(
    "make, kind",
    [
        (lambda ps: torch.optim.RMSprop(ps, weight_decay=0.1), K.COUPLED_L2),
        (lambda ps: torch.optim.Adagrad(ps, weight_decay=0.1), K.COUPLED_L2),
        (lambda ps: torch.optim.Adamax(ps, weight_decay=0.1), K.COUPLED_L2),
        (lambda ps: torch.optim.NAdam(ps, weight_decay=0.1), K.COUPLED_L2),
        (
            lambda ps: torch.optim.NAdam(ps, weight_decay=0.1, decoupled_weight_decay=True),
            K.DECOUPLED_LR,
        ),
        (lambda ps: torch.optim.RAdam(ps, weight_decay=0.1), K.COUPLED_L2),
        (
            lambda ps: torch.optim.RAdam(ps, weight_decay=0.1, decoupled_weight_decay=True),
            K.DECOUPLED_LR,
        ),
    ],
)
def test_other_torch_optimizers(make, kind):
    r = fr.probe(make)
    assert r.kind is kind and r.coefficient == pytest.approx(0.1, rel=1e-9)


# ----------------------------------------------------------------------------------------------------
# Validation.


def test_validation():
    with pytest.raises(TypeError, match="callable"):
        fr.probe(42)
    p = torch.zeros(1, requires_grad=True)
    with pytest.raises(TypeError, match="not an optimizer instance"):
        fr.probe(torch.optim.SGD([p], lr=0.1))
    with pytest.raises(TypeError, match="must return a torch.optim.Optimizer.*got list"):
        fr.probe(lambda ps: ps)
    with pytest.raises(ValueError, match="does not hold the parameters"):
        fr.probe(lambda ps: torch.optim.SGD([p], lr=0.1))
    with pytest.raises(ValueError, match="no 'lr'"):
        fr.probe(NoLr)
    with pytest.raises(ValueError, match="steps"):
        fr.probe(torch.optim.SGD, steps=2)
    with pytest.raises(TypeError, match="steps"):
        fr.probe(torch.optim.SGD, steps=4.0)
    with pytest.raises(ValueError, match="factor"):
        fr.probe(torch.optim.SGD, learning_rates=(0.1, 0.1))
    with pytest.raises(ValueError, match="learning_rates\\[1\\]"):
        fr.probe(torch.optim.SGD, learning_rates=(0.1, float("nan")))
    with pytest.raises(ValueError, match="learning_rates\\[0\\]"):
        fr.probe(torch.optim.SGD, learning_rates=(0.0, 0.1))
    with pytest.raises(ValueError, match="pair"):
        fr.probe(torch.optim.SGD, learning_rates=(0.1,))
    with pytest.raises(ValueError, match="both signs"):
        fr.probe(torch.optim.SGD, weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="nonzero"):
        fr.probe(torch.optim.SGD, weights=[-1.0, 0.0, 2.0])
    with pytest.raises(ValueError, match="two magnitudes"):
        fr.probe(torch.optim.SGD, weights=[-1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="weights\\[1\\]"):
        fr.probe(torch.optim.SGD, weights=[-1.0, math.inf, 2.0])
    with pytest.raises(TypeError, match="sequence"):
        fr.probe(torch.optim.SGD, weights="abc")


# ----------------------------------------------------------------------------------------------------
# Properties: the probe recovers kind and coefficient for drawn hyperparameters.

CASES = {
    "SGD": (
        lambda wd, mu: lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=wd, momentum=mu),
        K.COUPLED_L2,
    ),
    "Adam": (
        lambda wd, mu: lambda ps: torch.optim.Adam(ps, weight_decay=wd, betas=(mu, 0.999)),
        K.COUPLED_L2,
    ),
    "AdamW": (
        lambda wd, mu: lambda ps: torch.optim.AdamW(ps, weight_decay=wd, betas=(mu, 0.999)),
        K.DECOUPLED_LR,
    ),
    "SGDWLr": (
        lambda wd, mu: lambda ps: SGDWLr(ps, weight_decay=wd, momentum=max(mu, 0.1)),
        K.DECOUPLED_LR,
    ),
    "SGDWIndependent": (
        lambda wd, mu: lambda ps: SGDWIndependent(ps, weight_decay=wd, momentum=mu),
        K.DECOUPLED_INDEPENDENT,
    ),
    "SGDWShift": (
        lambda wd, mu: lambda ps: SGDWShift(ps, weight_decay=wd, momentum=mu),
        K.CONSTANT_SHIFT,
    ),
    "SGDL1": (
        lambda wd, mu: lambda ps: SGDL1(ps, weight_decay=wd, momentum=mu),
        K.L1_SIGN,
    ),
}

hyper = st.fixed_dictionaries(
    {
        "wd": st.floats(-5.0, math.log10(0.5)).map(lambda e: 10.0**e),
        "lr": st.floats(-4.0, math.log10(0.3)).map(lambda e: 10.0**e),
        "ratio": st.floats(1.5, 20.0),
        "mu": st.sampled_from([0.0, 0.5, 0.9]),
        "up": st.booleans(),
    }
)


def _lrs(h: dict) -> tuple[float, float]:
    return (h["lr"], h["lr"] * h["ratio"]) if h["up"] else (h["lr"], h["lr"] / h["ratio"])


def _check(result: fr.ProbeResult, kind: K, wd: float) -> None:
    assert result.kind is kind, str(result)
    assert result.coefficient is not None
    assert abs(result.coefficient - wd) <= 1e-10 + 1e-7 * wd, (result.coefficient, wd)
    assert result.lr_scaled is (kind is not K.DECOUPLED_INDEPENDENT)


@pytest.mark.parametrize("name", sorted(CASES))
@settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])
@given(h=hyper)
def test_property_kind_and_coefficient(name, h):
    make, kind = CASES[name]
    _check(fr.probe(make(h["wd"], h["mu"]), learning_rates=_lrs(h)), kind, h["wd"])


magnitudes = hnp.arrays(np.float64, st.integers(3, 7), elements=st.floats(0.25, 4.0))
signs = hnp.arrays(np.bool_, 7)


@pytest.mark.parametrize("name", ["SGD", "AdamW", "SGDL1", "SGDWShift"])
@settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])
@given(h=hyper, mags=magnitudes, neg=signs)
def test_property_with_drawn_weights(name, h, mags, neg):
    w = torch.from_numpy(np.where(neg[: mags.size], -mags, mags))
    if not (bool((w > 0).any()) and bool((w < 0).any())) or float(mags.max() / mags.min()) < 2.0:
        w = torch.cat(
            [
                w,
                torch.tensor(
                    [-4.0 * float(mags.max()), 0.5 * float(mags.min())],
                    dtype=torch.float64,
                ),
            ]
        )
    make, kind = CASES[name]
    r = fr.probe(make(h["wd"], h["mu"]), learning_rates=_lrs(h), weights=w.tolist())
    _check(r, kind, h["wd"])
    np.testing.assert_array_equal(r.trajectories[0][0].numpy(), w.numpy())


# ----------------------------------------------------------------------------------------------------
# Optimizers the zero-gradient probe alone misreads, each written out here: arithmetic in float32,
# decay only with a gradient (LARS), decay that depends on the weights (LAMB's trust ratio, AdamP's
# projection). Expected coefficients are the optimizers' own hyperparameters.


class SGDWFloat32(torch.optim.Optimizer):
    """The minimal float32 optimizer: ``p.copy_(p.float() * (1 - lr * wd) - lr * g)``, optionally with a
    float32 heavy-ball buffer (which makes its decay decoupled rather than the same map as coupled)."""

    def __init__(self, params, lr=0.1, weight_decay=0.1, momentum=0.0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.float()
                if mu:
                    buf = self.state[p].setdefault("buf", torch.zeros_like(d))
                    d = buf.mul_(mu).add_(d)
                p.copy_(p.float() * (1 - lr * wd) - lr * d)


class AdamFloat32(torch.optim.Optimizer):
    """torch-optimizer's style (RAdam, Ranger): the state and the step in float32 on ``p.data.float()``,
    with either a coupled decay (``g + wd * p``) or a decoupled one (``p_fp32 -= lr * wd * p_fp32``)."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, coupled=False, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(
            params, {"lr": lr, "weight_decay": weight_decay, "coupled": coupled, "betas": betas, "eps": eps}
        )

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (b1, b2), lr, wd = group["betas"], group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                w, g = p.data.float(), p.grad.float()
                if group["coupled"]:
                    g = g + wd * w
                else:
                    w.add_(w, alpha=-lr * wd)
                state = self.state[p]
                if not state:
                    state.update(t=0, m=torch.zeros_like(w), v=torch.zeros_like(w))
                state["t"] += 1
                t = state["t"]
                state["m"].mul_(b1).add_(g, alpha=1 - b1)
                state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                w.addcdiv_(
                    state["m"], (state["v"] / (1 - b2**t)).sqrt().add_(group["eps"]), value=-lr / (1 - b1**t)
                )
                p.data.copy_(w)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020): the Adam step plus ``wd * w``, rescaled by the trust ratio
    ``||w|| / ||update||``. At zero gradient the update is ``wd * w`` and the ratio ``1 / wd``: the
    step is ``lr * w`` whatever wd."""

    def __init__(self, params, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state, g = self.state[p], p.grad
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["t"] += 1
                t = state["t"]
                state["m"].mul_(b1).add_(g, alpha=1 - b1)
                state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                adam = (state["m"] / (1 - b1**t)) / ((state["v"] / (1 - b2**t)).sqrt() + group["eps"])
                update = adam + group["weight_decay"] * p
                w_norm, u_norm = float(p.norm()), float(update.norm())
                trust = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
                p.add_(update, alpha=-group["lr"] * trust)


class Lars(torch.optim.Optimizer):
    """LARS (You et al. 2017) as commonly implemented: a parameter whose gradient is zero is skipped
    (no trust ratio, so no step and no decay); else the coupled ``g + wd * w`` is scaled by the trust
    ratio ``eta ||w|| / (||g|| + wd ||w||)`` into a heavy-ball buffer. ``trust=False`` drops the ratio
    (a decay that is coupled, gated, and not weight-dependent)."""

    def __init__(self, params, lr=0.1, weight_decay=1e-2, momentum=0.9, eta=1e-3, trust=True):
        super().__init__(
            params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "eta": eta, "trust": trust}
        )

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                w_norm, g_norm = float(p.norm()), float(g.norm())
                if w_norm == 0 or g_norm == 0:
                    continue
                trust = group["eta"] * w_norm / (g_norm + wd * w_norm) if group["trust"] else 1.0
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(g + wd * p, alpha=group["lr"] * trust)
                p.sub_(buf)


class GatedSGDW(torch.optim.Optimizer):
    """Decoupled decay ``w <- w * (1 - lr * wd)`` applied only when the gradient is not all zeros."""

    def __init__(self, params, lr=0.1, weight_decay=0.1, independent=False):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "independent": independent})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None or not bool(p.grad.any()):
                    continue
                p.mul_(1 - (wd if group["independent"] else lr * wd))
                p.add_(p.grad, alpha=-lr)


class AdamP(torch.optim.Optimizer):
    """AdamP (Heo et al. 2021): when the gradient is nearly orthogonal to ``w`` (cosine below
    ``delta / sqrt(n)``; a zero gradient is), the radial part of the Adam update is removed and the
    decoupled decay is multiplied by ``wd_ratio``."""

    def __init__(
        self, params, lr=1e-3, weight_decay=0.2, betas=(0.9, 0.999), eps=1e-8, delta=0.1, wd_ratio=0.1
    ):
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "betas": betas,
            "eps": eps,
            "delta": delta,
            "wd_ratio": wd_ratio,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            eps = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state, g = self.state[p], p.grad
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["t"] += 1
                t = state["t"]
                state["m"].mul_(b1).add_(g, alpha=1 - b1)
                state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                update = (state["m"] / (1 - b1**t)) / ((state["v"] / (1 - b2**t)).sqrt() + eps)
                ratio = 1.0
                if (
                    float((g * p).sum().abs() / (g.norm() * p.norm() + eps))
                    < group["delta"] / p.numel() ** 0.5
                ):
                    unit = p / (p.norm() + eps)
                    update = update - (update * unit).sum() * unit
                    ratio = group["wd_ratio"]
                p.mul_(1 - group["lr"] * group["weight_decay"] * ratio)
                p.add_(update, alpha=-group["lr"])


class CubicDecay(_SGDWBase):
    """A decay no kind describes: ``w <- w - lr * wd * w^3``."""

    def decay(self, p, lr, wd):
        p.sub_(lr * wd * p**3)


F32_RTOL = 1e-5  # a coefficient read off float32 arithmetic (1 - lr * wd rounded to float32)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_float32_arithmetic_is_read_at_float32_precision(momentum):
    r = fr.probe(lambda ps: SGDWFloat32(ps, weight_decay=0.1, momentum=momentum))
    assert r.precision == torch.float32 and "float32" in r.explanation and "precision:   float32" in str(r)
    for traj in r.trajectories:  # what the probe saw is float32 numbers in the float64 parameter
        assert traj.dtype == torch.float64 and torch.equal(traj.float().double(), traj)
    if momentum:
        assert r.kind is K.DECOUPLED_LR and r.lr_scaled is True and r.equivalent == ()
    else:  # plain SGD: coupled and decoupled are the same map, as in float64
        assert r.kind is K.COUPLED_L2 and r.equivalent == (K.DECOUPLED_LR,)
    assert r.coefficient == pytest.approx(0.1, rel=F32_RTOL)
    # float32's rounding of 1 - lr * wd, which the probe reports as it is
    np.testing.assert_allclose(
        r.trajectories[1].numpy()[1], (W0 * np.float32(1 - 0.01 * 0.1)).astype(np.float32), rtol=0, atol=0
    )


@pytest.mark.parametrize("coupled, kind", [(False, K.DECOUPLED_LR), (True, K.COUPLED_L2)])
def test_float32_adam_type(coupled, kind):
    r = fr.probe(lambda ps: AdamFloat32(ps, weight_decay=0.05, coupled=coupled))
    assert r.precision == torch.float32 and r.kind is kind
    assert r.coefficient == pytest.approx(0.05, rel=1e-4)


def test_lamb_trust_ratio_is_norm_dependent_not_coefficient_one():
    """Before: 'decoupled, multiplied by lr, coefficient 1.0' for any weight_decay."""
    for wd in (0.3, 0.01):
        r = fr.probe(lambda ps, wd=wd: Lamb(ps, weight_decay=wd))
        assert r.kind is K.NORM_DEPENDENT and r.coefficient is None and not r.needs_gradient
        # what the zero-gradient run shows: w <- w * (1 - lr) (the trust ratio cancels wd)
        assert_traj(r, [W0 * (1 - lr) ** steps_column() for lr in LRS], atol=1e-12, rtol=1e-12)
        assert "1 - lr * 1" in r.explanation and "LAMB" in r.explanation
        # the gradient runs, written out: one Adam step sign(g) = 1 plus wd * w, times ||w|| / ||1 + wd w||
        for scale in (1.0, 2.0):
            w = scale * W0
            update = 1.0 / (1.0 + 1e-6 / 0.5) + wd * w
            expected = w - 0.1 * np.linalg.norm(w) / np.linalg.norm(update) * update
            np.testing.assert_allclose(
                r.gradient_trajectories[(0.1, scale)][1].numpy(), expected, atol=1e-12, rtol=0
            )


def test_lars_decays_only_with_a_gradient_and_by_its_trust_ratio():
    """Before: 'none' (a zero gradient skips the parameter)."""
    r = fr.probe(lambda ps: Lars(ps, weight_decay=1e-2))
    assert r.kind is K.NORM_DEPENDENT and r.needs_gradient is True and r.coefficient is None
    assert_traj(r, [np.repeat(W0[None], STEPS + 1, axis=0)] * 2, atol=0, rtol=0)
    assert "needs a nonzero gradient: True" in str(r) and "from 2 * weights" in r.table


def test_gated_decoupled_decay_is_found_with_a_gradient():
    for independent, kind in [(False, K.DECOUPLED_LR), (True, K.DECOUPLED_INDEPENDENT)]:
        r = fr.probe(lambda ps, i=independent: GatedSGDW(ps, weight_decay=0.05, independent=i))
        assert r.kind is kind and r.needs_gradient is True
        assert (
            r.coefficient == pytest.approx(0.05, rel=1e-9)
            and "only acts when the data gradient is nonzero" in r.explanation
        )


def test_gated_coupled_decay_without_trust_ratio_is_found_as_lr_scaled():
    """LARS without its ratio: the first step from a zero buffer is -lr (g + wd w), so the part
    proportional to w is lr * wd (coupled and decoupled are one map at a first step)."""
    r = fr.probe(lambda ps: Lars(ps, weight_decay=0.02, trust=False))
    assert r.kind is K.DECOUPLED_LR and r.needs_gradient and r.coefficient == pytest.approx(0.02, rel=1e-9)


def test_adamp_projection_is_norm_dependent():
    """At zero gradient AdamP decays by wd * wd_ratio (0.02 here), with a gradient not orthogonal to
    w by the full wd (0.2): the decay depends on the weights and the gradient."""
    r = fr.probe(lambda ps: AdamP(ps, weight_decay=0.2))
    assert r.kind is K.NORM_DEPENDENT and r.coefficient is None
    assert_traj(r, [W0 * (1 - lr * 0.02) ** steps_column() for lr in LRS], atol=1e-12, rtol=1e-12)
    assert "1 - lr * 0.02" in r.explanation


def test_unknown_decays():
    r = fr.probe(lambda ps: CubicDecay(ps, weight_decay=0.1, momentum=0.0))
    assert r.kind is K.UNKNOWN and r.coefficient is None and not r.needs_gradient
    # a coupled decay behind Adam's normalisation that acts only with a gradient: not common-plus-proportional
    r = fr.probe(lambda ps: GatedAdamL2(ps, weight_decay=0.1))
    assert r.kind is K.UNKNOWN and r.needs_gradient is True and "only with a gradient" in r.explanation


class GatedAdamL2(torch.optim.Adam):
    """torch's Adam with its coupled decay, but skipping a parameter whose gradient is all zeros."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not bool(p.grad.any()):
                    p.grad = None
        return super().step(closure)


def test_none_is_checked_with_a_gradient_too():
    r = fr.probe(lambda ps: torch.optim.Adam(ps))
    assert r.kind is K.NONE and "with a data gradient the same for every weight" in r.explanation.lower()
    for traj in r.gradient_trajectories.values():  # every weight moved by the same amount
        d = traj[1] - traj[0]
        assert float((d - d[0]).abs().max()) <= 1e-15


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.AdamW(ps, weight_decay=0.1),
        lambda ps: torch.optim.NAdam(ps, weight_decay=0.1, decoupled_weight_decay=True),
        lambda ps: torch.optim.RAdam(ps, weight_decay=0.1, decoupled_weight_decay=True),
        lambda ps: torch.optim.Adafactor(ps, weight_decay=0.1),
    ],
    ids=["AdamW", "NAdamW", "RAdamW", "Adafactor"],
)
def test_decoupled_torch_optimizers_pass_the_weight_dependence_check(make):
    """Adafactor's step scales with RMS(w), but the same for every weight: its decay stays plain."""
    r = fr.probe(make)
    assert r.kind is K.DECOUPLED_LR and r.coefficient == pytest.approx(0.1, rel=1e-9)


wds = st.floats(-4.0, math.log10(0.5)).map(lambda e: 10.0**e)


@settings(deadline=None, max_examples=10, suppress_health_check=[HealthCheck.too_slow])
@given(wd=wds, mu=st.sampled_from([0.0, 0.5, 0.9]))
def test_property_float32_momentum_sgdw(wd, mu):
    r = fr.probe(lambda ps: SGDWFloat32(ps, weight_decay=wd, momentum=mu))
    assert r.precision == torch.float32
    assert r.kind in (K.DECOUPLED_LR, K.COUPLED_L2), str(r)
    # float32 rounds 1 - lr * wd to 2^-24 absolute: the coefficient to about 6e-8 / (lr * wd) relative
    assert abs(r.coefficient - wd) <= 2 * 6e-8 / min(LRS) + 1e-5 * wd


@settings(deadline=None, max_examples=10, suppress_health_check=[HealthCheck.too_slow])
@given(wd=wds, which=st.sampled_from(["lamb", "lars", "adamp"]))
def test_property_weight_dependent_decays(wd, which):
    make = {"lamb": Lamb, "lars": Lars, "adamp": AdamP}[which]
    r = fr.probe(lambda ps: make(ps, weight_decay=wd))
    assert r.kind is K.NORM_DEPENDENT, str(r)
    assert r.needs_gradient is (which == "lars")


# ----------------------------------------------------------------------------------------------------
# The report's header lines, the gated verdicts' wording and tables, and a cancellation that fails later.


class LateShiftL2(torch.optim.Optimizer):
    """Plain SGD with coupled L2 ``wd``, plus a constant shift ``lr * shift`` of every weight from the
    second step on: the first step is exactly coupled L2, so ``-wd * w`` cancels it, but not the later
    steps (every weight still moves by ``lr * shift`` per step)."""

    def __init__(self, params, lr=0.1, weight_decay=0.1, shift=2e-4):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "shift": shift})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                state = self.state[p]
                state["t"] = state.get("t", 0) + 1
                p.add_(p.grad + group["weight_decay"] * p, alpha=-lr)
                if state["t"] >= 2:
                    p.sub_(lr * group["shift"])


def test_a_cancellation_that_fails_after_the_first_step_is_not_coupled_l2():
    """With ``-wd * w`` fed as the data gradient the weights still move by ``lr * shift * (steps - 1)``
    (1.4e-4 at lr 0.1: 4.5e-4 of the zero-gradient movement 0.31, above the 1e-4 the cancellation
    allows), so the decay is not cancelled at every step: not coupled L2."""
    r = fr.probe(lambda ps: LateShiftL2(ps, weight_decay=0.1, shift=2e-4))
    assert r.kind is not K.COUPLED_L2 and r.kind is K.UNKNOWN, str(r)
    # the zero-gradient run, written out: w <- w (1 - lr wd), then minus lr * shift from step 2
    for lr, traj in zip(LRS, r.trajectories):
        w = W0.copy()
        rows = [w.copy()]
        for t in range(1, STEPS + 1):
            w = w - lr * 0.1 * w - (lr * 2e-4 if t >= 2 else 0.0)
            rows.append(w.copy())
        np.testing.assert_allclose(traj.numpy(), np.array(rows), atol=1e-13, rtol=0)
    # exactly coupled L2 (no shift) is still found
    r = fr.probe(lambda ps: LateShiftL2(ps, weight_decay=0.1, shift=0.0))
    assert r.kind is K.COUPLED_L2 and r.coefficient == pytest.approx(0.1, rel=1e-9)


def test_report_header_names_the_optimizer_class():
    r = fr.probe(lambda ps: torch.optim.AdamW(ps, weight_decay=0.1))
    assert str(r).splitlines()[0] == "weight decay probe of AdamW"
    assert str(r).splitlines()[1] == "kind:        decoupled, multiplied by lr"


def test_a_result_built_by_hand_defaults_to_no_gradient_needed_and_a_generic_name():
    r = fr.ProbeResult(K.NONE, 0.0, None, "the table", "the explanation")
    assert r.needs_gradient is False and r.optimizer == ""
    lines = str(r).splitlines()
    assert lines[:4] == [
        "weight decay probe of optimizer",
        "kind:        none",
        "coefficient: 0",
        "lr_scaled:   None",
    ]
    assert "needs a nonzero gradient" not in str(r)
    assert lines[-3:] == ["the explanation", "", "the table"]


def test_gated_norm_dependent_decay_says_it_changes_with_scale_and_needs_a_gradient():
    """LARS skips a zero gradient; with a gradient its trust ratio makes the decay part change when
    the weights are doubled: the explanation says both."""
    r = fr.probe(lambda ps: Lars(ps, weight_decay=1e-2))
    assert r.kind is K.NORM_DEPENDENT and r.needs_gradient is True
    assert "changes when the weights are scaled by 2" in r.explanation
    assert "differs from the zero-gradient one" not in r.explanation
    assert "the decay acts only with a nonzero data gradient" in r.explanation


def test_gated_decoupled_decay_shows_the_gradient_runs_in_its_table():
    """The verdict rests on the gradient runs, so the table shows them, from both scales of the
    weights: one step w <- w (1 - lr wd) - lr * 0.5."""
    r = fr.probe(lambda ps: GatedSGDW(ps, weight_decay=0.05))
    assert r.kind is K.DECOUPLED_LR and r.needs_gradient is True
    for scale in (1, 2):
        for lr in LRS:
            assert f"lr = {lr:g}, data gradient 0.5 on every weight, from {scale} * weights" in r.table
            after = scale * W0 * (1 - lr * 0.05) - lr * 0.5
            np.testing.assert_allclose(
                r.gradient_trajectories[(lr, float(scale))][1].numpy(), after, atol=1e-14, rtol=0
            )
    assert f"{4 * (1 - 0.1 * 0.05) - 0.05:.8g}" in r.table  # w = 4 after the step at lr 0.1
