"""``fr.sparsity_target``: the projection onto at most k nonzeros, per tensor and global.

The reference is NumPy: sort the magnitudes, keep the k largest (values drawn distinct, so the
k largest are one set); the reached sparsity is counted. float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcreg as fr

PROPERTY = settings(deadline=None, max_examples=30, database=None)


def _distinct(draw, n):
    values = draw(st.lists(st.floats(-5, 5, width=64), min_size=n, max_size=n, unique_by=lambda x: abs(x)))
    return np.asarray(values)


def _keep(v, k):
    out = np.zeros_like(v)
    if k > 0:
        top = np.argsort(-np.abs(v), kind="stable")[:k]
        out[top] = v[top]
    return out


@PROPERTY
@given(data=st.data(), sparsity=st.floats(0.0, 0.95))
def test_per_tensor_projection_keeps_the_largest_and_reaches_the_target(data, sparsity):
    w = _distinct(data.draw, 12).reshape(3, 4)
    b = _distinct(data.draw, 5)
    z = fr.sparsity_target(sparsity).prox({"w": torch.from_numpy(w), "b": torch.from_numpy(b)}, step=0.1)
    for v, got in ((w, z["w"]), (b, z["b"])):
        k = math.floor((1 - sparsity) * v.size + 1e-9)
        np.testing.assert_array_equal(got.numpy(), _keep(v.reshape(-1), k).reshape(v.shape))
        assert int(torch.count_nonzero(got)) <= k


@PROPERTY
@given(data=st.data(), sparsity=st.floats(0.0, 0.95))
def test_global_projection_uses_one_threshold(data, sparsity):
    v = _distinct(data.draw, 17)
    a, b = v[:12].reshape(3, 4), v[12:]
    z = fr.sparsity_target(sparsity, per="global").prox(
        {"a": torch.from_numpy(a), "b": torch.from_numpy(b)}, step=1.0
    )
    k = math.floor((1 - sparsity) * 17 + 1e-9)
    expected = _keep(v, k)
    np.testing.assert_array_equal(np.concatenate([z["a"].numpy().reshape(-1), z["b"].numpy()]), expected)


def test_the_proximal_form_holds_the_target_at_every_step():
    x = torch.linspace(-1, 1, 80, dtype=torch.float64).reshape(10, 8)
    y = x @ torch.linspace(1, 2, 8, dtype=torch.float64)

    def loss(p, x, y):
        return ((x @ p["w"] - y) ** 2).mean()

    for per in ("tensor", "global"):
        step = fr.make_step(
            loss,
            fr.adam(0.05),
            penalty=fr.sparsity_target(0.75, per=per),
            form="proximal",
            learning_rate=0.05,
        )
        state = step.init({"w": torch.ones(8, dtype=torch.float64)})
        for _ in range(10):
            state, _ = step(state, x, y)
            assert int(torch.count_nonzero(state.params["w"])) <= 2
            assert float(fr.sparsity_target(0.75, per=per)(state.params)) == 0.0  # feasible


def test_validation_and_the_indicator():
    with pytest.raises(ValueError, match="sparsity"):
        fr.sparsity_target(1.0)
    with pytest.raises(ValueError, match="per"):
        fr.sparsity_target(0.5, per="layer")
    P = fr.sparsity_target(0.5)
    assert float(P({"w": torch.tensor([1.0, 2.0, 0.0, 0.0])})) == 0.0
    assert math.isinf(float(P({"w": torch.tensor([1.0, 2.0, 3.0, 0.0])})))
    with pytest.raises(NotImplementedError):
        P.grad({"w": torch.ones(4)})


@PROPERTY
@given(data=st.data(), nm=st.sampled_from([(2, 4), (1, 4), (4, 8), (1, 2)]))
def test_n_of_m_keeps_the_largest_in_every_block(data, nm):
    n, m = nm
    w = _distinct(data.draw, 3 * 2 * m).reshape(3, 2 * m)
    got = fr.n_m_sparsity(n, m).prox({"w": torch.from_numpy(w)}, step=1.0)["w"].numpy()
    for row_got, row in zip(got, w):
        for b in range(2):
            block = row[b * m : (b + 1) * m]
            np.testing.assert_array_equal(row_got[b * m : (b + 1) * m], _keep(block, n))
    assert float(fr.n_m_sparsity(n, m)({"w": torch.from_numpy(got)})) == 0.0
    if n < m:
        assert math.isinf(float(fr.n_m_sparsity(n, m)({"w": torch.from_numpy(w)})))


def test_n_of_m_validation():
    with pytest.raises(ValueError, match=r"Invalid n value: 5"):
        fr.n_m_sparsity(5, 4)
    with pytest.raises(ValueError, match=r"Invalid m value"):
        fr.n_m_sparsity(2, 0)
    with pytest.raises(
        ValueError, match=r"'w' has shape \(2, 6\); its last dimension must be a multiple of 4"
    ):
        fr.n_m_sparsity(2, 4).prox({"w": torch.ones(2, 6)}, step=1.0)
    # vectors are left out by default (biases): only matrices are selected
    assert fr.n_m_sparsity().selection({"w": torch.ones(2, 4), "b": torch.ones(4)}) == {"w": True, "b": False}


@pytest.mark.parametrize("mode", ["pure", "donated", "compiled", "vmapped"])
@settings(deadline=None, max_examples=10, database=None)
@given(
    w=st.lists(st.floats(-2, 2, width=64), min_size=12, max_size=12),
    sparsity=st.sampled_from([0.25, 0.5, 0.75]),
)
def test_report_sparsity_gives_the_zeros_reached_at_every_step(mode, w, sparsity):
    """make_step(report_sparsity=True): metrics["sparsity"] is the fraction of exact zeros over the
    penalty's selection after each step (counted here with numpy), "sparsity/<name>" per parameter;
    a global target holds it at the target or above from the first proximal step."""
    params = {"w": torch.from_numpy(np.array(w).reshape(3, 4)), "b": torch.ones(2, dtype=torch.float64)}

    def loss(p, x):
        return ((p["w"] @ x - 1.0) ** 2).sum() + (p["b"] ** 2).sum()

    penalty = fr.sparsity_target(sparsity, per="global", mask=fr.by_name("w"))
    step = fr.make_step(
        loss,
        fr.sgd(0.05),
        penalty=penalty,
        form="proximal",
        learning_rate=0.05,
        donate=mode == "donated",
        report_sparsity=True,
    )
    x = torch.linspace(-1, 1, 4, dtype=torch.float64)
    if mode == "vmapped":
        run, state = fr.ensemble_step(step), None
        state = run.init(fr.stack([params, params]))
    else:
        run = torch.compile(step, backend="eager") if mode == "compiled" else step
        state = step.init(params)
    for _ in range(3):
        state, metrics = run(state, x)
        ws = state.params["w"].numpy()
        reached = (ws == 0).reshape(2, -1).mean(axis=1) if mode == "vmapped" else np.array([(ws == 0).mean()])
        got = metrics["sparsity"].reshape(-1).numpy()
        np.testing.assert_allclose(got, reached, atol=1e-12, rtol=0)
        np.testing.assert_allclose(metrics["sparsity/w"].reshape(-1).numpy(), reached, atol=1e-12, rtol=0)
        assert "sparsity/b" not in metrics  # not selected by the penalty
        assert (got >= sparsity - 1e-12).all()


def test_report_sparsity_without_a_penalty_counts_every_parameter():
    step = fr.make_step(lambda p, x: (p["w"] * x).sum(), fr.sgd(0.0), report_sparsity=True)
    state = step.init({"w": torch.tensor([0.0, 1.0, 0.0, 2.0]), "b": torch.zeros(4)})
    _, metrics = step(state, torch.ones(4))
    assert float(metrics["sparsity"]) == 6 / 8 and float(metrics["sparsity/w"]) == 0.5
    with pytest.raises(TypeError, match="report_sparsity"):
        fr.make_step(lambda p: p["w"].sum(), fr.sgd(0.1), report_sparsity=1)
