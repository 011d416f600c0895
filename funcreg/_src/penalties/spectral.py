"""Low-rank and spectral penalties on weight matrices: nuclear norm, spectral norm, and Keras' orthogonality.

Each selected tensor of shape ``(out, ...)`` is seen as the matrix ``W = w.reshape(out, -1)`` (a conv
kernel: one row per filter), as :func:`funcreg.orthogonal` does; by default only tensors with
``ndim >= 2`` are selected. With ``W = U diag(s) V^T`` its SVD:

* :func:`nuclear_norm` ``c * sum(s)``: prox is singular value soft-thresholding (exact low rank);
* :func:`spectral_norm` ``c * max(s)``: prox clips the largest singular values to a common level;
* :func:`max_spectral_norm`: the constraint ``max(s) <= max_value``, a projection that clips them;
* :func:`orthogonal_cosine`: Keras 3's ``OrthogonalRegularizer``, the mean ``|cos|`` between rows
  (or columns).

The proximal maps are plain functions (:func:`singular_value_thresholding`, :func:`spectral_prox`,
:func:`clip_singular_values`), tested on their own.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from funcreg._src.core.validation import check_number
from funcreg._src.penalties.base import Coefficient, Penalty, check_coefficient, records_call
from funcreg._src.penalties.leaf import LeafPenalty, LeafRule
from funcreg._src.selection.resolve import MaskLike


def _matrix(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def _check_matrix(who: str) -> Any:
    def check(name: str, w: torch.Tensor) -> None:
        if w.ndim < 2:
            raise ValueError(f"{who} needs matrices; parameter {name!r} has shape {tuple(w.shape)}")

    return check


def _is_matrix(w: torch.Tensor) -> bool:
    return w.ndim >= 2


def _with_singular_values(w: torch.Tensor, fn: Any) -> torch.Tensor:
    """``U diag(fn(s)) V^T`` of the matrix view of ``w``, back in ``w``'s shape."""
    u, s, vh = torch.linalg.svd(_matrix(w), full_matrices=False)
    return ((u * fn(s).unsqueeze(-2)) @ vh).reshape(w.shape)


def singular_value_thresholding(w: torch.Tensor, t: Any) -> torch.Tensor:
    """``argmin_Z 1/2 ||Z - W||_F^2 + t ||Z||_*``: ``U diag(max(s - t, 0)) V^T``.

    Singular values at or below ``t`` become exact zeros, so the result has rank
    ``#{i : s_i > t}``.

    Examples:
        >>> import torch
        >>> from funcreg._src.penalties.spectral import singular_value_thresholding
        >>> singular_value_thresholding(torch.diag(torch.tensor([3.0, 0.5])), 1.0)
        tensor([[2., 0.],
                [0., 0.]])
    """
    return _with_singular_values(w, lambda s: torch.clamp(s - t, min=0))


def _water_level(s: torch.Tensor, t: Any) -> torch.Tensor:
    """The level ``tau >= 0`` with ``sum(max(s - tau, 0)) == t`` (0 when ``sum(s) <= t``)."""
    desc, _ = torch.sort(s, descending=True)
    k = torch.arange(1, desc.numel() + 1, dtype=s.dtype, device=s.device)
    levels = (torch.cumsum(desc, 0) - t) / k
    # the largest k whose k-th value is above the level of the first k (the values above tau)
    active = desc > levels
    idx = int(active.nonzero().max()) if bool(active.any()) else 0
    return torch.clamp(levels[idx], min=0)


def spectral_prox(w: torch.Tensor, t: Any) -> torch.Tensor:
    """``argmin_Z 1/2 ||Z - W||_F^2 + t ||Z||_2`` (``||.||_2`` the largest singular value).

    By Moreau's decomposition it is ``W - t * proj_{||.||_* <= 1}(W / t)``: the singular values are
    clipped, ``min(s_i, tau)``, at the level ``tau`` where ``sum(max(s_i - tau, 0)) = t`` (zero when
    ``sum(s) <= t``).

    Examples:
        >>> import torch
        >>> from funcreg._src.penalties.spectral import spectral_prox
        >>> spectral_prox(torch.diag(torch.tensor([3.0, 2.0, 0.5])), 1.5)  # tau = 1.75: 1.25 + 0.25 = 1.5
        tensor([[1.7500, 0.0000, 0.0000],
                [0.0000, 1.7500, 0.0000],
                [0.0000, 0.0000, 0.5000]])
    """
    return _with_singular_values(w, lambda s: torch.minimum(s, _water_level(s, t)))


def clip_singular_values(w: torch.Tensor, max_value: float) -> torch.Tensor:
    """The projection onto ``{Z : ||Z||_2 <= max_value}``: ``U diag(min(s, max_value)) V^T``.

    Examples:
        >>> import torch
        >>> from funcreg._src.penalties.spectral import clip_singular_values
        >>> clip_singular_values(torch.diag(torch.tensor([3.0, 0.5])), 1.0)
        tensor([[1.0000, 0.0000],
                [0.0000, 0.5000]])
    """
    return _with_singular_values(w, lambda s: torch.clamp(s, max=max_value))


@records_call
def nuclear_norm(coeff: Coefficient, mask: MaskLike | None = None, name: str = "nuclear_norm") -> Penalty:
    """Nuclear (trace) norm: ``coeff * sum_i s_i(W)``, the convex surrogate of rank.

    Gradient ``coeff * U_+ V_+^T`` over the nonzero singular values (the subgradient with 0 for the
    zero ones, as ``sign(0) = 0`` for L1); prox :func:`singular_value_thresholding` with
    ``t = step * coeff``: singular values below ``t`` become exact zeros, so :func:`funcreg.proximal`
    with this penalty produces exactly low-rank weights. Matrices only (``ndim >= 2``, see the module).

    Examples:
        >>> import torch, funcreg as fr
        >>> w = {"w": torch.diag(torch.tensor([3.0, -0.5]))}
        >>> fr.nuclear_norm(0.1)(w)  # 0.1 * (3 + 0.5)
        tensor(0.3500)
        >>> torch.linalg.matrix_rank(fr.nuclear_norm(1.0).prox(w, step=1.0)["w"])
        tensor(1)
    """
    check_coefficient("coeff", coeff)

    def value(w: torch.Tensor, c: Any) -> torch.Tensor:
        return c * torch.linalg.svdvals(_matrix(w)).sum()

    def grad(w: torch.Tensor, c: Any) -> torch.Tensor:
        return c * _with_singular_values(w, lambda s: (s > 0).to(s.dtype))

    rule = LeafRule(
        value, grad, singular_value_thresholding, _check_matrix("nuclear_norm"), _is_matrix, complex_ok=False
    )
    return LeafPenalty(name, (coeff,), mask, rule)


@records_call
def spectral_norm(coeff: Coefficient, mask: MaskLike | None = None, name: str = "spectral_norm") -> Penalty:
    """Spectral norm: ``coeff * max_i s_i(W)``, the largest singular value (the Lipschitz constant of
    ``x -> W x``).

    Gradient ``coeff * u_1 v_1^T`` (top singular vectors; 0 for a zero matrix); prox
    :func:`spectral_prox` with ``t = step * coeff``, which clips all the largest singular values to
    one level. For a hard bound use :func:`max_spectral_norm`. Matrices only.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.spectral_norm(0.5)({"w": torch.diag(torch.tensor([3.0, -4.0]))})
        tensor(2.)
    """
    check_coefficient("coeff", coeff)

    def value(w: torch.Tensor, c: Any) -> torch.Tensor:
        return c * torch.linalg.svdvals(_matrix(w))[0]

    def grad(w: torch.Tensor, c: Any) -> torch.Tensor:
        def top(s: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(s)
            out[0] = (s[0] > 0).to(s.dtype)
            return out

        return c * _with_singular_values(w, top)

    rule = LeafRule(value, grad, spectral_prox, _check_matrix("spectral_norm"), _is_matrix, complex_ok=False)
    return LeafPenalty(name, (coeff,), mask, rule)


@records_call
def max_spectral_norm(
    max_value: float, mask: MaskLike | None = None, name: str = "max_spectral_norm"
) -> Penalty:
    """Constraint ``||W||_2 <= max_value`` (largest singular value), a projection only.

    Value 0 where it holds, ``inf`` where it does not; no gradient, so apply it with
    :func:`funcreg.proximal`: each step clips the singular values, :func:`clip_singular_values`
    (spectral normalization as a hard constraint rather than a reparametrization). Matrices only.

    Examples:
        >>> import torch, funcreg as fr
        >>> z = fr.max_spectral_norm(1.0).prox({"w": torch.tensor([[3.0, 0.0], [0.0, 0.5]])}, step=0.1)["w"]
        >>> torch.linalg.svdvals(z)
        tensor([1.0000, 0.5000])
    """
    check_number("max_value", max_value, low=0.0, low_open=True, allow_tensor=False)

    def value(w: torch.Tensor) -> torch.Tensor:
        # feasible up to the rounding of U diag(min(s, max)) V^T and of its SVD, which is relative to the
        # norm of the matrix before the projection (unknown here): 1024 ulps
        slack = 1024 * torch.finfo(w.dtype).eps
        violated = torch.linalg.svdvals(_matrix(w))[0] > max_value * (1 + slack)
        return torch.where(violated, w.new_tensor(math.inf), w.new_tensor(0.0))

    def prox(v: torch.Tensor) -> torch.Tensor:  # a projection does not depend on the step
        return clip_singular_values(v, max_value)

    rule = LeafRule(
        value,
        None,
        prox,
        _check_matrix("max_spectral_norm"),
        _is_matrix,
        differentiable=False,
        complex_ok=False,
    )
    return LeafPenalty(name, (), mask, rule)


@records_call
def orthogonal_cosine(
    coeff: Coefficient,
    mode: Literal["rows", "columns"] = "rows",
    eps: float = 1e-7,
    mask: MaskLike | None = None,
    name: str = "orthogonal_cosine",
) -> Penalty:
    """Keras 3's ``OrthogonalRegularizer(factor=coeff, mode=mode)``: the mean ``|cos|`` between vectors.

    Each row (``mode="rows"``) or column of ``W`` is divided by ``max(||.||_2, eps)`` (Keras'
    ``normalize``), the Gram matrix ``N N^T`` (or ``N^T N``) of the ``n`` normalized vectors is
    formed, and the value is ``coeff * sum_{i != j} |G_ij| / (n (n - 1))``: the mean absolute cosine
    over the pairs. A matrix with a single row (column) has no pairs: its value is 0 (Keras divides by
    zero). Gradient by autodiff (``|cos| = 0`` is a kink: its subgradient there is 0). No prox.

    Beside :func:`funcreg.orthogonal` (``||W^T W - I||^2``, which also pulls norms to 1), this only
    penalizes angles. Keras' Dense kernel is ``(in, units)``, torch's ``Linear.weight`` is
    ``(units, in)``: Keras ``mode="rows"`` on a kernel is ``mode="columns"`` here on the weight.

    Args:
        coeff: ``>= 0`` (Keras' ``factor``, default there 0.01).
        mode: ``"rows"`` or ``"columns"``.
        eps: lower bound of the norms, ``> 0`` (Keras' ``backend.epsilon()``).
        mask: which parameters (default: every tensor with ``ndim >= 2``).
        name: the term's name.

    Examples:
        >>> import torch, funcreg as fr
        >>> w = {"w": torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])}
        >>> # |cos| of the pairs: 1/sqrt(2), 0, 1/sqrt(2); their mean is sqrt(2)/3
        >>> fr.orthogonal_cosine(1.0)(w)
        tensor(0.4714)
    """
    check_coefficient("coeff", coeff)
    if mode not in ("rows", "columns"):
        raise ValueError(f"Invalid mode value: {mode!r} (expected 'rows' or 'columns')")
    check_number("eps", eps, low=0.0, low_open=True, allow_tensor=False)
    axis = 1 if mode == "rows" else 0

    def value(w: torch.Tensor, c: Any) -> torch.Tensor:
        m = _matrix(w)
        n = m.shape[1 - axis]
        if n < 2:
            return (c * m.sum() * 0).to(m.dtype)  # no pairs; keeps the graph for autodiff
        normed = m / torch.clamp(torch.linalg.vector_norm(m, dim=axis, keepdim=True), min=eps)
        gram = normed @ normed.T if axis == 1 else normed.T @ normed
        off = gram * (1 - torch.eye(n, dtype=m.dtype, device=m.device))
        return c * torch.abs(off).sum() / (n * (n - 1))

    rule = LeafRule(value, None, None, _check_matrix("orthogonal_cosine"), _is_matrix, complex_ok=False)
    return LeafPenalty(name, (coeff,), mask, rule)


__all__ = [
    "clip_singular_values",
    "max_spectral_norm",
    "nuclear_norm",
    "orthogonal_cosine",
    "singular_value_thresholding",
    "spectral_norm",
    "spectral_prox",
]
