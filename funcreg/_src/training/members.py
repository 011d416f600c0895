"""Ensemble members: trees stacked along a new leading (member) axis, and vmap over them.

Members must be *created* outside vmap with their own seeds (random initialisation inside vmap
would give identical members): :func:`init_members` does that. :func:`vmap` is ``torch.func.vmap``
for trees that hold ``None`` leaves (frozen parameters, masked-out state).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from funcreg._src.core.tree import check_same_spec, flatten, tree_names, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.selection.named_params import buffers_of, params_of

__all__ = ["init_members", "num_members", "stack", "unstack", "vmap"]


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stacks trees of the same structure and shapes along a new leading axis.

    Raises ``ValueError`` naming the first key whose structure, shape or dtype differs.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.stack([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])["w"].shape
        torch.Size([2, 2])
    """
    trees = list(trees)
    if not trees:
        raise ValueError("stack needs at least one tree")
    first, spec = flatten(trees[0])
    names = tree_names(trees[0])
    columns: list[list[Any]] = [[x] for x in first]
    for m, tree in enumerate(trees[1:], start=1):
        leaves, other = flatten(tree)
        check_same_spec(spec, other, "member 0", f"member {m}")
        for name, col, leaf in zip(names, columns, leaves):
            ref = col[0]
            if (ref is None) != (leaf is None):
                raise ValueError(f"member {m}: {name!r} is None in one member and a tensor in another")
            if ref is not None and (ref.shape != leaf.shape or ref.dtype != leaf.dtype):
                raise ValueError(
                    f"member {m}: {name!r} has shape {tuple(leaf.shape)} and dtype {leaf.dtype}, "
                    f"member 0 has {tuple(ref.shape)} and {ref.dtype}"
                )
            col.append(leaf)
    return unflatten([None if col[0] is None else torch.stack(col) for col in columns], spec)


def unstack(tree: PyTree) -> list[PyTree]:
    """Splits a stacked tree into its members (the inverse of :func:`stack`).

    Examples:
        >>> import torch, funcreg as fr
        >>> [m["w"].tolist() for m in fr.unstack({"w": torch.tensor([[1.0], [2.0]])})]
        [[1.0], [2.0]]
    """
    leaves, spec = flatten(tree)
    n = num_members(tree)
    return [unflatten([None if x is None else x[i] for x in leaves], spec) for i in range(n)]


def num_members(tree: PyTree) -> int:
    """The size of the leading (member) axis shared by every tensor of ``tree``.

    Raises ``ValueError`` naming a key whose leading size differs, or a 0-d tensor.
    """
    leaves, _ = flatten(tree)
    names = tree_names(tree)
    n: int | None = None
    first_name = ""
    for name, x in zip(names, leaves):
        if not isinstance(x, torch.Tensor):
            continue
        if x.ndim == 0:
            raise ValueError(f"{name!r} is 0-d: a stacked tree needs a leading member axis on every tensor")
        if n is None:
            n, first_name = x.shape[0], name
        elif x.shape[0] != n:
            raise ValueError(
                f"{name!r} has {x.shape[0]} members along its leading axis, {first_name!r} has {n}"
            )
    if n is None:
        raise ValueError("the tree has no tensors")
    return n


def init_members(
    make_model: Callable[[], nn.Module], seeds: Iterable[int]
) -> tuple[PyTree, PyTree, nn.Module]:
    """Builds one model per seed (outside vmap) and returns their stacked params and buffers.

    ``make_model()`` is called after ``torch.manual_seed(seed)`` for each seed; torch's global random
    state is restored afterwards. Returns ``(params, buffers, model)`` where ``model`` is the first
    member's module, to use with ``functional_call`` / :func:`funcreg.functional_model`.

    Examples:
        >>> import torch, funcreg as fr
        >>> params, buffers, model = fr.init_members(lambda: torch.nn.Linear(3, 2), seeds=[0, 1, 2])
        >>> params["weight"].shape, bool((params["weight"][0] != params["weight"][1]).any())
        (torch.Size([3, 2, 3]), True)
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("init_members needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"Invalid seeds value: {seeds!r} (seeds repeat, so members would be identical)")
    models = []
    with torch.random.fork_rng(devices=[]):
        for seed in seeds:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"Invalid seed value: {seed!r} (expected an int)")
            torch.manual_seed(seed)
            model = make_model()
            if not isinstance(model, nn.Module):
                raise TypeError(f"make_model must return a torch.nn.Module, got {type(model).__name__}")
            models.append(model)
    params = stack([params_of(m) for m in models])
    buffers = stack([buffers_of(m) for m in models]) if buffers_of(models[0]) else {}
    return params, buffers, models[0]


def vmap(fn: Callable[..., Any], in_dims: int | None | Sequence[int | None] = 0) -> Callable[..., Any]:
    """``torch.func.vmap`` for functions whose argument and result trees hold ``None`` leaves.

    ``torch.func.vmap`` accepts only tensors as leaves, but funcreg states hold ``None`` for
    parameters without state (masked-out leaves, ``nu_max`` without amsgrad) and gradient trees hold
    ``None`` for frozen parameters. This wrapper sets the ``None`` leaves aside, vmaps the tensors
    (with ``randomness="different"``: each member its own dropout mask) and rebuilds the trees.

    Args:
        fn: the function to map over a leading member axis.
        in_dims: one entry per positional argument (``0``: batched along axis 0, ``None``: shared),
            or a single ``0``/``None`` for all of them.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.adamw(0.1, mask={"w": True, "b": False})  # masked: no decay state for "b"
        >>> params = fr.stack([{"w": torch.ones(2), "b": torch.zeros(1)}] * 3)
        >>> state = fr.vmap(tx.init)(params)
        >>> updates, state = fr.vmap(tx.update)(fr.stack([{"w": torch.ones(2), "b": torch.ones(1)}] * 3), state, params)
        >>> updates["w"].shape, state.nu_max
        (torch.Size([3, 2]), None)
    """
    if not callable(fn):
        raise TypeError(f"vmap expects a callable, got {fn!r}")

    def call(*args: Any) -> Any:
        dims_given = in_dims if isinstance(in_dims, (list, tuple)) else (in_dims,) * len(args)
        if len(args) != len(dims_given):
            raise TypeError(f"in_dims has {len(dims_given)} entries for {len(args)} arguments")
        for d in dims_given:
            if d not in (0, None):
                raise ValueError(
                    f"Invalid in_dims entry: {d!r} (funcreg's vmap maps over axis 0 or shares: 0 or None)"
                )
        leaves: list[Any] = []
        dims: list[int | None] = []
        specs = []
        for arg, dim in zip(args, dims_given):
            arg_leaves, arg_spec = flatten(arg)
            specs.append((len(arg_leaves), arg_spec))
            leaves.extend(arg_leaves)
            dims.extend([dim] * len(arg_leaves))
        tensor_at = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        out_layout: dict[str, Any] = {}

        def inner(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            full = list(leaves)
            for i, t in zip(tensor_at, tensors):
                full[i] = t
            rebuilt, start = [], 0
            for count, arg_spec in specs:
                rebuilt.append(unflatten(full[start : start + count], arg_spec))
                start += count
            out_leaves, out_spec = flatten(fn(*rebuilt))
            for x in out_leaves:
                if x is not None and not isinstance(x, torch.Tensor):
                    raise TypeError(
                        f"a vmapped step may only return tensors and None, got {type(x).__name__}"
                    )
            out_layout["spec"] = out_spec
            out_layout["tensor"] = [x is not None for x in out_leaves]
            return tuple(x for x in out_leaves if x is not None)

        outs = torch.func.vmap(inner, in_dims=tuple(dims[i] for i in tensor_at), randomness="different")(
            *[leaves[i] for i in tensor_at]
        )
        it = iter(outs)
        return unflatten([next(it) if t else None for t in out_layout["tensor"]], out_layout["spec"])

    return call
