"""Named parameters: a module's flat ``{name: tensor}`` dicts, and matching names against patterns.

Selections and decay rules speak of parameters by name (``"encoder.0.weight"``): from
``named_parameters`` for a module, from the key paths for a parameter tree. A pattern matches a full
name or a module prefix, and one that matches nothing is answered with the closest names, so a typo
raises instead of quietly selecting nothing.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from funcreg._src.tree import flatten, tree_names


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of ``module`` as a flat dict ``{name: tensor}`` in ``named_parameters`` order.

    The tensors are detached and share memory with the module; funcreg never writes into them, so the
    module keeps its weights until you load new ones (``module.load_state_dict(params, strict=False)``).
    The dict is what ``torch.func.functional_call(module, params, args)`` expects.

    Examples:
        >>> import torch, funcreg as fr
        >>> params = fr.params_of(torch.nn.Linear(3, 2))
        >>> {k: tuple(v.shape) for k, v in params.items()}
        {'weight': (2, 3), 'bias': (2,)}
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"params_of expects a torch.nn.Module, got {type(module).__name__}")
    return {name: p.detach() for name, p in module.named_parameters()}


def buffers_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers of ``module`` (BatchNorm running statistics, ...) as a flat dict of detached tensors.

    Examples:
        >>> import torch, funcreg as fr
        >>> sorted(fr.buffers_of(torch.nn.BatchNorm1d(3)))
        ['num_batches_tracked', 'running_mean', 'running_var']
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"buffers_of expects a torch.nn.Module, got {type(module).__name__}")
    return {name: b.detach() for name, b in module.named_buffers()}


def _shape_text(x: Any) -> str:
    return "x".join(str(d) for d in x.shape) if isinstance(x, torch.Tensor) and x.ndim else "scalar"


def _suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    if close:
        return f" (did you mean {', '.join(repr(c) for c in close)}?)"
    shown = ", ".join(repr(c) for c in list(candidates)[:8])
    more = ", ..." if len(candidates) > 8 else ""
    return f" (names are: {shown}{more})"


def _matches(pattern: str, name: str) -> bool:
    """Glob over the full name, or over a module prefix (``"encoder"`` matches ``"encoder.0.weight"``)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def _check_patterns(patterns: Iterable[str], names: Sequence[str], what: str) -> list[str]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    patterns = list(patterns)
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f"{what} patterns must be strings, got {pat!r}")
        if not any(_matches(pat, n) for n in names):
            # suggest module prefixes too: a typo'd "haed" should point at "head", not only at "head.weight"
            prefixes = sorted({".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)})
            raise ValueError(
                f"{what} pattern {pat!r} matches no parameter{_suggest(pat, prefixes + list(names))}"
            )
    return patterns


def _named_leaves(tree_or_module: Any) -> tuple[list[str], list[Any]]:
    if isinstance(tree_or_module, nn.Module):
        params = params_of(tree_or_module)
        return list(params), list(params.values())
    leaves, _ = flatten(tree_or_module)
    return tree_names(tree_or_module), leaves
