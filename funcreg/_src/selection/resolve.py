"""Parameter trees from modules, and selections: which parameters a transform or penalty touches.

A selection is a named yes/no per parameter that prints as a table, so the rule behind weight decay
is visible. Rules that select nothing, and patterns that match no parameter, raise instead of
silently doing nothing (a hand-written grouping loop with one misplaced ``if`` decays nothing, and
nothing says so).

This module turns anything accepted as a mask into one bool per leaf (:func:`resolve_mask`) and is
the import path for the rest, which lives in topic modules: :mod:`funcreg._src.selection.named_params`
(``params_of``, name patterns), :mod:`funcreg._src.selection.table` (``Selection``),
:mod:`funcreg._src.selection.decay_mask`, :mod:`funcreg._src.selection.selectors` (``Selector``, ``by_name``,
``by_predicate``, ``by_module``) and :mod:`funcreg._src.selection.parametrizations`. Their names, public and
private, are re-exported here (``x as x``), so imports written against this module keep working.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from funcreg._src.core.tree import broadcast_prefix, tree_names
from funcreg._src.core.typing import MaskLike, PyTree
from funcreg._src.selection.decay_mask import _NORM_NAME as _NORM_NAME
from funcreg._src.selection.decay_mask import _NORM_TYPES as _NORM_TYPES
from funcreg._src.selection.decay_mask import LAYER_SCALE_NAMES as LAYER_SCALE_NAMES
from funcreg._src.selection.decay_mask import RELATIVE_POSITION_MODULES as RELATIVE_POSITION_MODULES
from funcreg._src.selection.decay_mask import RELATIVE_POSITION_NAMES as RELATIVE_POSITION_NAMES
from funcreg._src.selection.decay_mask import TOKEN_NAMES as TOKEN_NAMES
from funcreg._src.selection.decay_mask import _decide as _decide
from funcreg._src.selection.decay_mask import _listed_by_model as _listed_by_model
from funcreg._src.selection.decay_mask import _norm_reason as _norm_reason
from funcreg._src.selection.decay_mask import decay_mask as decay_mask
from funcreg._src.selection.named_params import _check_patterns as _check_patterns
from funcreg._src.selection.named_params import _matches as _matches
from funcreg._src.selection.named_params import _named_leaves as _named_leaves
from funcreg._src.selection.named_params import _shape_text as _shape_text
from funcreg._src.selection.named_params import _suggest as _suggest
from funcreg._src.selection.named_params import buffers_of as buffers_of
from funcreg._src.selection.named_params import params_of as params_of
from funcreg._src.selection.parametrizations import _PARAMETRIZED as _PARAMETRIZED
from funcreg._src.selection.parametrizations import _parametrization as _parametrization
from funcreg._src.selection.parametrizations import _Parametrized as _Parametrized
from funcreg._src.selection.selectors import Selector as Selector
from funcreg._src.selection.selectors import by_module as by_module
from funcreg._src.selection.selectors import by_name as by_name
from funcreg._src.selection.selectors import by_predicate as by_predicate
from funcreg._src.selection.table import Selection as Selection


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
