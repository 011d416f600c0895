"""Named optimizers as chains of building blocks, each equal to its ``torch.optim`` namesake."""

from __future__ import annotations

from typing import Any

import torch

from funcreg._src.combinators.combine import chain
from funcreg._src.core import leafwise
from funcreg._src.core.base import GradientTransformation, configured, expect_state, flat
from funcreg._src.core.steps import Step, power_at, sqrt_at
from funcreg._src.core.typing import PyTree, ScalarOrSchedule
from funcreg._src.core.validation import check_bool, check_number, check_rate, is_zero, schedule_value
from funcreg._src.kernels.fused import AdamKernel, SgdKernel
from funcreg._src.selection.mask_cache import CachedMask
from funcreg._src.selection.resolve import MaskLike
from funcreg._src.transforms.basic import (
    ScaleByAdamState,
    adam_moments,
    add_decayed_weights,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)
from funcreg._src.transforms.complex_params import as_real


def _betas(betas: Any) -> tuple[float, float]:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise TypeError(f"Invalid betas value: {betas!r} (expected a pair (beta1, beta2))")
    check_number("betas[0]", betas[0], low=0.0, high=1.0, high_open=True, allow_tensor=False)
    check_number("betas[1]", betas[1], low=0.0, high=1.0, high_open=True, allow_tensor=False)
    return betas[0], betas[1]


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: ScalarOrSchedule = 0.0,
    maximize: bool = False,
    fused: bool = False,
) -> GradientTransformation:
    """``torch.optim.SGD`` as a chain: ``[negate] -> add_decayed_weights -> [trace] -> scale_by_learning_rate``.

    ``weight_decay`` is coupled L2 (the gradient of ``wd/2 * ||w||^2``) applied to every parameter, as
    torch does; use :func:`add_decayed_weights` with a mask, or a penalty, to be selective.

    A donated step (:func:`funcreg.donated_update`, ``make_step(donate=True)``,
    :class:`funcreg.TorchOptimizer`) runs torch.optim's own arithmetic in place: with ``fused=True``
    torch's fused kernel (``torch._fused_sgd_``), as ``torch.optim.SGD(fused=True)``, otherwise the
    foreach sequence of ``torch.optim.SGD(foreach=True)``; each equals its namesake bit for bit and the
    pure update to rounding. Where torch has no fused kernel (complex parameters, a device or dtype it
    does not cover, tracing, vmap) the step falls back to the generic donated path, equal to the pure
    one bit for bit. Pure updates are the same with or without ``fused``.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.sgd(0.1, momentum=0.9, weight_decay=1e-2)
        >>> params = {"w": torch.ones(2)}
        >>> u, state = tx.update({"w": torch.ones(2)}, tx.init(params), params)
        >>> fr.apply_updates(params, u)["w"]  # 1 - 0.1 * (1 + 0.01)
        tensor([0.8990, 0.8990])
        >>> tx = fr.sgd(0.1, momentum=0.9, weight_decay=1e-2, fused=True)  # donated: torch._fused_sgd_
        >>> p, state = fr.donated_update(tx, {"w": torch.ones(2)}, tx.init(params), {"w": torch.ones(2)})
        >>> p["w"]
        tensor([0.8990, 0.8990])
    """
    check_rate("learning_rate", learning_rate)
    check_number("momentum", momentum, low=0.0, allow_tensor=False)
    check_number("dampening", dampening, low=None, allow_tensor=False)
    check_rate("weight_decay", weight_decay)
    check_bool("nesterov", nesterov)
    check_bool("maximize", maximize)
    check_bool("fused", fused)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            f"Invalid nesterov value: True needs momentum > 0 and dampening == 0 "
            f"(got momentum={momentum!r}, dampening={dampening!r})"
        )
    parts = []
    if maximize:
        parts.append(scale(-1.0))
    if not is_zero(weight_decay):
        parts.append(add_decayed_weights(weight_decay))
    if momentum != 0:
        parts.append(trace(momentum, dampening, nesterov))
    parts.append(scale_by_learning_rate(learning_rate))
    tx = chain(*parts)
    # a donated step runs torch.optim's fused kernel or its foreach SGD sequence (see _src/kernels/fused.py)
    kernel = SgdKernel(
        learning_rate, momentum, dampening, nesterov, weight_decay, maximize, len(parts), fused
    )
    tx = tx.with_record(kernel=kernel)
    return configured(
        tx,
        "sgd",
        learning_rate,
        momentum=momentum or None,
        dampening=dampening or None,
        nesterov=nesterov or None,
        weight_decay=weight_decay if not is_zero(weight_decay) else None,
        maximize=maximize or None,
        fused=fused or None,
    )


def adam(
    learning_rate: ScalarOrSchedule,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    fused: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adam``: ``[negate] -> add_decayed_weights -> scale_by_adam -> scale_by_learning_rate``.

    Implemented as one fused transform (fewer passes over memory) whose state is the
    :class:`ScaleByAdamState` of ``scale_by_adam``; it equals the chain to rounding (tested).

    ``weight_decay`` is *coupled* L2 as in torch's Adam: it is added to the gradient and then divided
    by ``sqrt(v)`` with it, so it is not the decay AdamW applies (see :func:`adamw`). ``fused`` as in
    :func:`adamw`.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.adam(0.1)
        >>> params = {"w": torch.zeros(1)}
        >>> u, state = tx.update({"w": torch.tensor([-5.0])}, tx.init(params), params)
        >>> u["w"]  # the first step is lr * sign(-g)
        tensor([0.1000])
    """
    return _adam_family(
        "adam", learning_rate, betas, eps, weight_decay, amsgrad, maximize, fused, decoupled=False, mask=None
    )


def adamw(
    learning_rate: ScalarOrSchedule,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    mask: MaskLike | None = None,
    fused: bool = False,
) -> GradientTransformation:
    """``torch.optim.AdamW``: Adam plus decoupled decay ``w <- w - lr_t * wd * w`` (lr-scaled, as torch).

    The chain is ``[negate] -> scale_by_adam -> scale_by_learning_rate -> decoupled_weight_decay``,
    implemented as one fused transform whose state is the :class:`ScaleByAdamState` of
    ``scale_by_adam``; it equals the chain to rounding (tested).
    ``mask`` restricts the decay (e.g. ``fr.decay_mask(model)``); the Adam step applies to every
    parameter. The default ``weight_decay=1e-2`` is torch's (optax's is ``1e-4``).

    A donated step (:func:`funcreg.donated_update`, ``make_step(donate=True)``) runs torch.optim's own
    arithmetic in place: with ``fused=True`` torch's fused kernel, as ``torch.optim.AdamW(fused=True)``,
    otherwise the foreach sequence of ``torch.optim.AdamW(foreach=True)``; each equals its namesake
    bit for bit and the pure update to rounding. Pure updates are the same with or without ``fused``.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.adamw(0.1, weight_decay=0.5)
        >>> params = {"w": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.zeros(1)}, tx.init(params), params)
        >>> u["w"]  # zero gradient: only the decay, -0.1 * 0.5 * 1
        tensor([-0.0500])
    """
    return _adam_family(
        "adamw", learning_rate, betas, eps, weight_decay, amsgrad, maximize, fused, decoupled=True, mask=mask
    )


def _adam_family(
    who: str,
    learning_rate: ScalarOrSchedule,
    betas: Any,
    eps: float,
    weight_decay: Any,
    amsgrad: bool,
    maximize: bool,
    fused: bool,
    *,
    decoupled: bool,
    mask: MaskLike | None,
) -> GradientTransformation:
    """Adam/AdamW in one transform, equal to the chain in the docstrings but with fewer passes.

    The chain ``[scale(-1)] -> [add_decayed_weights] -> scale_by_adam -> scale_by_learning_rate ->
    [decoupled_weight_decay]`` makes a new tensor at every link; fused, the update is built in the
    buffer of the decay term as ``torch.optim``'s foreach AdamW builds its step
    (``addcdiv(-lr*wd*w, m, denom, -lr/bc1)``). The state is the :class:`ScaleByAdamState` of
    ``scale_by_adam``; the schedule, if any, is called with its count.
    """
    b1, b2 = _betas(betas)
    check_rate("learning_rate", learning_rate)
    check_number("eps", eps, low=0.0, allow_tensor=False)
    check_rate("weight_decay", weight_decay)
    check_bool("amsgrad", amsgrad)
    check_bool("maximize", maximize)
    check_bool("fused", fused)
    moments = scale_by_adam(b1, b2, eps, amsgrad)  # its init is the state this transform keeps
    has_decay = not is_zero(weight_decay)
    decay_mask = None if mask is None else CachedMask(mask)

    def bias_correction2_sqrt(t: Step) -> float | torch.Tensor:
        return sqrt_at(1 - power_at(b2, t))

    def update(
        updates: PyTree, state: ScaleByAdamState, params: PyTree | None = None
    ) -> tuple[PyTree, ScaleByAdamState]:
        expect_state(state, ScaleByAdamState, who)
        f = flat(updates, params, who, needs_params=has_decay)
        grads = f.present_updates()
        if maximize:
            grads = leafwise.mul(grads, -1.0)
        # read at this step's count, before a donated adam_moments counts it in place
        count = leafwise.concrete(state.count)
        lr = schedule_value(learning_rate, count)
        wd = schedule_value(weight_decay, count, "weight_decay")
        if has_decay and not decoupled:
            grads = leafwise.add(grads, f.present_params(), alpha=wd)
        mu, denom, steps, new_state = adam_moments(f, state, grads, b1=b1, b2=b2, amsgrad=amsgrad, who=who)
        # m / (sqrt(v) / c + eps) == c * m / (sqrt(v) + eps * c) with c = sqrt(1 - b2^t): one pass
        # over the moments fewer than torch's sqrt-div-add, equal up to rounding
        leafwise.add_scalar_(denom, steps.map(lambda t: eps * bias_correction2_sqrt(t)))
        step_size = steps.map(lambda t: -lr * bias_correction2_sqrt(t) / (1 - power_at(b1, t)))
        if has_decay and decoupled:
            keep = decay_mask(params) if decay_mask is not None else None
            present_keep = [True] * len(f.index) if keep is None else f.present(keep)
            params_present = f.present_params()
            decayed = [i for i, k in enumerate(present_keep) if k]
            out: list[Any] = [None] * len(f.index)
            for i, u in zip(decayed, leafwise.mul([params_present[i] for i in decayed], -lr * wd)):
                out[i] = u
            for i, k in enumerate(present_keep):
                if not k:
                    out[i] = torch.zeros_like(mu[i])
            leafwise.addcdiv_(out, mu, denom, step_size)
        else:
            out = leafwise.div(mu, denom)
            leafwise.mul_(out, step_size)
        return f.tree(out), new_state

    # moments.init is already complex-aware; the update views complex leaves as real, as torch does
    tx = as_real(GradientTransformation(moments.init, update))
    # a donated step runs torch.optim's own kernels (fused, or its foreach sequence): see _src/kernels/fused.py
    kernel = AdamKernel(
        who, learning_rate, b1, b2, eps, weight_decay, decoupled, amsgrad, maximize, mask, fused
    )
    return configured(
        tx.with_record(kernel=kernel),
        who,
        learning_rate,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad or None,
        maximize=maximize or None,
        mask=mask,
        fused=fused or None,
    )
