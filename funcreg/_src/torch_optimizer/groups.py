"""The param groups of a :class:`funcreg.TorchOptimizer`: what a group is given as, its names and options.

A group's options are the constructor's defaults plus its own keys. They are checked here, before
:mod:`funcreg._src.torch_optimizer.build` builds a transform from them: an option that changes what
the optimizer does but that the factory would never receive raises rather than being ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch import nn

from funcreg._src.core.base import GradientTransformation
from funcreg._src.selection.named_params import check_initialized, named_parameters

# Options that change what an optimizer does: a group holding one that its factory never receives is
# an error, not a setting silently ignored (a weight-decay schedule on a transform with its decay built in).
WATCHED = (
    "lr",
    "weight_decay",
    "momentum",
    "dampening",
    "nesterov",
    "betas",
    "eps",
    "amsgrad",
    "maximize",
    "penalty",
    "form",
    "mask",
)
# Keys that schedulers and torch itself put into groups: not options of a group added behind our back.
_BOOKKEEPING = frozenset(
    {"params", "param_names", "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr"}
)
_FIXED_LR_MESSAGE = (
    "the param group's lr was changed (by a scheduler?), but this TorchOptimizer wraps a transform with "
    "a fixed learning rate; pass a factory: TorchOptimizer(params, lambda lr: fr.adamw(lr, ...), lr=...), "
    "or give the transform a funcreg schedule"
)


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return f"tensor({value.item():g})"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_groups(params: Any) -> list[dict[str, Any]]:
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "TorchOptimizer expects an iterable of tensors, (name, tensor) pairs or param-group dicts, or a "
            f"module; got a single tensor of shape {tuple(params.shape)} (wrap it in a list)"
        )
    if isinstance(params, nn.Module):
        return [{"params": named_parameters(params)}]
    if isinstance(params, dict):
        return [dict(params)]
    try:
        items = list(params)
    except TypeError:
        raise TypeError(
            "TorchOptimizer expects a module, tensors, (name, tensor) pairs such as model.named_parameters(), "
            f"or param-group dicts [{{'params': [...], 'lr': ...}}, ...]; got a {type(params).__name__}"
        ) from None
    if not items:
        raise ValueError("TorchOptimizer got an empty parameter list")
    dicts = [isinstance(x, dict) for x in items]
    if all(dicts):
        return [dict(g) for g in items]
    if any(dicts):
        raise TypeError(
            "TorchOptimizer got a list mixing param-group dicts with tensors; give only dicts or only tensors"
        )
    return [{"params": items}]


def _param_items(params: Any, g: int) -> list[tuple[str | None, Any]]:
    if isinstance(params, nn.Module):
        return list(named_parameters(params))
    if isinstance(params, torch.Tensor):
        return [(None, params)]
    if isinstance(params, set):
        raise TypeError(
            f"param group {g}: parameters must be an ordered collection (a list), not a set, whose order "
            "changes between runs"
        )
    try:
        items = list(params)
    except TypeError:
        raise TypeError(
            f"param group {g}: 'params' is a {type(params).__name__}, not an iterable of tensors"
        ) from None
    out: list[tuple[str | None, Any]] = []
    for k, item in enumerate(items):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            out.append((item[0], item[1]))
        elif isinstance(item, torch.Tensor):
            out.append((None, item))
        else:
            raise TypeError(
                f"param group {g}: entry {k} is a {type(item).__name__}; TorchOptimizer expects a module, "
                "tensors, or (name, tensor) pairs such as model.named_parameters()"
            )
    return out


class _GroupOptions(torch.optim.Optimizer):
    """The names and options of each param group, read from ``param_groups`` at every step.

    A base of :class:`funcreg.TorchOptimizer`, which sets the attributes declared here.
    """

    _fr_fixed: GradientTransformation | None
    _fr_factory: Callable[..., GradientTransformation] | None
    _fr_accepted: frozenset[str] | None
    _fr_required: frozenset[str]
    _fr_option_keys: list[tuple[str, ...]]
    # id -> name of the names_from= module's parameters, while the constructor adds its groups
    _fr_model_names: dict[int, str] | None
    # list[_Built | None]: _Built lives in torch_optimizer_build, which imports this module
    _fr_built: list[Any]

    def _group_names(self, g: int) -> list[str]:
        group = self.param_groups[g]
        names = group.get("param_names")
        if names is None or len(names) != len(group["params"]):
            # a group put into param_groups directly, without names: name its parameters by position
            start = sum(len(x["params"]) for x in self.param_groups[:g])
            names = [str(start + k) for k in range(len(group["params"]))]
            group["param_names"] = names
        return list(names)

    def _all_names(self) -> tuple[str, ...]:
        return tuple(chain.from_iterable(self._group_names(g) for g in range(len(self.param_groups))))

    def _option_keys(self, g: int) -> tuple[str, ...]:
        while len(self._fr_option_keys) <= g:  # groups assigned to param_groups directly
            group = self.param_groups[len(self._fr_option_keys)]
            keys = [*self.defaults, *(k for k in group if k not in _BOOKKEEPING)]
            self._fr_option_keys.append(tuple(dict.fromkeys(keys)))
        while len(self._fr_built) < len(self.param_groups):
            self._fr_built.append(None)
        return self._fr_option_keys[g]

    def _passed_keys(self, g: int) -> tuple[str, ...]:
        if self._fr_fixed is not None:
            return ()
        keys = self._option_keys(g)
        return tuple(k for k in keys if self._fr_accepted is None or k in self._fr_accepted)

    def _check_options(self, g: int) -> None:
        group = self.param_groups[g]
        keys = self._option_keys(g)
        if self._fr_fixed is not None:
            lr = group.get("lr", float("nan"))
            if "initial_lr" in group or not (isinstance(lr, float) and math.isnan(lr)):
                raise RuntimeError(f"{_FIXED_LR_MESSAGE} (param group {g})")
            extra = [k for k in keys if k != "lr"] + [k for k in group if k in WATCHED and k != "lr"]
            if extra:
                raise ValueError(
                    f"param group {g} sets {extra[0]!r}, but this TorchOptimizer wraps a transform with its "
                    "hyperparameters built in, which takes no options; pass a factory of the group's options "
                    f"(TorchOptimizer(params, lambda lr, {extra[0]}: ..., lr=...))"
                )
            return
        missing = [k for k in sorted(self._fr_required) if k not in group]
        if missing:
            raise ValueError(
                f"the factory needs {missing[0]!r}, which param group {g} does not have: pass "
                f"{missing[0]}=... to TorchOptimizer (the default of every group) or put it in the group"
            )
        passed = self._passed_keys(g)
        ignored = [k for k in group if k in WATCHED and k not in passed]
        if ignored:
            k = ignored[0]
            if k in keys:
                takes = (
                    "any keyword"
                    if self._fr_accepted is None
                    else ", ".join(sorted(self._fr_accepted)) or "nothing"
                )
                raise TypeError(
                    f"param group {g} sets {k!r}={_short(group[k])}, which the factory does not take (it takes: "
                    f"{takes}), so it would be ignored; add {k!r} (or **options) to the factory's parameters"
                )
            raise RuntimeError(
                f"param group {g} has {k!r}={_short(group[k])}, which is not an option of this TorchOptimizer: "
                f"its factory never receives it, so setting it (a {k} schedule?) would do nothing. Pass "
                f"{k}=... to TorchOptimizer(...) so that every group has it and the factory receives it"
            )

    def _named_params(self, group: dict[str, Any], g: int) -> list[tuple[str, torch.Tensor]]:
        """The parameters of new group ``g`` with their names, each checked to be new to the optimizer."""
        if "params" not in group:
            raise ValueError(f"param group {g} has no 'params' entry")
        items = _param_items(group["params"], g)
        given_names = group.get("param_names")
        if given_names is not None:
            if any(n is not None for n, _ in items) or len(given_names) != len(items):
                raise ValueError(
                    f"param group {g}: 'param_names' must name each of its {len(items)} unnamed parameters"
                )
            items = [(str(n), p) for n, (_, p) in zip(given_names, items)]
        by_model = self._fr_model_names
        if by_model is not None and all(n is None for n, _ in items):
            for k, (_, p) in enumerate(items):
                if id(p) not in by_model:
                    raise ValueError(
                        f"param group {g}: parameter {k} (shape {tuple(getattr(p, 'shape', ()))}) is not a "
                        "parameter of the module passed as names_from="
                    )
            items = [(by_model[id(p)], p) for _, p in items]
        named = [n is not None for n, _ in items]
        if any(named) and not all(named):
            raise ValueError(f"param group {g}: give every parameter a name or none")
        existing: dict[int, tuple[int, str]] = {}
        taken: set[str] = set()
        n: str | None  # a name here, then an item's (maybe None) in the loop below
        for gi in range(g):
            for n, p in zip(self._group_names(gi), self.param_groups[gi]["params"]):
                existing[id(p)] = (gi, n)
                taken.add(n)
        start = len(existing)
        names: list[str] = []
        seen: dict[int, str] = {}
        for k, (n, p) in enumerate(items):
            name = n if n is not None else str(start + k)
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"param group {g}: parameter {name!r} is a {type(p).__name__}, not a tensor")
            check_initialized(name, p)
            if id(p) in seen:
                raise ValueError(
                    f"param group {g} lists parameter {name!r} twice (also as {seen[id(p)]!r}); each parameter "
                    "may appear once (torch.optim would update it twice per step)"
                )
            if id(p) in existing:
                gi, other = existing[id(p)]
                raise ValueError(
                    f"parameter {name!r} of param group {g} is already in param group {gi} (as {other!r})"
                )
            if name in taken or name in names:
                raise ValueError(f"param group {g}: the parameter name {name!r} is used twice")
            seen[id(p)] = name
            names.append(name)
        return [(n, p) for n, (_, p) in zip(names, items)]
