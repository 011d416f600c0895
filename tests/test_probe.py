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
        assert g is not None and g.dtype == torch.float64 and torch.equal(g, torch.zeros(7, dtype=torch.float64))


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
