"""Each param group's transform, built from the group's options, and its state in ``optimizer.state``.

A group's transform is cached with the options and parameters it was built from, and rebuilt when
a scheduler (or anyone) changes them; ``optimizer.state`` holds its state under torch's keys
(:mod:`funcreg._src.torch_optimizer.torch_state` lays it out), read back and written at every step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch

from funcreg._src.core.base import GradientTransformation
from funcreg._src.core.validation import check_rate
from funcreg._src.torch_optimizer import torch_state
from funcreg._src.torch_optimizer.groups import _GroupOptions, _short


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


class _GroupBuilds(_GroupOptions):
    """The transform of each param group and its state in ``self.state``, kept in step with the options.

    A base of :class:`funcreg.TorchOptimizer`, which sets the attributes declared here.
    """

    _fr_built: list[_Built | None]
    # what _write last wrote for each group, the fast path of _read: its _Built, state tree and tensors
    _fr_written: dict[int, Any]

    def _trees(
        self, g: int, names: tuple[str, ...], grads: bool = False
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        group = self.param_groups[g]
        params: dict[str, Any] = dict.fromkeys(names)
        gs: dict[str, Any] = dict.fromkeys(names)
        for n, p in zip(self._group_names(g), group["params"]):
            params[n] = p.detach()
            if grads:
                gs[n] = None if p.grad is None else p.grad.detach()
        return params, gs

    def _make_tx(self, g: int, options: dict[str, Any]) -> GradientTransformation:
        if self._fr_fixed is not None:
            return self._fr_fixed
        assert self._fr_factory is not None
        if "lr" in options:
            try:
                check_rate("lr", options["lr"])
            except (TypeError, ValueError) as err:
                raise type(err)(f"param group {g}: {err}") from err
        try:
            tx = self._fr_factory(**options)
        except (TypeError, ValueError) as err:
            shown = ", ".join(f"{k}={_short(v)}" for k, v in options.items())
            try:
                wrapped = type(err)(f"param group {g}: the factory failed with options ({shown}): {err}")
            except Exception:  # noqa: BLE001 - an exception type with another constructor: keep it as it is
                raise err from None
            raise wrapped from err
        if not isinstance(tx, GradientTransformation):
            raise TypeError(
                f"param group {g}: the factory returned a {type(tx).__name__}, not a GradientTransformation"
            )
        return tx

    def _meta_template(self, tx: GradientTransformation, g: int, names: tuple[str, ...]) -> Any:
        params, _ = self._trees(g, names)
        try:
            return tx.init({n: torch_state.meta_like(p) for n, p in params.items()})
        except Exception:  # noqa: BLE001 - an init that reads values: run it on the real parameters
            return tx.init(params)

    def _prepare(self, g: int) -> _Built:
        """The group's transform and state layout, rebuilt when its options or parameters changed."""
        group = self.param_groups[g]
        self._check_options(g)
        names = self._all_names()
        options = {k: group[k] for k in self._passed_keys(g) if k in group}
        ids = tuple(id(p) for p in group["params"])
        cached = self._fr_built[g]
        same_params = cached is not None and cached.ids == ids and cached.names == names
        same_options = (
            cached is not None
            and cached.options.keys() == options.keys()
            and all(_same(cached.options[k], v) for k, v in options.items())
        )
        if cached is not None and same_params and same_options:
            return cached
        tx = cached.tx if cached is not None and same_options else self._make_tx(g, options)
        layout = torch_state.build_layout(self._meta_template(tx, g, names), names, self._group_names(g))
        if cached is not None and same_params and layout.signature != cached.layout.signature:
            changed = [
                k for k in options if k not in cached.options or not _same(cached.options[k], options[k])
            ]
            old_state = self._read(g, cached)
            params, _ = self._trees(g, names)
            new_state = torch_state.carry(
                old_state, tx.init(params), f"param group {g}: changing {', '.join(changed)}"
            )
            torch_state.write(layout, new_state, self._dict_of(g), self._group_names(g), clear=True)
        built = _Built(tx, layout, {k: _snapshot(v) for k, v in options.items()}, ids, names)
        self._fr_built[g] = built
        return built

    def _dict_of(self, g: int) -> Callable[[str], dict[str, Any]]:
        by_name = dict(zip(self._group_names(g), self.param_groups[g]["params"]))
        return lambda n: self.state[by_name[n]]

    def _read(self, g: int, built: _Built) -> Any:
        last = self._fr_written.get(g)
        if last is not None and self._holds(g, built, last[1]):
            return last[1]  # optimizer.state holds what the last step wrote: its tree, unchanged
        by_name = dict(zip(self._group_names(g), self.param_groups[g]["params"]))

        def fresh() -> Any:
            params, _ = self._trees(g, built.names)
            return built.tx.init(params)

        return torch_state.read(
            built.layout, lambda n: self.state.get(by_name[n]), self._group_names(g), fresh
        )

    def _holds(self, g: int, built: _Built, state: Any) -> bool:
        """Whether ``optimizer.state`` holds exactly what the last step of group ``g`` wrote, from
        ``state`` (the same tree object) and ``built`` (the same transform)."""
        last = self._fr_written.get(g)
        return (
            last is not None
            and last[0] is built
            and last[1] is state
            and all(
                self.state.get(p) is d and cast("dict[str, Any]", d).get(k) is t for p, d, k, t in last[2]
            )
        )

    def _write(self, g: int, built: _Built, state: Any, clear: bool = False) -> None:
        if not clear and self._holds(g, built, state):
            return  # a donated step updated in place the very state the last step wrote: nothing moved
        names = self._group_names(g)
        leaves = torch_state.write(built.layout, state, self._dict_of(g), names, clear=clear)
        # remember what was written, for the fast path of _read: (parameter, its dict, key, tensor)
        by_name = dict(zip(names, self.param_groups[g]["params"]))
        slots = []
        for e, value in zip(built.layout.entries, leaves):
            if e.kind == "param" and value is not None:
                assert e.name is not None  # a "param" entry names its parameter
                p = by_name[e.name]
                slots.append((p, self.state[p], e.key, value))
            elif e.kind == "group" and value is not None and names:
                p = by_name[names[0]]
                assert e.keys is not None  # a "group" entry has its keys
                slots.append((p, self.state[p], e.keys[names[0]], value))
        self._fr_written[g] = (built, state, slots)
