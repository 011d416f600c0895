"""Between a funcreg transform state and ``torch.optim``'s per-parameter ``optimizer.state[p]`` dicts.

A :class:`funcreg.TorchOptimizer` keeps the state of each parameter group's transform in
``optimizer.state``, as ``torch.optim`` optimizers do, so that everything built on that convention
(``state_dict()`` in torch's format, ``torch.distributed.checkpoint``, Lightning and accelerate moving
states between devices) works unchanged. A :class:`Layout` says where each leaf of a transform state
lives there:

* a leaf under a per-parameter tree (a dict keyed by the parameter names, such as
  ``ScaleByAdamState.mu``) is ``optimizer.state[p][key]`` of its parameter, with ``key`` derived from
  the field name (``mu -> exp_avg``, ``nu -> exp_avg_sq``, ``nu_max -> max_exp_avg_sq``,
  ``steps -> step``, other fields keep their name; a field path such as ``"1.count"`` where two
  fields of one parameter would share a name);
* any other leaf (the update count of the transform, a penalty's value) belongs to the whole group
  and is stored, the same tensor, in the dict of every parameter of the group (as torch stores
  ``step`` per parameter);
* ``None`` leaves (parameters of other groups, masked-out parameters) are stored nowhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree

from funcreg._src.core.tree import TreeSpec, flatten, unflatten
from funcreg._src.core.typing import PyTree

# torch.optim's names for funcreg's per-parameter state fields (Adam's moments, SGD's buffer, steps)
TORCH_NAMES = {
    "mu": "exp_avg",
    "nu": "exp_avg_sq",
    "nu_max": "max_exp_avg_sq",
    "trace": "momentum_buffer",
    "steps": "step",
}


class Entry(NamedTuple):
    """Where one leaf of a transform state is stored.

    ``kind`` is ``"param"`` (in ``state[p][key]`` of parameter ``name``), ``"group"`` (in the dict of
    every parameter of the group, under ``keys[name]``) or ``"none"`` (a ``None`` leaf).
    ``shape``/``dtype`` are the leaf's, for checks.
    """

    kind: str
    name: str | None
    key: str | None
    keys: dict[str, str] | None
    shape: tuple[int, ...] | None
    dtype: torch.dtype | None


class Layout(NamedTuple):
    """The storage of every leaf of a transform state (flattening order), and the state's signature."""

    spec: TreeSpec
    entries: list[Entry]
    signature: tuple[Any, ...]


def _is_none(x: Any) -> bool:
    return x is None


def signature(state: PyTree) -> tuple[Any, ...]:
    """The structure of a state with the shape and dtype of each leaf (device left out)."""
    leaves, spec = flatten(state)
    described: list[tuple[Any, ...] | None] = []
    for leaf in leaves:
        if leaf is None:
            described.append(None)
        elif isinstance(leaf, torch.Tensor):
            described.append((tuple(leaf.shape), leaf.dtype))
        else:
            described.append(("value", type(leaf).__name__))
    return (str(spec), tuple(described))


def same_structure(a: PyTree, b: PyTree) -> bool:
    """Same tree structure, ``None`` in the same places, tensors of the same shapes and dtypes."""
    return signature(a) == signature(b)


def _child(node: Any, key: Any) -> Any:
    if isinstance(key, pytree.MappingKey):
        return node[key.key]
    if isinstance(key, pytree.SequenceKey):
        return node[key.idx]
    if isinstance(key, pytree.GetAttrKey):
        return getattr(node, key.name)
    raise TypeError(f"unsupported node in a transform state: key {key!r}")  # pragma: no cover


def _part(key: Any) -> tuple[str, str]:
    if isinstance(key, pytree.GetAttrKey):
        return ("field", key.name)
    if isinstance(key, pytree.MappingKey):
        return ("key", str(key.key))
    if isinstance(key, pytree.SequenceKey):
        return ("index", str(key.idx))
    return ("key", str(key))  # pragma: no cover


def _names_of(parts: list[tuple[str, str]]) -> tuple[str, str]:
    """The short key (torch's name of the last field, plus what follows it) and the long key (full path)."""
    fields = [i for i, (kind, _) in enumerate(parts) if kind == "field"]
    if not fields:
        text = ".".join(p for _, p in parts) or "state"
        return text, text
    i = fields[-1]
    short = ".".join([TORCH_NAMES.get(parts[i][1], parts[i][1])] + [p for _, p in parts[i + 1 :]])
    long = ".".join([p for _, p in parts[:i]] + [short])
    return short, long


def build_layout(template: PyTree, names: Sequence[str], group_names: Sequence[str]) -> Layout:
    """The layout of a state initialized over the full tree ``names`` (``None`` outside the group).

    ``group_names`` are the names of the group's parameters: the group entries are stored under each.
    """
    names_t = tuple(names)
    paths_and_leaves, spec = pytree.tree_flatten_with_path(template, is_leaf=_is_none)
    raw: list[tuple[str, str | None, list[tuple[str, str]], Any]] = []
    for path, leaf in paths_and_leaves:
        node = template
        owner: str | None = None
        parts: list[tuple[str, str]] = []
        for j, key in enumerate(path):
            if (
                owner is None
                and isinstance(node, dict)
                and isinstance(key, pytree.MappingKey)
                and tuple(node.keys()) == names_t
            ):
                owner = str(key.key)
                parts.extend(_part(k) for k in path[j + 1 :])
                break
            parts.append(_part(key))
            node = _child(node, key)
        if leaf is not None and not isinstance(leaf, torch.Tensor):
            where = ".".join(p for _, p in parts) or "<root>"
            raise TypeError(
                f"transform state leaf {where!r} is a {type(leaf).__name__}; a TorchOptimizer stores tensors only"
            )
        raw.append(
            ("none" if leaf is None else ("param" if owner is not None else "group"), owner, parts, leaf)
        )

    # keys of each parameter's dict: the short name, or the long one where two entries would collide
    group_raw = [(i, _names_of(parts)) for i, (kind, _, parts, _) in enumerate(raw) if kind == "group"]
    per_param: dict[str, list[tuple[int, tuple[str, str]]]] = {}
    for i, (kind, owner, parts, _) in enumerate(raw):
        if kind == "param":
            assert owner is not None
            per_param.setdefault(owner, []).append((i, _names_of(parts)))
    chosen: dict[tuple[int, str], str] = {}
    for name in group_names:
        items = per_param.get(name, []) + group_raw
        counts: dict[str, int] = {}
        for _, (short, _) in items:
            counts[short] = counts.get(short, 0) + 1
        for i, (short, long) in items:
            chosen[(i, name)] = short if counts[short] == 1 else long

    entries = []
    for i, (kind, owner, _, leaf) in enumerate(raw):
        shape = tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else None
        dtype = leaf.dtype if isinstance(leaf, torch.Tensor) else None
        if kind == "none":
            entries.append(Entry("none", None, None, None, None, None))
        elif kind == "param":
            assert owner is not None
            leaf_key = chosen.get((i, owner), _names_of(raw[i][2])[0])
            entries.append(Entry("param", owner, leaf_key, None, shape, dtype))
        else:
            entries.append(Entry("group", None, None, {n: chosen[(i, n)] for n in group_names}, shape, dtype))
    return Layout(spec, entries, signature(template))


def keys_of(layout: Layout, name: str) -> list[str]:
    """The keys ``state[p]`` has for parameter ``name`` under ``layout``."""
    out = []
    for e in layout.entries:
        if e.kind == "param" and e.name == name:
            out.append(e.key)
        elif e.kind == "group" and e.keys is not None and name in e.keys:
            out.append(e.keys[name])
    return [k for k in out if k is not None]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def check_value(value: Any, entry: Entry, name: str, key: str, where: str) -> None:
    """Raises ``ValueError`` unless ``value`` is a tensor of the entry's shape and dtype."""
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != entry.shape or value.dtype != entry.dtype:
        raise ValueError(
            f"{where} {key!r} of parameter {name!r} has {_describe(value)}, the transform's state has "
            f"shape {entry.shape} and dtype {entry.dtype}"
        )


def read(
    layout: Layout,
    lookup: Callable[[str], dict[str, Any] | None],
    group_names: Sequence[str],
    fresh: Callable[[], PyTree],
    where: str = "optimizer.state",
) -> PyTree:
    """The transform state stored under ``layout``; entries that are missing come from ``fresh()``.

    ``lookup(name)`` is the state dict of a parameter (or ``None``). A parameter without an entry
    starts from the transform's fresh state, as a ``torch.optim`` parameter without state does.
    """
    leaves: list[Any] = []
    missing: list[int] = []
    for i, e in enumerate(layout.entries):
        if e.kind == "none":
            leaves.append(None)
            continue
        value = None
        if e.kind == "param":
            assert e.name is not None and e.key is not None
            d = lookup(e.name)
            value = None if d is None else d.get(e.key)
            if value is not None:
                check_value(value, e, e.name, e.key, where)
        else:
            assert e.keys is not None
            for n in group_names:
                d = lookup(n)
                if d is not None and d.get(e.keys[n]) is not None:
                    value = d[e.keys[n]]
                    check_value(value, e, n, e.keys[n], where)
                    break
        if value is None:
            missing.append(i)
        leaves.append(value)
    if missing:
        fresh_leaves, fresh_spec = flatten(fresh())
        if fresh_spec != layout.spec:  # pragma: no cover - init is deterministic in structure
            raise RuntimeError("the transform's init returned states of different structures")
        for i in missing:
            leaves[i] = fresh_leaves[i]
    return unflatten(leaves, layout.spec)


def write(
    layout: Layout,
    state: PyTree,
    dict_of: Callable[[str], dict[str, Any]],
    group_names: Sequence[str],
    clear: bool = False,
) -> list[Any]:
    """Stores ``state`` under ``layout``: ``dict_of(name)`` is the (created if needed) dict of a parameter.

    Returns the state's leaves (flattening order)."""
    leaves, spec = flatten(state)
    if spec != layout.spec:
        raise ValueError(
            "the transform's update returned a state of another structure than its init:\n"
            f"  init:   {layout.spec}\n  update: {spec}"
        )
    dicts = {n: dict_of(n) for n in group_names}
    if clear:
        for d in dicts.values():
            d.clear()
    for e, value in zip(layout.entries, leaves):
        if e.kind == "param":
            assert e.name is not None and e.key is not None
            if value is None:
                dicts[e.name].pop(e.key, None)
            else:
                dicts[e.name][e.key] = value
        elif e.kind == "group":
            assert e.keys is not None
            for n in group_names:
                if value is None:
                    dicts[n].pop(e.keys[n], None)
                else:
                    dicts[n][e.keys[n]] = value
    return leaves


# ----------------------------------------------------------------------------------------------------
# Carrying a state over when a group's options change the structure of its transform's state


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _namedtuples(node: Any, out: list[Any]) -> None:
    if _is_namedtuple(node):
        out.append(node)
        for v in node:
            _namedtuples(v, out)
    elif isinstance(node, dict):
        for v in node.values():
            _namedtuples(v, out)
    elif isinstance(node, (tuple, list)):
        for v in node:
            _namedtuples(v, out)


def _has_namedtuple(node: Any) -> bool:
    found: list[Any] = []
    _namedtuples(node, found)
    return bool(found)


def carry(old: PyTree, new: PyTree, what: str) -> PyTree:
    """``new`` (a fresh state) with every sub-state taken from ``old`` where it still fits.

    Sub-states are matched by type, in order: a ``TraceState`` keeps its momentum buffers when the
    chain around it gains or loses a link (``weight_decay`` going from 0 to a positive value adds an
    ``add_decayed_weights``). A sub-state that exists only in ``new`` starts fresh; one that exists
    only in ``old`` is dropped. A sub-state present in both whose own structure changed (``amsgrad``
    switched on adds ``nu_max``) cannot be carried over: ``ValueError`` naming ``what``.
    """
    pool: list[Any] = []
    _namedtuples(old, pool)
    used: set[int] = set()

    def take(node: Any) -> None:
        inner: list[Any] = []
        _namedtuples(node, inner)
        used.update(id(x) for x in inner)

    def go(node: Any) -> Any:
        if _is_namedtuple(node):
            candidates = [c for c in pool if type(c) is type(node) and id(c) not in used]
            for c in candidates:
                if same_structure(c, node):
                    take(c)
                    return c
            partner = candidates[0] if candidates else None
            if partner is not None and not any(_has_namedtuple(v) for v in node):
                raise ValueError(
                    f"{what} changes the structure of the transform's {type(node).__name__} "
                    "(not only its values), so its state cannot be carried over; build a new optimizer "
                    "(or keep this option fixed)"
                )
            if partner is not None:
                used.add(id(partner))
            fields = []
            for f in node._fields:
                value = getattr(node, f)
                if _has_namedtuple(value):
                    fields.append(go(value))
                elif partner is not None and same_structure(getattr(partner, f), value):
                    fields.append(getattr(partner, f))
                else:
                    fields.append(value)
            return type(node)(*fields)
        if isinstance(node, dict):
            return type(node)((k, go(v)) for k, v in node.items())
        if isinstance(node, (tuple, list)):
            return type(node)(go(v) for v in node)
        return node

    return go(new)


def meta_like(x: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor of ``x``'s shape and dtype on the meta device (no memory), or ``None``."""
    return None if x is None else torch.empty_like(x.detach(), device="meta")
