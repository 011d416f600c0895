"""Proximal operators and projections as plain tensor functions.

``prox_{tP}(v) = argmin_z 1/2 ||z - v||^2 + t P(z)``: each function here takes the point ``v`` and the
step-scaled coefficient ``t`` and returns the minimiser, for one tensor. They are the closed forms
behind the built-in penalties, importable and testable on their own (``fr.proxes.soft_threshold``).
"""

from __future__ import annotations

from typing import Any

import torch


def soft_threshold(v: torch.Tensor, t: Any) -> torch.Tensor:
    """The prox of ``t * ||v||_1``: ``sgn(v) * max(|v| - t, 0)`` (exact zeros where ``|v| <= t``).

    For complex ``v`` this shrinks the modulus and keeps the phase (``sgn(v) = v / |v|``).

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.proxes.soft_threshold(torch.tensor([-2.0, 0.3, 1.0]), 0.5)
        tensor([-1.5000,  0.0000,  0.5000])
    """
    return torch.sgn(v) * torch.clamp(torch.abs(v) - t, min=0)


def shrink(v: torch.Tensor, t: Any) -> torch.Tensor:
    """The prox of ``t/2 * ||v||^2``: ``v / (1 + t)``.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.proxes.shrink(torch.tensor([2.0]), 1.0)
        tensor([1.])
    """
    return v / (1 + t)


def elastic_net_prox(v: torch.Tensor, t1: Any, t2: Any) -> torch.Tensor:
    """The prox of ``t1 * ||v||_1 + t2/2 * ||v||^2``: ``soft_threshold(v, t1) / (1 + t2)``.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.proxes.elastic_net_prox(torch.tensor([-2.0, 0.3, 1.5]), 0.5, 1.0)
        tensor([-0.7500,  0.0000,  0.5000])
    """
    return soft_threshold(v, t1) / (1 + t2)


def group_norms(v: torch.Tensor, axis: int) -> torch.Tensor:
    """The 2-norm of each slice of ``v`` along ``axis`` (kept as a broadcastable tensor), overflow-safe.

    ``||v_g|| = m * ||v_g / m||`` with ``m = max |v_g|``: in float32 the squares of ``4e19`` overflow and
    those of ``5e-24`` underflow to 0, where the scaled norm is exact to rounding.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.proxes.group_norms(torch.tensor([[3e19, 4e19], [3e-24, 4e-24]]), axis=0)
        tensor([[5.0000e+19],
                [5.0000e-24]])
    """
    dims = tuple(d for d in range(v.ndim) if d != axis % v.ndim)
    if not dims:
        return torch.abs(v)
    scale = torch.amax(torch.abs(v), dim=dims, keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return safe * torch.linalg.vector_norm(v / safe, dim=dims, keepdim=True)


def group_soft_threshold(v: torch.Tensor, t: Any, axis: int = 0) -> torch.Tensor:
    """The prox of ``t * sum_g ||v_g||`` over slices along ``axis``: ``v_g * max(0, 1 - t / ||v_g||)``.

    Whole groups become exact zeros; a group whose norm is 0 stays 0.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.proxes.group_soft_threshold(torch.tensor([[3.0, 4.0], [0.06, 0.08]]), 1.0, axis=0)
        tensor([[2.4000, 3.2000],
                [0.0000, 0.0000]])
    """
    norms = group_norms(v, axis)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    factor = torch.where(norms > 0, torch.clamp(1 - t / safe, min=0), torch.zeros_like(norms))
    return v * factor


def project_group_norm(v: torch.Tensor, max_value: Any, axis: int = 0) -> torch.Tensor:
    """The projection onto ``{||v_g|| <= max_value}`` for slices along ``axis``: ``v_g * min(1, max/||v_g||)``.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.proxes.project_group_norm(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), 1.0)
        tensor([[0.6000, 0.8000],
                [0.3000, 0.4000]])
    """
    norms = group_norms(v, axis)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return v * torch.where(norms > 0, torch.clamp(max_value / safe, max=1.0), torch.ones_like(norms))


def project_non_negative(v: torch.Tensor) -> torch.Tensor:
    """The projection onto ``{v >= 0}``: ``max(v, 0)``.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.proxes.project_non_negative(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """
    return torch.clamp(v, min=0)


def anchor_prox(
    v: torch.Tensor, t: Any, reference: torch.Tensor, precision: torch.Tensor | None = None
) -> torch.Tensor:
    """The prox of ``t/2 * sum F (v - ref)^2``: ``(v + t F ref) / (1 + t F)`` (``F = 1`` without precision).

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.proxes.anchor_prox(torch.tensor([3.0]), 1.0, torch.tensor([1.0]))
        tensor([2.])
    """
    tf = t if precision is None else t * precision
    return (v + tf * reference) / (1 + tf)
