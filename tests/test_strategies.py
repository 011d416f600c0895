"""The public Hypothesis strategies of funcreg.testing draw what they promise."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from helpers import SLOW_OK, leaves
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from funcreg.testing import DTYPES, gradient_sequences, gradients_like, like, param_trees, tensors

SMALLEST_NORMAL = {
    torch.float32: torch.finfo(torch.float32).tiny,
    torch.float64: torch.finfo(torch.float64).tiny,
}


def check_elements(x: torch.Tensor, max_abs: float) -> None:
    assert torch.isfinite(x).all()
    assert (x.abs() <= max_abs).all()
    nonzero = x[x != 0]
    assert (nonzero.abs() >= SMALLEST_NORMAL[x.dtype]).all(), "subnormal element"


@settings(deadline=None, max_examples=50, suppress_health_check=SLOW_OK)
@given(
    data=st.data(),
    dtype=st.sampled_from([None, *DTYPES]),
    nested=st.booleans(),
    bounds=st.tuples(st.integers(1, 3), st.integers(0, 3)),
    ndims=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    max_abs=st.floats(1e-3, 100.0),
)
def test_param_trees_respect_their_arguments(data, dtype, nested, bounds, ndims, max_abs):
    min_leaves, extra = bounds
    min_ndim, extra_ndim = ndims
    tree = data.draw(
        param_trees(
            dtype=dtype,
            min_leaves=min_leaves,
            max_leaves=min_leaves + extra,
            min_ndim=min_ndim,
            max_ndim=min_ndim + extra_ndim,
            max_side=3,
            nested=nested,
            max_abs=max_abs,
        )
    )
    assert isinstance(tree, dict)
    xs = leaves(tree)
    assert min_leaves <= len(xs) <= min_leaves + extra
    assert len({x.dtype for x in xs}) == 1 and xs[0].dtype in (DTYPES if dtype is None else (dtype,))
    for x in xs:
        assert isinstance(x, torch.Tensor) and x.device.type == "cpu"
        assert min_ndim <= x.ndim <= min_ndim + extra_ndim and all(1 <= s <= 3 for s in x.shape)
        check_elements(x, max_abs)
    if not nested:
        assert all(isinstance(v, torch.Tensor) for v in tree.values())


def seen_by(strategy, n=100):
    """n draws, deterministic (derandomize) and without shrinking."""
    seen = []

    @settings(
        max_examples=n,
        database=None,
        derandomize=True,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=SLOW_OK,
    )
    @given(strategy)
    def collect(x):
        seen.append(x)

    collect()
    return seen


def test_param_trees_reach_nested_lists_tuples_and_both_dtypes():
    nested = seen_by(param_trees(nested=True))
    for kind in (list, tuple, dict):
        assert any(isinstance(v, kind) for t in nested for v in t.values()), kind
    flat = seen_by(param_trees())
    assert {next(iter(t.values())).dtype for t in flat} == set(DTYPES)
    assert any("." in k for t in flat for k in t)  # names like "0.weight"
    assert {x.ndim for t in flat for x in t.values()} == {0, 1, 2, 3}


@settings(deadline=None, max_examples=30, suppress_health_check=SLOW_OK)
@given(data=st.data(), allow_none=st.booleans())
def test_like_keeps_structure_shapes_dtypes_and_none(data, allow_none):
    template = data.draw(param_trees(nested=True))
    spec = pytree.tree_structure(template, is_leaf=lambda x: x is None)
    with_none = pytree.tree_unflatten([None] + leaves(template)[1:], spec)
    tree = data.draw(like(with_none, max_abs=1.0, allow_none=allow_none))
    assert pytree.tree_structure(tree, is_leaf=lambda x: x is None) == spec
    assert leaves(tree)[0] is None
    for new, old in zip(leaves(tree)[1:], leaves(template)[1:]):
        if new is None:
            assert allow_none
            continue
        assert new.shape == old.shape and new.dtype == old.dtype
        assert new.data_ptr() != old.data_ptr()
        check_elements(new, 1.0)


def test_gradients_like_can_draw_none_only_when_allowed():
    params = {"a": torch.zeros(2), "b": torch.zeros(2)}
    assert any(g["a"] is None for g in seen_by(gradients_like(params, allow_none=True), 30))
    assert all(g["a"] is not None for g in seen_by(gradients_like(params), 30))


@settings(deadline=None, max_examples=20, suppress_health_check=SLOW_OK)
@given(data=st.data(), steps=st.integers(0, 4))
def test_gradient_sequences_have_the_requested_length(data, steps):
    params = {"w": torch.zeros(2, 1, dtype=torch.float64)}
    seq = data.draw(gradient_sequences(params, steps))
    assert len(seq) == steps and all(g["w"].shape == (2, 1) and g["w"].dtype == torch.float64 for g in seq)
    seq = data.draw(gradient_sequences(params, st.integers(1, 2)))
    assert 1 <= len(seq) <= 2


def test_draws_are_reproducible_and_leave_torch_rng_alone():
    """Drawn through NumPy: the same choices give the same tensors and torch's RNG is untouched."""
    state = torch.random.get_rng_state()
    a = seen_by(tensors((3,), torch.float64), 20)
    b = seen_by(tensors((3,), torch.float64), 20)
    assert all(torch.equal(x, y) and x.data_ptr() != y.data_ptr() for x, y in zip(a, b))
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: param_trees(min_leaves=0), "min_leaves"),
        (lambda: param_trees(min_leaves=3, max_leaves=2), "min_leaves"),
        (lambda: param_trees(min_ndim=2, max_ndim=1), "min_ndim"),
        (lambda: param_trees(max_abs=float("inf")), "max_abs"),
        (lambda: param_trees(dtype=torch.int64), "dtype"),
        (lambda: tensors((2,), torch.float16), "dtype"),
        (lambda: gradient_sequences({"w": torch.zeros(1)}, -1), "steps"),
    ],
)
def test_invalid_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()
