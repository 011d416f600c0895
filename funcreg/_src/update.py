"""Applying updates to parameters."""

from __future__ import annotations

from funcreg._src import leafwise
from funcreg._src.tree import PyTree, check_same_spec, flatten, leaf_names, unflatten


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """Returns ``params + updates`` as new tensors in each parameter's dtype.

    A ``None`` update leaves its parameter as it is (the same tensor). Structures must match
    (``ValueError`` naming the first differing key).

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.apply_updates({"w": torch.ones(2)}, {"w": torch.tensor([0.5, -0.5])})
        {'w': tensor([1.5000, 0.5000])}
    """
    p_leaves, spec = flatten(params)
    u_leaves, u_spec = flatten(updates)
    check_same_spec(spec, u_spec, "params", "updates")
    index = []
    for i, (p, u) in enumerate(zip(p_leaves, u_leaves)):
        if u is None:
            continue
        if p is None:
            raise ValueError(f"parameter {leaf_names(params)[i]!r} is None but its update is not")
        index.append(i)
    ps = [p_leaves[i] for i in index]
    us = [u_leaves[i] if u_leaves[i].dtype == p_leaves[i].dtype else u_leaves[i].to(p_leaves[i].dtype) for i in index]
    new = leafwise.add(ps, us) if ps else []
    out = list(p_leaves)
    for i, n in zip(index, new):
        out[i] = n
    return unflatten(out, spec)
