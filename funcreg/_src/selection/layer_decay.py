"""Layer-wise learning-rate decay: a scale per parameter from the model's layer order.

The layer of each parameter comes from a *matcher*, the convention of timm's models
(``model.group_matcher(coarse=False)``): a dict ``{group: spec}`` whose specs are a regular
expression, or a list of ``(regex, suffix)`` pairs whose captured numbers order the layers (``r"^blocks\\.(\\d+)"``),
the suffix ``(99999,)`` joining the previous layer; or a callable ``name -> ordinal``. Parameters that
no expression matches (the head) come last. Layers are numbered in the order of their ordinals, and
layer ``i`` of ``n`` gets the scale ``max(min_scale, decay ** (n - 1 - i))``: the head learns at the
full rate, the stem at ``decay ** (n - 1)`` of it.

:func:`layer_decay` gives the scales, as a mapping from parameter name; :func:`layer_decay_groups`
the param groups of a ``torch.optim``-style optimizer, one per layer and decay decision, as timm's
``param_groups_layer_decay`` builds them.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch import nn

from funcreg._src.core.validation import check_number
from funcreg._src.selection.named_params import named_parameters

__all__ = ["LayerScales", "layer_decay", "layer_decay_groups"]

_JOIN_PREVIOUS = 99999.0  # timm's MATCH_PREV_GROUP: a suffix that keeps the previous layer's id

Matcher = Mapping[str, Any] | Callable[[str], Any]


class LayerScales(Mapping[str, float]):
    """The learning-rate scale of each named parameter, and its layer (``layers``, 0 = the stem).

    ``str()`` is a table of names, layers and scales. Use it with :func:`funcreg.scale_by_layer` in a
    chain, or as param groups through :func:`funcreg.layer_decay_groups`.
    """

    def __init__(self, layers: dict[str, int], scales: list[float]) -> None:
        self.layers = layers
        self.num_layers = len(scales)
        self._scales = {name: scales[layer] for name, layer in layers.items()}

    def __getitem__(self, name: str) -> float:
        return self._scales[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._scales)

    def __len__(self) -> int:
        return len(self._scales)

    def __repr__(self) -> str:
        return f"LayerScales({self.num_layers} layers, {len(self)} parameters)"

    def __str__(self) -> str:
        width = max([len("name"), *map(len, self._scales)])
        lines = [f"{'name':<{width}}  layer  scale"]
        lines += [f"{n:<{width}}  {self.layers[n]:>5}  {s:.6g}" for n, s in self._scales.items()]
        return "\n".join(lines)


def _compiled(
    matcher: Mapping[str, Any],
) -> list[tuple[re.Pattern[str], tuple[float, ...], tuple[float, ...]]]:
    """The matcher's specs as ``(regex, group ordinal, suffix)``, in the dict's order."""
    compiled: list[tuple[re.Pattern[str], tuple[float, ...], tuple[float, ...]]] = []
    for ordinal, (group, spec) in enumerate(matcher.items()):
        if spec is None:
            continue
        entries = spec if isinstance(spec, (list, tuple)) else [(spec, None)]
        for entry in entries:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
                raise TypeError(
                    f"matcher group {group!r}: each entry of a list must be a (regex, suffix) pair, got {entry!r}"
                )
            suffix = () if entry[1] is None else tuple(map(float, entry[1]))
            compiled.append((re.compile(entry[0]), (float(ordinal),), suffix))
    return compiled


def _ordinal(name: str, matcher: Any) -> tuple[float, ...]:
    """Where ``name`` sorts among the layers: the matching spec's ordinal, its captured numbers and
    suffix; unmatched names (the head) sort last."""
    if callable(matcher):
        value = matcher(name)
        return tuple(map(float, value)) if isinstance(value, (list, tuple)) else (float(value),)
    for pattern, ordinal, suffix in matcher:
        found = pattern.match(name)
        if found:
            numbers = tuple(float(g) for g in found.groups() if g is not None)
            return ordinal + numbers + suffix
    return (math.inf,)


def layer_ids(names: Sequence[str], matcher: Matcher) -> dict[str, int]:
    """The layer of each name: the distinct ordinals in order, numbered from 0, where an ordinal
    ending in the join suffix stays in the layer before it."""
    spec = matcher if callable(matcher) else _compiled(matcher)
    by_ordinal: dict[tuple[float, ...], list[str]] = defaultdict(list)
    for n in names:
        by_ordinal[_ordinal(n, spec)].append(n)
    layers: dict[str, int] = {}
    layer = -1
    for key in sorted(by_ordinal):
        if layer < 0 or key[-1] != _JOIN_PREVIOUS:
            layer += 1
        layers.update(dict.fromkeys(by_ordinal[key], layer))
    return {n: layers[n] for n in names}


def _matcher_of(model: nn.Module, matcher: Matcher | None) -> Matcher:
    """The matcher given, else the model's ``group_matcher(coarse=False)``; neither raises, naming
    the form ``matcher=`` takes (no silent single layer)."""
    if matcher is not None:
        if not (callable(matcher) or isinstance(matcher, Mapping)):
            raise TypeError(
                f"matcher must be a dict of regex specs or a callable name -> ordinal, got {matcher!r}"
            )
        return matcher
    found = getattr(model, "group_matcher", None)
    if not callable(found):
        raise ValueError(
            f"{type(model).__name__} has no group_matcher() saying which layer each parameter is in; pass "
            "matcher={'stem': r'^embed', 'blocks': [(r'^blocks\\.(\\d+)', None)]} (unmatched names, the head, "
            "come last)"
        )
    return found(coarse=False)


def layer_decay(
    model: nn.Module, decay: float = 0.75, *, matcher: Matcher | None = None, min_scale: float = 0.0
) -> LayerScales:
    """The layer-wise learning-rate scale of every trainable parameter of ``model``.

    Layer ``i`` of ``n`` (from ``model.group_matcher(coarse=False)``, as timm's models have, or
    ``matcher``) is scaled by ``max(min_scale, decay ** (n - 1 - i))``, as timm's
    ``param_groups_layer_decay`` scales its groups' ``lr_scale``.

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.ModuleDict({"embed": torch.nn.Linear(2, 4), "blocks": torch.nn.ModuleList(
        ...     [torch.nn.Linear(4, 4) for _ in range(2)]), "head": torch.nn.Linear(4, 1)})
        >>> scales = fr.layer_decay(model, 0.5, matcher={"stem": r"^embed", "blocks": [(r"^blocks\\.(\\d+)", None)]})
        >>> scales["embed.weight"], scales["blocks.0.weight"], scales["blocks.1.bias"], scales["head.weight"]
        (0.125, 0.25, 0.5, 1.0)
    """
    check_number("decay", decay, low=0.0, high=1.0, low_open=True, allow_tensor=False)
    check_number("min_scale", min_scale, low=0.0, high=1.0, allow_tensor=False)
    if not isinstance(model, nn.Module):
        raise TypeError(f"layer_decay expects a torch.nn.Module, got a {type(model).__name__}")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    layers = layer_ids(names, _matcher_of(model, matcher))
    count = max(layers.values()) + 1
    return LayerScales(layers, [max(min_scale, decay ** (count - 1 - i)) for i in range(count)])


def layer_decay_groups(
    model: nn.Module,
    decay: float = 0.75,
    weight_decay: float = 0.05,
    *,
    lr: float | None = None,
    no_weight_decay: Sequence[str] = (),
    matcher: Matcher | None = None,
    min_scale: float = 0.0,
) -> list[dict[str, Any]]:
    """Param groups with layer-wise learning-rate decay, one per layer and decay decision.

    As timm's ``param_groups_layer_decay`` with the model's own ``no_weight_decay()`` list, as
    ``timm.optim.create_optimizer_v2`` passes it: 1-d parameters (biases, norms) and the names matching
    a pattern (``fnmatch``) of ``no_weight_decay`` or of ``model.no_weight_decay()`` get
    ``weight_decay=0``; each group holds
    ``lr_scale`` (:func:`layer_decay`'s scale of its layer) and, with ``lr``, ``lr = lr * lr_scale``
    so that ``torch.optim`` and :class:`funcreg.TorchOptimizer` (and their schedulers, which scale
    each group's own ``lr``) apply it. ``params`` are ``(name, parameter)`` pairs, so masks by name
    keep working; groups are named ``layer_<i>_decay`` / ``layer_<i>_no_decay``.

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.ModuleDict({"embed": torch.nn.Linear(2, 4), "head": torch.nn.Linear(4, 1)})
        >>> groups = fr.layer_decay_groups(model, 0.5, 0.05, lr=0.1, matcher={"stem": r"^embed"})
        >>> [(g["name"], g["lr"], g["weight_decay"]) for g in groups]
        [('layer_0_decay', 0.05, 0.05), ('layer_0_no_decay', 0.05, 0.0), ('layer_1_decay', 0.1, 0.05), ('layer_1_no_decay', 0.1, 0.0)]
        >>> opt = fr.TorchOptimizer(groups, "adamw", lr=0.1)
    """
    scales = layer_decay(model, decay, matcher=matcher, min_scale=min_scale)
    check_number("weight_decay", weight_decay, low=0.0, allow_tensor=False)
    if lr is not None:
        check_number("lr", lr, low=0.0, allow_tensor=False)
    names = [n for n, p in named_parameters(model) if p.requires_grad]
    for pattern in no_weight_decay:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"no_weight_decay pattern {pattern!r} matches no trainable parameter")
    # the model's own list may name parameters it does not have (timm's ViT lists dist_token)
    model_list = getattr(model, "no_weight_decay", None)
    listed = [*no_weight_decay, *(model_list() if callable(model_list) else ())]
    groups: dict[str, dict[str, Any]] = {}
    for name, p in named_parameters(model):
        if not p.requires_grad:
            continue
        excluded = p.ndim <= 1 or any(fnmatch.fnmatchcase(name, pattern) for pattern in listed)
        layer = scales.layers[name]
        key = f"layer_{layer}_{'no_decay' if excluded else 'decay'}"
        if key not in groups:
            groups[key] = {
                "name": key,
                "params": [],
                "lr_scale": scales[name],
                "weight_decay": 0.0 if excluded else weight_decay,
            }
            if lr is not None:
                groups[key]["lr"] = lr * scales[name]
        groups[key]["params"].append((name, p))
    return list(groups.values())
