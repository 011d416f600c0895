"""Selectors: rules that build a :class:`Selection` when applied to a module or a parameter tree.

:func:`by_name` (globs), :func:`by_predicate` (a function of name and tensor) and :func:`by_module`
(Keras' "kernels only", by the type of the module holding a parameter). A selector is evaluated on
the tree the transform sees, so the same rule serves any model; a rule or pattern that selects
nothing raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from funcreg._src.selection.named_params import _check_patterns, _matches, _named_leaves, _shape_text
from funcreg._src.selection.parametrizations import _parametrization
from funcreg._src.selection.table import Selection


class Selector:
    """A rule that builds a :class:`Selection` from a module or a parameter tree when called.

    Pass it wherever a mask is accepted; it is evaluated on the parameter tree the transform sees.
    """

    def __init__(
        self,
        rule: Callable[[list[str], list[Any]], Selection] | None,
        description: str,
        module_rule: Callable[[nn.Module], Selection] | None = None,
    ) -> None:
        if rule is None and module_rule is None:
            raise ValueError("a Selector needs a rule over names and tensors, or one over a module")
        self._rule = rule
        self._module_rule = module_rule
        self._description = description

    def __call__(self, tree_or_module: Any) -> Selection:
        if self._module_rule is not None and isinstance(tree_or_module, nn.Module):
            return self._module_rule(tree_or_module)
        if self._rule is None:
            raise TypeError(
                f"{self._description} needs the module, not a parameter tree (module types are not in a tree): "
                f"pass {self._description}(model), a Selection, as the mask"
            )
        names, leaves = _named_leaves(tree_or_module)
        return self._rule(names, leaves)

    def __repr__(self) -> str:
        return self._description


def by_name(*patterns: str, exclude: Iterable[str] = ()) -> Selector:
    """Selects the parameters whose name matches one of the glob ``patterns`` and no ``exclude`` glob.

    A pattern also matches every parameter under a module prefix (``"encoder"`` selects
    ``"encoder.0.weight"``). Any pattern that matches no parameter raises ``ValueError`` when the rule
    is applied, as does a rule that selects nothing.

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> fr.by_name("*.weight", exclude=["1.*"])(model).selected
        ['0.weight']
    """
    if not patterns:
        raise ValueError("by_name needs at least one pattern")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)

    def rule(names: list[str], leaves: list[Any]) -> Selection:
        include = _check_patterns(patterns, names, "by_name")
        drop = _check_patterns(exclude, names, "exclude")
        decisions, reasons = {}, {}
        for n in names:
            inc = next((p for p in include if _matches(p, n)), None)
            exc = next((p for p in drop if _matches(p, n)), None)
            decisions[n] = inc is not None and exc is None
            reasons[n] = (
                f"excluded by {exc!r}" if exc else (f"matches {inc!r}" if inc else "matches no pattern")
            )
        if not any(decisions.values()):
            raise ValueError(f"by_name{patterns!r} with exclude={list(exclude)!r} selects no parameter")
        return Selection(decisions, {n: _shape_text(x) for n, x in zip(names, leaves)}, reasons)

    return Selector(rule, f"by_name({', '.join(map(repr, patterns))}, exclude={list(exclude)!r})")


def by_predicate(predicate: Callable[[str, torch.Tensor], bool], description: str = "") -> Selector:
    """Selects the parameters for which ``predicate(name, tensor)`` is true.

    A predicate that selects nothing raises ``ValueError`` when applied.

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> fr.by_predicate(lambda name, w: w.ndim >= 2)(model).selected
        ['0.weight', '1.weight']
    """
    if not callable(predicate):
        raise TypeError(f"by_predicate expects a callable (name, tensor) -> bool, got {predicate!r}")
    text = description or getattr(predicate, "__name__", "predicate")

    def rule(names: list[str], leaves: list[Any]) -> Selection:
        decisions = {n: bool(predicate(n, x)) if x is not None else False for n, x in zip(names, leaves)}
        if not any(decisions.values()):
            raise ValueError(f"by_predicate({text}) selects no parameter")
        reasons = {n: f"{text} is {v}" for n, v in decisions.items()}
        return Selection(decisions, {n: _shape_text(x) for n, x in zip(names, leaves)}, reasons)

    return Selector(rule, f"by_predicate({text})")


def by_module(*types: type, params: str | Sequence[str] = "weight") -> Selector:
    """Selects parameters by the type of the module that holds them: Keras' "kernels only".

    ``fr.by_module(nn.Linear, nn.Conv2d)`` selects the ``weight`` of every ``nn.Linear`` and
    ``nn.Conv2d`` (subclasses included), what Keras' ``kernel_regularizer`` penalizes, and nothing of
    LayerNorm, BatchNorm or embeddings. ``params="all"`` selects every parameter held directly by
    such modules (their biases too); a tuple of names selects those (``params=("weight", "bias")``).
    A parametrized ``weight`` counts as the weight: its ``original`` tensors are selected.

    Module types are not in a parameter tree, so the rule needs the module: pass
    ``fr.by_module(...)(model)``, a :class:`Selection`, as the mask. A rule that selects nothing, and
    a type no module of the model has, raise ``ValueError``.

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 1))
        >>> fr.by_module(torch.nn.Linear)(model).selected
        ['0.weight', '2.weight']
        >>> fr.by_module(torch.nn.Linear, params="all")(model).selected
        ['0.weight', '0.bias', '2.weight', '2.bias']
    """
    if not types:
        raise ValueError("by_module needs at least one module type (nn.Linear, nn.Conv2d, ...)")
    for t in types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"by_module expects torch.nn.Module subclasses such as nn.Linear, got {t!r}")
    if isinstance(params, str) and params != "all":
        wanted: tuple[str, ...] | None = (params,)
    elif isinstance(params, str):
        wanted = None
    else:
        wanted = tuple(params)
        if not wanted or not all(isinstance(w, str) for w in wanted):
            raise TypeError(f"by_module params must be 'all', a name or a tuple of names, got {params!r}")
    type_text = ", ".join(t.__name__ for t in types)
    what = "every parameter" if wanted is None else " or ".join(repr(w) for w in wanted)
    description = f"by_module({type_text}, params={params!r})"

    def module_rule(model: nn.Module) -> Selection:
        modules = dict(model.named_modules())
        owners = {path for path, m in modules.items() if isinstance(m, types)}
        missing = [t.__name__ for t in types if not any(isinstance(modules[p], t) for p in owners)]
        if missing:
            raise ValueError(f"{description}: the model has no module of type {missing[0]}")
        names, leaves = _named_leaves(model)
        decisions, reasons = {}, {}
        for n in names:
            param = _parametrization(n, modules)
            path, _, attr = n.rpartition(".")
            if param is not None:
                path, attr = param.owner, param.tensor
            chosen = path in owners and (wanted is None or attr in wanted)
            decisions[n] = chosen
            if chosen:
                reasons[n] = f"{attr} of {type(modules[path]).__name__}"
            elif path in owners:
                reasons[n] = f"{attr} of {type(modules[path]).__name__}, not {what}"
            else:
                reasons[n] = f"not in a {type_text} module"
        if not any(decisions.values()):
            raise ValueError(f"{description} selects no parameter (the {type_text} modules have no {what})")
        return Selection(decisions, {n: _shape_text(x) for n, x in zip(names, leaves)}, reasons)

    return Selector(None, description, module_rule=module_rule)
