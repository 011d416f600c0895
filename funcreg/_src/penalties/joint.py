"""A group lasso whose groups span several tensors (*joint groups*).

A family of ``G`` joint groups is described by *pieces* ``(name, axis, block)``: along ``axis`` of
the tensor ``name`` the slices come in consecutive blocks of ``block``, and block ``b`` belongs to
group ``b % G``. So the query rows of attention head ``h`` (``block = head_dim``, ``G = num_heads``)
are the block ``h``, and in ``nn.MultiheadAttention``'s packed ``in_proj_weight`` (``3E x E``: the
query, key and value rows stacked) head ``h`` owns the blocks ``h``, ``G + h`` and ``2G + h``.

:func:`joint_group_lasso` is ``coeff * sum_g sqrt(|g|) * ||g||_2`` over such groups, one norm per group
over all its pieces; its prox is the block soft threshold of each whole group. The attention heads
of a model are found in :mod:`funcreg._src.penalties.heads`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from funcreg._src.core.errors import LeafTypeError
from funcreg._src.penalties.base import (
    Coefficient,
    FlatParams,
    Penalty,
    check_coefficient,
    is_scalar,
    records_call,
    zero_like_present,
)
from funcreg._src.penalties.leaf import in_dtype_of
from funcreg._src.selection.named_params import _suggest

Piece = tuple[str, int, int]
"""``(parameter name, axis, block)``: one tensor's share of a family of joint groups."""

PieceSpec = Union[tuple[int, int], int]


@dataclass(frozen=True)
class JointFamily:
    """``num_groups`` joint groups made of ``pieces``; ``label`` says what they are, for messages."""

    label: str
    num_groups: int
    pieces: tuple[Piece, ...]


def _as_groups(w: torch.Tensor, axis: int, block: int, groups: int) -> torch.Tensor:
    """``w`` as a ``(groups, elements)`` matrix: row ``g`` holds the blocks ``g, g + groups, ...``."""
    moved = w.movedim(axis, 0)
    return moved.reshape(-1, groups, block, moved[0].numel()).transpose(0, 1).reshape(groups, -1)


def _scaled(w: torch.Tensor, axis: int, block: int, groups: int, factor: torch.Tensor) -> torch.Tensor:
    """``w`` with every element of group ``g`` multiplied by ``factor[g]``."""
    moved = w.movedim(axis, 0)
    blocks = moved.reshape(-1, groups, block, moved[0].numel())
    out = blocks * factor.to(w.dtype).view(1, groups, 1, 1)
    return out.reshape(moved.shape).movedim(0, axis)


def joint_norms(leaves: Sequence[torch.Tensor], family: JointFamily) -> tuple[torch.Tensor, int]:
    """The 2-norm of each group over all its pieces (overflow-safe, as ``proxes.group_norms``) and
    the number of elements of one group."""
    dtype = functools.reduce(torch.promote_types, [w.dtype for w in leaves])
    mats = [
        _as_groups(w, axis, block, family.num_groups).to(dtype)
        for w, (_, axis, block) in zip(leaves, family.pieces)
    ]
    m = mats[0] if len(mats) == 1 else torch.cat(mats, dim=1)
    scale = torch.amax(torch.abs(m), dim=1, keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return safe.view(-1) * torch.linalg.vector_norm(m / safe, dim=1), m.shape[1]


def _check_piece(label: str, piece: Piece, w: torch.Tensor, groups: int) -> None:
    name, axis, block = piece
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        what = type(w).__name__ if not isinstance(w, torch.Tensor) else f"a {w.dtype} tensor"
        raise LeafTypeError(f"{label}: parameter {name!r} is {what}, expected a real floating-point tensor")
    if not -w.ndim <= axis < w.ndim:
        raise ValueError(f"{label}: parameter {name!r} of shape {tuple(w.shape)} has no axis {axis}")
    if w.shape[axis] % (block * groups):
        raise ValueError(
            f"{label}: parameter {name!r} has {w.shape[axis]} slices along axis {axis}, expected a "
            f"multiple of {groups} groups x {block} (blocks of {block}, block b in group b % {groups})"
        )


class JointGroupLasso(Penalty):
    """``coeff * sum_g sqrt(|g|) * ||g||_2`` over families of joint groups; see :func:`joint_group_lasso`."""

    def __init__(self, name: str, coeff: Coefficient, families: Sequence[JointFamily]) -> None:
        self.name = name
        self.coeff = coeff
        self.families = tuple(families)
        names = [piece[0] for fam in self.families for piece in fam.pieces]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(
                f"penalty {name!r}: the groups overlap on {', '.join(repr(n) for n in twice)} (each tensor may "
                "belong to one family of groups; a separable prox needs disjoint groups)"
            )
        self._names = set(names)

    def _index(self, fp: FlatParams) -> dict[str, int]:
        index = {n: i for i, n in enumerate(fp.names)}
        for fam in self.families:
            for name, _, _ in fam.pieces:
                if name not in index:
                    raise ValueError(
                        f"penalty {self.name!r}: {fam.label} include parameter {name!r}, which these "
                        f"parameters do not have{_suggest(name, fp.names)}"
                    )
        return index

    def selected_flat(self, fp: FlatParams) -> list[bool]:
        self._index(fp)
        return [n in self._names and leaf is not None for n, leaf in zip(fp.names, fp.leaves)]

    def _present(self, fp: FlatParams) -> list[tuple[JointFamily, list[int]]]:
        """The families whose tensors are all here, with their leaves' indices; a family with only
        some of its tensors here (the others absent: another param group's) raises."""
        index = self._index(fp)
        out = []
        for fam in self.families:
            idx = [index[name] for name, _, _ in fam.pieces]
            present = [fp.leaves[i] is not None for i in idx]
            if not any(present):
                continue
            if not all(present):
                missing = [fam.pieces[j][0] for j, p in enumerate(present) if not p]
                raise ValueError(
                    f"penalty {self.name!r}: {fam.label} span {', '.join(repr(n) for n in missing)}, absent "
                    "from this call (another param group's, or left out of one term of a sum of penalties); "
                    "one group's norm needs all its tensors: keep them in one param group, and apply a "
                    "quadratic term added to this penalty to all of them alike"
                )
            for j, i in enumerate(idx):
                _check_piece(f"penalty {self.name!r}", fam.pieces[j], fp.leaves[i], fam.num_groups)
            devices = {fp.leaves[i].device for i in idx}
            if len(devices) > 1:
                raise ValueError(
                    f"penalty {self.name!r}: {fam.label} span tensors on several devices {devices}"
                )
            out.append((fam, idx))
        return out

    def _coeff(self, like: torch.Tensor) -> Any:
        return in_dtype_of(self.coeff, like)

    def terms_flat(self, fp: FlatParams) -> list[tuple[str, torch.Tensor]]:
        total = None
        for fam, idx in self._present(fp):
            norms, size = joint_norms([fp.leaves[i] for i in idx], fam)
            v = self._coeff(norms) * math.sqrt(size) * norms.sum()
            total = v if total is None else total + v
        return [(self.name, zero_like_present(fp) if total is None else total)]

    def _factors(self, fp: FlatParams, factor: Any) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = [None] * len(fp.leaves)
        for fam, idx in self._present(fp):
            leaves = [fp.leaves[i] for i in idx]
            norms, size = joint_norms(leaves, fam)
            f = factor(norms, self._coeff(norms) * math.sqrt(size))
            for i, w, (_, axis, block) in zip(idx, leaves, fam.pieces):
                out[i] = _scaled(w, axis, block, fam.num_groups, f)
        return out

    def grad_flat(self, fp: FlatParams) -> list[torch.Tensor | None]:
        def factor(norms: torch.Tensor, weight: Any) -> torch.Tensor:
            safe = torch.where(norms > 0, norms, torch.ones_like(norms))
            return torch.where(norms > 0, weight / safe, torch.zeros_like(norms))

        return self._factors(fp, factor)

    def why_no_prox(self, fp: FlatParams) -> str | None:
        return None

    def prox_flat(self, fp: FlatParams, step: Any) -> list[torch.Tensor | None]:
        def factor(norms: torch.Tensor, weight: Any) -> torch.Tensor:
            safe = torch.where(norms > 0, norms, torch.ones_like(norms))
            shrink = torch.clamp(1 - step * weight / safe, min=0)
            return torch.where(norms > 0, shrink, torch.zeros_like(norms))

        return self._factors(fp, factor)


def check_scalar_coeff(coeff: Coefficient, who: str) -> None:
    check_coefficient("coeff", coeff)
    if not is_scalar(coeff) or (isinstance(coeff, torch.Tensor) and coeff.ndim != 0):
        raise TypeError(
            f"{who}: coeff must be one number or a 0-d tensor (a group spans several tensors, so a "
            f"coefficient per tensor has no meaning), got {coeff!r}"
        )


def _pieces(pieces: Any, who: str) -> tuple[Piece, ...]:
    if not isinstance(pieces, Mapping) or not pieces:
        raise TypeError(f"{who}: pieces must be a non-empty dict {{name: (axis, block)}}, got {pieces!r}")
    out = []
    for name, spec in pieces.items():
        pair = (spec, 1) if not isinstance(spec, tuple) else spec
        if (
            not isinstance(name, str)
            or len(pair) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) for x in pair)
            or pair[1] < 1
        ):
            raise TypeError(
                f"{who}: pieces[{name!r}] must be an axis or (axis, block) with an int block >= 1, got {spec!r}"
            )
        out.append((name, pair[0], pair[1]))
    return tuple(out)


@records_call
def joint_group_lasso(
    coeff: Coefficient,
    pieces: Mapping[str, PieceSpec],
    num_groups: int,
    name: str = "joint_group_lasso",
) -> Penalty:
    """Group lasso over groups that span several tensors: ``coeff * sum_g sqrt(|g|) * ||g||_2``.

    ``pieces`` maps parameter names to ``axis`` or ``(axis, block)``: along ``axis`` of that tensor the
    slices come in blocks of ``block`` (default 1) consecutive ones, and block ``b`` belongs to group
    ``b % num_groups``. ``||g||_2`` is one norm over all the elements of group ``g`` in every tensor,
    ``|g|`` their number. The prox shrinks each whole group by ``max(0, 1 - step*coeff*sqrt(|g|) / ||g||)``
    (block soft thresholding), so a group becomes zero in all its tensors at once; the gradient is 0 on a
    zero group. :func:`head_lasso` is this penalty over the heads of attention layers.

    A tensor along ``axis`` needs a multiple of ``num_groups * block`` slices (``ValueError`` otherwise);
    a name the parameters lack raises ``ValueError``. ``coeff`` is one number or 0-d tensor.

    Examples:
        >>> import torch, funcreg as fr
        >>> # unit j of a layer: row j of its weight and entry j of its bias, one group each
        >>> P = fr.joint_group_lasso(0.5, {"w": 0, "b": 0}, num_groups=2)
        >>> params = {"w": torch.tensor([[3.0, 0.0], [0.1, 0.0]]), "b": torch.tensor([4.0, 0.1])}
        >>> P.prox(params, step=1.0)  # norms 5 and 0.141, threshold 0.5 * sqrt(3) = 0.866
        {'w': tensor([[2.4804, 0.0000],
                [0.0000, 0.0000]]), 'b': tensor([3.3072, 0.0000])}
    """
    who = "joint_group_lasso"
    check_scalar_coeff(coeff, who)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"Invalid num_groups value: {num_groups!r} (expected an int >= 1)")
    family = JointFamily(f"the {num_groups} joint groups", num_groups, _pieces(pieces, who))
    return JointGroupLasso(name, coeff, [family])


__all__ = [
    "JointGroupLasso",
    "Piece",
    "joint_group_lasso",
]
