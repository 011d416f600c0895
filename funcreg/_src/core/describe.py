"""Printable configuration: what ``repr`` of a transform or a penalty shows.

A transform is a pair of closures, whose default ``repr`` is two function addresses. Each factory
records its name and arguments, rendered here (:func:`call_text`), in the transform's record
(``base.configured``), and ``GradientTransformation.__repr__`` prints them, so that ``repr(fr.adamw(1e-3, weight_decay=1e-2))``
reads ``adamw(1e-3, weight_decay=0.01)``: what a user pastes into a bug report or an experiment log.
"""

from __future__ import annotations

from typing import Any

import torch


def fmt(value: Any) -> str:
    """A short, readable rendering of one argument."""
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as the same float
    if isinstance(value, torch.Tensor):
        if (
            value.ndim == 0
            and not torch._C._functorch.is_functorch_wrapped_tensor(value)
            and value.device.type != "meta"
        ):
            return f"tensor({value.item()!r})"
        return f"tensor(shape={tuple(value.shape)})"
    if isinstance(value, tuple) and getattr(value, "_fields", None) == ("init", "update"):
        return repr(value)  # a GradientTransformation
    if isinstance(value, (tuple, list)) and len(value) <= 4:
        inner = ", ".join(fmt(v) for v in value)
        return f"({inner}{',' if len(value) == 1 else ''})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, dict):
        if len(value) <= 4:
            return "{" + ", ".join(f"{k!r}: {fmt(v)}" for k, v in value.items()) + "}"
        return f"<dict of {len(value)} entries>"
    if callable(value) and hasattr(value, "__name__"):
        return value.__name__
    if type(value).__repr__ is not object.__repr__:
        text = repr(value)
        if "\n" not in text and len(text) <= 120:
            return text
    return f"<{type(value).__name__}>"


def call_text(__name: str, *args: Any, **kwargs: Any) -> str:
    """``name(arg, key=value, ...)``; keyword arguments that are ``None`` are left out."""
    parts = [fmt(a) for a in args] + [f"{k}={fmt(v)}" for k, v in kwargs.items() if v is not None]
    return f"{__name}({', '.join(parts)})"
