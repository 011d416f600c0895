"""Parameter trees from modules, and selections: which parameters a transform or penalty touches.

A selection is a named yes/no per parameter that prints as a table, so the rule behind weight decay
is visible. Rules that select nothing, and patterns that match no parameter, raise instead of
silently doing nothing (a hand-written grouping loop with one misplaced ``if`` decays nothing, and
nothing says so).

This module names what a ``mask=`` argument accepts (``MaskLike``: a bool, a bool tree or prefix, a
:class:`funcreg.Selection`, a :class:`funcreg.Selector`, or a callable ``params -> mask``) and turns it
into one bool per leaf (:func:`resolve_mask`). The rest of the wing: ``named_params`` (``params_of``,
name patterns), ``table`` (``Selection``), ``decay_mask``, ``selectors`` (``Selector``, ``by_name``,
``by_predicate``, ``by_module``), ``parametrizations`` and ``mask_cache``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch
from torch import nn

from funcreg._src.core.tree import broadcast_prefix, tree_names
from funcreg._src.core.typing import PyTree
from funcreg._src.selection.selectors import Selector
from funcreg._src.selection.table import Selection

__all__ = ["MaskLike", "resolve_mask"]

MaskLike = Union[bool, PyTree, Selection, Selector, Callable[[PyTree], Any]]  # noqa: UP007


def _as_bool(value: Any, name: str, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.numel() == 1:
        return bool(value)
    raise TypeError(f"{what} value at {name!r} must be a bool, got {value!r}")


def resolve_mask(mask: MaskLike, tree: PyTree, what: str = "mask") -> list[bool]:
    """One bool per leaf of ``tree`` from anything funcreg accepts as a mask.

    Accepted: a :class:`Selection` (matched by name), a callable ``tree -> mask`` (a :class:`Selector`
    or your own function), a bool, or a bool tree with the structure of ``tree`` or of a prefix of it.
    """
    if isinstance(mask, nn.Module):
        raise TypeError(f"{what} is a module; pass fr.decay_mask(model) or a bool tree instead")
    if isinstance(mask, Selection):
        return mask.resolve(tree)
    if callable(mask) and not isinstance(mask, torch.Tensor):
        produced = mask(tree)
        if callable(produced) and not isinstance(produced, (Selection, torch.Tensor)):
            raise TypeError(f"{what} callable returned another callable ({produced!r}), not a mask")
        return resolve_mask(produced, tree, what)
    values = broadcast_prefix(mask, tree, what=what)
    names = tree_names(tree)
    return [_as_bool(v, n, what) for v, n in zip(values, names)]
