"""What a :class:`funcreg.TorchOptimizer` is given as its params, as plain functions.

The forms ``params`` may take (a module, tensors, ``(name, tensor)``
pairs, param-group dicts) turned into group dicts, the options a group may hold (``WATCHED``: an
option that changes what the optimizer does, so a group holding one its factory never receives is an
error), and the keys schedulers and torch put into groups. The checks themselves are methods of
``TorchOptimizer`` (``_check_options``, ``_named_params``), which reads them at every step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from funcreg._src.selection.named_params import named_parameters

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
    """``params`` as a list of group dicts: a module, a dict, tensors or ``(name, tensor)`` pairs
    become one group; a list of dicts stays; a single tensor, a mix or nothing raises."""
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
    """A group's ``params`` as ``(name or None, tensor)`` pairs, refusing a set (its order
    changes between runs) and entries that are neither."""
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
