"""Schedules: plain callables ``count -> value`` of the number of updates done so far.

``count`` is a Python int (eager) or a 0-d integer tensor (under ``vmap`` or ``torch.compile``); each
schedule returns a float for an int and a float64 tensor for a tensor, so the same schedule serves both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from funcreg._src.core.typing import Schedule
from funcreg._src.core.validation import check_int, check_number


def _as_float(count: Any) -> Any:
    return count.to(torch.float64) if isinstance(count, torch.Tensor) else float(count)


def _clip(x: Any, low: float, high: float) -> Any:
    return torch.clamp(x, low, high) if isinstance(x, torch.Tensor) else min(max(x, low), high)


def _cos(x: Any) -> Any:
    return torch.cos(x) if isinstance(x, torch.Tensor) else math.cos(x)


def constant_schedule(value: float) -> Schedule:
    """``count -> value``.

    Examples:
        >>> import funcreg as fr
        >>> fr.constant_schedule(0.1)(100)
        0.1
    """
    check_number("value", value, low=None, allow_tensor=False)

    def schedule(count: Any) -> Any:
        if isinstance(count, torch.Tensor):
            return torch.full_like(count, value, dtype=torch.float64)
        return value

    return schedule


def linear_schedule(init_value: float, end_value: float, transition_steps: int) -> Schedule:
    """Linear from ``init_value`` at count 0 to ``end_value`` at ``transition_steps``, then constant.

    Examples:
        >>> import funcreg as fr
        >>> fr.linear_schedule(0.0, 1.0, 4)(1)
        0.25
    """
    check_number("init_value", init_value, low=None, allow_tensor=False)
    check_number("end_value", end_value, low=None, allow_tensor=False)
    check_int("transition_steps", transition_steps, low=1)

    def schedule(count: Any) -> Any:
        frac = _clip(_as_float(count) / transition_steps, 0.0, 1.0)
        return init_value + (end_value - init_value) * frac

    return schedule


def linear_warmup(peak_value: float, warmup_steps: int, init_value: float = 0.0) -> Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value`` over ``warmup_steps``, then ``peak_value``.

    Examples:
        >>> import funcreg as fr
        >>> [fr.linear_warmup(1.0, 2)(c) for c in range(4)]
        [0.0, 0.5, 1.0, 1.0]
    """
    return linear_schedule(init_value, peak_value, warmup_steps)


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value`` over ``decay_steps``, then constant.

    ``init_value * ((1 - alpha) * (1 + cos(pi * min(count, decay_steps) / decay_steps)) / 2 + alpha)``:
    the same values as ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=decay_steps,
    eta_min=alpha * init_value)`` over its first half-period.

    Examples:
        >>> import funcreg as fr
        >>> round(fr.cosine_decay_schedule(1.0, 10)(5), 6)
        0.5
    """
    check_number("init_value", init_value, low=None, allow_tensor=False)
    check_int("decay_steps", decay_steps, low=1)
    check_number("alpha", alpha, low=0.0, high=1.0, allow_tensor=False)

    def schedule(count: Any) -> Any:
        frac = _clip(_as_float(count), 0.0, float(decay_steps)) / decay_steps
        cosine = 0.5 * (1 + _cos(math.pi * frac))
        return init_value * ((1 - alpha) * cosine + alpha)

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Runs ``schedules[0]`` until ``boundaries[0]``, then ``schedules[1]`` restarted at 0, and so on.

    Examples:
        >>> import funcreg as fr
        >>> sched = fr.join_schedules([fr.linear_warmup(1.0, 2), fr.cosine_decay_schedule(1.0, 4)], [2])
        >>> [round(sched(c), 3) for c in range(7)]
        [0.0, 0.5, 1.0, 0.854, 0.5, 0.146, 0.0]
    """
    schedules = list(schedules)
    boundaries = list(boundaries)
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(
            f"join_schedules needs one more schedule than boundaries, got {len(schedules)} schedules "
            f"and {len(boundaries)} boundaries"
        )
    for i, b in enumerate(boundaries):
        check_int(f"boundaries[{i}]", b, low=0)
        if i and b < boundaries[i - 1]:
            raise ValueError(f"Invalid boundaries value: {boundaries!r} (must be non-decreasing)")
    for i, s in enumerate(schedules):
        if not callable(s):
            raise TypeError(f"schedules[{i}] is not callable: {s!r}")

    def schedule(count: Any) -> Any:
        if isinstance(count, torch.Tensor):
            value = torch.as_tensor(schedules[0](count), dtype=torch.float64)
            for b, s in zip(boundaries, schedules[1:]):
                value = torch.where(count >= b, torch.as_tensor(s(count - b), dtype=torch.float64), value)
            return value
        index = sum(count >= b for b in boundaries)
        start = boundaries[index - 1] if index else 0
        return schedules[index](count - start)

    return schedule


def warmup_cosine_decay_schedule(
    peak_value: float, warmup_steps: int, decay_steps: int, init_value: float = 0.0, end_value: float = 0.0
) -> Schedule:
    """Linear warm-up to ``peak_value``, then cosine decay to ``end_value`` over the remaining steps.

    ``decay_steps`` counts from 0, warm-up included (as in optax).

    Examples:
        >>> import funcreg as fr
        >>> sched = fr.warmup_cosine_decay_schedule(1.0, warmup_steps=2, decay_steps=6)
        >>> [round(sched(c), 3) for c in (0, 1, 2, 4, 6)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    check_number("peak_value", peak_value, low=None, allow_tensor=False)
    check_number("init_value", init_value, low=None, allow_tensor=False)
    check_number("end_value", end_value, low=None, allow_tensor=False)
    check_int("warmup_steps", warmup_steps, low=1)
    check_int("decay_steps", decay_steps, low=warmup_steps + 1)
    cosine_steps = decay_steps - warmup_steps

    def cosine(count: Any) -> Any:
        # written from the end points, not as alpha * peak: any end_value (above the peak, or with a
        # peak of 0) is a plain cosine interpolation
        frac = _clip(_as_float(count), 0.0, float(cosine_steps)) / cosine_steps
        return end_value + (peak_value - end_value) * (1 + _cos(math.pi * frac)) / 2

    return join_schedules(
        [linear_warmup(peak_value, warmup_steps, init_value), cosine],
        [warmup_steps],
    )
