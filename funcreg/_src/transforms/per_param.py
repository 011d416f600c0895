"""A fixed factor per parameter, by name: layer-wise learning-rate decay as a transform.

``fr.chain(fr.adamw(lr, weight_decay=wd), fr.scale_by_layer(fr.layer_decay(model, 0.75)))`` steps
each parameter as ``torch.optim.AdamW`` does in a param group of learning rate ``lr * scale``: AdamW's
update, its decoupled decay included, is proportional to the learning rate, so scaling the update
is scaling the rate (tested against param groups).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from funcreg._src.core import leafwise
from funcreg._src.core.base import EmptyState, GradientTransformation, configured, flat
from funcreg._src.core.errors import SelectionError
from funcreg._src.core.tree import tree_names
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import check_number
from funcreg._src.selection.mask_cache import PerStructure

__all__ = ["scale_by_layer"]


def scale_by_layer(scales: Mapping[str, float]) -> GradientTransformation:
    """Multiplies each parameter's update by its factor in ``scales`` (by name: a
    :func:`funcreg.layer_decay` result, or any ``{name: number}``).

    Every parameter of the tree must have a factor, and every name in ``scales`` must be a parameter
    of the tree (``SelectionError`` naming the first that is not): a misspelled name would otherwise
    leave a layer at the full rate.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.scale_by_layer({"a": 0.5, "b": 1.0})
        >>> tx.update({"a": torch.ones(2), "b": torch.ones(1)}, tx.init(None))[0]["a"]
        tensor([0.5000, 0.5000])
    """
    if not isinstance(scales, Mapping):
        raise TypeError(f"scales must be a mapping {{name: factor}}, got {type(scales).__name__}")
    factors = dict(scales)
    for name, factor in factors.items():
        check_number(f"scales[{name!r}]", factor, low=None, allow_tensor=False)
    if not factors:
        raise ValueError("scales is empty: no parameter would be scaled")

    def init(params: PyTree) -> EmptyState:
        del params
        return EmptyState()

    # each leaf's factor, found by name once per tree structure
    per_leaf = PerStructure(factors, _factors_of)

    def update(updates: PyTree, state: EmptyState, params: PyTree | None = None) -> tuple[PyTree, EmptyState]:
        f = flat(updates, params, "scale_by_layer")
        leaf_factors = per_leaf(updates)
        # one foreach call per distinct factor (a few layers), not one multiplication per tensor
        by_factor: dict[float, list[int]] = {}
        for k, i in enumerate(f.index):
            by_factor.setdefault(leaf_factors[i], []).append(k)
        present = f.present_updates()
        out: list[Any] = [None] * len(present)
        for factor, positions in by_factor.items():
            for k, u in zip(positions, leafwise.mul([present[k] for k in positions], factor)):
                out[k] = u
        return f.tree(out), state

    return configured(GradientTransformation(init, update), "scale_by_layer", f"<{len(factors)} factors>")


def _factors_of(factors: dict[str, float], tree: PyTree) -> list[float]:
    """The factor of each leaf of ``tree``, by name; a tree whose names and the factors' differ is
    refused, naming the first difference."""
    names = tree_names(tree)
    missing = next((n for n in names if n not in factors), None)
    if missing is not None:
        raise SelectionError(f"scale_by_layer: no factor for parameter {missing!r}")
    if len(factors) != len(names):
        extra = next(n for n in factors if n not in set(names))
        raise SelectionError(f"scale_by_layer: {extra!r} has a factor but is not a parameter of the tree")
    return [factors[n] for n in names]
