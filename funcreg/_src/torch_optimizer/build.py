"""Building a param group's transform, as plain functions beside :class:`funcreg.TorchOptimizer`.

``_Built`` is what a group's transform was built from (its options, parameter ids and names) and the
layout of its state in ``optimizer.state``; ``_snapshot`` and ``_same`` keep and compare the options
so that a transform is rebuilt exactly when a scheduler (or anyone) changed one; ``_factory_signature``
reads which options a factory takes. ``TorchOptimizer._prepare`` uses them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from funcreg._src.core.base import GradientTransformation
from funcreg._src.torch_optimizer import torch_state


class _Built(NamedTuple):
    """A group's transform, the layout of its state in ``optimizer.state``, and what it was built from."""

    tx: GradientTransformation
    layout: torch_state.Layout
    options: dict[str, Any]
    ids: tuple[int, ...]
    names: tuple[str, ...]


def _snapshot(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return tuple(_snapshot(v) for v in value)
    return value


def _same(a: Any, b: Any) -> bool:
    """Whether two option values are equal for the build cache: tensors by value, shape and dtype,
    sequences element by element, anything else by ``==`` (an unusual ``==`` counts as different)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return (
            a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a.detach().cpu(), b.detach().cpu()))
        )
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))) or len(a) != len(b):
            return False
        return all(_same(x, y) for x, y in zip(a, b))
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - an object whose == does not give a bool is a different object
        return False


def _factory_signature(factory: Callable[..., Any]) -> tuple[frozenset[str] | None, frozenset[str]]:
    """The keyword arguments the factory accepts (``None``: any, it has ``**kwargs``) and requires."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None, frozenset()
    accepted, required, any_keyword = set(), set(), False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            any_keyword = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            accepted.add(p.name)
            if p.default is p.empty:
                required.add(p.name)
        elif p.kind is p.POSITIONAL_ONLY and p.default is p.empty:
            raise TypeError(
                f"the factory's parameter {p.name!r} is positional-only; TorchOptimizer calls the factory "
                "with each group's options as keyword arguments (factory(lr=..., weight_decay=...))"
            )
    return (None if any_keyword else frozenset(accepted)), frozenset(required)
