"""Sparsity targets: constraints ``at most k nonzeros``, per tensor or over the whole selection.

A target sparsity ``s`` keeps ``k = floor((1 - s) * n)`` entries: the projection onto
``{||z||_0 <= k}`` keeps the ``k`` largest magnitudes and zeroes the rest (the closest such ``z`` to
``v``), so the proximal form reaches the target exactly at every step. Per tensor (``per="tensor"``,
each tensor its own ``k``) or globally (``per="global"``: one magnitude threshold over every selected
entry, as global magnitude pruning). Ties at the threshold are broken by position (the first kept).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from funcreg._src.core.validation import check_number
from funcreg._src.penalties.base import FlatParams, Penalty, records_call, selection, zero_like_present
from funcreg._src.penalties.leaf import LeafPenalty, LeafRule
from funcreg._src.selection.resolve import MaskLike


def keep_largest(v: torch.Tensor, k: int) -> torch.Tensor:
    """``v`` with all but its ``k`` largest-magnitude entries set to 0 (the projection onto at most
    ``k`` nonzeros).

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.proxes.keep_largest(torch.tensor([0.5, -3.0, 1.0, 2.0]), 2)
        tensor([ 0., -3.,  0.,  2.])
    """
    flat = v.reshape(-1)
    if k >= flat.numel():
        return v.clone()
    if k <= 0:
        return torch.zeros_like(v)
    # scatter, not index assignment: vmap batches it
    top = torch.topk(flat.abs(), k, sorted=False).indices
    keep = torch.zeros_like(flat).scatter(0, top, torch.ones_like(flat[:k]))
    return torch.where(keep > 0, flat, torch.zeros_like(flat)).reshape(v.shape)


def _kept(n: int, sparsity: float) -> int:
    return int(math.floor((1 - sparsity) * n + 1e-9))


def _indicator(nonzero: Any, k: int, like: torch.Tensor) -> torch.Tensor:
    """0 where at most ``k`` entries are nonzero, else inf (tensor arithmetic: vmap batches it)."""
    inf = torch.full((), math.inf, dtype=like.dtype, device=like.device)
    return torch.where(nonzero > k, inf, torch.zeros_like(inf))


class GlobalSparsity(Penalty):
    """The constraint of :func:`sparsity_target` with ``per="global"``: one threshold over all entries."""

    def __init__(self, sparsity: float, mask: MaskLike | None, name: str) -> None:
        self.sparsity = sparsity
        self.mask = mask
        self.name = name

    @property
    def has_grad(self) -> bool:
        return False  # a constraint: a projection, no gradient

    def selected_flat(self, fp: FlatParams) -> list[bool]:
        return selection(self.name, self.mask, fp)

    def _present(self, fp: FlatParams) -> list[int]:
        return [i for i, k in enumerate(self.selected_flat(fp)) if k]

    def terms_flat(self, fp: FlatParams) -> list[tuple[str, torch.Tensor]]:
        idx = self._present(fp)
        if not idx:
            return [(self.name, zero_like_present(fp))]
        n = sum(fp.leaves[i].numel() for i in idx)
        nonzero = sum(torch.count_nonzero(fp.leaves[i]) for i in idx)
        return [(self.name, _indicator(nonzero, _kept(n, self.sparsity), fp.leaves[idx[0]]))]

    def why_no_prox(self, fp: FlatParams) -> str | None:
        return None

    def prox_flat(self, fp: FlatParams, step: Any) -> list[torch.Tensor | None]:
        idx = self._present(fp)
        out: list[torch.Tensor | None] = [None] * len(fp.leaves)
        if not idx:
            return out
        flat = torch.cat([fp.leaves[i].reshape(-1) for i in idx])
        kept = keep_largest(flat, _kept(flat.numel(), self.sparsity))
        start = 0
        for i in idx:
            n = fp.leaves[i].numel()
            out[i] = kept[start : start + n].reshape(fp.leaves[i].shape)
            start += n
        return out


@records_call
def sparsity_target(
    sparsity: float, per: str = "tensor", mask: MaskLike | None = None, name: str = "sparsity_target"
) -> Penalty:
    """The constraint ``at least a fraction sparsity of zeros``: per tensor, or over the selection.

    A projection only (value 0 where it holds, ``inf`` where not; no gradient): use it in the
    proximal form, which then holds exactly ``floor((1 - sparsity) * n)`` nonzeros (or fewer) after
    every step; :func:`funcreg.sparsity` reports what was reached. For a gradual target, build the
    penalty from the step's hyperparameters (``penalty=lambda h: fr.sparsity_target(float(h["s"]))``).

    Examples:
        >>> import torch, funcreg as fr
        >>> P = fr.sparsity_target(0.5)
        >>> P.prox({"w": torch.tensor([0.5, -3.0, 1.0, 2.0])}, step=0.1)["w"]
        tensor([ 0., -3.,  0.,  2.])
        >>> G = fr.sparsity_target(0.5, per="global")  # 2 of the 4 entries in all
        >>> G.prox({"a": torch.tensor([0.5, -3.0]), "b": torch.tensor([1.0, 2.0])}, step=0.1)
        {'a': tensor([ 0., -3.]), 'b': tensor([0., 2.])}
    """
    check_number("sparsity", sparsity, low=0.0, high=1.0, high_open=True, allow_tensor=False)
    if per == "global":
        return GlobalSparsity(sparsity, mask, name)
    if per != "tensor":
        raise ValueError(f"Invalid per value: {per!r} (expected 'tensor' or 'global')")

    def value(w: torch.Tensor) -> torch.Tensor:
        return _indicator(torch.count_nonzero(w), _kept(w.numel(), sparsity), w)

    def prox(v: torch.Tensor) -> torch.Tensor:
        return keep_largest(v, _kept(v.numel(), sparsity))

    rule = LeafRule(value, None, prox, differentiable=False, complex_ok=False)
    return LeafPenalty(name, (), mask, rule)


def keep_n_of_m(v: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``v`` with, in each block of ``m`` consecutive entries along its last dimension, all but the
    ``n`` largest magnitudes set to 0 (N:M structured sparsity, e.g. 2:4). The last dimension must be
    a multiple of ``m``.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.proxes.keep_n_of_m(torch.tensor([[0.1, -3.0, 2.0, 0.5, 4.0, 1.0, -1.5, 0.2]]), 2, 4)
        tensor([[ 0.0000, -3.0000,  2.0000,  0.0000,  4.0000,  0.0000, -1.5000,  0.0000]])
    """
    if v.ndim == 0 or v.shape[-1] % m:
        raise ValueError(
            f"N:M sparsity needs a last dimension that is a multiple of {m}, got shape {tuple(v.shape)}"
        )
    blocks = v.reshape(*v.shape[:-1], v.shape[-1] // m, m)
    top = torch.topk(blocks.abs(), n, dim=-1, sorted=False).indices
    keep = torch.zeros_like(blocks).scatter(-1, top, torch.ones_like(blocks[..., :n]))
    return torch.where(keep > 0, blocks, torch.zeros_like(blocks)).reshape(v.shape)


@records_call
def n_m_sparsity(n: int = 2, m: int = 4, mask: MaskLike | None = None, name: str = "n_m_sparsity") -> Penalty:
    """The constraint ``at most n nonzeros in each block of m`` along the last dimension (2:4 by
    default: the pattern sparse tensor cores run), a projection for the proximal form
    (:func:`funcreg.proxes.keep_n_of_m`). Matrices only by default. The mask of kept entries,
    ``w != 0``, is the one ``torch.sparse.to_sparse_semi_structured`` takes on a GPU.

    Examples:
        >>> import torch, funcreg as fr
        >>> w = torch.tensor([[0.1, -3.0, 2.0, 0.5], [4.0, 1.0, -1.5, 0.2]])
        >>> fr.n_m_sparsity(2, 4).prox({"w": w}, step=0.1)["w"]
        tensor([[ 0.0000, -3.0000,  2.0000,  0.0000],
                [ 4.0000,  0.0000, -1.5000,  0.0000]])
    """
    for arg, given in (("n", n), ("m", m)):
        if isinstance(given, bool) or not isinstance(given, int) or given < 1:
            raise ValueError(f"Invalid {arg} value: {given!r} (expected an int >= 1)")
    if n > m:
        raise ValueError(f"Invalid n value: {n} (at most m = {m})")

    def check(pname: str, w: torch.Tensor) -> None:
        if w.ndim == 0 or w.shape[-1] % m:
            raise ValueError(
                f"n_m_sparsity: parameter {pname!r} has shape {tuple(w.shape)}; its last dimension must be "
                f"a multiple of {m}"
            )

    def value(w: torch.Tensor) -> torch.Tensor:
        blocks = w.reshape(*w.shape[:-1], w.shape[-1] // m, m)
        worst = torch.count_nonzero(blocks, dim=-1).amax()
        return _indicator(worst, n, w)

    rule = LeafRule(
        value,
        None,
        lambda v: keep_n_of_m(v, n, m),
        check=check,
        default_select=lambda w: w.ndim >= 2,
        differentiable=False,
        complex_ok=False,
    )
    return LeafPenalty(name, (), mask, rule)
