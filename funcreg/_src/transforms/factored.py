"""Adafactor's building blocks: the factored second-moment rescaling and the relative step size.

Follows ``torch/optim/_adafactor.py`` (torch 2.13, single-tensor path): matrices (and the last two
dimensions of higher-rank tensors) keep a row and a column factor of the second moment instead of
one entry per coordinate; vectors and scalars keep the full second moment.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcreg._src.core import leafwise
from funcreg._src.core.base import GradientTransformation, begin
from funcreg._src.core.steps import advance_steps, float_at, init_count, per_param_counts
from funcreg._src.core.tree import flatten, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import check_number, check_rate, schedule_value
from funcreg._src.transforms.block_utils import (
    empty_like_none,
    loose_state_leaves,
    reject_complex,
    with_config,
)


class ScaleByAdafactorState(NamedTuple):
    """State of :func:`scale_by_adafactor`, one leaf per parameter in each field.

    ``row_var`` and ``col_var``: the factors of a tensor with ``ndim >= 2`` (shapes ``(..., m, 1)`` and
    ``(..., 1, n)``, torch's ``row_var``/``col_var``); ``variance``: the second moment of a vector or
    scalar (torch's ``variance``). A field a parameter does not have holds an empty tensor.
    """

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax
    row_var: PyTree
    col_var: PyTree
    variance: PyTree
    steps: PyTree


def _eps_pair(eps: Any) -> tuple[float | None, float]:
    if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
        raise TypeError(f"Invalid eps value: {eps!r} (expected a pair (eps1 or None, eps2))")
    if eps[0] is not None:
        check_number("eps[0]", eps[0], low=0.0, allow_tensor=False)
    check_number("eps[1]", eps[1], low=0.0, allow_tensor=False)
    return (None if eps[0] is None else float(eps[0])), float(eps[1])


def scale_by_adafactor(
    beta2_decay: float = -0.8, eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0
) -> GradientTransformation:
    """Adafactor's rescaling, as ``torch.optim.Adafactor`` computes it, without the relative step.

    At the parameter's step ``t``, with ``b_t = t^beta2_decay``: for a matrix ``G`` the factors are
    ``R <- lerp(R, mean(G^2, -1), b_t)``, ``C <- lerp(C, mean(G^2, -2), b_t)`` and the estimate is
    ``V = R C / max(mean(R), eps1)``; a vector keeps ``V <- lerp(V, g^2, b_t)``. Then
    ``U = G / sqrt(max(V, eps1^2))`` is clipped to RMS ``d`` and scaled by the parameter's RMS:
    the update is ``max(eps2, RMS(w)) * U / max(1, RMS(U) / d)``. Multiply it by
    ``-min(lr, 1/sqrt(t))`` (:func:`scale_by_relative_step`) for torch's step. Needs the params.

    Args:
        beta2_decay: ``<= 0``; the decay ``1 - t^beta2_decay`` of the second moment.
        eps: ``(eps1, eps2)``: ``eps1`` (``None``: the machine epsilon of the parameter's dtype) bounds
            the second moment from below, ``eps2`` the parameter RMS.
        d: clipping threshold of the update's RMS, ``>= 1``.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.scale_by_adafactor()
        >>> params = {"w": torch.full((2, 3), 2.0)}
        >>> u, _ = tx.update({"w": torch.full((2, 3), 5.0)}, tx.init(params), params)
        >>> u["w"]  # the first step is sign(g) * RMS(w)
        tensor([[2., 2., 2.],
                [2., 2., 2.]])
    """
    check_number("beta2_decay", beta2_decay, low=None, high=0.0, allow_tensor=False)
    eps1, eps2 = _eps_pair(eps)
    check_number("d", d, low=1.0, allow_tensor=False)

    def init(params: PyTree) -> ScaleByAdafactorState:
        reject_complex(params, "scale_by_adafactor")
        leaves, spec = flatten(params)
        rows: list[torch.Tensor | None] = []
        cols: list[torch.Tensor | None] = []
        full: list[torch.Tensor | None] = []
        for p in leaves:
            if p is None:
                row = col = var = None
            elif p.ndim >= 2:
                row = p.new_zeros(p.shape[:-1] + (1,))
                col = p.new_zeros(p.shape[:-2] + (1, p.shape[-1]))
                var = empty_like_none(p)
            else:
                row, col, var = empty_like_none(p), empty_like_none(p), torch.zeros_like(p)
            rows.append(row)
            cols.append(col)
            full.append(var)
        tree = lambda xs: unflatten(xs, spec)  # noqa: E731
        return ScaleByAdafactorState(
            init_count(params), tree(rows), tree(cols), tree(full), per_param_counts(params)
        )

    def update(
        updates: PyTree, state: ScaleByAdafactorState, params: PyTree | None = None
    ) -> tuple[PyTree, ScaleByAdafactorState]:
        who = "scale_by_adafactor"
        f = begin(updates, state, params, ScaleByAdafactorState, who, needs_params=True)
        grads = f.present_updates()
        row_leaves = loose_state_leaves(f, state.row_var, who, "row_var")
        col_leaves = loose_state_leaves(f, state.col_var, who, "col_var")
        var_leaves = loose_state_leaves(f, state.variance, who, "variance")
        step_leaves, new_steps, steps = advance_steps(f, state.steps, who)
        rows, cols, fulls, out = [], [], [], []
        zipped = zip(
            grads, f.present_params(), f.present(row_leaves), f.present(col_leaves), f.present(var_leaves)
        )
        for (g, w, row, col, var), t in zip(zipped, steps.per_leaf()):
            e1 = torch.finfo(w.dtype).eps if eps1 is None else eps1
            b_t = float_at(t) ** beta2_decay
            if isinstance(b_t, torch.Tensor):  # traced: computed in float64, applied in w's dtype
                b_t = b_t.to(w.dtype)
            if g.ndim >= 2:
                row = torch.lerp(row, torch.norm(g, dim=-1, keepdim=True).square() / g.size(-1), b_t)
                col = torch.lerp(col, torch.norm(g, dim=-2, keepdim=True).square() / g.size(-2), b_t)
                estimate = (row @ col) / row.mean(dim=-2, keepdim=True).clamp(min=e1)
            else:
                var = torch.lerp(var, g * g, b_t)
                estimate = var
            u = torch.rsqrt(estimate.clamp(min=e1 * e1)) * g
            # torch takes these two maxima in Python (max(1.0, nan) is 1.0): a NaN entry of u or w
            # leaves the other entries finite, where clamp would spread it over the whole tensor
            rms_u = torch.linalg.vector_norm(u) / (u.numel() ** 0.5 * d)
            denom = torch.where(rms_u > 1.0, rms_u, 1.0)
            rms_w = torch.linalg.vector_norm(w) / (w.numel() ** 0.5)
            scale = torch.where(rms_w > eps2, rms_w, eps2)
            out.append(u * (scale / denom))
            rows.append(row)
            cols.append(col)
            fulls.append(var)
        new_state = ScaleByAdafactorState(
            state.count + 1,
            f.tree(rows, row_leaves),
            f.tree(cols, col_leaves),
            f.tree(fulls, var_leaves),
            f.tree(new_steps, step_leaves),
        )
        return f.tree(out), new_state

    return with_config(
        GradientTransformation(init, update),
        "scale_by_adafactor",
        (),
        dict(beta2_decay=beta2_decay, eps=eps, d=d),
        dict(beta2_decay=-0.8, eps=(None, 1e-3), d=1.0),
    )


class ScaleByRelativeStepState(NamedTuple):
    """State of :func:`scale_by_relative_step`: updates done and per-parameter steps."""

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax
    steps: PyTree


def scale_by_relative_step(learning_rate: Any) -> GradientTransformation:
    """Adafactor's step size: ``u <- -min(lr_t, 1 / sqrt(t)) * u``, ``t`` the parameter's own step.

    ``lr_t`` is the learning rate, or a schedule's value at the number of updates done, as in
    :func:`funcreg.scale_by_learning_rate`; the cap ``1/sqrt(t)`` follows each parameter's step count.

    Args:
        learning_rate: ``>= 0``, or a schedule ``count -> lr``.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.scale_by_relative_step(2.0)
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> for _ in range(4):
        ...     u, state = tx.update({"w": torch.ones(1)}, state)
        >>> u["w"]  # -min(2, 1/sqrt(4))
        tensor([-0.5000])
    """
    check_rate("learning_rate", learning_rate)

    def init(params: PyTree) -> ScaleByRelativeStepState:
        return ScaleByRelativeStepState(init_count(params), per_param_counts(params))

    def update(
        updates: PyTree, state: ScaleByRelativeStepState, params: PyTree | None = None
    ) -> tuple[PyTree, ScaleByRelativeStepState]:
        f = begin(updates, state, params, ScaleByRelativeStepState, "scale_by_relative_step")
        step_leaves, new_steps, steps = advance_steps(f, state.steps, "scale_by_relative_step")
        lr = schedule_value(learning_rate, leafwise.concrete(state.count))
        factors = []
        for t in steps.per_leaf():
            cap = 1 / (float_at(t) ** 0.5)
            if isinstance(lr, torch.Tensor) or isinstance(cap, torch.Tensor):  # traced
                factors.append(-torch.clamp(torch.as_tensor(lr, dtype=torch.float64), max=cap))
            else:
                factors.append(-min(lr, cap))
        out = [u * s for u, s in zip(f.present_updates(), factors)]
        return f.tree(out), ScaleByRelativeStepState(state.count + 1, f.tree(new_steps, step_leaves))

    return with_config(
        GradientTransformation(init, update), "scale_by_relative_step", (learning_rate,), dict(), dict()
    )
