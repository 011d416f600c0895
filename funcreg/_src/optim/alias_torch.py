"""The other ``torch.optim`` optimizers as chains of building blocks, each equal to its namesake.

Every alias is ``[negate] -> [add_decayed_weights] -> scale_by_<rule> -> <learning rate> ->
[decoupled_weight_decay]``: ``maximize`` negates the gradient first (as torch does), a coupled
``weight_decay`` adds ``wd * w`` to the gradient before the rule sees it, and a decoupled one
(``decoupled_weight_decay=True``, Adafactor) multiplies the weights by ``1 - lr * wd`` outside the
rule. The learning rate is a float or a schedule ``count -> lr``, called with the number of updates
done (what ``torch.optim.lr_scheduler`` sets ``param_groups[i]["lr"]`` to). Complex parameters are
refused at ``init`` (``TypeError`` naming the key); torch handles them as ``torch.view_as_real``.
Tested step by step against torch 2.13 (params and every state buffer).
"""

from __future__ import annotations

from typing import Any

from funcreg._src.combinators.combine import chain
from funcreg._src.core.base import GradientTransformation
from funcreg._src.core.typing import ScalarOrSchedule
from funcreg._src.core.validation import check_bool, check_number, check_rate, is_zero
from funcreg._src.transforms.adam_variants import scale_by_adamax, scale_by_nadam, scale_by_radam
from funcreg._src.transforms.adaptive import scale_by_adadelta, scale_by_adagrad, scale_by_rms
from funcreg._src.transforms.basic import (
    add_decayed_weights,
    decoupled_weight_decay,
    scale,
    scale_by_learning_rate,
    trace,
)
from funcreg._src.transforms.block_utils import with_config
from funcreg._src.transforms.factored import scale_by_adafactor, scale_by_relative_step
from funcreg._src.transforms.sign_methods import scale_by_rprop


def betas_pair(betas: Any, high: float = 1.0, high_open: bool = True) -> tuple[float, float]:
    """``(beta1, beta2)``, each a float in ``[0, high)`` (``TypeError`` for anything but a pair)."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise TypeError(f"Invalid betas value: {betas!r} (expected a pair (beta1, beta2))")
    for i, b in enumerate(betas):
        check_number(f"betas[{i}]", b, low=0.0, high=high, high_open=high_open, allow_tensor=False)
    return float(betas[0]), float(betas[1])


def head(maximize: bool, weight_decay: Any, coupled: bool = True) -> list[GradientTransformation]:
    """The links before the rule: ``[scale(-1)]`` for ``maximize``, then a coupled decay if any."""
    check_bool("maximize", maximize)
    check_rate("weight_decay", weight_decay)
    parts = [scale(-1.0)] if maximize else []
    if coupled and not is_zero(weight_decay):
        parts.append(add_decayed_weights(weight_decay))
    return parts


def tail(learning_rate: ScalarOrSchedule, weight_decay: Any) -> list[GradientTransformation]:
    """The decoupled decay after the learning rate (``w <- w - lr_t * wd * w``), if any."""
    if is_zero(weight_decay):
        return []
    return [decoupled_weight_decay(weight_decay, learning_rate=learning_rate, scale_by="learning_rate")]


def adamax(
    learning_rate: ScalarOrSchedule = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adamax`` as a chain.

    ``[negate] -> add_decayed_weights -> scale_by_adamax -> scale_by_learning_rate``.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.adamax(0.1)
        >>> params = {"w": torch.zeros(1)}
        >>> u, _ = tx.update({"w": torch.tensor([-5.0])}, tx.init(params), params)
        >>> u["w"]  # the first step is lr * sign(-g), up to eps
        tensor([0.1000])
    """
    check_rate("learning_rate", learning_rate)
    b1, b2 = betas_pair(betas)
    parts = head(maximize, weight_decay)
    return with_config(
        chain(*parts, scale_by_adamax(b1, b2, eps), scale_by_learning_rate(learning_rate)),
        "adamax",
        (learning_rate,),
        dict(betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize),
        dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False),
    )


def nadam(
    learning_rate: ScalarOrSchedule = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.NAdam`` as a chain.

    ``[negate] -> [add_decayed_weights] -> scale_by_nadam -> lr -> [decoupled decay]``.

    ``decoupled_weight_decay=True`` is torch's NAdamW: the weights are multiplied by ``1 - lr * wd``
    instead of ``wd * w`` being added to the gradient.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.nadam(0.1, weight_decay=0.5, decoupled_weight_decay=True)
        >>> params = {"w": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.zeros(1)}, tx.init(params), params)
        >>> u["w"]  # zero gradient: only the decay, -0.1 * 0.5 * 1
        tensor([-0.0500])
    """
    check_rate("learning_rate", learning_rate)
    b1, b2 = betas_pair(betas)
    check_bool("decoupled_weight_decay", decoupled_weight_decay)
    parts = head(maximize, weight_decay, coupled=not decoupled_weight_decay)
    parts += [scale_by_nadam(b1, b2, eps, momentum_decay), scale_by_learning_rate(learning_rate)]
    if decoupled_weight_decay:
        parts += tail(learning_rate, weight_decay)
    return with_config(
        chain(*parts),
        "nadam",
        (learning_rate,),
        dict(
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            momentum_decay=momentum_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
        ),
        dict(
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=0.0,
            momentum_decay=4e-3,
            decoupled_weight_decay=False,
            maximize=False,
        ),
    )


def radam(
    learning_rate: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.RAdam`` as a chain.

    ``[negate] -> [add_decayed_weights] -> scale_by_radam -> lr -> [decoupled decay]``.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.radam(0.1)
        >>> params = {"w": torch.zeros(1)}
        >>> u, _ = tx.update({"w": torch.tensor([2.0])}, tx.init(params), params)
        >>> u["w"]  # no rectification yet (rho_t <= 5): -lr * m_hat
        tensor([-0.2000])
    """
    check_rate("learning_rate", learning_rate)
    b1, b2 = betas_pair(betas)
    check_bool("decoupled_weight_decay", decoupled_weight_decay)
    parts = head(maximize, weight_decay, coupled=not decoupled_weight_decay)
    parts += [scale_by_radam(b1, b2, eps), scale_by_learning_rate(learning_rate)]
    if decoupled_weight_decay:
        parts += tail(learning_rate, weight_decay)
    return with_config(
        chain(*parts),
        "radam",
        (learning_rate,),
        dict(
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
        ),
        dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, maximize=False),
    )


def rmsprop(
    learning_rate: ScalarOrSchedule = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.RMSprop``: ``[negate] -> add_decayed_weights -> scale_by_rms -> [trace] -> lr``.

    torch's RMSprop momentum buffer starts at zero, ``b_t = momentum * b_{t-1} + g_t / avg_t``: its
    first value is the first rescaled gradient, which is :func:`funcreg.trace`'s convention.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.rmsprop(0.01, alpha=0.75)
        >>> params = {"w": torch.zeros(1)}
        >>> u, _ = tx.update({"w": torch.tensor([2.0])}, tx.init(params), params)
        >>> u["w"]  # -0.01 * 2 / sqrt(0.25 * 4)
        tensor([-0.0200])
    """
    check_rate("learning_rate", learning_rate)
    check_number("momentum", momentum, low=0.0, allow_tensor=False)
    parts = head(maximize, weight_decay)
    parts.append(scale_by_rms(alpha, eps, centered))
    if momentum != 0:
        parts.append(trace(momentum))
    return with_config(
        chain(*parts, scale_by_learning_rate(learning_rate)),
        "rmsprop",
        (learning_rate,),
        dict(
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            maximize=maximize,
        ),
        dict(alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False),
    )


def adagrad(
    learning_rate: ScalarOrSchedule = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adagrad`` as a chain.

    ``[negate] -> add_decayed_weights -> scale_by_adagrad -> scale_by_learning_rate``.

    ``lr_decay`` divides each parameter's step by ``1 + (t - 1) * lr_decay`` at its own step ``t``
    (inside :func:`funcreg.scale_by_adagrad`), as torch does.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.adagrad(0.1)
        >>> params = {"w": torch.zeros(1)}
        >>> u, _ = tx.update({"w": torch.tensor([4.0])}, tx.init(params), params)
        >>> u["w"]  # -0.1 * 4 / sqrt(16)
        tensor([-0.1000])
    """
    check_rate("learning_rate", learning_rate)
    parts = head(maximize, weight_decay)
    parts.append(scale_by_adagrad(lr_decay, initial_accumulator_value, eps))
    return with_config(
        chain(*parts, scale_by_learning_rate(learning_rate)),
        "adagrad",
        (learning_rate,),
        dict(
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
            maximize=maximize,
        ),
        dict(lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10, maximize=False),
    )


def adadelta(
    learning_rate: ScalarOrSchedule = 1.0,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: ScalarOrSchedule = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adadelta`` as a chain.

    ``[negate] -> add_decayed_weights -> scale_by_adadelta -> scale_by_learning_rate``.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.adadelta(1.0, rho=0.0, eps=1.0)
        >>> params = {"w": torch.zeros(1)}
        >>> u, _ = tx.update({"w": torch.tensor([3.0])}, tx.init(params), params)
        >>> u["w"]  # -sqrt(0 + 1) / sqrt(9 + 1) * 3
        tensor([-0.9487])
    """
    check_rate("learning_rate", learning_rate)
    parts = head(maximize, weight_decay)
    parts.append(scale_by_adadelta(rho, eps))
    return with_config(
        chain(*parts, scale_by_learning_rate(learning_rate)),
        "adadelta",
        (learning_rate,),
        dict(rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize),
        dict(rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False),
    )


def rprop(
    learning_rate: ScalarOrSchedule = 1e-2,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50.0),
    maximize: bool = False,
    weight_decay: ScalarOrSchedule = 0.0,
) -> GradientTransformation:
    """``torch.optim.Rprop``: ``[negate] -> [add_decayed_weights] -> scale_by_rprop -> scale(-1)``.

    The learning rate is Rprop's initial step size, read at each parameter's first step; later steps
    do not depend on it (a schedule changes only where parameters start). torch's Rprop has no
    ``weight_decay``; funcreg's is coupled (``wd * w`` added to the gradient before the sign), which
    equals torch's Rprop fed the gradient of ``loss + wd/2 ||w||^2``.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.rprop(0.1)
        >>> params = {"w": torch.zeros(2)}
        >>> u, _ = tx.update({"w": torch.tensor([3.0, -0.01])}, tx.init(params), params)
        >>> u["w"]  # -lr * sign(g), whatever |g|
        tensor([-0.1000,  0.1000])
    """
    parts = head(maximize, weight_decay)
    return with_config(
        chain(*parts, scale_by_rprop(learning_rate, etas, step_sizes), scale(-1.0)),
        "rprop",
        (learning_rate,),
        dict(etas=etas, step_sizes=step_sizes, maximize=maximize, weight_decay=weight_decay),
        dict(etas=(0.5, 1.2), step_sizes=(1e-6, 50.0), maximize=False, weight_decay=0.0),
    )


def adafactor(
    learning_rate: ScalarOrSchedule = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[float | None, float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: ScalarOrSchedule = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adafactor`` as a chain.

    ``[negate] -> scale_by_adafactor -> scale_by_relative_step -> [decoupled decay]``.

    The step is ``min(lr, 1/sqrt(t)) * max(eps2, RMS(w))`` times the clipped factored update, and the
    decay ``w <- w * (1 - lr * wd)`` is decoupled and multiplied by the plain ``lr`` (torch's choice;
    the paper's relative step does not scale it).

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.adafactor(0.1)
        >>> params = {"w": torch.full((2, 2), 3.0)}
        >>> u, _ = tx.update({"w": torch.ones(2, 2)}, tx.init(params), params)
        >>> u["w"]  # -min(0.1, 1) * RMS(w) * sign(g)
        tensor([[-0.3000, -0.3000],
                [-0.3000, -0.3000]])
    """
    check_rate("learning_rate", learning_rate)
    parts = head(maximize, weight_decay, coupled=False)
    parts += [scale_by_adafactor(beta2_decay, eps, d), scale_by_relative_step(learning_rate)]
    return with_config(
        chain(*parts, *tail(learning_rate, weight_decay)),
        "adafactor",
        (learning_rate,),
        dict(beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay, maximize=maximize),
        dict(beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, maximize=False),
    )
