"""Hyperparameter validation with messages that name the argument and the offending value.

``torch.optim.SGD`` accepts ``lr=nan`` and ``weight_decay=inf``; funcreg does not. Tensor values are
accepted where a sweep needs them (one value per ensemble member) and are checked elementwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {value.tolist()!r}" if value.numel() <= 8 else f"tensor of shape {tuple(value.shape)}"
    return repr(value)


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = 0.0,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_tensor: bool = True,
) -> None:
    """Raises unless ``value`` is a finite real number (or real tensor) within ``[low, high]``.

    ``low_open``/``high_open`` exclude the bound itself. ``TypeError`` for a value that is not a number,
    ``ValueError`` for one that is NaN, infinite or out of range; both messages name ``name``.
    """
    if isinstance(value, bool) or not (
        isinstance(value, (int, float)) or (allow_tensor and isinstance(value, torch.Tensor))
    ):
        kinds = "a float or a tensor" if allow_tensor else "a float"
        raise TypeError(f"Invalid {name} value: {value!r} (expected {kinds}, got {type(value).__name__})")
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"Invalid {name} value: {_describe_value(value)} (expected a real tensor)")
        if value.ndim != 0:
            # a (3,)-tensor learning rate would silently become a per-column rate: hyperparameters are
            # scalars (a sweep gives one per member through vmap, where each member sees a 0-d value)
            raise ValueError(
                f"Invalid {name} value: {_describe_value(value)} (expected a number or a 0-d tensor, "
                f"got shape {tuple(value.shape)})"
            )
        if is_traced(value):
            return  # values under vmap/grad cannot be read; they were checked before the transform
        values = value.detach().double().flatten().tolist()
    else:
        values = [float(value)]
    rng = _range_text(low, high, low_open, high_open)
    for v in values:
        bad = not math.isfinite(v)
        if not bad and low is not None:
            bad = v <= low if low_open else v < low
        if not bad and high is not None:
            bad = v >= high if high_open else v > high
        if bad:
            raise ValueError(f"Invalid {name} value: {_describe_value(value)} (must be finite and {rng})")


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts) if parts else "real"


def is_traced(x: torch.Tensor) -> bool:
    """True where a tensor's values cannot be read: under torch.compile, vmap or grad, or on meta."""
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    return compiling or x.device.type == "meta" or torch._C._functorch.is_functorch_wrapped_tensor(x)


def check_rate(name: str, value: Any) -> None:
    """A learning rate: a non-negative finite number, a tensor of them, or a schedule (a callable)."""
    if callable(value) and not isinstance(value, torch.Tensor):
        return
    check_number(name, value, low=0.0)


def check_bool(name: str, value: Any) -> None:
    """Raises ``TypeError`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name} value: {value!r} (expected a bool)")


def check_int(name: str, value: Any, *, low: int = 0) -> None:
    """Raises unless ``value`` is an int ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid {name} value: {value!r} (expected an int)")
    if value < low:
        raise ValueError(f"Invalid {name} value: {value!r} (must be >= {low})")


def is_zero(value: Any) -> bool:
    """True for the Python number 0 (a tensor is never treated as a constant zero)."""
    return not isinstance(value, torch.Tensor) and not callable(value) and value == 0


def is_schedule(value: Any) -> bool:
    """True for a schedule ``count -> value``: a callable that is not a tensor."""
    return callable(value) and not isinstance(value, torch.Tensor)


def schedule_value(
    learning_rate: float | torch.Tensor | Callable[[Any], Any], count: Any, name: str = "learning_rate"
) -> Any:
    """The learning rate at ``count``: a constant, or a schedule called with the step count.

    A schedule's value is checked as it comes out: a number or a 0-d tensor (``ValueError`` for any
    other shape, which would otherwise broadcast into a per-column rate), finite and ``>= 0`` (read
    eagerly; under vmap or torch.compile only its shape is checked, as values cannot be read there).
    """
    if not (callable(learning_rate) and not isinstance(learning_rate, torch.Tensor)):
        return learning_rate
    value = learning_rate(count)
    where = (
        f"{name} schedule (at count {count!r})" if not isinstance(count, torch.Tensor) else f"{name} schedule"
    )
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"Invalid {where} value: {value!r} (a schedule returns a number or a 0-d tensor)")
    check_number(where, value, low=0.0)
    return value
