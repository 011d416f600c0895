"""Non-convex sparse penalties (MCP, SCAD, L0, log-sum), elementwise or on groups, with exact proxes.

Each is elementwise, ``sum_i p(w_i)``, and its prox ``argmin_z 1/2 (z - v)^2 + step * p(z)`` is
found exactly: ``p`` is a few quadratic (or, for the log-sum, smooth) pieces, so the global minimizer
is one of each piece's own minimizer clamped to the piece; all are evaluated and the least objective
wins (the first on a tie, so the answer is deterministic). This holds for every step size, also where
the objective is not convex (an MCP step past ``gamma``), where a formula such as firm thresholding
alone would be wrong. Unlike L1, these penalties do not shrink large weights: they are (nearly)
unbiased, at the price of convexity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from funcreg._src.core.validation import check_number
from funcreg._src.penalties.base import Coefficient, Penalty, check_coefficient, records_call
from funcreg._src.penalties.leaf import LeafPenalty, LeafRule
from funcreg._src.penalties.proxes import group_norms
from funcreg._src.penalties.structural import _axis_check, _check_axis, _is_matrix
from funcreg._src.selection.resolve import MaskLike


def _best(
    v: torch.Tensor, t: Any, p: Callable[[torch.Tensor], torch.Tensor], cands: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Of the candidate magnitudes, the one minimizing ``1/2 (z - |v|)^2 + t p(z)``, with ``v``'s sign."""
    a = v.abs()
    best = cands[0]
    best_obj = 0.5 * (best - a) ** 2 + t * p(best)
    for z in cands[1:]:
        obj = 0.5 * (z - a) ** 2 + t * p(z)
        better = obj < best_obj
        best, best_obj = torch.where(better, z, best), torch.where(better, obj, best_obj)
    return torch.sign(v) * best


def _positive(x: Any) -> Any:
    """``x`` where it is positive; a tiny positive number where a traced ``x`` is not (the candidate it
    divides then lands on its piece's end, which is a candidate anyway)."""
    return torch.clamp(x, min=1e-30) if isinstance(x, torch.Tensor) else x


def _penalty(
    name: str,
    coeff: Coefficient,
    mask: MaskLike | None,
    axis: int | None,
    value1: Callable[[torch.Tensor, Any], torch.Tensor],
    slope1: Callable[[torch.Tensor, Any], torch.Tensor],
    prox1: Callable[[torch.Tensor, Any, Any], torch.Tensor],
) -> LeafPenalty:
    """The penalty every factory of this module returns: ``coeff`` checked, the rule built from the
    1-D pieces by :func:`_rule` (elementwise, or on the slices along ``axis``)."""
    check_coefficient("coeff", coeff)
    return LeafPenalty(name, (coeff,), mask, _rule(value1, slope1, prox1, axis))


def _rule(
    value1: Callable[[torch.Tensor, Any], torch.Tensor],
    slope1: Callable[[torch.Tensor, Any], torch.Tensor],
    prox1: Callable[[torch.Tensor, Any, Any], torch.Tensor],
    axis: int | None,
) -> LeafRule:
    """The rule from the 1-D pieces (of ``|w|``: the value, its slope, the prox): elementwise, or with
    ``axis`` on the 2-norms of the slices along it, the coefficient scaled by ``sqrt(group size)`` as in
    :func:`funcreg.group_lasso`. A non-decreasing ``p`` of the norm has the prox ``v_g / ||v_g|| *
    prox1(||v_g||)``: whole groups become exact zeros."""
    if axis is None:
        return LeafRule(
            value=lambda w, c: torch.sum(value1(w.abs(), c)),
            grad=lambda w, c: torch.sign(w) * slope1(w.abs(), c),
            prox=prox1,
            complex_ok=False,
            prox_takes_step=True,
        )
    _check_axis(axis)

    def scaled(w: torch.Tensor, c: Any) -> Any:
        return c * math.sqrt(w.numel() // w.shape[axis]) if w.ndim else c

    def value(w: torch.Tensor, c: Any) -> torch.Tensor:
        return torch.sum(value1(group_norms(w, axis), scaled(w, c)))

    def grad(w: torch.Tensor, c: Any) -> torch.Tensor:
        n = group_norms(w, axis)
        safe = torch.where(n > 0, n, torch.ones_like(n))
        return torch.where(n > 0, slope1(n, scaled(w, c)) * w / safe, torch.zeros_like(w))

    def prox(v: torch.Tensor, step: Any, c: Any) -> torch.Tensor:
        n = group_norms(v, axis)
        safe = torch.where(n > 0, n, torch.ones_like(n))
        return v * torch.where(n > 0, prox1(n, step, scaled(v, c)) / safe, torch.zeros_like(n))

    return LeafRule(
        value,
        grad,
        prox,
        check=_axis_check(axis),
        default_select=_is_matrix,
        complex_ok=False,
        prox_takes_step=True,
    )


# --- MCP ----------------------------------------------------------------------------------------------


def _mcp(a: torch.Tensor, lam: Any, gamma: float) -> torch.Tensor:
    return torch.where(a <= gamma * lam, lam * a - a * a / (2 * gamma), 0.5 * gamma * lam * lam + 0 * a)


def mcp_prox(v: torch.Tensor, step: Any, lam: Any, gamma: float) -> torch.Tensor:
    """The prox of ``step * MCP(lam, gamma)``: firm thresholding where ``step < gamma``, exact for any step.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.proxes.mcp_prox(torch.tensor([0.5, 1.5, 4.0]), 1.0, 1.0, 3.0)  # 0; (1.5 - 1)/(1 - 1/3); kept
        tensor([0.0000, 0.7500, 4.0000])
    """
    a = v.abs()
    zero = torch.zeros_like(a)
    cut = gamma * lam + zero
    cands = [zero, cut, torch.maximum(a, cut)]
    # where step >= gamma the piece |z| <= gamma*lam is concave: its minimizers are its ends, above
    if isinstance(step, torch.Tensor) or step < gamma:
        inner = (a - step * lam) / _positive(1 - step / gamma)
        cands.append(torch.clamp(torch.minimum(inner, cut), min=0.0))
    return _best(v, step, lambda z: _mcp(z, lam, gamma), cands)


@records_call
def mcp(
    coeff: Coefficient,
    gamma: float = 3.0,
    axis: int | None = None,
    mask: MaskLike | None = None,
    name: str = "mcp",
) -> Penalty:
    """The minimax concave penalty (Zhang, 2010): per entry ``coeff*|w| - w^2/(2 gamma)`` up to
    ``|w| = gamma*coeff``, then the constant ``gamma*coeff^2/2``.

    Weights past ``gamma*coeff`` are not shrunk at all (no L1 bias). Gradient (the loss, coupled and
    decoupled forms): ``sign(w) * max(coeff - |w|/gamma, 0)``, 0 at 0. Prox (the proximal form):
    :func:`funcreg.proxes.mcp_prox`, firm thresholding for steps below ``gamma``, exact for all. With
    ``axis``, the group MCP: the penalty of each slice's 2-norm, ``coeff`` times ``sqrt(group size)``
    (matrices only by default, as :func:`funcreg.group_lasso`).

    Examples:
        >>> import torch, funcreg as fr
        >>> P = fr.mcp(1.0, gamma=3.0)
        >>> P.prox({"w": torch.tensor([0.5, 1.5, 4.0])}, step=1.0)["w"]  # zeroed, shrunk, kept
        tensor([0.0000, 0.7500, 4.0000])
    """
    check_number("gamma", gamma, low=0.0, low_open=True, allow_tensor=False)
    return _penalty(
        name,
        coeff,
        mask,
        axis,
        lambda a, c: _mcp(a, c, gamma),
        lambda a, c: torch.clamp(c - a / gamma, min=0.0),
        lambda v, step, c: mcp_prox(v, step, c, gamma),
    )


# --- SCAD ---------------------------------------------------------------------------------------------


def _scad(a: torch.Tensor, lam: Any, s: float) -> torch.Tensor:
    mid = (2 * s * lam * a - a * a - lam * lam) / (2 * (s - 1))
    return torch.where(a <= lam, lam * a, torch.where(a <= s * lam, mid, 0.5 * lam * lam * (s + 1) + 0 * a))


def scad_prox(v: torch.Tensor, step: Any, lam: Any, a: float) -> torch.Tensor:
    """The prox of ``step * SCAD(lam, a)``, exact for any step (Fan & Li's thresholding at step 1).

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.proxes.scad_prox(torch.tensor([0.5, 1.5, 3.0, 5.0]), 1.0, 1.0, 3.7)  # 0; 0.5; (2.7*3 - 3.7)/1.7; kept
        tensor([0.0000, 0.5000, 2.5882, 5.0000])
    """
    x = v.abs()
    zero = torch.zeros_like(x)
    lo, hi = lam + zero, a * lam + zero
    cands = [torch.clamp(torch.minimum(x - step * lam, lo), min=0.0), lo, hi, torch.maximum(x, hi)]
    # the middle piece is convex where step < a - 1, concave (minimized at its ends, above) otherwise
    if isinstance(step, torch.Tensor) or step < a - 1:
        mid = ((a - 1) * x - step * a * lam) / _positive(a - 1 - step)
        cands.append(torch.minimum(torch.maximum(mid, lo), hi))
    return _best(v, step, lambda z: _scad(z, lam, a), cands)


@records_call
def scad(
    coeff: Coefficient,
    a: float = 3.7,
    axis: int | None = None,
    mask: MaskLike | None = None,
    name: str = "scad",
) -> Penalty:
    """The smoothly clipped absolute deviation penalty (Fan & Li, 2001), ``a > 2`` (3.7 by default, as
    they recommend): L1 up to ``coeff``, a quadratic blend up to ``a*coeff``, then constant. With
    ``axis``, the group SCAD on the slices' 2-norms (as :func:`mcp`).

    Examples:
        >>> import torch, funcreg as fr
        >>> P = fr.scad(1.0)
        >>> P({"w": torch.tensor([0.5, 10.0])})  # 0.5 + (3.7 + 1)/2
        tensor(2.8500)
    """
    check_number("a", a, low=2.0, low_open=True, allow_tensor=False)
    return _penalty(
        name,
        coeff,
        mask,
        axis,
        lambda x, c: _scad(x, c, a),
        lambda x, c: torch.where(x <= c, c + 0 * x, torch.clamp(a * c - x, min=0.0) / (a - 1)),
        lambda v, step, c: scad_prox(v, step, c, a),
    )


# --- L0 and the log-sum -----------------------------------------------------------------------------


def hard_threshold(v: torch.Tensor, t: Any) -> torch.Tensor:
    """The prox of ``t * ||z||_0``: ``v`` where ``v^2 / 2 > t``, else 0 (0 on the tie).

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.proxes.hard_threshold(torch.tensor([0.5, -2.0]), 1.0)  # sqrt(2) is the threshold
        tensor([ 0., -2.])
    """
    return torch.where(0.5 * v * v > t, v, torch.zeros_like(v))


@records_call
def l0(
    coeff: Coefficient, axis: int | None = None, mask: MaskLike | None = None, name: str = "l0"
) -> Penalty:
    """``coeff`` times the number of nonzero entries; prox hard thresholding at ``sqrt(2 step coeff)``.
    With ``axis``, ``coeff * sqrt(group size)`` per nonzero slice (whole slices kept or zeroed).

    Its gradient is 0 away from 0 (the gradient forms do nothing): use the proximal form.

    Examples:
        >>> import torch, funcreg as fr
        >>> P = fr.l0(0.5)
        >>> P({"w": torch.tensor([0.0, 3.0, -1.0])}), P.prox({"w": torch.tensor([0.9, 1.1])}, step=1.0)["w"]
        (tensor(1.), tensor([0.0000, 1.1000]))
    """
    return _penalty(
        name,
        coeff,
        mask,
        axis,
        lambda x, c: c * (x != 0).to(x.dtype),
        lambda x, c: torch.zeros_like(x),
        lambda v, step, c: hard_threshold(v, step * c),
    )


def _log_sum(a: torch.Tensor, lam: Any, eps: float) -> torch.Tensor:
    return lam * torch.log1p(a / eps)


def log_sum_prox(v: torch.Tensor, step: Any, lam: Any, eps: float) -> torch.Tensor:
    """The prox of ``step * lam * sum log(1 + |z|/eps)``: 0, or the larger root of
    ``z^2 + (eps - |v|) z + step*lam - |v| eps = 0``, whichever has the smaller objective.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.proxes.log_sum_prox(torch.tensor([0.1, 3.0]), 1.0, 0.5, 1.0)  # (2 + sqrt(16 - 2)) / 2
        tensor([0.0000, 2.8708])
    """
    x = v.abs()
    disc = (x + eps) ** 2 - 4 * step * lam
    root = torch.clamp(((x - eps) + torch.sqrt(torch.clamp(disc, min=0.0))) / 2, min=0.0)
    return _best(v, step, lambda z: _log_sum(z, lam, eps), [torch.zeros_like(x), root])


@records_call
def log_sum(
    coeff: Coefficient,
    eps: float = 1.0,
    axis: int | None = None,
    mask: MaskLike | None = None,
    name: str = "log_sum",
) -> Penalty:
    """The log-sum penalty ``coeff * sum log(1 + |w|/eps)`` (Candes, Wakin & Boyd's reweighted L1).
    With ``axis``, of the slices' 2-norms (as :func:`mcp`).

    Examples:
        >>> import torch, funcreg as fr
        >>> P = fr.log_sum(1.0, eps=1.0)
        >>> P.grad({"w": torch.tensor([1.0, -3.0])})["w"]  # coeff * sign(w) / (eps + |w|)
        tensor([ 0.5000, -0.2500])
    """
    check_number("eps", eps, low=0.0, low_open=True, allow_tensor=False)
    return _penalty(
        name,
        coeff,
        mask,
        axis,
        lambda x, c: _log_sum(x, c, eps),
        lambda x, c: c / (eps + x),
        lambda v, step, c: log_sum_prox(v, step, c, eps),
    )


# --- the bridge penalty |w|^q, 0 < q < 1 (L1/2, L2/3) ----------------------------------------------


def bridge_prox(v: torch.Tensor, step: Any, lam: Any, q: float, iterations: int = 64) -> torch.Tensor:
    """The prox of ``step * lam * |z|^q`` for ``0 < q < 1``: 0, or the largest root of the
    stationarity ``g(z) = z - |v| + step*lam*q*z^(q-1) = 0``, whichever has the smaller objective.

    ``g`` is convex on ``z > 0`` with its minimum at ``z* = (step*lam*q*(1-q))^(1/(2-q))``; when
    ``g(z*) <= 0`` the largest root lies in ``[z*, |v|]``, where ``g`` increases, and ``iterations``
    bisection steps find it to rounding in float64 (64 halvings of the interval). For L1/2
    (``q = 1/2``) this is Xu et al.'s (2012) half thresholding, whose closed form is tested against it.

    Examples:
        >>> import torch, funcreg as fr
        >>> z = fr.proxes.bridge_prox(torch.tensor([3.0, 0.2], dtype=torch.float64), 1.0, 1.0, 0.5)
        >>> [round(x, 6) for x in z.tolist()]  # z + 1/(2 sqrt z) = 3, and 0.2 is below the threshold
        [2.695453, 0.0]
    """
    a = v.abs()
    t = step * lam
    z_star = (t * q * (1 - q)) ** (1 / (2 - q)) + 0 * a
    lo, hi = torch.minimum(z_star, a), a
    for _ in range(iterations):
        mid = (lo + hi) / 2
        g = mid - a + t * q * torch.clamp(mid, min=1e-300) ** (q - 1)
        lo, hi = torch.where(g < 0, mid, lo), torch.where(g < 0, hi, mid)
    return _best(v, t, lambda z: z**q, [torch.zeros_like(a), hi])


@records_call
def bridge(
    coeff: Coefficient,
    q: float = 0.5,
    axis: int | None = None,
    mask: MaskLike | None = None,
    name: str = "bridge",
) -> Penalty:
    """The bridge penalty ``coeff * sum |w|^q`` for ``0 < q < 1``: L1/2 (``q=0.5``), L2/3 (``q=2/3``).

    Non-convex, between L0 (``q -> 0``) and L1 (``q = 1``). Gradient ``coeff*q*|w|^(q-1)*sign(w)``
    away from 0 (0 at 0, where it is unbounded: use the proximal form); prox
    :func:`funcreg.proxes.bridge_prox`. With ``axis``, of the slices' 2-norms (as :func:`mcp`).

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.bridge(1.0, q=0.5)({"w": torch.tensor([4.0, -9.0])})  # 2 + 3
        tensor(5.)
    """
    check_number("q", q, low=0.0, high=1.0, low_open=True, high_open=True, allow_tensor=False)
    return _penalty(
        name,
        coeff,
        mask,
        axis,
        lambda x, c: c * x**q,
        lambda x, c: torch.where(x > 0, c * q * torch.clamp(x, min=1e-300) ** (q - 1), torch.zeros_like(x)),
        lambda v, step, c: bridge_prox(v, step, c, q),
    )
