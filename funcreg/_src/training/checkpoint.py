"""Checkpoints: transform and training states as plain dicts that ``torch.load(weights_only=True)`` reads.

States are NamedTuples (``ScaleByAdamState``, ``TrainState``, ...), which the safe unpickler of
``torch.load(weights_only=True)`` refuses. :func:`state_dict` turns any state into a plain dict of
named tensors plus a description of its structure; :func:`load_state_dict` rebuilds it *into the
structure of a template* (``tx.init(params)`` or ``step.init(params)``) and refuses a checkpoint of
another structure, shape or dtype, naming the first key that differs, rather than loading it silently.
"""

from __future__ import annotations

from typing import Any

import torch

from funcreg._src.core.tree import flatten, tree_names, unflatten
from funcreg._src.core.typing import PyTree

FORMAT = "funcreg-state-v1"


def _structure(tree: PyTree) -> str:
    _, spec = flatten(tree)
    return str(spec)


def state_dict(state: PyTree) -> dict[str, Any]:
    """A plain, ``weights_only``-loadable dict for a state (any tree of tensors and ``None``).

    Examples:
        >>> import io, torch, funcreg as fr
        >>> tx = fr.adamw(0.1)
        >>> state = tx.init({"w": torch.ones(2)})
        >>> buffer = io.BytesIO(); torch.save(fr.state_dict(state), buffer); _ = buffer.seek(0)
        >>> restored = fr.load_state_dict(tx.init({"w": torch.ones(2)}), torch.load(buffer, weights_only=True))
        >>> type(restored).__name__, restored.mu["w"]
        ('ScaleByAdamState', tensor([0., 0.]))
    """
    leaves, _ = flatten(state)
    names = tree_names(state)
    for name, leaf in zip(names, leaves):
        if leaf is not None and not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"state leaf {name!r} is a {type(leaf).__name__}; a checkpoint holds tensors only"
            )
    return {
        "format": FORMAT,
        "structure": _structure(state),
        "names": names,
        "leaves": [None if x is None else x.detach().clone() for x in leaves],
    }


def load_state_dict(template: PyTree, checkpoint: dict[str, Any]) -> PyTree:
    """Rebuilds a state saved by :func:`state_dict` into the structure of ``template``.

    ``template`` is a fresh state of the same transform (``tx.init(params)``). Raises ``ValueError``
    naming the first key that is missing, extra, of another shape or dtype, or of another node type.
    The returned tensors are the checkpoint's (on the template's devices).
    """
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"not a funcreg state checkpoint (expected a dict with format {FORMAT!r})")
    for key in ("structure", "names", "leaves"):
        if key not in checkpoint:
            raise ValueError(f"funcreg state checkpoint has no {key!r} entry")
    t_leaves, spec = flatten(template)
    t_names = tree_names(template)
    names = list(checkpoint["names"])
    leaves = list(checkpoint["leaves"])
    if len(names) != len(leaves):
        raise ValueError(
            f"checkpoint is damaged: it names {len(names)} entries but holds {len(leaves)} values"
        )
    if len(set(names)) != len(names):
        raise ValueError("checkpoint is damaged: an entry name repeats")
    missing = [n for n in t_names if n not in names]
    if missing:
        raise ValueError(f"checkpoint has no entry {missing[0]!r}, which this transform's state has")
    extra = [n for n in names if n not in t_names]
    if extra:
        raise ValueError(f"checkpoint has entry {extra[0]!r}, which this transform's state does not have")
    if names != t_names and sorted(names) == sorted(t_names):
        first = next(a for a, b in zip(names, t_names) if a != b)
        raise ValueError(
            f"checkpoint has the same entries as this state in another order (first out of place: {first!r}): "
            "the parameter dict was built in another key order; build it in the order it was saved in "
            f"(saved order: {names[:4]}{' ...' if len(names) > 4 else ''})"
        )
    if checkpoint["structure"] != _structure(template):
        raise ValueError(
            "checkpoint was saved from a state of another structure (same names, different node types):\n"
            f"  checkpoint: {checkpoint['structure']}\n  this state: {_structure(template)}"
        )
    by_name = dict(zip(names, leaves))
    out = []
    for name, ref in zip(t_names, t_leaves):
        value = by_name[name]
        if (ref is None) != (value is None):
            raise ValueError(
                f"checkpoint entry {name!r} is {'None' if value is None else 'a tensor'}, the state's is not"
            )
        if ref is not None:
            if value.shape != ref.shape or value.dtype != ref.dtype:
                raise ValueError(
                    f"checkpoint entry {name!r} has shape {tuple(value.shape)} and dtype {value.dtype}, "
                    f"the state has {tuple(ref.shape)} and {ref.dtype}"
                )
            value = value.to(ref.device)
        out.append(value)
    return unflatten(out, spec)
