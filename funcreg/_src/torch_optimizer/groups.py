"""What a :class:`funcreg.TorchOptimizer` is given as its params, as plain functions.

The forms ``params`` may take (a module, tensors, ``(name, tensor)``
pairs, param-group dicts) turned into group dicts, the options a group may hold (``WATCHED``: an
option that changes what the optimizer does, so a group holding one its factory never receives is an
error), the keys schedulers and torch put into groups, and the group option of a hyperparameter
held by ``fr.inject_hyperparams`` (``option_name``: ``lr`` for ``learning_rate``) with the check of
its value (``check_option_value``). The checks themselves are methods of ``TorchOptimizer``
(``_check_options``, ``_named_params``), which reads them at every step.
"""

from __future__ import annotations

import math
import numbers
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
    "a fixed learning rate; inject it (TorchOptimizer(params, fr.inject_hyperparams(fr.adamw, "
    "learning_rate=...)): the groups' lr sets it), pass a factory (TorchOptimizer(params, lambda lr: "
    "fr.adamw(lr, ...), lr=...)), or give the transform a funcreg schedule"
)
# torch.optim's names for the hyperparameters fr.inject_hyperparams holds, where torch has one (the
# group option its schedulers drive); every other hyperparameter is the group option of its own name
TORCH_OPTION_NAMES = {"learning_rate": "lr"}


def option_name(hyperparameter: str) -> str:
    """The group option of an injected hyperparameter: ``lr`` for ``learning_rate``, else its name."""
    return TORCH_OPTION_NAMES.get(hyperparameter, hyperparameter)


def check_option_value(value: Any, g: int, key: str) -> None:
    """Refuses a group value for an injected hyperparameter that is not a real number or a 0-d real
    tensor (``TypeError``, ``ValueError`` for another shape), or not finite (``ValueError``), naming
    the group and key."""
    where = f"param group {g}: {key!r}"
    if isinstance(value, torch.Tensor):
        if value.ndim != 0:
            raise ValueError(
                f"{where} is a tensor of shape {tuple(value.shape)}; expected a number or a 0-d tensor"
            )
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(
                f"{where} is a tensor of dtype {value.dtype}; expected a real number or a 0-d real tensor"
            )
        if not bool(torch.isfinite(value)):
            raise ValueError(f"{where} is {_short(value)}; expected a finite number")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{where} is {_short(value)} (a {type(value).__name__}); expected a number or a 0-d tensor"
        )
    if not math.isfinite(value):
        raise ValueError(f"{where} is {value!r}; expected a finite number")


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
