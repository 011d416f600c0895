"""The proximal step after Adam's preconditioning, done in Adam's metric.

Adam's step ``v = w - lr * m_hat / D`` with ``D = sqrt(v_hat) + eps`` minimizes
``<m_hat, z - w> + 1/(2 lr) ||z - w||_D^2`` (``||x||_D^2 = sum_i D_i x_i^2``). Adding a penalty to that
model gives the preconditioned proximal step

    ``z = argmin_z 1/2 ||z - v||_D^2 + lr * P(z)``,

which for the elastic net ``P = l1 ||z||_1 + l2/2 ||z||^2`` is, coordinate by coordinate,
``z_i = soft_threshold(D_i v_i, lr * l1) / (D_i + lr * l2)``: soft-thresholding at ``lr * l1 / D_i``.
Its fixed points are the minimizers of ``f + P`` whatever ``D`` is. Chaining ``fr.adam`` with
``fr.proximal(fr.l1(...))`` instead thresholds at ``lr * l1`` in the Euclidean metric: its fixed points
solve ``grad f / D + l1 * sign(w) = 0``, the optimum of another problem (an L1 weighted by ``D``).
"""

from __future__ import annotations

from typing import Any

import torch

from funcreg._src.core import leafwise
from funcreg._src.core.base import GradientTransformation, begin
from funcreg._src.core.steps import power_at
from funcreg._src.core.tree import flatten
from funcreg._src.core.typing import PyTree, ScalarOrSchedule
from funcreg._src.core.validation import check_number, check_rate, schedule_value
from funcreg._src.selection.mask_cache import CachedMask
from funcreg._src.selection.resolve import MaskLike
from funcreg._src.transforms.basic import ScaleByAdamState, scale_by_adam
from funcreg._src.transforms.block_utils import reject_complex, with_config


def diagonal_elastic_net_prox(v: torch.Tensor, d: torch.Tensor, t1: Any, t2: Any = 0.0) -> torch.Tensor:
    """``argmin_z 1/2 sum_i d_i (z_i - v_i)^2 + t1 ||z||_1 + t2/2 ||z||^2`` for ``d > 0``.

    ``soft_threshold(d * v, t1) / (d + t2)``: the thresholds are ``t1 / d_i``, per coordinate.

    Examples:
        >>> import torch
        >>> from funcreg.proxes import diagonal_elastic_net_prox
        >>> # thresholds t1 / d = 2 and 0.5
        >>> diagonal_elastic_net_prox(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 4.0]), 2.0)
        tensor([0.0000, 0.5000])
    """
    dv = d * v
    return torch.sign(dv) * torch.clamp(torch.abs(dv) - t1, min=0) / (d + t2)


def proximal_adam(
    learning_rate: ScalarOrSchedule,
    l1: float = 0.0,
    l2: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    mask: MaskLike = None,
) -> GradientTransformation:
    """Adam with the elastic-net prox taken in Adam's metric (see the module docstring).

    The update is ``z - w`` with ``z = argmin 1/2 ||z - (w - lr m_hat/D)||_D^2 + lr (l1 ||z||_1 +
    l2/2 ||z||^2)``, ``D = sqrt(v_hat) + eps`` as ``torch.optim.Adam`` computes it: small-gradient
    coordinates (small ``D``) are thresholded harder, so that a coordinate is zero exactly when
    ``|grad f| <= l1`` there, as at the lasso optimum. Parameters outside ``mask`` take the plain Adam
    step. The state is :class:`funcreg.ScaleByAdamState`; ``l1 = l2 = 0`` is ``fr.adam``.

    Args:
        learning_rate: ``>= 0``, or a schedule ``count -> lr``.
        l1: ``>= 0``, the coefficient of ``||w||_1``.
        l2: ``>= 0``, the coefficient of ``1/2 ||w||^2``.
        betas: Adam's ``(b1, b2)``, each in ``[0, 1)``.
        eps: ``> 0`` (``D`` must be positive for the metric).
        mask: which parameters are penalized (default: all).

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.proximal_adam(0.1, l1=1.0)
        >>> params = {"w": torch.tensor([0.05, 1.0])}
        >>> # first step: D = |g| (up to eps), Adam's point w - 0.1 * sign(g), thresholds 0.1 * 1 / |g|
        >>> u, _ = tx.update({"w": torch.tensor([0.5, 4.0])}, tx.init(params), params)
        >>> fr.apply_updates(params, u)["w"]  # |0.05 - 0.1| <= 0.2: zero; 0.9 - 0.025
        tensor([0.0000, 0.8750])
    """
    check_rate("learning_rate", learning_rate)
    check_number("l1", l1, low=0.0, allow_tensor=False)
    check_number("l2", l2, low=0.0, allow_tensor=False)
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise TypeError(f"Invalid betas value: {betas!r} (expected a pair (beta1, beta2))")
    check_number("eps", eps, low=0.0, low_open=True, allow_tensor=False)
    b1, b2 = betas
    adam = scale_by_adam(b1, b2, eps)

    cached = None if mask is None else CachedMask(mask)

    def init(params: PyTree) -> ScaleByAdamState:
        reject_complex(params, "proximal_adam")
        return adam.init(params)

    def update(
        updates: PyTree, state: ScaleByAdamState, params: PyTree | None = None
    ) -> tuple[PyTree, ScaleByAdamState]:
        f = begin(updates, state, params, ScaleByAdamState, "proximal_adam", needs_params=True)
        assert f.params is not None
        lr = schedule_value(learning_rate, leafwise.concrete(state.count))
        direction, new_state = adam.update(updates, state, params)
        keep = [True] * len(f.updates) if cached is None else cached(params)
        u_leaves, _ = flatten(direction)
        nu_leaves, _ = flatten(new_state.nu)
        step_leaves, _ = flatten(new_state.steps)
        out = []
        for i in f.index:
            t = leafwise.concrete(step_leaves[i])
            assert not isinstance(t, float)  # an int64 counter: an int eager, a tensor traced
            w, u = f.params[i], u_leaves[i]
            if not keep[i]:
                out.append(-lr * u)
                continue
            d = (
                torch.sqrt(nu_leaves[i]) / (1 - power_at(b2, t)) ** 0.5 + eps
            )  # Adam's denominator, as torch's
            z = diagonal_elastic_net_prox(w - lr * u, d, lr * l1, lr * l2)
            out.append(z - w)
        return f.tree(out), new_state

    given = dict(l1=l1, l2=l2, betas=betas, eps=eps, mask=mask)
    defaults = dict(l1=0.0, l2=0.0, betas=(0.9, 0.999), eps=1e-8)
    return with_config(
        GradientTransformation(init, update), "proximal_adam", (learning_rate,), given, defaults
    )
