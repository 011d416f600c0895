"""Penalties and constraints on the structure of a tensor: group lasso, soft orthogonality, max-norm,
non-negativity. Groups are the slices along an axis: ``axis=0`` makes each output unit a group (rows
of a ``Linear`` weight, filters of a ``Conv`` kernel), ``axis=1`` each input (columns)."""

from __future__ import annotations

import math
from typing import Any

import torch

from funcreg._src.core.dtensor import replicate_like
from funcreg._src.core.validation import check_number
from funcreg._src.penalties import proxes
from funcreg._src.penalties.base import Coefficient, Penalty, check_coefficient, records_call
from funcreg._src.penalties.leaf import LeafPenalty, LeafRule
from funcreg._src.selection.resolve import MaskLike


def _check_axis(axis: Any) -> None:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"Invalid axis value: {axis!r} (expected an int)")


def _axis_check(axis: int) -> Any:
    def check(name: str, w: torch.Tensor) -> None:
        if w.ndim == 0 or not -w.ndim <= axis < w.ndim:
            raise ValueError(f"Invalid axis value: {axis} for parameter {name!r} of shape {tuple(w.shape)}")

    return check


def _matrices_only(name: str, w: torch.Tensor) -> None:
    if w.ndim < 2:
        raise ValueError(f"orthogonal needs matrices; parameter {name!r} has shape {tuple(w.shape)}")


def _is_matrix(w: torch.Tensor) -> bool:
    return w.ndim >= 2


def _indicator(violated: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    inf = torch.tensor(math.inf, dtype=like.dtype, device=like.device)
    return torch.where(violated, inf, torch.zeros((), dtype=like.dtype, device=like.device))


@records_call
def group_lasso(
    coeff: Coefficient, axis: int = 0, mask: MaskLike | None = None, name: str = "group_lasso"
) -> Penalty:
    """Group lasso: ``coeff * sum_g sqrt(|g|) * ||w_g||_2`` over the slices of each tensor along ``axis``.

    ``|g|`` is the number of elements in a group. The prox
    ``w_g * max(0, 1 - step*coeff*sqrt(|g|) / ||w_g||)`` (:func:`funcreg.proxes.group_soft_threshold`)
    zeroes whole groups; the gradient is 0 for a zero group. Norms are overflow-safe
    (:func:`funcreg.proxes.group_norms`). By default only tensors with ``ndim >= 2`` are selected; a
    selected tensor without ``axis`` raises ``ValueError``.

    Examples:
        >>> import torch, funcreg as fr
        >>> w = torch.tensor([[3.0, 4.0], [0.06, 0.08]])
        >>> # row norms 5 and 0.1, threshold 0.1 * sqrt(2): the first row shrinks by 1 - 0.1414/5, the second is zeroed
        >>> fr.group_lasso(0.1, axis=0).prox({"w": w}, step=1.0)["w"]
        tensor([[2.9151, 3.8869],
                [0.0000, 0.0000]])
    """
    check_coefficient("coeff", coeff)
    _check_axis(axis)

    def weight(w: torch.Tensor) -> float:
        return math.sqrt(w.numel() // w.shape[axis]) if w.ndim else 1.0

    def value(w: torch.Tensor, c: Any) -> torch.Tensor:
        return c * weight(w) * torch.sum(proxes.group_norms(w, axis))

    def grad(w: torch.Tensor, c: Any) -> torch.Tensor:
        norms = proxes.group_norms(w, axis)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        return torch.where(norms > 0, c * weight(w) * w / safe, torch.zeros_like(w))

    def prox(v: torch.Tensor, t: Any) -> torch.Tensor:
        return proxes.group_soft_threshold(v, t * weight(v), axis)

    rule = LeafRule(value, grad, prox, check=_axis_check(axis), default_select=_is_matrix)
    return LeafPenalty(name, (coeff,), mask, rule)


def _as_matrix(w: torch.Tensor) -> torch.Tensor:
    m = w.reshape(w.shape[0], -1)
    return m.T if m.shape[0] < m.shape[1] else m


def _eye(n: int, m: torch.Tensor) -> torch.Tensor:
    """The identity beside ``m`` (a replicated DTensor when ``m`` is sharded)."""
    return replicate_like(torch.eye(n, dtype=m.dtype, device=m.device), m)


def _orthogonal_value(w: torch.Tensor, c: Any) -> torch.Tensor:
    m = _as_matrix(w)
    gram = m.T @ m - _eye(m.shape[1], m)
    return c * torch.sum(gram * gram)


def _orthogonal_grad(w: torch.Tensor, c: Any) -> torch.Tensor:
    m = w.reshape(w.shape[0], -1)
    if m.shape[0] < m.shape[1]:
        gram = m @ m.T - _eye(m.shape[0], m)
        g = 4 * c * (gram @ m)
    else:
        gram = m.T @ m - _eye(m.shape[1], m)
        g = 4 * c * (m @ gram)
    return g.reshape(w.shape)


ORTHOGONAL = LeafRule(
    _orthogonal_value, _orthogonal_grad, check=_matrices_only, default_select=_is_matrix, complex_ok=False
)


@records_call
def orthogonal(coeff: Coefficient, mask: MaskLike | None = None, name: str = "orthogonal") -> Penalty:
    """Soft orthogonality: ``coeff * ||W^T W - I||_F^2`` for each selected matrix.

    A tensor of shape ``(out, ...)`` is reshaped to ``(out, rest)`` (conv kernels: one row per
    filter) and oriented so that ``W`` has at least as many rows as columns, so ``W^T W`` is the
    smaller Gram matrix (the one that can equal the identity). Gradient ``4 W (W^T W - I)``. By default
    only tensors with ``ndim >= 2`` are selected; selecting a 1-D tensor raises ``ValueError``. No prox.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.orthogonal(1.0)({"w": torch.eye(3)})
        tensor(0.)
    """
    check_coefficient("coeff", coeff)
    return LeafPenalty(name, (coeff,), mask, ORTHOGONAL)


@records_call
def max_norm(
    max_value: float, axis: int = 0, mask: MaskLike | None = None, name: str = "max_norm"
) -> Penalty:
    """Constraint ``||w_g||_2 <= max_value`` for each slice ``g`` along ``axis`` (a projection only).

    Its value is 0 where the constraint holds and ``inf`` where it does not (the indicator function);
    it has no gradient, so use it with :func:`funcreg.proximal`, whose step projects each group:
    ``w_g * min(1, max_value / ||w_g||)`` (:func:`funcreg.proxes.project_group_norm`). ``axis`` as in
    :func:`group_lasso`.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.max_norm(1.0).prox({"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}, step=0.1)["w"]
        tensor([[0.6000, 0.8000],
                [0.3000, 0.4000]])
    """
    check_number("max_value", max_value, low=0.0, low_open=True)
    _check_axis(axis)

    def value(w: torch.Tensor) -> torch.Tensor:
        # feasible up to the rounding of the projection itself, in the parameter's precision
        slack = 16 * torch.finfo(w.real.dtype if w.is_complex() else w.dtype).eps
        return _indicator((proxes.group_norms(w, axis) > max_value * (1 + slack)).any(), w)

    def prox(v: torch.Tensor) -> torch.Tensor:
        return proxes.project_group_norm(v, max_value, axis)  # a projection does not depend on the step

    rule = LeafRule(
        value, None, prox, check=_axis_check(axis), default_select=_is_matrix, differentiable=False
    )
    return LeafPenalty(name, (), mask, rule)


NON_NEGATIVE = LeafRule(
    value=lambda w: _indicator((w < 0).any(), w),
    prox=proxes.project_non_negative,
    differentiable=False,
    complex_ok=False,
)


@records_call
def non_negative(mask: MaskLike | None = None, name: str = "non_negative") -> Penalty:
    """Constraint ``w >= 0`` (a projection only): value 0 or ``inf``; prox ``max(v, 0)``.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.non_negative().prox({"w": torch.tensor([-1.0, 2.0])}, step=1.0)["w"]
        tensor([0., 2.])
    """
    return LeafPenalty(name, (), mask, NON_NEGATIVE)
