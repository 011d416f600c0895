"""Non-convex penalties (MCP, SCAD, L0, log-sum): proxes checked by brute force and closed forms.

* the prox is the global minimizer of ``1/2 (z - v)^2 + step * p(z)``: its objective is no larger
  than at any point of a fine grid (and within the grid's resolution of the grid's best), for steps
  where the objective is convex and where it is not;
* away from the pieces' ends and ties, the prox equals the published formulas written here: firm
  thresholding for MCP (Zhang 2010; skglm's ``prox_1d``), Fan & Li's SCAD thresholding at step 1, hard
  thresholding at ``sqrt(2 step coeff)``, the root of the log-sum's stationarity quadratic;
* the closed-form gradients equal autograd of the value away from 0 and the pieces' ends;
* every form runs (the loss term, coupled, decoupled, proximal) and the proximal form gives zeros.
Values drawn by Hypothesis; float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import funcreg as fr

PROPERTY = settings(deadline=None, max_examples=40, database=None)
F64 = torch.float64


def _value_1d(kind, z, lam, shape):
    """The penalty of one entry, written from the papers (NumPy, float64)."""
    a = np.abs(z)
    if kind == "mcp":
        return np.where(a <= shape * lam, lam * a - a * a / (2 * shape), shape * lam * lam / 2)
    if kind == "scad":
        mid = (2 * shape * lam * a - a * a - lam * lam) / (2 * (shape - 1))
        return np.where(a <= lam, lam * a, np.where(a <= shape * lam, mid, lam * lam * (shape + 1) / 2))
    if kind == "l0":
        return lam * (a != 0)
    if kind == "log_sum":
        return lam * np.log1p(a / shape)
    if kind == "bridge":
        return lam * a**shape
    raise AssertionError(kind)


FACTORIES = {
    "mcp": lambda lam, shape: fr.mcp(lam, gamma=shape),
    "scad": lambda lam, shape: fr.scad(lam, a=shape),
    "l0": lambda lam, shape: fr.l0(lam),
    "log_sum": lambda lam, shape: fr.log_sum(lam, eps=shape),
    "bridge": lambda lam, shape: fr.bridge(lam, q=shape),
}
SHAPES = {
    "mcp": st.floats(0.5, 5.0),
    "scad": st.floats(2.1, 6.0),
    "l0": st.just(1.0),
    "log_sum": st.floats(0.1, 3.0),
    "bridge": st.sampled_from([0.5, 2 / 3, 0.3, 0.8]),
}


@pytest.mark.parametrize("kind", sorted(FACTORIES))
@PROPERTY
@given(data=st.data())
def test_the_prox_is_the_global_minimizer(kind, data):
    lam = data.draw(st.floats(0.05, 2.0), label="coeff")
    shape = data.draw(SHAPES[kind], label="shape")
    step = data.draw(st.floats(0.05, 4.0), label="step")  # past gamma and a - 1 too: non-convex objectives
    v = data.draw(arrays(np.float64, (6,), elements=st.floats(-6, 6, width=64)), label="v")
    z = FACTORIES[kind](lam, shape).prox({"w": torch.from_numpy(v)}, step=step)["w"].numpy()
    grid = np.linspace(-8, 8, 32001)  # spacing 5e-4
    for vi, zi in zip(v, z):
        objective = 0.5 * (grid - vi) ** 2 + step * _value_1d(kind, grid, lam, shape)
        at_prox = 0.5 * (zi - vi) ** 2 + step * float(_value_1d(kind, np.array(zi), lam, shape))
        assert at_prox <= objective.min() + 1e-12, (vi, zi, grid[objective.argmin()])
        # and the grid finds nothing much better: it is the minimizer, not merely a low point
        assert at_prox >= objective.min() - 2e-3


@PROPERTY
@given(
    v=arrays(np.float64, (8,), elements=st.floats(-6, 6, width=64)),
    lam=st.floats(0.1, 2.0),
    gamma=st.floats(1.5, 5.0),
    step=st.floats(0.1, 1.0),
)
def test_mcp_is_firm_thresholding_below_gamma(v, lam, gamma, step):
    # skglm's MCPenalty.prox_1d: 0 below step*lam, (|v| - step*lam) / (1 - step/gamma) up to gamma*lam, v beyond
    tau = step * lam
    a = np.abs(v)
    expected = np.where(
        a <= tau, 0.0, np.where(a <= gamma * lam, np.sign(v) * (a - tau) / (1 - step / gamma), v)
    )
    got = fr.proxes.mcp_prox(torch.from_numpy(v), step, lam, gamma).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-12, rtol=1e-10)


@PROPERTY
@given(
    v=arrays(np.float64, (8,), elements=st.floats(-8, 8, width=64)),
    lam=st.floats(0.1, 2.0),
    a=st.floats(2.2, 5.0),
)
def test_scad_is_fan_and_lis_thresholding_at_step_one(v, lam, a):
    x = np.abs(v)
    soft = np.sign(v) * np.maximum(x - lam, 0.0)
    expected = np.where(
        x <= 2 * lam, soft, np.where(x <= a * lam, ((a - 1) * v - np.sign(v) * a * lam) / (a - 2), v)
    )
    got = fr.proxes.scad_prox(torch.from_numpy(v), 1.0, lam, a).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-12, rtol=1e-10)


@PROPERTY
@given(v=arrays(np.float64, (8,), elements=st.floats(-6, 6, width=64)), t=st.floats(0.05, 3.0))
def test_l0_is_hard_thresholding(v, t):
    expected = np.where(np.abs(v) > math.sqrt(2 * t), v, 0.0)
    keep = np.abs(np.abs(v) - math.sqrt(2 * t)) > 1e-9  # the tie: both 0 and v are minimizers
    got = fr.l0(t).prox({"w": torch.from_numpy(v)}, step=1.0)["w"].numpy()
    np.testing.assert_array_equal(got[keep], expected[keep])


@PROPERTY
@given(v=arrays(np.float64, (8,), elements=st.floats(-6, 6, width=64)), t=st.floats(0.05, 2.0))
def test_bridge_half_is_xus_half_thresholding(v, t):
    """Xu et al. (2012) solve min (z - v)^2 + lam |z|^(1/2), so lam = 2t here: above the threshold
    (54^(1/3)/4) lam^(2/3), z = 2/3 v (1 + cos(2pi/3 - 2/3 arccos(lam/8 (|v|/3)^(-3/2)))), else 0."""
    lam = 2 * t
    threshold = 54 ** (1 / 3) / 4 * lam ** (2 / 3)
    keep = np.abs(np.abs(v) - threshold) > 1e-6  # at the threshold 0 and the root tie
    a = np.maximum(np.abs(v), threshold)
    phi = np.arccos(lam / 8 * (a / 3) ** -1.5)
    root = 2 / 3 * v * (1 + np.cos(2 * np.pi / 3 - 2 / 3 * phi))
    expected = np.where(np.abs(v) > threshold, root, 0.0)
    got = fr.proxes.bridge_prox(torch.from_numpy(v), t, 1.0, 0.5).numpy()
    np.testing.assert_allclose(got[keep], expected[keep], atol=1e-10, rtol=1e-9)


def test_log_sum_prox_is_the_root_of_its_stationarity_quadratic():
    # v = 3, t*lam = 0.5, eps = 1: z^2 + (1 - 3) z + 0.5 - 3 = 0, z = (2 + sqrt(4 + 10)) / 2
    z = fr.proxes.log_sum_prox(torch.tensor([3.0, -3.0], dtype=F64), 1.0, 0.5, 1.0)
    expected = (2 + math.sqrt(14)) / 2
    torch.testing.assert_close(z, torch.tensor([expected, -expected], dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
@PROPERTY
@given(data=st.data())
def test_closed_form_gradients_equal_autograd_away_from_the_kinks(kind, data):
    lam, shape = data.draw(st.floats(0.1, 2.0)), data.draw(SHAPES[kind])
    w = data.draw(arrays(np.float64, (6,), elements=st.floats(-6, 6, width=64)))
    ends = [0.0, lam, shape * lam] if kind in ("mcp", "scad") else [0.0]
    if kind == "bridge" and any(abs(x) < 1e-3 for x in w):
        return  # the slope grows without bound near 0
    if any(abs(abs(x) - e) < 1e-6 for x in w for e in ends):
        return  # at a piece's end the one-sided derivatives differ: nothing to compare there
    P = FACTORIES[kind](lam, shape)
    wt = torch.from_numpy(w)
    auto = torch.func.grad(lambda p: P(p))({"w": wt})["w"]
    torch.testing.assert_close(P.grad({"w": wt})["w"], auto, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_every_form_runs_and_the_proximal_form_gives_zeros(kind):
    x = torch.linspace(-1, 1, 40, dtype=F64).reshape(10, 4)
    y = x[:, 0] * 2.0

    def loss(p, x, y):
        return ((x @ p["w"] - y) ** 2).mean()

    P = FACTORIES[kind](0.2, {"mcp": 3.0, "scad": 3.7, "l0": 1.0, "log_sum": 0.1, "bridge": 0.5}[kind])
    for form in ("loss", "coupled", "decoupled", "proximal"):
        step = fr.make_step(loss, fr.sgd(0.1), penalty=P, form=form, learning_rate=0.1)
        state = step.init({"w": torch.tensor([2.0, 0.05, 0.05, 0.05], dtype=F64)})
        for _ in range(30):
            state, metrics = step(state, x, y)
        assert torch.isfinite(state.params["w"]).all()
        assert torch.isfinite(metrics["penalty"])
        if form == "proximal":
            assert (state.params["w"][1:] == 0).all() and state.params["w"][0] != 0


def test_validation():
    with pytest.raises(ValueError, match="gamma"):
        fr.mcp(0.1, gamma=0.0)
    with pytest.raises(ValueError, match=r"\ba\b"):
        fr.scad(0.1, a=2.0)
    with pytest.raises(ValueError, match="eps"):
        fr.log_sum(0.1, eps=-1.0)
    with pytest.raises(ValueError, match="coeff"):
        fr.l0(-0.1)
    with pytest.raises(ValueError, match=r"\bq\b"):
        fr.bridge(0.1, q=1.0)
    with pytest.raises(fr.LeafTypeError, match="complex"):
        fr.mcp(0.1)({"z": torch.ones(2, dtype=torch.complex128)})


# --- group versions (axis=): the penalty of each slice's 2-norm ------------------------------------


@pytest.mark.parametrize("kind", sorted(FACTORIES))
@PROPERTY
@given(data=st.data())
def test_the_group_prox_is_the_global_minimizer(kind, data):
    """Per row (axis=0), ``1/2 ||z - v||^2 + step * p(||z||)`` with the coefficient times sqrt(4):
    its minimizer lies along ``v``, so a grid over ``s * v/||v||`` finds it; the prox is no worse."""
    lam, shape = data.draw(st.floats(0.05, 1.0), label="coeff"), data.draw(SHAPES[kind], label="shape")
    step = data.draw(st.floats(0.05, 3.0), label="step")
    v = data.draw(arrays(np.float64, (3, 4), elements=st.floats(-4, 4, width=64)), label="v")
    make = {
        "mcp": lambda: fr.mcp(lam, gamma=shape, axis=0),
        "scad": lambda: fr.scad(lam, a=shape, axis=0),
        "l0": lambda: fr.l0(lam, axis=0),
        "log_sum": lambda: fr.log_sum(lam, eps=shape, axis=0),
        "bridge": lambda: fr.bridge(lam, q=shape, axis=0),
    }[kind]
    z = make().prox({"w": torch.from_numpy(v)}, step=step)["w"].numpy()
    lam_g = lam * 2.0  # sqrt of the group size, 4
    s = np.linspace(0, 12, 24001)
    for vi, zi in zip(v, z):
        n = np.linalg.norm(vi)
        if n == 0:
            assert np.all(zi == 0)
            continue
        objective = 0.5 * (s - n) ** 2 + step * _value_1d(kind, s, lam_g, shape)
        zn = np.linalg.norm(zi)
        at_prox = 0.5 * np.sum((zi - vi) ** 2) + step * float(_value_1d(kind, np.array(zn), lam_g, shape))
        assert at_prox <= objective.min() + 1e-12
        assert at_prox >= objective.min() - 2e-3
        assert zn == 0 or np.allclose(zi / zn, vi / n, atol=1e-12)  # along v: whole groups kept or zeroed


def test_group_gradients_equal_autograd_and_vectors_are_not_selected_by_default():
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=F64)  # row norms 5 and 0.5
    for P in (
        fr.mcp(0.5, gamma=3.0, axis=0),
        fr.scad(0.5, axis=0),
        fr.log_sum(0.5, axis=0),
        fr.bridge(0.5, axis=0),
    ):
        auto = torch.func.grad(lambda p, P=P: P(p))({"w": w})["w"]
        torch.testing.assert_close(P.grad({"w": w})["w"], auto, atol=1e-12, rtol=1e-10)
        assert P.selection({"w": w, "b": torch.ones(2, dtype=F64)}) == {"w": True, "b": False}
