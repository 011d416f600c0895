"""Named parameters: a module's flat ``{name: tensor}`` dicts, and matching names against patterns.

Selections and decay rules speak of parameters by name (``"encoder.0.weight"``): from
``named_parameters`` for a module, from the key paths for a parameter tree. A pattern matches a full
name or a module prefix, and one that matches nothing is answered with the closest names, so a typo
raises instead of quietly selecting nothing.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

from funcreg._src.core.tree import flatten, tree_names


def check_initialized(name: str, p: Any) -> None:
    """Raises ``ValueError`` naming ``name`` when ``p`` is an uninitialized parameter (a ``torch.nn.Lazy*``
    module before its first forward pass), whose shape is not known yet."""
    if isinstance(p, UninitializedTensorMixin):
        raise ValueError(
            f"parameter {name!r} is uninitialized (a torch.nn.Lazy* module): run one forward pass on a "
            "batch first, which gives it its shape, then build the optimizer or take the parameters"
        )


def named_parameters(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``module.named_parameters()`` as a list, each parameter checked to be initialized."""
    named: list[tuple[str, torch.Tensor]] = list(module.named_parameters())
    for name, p in named:
        check_initialized(name, p)
    return named


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
    return {name: p.detach() for name, p in named_parameters(module)}


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
    return glob_match(name, pattern) or glob_match(name, pattern + ".*")


def glob_match(name: str, pattern: str) -> bool:
    """``fnmatch.fnmatchcase(name, pattern)`` (``*``, ``?``, ``[seq]``, ``[!seq]``) in plain Python.

    ``fnmatch`` compiles the pattern to a regular expression behind an ``lru_cache``, which
    ``torch.compile`` cannot trace: a mask by name resolved inside a compiled step broke the graph
    there (and inside ``torch.func.grad`` the resumed frame failed). This loop traces to constants.

    Examples:
        >>> from funcreg._src.selection.named_params import glob_match
        >>> glob_match("encoder.0.weight", "encoder.*.weight"), glob_match("head.bias", "[!h]*")
        (True, False)
    """
    n, p = 0, 0
    star_p, star_n = -1, 0  # the last '*' seen in the pattern, and where in the name it started
    while n < len(name):
        if p < len(pattern) and pattern[p] == "*":
            star_p, star_n, p = p, n, p + 1
            continue
        if p < len(pattern):
            width, ok = _one(pattern, p, name[n])
            if ok:
                n, p = n + 1, p + width
                continue
        if star_p < 0:
            return False
        star_n += 1  # let the last '*' take one more character, and try again after it
        n, p = star_n, star_p + 1
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def _one(pattern: str, p: int, c: str) -> tuple[int, bool]:
    """Whether the pattern item at ``p`` (a character, ``?`` or a ``[...]`` set) matches ``c``, and
    its width in the pattern. An unclosed ``[`` is a literal, as in ``fnmatch``."""
    item = pattern[p]
    if item == "?":
        return 1, True
    if item != "[":
        return 1, item == c
    end = p + 1
    if end < len(pattern) and pattern[end] == "!":
        end += 1
    if end < len(pattern) and pattern[end] == "]":
        end += 1  # a ']' right after '[' or '[!' is a member
    while end < len(pattern) and pattern[end] != "]":
        end += 1
    if end >= len(pattern):
        return 1, c == "["
    body = pattern[p + 1 : end]
    negate = body.startswith("!")
    if negate:
        body = body[1:]
    hit, i = False, 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            hit = hit or body[i] <= c <= body[i + 2]
            i += 3
        else:
            hit = hit or body[i] == c
            i += 1
    return end - p + 1, hit != negate


def _check_patterns(patterns: Iterable[str], names: Sequence[str], what: str) -> list[str]:
    """The patterns as a list, each checked to match some name: a pattern that matches
    nothing raises with close names (a typo would otherwise select nothing, silently)."""
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
