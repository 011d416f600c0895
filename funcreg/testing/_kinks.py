"""Comparing trees leaf by leaf, and gradients coordinate by coordinate in a way that is sound at kinks.

A non-smooth penalty (L1, group lasso, a hinge) has no gradient at its kinks, and two correct
implementations may pick different subgradients there, or land on opposite sides of a kink after
rounding. So a gradient mismatch is excused only where a kink explains it: the closed-form value
must lie between the one-sided partial derivatives, read by autograd at the point moved by
``64 * eps * max(1, |x|)`` either way along that coordinate. At a point where the penalty is
differentiable those collapse onto the gradient, so a wrong gradient is still caught there.
"""

from __future__ import annotations

import torch

from funcreg._src.core.tree import flatten, tree_names, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.penalties import Penalty
from funcreg.testing._search import _note


def _assert_trees_close(actual: PyTree, expected: PyTree, atol: float, rtol: float, what: str) -> None:
    """Leaf by leaf ``assert_close`` (dtypes may differ), failing with ``what`` and the leaf's name so
    a counterexample says which parameter and which comparison went wrong."""
    a_leaves, _ = flatten(actual)
    e_leaves, _ = flatten(expected)
    names = tree_names(expected)
    for name, a, e in zip(names, a_leaves, e_leaves):
        if a is None and e is None:
            continue
        if a is None or e is None:
            raise AssertionError(f"{what}: {name!r} is None on one side only")
        try:
            torch.testing.assert_close(a, e, atol=atol, rtol=rtol, check_dtype=False)
        except AssertionError as err:
            raise AssertionError(f"{what}: leaf {name!r} differs\n{err}") from None


def _kink_step(x: float, dtype: torch.dtype) -> float:
    """How far a kink may be from ``x`` and still count as being at ``x``: 64 units of rounding."""
    return 64.0 * torch.finfo(dtype).eps * max(1.0, abs(x))


def _one_sided_partials(penalty: Penalty, params: PyTree, leaf: int, index: int) -> tuple[float, float]:
    """Autograd's partial derivative of ``P`` along coordinate ``index`` of leaf ``leaf``, read at
    ``params`` moved by ``-h`` and by ``+h`` along that coordinate (``h`` from :func:`_kink_step`).

    At a point where ``P`` is differentiable both are the gradient (to rounding); at a kink (within
    ``h`` of one) they are the one-sided derivatives, and every subgradient lies between them.
    """
    leaves, spec = flatten(params)
    x = leaves[leaf]
    h = _kink_step(float(x.reshape(-1)[index]), x.dtype)
    out = []
    for sign in (-1.0, 1.0):
        moved = x.detach().reshape(-1).clone()
        moved[index] += sign * h
        tree = unflatten([moved.reshape(x.shape) if i == leaf else y for i, y in enumerate(leaves)], spec)
        g = flatten(torch.func.grad(penalty)(tree))[0][leaf]
        out.append(float(g.reshape(-1)[index]))
    return out[0], out[1]


def _kink_excused(
    penalty: Penalty,
    params: PyTree,
    closed: PyTree,
    autograd: PyTree,
    atol: float,
    rtol: float,
    stop_at_unexplained: bool = False,
) -> list[torch.Tensor | None]:
    """Per leaf, a mask of the coordinates where ``closed`` (``P.grad``) differs from ``autograd``
    (``torch.func.grad(P)``) beyond ``atol + rtol * |autograd|`` and a kink explains it: the closed
    form lies between the one-sided partials of :func:`_one_sided_partials` (with the same tolerance).
    ``None`` for a ``None`` leaf. At a point where ``P`` is differentiable nothing is excused.

    ``stop_at_unexplained``: return at the first difference no kink explains (the caller fails then
    anyway), leaving the coordinates after it unexcused; saves two autograd calls per coordinate of
    a wrong gradient while Hypothesis shrinks.
    """
    c_leaves, _ = flatten(closed)
    a_leaves, _ = flatten(autograd)
    out: list[torch.Tensor | None] = []
    for i, (c, a) in enumerate(zip(c_leaves, a_leaves)):
        if c is None or a is None:
            out.append(None)
            continue
        c64, a64 = c.detach().double().reshape(-1), a.detach().double().reshape(-1)
        mask = torch.zeros(c64.shape, dtype=torch.bool)
        mismatched = ~torch.isclose(c64, a64, rtol=rtol, atol=atol)
        for j in torch.nonzero(mismatched).flatten().tolist():
            below, above = _one_sided_partials(penalty, params, i, j)
            lo = min(below, above, float(a64[j]))
            hi = max(below, above, float(a64[j]))
            value = float(c64[j])
            if lo - (atol + rtol * abs(lo)) <= value <= hi + (atol + rtol * abs(hi)):
                mask[j] = True
            elif stop_at_unexplained:
                out.append(mask.reshape(c.shape))
                return out + [None] * (len(c_leaves) - len(out))
        out.append(mask.reshape(c.shape))
    return out


def _assert_grad_matches(
    penalty: Penalty,
    params: PyTree,
    atol: float,
    rtol: float,
    what: str = "P.grad vs torch.func.grad(P)",
    autograd: PyTree | None = None,
) -> PyTree:
    """``P.grad`` equals ``torch.func.grad(P)`` (or ``autograd``) coordinate by coordinate, except
    where a kink explains the difference (:func:`_kink_excused`). Returns ``P.grad(params)``."""
    closed = penalty.grad(params)
    if autograd is None:
        autograd = torch.func.grad(penalty)(params)
    a_leaves, spec = flatten(autograd)
    c_leaves, _ = flatten(closed)
    excused = _kink_excused(penalty, params, closed, autograd, atol, rtol, stop_at_unexplained=True)
    expected = [
        a if m is None or not bool(m.any()) else torch.where(m, c.to(a.dtype), a)
        for a, c, m in zip(a_leaves, c_leaves, excused)
    ]
    try:
        _assert_trees_close(closed, unflatten(expected, spec), atol, rtol, what)
    except AssertionError as err:
        _note(
            err,
            "Coordinates at a kink may take any value between the one-sided partial derivatives; "
            "these are not at a kink, or the value is outside them.",
        )
        raise
    return closed
