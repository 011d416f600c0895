"""Building a param group's transform, as plain functions beside :class:`funcreg.TorchOptimizer`.

``_Built`` is what a group's transform was built from (its options, parameter ids and names) and the
layout of its state in ``optimizer.state``; ``_snapshot`` and ``_same`` keep and compare the options
so that a transform is rebuilt exactly when a scheduler (or anyone) changed one; ``_factory_signature``
reads which options a factory takes; ``injected_slots`` finds the hyperparameters that
``fr.inject_hyperparams`` holds in a state (a group's options, written into the state before each
step). ``TorchOptimizer._prepare`` uses them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from funcreg._src.combinators.inject import InjectState
from funcreg._src.core.base import GradientTransformation
from funcreg._src.torch_optimizer import torch_state
from funcreg._src.torch_optimizer.groups import option_name


class InjectedSlot(NamedTuple):
    """A hyperparameter held by an :class:`funcreg.InjectState` inside a group's state: the group
    option ``key`` that sets it (``lr`` for ``learning_rate``), its ``name`` in the InjectState's
    ``hyperparams``, and where that InjectState is (``path``: the indices and dict keys from the
    state's root; ``where``: the same as text, for messages)."""

    key: str
    name: str
    path: tuple[Any, ...]
    where: str


class _Built(NamedTuple):
    """A group's transform, the layout of its state in ``optimizer.state``, and what it was built from."""

    tx: GradientTransformation
    layout: torch_state.Layout
    options: dict[str, Any]
    ids: tuple[int, ...]
    names: tuple[str, ...]
    # the hyperparameters fr.inject_hyperparams holds in the state: one group option each
    injected: tuple[InjectedSlot, ...] = ()


def _inject_paths(
    node: Any, path: tuple[Any, ...], text: str, out: list[tuple[tuple[Any, ...], str]]
) -> None:
    if isinstance(node, InjectState):
        out.append((path, text or "<root>"))
        _inject_paths(node.inner_state, (*path, 1), f"{text}.inner_state" if text else "inner_state", out)
        return
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        for i, (field, value) in enumerate(zip(node._fields, node)):
            _inject_paths(value, (*path, i), f"{text}.{field}" if text else field, out)
    elif isinstance(node, (tuple, list)):
        for i, value in enumerate(node):
            _inject_paths(value, (*path, i), f"{text}[{i}]", out)
    elif isinstance(node, dict):
        for k, value in node.items():
            _inject_paths(value, (*path, k), f"{text}[{k!r}]", out)


def injected_slots(template: Any, g: int) -> tuple[InjectedSlot, ...]:
    """The hyperparameters the :class:`funcreg.InjectState` s inside ``template`` (a state of group
    ``g``'s transform) hold, each with its group option. Two of them under one option (``learning_rate``
    injected twice in a chain, or both ``learning_rate`` and ``lr``) raise ``ValueError``: one group
    value for both would be a silent choice."""
    found: list[tuple[tuple[Any, ...], str]] = []
    _inject_paths(template, (), "", found)
    slots: dict[str, InjectedSlot] = {}
    for path, where in found:
        state = at(template, path)
        for name in state.hyperparams:
            key = option_name(name)
            if key in slots:
                first = slots[key]
                raise ValueError(
                    f"param group {g}: the transform injects {first.name!r} (at state {first.where}) and "
                    f"{name!r} (at state {where}), both the group option {key!r}; a param group has one "
                    f"{key!r}, so which one it sets would be ambiguous: inject it in one fr.inject_hyperparams "
                    "only, and build the other with its value"
                )
            slots[key] = InjectedSlot(key, name, path, where)
    return tuple(slots.values())


def at(state: Any, path: tuple[Any, ...]) -> Any:
    """The node of ``state`` at ``path`` (indices of tuples, keys of dicts), as ``injected_slots`` gives it."""
    for k in path:
        state = state[k]
    return state


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
