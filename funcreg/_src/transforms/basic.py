"""Gradient transformations: one factory per transform, each returning ``GradientTransformation``.

Operation order follows ``torch.optim``'s foreach implementations (``torch/optim/sgd.py``,
``torch/optim/adam.py``) so that the aliases in :mod:`funcreg._src.optim.alias` reproduce its trajectories.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcreg._src.combinators.wrappers import masked
from funcreg._src.core import leafwise
from funcreg._src.core.base import (
    EmptyState,
    GradientTransformation,
    configured,
    expect_state,
    flat,
    identity,
    per_param_zeros,
)
from funcreg._src.core.steps import advance_steps, init_count, next_count, per_param_counts
from funcreg._src.core.typing import PyTree, ScalarOrSchedule
from funcreg._src.core.validation import (
    check_bool,
    check_number,
    check_rate,
    is_schedule,
    is_zero,
    schedule_value,
)
from funcreg._src.selection.resolve import MaskLike
from funcreg._src.transforms.adam import ScaleByAdamState, adam_moments, scale_by_adam  # noqa: F401  (their home before the split)


def scale(step_size: float | torch.Tensor) -> GradientTransformation:
    """Multiplies every update by ``step_size``: ``u <- step_size * u``.

    Args:
        step_size: a finite number (any sign), or a tensor of them.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.scale(-1.0)
        >>> tx.update({"w": torch.tensor([1.0, -2.0])}, tx.init(None))[0]["w"]
        tensor([-1.,  2.])
    """
    check_number("step_size", step_size, low=None)

    def init(params: PyTree) -> EmptyState:
        del params
        return EmptyState()

    def update(updates: PyTree, state: EmptyState, params: PyTree | None = None) -> tuple[PyTree, EmptyState]:
        f = flat(updates, params, "scale")
        return f.tree(leafwise.mul(f.present_updates(), step_size)), state

    return configured(GradientTransformation(init, update), "scale", step_size)


class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_learning_rate` with a schedule: the number of updates done so far."""

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax


def scale_by_learning_rate(learning_rate: ScalarOrSchedule, flip_sign: bool = True) -> GradientTransformation:
    """Scales updates by the learning rate: ``u <- -lr_t * u`` (descent), or ``+lr_t * u``.

    Args:
        learning_rate: a non-negative finite float, a tensor of them, or a schedule ``count -> lr``
            called with the number of updates done before this one (0 at the first step).
        flip_sign: multiply by ``-lr`` (the default, for gradients) rather than ``lr``.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.scale_by_learning_rate(lambda count: 0.1 / (1 + count))
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> u, state = tx.update({"w": torch.ones(1)}, state)
        >>> u, state = tx.update({"w": torch.ones(1)}, state)
        >>> u["w"]
        tensor([-0.0500])
    """
    check_rate("learning_rate", learning_rate)
    check_bool("flip_sign", flip_sign)
    sign = -1 if flip_sign else 1

    if not callable(learning_rate) or isinstance(learning_rate, torch.Tensor):
        return configured(
            scale(sign * learning_rate),
            "scale_by_learning_rate",
            learning_rate,
            flip_sign=None if flip_sign else False,
        )

    def init(params: PyTree) -> ScaleByScheduleState:
        return ScaleByScheduleState(count=init_count(params))

    def update(
        updates: PyTree, state: ScaleByScheduleState, params: PyTree | None = None
    ) -> tuple[PyTree, ScaleByScheduleState]:
        expect_state(state, ScaleByScheduleState, "scale_by_learning_rate")
        f = flat(updates, params, "scale_by_learning_rate")
        lr = schedule_value(learning_rate, leafwise.concrete(state.count))
        new = leafwise.mul(f.present_updates(), sign * lr)
        return f.tree(new), ScaleByScheduleState(count=next_count(state.count))

    return configured(
        GradientTransformation(init, update),
        "scale_by_learning_rate",
        learning_rate,
        flip_sign=None if flip_sign else False,
    )


class TraceState(NamedTuple):
    """State of :func:`trace`: updates done, one momentum buffer and one step count per parameter."""

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax
    trace: PyTree
    steps: PyTree


def trace(momentum: float, dampening: float = 0.0, nesterov: bool = False) -> GradientTransformation:
    """Momentum with ``torch.optim.SGD``'s semantics.

    The buffer starts as the first gradient (``b_1 = g_1``, no dampening), then
    ``b_t = momentum * b_{t-1} + (1 - dampening) * g_t``. The update is ``b_t``, or
    ``g_t + momentum * b_t`` with ``nesterov=True``. This differs from optax's ``trace``, whose buffer
    starts at zero. "First" is counted per parameter, as in ``torch.optim``: a parameter whose
    gradient is ``None`` at some updates starts its buffer at its own first gradient.

    Args:
        momentum: momentum factor, finite and ``>= 0`` (as torch accepts).
        dampening: dampening for momentum, a finite number.
        nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.trace(0.9)
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> u, state = tx.update({"w": torch.ones(1)}, state)
        >>> u, state = tx.update({"w": torch.ones(1)}, state)
        >>> u["w"]  # 0.9 * 1 + 1
        tensor([1.9000])
    """
    check_number("momentum", momentum, low=0.0)
    check_number("dampening", dampening, low=None)
    check_bool("nesterov", nesterov)
    if nesterov and (is_zero(momentum) or not is_zero(dampening)):
        raise ValueError(
            f"Invalid nesterov value: True needs momentum > 0 and dampening == 0 "
            f"(got momentum={momentum!r}, dampening={dampening!r})"
        )

    def init(params: PyTree) -> TraceState:
        return TraceState(
            count=init_count(params), trace=per_param_zeros(params), steps=per_param_counts(params)
        )

    def update(updates: PyTree, state: TraceState, params: PyTree | None = None) -> tuple[PyTree, TraceState]:
        expect_state(state, TraceState, "trace")
        f = flat(updates, params, "trace")
        buf_leaves = f.state_leaves(state.trace, "trace", "trace")
        step_leaves, new_steps, steps = advance_steps(f, state.steps, "trace")
        grads = f.present_updates()
        bufs = f.present(buf_leaves)
        donated = leafwise.owned(bufs)
        first = steps.is_first  # at their first step the buffers start as the gradients
        if first is True and donated:
            for b, g in zip(bufs, grads):
                b.copy_(g)
            new_bufs = bufs
        elif first is True:
            new_bufs = leafwise.clone(grads)
        elif first is False:
            if donated:
                new_bufs = bufs
                leafwise.mul_(new_bufs, momentum)
            else:
                new_bufs = leafwise.mul(bufs, momentum)
            leafwise.add_(new_bufs, grads, alpha=1 - dampening)
        else:  # steps differ between parameters, or are traced (vmap, compile): select per leaf
            new_bufs = [
                torch.where(leaf_first, g, torch.add(b * momentum, g, alpha=1 - dampening))
                if isinstance(leaf_first, torch.Tensor)
                else (g.clone() if leaf_first else torch.add(b * momentum, g, alpha=1 - dampening))
                for b, g, leaf_first in zip(bufs, grads, first)
            ]
        # the update must not be the state's own buffer: a caller editing its updates in place would
        # rewrite the momentum
        # (in a donated step nobody sees the updates but the transforms after this one, which never
        # write into their inputs, and apply_updates: no copy needed)
        if nesterov:
            out = leafwise.add(grads, new_bufs, alpha=momentum)
        else:
            out = list(new_bufs) if leafwise.owned(new_bufs) else leafwise.clone(new_bufs)
        new_state = TraceState(
            count=next_count(state.count),
            trace=f.tree(new_bufs, buf_leaves),
            steps=f.tree(new_steps, step_leaves),
        )
        return f.tree(out), new_state

    return configured(
        GradientTransformation(init, update),
        "trace",
        momentum,
        dampening=dampening or None,
        nesterov=nesterov or None,
    )


class AddDecayedWeightsState(NamedTuple):
    """State of :func:`add_decayed_weights` with a schedule: the number of updates done so far."""

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax


def add_decayed_weights(weight_decay: ScalarOrSchedule, mask: MaskLike = None) -> GradientTransformation:
    """Coupled L2: adds ``weight_decay * w`` to the updates, ``u <- u + wd_t * w``.

    Placed first in a chain this is ``torch.optim``'s ``weight_decay=`` (SGD, Adam): the gradient of
    the loss term ``wd/2 * ||w||^2``, which then goes through momentum and Adam's scaling. Equal to
    ``add_penalty_grad(l2(weight_decay))``. ``weight_decay=0`` is an exact identity.

    Args:
        weight_decay: finite, ``>= 0``; or a schedule ``count -> wd_t`` called with the number of
            updates done before this one (0 at the first step), as a learning-rate schedule is: torch's
            ``group["weight_decay"]`` set by a scheduler before each step. Its values are checked as
            they come out (finite, ``>= 0``, a number or a 0-d tensor).
        mask: which parameters to decay (a bool tree, a prefix of one, a selection, or a callable
            ``params -> mask``); the others pass through bit-identical.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.add_decayed_weights(0.1)
        >>> params = {"w": torch.tensor([2.0])}
        >>> tx.update({"w": torch.tensor([1.0])}, tx.init(params), params)[0]["w"]
        tensor([1.2000])
        >>> tx = fr.add_decayed_weights(lambda count: 0.1 * 0.5**count)  # halved at every step
        >>> state = tx.init(params)
        >>> _, state = tx.update({"w": torch.tensor([1.0])}, state, params)
        >>> tx.update({"w": torch.tensor([1.0])}, state, params)[0]["w"]  # 1 + 0.05 * 2
        tensor([1.1000])
    """
    check_rate("weight_decay", weight_decay)
    if is_zero(weight_decay):
        return identity()
    scheduled = is_schedule(weight_decay)

    def init(params: PyTree) -> Any:
        return AddDecayedWeightsState(count=init_count(params)) if scheduled else EmptyState()

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, Any]:
        f = flat(updates, params, "add_decayed_weights", needs_params=True)
        wd: Any = weight_decay
        if scheduled:
            expect_state(state, AddDecayedWeightsState, "add_decayed_weights")
            wd = schedule_value(weight_decay, leafwise.concrete(state.count), "weight_decay")
            state = AddDecayedWeightsState(count=next_count(state.count))
        return f.tree(leafwise.add(f.present_updates(), f.present_params(), alpha=wd)), state

    return configured(
        _maybe_masked(GradientTransformation(init, update), mask),
        "add_decayed_weights",
        weight_decay,
        mask=mask,
    )


class DecoupledWeightDecayState(NamedTuple):
    """State of :func:`decoupled_weight_decay` with a schedule (of the decay or of the rate): the
    number of updates done so far."""

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax


def decoupled_weight_decay(
    weight_decay: ScalarOrSchedule,
    learning_rate: ScalarOrSchedule | None = None,
    mask: MaskLike = None,
    *,
    scale_by: str,
) -> GradientTransformation:
    """Decoupled decay, placed after the learning-rate scaling: ``u <- u - s_t * wd * w``.

    What ``s_t`` is differs between libraries and papers, so it is a required choice, ``scale_by``:

    * ``"learning_rate"``: ``s_t = lr_t``, the learning rate (a number, or a schedule of it) given as
      ``learning_rate``: torch's ``AdamW`` (``w <- w - lr * wd * w``). ``chain(adam(lr),
      decoupled_weight_decay(wd, lr, scale_by="learning_rate"))`` is ``adamw(lr, weight_decay=wd)``;
    * ``"schedule"``: ``s_t = eta_t``, a schedule multiplier ``count -> eta_t`` given as
      ``learning_rate`` (the AdamW paper, where the multiplier and not the base rate scales the
      decay; ``eta_t = lr_t / lr_0`` reproduces it under a learning-rate schedule);
    * ``"none"``: ``s_t = 1``, lr-independent decay ``w <- (1 - wd) w`` per step (some SGDW
      implementations); with a learning rate of 1e-3 this decays 1000 times harder than torch's
      AdamW with the same ``wd``. ``learning_rate`` must then be left out.

    Always proportional to ``w``: a constant shift ``lr * wd`` is a bug that :func:`funcreg.probe`
    detects in third-party optimizers.

    Args:
        weight_decay: finite, ``>= 0``; or a schedule ``count -> wd_t`` of the number of updates done
            before this one, read at the same count as a learning-rate schedule (with
            ``scale_by="none"`` this is lr-independent decay on a schedule of its own).
        learning_rate: the learning rate (a non-negative float or tensor, or a schedule) for
            ``scale_by="learning_rate"``; the multiplier schedule for ``"schedule"``; ``None`` for ``"none"``.
        mask: which parameters to decay; the others pass through bit-identical.
        scale_by: ``"learning_rate"``, ``"schedule"`` or ``"none"`` (keyword only, required).

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.decoupled_weight_decay(0.1, learning_rate=0.5, scale_by="learning_rate")
        >>> params = {"w": torch.tensor([2.0])}
        >>> tx.update({"w": torch.tensor([0.0])}, tx.init(params), params)[0]["w"]  # -0.5 * 0.1 * 2
        tensor([-0.1000])
        >>> tx = fr.decoupled_weight_decay(0.1, scale_by="none")
        >>> tx.update({"w": torch.tensor([0.0])}, tx.init(params), params)[0]["w"]  # -0.1 * 2, lr or not
        tensor([-0.2000])
    """
    choices = ("learning_rate", "schedule", "none")
    if not isinstance(scale_by, str) or scale_by not in choices:
        raise ValueError(
            f"Invalid scale_by value: {scale_by!r} (expected 'learning_rate': decay lr_t * wd * w as torch's AdamW, "
            "with learning_rate=; 'schedule': eta_t * wd * w with a multiplier schedule as learning_rate=, as the "
            "AdamW paper; or 'none': wd * w per step, independent of the learning rate)"
        )
    check_rate("weight_decay", weight_decay)
    scheduled = is_schedule(learning_rate)
    counted = scheduled or is_schedule(weight_decay)  # a schedule of either reads the count
    if scale_by == "none":
        if learning_rate is not None:
            raise ValueError(
                f"Invalid learning_rate value: {learning_rate!r} (scale_by='none' decays independently of the "
                "learning rate: leave learning_rate out, or use scale_by='learning_rate')"
            )
    elif learning_rate is None:
        what = (
            "the learning rate (torch AdamW's lr)"
            if scale_by == "learning_rate"
            else "a schedule count -> eta_t"
        )
        raise ValueError(
            f"Invalid learning_rate value: None (scale_by={scale_by!r} needs {what} as learning_rate=)"
        )
    else:
        check_rate("learning_rate", learning_rate)
        if scale_by == "schedule" and not scheduled:
            raise ValueError(
                f"Invalid learning_rate value: {learning_rate!r} (scale_by='schedule' needs a schedule count -> eta_t; "
                "for a constant, scale_by='learning_rate' multiplies the decay by it)"
            )
    if is_zero(weight_decay):
        return identity()

    def init(params: PyTree) -> Any:
        return DecoupledWeightDecayState(count=init_count(params)) if counted else EmptyState()

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, Any]:
        f = flat(updates, params, "decoupled_weight_decay", needs_params=True)
        s: Any = 1.0 if learning_rate is None else learning_rate
        wd: Any = weight_decay
        if counted:
            expect_state(state, DecoupledWeightDecayState, "decoupled_weight_decay")
            count = leafwise.concrete(state.count)
            if scheduled:
                assert learning_rate is not None  # scheduled: it is a schedule
                s = schedule_value(learning_rate, count)
            wd = schedule_value(weight_decay, count, "weight_decay")
            state = DecoupledWeightDecayState(count=next_count(state.count))
        new = leafwise.add(f.present_updates(), f.present_params(), alpha=-(s * wd))
        return f.tree(new), state

    return _maybe_masked(GradientTransformation(init, update), mask)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Rescales all updates together so that their global 2-norm is at most about ``max_norm``.

    Same formula as ``torch.nn.utils.clip_grad_norm_``: the updates are multiplied by
    ``min(1, max_norm / (total_norm + 1e-6))``.

    Args:
        max_norm: finite, ``> 0``.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.clip_by_global_norm(1.0)
        >>> u, _ = tx.update({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, tx.init(None))
        >>> round(float(torch.sqrt(u["a"] ** 2 + u["b"] ** 2)), 4)
        1.0
    """
    check_number("max_norm", max_norm, low=0.0, low_open=True)

    def init(params: PyTree) -> EmptyState:
        del params
        return EmptyState()

    def update(updates: PyTree, state: EmptyState, params: PyTree | None = None) -> tuple[PyTree, EmptyState]:
        f = flat(updates, params, "clip_by_global_norm")
        grads = f.present_updates()
        if not grads:
            return updates, state
        total = torch.linalg.vector_norm(torch.stack(leafwise.norms(grads)))
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        return f.tree(leafwise.mul(grads, coef)), state

    return configured(GradientTransformation(init, update), "clip_by_global_norm", max_norm)


def _maybe_masked(tx: GradientTransformation, mask: MaskLike) -> GradientTransformation:
    if mask is None:
        return tx
    return masked(tx, mask)
