"""``DTensor`` leaves (FSDP2, tensor parallelism): what the core plumbing needs to treat them right.

A ``DTensor`` has its global shape, dtype and device, so funcreg's per-parameter contract applies to it
unchanged, and elementwise arithmetic on it is local. Three things need care, and each is handled once,
here:

* layout: a gradient may come with other placements than its parameter (``torch.func.grad`` through a
  tensor-parallel module gives ``Partial`` gradients of ``Shard`` parameters); :func:`match_layout`
  redistributes it to the parameter's placements once, where :func:`funcreg._src.core.base.flat` checks
  the contract, so that state, updates and parameters keep one layout;
* reductions read as numbers: ``float()`` of a ``Partial`` ``DTensor`` (a sum or norm over a sharded
  tensor) is the local shard's value; :func:`full_value` reduces it first (a collective);
* constants: ``torch.eye(n)`` beside a ``DTensor`` is refused by ``torch.distributed.tensor``;
  :func:`replicate_like` makes it a replicated ``DTensor`` on the same mesh (no communication).

None of these import ``torch.distributed.tensor`` (a few seconds): no tensor can be a ``DTensor``
before that module is loaded, so :func:`dtensor_type` looks it up in ``sys.modules``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from funcreg._src.core.errors import LeafTypeError


def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor`` when that module is loaded, else ``None``."""
    mod = sys.modules.get("torch.distributed.tensor")
    return None if mod is None else getattr(mod, "DTensor", None)


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a ``DTensor``."""
    cls = dtensor_type()
    return cls is not None and isinstance(x, cls)


def layout(x: Any) -> str:
    """``"a DTensor with placements (Shard(dim=0),) on a mesh of 2 ranks"``, or ``"a plain tensor"``."""
    if not is_dtensor(x):
        return "a plain tensor"
    return f"a DTensor with placements {tuple(x.placements)} on a mesh of {x.device_mesh.size()} ranks"


def full_value(x: Any) -> Any:
    """``x`` with its ``DTensor`` reductions done: ``x.full_tensor()`` (a plain tensor, differentiable)
    for a ``DTensor``, ``x`` itself otherwise. A collective: every rank must call it."""
    return x.full_tensor() if is_dtensor(x) else x


def replicate_like(t: torch.Tensor, ref: Any) -> torch.Tensor:
    """``t`` (the same on every rank, e.g. an identity matrix) as a replicated ``DTensor`` on ``ref``'s
    mesh when ``ref`` is a ``DTensor``; ``t`` itself otherwise. No communication."""
    if not is_dtensor(ref):
        return t
    from torch.distributed.tensor import DTensor, Replicate

    mesh = ref.device_mesh
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)


def match_layout(u: Any, p: Any, cls: type, name: Callable[[], str], who: str) -> Any:
    """The update ``u`` in the layout of its parameter ``p`` (``cls``: the ``DTensor`` class).

    Plain with plain, or a ``DTensor`` with the parameter's mesh and placements: ``u`` itself. A
    ``DTensor`` update with other placements (``Partial`` gradients of a ``Shard`` parameter) is
    redistributed to the parameter's placements (a collective, the same on every rank). A
    ``DTensor`` beside a plain tensor, or two meshes, raise ``LeafTypeError`` naming the key.
    """
    u_dt, p_dt = isinstance(u, cls), isinstance(p, cls)
    if not u_dt and not p_dt:
        return u
    if u_dt != p_dt:
        raise LeafTypeError(
            f"{who}: the update for {name()!r} is {layout(u)}, its parameter {layout(p)}: gradients and updates "
            "have their parameter's kind (shard the gradient like the parameter, or gather both)"
        )
    if u.device_mesh != p.device_mesh:
        raise LeafTypeError(
            f"{who}: the update for {name()!r} lives on another device mesh than its parameter "
            f"({u.device_mesh} vs {p.device_mesh})"
        )
    if tuple(u.placements) == tuple(p.placements):
        return u
    return u.redistribute(p.device_mesh, p.placements)


def check_same_kind(a: Any, w: torch.Tensor, what: Callable[[], str]) -> None:
    """Raises ``TypeError`` when exactly one of ``a`` (a penalty's reference, precision, ...) and the
    parameter ``w`` is a ``DTensor``: ``w - a`` would fail inside ``torch.distributed.tensor``."""
    if is_dtensor(a) != is_dtensor(w):
        raise TypeError(
            f"{what()} is {layout(a)}, the parameter {layout(w)}: give it the parameter's sharding (take it from "
            "the sharded model, e.g. fr.params_of(model) after fully_shard, or "
            "torch.distributed.tensor.distribute_tensor(t, p.device_mesh, p.placements))"
        )


def unsupported(what: str, name: str, x: torch.Tensor, err: BaseException) -> NotImplementedError:
    """The error for a rule that ``torch.distributed.tensor`` cannot run on the sharded leaf ``x``."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    return NotImplementedError(
        f"{what} cannot be computed on {name!r}, {layout(x)}: it needs an operation that "
        f"torch.distributed.tensor does not run on sharded tensors ({first}). Leave that parameter out "
        "(mask=...), or apply the penalty to a gathered copy (p.full_tensor())"
    )
