"""Schedule-free SGD and AdamW (Defazio et al., 2024): no learning-rate schedule, an average to evaluate.

Three sequences per parameter: ``z`` takes the plain (SGD or Adam-normalized) steps, ``x`` is their
weighted average (the point to evaluate and to checkpoint), and the gradient is taken at the
interpolation ``y = beta1 * x + (1 - beta1) * z``, which is what the parameters hold while training.
At step ``k`` (from 0): ``lr_k = lr * min(1, (k+1)/warmup_steps)`` (Adam also times
``sqrt(1 - beta2^(k+1))``), ``lr_max = max(lr_max, lr_k)``, the average's weight
``c_k = (k+1)^r * lr_max^weight_lr_power / (sum of those weights so far)``, and

* weight decay at ``y``: ``z <- z - lr_k * wd * y``;
* ``z <- z - lr_k * g`` (SGD) or ``z <- z - lr_k * g / (sqrt(v) + eps)`` with
  ``v <- beta2 v + (1 - beta2) g^2`` (AdamW);
* ``x <- (1 - c_k) x + c_k z`` and ``y <- beta1 x + (1 - beta1) z``; the update is ``y_new - y``.

This is the reference implementation of the schedule-free repository (``*_reference.py``), with
the decay taken at ``y``. The scalars are computed in float64 0-d tensors, so the step traces under
``vmap`` and ``torch.compile``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from funcreg._src.core import leafwise
from funcreg._src.core.base import GradientTransformation, begin, find_one_state
from funcreg._src.core.steps import init_count
from funcreg._src.core.tree import flatten, unflatten
from funcreg._src.core.typing import PyTree, Schedule
from funcreg._src.core.validation import check_int, check_number, is_schedule, is_zero, schedule_value
from funcreg._src.optim.alias import _betas
from funcreg._src.transforms.block_utils import with_config


class ScheduleFreeState(NamedTuple):
    """State of :func:`schedule_free_sgd` / :func:`schedule_free_adamw`: ``count`` steps taken;
    ``z`` the base sequence; ``x`` the average (:func:`schedule_free_eval_params`); ``nu`` Adam's
    second moment (``None`` for SGD); ``lr_max`` and ``weight_sum`` (float64 0-d) of the average's
    weights."""

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax
    z: PyTree
    x: PyTree
    nu: PyTree | None
    lr_max: torch.Tensor
    weight_sum: torch.Tensor


def _schedule_free(
    who: str,
    learning_rate: float,
    beta1: float,
    beta2: float | None,
    eps: float,
    weight_decay: float | Schedule,
    warmup_steps: int,
    r: float,
    weight_lr_power: float,
) -> tuple[Any, Any]:
    """The ``init`` and ``update`` shared by both schedule-free factories: ``beta2`` ``None`` is SGD
    (no second moment, ``eps`` unused), a number is AdamW's denominator."""

    def init(params: PyTree) -> ScheduleFreeState:
        leaves, spec = flatten(params)
        copy = unflatten([None if p is None else p.detach().clone() for p in leaves], spec)
        copy2 = unflatten([None if p is None else p.detach().clone() for p in leaves], spec)
        nu = (
            None
            if beta2 is None
            else unflatten([None if p is None else torch.zeros_like(p) for p in leaves], spec)
        )
        count = init_count(params)
        lr_max = torch.full((), -1.0, dtype=torch.float64, device=count.device)
        return ScheduleFreeState(count, copy, copy2, nu, lr_max, torch.zeros_like(lr_max))

    def update(
        updates: PyTree, state: ScheduleFreeState, params: PyTree | None = None
    ) -> tuple[PyTree, ScheduleFreeState]:
        f = begin(updates, state, params, ScheduleFreeState, who, needs_params=True)
        assert f.params is not None
        k = state.count.to(torch.float64) + 1  # k + 1 of the reference
        sched = torch.clamp(k / warmup_steps, max=1.0) if warmup_steps > 0 else torch.ones_like(k)
        lr = learning_rate * sched
        if beta2 is not None:
            lr = lr * torch.sqrt(1 - beta2**k)
        lr_max = torch.maximum(lr, state.lr_max)
        weight = k**r * lr_max**weight_lr_power
        weight_sum = state.weight_sum + weight
        ckp1 = weight / weight_sum
        wd = schedule_value(weight_decay, leafwise.concrete(state.count), "weight_decay")
        z_leaves, spec = flatten(state.z)
        x_leaves, _ = flatten(state.x)
        nu_leaves = flatten(state.nu)[0] if state.nu is not None else None
        new_z, new_x = list(z_leaves), list(x_leaves)
        new_nu = list(nu_leaves) if nu_leaves is not None else None
        out = []
        for i in f.index:
            g, y, z, x = f.updates[i], f.params[i], z_leaves[i], x_leaves[i]
            lr_i, c_i = lr.to(y.dtype), ckp1.to(y.dtype)
            if not is_zero(weight_decay):
                wd_i = wd.to(y.dtype) if isinstance(wd, torch.Tensor) else wd
                z = z - lr_i * wd_i * y
            if new_nu is not None:
                assert beta2 is not None and nu_leaves is not None
                nu = beta2 * nu_leaves[i] + (1 - beta2) * g * g
                new_nu[i] = nu
                z = z - lr_i * g / (torch.sqrt(nu) + eps)
            else:
                z = z - lr_i * g
            x = (1 - c_i) * x + c_i * z
            new_z[i], new_x[i] = z, x
            out.append(beta1 * x + (1 - beta1) * z - y)
        nu_tree = None if new_nu is None else unflatten(new_nu, spec)
        new_state = ScheduleFreeState(
            state.count + 1, unflatten(new_z, spec), unflatten(new_x, spec), nu_tree, lr_max, weight_sum
        )
        return f.tree(out), new_state

    return init, update


def _check(
    learning_rate: float, weight_decay: float | Schedule, warmup_steps: int, r: float, weight_lr_power: float
) -> None:
    check_number("learning_rate", learning_rate, low=0.0, low_open=True, allow_tensor=False)
    if not is_schedule(weight_decay):
        check_number("weight_decay", weight_decay, low=0.0, allow_tensor=False)
    check_int("warmup_steps", warmup_steps, low=0)
    check_number("r", r, low=0.0, allow_tensor=False)
    check_number("weight_lr_power", weight_lr_power, low=0.0, allow_tensor=False)


def _configured(
    tx: GradientTransformation,
    factory: Callable[..., GradientTransformation],
    learning_rate: float,
    **given: Any,
) -> GradientTransformation:
    """``tx`` printing as ``factory(learning_rate, ...)`` with the keywords that differ from the
    factory's own defaults (read from its signature, so they are written once)."""
    defaults = {k: p.default for k, p in inspect.signature(factory).parameters.items() if k in given}
    return with_config(tx, factory.__name__, (learning_rate,), given, defaults)


def schedule_free_sgd(
    learning_rate: float = 1.0,
    momentum: float = 0.9,
    weight_decay: float | Schedule = 0.0,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
) -> GradientTransformation:
    """Schedule-free SGD (the reference ``SGDScheduleFreeReference``); see this module for the update.

    The parameters are the gradient point ``y``; evaluate (and checkpoint) the average
    :func:`schedule_free_eval_params` instead. Weight decay is L2 at ``y``, added to the gradient.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.schedule_free_sgd(0.5, momentum=0.9)
        >>> params = {"w": torch.tensor([2.0])}
        >>> state = tx.init(params)
        >>> u, state = tx.update({"w": params["w"]}, state, params)  # the gradient of w^2/2
        >>> params = fr.apply_updates(params, u)
        >>> fr.schedule_free_eval_params(state)["w"], params["w"]  # x = z = 1 after the first step
        (tensor([1.]), tensor([1.]))
    """
    _check(learning_rate, weight_decay, warmup_steps, r, weight_lr_power)
    check_number("momentum", momentum, low=0.0, high=1.0, low_open=True, high_open=True, allow_tensor=False)
    init, update = _schedule_free(
        "schedule_free_sgd",
        learning_rate,
        momentum,
        None,
        0.0,
        weight_decay,
        warmup_steps,
        r,
        weight_lr_power,
    )
    return _configured(
        GradientTransformation(init, update),
        schedule_free_sgd,
        learning_rate,
        momentum=momentum,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        r=r,
        weight_lr_power=weight_lr_power,
    )


def schedule_free_adamw(
    learning_rate: float = 0.0025,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float | Schedule = 0.0,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
) -> GradientTransformation:
    """Schedule-free AdamW (the reference ``AdamWScheduleFreeReference``, decay at ``y``); see this
    module for the update. Evaluate :func:`schedule_free_eval_params`, not the parameters.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.schedule_free_adamw(0.1, warmup_steps=10)
        >>> params = {"w": torch.tensor([1.0, -1.0])}
        >>> state = tx.init(params)
        >>> u, state = tx.update({"w": torch.tensor([0.5, -0.5])}, state, params)
        >>> fr.schedule_free_eval_params(state)["w"]  # Adam's first step, sign(g), times lr / 10 (warm-up)
        tensor([ 0.9900, -0.9900])
    """
    _check(learning_rate, weight_decay, warmup_steps, r, weight_lr_power)
    beta1, beta2 = _betas(betas)
    check_number("eps", eps, low=0.0, allow_tensor=False)
    init, update = _schedule_free(
        "schedule_free_adamw",
        learning_rate,
        beta1,
        beta2,
        eps,
        weight_decay,
        warmup_steps,
        r,
        weight_lr_power,
    )
    return _configured(
        GradientTransformation(init, update),
        schedule_free_adamw,
        learning_rate,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        r=r,
        weight_lr_power=weight_lr_power,
    )


def schedule_free_eval_params(state: Any) -> PyTree:
    """The average ``x`` held by the :class:`ScheduleFreeState` inside ``state``: the parameters to
    evaluate and checkpoint (the training parameters are ``y``). Training goes on from ``y``.

    Examples:
        >>> import torch, funcreg as fr
        >>> sorted(fr.schedule_free_eval_params(fr.schedule_free_sgd(0.1).init({"w": torch.zeros(2)})))
        ['w']
    """
    return find_one_state(state, ScheduleFreeState, "schedule_free_eval_params").x
