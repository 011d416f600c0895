"""Named optimizers as chains of building blocks, each equal to its ``torch.optim`` namesake."""

from __future__ import annotations

from typing import Any, Optional

from funcreg._src.base import GradientTransformation
from funcreg._src.combine import chain
from funcreg._src.transform import (
    ScalarOrSchedule,
    add_decayed_weights,
    decoupled_weight_decay,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)
from funcreg._src.validation import check_bool, check_number, check_rate, is_zero


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
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.SGD`` as a chain: ``[negate] -> add_decayed_weights -> [trace] -> scale_by_learning_rate``.

    ``weight_decay`` is coupled L2 (the gradient of ``wd/2 * ||w||^2``) applied to every parameter, as
    torch does; use :func:`add_decayed_weights` with a mask, or a penalty, to be selective.

    Example:
        >>> import torch, funcreg as fr
        >>> tx = fr.sgd(0.1, momentum=0.9, weight_decay=1e-2)
        >>> params = {"w": torch.ones(2)}
        >>> u, state = tx.update({"w": torch.ones(2)}, tx.init(params), params)
        >>> fr.apply_updates(params, u)["w"]  # 1 - 0.1 * (1 + 0.01)
        tensor([0.8990, 0.8990])
    """
    check_rate("learning_rate", learning_rate)
    check_number("momentum", momentum, low=0.0, allow_tensor=False)
    check_number("dampening", dampening, low=None, allow_tensor=False)
    check_number("weight_decay", weight_decay, low=0.0)
    check_bool("nesterov", nesterov)
    check_bool("maximize", maximize)
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
    return chain(*parts)


def adam(
    learning_rate: ScalarOrSchedule,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adam``: ``[negate] -> add_decayed_weights -> scale_by_adam -> scale_by_learning_rate``.

    ``weight_decay`` is *coupled* L2 as in torch's Adam: it is added to the gradient and then divided
    by ``sqrt(v)`` with it, so it is not the decay AdamW applies (see :func:`adamw`).

    Example:
        >>> import torch, funcreg as fr
        >>> tx = fr.adam(0.1)
        >>> params = {"w": torch.zeros(1)}
        >>> u, state = tx.update({"w": torch.tensor([-5.0])}, tx.init(params), params)
        >>> u["w"]  # the first step is lr * sign(-g)
        tensor([0.1000])
    """
    b1, b2 = _betas(betas)
    check_rate("learning_rate", learning_rate)
    check_number("eps", eps, low=0.0, allow_tensor=False)
    check_number("weight_decay", weight_decay, low=0.0)
    check_bool("amsgrad", amsgrad)
    check_bool("maximize", maximize)
    parts = []
    if maximize:
        parts.append(scale(-1.0))
    if not is_zero(weight_decay):
        parts.append(add_decayed_weights(weight_decay))
    parts.append(scale_by_adam(b1, b2, eps, amsgrad))
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)


def adamw(
    learning_rate: ScalarOrSchedule,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    mask: Optional[Any] = None,
) -> GradientTransformation:
    """``torch.optim.AdamW``: Adam plus decoupled decay ``w <- w - lr_t * wd * w`` (lr-scaled, as torch).

    The chain is ``[negate] -> scale_by_adam -> scale_by_learning_rate -> decoupled_weight_decay``.
    ``mask`` restricts the decay (e.g. ``fr.decay_mask(model)``); the Adam step applies to every
    parameter. The default ``weight_decay=1e-2`` is torch's (optax's is ``1e-4``).

    Example:
        >>> import torch, funcreg as fr
        >>> tx = fr.adamw(0.1, weight_decay=0.5)
        >>> params = {"w": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.zeros(1)}, tx.init(params), params)
        >>> u["w"]  # zero gradient: only the decay, -0.1 * 0.5 * 1
        tensor([-0.0500])
    """
    b1, b2 = _betas(betas)
    check_rate("learning_rate", learning_rate)
    check_number("eps", eps, low=0.0, allow_tensor=False)
    check_number("weight_decay", weight_decay, low=0.0)
    check_bool("amsgrad", amsgrad)
    check_bool("maximize", maximize)
    parts = []
    if maximize:
        parts.append(scale(-1.0))
    parts.append(scale_by_adam(b1, b2, eps, amsgrad))
    parts.append(scale_by_learning_rate(learning_rate))
    parts.append(decoupled_weight_decay(weight_decay, learning_rate=learning_rate, mask=mask))
    return chain(*parts)
