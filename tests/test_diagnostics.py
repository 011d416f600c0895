"""fr.sparsity and fr.norms against counts and norms computed directly with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import funcreg as fr

# ----------------------------------------------------------------------------------------------------
# sparsity


def test_sparsity_counts_exact_zeros_per_leaf_and_weighted_overall():
    params = {
        "a": torch.tensor([0.0, 1.0]),  # 1 of 2
        "b": torch.tensor([[0.0, 0.0, 0.0, 2.0], [1.0, 1.0, 1.0, -0.0]]),  # 4 of 8 (-0.0 is a zero)
        "frozen": None,
    }
    r = fr.sparsity(params)
    assert list(r) == ["a", "b"] and len(r) == 2
    assert r["a"] == 0.5 and r["b"] == 0.5
    assert r.zeros == 5 and r.numel == 10 and r.overall == 0.5
    params["c"] = torch.ones(10)  # 0 of 10: overall 5/20, not the mean of fractions (1/3)
    r = fr.sparsity(params)
    assert r.overall == 0.25 and r["c"] == 0.0
    assert [(leaf.name, leaf.shape, leaf.zeros, leaf.numel) for leaf in r.leaves] == [
        ("a", (2,), 1, 2),
        ("b", (2, 4), 4, 8),
        ("c", (10,), 0, 10),
    ]


def test_sparsity_threshold_is_inclusive_and_uses_abs():
    w = torch.tensor([-0.1, 0.1, 0.10001, -0.2, 0.0], dtype=torch.float64)
    assert fr.sparsity({"w": w}, threshold=0.1)["w"] == pytest.approx(3 / 5)
    assert fr.sparsity({"w": w}, threshold=0.2)["w"] == 1.0
    assert fr.sparsity({"w": w})["w"] == pytest.approx(1 / 5)


def test_sparsity_relative_threshold_story_3():
    # |w| < 5e-4 * max|w| per tensor: max|w| = 10 -> cutoff 5e-3 (strict), and exact zeros.
    w1 = torch.tensor([10.0, -4.9e-3, 5e-3, 0.0, 1.0], dtype=torch.float64)
    w2 = torch.tensor([1e-3, 2.0], dtype=torch.float64)  # cutoff 1e-3: 1e-3 is not < 1e-3
    w3 = torch.zeros(3)  # all zeros: fully sparse
    r = fr.sparsity({"conv": {"w": w1, "b": w2}, "fc": [w3]}, relative_threshold=5e-4)
    assert list(r) == ["conv.w", "conv.b", "fc.0"]
    assert r["conv.w"] == pytest.approx(2 / 5)
    assert r["conv.b"] == 0.0
    assert r["fc.0"] == 1.0
    assert r.overall == pytest.approx(5 / 10)
    assert "5e-04 * max|w|" in r.criterion or "0.0005 * max|w|" in r.criterion


def test_sparsity_of_module_and_params_of_agree():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[0].zero_()  # 4 of 12
        model[2].bias.zero_()  # 2 of 2
    expected = {"0.weight": 4 / 12, "0.bias": 0.0, "2.weight": 0.0, "2.bias": 1.0}
    assert dict(fr.sparsity(model)) == expected
    assert dict(fr.sparsity(fr.params_of(model))) == expected
    assert fr.sparsity(model).overall == pytest.approx(6 / 23)


def test_sparsity_table():
    r = fr.sparsity({"enc": {"w": torch.tensor([[0.0, 1.0], [2.0, 0.0]])}, "s": torch.tensor(0.0)})
    assert str(r) == (
        "sparsity (w == 0)\n"
        "name   shape   zeros  numel  fraction\n"
        "enc.w  2x2         2      4    0.5000\n"
        "s      scalar      1      1    1.0000\n"
        "total              3      5    0.6000"
    )
    assert "overall=0.6" in repr(r)


def test_sparsity_compares_exact_float32_values():
    w = torch.tensor([0.1, -0.1, 0.05], dtype=torch.float32)  # float32(0.1) = 0.100000001...
    assert fr.sparsity({"w": w}, threshold=0.1)["w"] == pytest.approx(1 / 3)
    assert fr.sparsity({"w": w}, threshold=float(w[0]))["w"] == 1.0


def test_sparsity_empty_leaf_and_nan():
    r = fr.sparsity({"e": torch.zeros(0, 3), "n": torch.tensor([math.nan, 0.0])})
    assert math.isnan(r["e"]) and r["n"] == 0.5 and r.overall == 0.5
    r = fr.sparsity({"n": torch.tensor([math.nan, 0.0, 1.0])}, relative_threshold=0.5)
    assert r["n"] == pytest.approx(1 / 3)  # max is nan: only the exact zero counts


def test_sparsity_validation():
    params = {"w": torch.ones(2)}
    for bad in (-1e-3, math.nan, math.inf):
        with pytest.raises(ValueError, match="threshold"):
            fr.sparsity(params, threshold=bad)
    with pytest.raises(TypeError, match="threshold"):
        fr.sparsity(params, threshold="0.1")
    with pytest.raises(TypeError, match="threshold"):
        fr.sparsity(params, threshold=torch.tensor(0.1))
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="relative_threshold"):
            fr.sparsity(params, relative_threshold=bad)
    with pytest.raises(ValueError, match="not both"):
        fr.sparsity(params, threshold=0.1, relative_threshold=0.1)
    with pytest.raises(ValueError, match="no tensor leaves"):
        fr.sparsity({"w": None})
    with pytest.raises(TypeError, match="'n' is a int"):
        fr.sparsity({"w": torch.ones(1), "n": 3})


shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
values = st.floats(-10.0, 10.0, allow_subnormal=False)


@st.composite
def sparse_arrays(draw):
    arr = draw(hnp.arrays(np.float64, shapes, elements=values))
    mask = draw(hnp.arrays(np.bool_, arr.shape))
    return np.where(mask, 0.0, arr)


@settings(deadline=None, max_examples=60)
@given(
    arrays=st.lists(sparse_arrays(), min_size=1, max_size=4),
    threshold=st.sampled_from([0.0, 1e-3, 0.5, 3.0]),
    rel=st.sampled_from([None, 5e-4, 0.1, 0.9]),
)
def test_sparsity_property(arrays, threshold, rel):
    params = {f"p{i}": torch.from_numpy(a) for i, a in enumerate(arrays)}
    if rel is None:
        r = fr.sparsity(params, threshold)
        counts = [int((np.abs(a) <= threshold).sum()) for a in arrays]
    else:
        r = fr.sparsity(params, relative_threshold=rel)
        counts = [
            int(((np.abs(a) < rel * np.abs(a).max()) | (a == 0)).sum()) if a.size else 0 for a in arrays
        ]
    sizes = [a.size for a in arrays]
    for i, (c, n) in enumerate(zip(counts, sizes)):
        got = r[f"p{i}"]
        if n == 0:
            assert math.isnan(got)
        else:
            assert got == pytest.approx(c / n, abs=1e-15, rel=1e-15)
    if sum(sizes):
        assert r.overall == pytest.approx(sum(counts) / sum(sizes), abs=1e-15, rel=1e-15)
        assert r.zeros == sum(counts) and r.numel == sum(sizes)


# ----------------------------------------------------------------------------------------------------
# norms


def test_norms_closed_form():
    params = {
        "w": torch.tensor([[3.0, 4.0]]),
        "b": torch.tensor([-12.0]),
        "frozen": None,
    }
    r = fr.norms(params)
    assert dict(r) == {"w": 5.0, "b": 12.0} and r.total == 13.0 and r.ord == 2.0
    r1 = fr.norms(params, ord=1)
    assert dict(r1) == {"w": 7.0, "b": 12.0} and r1.total == 19.0
    rinf = fr.norms(params, ord=math.inf)
    assert dict(rinf) == {"w": 4.0, "b": 12.0} and rinf.total == 12.0
    r0 = fr.norms({"w": torch.tensor([0.0, 2.0, -1.0]), "b": torch.zeros(2)}, ord=0)
    assert dict(r0) == {"w": 2.0, "b": 0.0} and r0.total == 2.0


def test_norms_matrix_is_frobenius_not_spectral():
    m = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)  # spectral norm 5.4650
    assert fr.norms({"m": m})["m"] == pytest.approx(math.sqrt(30.0), rel=1e-15)


def test_norms_float32_computed_in_float64():
    x = torch.full((4,), 1e-30, dtype=torch.float32)  # squares underflow in float32
    assert fr.norms({"x": x})["x"] == pytest.approx(2e-30, rel=1e-6)


def test_norms_empty_leaf_module_and_table():
    r = fr.norms({"e": torch.zeros(0), "x": torch.tensor([6.0, 8.0])})
    assert dict(r) == {"e": 0.0, "x": 10.0} and r.total == 10.0
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 4.0]]))
        model.bias.fill_(0.0)
    r = fr.norms(model)
    assert dict(r) == {"weight": 5.0, "bias": 0.0}
    assert str(r) == (
        "norms (ord=2)\n"
        "name    shape  numel  norm\n"
        "weight  1x2        2     5\n"
        "bias    1          1     0\n"
        "total              3     5"
    )


def test_norms_validation():
    params = {"w": torch.ones(2)}
    for bad in (-1, math.nan):
        with pytest.raises(ValueError, match="ord"):
            fr.norms(params, ord=bad)
    for bad in ("fro", True, None):
        with pytest.raises(TypeError, match="ord"):
            fr.norms(params, ord=bad)
    with pytest.raises(ValueError, match="no tensor leaves"):
        fr.norms([])


@settings(deadline=None, max_examples=60)
@given(
    arrays=st.lists(hnp.arrays(np.float64, shapes, elements=values), min_size=1, max_size=4),
    ord=st.sampled_from([0, 1, 1.5, 2, 3, math.inf]),
)
def test_norms_property(arrays, ord):
    params = [torch.from_numpy(a) for a in arrays]
    r = fr.norms(params, ord=ord)
    assert list(r) == [str(i) for i in range(len(arrays))]

    def np_norm(x: np.ndarray) -> float:
        x = np.abs(x.ravel())
        if x.size == 0:
            return 0.0
        if ord == 0:
            return float((x != 0).sum())
        if ord == math.inf:
            return float(x.max())
        return float((x**ord).sum() ** (1.0 / ord))

    for i, a in enumerate(arrays):
        assert r[str(i)] == pytest.approx(np_norm(a), abs=1e-12, rel=1e-12)
    total = np_norm(np.concatenate([a.ravel() for a in arrays]))
    assert r.total == pytest.approx(total, abs=1e-12, rel=1e-12)
