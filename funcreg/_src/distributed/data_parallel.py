"""Data parallelism as a gradient transformation: average (or sum) the gradients across a process group.

``fr.chain(fr.distributed.mean_gradients(), fr.adamw(...))`` on every rank, each with its shard of the
batch, is the single-process run on the full batch: with equal shards, the mean over ranks of each
rank's mean-loss gradient is the full batch's mean-loss gradient. It is what
``DistributedDataParallel`` does inside ``backward()``, done in the pure update instead, so it works
with ``torch.func.grad`` and :func:`funcreg.make_step`.

The reduction uses ``torch.distributed``'s functional collectives
(``torch.distributed._functional_collectives.all_reduce_coalesced``): they return new tensors (the
gradients passed in are never written into, as everywhere in funcreg) and ``torch.compile`` traces
them into its graph. One collective runs per dtype, over all the leaves of that dtype.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from funcreg._src.core import leafwise
from funcreg._src.core.base import EmptyState, GradientTransformation, configured, flat
from funcreg._src.core.dtensor import is_dtensor, layout
from funcreg._src.core.tree import compiling, is_functorch_tensor, map_named
from funcreg._src.core.typing import PyTree

Group = Any  # a torch.distributed ProcessGroup, or None for the default group


def _dist() -> Any:
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    return dist


def group_size(group: Group, who: str) -> int:
    """The number of ranks of ``group`` (``None``: the default group), which must be initialized."""
    dist = _dist()
    if not dist.is_initialized():
        raise RuntimeError(
            f"{who} needs torch.distributed's default process group: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up its environment)"
        )
    return dist.get_world_size(group)


def _check_group(group: Group, who: str) -> None:
    if group is None:
        return
    dist = _dist()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"Invalid group value: {group!r} ({who} expects a torch.distributed ProcessGroup, e.g. from "
            "torch.distributed.new_group(ranks), or None for the default group)"
        )


def _all_reduce_gradients(op: Literal["mean", "sum"], group: Group) -> GradientTransformation:
    """The transform that all-reduces each gradient over ``group`` (``op``: their mean or sum),
    refusing DTensor gradients (already reduced by their placement) with a named error."""
    who = f"{op}_gradients"
    _check_group(group, who)

    def init(params: PyTree) -> EmptyState:
        del params
        return EmptyState()

    def update(updates: PyTree, state: EmptyState, params: PyTree | None = None) -> tuple[PyTree, EmptyState]:
        f = flat(updates, params, who)
        grads = f.present_updates()
        eager = not compiling()  # functorch's wrapper query cannot be traced (and nothing is wrapped there)
        for i, g in zip(f.index, grads):
            if is_dtensor(g):
                raise TypeError(
                    f"{who}: the gradient of {f.name(i)!r} is {layout(g)}: sharded parameters (FSDP2, tensor "
                    "parallel) get their gradients reduced by torch.distributed itself; use "
                    f"{who} for parameters replicated on every rank (data parallelism)"
                )
            if eager and is_functorch_tensor(g):
                raise TypeError(
                    f"{who}: the gradient of {f.name(i)!r} is wrapped by vmap or grad: a collective cannot run "
                    "inside fr.ensemble_step's vmap (split a sweep's members across ranks instead: "
                    "fr.distributed.sweep_members)"
                )
        world = group_size(group, who)
        if not grads or world == 1:
            return updates, state
        from torch.distributed import _functional_collectives as funcol
        from torch.distributed import group as groups

        pg: Any = groups.WORLD if group is None else group
        # one coalesced collective per dtype (gloo's allreduce_coalesced needs one dtype); complex
        # gradients travel as their real view
        real = [torch.view_as_real(g) if g.is_complex() else g for g in grads]
        by_dtype: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for k, g in enumerate(real):
            by_dtype.setdefault((g.dtype, g.device), []).append(k)
        reduced: list[Any] = [None] * len(real)
        for ks in by_dtype.values():
            outs = funcol.all_reduce_coalesced([real[k] for k in ks], "sum", pg)
            for k, summed in zip(ks, outs):
                reduced[k] = funcol.wait_tensor(summed)
        if op == "mean":
            reduced = leafwise.mul(reduced, 1.0 / world)
        new = [torch.view_as_complex(r) if g.is_complex() else r for r, g in zip(reduced, grads)]
        return f.tree(new), state

    return configured(GradientTransformation(init, update), who, group=group)


def mean_gradients(group: Any | None = None) -> GradientTransformation:
    """Averages the updates across the ranks of a process group: ``u <- (1/R) sum_r u_r``.

    Data parallelism as a transform: placed first in a chain, ``fr.chain(mean_gradients(),
    fr.adamw(...))``, every rank gets the mean of the ranks' gradients, so with each rank holding an
    equal shard of the batch and the same parameters, every rank takes the step a single process
    takes on the full batch (the mean over ranks of per-shard mean-loss gradients is the full-batch
    mean-loss gradient). What ``DistributedDataParallel`` does in ``backward()``, here in the pure
    update: it works with ``torch.func.grad`` and :func:`funcreg.make_step`, and under
    ``torch.compile`` (functional collectives are traced into the graph). Penalties in any form see
    the same parameters on every rank, so they need no reduction.

    Gradients are summed with one ``all_reduce`` per dtype, then divided by the number of ranks; the
    tensors passed in are not written into. Gradients that are ``DTensor``\\ s (FSDP2, tensor
    parallelism: torch reduces those itself) and gradients inside ``vmap`` are refused
    (``TypeError``). On one rank this is the identity.

    Args:
        group: the process group to average over (a ``torch.distributed`` ``ProcessGroup``), or
            ``None`` for the default group (``torch.distributed.init_process_group`` must have run
            before the first update; building the transform needs no process group).

    Examples:
        A single-process group (``world_size=1``) on a free local port; with ``torchrun
        --nproc_per_node 2`` the same code averages over two processes.

        >>> import socket, torch, torch.distributed as dist, funcreg as fr
        >>> s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        >>> tx = fr.chain(fr.distributed.mean_gradients(), fr.sgd(0.1))
        >>> params = {"w": torch.ones(2)}
        >>> tx.update({"w": torch.tensor([1.0, -1.0])}, tx.init(params), params)[0]["w"]
        tensor([-0.1000,  0.1000])
        >>> dist.destroy_process_group()
    """
    return _all_reduce_gradients("mean", group)


def sum_gradients(group: Any | None = None) -> GradientTransformation:
    """Sums the updates across the ranks of a process group: ``u <- sum_r u_r``.

    For losses that are sums over examples (each rank's loss the sum over its shard, so the total is
    the sum over ranks), or shards of unequal size whose losses are already divided by the global
    number of examples. Otherwise as :func:`mean_gradients`.

    Args:
        group: the process group (``None``: the default group).

    Examples:
        >>> import socket, torch, torch.distributed as dist, funcreg as fr
        >>> s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        >>> tx = fr.distributed.sum_gradients()
        >>> tx.update({"w": torch.tensor([2.0])}, tx.init(None))[0]["w"]  # one rank: unchanged
        tensor([2.])
        >>> dist.destroy_process_group()
    """
    return _all_reduce_gradients("sum", group)


def broadcast(tree: PyTree, src: int = 0, group: Any | None = None) -> PyTree:
    """``tree`` as rank ``src`` holds it, on every rank of ``group``: new tensors (the ones passed in
    are not written into).

    For the functional path of data parallelism: every rank must start from the same parameters
    (``DistributedDataParallel`` broadcasts them when it wraps a module). ``None`` leaves stay
    ``None``; every rank passes a tree of the same structure, shapes and dtypes.

    Args:
        tree: a tree of tensors (parameters, buffers, a transform state).
        src: the global rank whose values everyone gets.
        group: the process group (``None``: the default group).

    Examples:
        >>> import socket, torch, torch.distributed as dist, funcreg as fr
        >>> s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        >>> fr.distributed.broadcast({"w": torch.ones(2), "frozen": None})
        {'w': tensor([1., 1.]), 'frozen': None}
        >>> dist.destroy_process_group()
    """
    _check_group(group, "broadcast")
    group_size(group, "broadcast")
    dist = _dist()

    def received(name: str, x: Any) -> torch.Tensor:
        """A copy of leaf ``x`` holding rank ``src``'s values."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"broadcast: leaf {name!r} is a {type(x).__name__}, expected a tensor or None")
        if is_dtensor(x):
            raise TypeError(
                f"broadcast: leaf {name!r} is {layout(x)}; a DTensor is already laid out across ranks"
            )
        y = x.detach().clone()
        dist.broadcast(y, src=src, group=group)
        return y

    return map_named(received, tree)
