"""Sharded sweeps: the members of a sweep (seeds x coefficients) split across ranks, results gathered.

Each rank trains its members as one vmapped ensemble (:func:`funcreg.ensemble_step`); members are
independent, so nothing is communicated while they train, and the gathered results are those of the
single-process sweep. Which rank trains which member is a pure function of the member's index and the
number of ranks (:func:`sweep_members`, round robin), so a rank that restarts recomputes exactly its
own members.
"""

from __future__ import annotations

from typing import Any

import torch

from funcreg._src.core.tree import flatten, map_named, tree_names, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.distributed.data_parallel import _check_group, _dist, group_size
from funcreg._src.training.history import History


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid {name} value: {value!r} (expected an int)")
    if value < low:
        raise ValueError(f"Invalid {name} value: {value} (must be >= {low})")


def _rank_and_size(rank: int | None, world_size: int | None, group: Any = None) -> tuple[int, int]:
    """This process's rank and the world size: given (both or neither), else torch.distributed's
    (0 and 1 without a process group, where one process trains every member)."""
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither (then torch.distributed's are used)")
    if rank is None:
        dist = _dist()
        if not dist.is_initialized():
            return 0, 1  # no process group: one process trains every member
        return dist.get_rank(group), dist.get_world_size(group)
    assert world_size is not None
    _check_int("world_size", world_size, 1)
    _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"Invalid rank value: {rank} (must be < world_size, {world_size})")
    return rank, world_size


def sweep_members(n: int, rank: int | None = None, world_size: int | None = None) -> list[int]:
    """The indices of the members of an ``n``-member sweep that ``rank`` of ``world_size`` trains.

    Round robin: member ``i`` belongs to rank ``i % world_size``, so rank ``r`` trains
    ``r, r + world_size, r + 2 * world_size, ...`` (at most one member more than any other rank; a
    rank beyond the last member gets none). A pure function of the member index and the number of
    ranks: a rank that restarts recomputes exactly its members, and :func:`gather_members` puts the
    results back in member order.

    Args:
        n: the number of members (``>= 1``).
        rank, world_size: this process's rank and the number of ranks; both ``None`` (the default):
            torch.distributed's default group, or rank 0 of 1 when no process group is initialized.

    Returns:
        The member indices, ascending.

    Examples:
        >>> import funcreg as fr
        >>> [fr.distributed.sweep_members(5, rank=r, world_size=2) for r in range(2)]
        [[0, 2, 4], [1, 3]]
        >>> fr.distributed.sweep_members(3)  # no process group: one process trains every member
        [0, 1, 2]
    """
    _check_int("n", n, 1)
    r, w = _rank_and_size(rank, world_size)
    return list(range(r, n, w))


def take_members(tree: PyTree, members: list[int]) -> PyTree:
    """The entries of a stacked tree (leading member axis) at ``members``: this rank's slice of a sweep.

    ``None`` leaves stay ``None``; every tensor is indexed along its first axis (``x[members]``, a copy).

    Args:
        tree: a stacked tree (:func:`funcreg.stack`, :func:`funcreg.init_members`), or a 1-D tensor of
            per-member hyperparameters.
        members: member indices, e.g. from :func:`sweep_members`.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.distributed.take_members({"w": torch.arange(5.0)}, [1, 3])
        {'w': tensor([1., 3.])}
    """
    if not isinstance(members, (list, tuple)) or not all(
        isinstance(m, int) and not isinstance(m, bool) for m in members
    ):
        raise TypeError(f"Invalid members value: {members!r} (expected a list of member indices)")

    def taken(name: str, x: Any) -> torch.Tensor:
        """Leaf ``x`` at the ``members`` entries of its leading axis."""
        if not isinstance(x, torch.Tensor) or x.ndim == 0:
            raise ValueError(
                f"take_members: {name!r} has no leading member axis (a 0-d tensor or not a tensor)"
            )
        bad = [m for m in members if not 0 <= m < x.shape[0]]
        if bad:
            raise ValueError(
                f"take_members: member {bad[0]} is out of range for {name!r}, which has {x.shape[0]} members"
            )
        return x[torch.tensor(members, dtype=torch.long, device=x.device)] if members else x[:0].clone()

    return map_named(taken, tree)


def _order(n: int, world: int) -> list[int]:
    """The member index of each gathered entry, rank after rank."""
    return [m for r in range(world) for m in sweep_members(n, r, world)]


def _merge_trees(parts: list[Any], order: list[int], n: int) -> PyTree:
    """The ranks' stacked result trees joined along the member axis and put back in member
    order (``order``: the member index of each gathered row), refusing trees of other structures."""
    present = [p for p in parts if p is not None]
    leaves0, spec = flatten(present[0])
    names = tree_names(present[0])
    columns: list[list[Any]] = [[] for _ in leaves0]
    for p in present:
        leaves, other = flatten(p)
        if other != spec:
            raise ValueError("gather_members: the ranks' results have different structures")
        for col, x in zip(columns, leaves):
            col.append(x)
    inverse = torch.empty(n, dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(n)
    out: list[Any] = []
    for name, col in zip(names, columns):
        if col[0] is None:
            out.append(None)
            continue
        full = torch.cat(col)
        if full.shape[0] != n:
            raise ValueError(
                f"gather_members: {name!r} has {full.shape[0]} members over all ranks, expected {n}"
            )
        out.append(full[inverse])
    return unflatten(out, spec)


def _merge_histories(parts: list[History | None], order: list[int], n: int) -> History:
    """The ranks' metric histories joined member by member (as :func:`_merge_trees`), refusing
    histories of other metrics or lengths."""
    present = [h for h in parts if h is not None and len(h)]
    merged = History()
    if not present:
        return merged
    keys, length = present[0].keys(), len(present[0])
    for h in present:
        if h.keys() != keys or len(h) != length:
            raise ValueError(
                "gather_members: the ranks' histories differ in metrics or length "
                f"({keys} x {length} steps vs {h.keys()} x {len(h)})"
            )
    stacked = {
        k: _merge_trees([h[k].transpose(0, 1) for h in present], order, n).transpose(0, 1) for k in keys
    }
    steps = getattr(present[0], "_steps", list(range(length)))
    for t in range(length):
        merged.append({k: v[t] for k, v in stacked.items()}, step=steps[t])
    return merged


def gather_members(local: Any, n: int, dst: int = 0, group: Any | None = None) -> Any:
    """Gathers each rank's results for its members (:func:`sweep_members`) onto rank ``dst``, in member order.

    ``local`` is what this rank computed for its members, in the order :func:`sweep_members` gives
    them, with the members along the leading axis:

    * a tree of tensors (final parameters, a ``TrainState``, a dict of per-member metrics): every
      tensor's first axis is this rank's members; the result has all ``n`` members, as the
      single-process sweep would;
    * a :class:`funcreg.History` of the ensemble's metrics (each step a value per member): the
      result is one history with all ``n`` members per step;
    * a list with one Python object per member.

    A rank without members passes ``None``. On rank ``dst`` the merged result is returned, on the
    others ``None``. Results travel as pickled objects (``torch.distributed.gather_object``): meant for
    results (metrics, final weights of small models), not for large states.

    Args:
        local: this rank's results (see above).
        n: the number of members of the sweep.
        dst: the global rank that receives the merged result.
        group: the process group (``None``: the default group).

    Examples:
        A single-process group: the merged result is the rank's own.

        >>> import socket, torch, torch.distributed as dist, funcreg as fr
        >>> s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        >>> mine = fr.distributed.sweep_members(3)
        >>> fr.distributed.gather_members({"acc": torch.tensor([0.5, 0.7, 0.9])[mine]}, n=3)
        {'acc': tensor([0.5000, 0.7000, 0.9000])}
        >>> dist.destroy_process_group()
    """
    _check_int("n", n, 1)
    _check_group(group, "gather_members")
    world = group_size(group, "gather_members")
    dist = _dist()
    rank = dist.get_rank(group)
    mine = sweep_members(n, rank, world)
    if isinstance(local, History):
        keys = local.keys()
        count = local[keys[0]].shape[1] if keys and local[keys[0]].ndim == 2 else len(mine)
    elif isinstance(local, list):
        count = len(local)
    elif local is None:
        count = 0
    else:
        count = next(
            (x.shape[0] for x in flatten(local)[0] if isinstance(x, torch.Tensor) and x.ndim), len(mine)
        )
    if count != len(mine):
        raise ValueError(
            f"gather_members: rank {rank} passed results for {count} members, but trains {len(mine)} of the "
            f"{n} (fr.distributed.sweep_members({n}, {rank}, {world}) = {mine})"
        )
    if isinstance(local, History):
        payload: Any = local
    elif local is None or isinstance(local, list):
        payload = local
    else:
        leaves, spec = flatten(local)
        payload = unflatten([x.detach().cpu() if isinstance(x, torch.Tensor) else x for x in leaves], spec)
    parts: list[Any] | None = [None] * world if dist.get_rank() == dst else None
    dist.gather_object(payload, parts, dst=dst, group=group)
    if parts is None:
        return None
    order = _order(n, world)
    present = [p for p in parts if p is not None]
    if not present:
        return None
    if isinstance(present[0], History):
        return _merge_histories(parts, order, n)
    if isinstance(present[0], list):
        flat_items = [x for p in parts if p is not None for x in p]
        out: list[Any] = [None] * n
        for m, x in zip(order, flat_items):
            out[m] = x
        return out
    return _merge_trees(parts, order, n)
