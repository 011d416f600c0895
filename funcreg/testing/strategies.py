"""Hypothesis strategies for parameter trees and gradients.

Every tensor is drawn as a NumPy array with ``hypothesis.extra.numpy.arrays`` and converted with
``torch.from_numpy``, so examples are reproducible and shrink, and torch's global random generator is
never touched. Elements are finite, bounded (``|x| <= max_abs``) and never subnormal, so a property
that fails does so because of the code under test and not because of overflow or denormal flushing.

A typical property draws parameters and then gradients of the same shapes:

.. code-block:: python

    from hypothesis import given, settings, strategies as st
    import funcreg as fr
    from funcreg.testing import gradients_like, param_trees

    @settings(deadline=None, max_examples=50)
    @given(st.data())
    def test_scale(data):
        params = data.draw(param_trees(nested=True))
        grads = data.draw(gradients_like(params))
        tx = fr.scale(2.0)
        updates, _ = tx.update(grads, tx.init(params), params)
        ...
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from funcreg._src.core.tree import flatten, unflatten
from funcreg._src.core.typing import PyTree

__all__ = [
    "DTYPES",
    "gradient_sequences",
    "gradients_like",
    "like",
    "param_trees",
    "tensors",
]

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
"""The dtypes :func:`param_trees` draws from when none is given."""

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}

DTypeLike = Optional[Union[torch.dtype, st.SearchStrategy]]  # noqa: UP045  (a runtime alias)

# Leaf names: identifiers, optionally dotted like the names of ``funcreg.params_of`` ("0.weight").
_NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,5}(\.[a-z0-9_]{1,6}){0,2}", fullmatch=True)
_KEYS = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True)


def _numpy_dtype(dtype: torch.dtype) -> Any:
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"Invalid dtype value: {dtype!r} (expected one of {list(_NUMPY_DTYPES)})")
    return _NUMPY_DTYPES[dtype]


def _check_max_abs(max_abs: float) -> None:
    if not (
        isinstance(max_abs, (int, float)) and not isinstance(max_abs, bool) and 0 < max_abs < float("inf")
    ):
        raise ValueError(f"Invalid max_abs value: {max_abs!r} (must be a finite number > 0)")


def _elements(dtype: torch.dtype, max_abs: float) -> st.SearchStrategy[float]:
    """Finite, non-subnormal floats within ``max_abs``; for float32 the bound is rounded down to a
    float32, as ``st.floats(width=32)`` refuses bounds it cannot represent."""
    if dtype == torch.float32:  # the largest float32 that is <= max_abs
        bound = np.float32(max_abs)
        if float(bound) > max_abs:
            bound = np.nextafter(bound, np.float32(0))
        return st.floats(
            -float(bound),
            float(bound),
            allow_nan=False,
            allow_infinity=False,
            allow_subnormal=False,
            width=32,
        )
    return st.floats(-max_abs, max_abs, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def tensors(
    shape: tuple[int, ...], dtype: torch.dtype = torch.float64, max_abs: float = 10.0
) -> st.SearchStrategy[torch.Tensor]:
    """Tensors of one ``shape`` and ``dtype`` with finite, non-subnormal elements in ``[-max_abs, max_abs]``.

    Drawn as a NumPy array and converted with ``torch.from_numpy`` (the tensor owns a fresh copy).

    Args:
        shape: the tensor's shape; ``()`` for a 0-d tensor.
        dtype: ``torch.float32`` or ``torch.float64``.
        max_abs: bound on the magnitude of every element, finite and ``> 0``.

    Examples:
        >>> import torch
        >>> from hypothesis import given, settings
        >>> from funcreg.testing import tensors
        >>> @settings(max_examples=5, deadline=None, database=None)
        ... @given(tensors((2, 3), dtype=torch.float32, max_abs=1.0))
        ... def check(x):
        ...     assert x.shape == (2, 3) and x.dtype == torch.float32 and x.abs().max() <= 1.0
        >>> check()
    """
    np_dtype = _numpy_dtype(dtype)
    _check_max_abs(max_abs)
    shape = tuple(int(s) for s in shape)
    return arrays(np_dtype, shape, elements=_elements(dtype, max_abs)).map(
        lambda a: torch.from_numpy(np.array(a, dtype=np_dtype, copy=True))
    )


def _dtypes(dtype: DTypeLike) -> st.SearchStrategy[torch.dtype]:
    if dtype is None:
        return st.sampled_from(DTYPES)
    if isinstance(dtype, st.SearchStrategy):
        return dtype
    _numpy_dtype(dtype)
    return st.just(dtype)


def _shapes(min_ndim: int, max_ndim: int, max_side: int, min_side: int) -> st.SearchStrategy[tuple[int, ...]]:
    return st.integers(min_ndim, max_ndim).flatmap(
        lambda nd: st.tuples(*[st.integers(min_side, max_side)] * nd)
    )


def _nest(draw: Any, leaves: list[Any], depth: int, kind: str) -> Any:
    """Groups ``leaves`` (in order) into a container of ``kind`` whose children are leaves or subtrees."""
    children: list[Any] = []
    i = 0
    while i < len(leaves):
        if depth > 0 and draw(st.booleans()):
            k = draw(st.integers(1, len(leaves) - i))
            sub_kind = draw(st.sampled_from(["dict", "list", "tuple"]))
            children.append(_nest(draw, leaves[i : i + k], depth - 1, sub_kind))
            i += k
        else:
            children.append(leaves[i])
            i += 1
    if kind == "list":
        return children
    if kind == "tuple":
        return tuple(children)
    keys = draw(st.lists(_KEYS, min_size=len(children), max_size=len(children), unique=True))
    return dict(zip(keys, children))


def param_trees(
    dtype: DTypeLike = None,
    min_leaves: int = 1,
    max_leaves: int = 4,
    max_ndim: int = 3,
    max_side: int = 5,
    nested: bool = False,
    max_abs: float = 10.0,
    min_side: int = 1,
    min_ndim: int = 0,
) -> st.SearchStrategy[PyTree]:
    """Parameter trees: a dict of tensors, or with ``nested=True`` nested dicts, lists and tuples.

    All leaves of one tree share a dtype. Flat trees are dicts ``{name: tensor}`` whose names look
    like those of :func:`funcreg.params_of` (``"w"``, ``"0.weight"``); nested trees are a dict at the
    top with dicts, lists and tuples below it (depth at most 3), never an empty container.

    Args:
        dtype: ``torch.float32``, ``torch.float64``, a strategy of either, or ``None`` to draw one of
            :data:`DTYPES` per tree.
        min_leaves, max_leaves: bounds on the number of tensors, ``1 <= min_leaves <= max_leaves``.
        max_ndim: tensors have ``min_ndim`` to ``max_ndim`` dimensions.
        max_side: each dimension has ``min_side`` to ``max_side`` entries.
        nested: draw nested containers rather than a flat dict.
        max_abs: bound on the magnitude of every element.
        min_side: the smallest dimension (``0`` allows empty tensors).
        min_ndim: the fewest dimensions (``2`` for trees of matrices and kernels only).

    Examples:
        >>> import torch
        >>> from hypothesis import given, settings
        >>> from funcreg.testing import param_trees
        >>> @settings(max_examples=10, deadline=None, database=None)
        ... @given(param_trees(dtype=torch.float64, max_leaves=3, max_ndim=2))
        ... def check(params):
        ...     assert isinstance(params, dict) and 1 <= len(params) <= 3
        ...     assert all(p.dtype == torch.float64 and p.ndim <= 2 for p in params.values())
        >>> check()
    """
    if not (isinstance(min_leaves, int) and isinstance(max_leaves, int) and 1 <= min_leaves <= max_leaves):
        raise ValueError(
            f"Invalid min_leaves/max_leaves values: {min_leaves!r}, {max_leaves!r} "
            "(need 1 <= min_leaves <= max_leaves)"
        )
    if not (isinstance(min_ndim, int) and isinstance(max_ndim, int) and 0 <= min_ndim <= max_ndim):
        raise ValueError(
            f"Invalid min_ndim/max_ndim values: {min_ndim!r}, {max_ndim!r} (need 0 <= min_ndim <= max_ndim)"
        )
    if not (isinstance(min_side, int) and isinstance(max_side, int) and 0 <= min_side <= max_side):
        raise ValueError(
            f"Invalid min_side/max_side values: {min_side!r}, {max_side!r} (need 0 <= min_side <= max_side)"
        )
    _check_max_abs(max_abs)
    return _param_trees(
        _dtypes(dtype), min_leaves, max_leaves, min_ndim, max_ndim, min_side, max_side, nested, max_abs
    )


@st.composite
def _param_trees(
    draw: Any,
    dtypes: st.SearchStrategy[torch.dtype],
    min_leaves: int,
    max_leaves: int,
    min_ndim: int,
    max_ndim: int,
    min_side: int,
    max_side: int,
    nested: bool,
    max_abs: float,
) -> PyTree:
    """The strategy behind :func:`param_trees`, on arguments it has checked: one dtype per tree, then
    the shapes, the tensors, and the names (flat) or the nesting (``nested``)."""
    leaf_dtype = draw(dtypes)
    n = draw(st.integers(min_leaves, max_leaves))
    shapes = draw(st.lists(_shapes(min_ndim, max_ndim, max_side, min_side), min_size=n, max_size=n))
    leaves = [draw(tensors(shape, leaf_dtype, max_abs)) for shape in shapes]
    if not nested:
        names = draw(st.lists(_NAMES, min_size=n, max_size=n, unique=True))
        return dict(zip(names, leaves))
    return _nest(draw, leaves, depth=2, kind="dict")


def like(tree: PyTree, max_abs: float = 10.0, allow_none: bool = False) -> st.SearchStrategy[PyTree]:
    """Trees with the structure of ``tree`` and fresh tensors of the same shapes, dtypes and devices.

    ``None`` leaves of ``tree`` stay ``None``. With ``allow_none=True`` each tensor may also be
    replaced by ``None`` (a frozen or unused parameter).

    Args:
        tree: the template, a pytree of tensors (and ``None``).
        max_abs: bound on the magnitude of every element.
        allow_none: whether tensor leaves may come out as ``None``.

    Examples:
        >>> import torch
        >>> from hypothesis import given, settings
        >>> from funcreg.testing import like
        >>> template = {"w": torch.zeros(2, 3), "b": [torch.zeros((), dtype=torch.float64)]}
        >>> @settings(max_examples=5, deadline=None, database=None)
        ... @given(like(template))
        ... def check(tree):
        ...     assert tree["w"].shape == (2, 3) and tree["w"].dtype == torch.float32
        ...     assert tree["b"][0].shape == () and tree["b"][0].dtype == torch.float64
        >>> check()
    """
    _check_max_abs(max_abs)
    leaves, spec = flatten(tree)
    for leaf in leaves:
        if leaf is not None and not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"like expects a tree of tensors and None, got a leaf of type {type(leaf).__name__}"
            )
        if leaf is not None:
            _numpy_dtype(leaf.dtype)

    def draw_leaf(leaf: torch.Tensor | None) -> st.SearchStrategy[torch.Tensor | None]:
        if leaf is None:
            return st.none()
        drawn = tensors(tuple(leaf.shape), leaf.dtype, max_abs).map(lambda x: x.to(leaf.device))
        return st.one_of(drawn, st.none()) if allow_none else drawn

    return st.tuples(*[draw_leaf(leaf) for leaf in leaves]).map(lambda xs: unflatten(list(xs), spec))


def gradients_like(
    params: PyTree, max_abs: float = 10.0, allow_none: bool = False
) -> st.SearchStrategy[PyTree]:
    """Gradient trees for ``params``: same structure, shapes and dtypes, bounded finite values.

    The same as :func:`like`; the name says what the tree is for. With ``allow_none=True`` some
    gradients are ``None``, as ``torch.func.grad`` never gives but frozen parameters do.

    Examples:
        >>> import torch
        >>> from hypothesis import given, settings
        >>> import funcreg as fr
        >>> from funcreg.testing import gradients_like
        >>> params = {"w": torch.ones(3)}
        >>> @settings(max_examples=5, deadline=None, database=None)
        ... @given(gradients_like(params, max_abs=1.0))
        ... def check(grads):
        ...     tx = fr.sgd(0.1)
        ...     updates, _ = tx.update(grads, tx.init(params), params)
        ...     torch.testing.assert_close(updates["w"], -0.1 * grads["w"], atol=1e-7, rtol=1e-6)
        >>> check()
    """
    return like(params, max_abs=max_abs, allow_none=allow_none)


def gradient_sequences(
    params: PyTree,
    steps: Union[int, st.SearchStrategy[int]],
    max_abs: float = 10.0,
    allow_none: bool = False,
) -> st.SearchStrategy[list[PyTree]]:
    """Lists of gradient trees for ``params``, one per step, each drawn afresh.

    Args:
        params: the template parameter tree.
        steps: the number of steps (an int ``>= 0``), or a strategy of such ints.
        max_abs: bound on the magnitude of every element.
        allow_none: whether gradients may be ``None`` (drawn independently at every step).

    Examples:
        >>> import torch
        >>> from hypothesis import given, settings, strategies as st
        >>> from funcreg.testing import gradient_sequences
        >>> params = {"w": torch.zeros(2)}
        >>> @settings(max_examples=5, deadline=None, database=None)
        ... @given(gradient_sequences(params, st.integers(1, 3)))
        ... def check(grads):
        ...     assert 1 <= len(grads) <= 3 and all(g["w"].shape == (2,) for g in grads)
        >>> check()
    """
    counts = steps if isinstance(steps, st.SearchStrategy) else st.just(steps)
    if not isinstance(steps, st.SearchStrategy) and not (
        isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0
    ):
        raise ValueError(f"Invalid steps value: {steps!r} (must be an int >= 0 or a strategy of them)")
    one = like(params, max_abs=max_abs, allow_none=allow_none)
    return counts.flatmap(lambda n: st.lists(one, min_size=n, max_size=n))
