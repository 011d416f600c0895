"""``fr.cautious``: against a line-by-line cautious AdamW written here from the paper / timm's rule.

The reference (Liang et al. 2024; timm's ``cadamw``): ``param *= 1 - lr * wd``; Adam's moments;
``mask = (exp_avg * grad > 0)``, ``mask /= max(mean(mask), 1e-3)``; ``param -= lr / bc1 * (exp_avg *
mask) / (sqrt(exp_avg_sq / bc2) + eps)``. Gradients drawn by Hypothesis; float64,
``atol=1e-12, rtol=1e-10``.
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

PROPERTY = settings(deadline=None, max_examples=20, database=None)
TOL = {"atol": 1e-12, "rtol": 1e-10}


def reference_cautious_adamw(w, grads, lr, betas, eps, wd):
    b1, b2 = betas
    w = w.clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        w = w * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mask = (m * g > 0).to(w.dtype)
        mask = mask / max(float(mask.mean()), 1e-3)
        denom = (v / (1 - b2**t)).sqrt() + eps
        w = w - lr / (1 - b1**t) * (m * mask) / denom
    return w


@PROPERTY
@given(
    grads=st.lists(arrays(np.float64, (6,), elements=st.floats(-2, 2, width=64)), min_size=1, max_size=5),
    wd=st.sampled_from([0.0, 0.1]),
)
def test_cautious_adamw_equals_the_reference(grads, wd):
    gs = [torch.from_numpy(g) for g in grads]
    w0 = torch.linspace(-1, 1, 6, dtype=torch.float64)
    lr, betas, eps = 0.05, (0.9, 0.99), 1e-8
    tx = fr.chain(
        fr.cautious(fr.adam(lr, betas=betas, eps=eps)),
        fr.decoupled_weight_decay(wd, lr, scale_by="learning_rate"),
    )
    params = {"w": w0.clone()}
    state = tx.init(params)
    for g in gs:
        u, state = tx.update({"w": g}, state, params)
        params = fr.apply_updates(params, u)
    torch.testing.assert_close(params["w"], reference_cautious_adamw(w0, gs, lr, betas, eps, wd), **TOL)


@PROPERTY
@given(g=arrays(np.float64, (5,), elements=st.floats(0.01, 2, width=64) | st.floats(-2, -0.01, width=64)))
def test_an_update_that_descends_everywhere_is_unchanged(g):
    # plain SGD's update -lr * g descends along g at every nonzero coordinate: the mask is all ones
    gt, params = torch.from_numpy(g), {"w": torch.zeros(5, dtype=torch.float64)}
    plain, wrapped = fr.sgd(0.1), fr.cautious(fr.sgd(0.1))
    u0, _ = plain.update({"w": gt}, plain.init(params), params)
    u1, _ = wrapped.update({"w": gt}, wrapped.init(params), params)
    assert torch.equal(u0["w"], u1["w"])


def test_all_coordinates_against_the_gradient_give_no_update_and_the_floor_bounds_the_scale():
    tx = fr.cautious(fr.sgd(1.0, momentum=0.9))
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    _, state = tx.update({"w": torch.ones(3, dtype=torch.float64)}, tx.init(params), params)
    u, _ = tx.update({"w": torch.full((3,), -0.5, dtype=torch.float64)}, state, params)
    assert torch.equal(u["w"], torch.zeros(3, dtype=torch.float64))
    # one kept coordinate of 1,000,000: scaled by 1 / max(1e-6, floor) = 1000, not 1e6
    n = 1_000_000
    tx = fr.cautious(fr.sgd(1.0, momentum=0.9))
    params = {"w": torch.zeros(n, dtype=torch.float64)}
    _, state = tx.update({"w": torch.ones(n, dtype=torch.float64)}, tx.init(params), params)
    g = torch.full((n,), -0.5, dtype=torch.float64)
    g[0] = 0.5
    u, _ = tx.update({"w": g}, state, params)
    assert math.isclose(float(u["w"][0]), -1.4 * 1000, rel_tol=1e-12)


def test_cautious_in_torch_optimizer_and_validation():
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = fr.TorchOptimizer([("w", w)], lambda lr: fr.cautious(fr.adam(lr)), lr=0.1)
    w.grad = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    opt.step()
    assert sorted(opt.state[w]) == ["count", "exp_avg", "exp_avg_sq", "step"]  # adam's own state
    with pytest.raises(TypeError, match="GradientTransformation"):
        fr.cautious("adam")
    with pytest.raises(ValueError, match="floor"):
        fr.cautious(fr.adam(0.1), floor=0.0)
    with pytest.raises(TypeError, match="floor"):
        fr.cautious(fr.adam(0.1), floor=torch.tensor(0.1))  # a number: it is not a swept hyperparameter
    params = {"z": torch.ones(2, dtype=torch.complex128)}
    tx = fr.cautious(fr.sgd(0.1))
    with pytest.raises(fr.LeafTypeError, match="complex"):
        tx.update({"z": torch.ones(2, dtype=torch.complex128)}, tx.init(params), params)
