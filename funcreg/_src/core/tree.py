"""Pytree helpers: flattening with parameter names, structure checks, prefix broadcasting.

Every transform in funcreg works on the flat list of leaves of a parameter tree. This module is the
one place that knows how trees are flattened (``torch.utils._pytree``, with ``None`` kept as a leaf so
that frozen parameters keep their position), how a leaf is named (its key path joined with dots,
``"0.weight"`` for the flat dicts of :func:`funcreg.params_of`) and how two trees are compared.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from funcreg._src.core.errors import StructureError
from funcreg._src.core.typing import PyTree

TreeSpec = pytree.TreeSpec

__all__ = [
    "PyTree",
    "TreeSpec",
    "broadcast_prefix",
    "flatten",
    "tree_names",
    "unflatten",
]


def _is_none(x: Any) -> bool:
    return x is None


# Flat dicts of tensors ({"0.weight": ..., "0.bias": ...}, what fr.params_of returns) are the common
# case, flattened several times per step: their spec is cached by key tuple, so flattening is a list
# of the values and unflattening a dict(zip(...)), with no per-leaf pytree dispatch.
_FLAT_DICT_SPECS: dict[tuple[Any, ...], TreeSpec] = {}
_FLAT_DICT_KEYS: dict[int, tuple[Any, ...]] = {}
_FLAT_DICT_CACHE_SIZE = 256


def _flat_dict_spec(tree: dict, values: list[Any]) -> TreeSpec:
    keys = tuple(tree)
    spec = _FLAT_DICT_SPECS.get(keys)
    if spec is None:
        spec = pytree.tree_flatten(tree, is_leaf=_is_none)[1]
        if len(_FLAT_DICT_SPECS) < _FLAT_DICT_CACHE_SIZE:  # cached specs stay alive, so their ids stay unique
            _FLAT_DICT_SPECS[keys] = spec
            _FLAT_DICT_KEYS[id(spec)] = keys
    return spec


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing the caller (older torch versions lack the query: never)."""
    fn = getattr(torch.compiler, "is_compiling", None)
    return bool(fn()) if fn is not None else False


def flatten(tree: PyTree) -> tuple[list[Any], TreeSpec]:
    """Flattens ``tree`` into its leaves, keeping ``None`` leaves in place."""
    # (the cache is eager only: Dynamo cannot trace id() of a spec it has not seen)
    if type(tree) is dict and not compiling():
        values = list(tree.values())
        if all(v is None or isinstance(v, torch.Tensor) for v in values):
            return values, _flat_dict_spec(tree, values)
    return pytree.tree_flatten(tree, is_leaf=_is_none)


def tensors_of(tree: PyTree) -> list[torch.Tensor]:
    """Every tensor in ``tree``, without building a spec: a walk over plain dicts, lists, tuples and
    NamedTuples (optimizer states are these), pytree's own flattening for anything else. For checks
    that read every tensor of a state at each step; the order is not :func:`flatten`'s."""
    out: list[torch.Tensor] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        kind = type(node)
        if isinstance(node, torch.Tensor):
            out.append(node)
        elif (
            kind is dict
            or kind is list
            or kind is tuple
            or (isinstance(node, tuple) and hasattr(kind, "_fields"))
        ):
            # the children's tensors taken here, not pushed and popped one by one: a state of thousands
            # of small tensors is walked at every donated step
            for child in node.values() if kind is dict else node:
                if isinstance(child, torch.Tensor):
                    out.append(child)
                elif child is not None:
                    stack.append(child)
        elif node is not None and not isinstance(node, (bool, int, float, str)):
            out.extend(x for x in pytree.tree_leaves(node, is_leaf=_is_none) if isinstance(x, torch.Tensor))
    return out


def unflatten(leaves: Sequence[Any], spec: TreeSpec) -> PyTree:
    """Inverse of :func:`flatten`."""
    keys = None if compiling() else _FLAT_DICT_KEYS.get(id(spec))
    if keys is not None and _FLAT_DICT_SPECS.get(keys) is spec:
        if len(leaves) != len(keys):
            raise ValueError(f"{len(leaves)} leaves for a tree with {len(keys)}")
        return dict(zip(keys, leaves))
    return pytree.tree_unflatten(list(leaves), spec)


def spec_key(spec: TreeSpec) -> Any:
    """A cheap hashable stand-in for ``spec``: the id of a cached flat-dict spec (alive as long as the
    cache, so never reused), else the spec itself (hashing a spec walks it)."""
    return (
        ("flat-dict", id(spec)) if _FLAT_DICT_SPECS.get(_FLAT_DICT_KEYS.get(id(spec), ())) is spec else spec
    )


def _key_str(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_name(path: Sequence[Any]) -> str:
    return ".".join(str(k) for k in path) if path else "<root>"


def tree_names(tree: PyTree) -> list[str]:
    """Names of the leaves of ``tree`` in flattening order: key paths joined with dots.

    For the flat dict returned by :func:`funcreg.params_of` these are the parameter names; for a nested
    dict ``{"enc": {"w": t}}`` the name is ``"enc.w"``; a bare tensor is ``"<root>"``.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.tree_names({"enc": {"w": torch.ones(1), "b": None}, "head": [torch.ones(2)]})
        ['enc.w', 'enc.b', 'head.0']
    """
    if type(tree) is dict and all(v is None or isinstance(v, torch.Tensor) for v in tree.values()):
        return [str(k) for k in tree]  # a flat dict (fr.params_of): its keys, without a key-path walk
    paths, _ = pytree.tree_flatten_with_path(tree, is_leaf=_is_none)
    return [_path_name([_key_str(k) for k in path]) for path, _ in paths]


def map_named(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
    """``tree`` with each non-``None`` leaf replaced by ``fn(name, leaf)``, in flattening order."""
    leaves, spec = flatten(tree)
    return unflatten([None if x is None else fn(name, x) for name, x in zip(tree_names(tree), leaves)], spec)


def _children(spec: TreeSpec) -> list[TreeSpec]:
    if hasattr(spec, "children"):
        return list(spec.children())
    return list(spec.children_specs)  # torch < 2.4


def _child_keys(spec: TreeSpec) -> list[Any]:
    """The key of each child of a node: dict keys, namedtuple fields, or positions."""
    n = spec.num_children
    if spec.type in (dict, pytree.OrderedDict, pytree.defaultdict):
        ctx = spec.context
        # defaultdict's context is (default_factory, keys)
        keys = ctx[1] if spec.type is pytree.defaultdict else ctx
        return list(keys)
    fields = getattr(spec.context, "_fields", None)
    if fields is not None and len(fields) == n:
        return list(fields)
    return list(range(n))


def _describe(spec: TreeSpec) -> str:
    if spec.is_leaf():
        return "a leaf"
    name = getattr(spec.context, "__name__", None) if isinstance(spec.context, type) else None
    return f"a {name or spec.type.__name__} with {spec.num_children} entries"


def _first_difference(a: TreeSpec, b: TreeSpec, path: list[Any]) -> tuple[list[Any], str] | None:
    """The path to the first place two tree structures differ and a message template
    (``{a}``/``{b}`` filled in by the caller), or ``None`` when they agree."""
    if a.is_leaf() and b.is_leaf():
        return None
    if a.is_leaf() != b.is_leaf() or a.type != b.type:
        return path, f"{{a}} has {_describe(a)}, {{b}} has {_describe(b)}"
    keys_a, keys_b = _child_keys(a), _child_keys(b)
    if keys_a != keys_b:
        missing_in_b = [k for k in keys_a if k not in keys_b]
        missing_in_a = [k for k in keys_b if k not in keys_a]
        if missing_in_b:
            return path + [missing_in_b[0]], "present in {a}, missing in {b}"
        if missing_in_a:
            return path + [missing_in_a[0]], "present in {b}, missing in {a}"
        first = next(i for i, (x, y) in enumerate(zip(keys_a, keys_b)) if x != y)
        return path + [keys_a[first]], "same keys in a different order in {a} and {b}"
    if a.context != b.context:
        return path, f"{{a}} and {{b}} have different node metadata ({a.context!r} vs {b.context!r})"
    for key, ca, cb in zip(keys_a, _children(a), _children(b)):
        found = _first_difference(ca, cb, path + [key])
        if found is not None:
            return found
    return None


def check_same_spec(spec_ref: TreeSpec, spec_other: TreeSpec, reference_name: str, other_name: str) -> None:
    """Raises ``StructureError`` naming the first key where two flattened trees differ in structure.

    ``None`` leaves count as leaves, so a gradient tree with ``None`` for a frozen parameter has the
    same structure as the parameter tree.
    """
    if spec_ref == spec_other:
        return
    found = _first_difference(spec_ref, spec_other, [])
    if found is None:  # pragma: no cover - specs differ in a way the walk does not see
        raise StructureError(f"{other_name} does not have the structure of {reference_name}")
    path, why = found
    why = why.format(a=reference_name, b=other_name)
    raise StructureError(
        f"{other_name} does not match the structure of {reference_name} at key "
        f"{_path_name([str(k) for k in path])!r}: {why}"
    )


def key_differences(expected: Collection[Any], given: Collection[Any]) -> tuple[list[Any], list[Any]]:
    """The keys of ``expected`` that ``given`` lacks and those of ``given`` not expected, each in order."""
    return [k for k in expected if k not in given], [k for k in given if k not in expected]


def _is_value(x: Any) -> bool:
    """A prefix-tree leaf: anything pytree does not flatten (bool, str, number, tensor, callable)."""
    return x is None or pytree.tree_is_leaf(x)


def broadcast_prefix(
    prefix: PyTree, tree: PyTree, what: str = "mask", tree_name: str = "params"
) -> list[Any]:
    """Broadcasts a prefix tree to the leaves of ``tree``.

    ``prefix`` has the structure of ``tree`` or of a prefix of it: ``True`` stands for every leaf,
    ``{"encoder": False, "decoder": True}`` for every leaf under each key. Dict keys are matched by
    name, so their order does not matter. Returns one prefix value per leaf of ``tree``, in flattening
    order. A key of ``tree`` the prefix does not cover, or a key of the prefix that ``tree`` does not
    have, raises ``ValueError`` naming it.
    """
    _, spec = flatten(tree)
    out: list[Any] = []

    def walk(node: Any, node_spec: TreeSpec, path: list[Any]) -> None:
        """Expands the prefix ``node`` (at ``path``) over the leaves of ``node_spec``, refusing a
        subtree where the full tree has a leaf or a container of another type."""
        if _is_value(node):
            out.extend([node] * node_spec.num_leaves)
            return
        where = _path_name([str(k) for k in path])
        if node_spec.is_leaf():
            raise StructureError(
                f"{what} has a subtree ({type(node).__name__}) at {where!r} where {tree_name} has a leaf"
            )
        node_type = pytree._get_node_type(node)
        if node_type != node_spec.type:
            raise StructureError(
                f"{what} has a {type(node).__name__} at {where!r} where {tree_name} has "
                f"{_describe(node_spec)}"
            )
        children, context = pytree.SUPPORTED_NODES[node_type].flatten_fn(node)
        child_specs = _children(node_spec)
        keys = _child_keys(node_spec)
        if node_spec.type in (dict, pytree.OrderedDict, pytree.defaultdict):
            lookup = dict(zip(node.keys(), children))
            missing, extra = key_differences(keys, lookup)
            if extra:
                raise StructureError(
                    f"{what} has key {_path_name([str(k) for k in path + [extra[0]]])!r}, "
                    f"which {tree_name} does not have"
                )
            if missing:
                raise StructureError(
                    f"{what} has no entry for {_path_name([str(k) for k in path + [missing[0]]])!r} "
                    f"of {tree_name}"
                )
            children = [lookup[k] for k in keys]
        elif len(children) != len(child_specs) or context != node_spec.context:
            raise StructureError(
                f"{what} has {len(children)} entries at {where!r} where {tree_name} has "
                f"{_describe(node_spec)}"
            )
        for key, child, child_spec in zip(keys, children, child_specs):
            walk(child, child_spec, path + [key])

    walk(prefix, spec, [])
    return out


def is_functorch_tensor(x: torch.Tensor) -> bool:
    """True for tensors wrapped by vmap or grad (``torch._foreach_*`` has no batching rule)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(x)
