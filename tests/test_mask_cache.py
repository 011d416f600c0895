"""Masks are resolved once per parameter structure (``funcreg._src.selection.mask_cache.CachedMask``), and the
answer is always the one ``resolve_mask`` gives: the cache changes the cost, never the result."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcreg as fr
from funcreg._src.core.tree import flatten, tensors_of
from funcreg._src.selection.mask_cache import CachedMask
from funcreg._src.selection.resolve import resolve_mask


def _tree(names, ndims):
    return {n: torch.zeros((2,) * d) for n, d in zip(names, ndims)}


names_st = st.lists(st.sampled_from(["a", "b", "c.weight", "c.bias", "d", "e.w"]), min_size=1, unique=True)


@settings(deadline=None, max_examples=40)
@given(names=names_st, data=st.data())
def test_cached_mask_equals_resolve_mask_for_every_kind_of_mask(names, data):
    ndims = data.draw(st.lists(st.integers(0, 2), min_size=len(names), max_size=len(names)))
    tree = _tree(names, ndims)
    bools = data.draw(st.lists(st.booleans(), min_size=len(names), max_size=len(names)))
    masks = [
        dict(zip(names, bools)),  # a bool tree
        bools[0],  # one bool for every leaf
        lambda p: {k: v.ndim >= 2 for k, v in p.items()},  # a function of the structure
        fr.by_name("c.*"),  # a selector
    ]
    for mask in masks:
        cached = CachedMask(mask)
        for _ in range(2):  # the second call is answered from the cache
            try:
                expected = resolve_mask(mask, tree)
            except ValueError as e:  # a selector that selects nothing raises the same error, cached or not
                with pytest.raises(type(e)):
                    cached(tree)
                continue
            assert cached(tree) == expected


def test_a_mask_edited_in_place_is_resolved_again():
    tree = {"w": torch.ones(2), "b": torch.ones(2)}
    mask = {"w": True, "b": False}
    cached = CachedMask(mask)
    assert cached(tree) == [True, False]
    mask["b"] = True
    assert cached(tree) == [True, True]


def test_a_mask_function_is_called_once_per_structure():
    calls = []

    def mask(p):
        calls.append(1)
        return {k: v.ndim >= 2 for k, v in p.items()}

    cached = CachedMask(mask)
    a = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    for _ in range(3):
        assert cached(a) == [True, False]
    assert len(calls) == 1
    # another structure, and another shape under the same names: called again, with the new answer
    assert cached({"w": torch.ones(2, 2)}) == [True]
    assert cached({"w": torch.ones(2), "b": torch.ones(2, 2)}) == [False, True]
    assert len(calls) == 3


def test_masked_adamw_follows_a_changed_structure():
    # the same transform stepped on two trees: each gets its own mask (decay on matrices only)
    tx = fr.adamw(0.1, weight_decay=0.5, mask=lambda p: {k: v.ndim >= 2 for k, v in p.items()})
    for params in ({"w": torch.ones(2, 2), "b": torch.ones(2)}, {"v": torch.ones(3), "m": torch.ones(1, 3)}):
        u, _ = tx.update({k: torch.zeros_like(v) for k, v in params.items()}, tx.init(params), params)
        for k, v in params.items():
            # zero gradients: only the decay moves a parameter, by -lr * wd * w
            expected = -0.05 * v if v.ndim >= 2 else torch.zeros_like(v)
            torch.testing.assert_close(u[k], expected, atol=1e-7, rtol=1e-6)


def test_transforms_and_penalties_holding_a_cached_mask_pickle_and_copy():
    mask = {"w": True, "b": False}
    params = {"w": torch.full((2,), 2.0), "b": torch.full((2,), 2.0)}
    pen = fr.l2(0.1, mask=mask)
    for p in (pickle.loads(pickle.dumps(pen)), copy.deepcopy(pen)):
        # 0.1 / 2 * ||w||^2 = 0.05 * 8: only "w" is selected
        torch.testing.assert_close(p(params), torch.tensor(0.4), atol=1e-7, rtol=1e-6)
    cached = CachedMask(mask)
    cached(params)
    assert pickle.loads(pickle.dumps(cached))(params) == [True, False]
    assert copy.deepcopy(cached)(params) == [True, False]


trees = st.recursive(
    st.none() | st.integers(1, 3).map(lambda n: torch.from_numpy(np.zeros(n))),
    lambda children: (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(st.sampled_from("abcd"), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(deadline=None, max_examples=60)
@given(tree=trees)
def test_tensors_of_finds_every_tensor_flatten_finds(tree):
    found = tensors_of(tree)
    expected = [x for x in flatten(tree)[0] if isinstance(x, torch.Tensor)]
    assert sorted(map(id, found)) == sorted(map(id, expected))


def test_tensors_of_reads_namedtuple_states():
    tx = fr.adamw(0.1, amsgrad=True)
    state = tx.init({"w": torch.ones(2), "b": torch.ones(3)})
    expected = [x for x in flatten(state)[0] if isinstance(x, torch.Tensor)]
    assert sorted(map(id, tensors_of(state))) == sorted(map(id, expected))
