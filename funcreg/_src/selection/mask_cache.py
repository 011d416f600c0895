"""Masks (and partition labels) resolved once per parameter structure instead of at every step.

Resolving a mask (:func:`funcreg._src.selection.resolve.resolve_mask`) matches it to the tree by leaf name:
a key-path walk and a check per leaf, which on a tree of thousands of small tensors costs more than
the optimizer's arithmetic. The structure of the parameters does not change between steps, so the
answer is kept, keyed by what it depends on:

- a bool, or a bool tree (a string tree, for labels): the tree's structure and the mask's own leaves
  (a mask edited in place is resolved again; one holding tensors is not cached);
- a :class:`funcreg.Selection`: the tree's structure (a selection is matched by name only);
- a callable (``fr.decay_mask(model)``, a ``by_*`` selector, a function): the tree's structure and
  every leaf's shape and dtype. A mask function is therefore called once per structure, not at every
  step, and must not depend on the parameters' values (optax's contract for masks, made explicit).

Under ``torch.compile`` the mask is resolved while tracing (the cache is eager only, like the flat-dict
fast path of :mod:`funcreg._src.core.tree`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

from funcreg._src.core.tree import compiling, flatten, spec_key
from funcreg._src.core.typing import PyTree
from funcreg._src.selection.resolve import MaskLike, resolve_mask
from funcreg._src.selection.table import Selection

_ENTRIES = 4  # structures remembered per mask: the parameters, and the updates when called without them


_PLAIN = (bool, str, int)  # leaf values of a mask or labels tree that can be part of a key


def _key(mask: Any, tree: PyTree) -> Hashable | None:
    """What the resolution of ``mask`` against ``tree`` depends on, or ``None`` when not cacheable."""
    if isinstance(mask, torch.nn.Module) or isinstance(mask, torch.Tensor):
        return None
    leaves, spec = flatten(tree)
    structure = spec_key(spec)
    if isinstance(mask, Selection):
        return structure
    if callable(mask):
        meta = tuple((x.shape, x.dtype) if isinstance(x, torch.Tensor) else type(x) for x in leaves)
        return (structure, meta)
    if type(mask) is dict and all(type(v) in _PLAIN for v in mask.values()):
        return (structure, tuple(mask.items()))  # the common flat dict, without a pytree walk
    mask_leaves, mask_spec = flatten(mask)
    if not all(type(v) in _PLAIN for v in mask_leaves):
        return None
    return (structure, mask_spec, tuple(mask_leaves))


class PerStructure:
    """``resolve(source, tree)`` kept per structure of ``tree`` (see the module for the key).

    Examples:
        >>> import torch
        >>> from funcreg._src.selection.mask_cache import PerStructure
        >>> count = PerStructure({"w": "a", "b": "b"}, lambda labels, tree: [labels[k] for k in tree])
        >>> count({"w": torch.ones(1), "b": torch.ones(1)})
        ['a', 'b']
    """

    def __init__(self, source: Any, resolve: Callable[[Any, PyTree], list[Any]]) -> None:
        self.source = source
        self.resolve = resolve
        self._resolved: dict[Hashable, tuple[Any, ...]] = {}

    def __call__(self, tree: PyTree) -> list[Any]:
        """``resolve(source, tree)``, from the cache when the structure was seen before."""
        key = None if compiling() else _key(self.source, tree)
        if key is None:
            return self.resolve(self.source, tree)
        hit = self._resolved.get(key)
        if hit is not None:
            return list(hit)
        resolved = self.resolve(self.source, tree)
        if len(self._resolved) >= _ENTRIES:  # a structure that keeps changing: start over (no lock needed)
            self._resolved = {}
        self._resolved[key] = tuple(resolved)
        return resolved


class CachedMask(PerStructure):
    """A mask with its resolution (:func:`funcreg._src.selection.resolve.resolve_mask`) kept per structure.

    Built once by the transform or penalty that takes the mask, so the cache lives and dies with it.

    Examples:
        >>> import torch
        >>> from funcreg._src.selection.mask_cache import CachedMask
        >>> mask = CachedMask(lambda p: {k: v.ndim >= 2 for k, v in p.items()})
        >>> mask({"w": torch.ones(2, 2), "b": torch.ones(2)})
        [True, False]
    """

    def __init__(self, mask: MaskLike, what: str = "mask") -> None:
        super().__init__(mask, lambda m, tree: resolve_mask(m, tree, what))
        self.mask = mask
        self.what = what

    def __reduce__(self) -> tuple[Any, ...]:
        return (CachedMask, (self.mask, self.what))  # pickles and copies without its cache

    def __repr__(self) -> str:
        return repr(self.mask)
