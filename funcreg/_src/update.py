"""Applying updates to parameters."""

from __future__ import annotations

from funcreg._src import leafwise
from funcreg._src.base import flat
from funcreg._src.tree import PyTree


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """Returns ``params + updates`` as new tensors; the caller's tensors are never written into.

    A ``None`` update leaves its parameter as it is (the same tensor). Structures must match
    (``StructureError`` naming the first differing key), and every update has exactly its
    parameter's shape (``ContractError``), dtype and device (``LeafTypeError``): nothing is broadcast
    or cast silently.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.apply_updates({"w": torch.ones(2)}, {"w": torch.tensor([0.5, -0.5])})
        {'w': tensor([1.5000, 0.5000])}
    """
    f = flat(updates, params, "apply_updates", needs_params=True)
    ps = f.present_params()
    new = leafwise.add(ps, f.present_updates()) if ps else []
    return f.tree(new, base=f.params)
