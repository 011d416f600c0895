"""Wrappers that change where or when an inner transform applies: ``masked`` and ``apply_if_finite``."""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import torch

from funcreg._src.core import leafwise
from funcreg._src.core.base import GradientTransformation, configured, expect_state, flat
from funcreg._src.core.donation import donating, donation
from funcreg._src.core.tree import compiling, flatten, tensors_of, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import check_int
from funcreg._src.selection.mask_cache import CachedMask
from funcreg._src.selection.resolve import MaskLike


class MaskedState(NamedTuple):
    """State of :func:`masked`: the inner transform's state over the selected leaves only."""

    inner_state: Any


def _hide(leaves: list[Any], keep: list[bool]) -> list[Any]:
    return [x if k else None for x, k in zip(leaves, keep)]


def masked(inner: GradientTransformation, mask: MaskLike) -> GradientTransformation:
    """Applies ``inner`` to the selected leaves only; the others pass through bit-identical.

    The inner transform sees ``None`` in place of every unselected leaf, so it holds no state for
    them. ``mask`` is a bool tree (the structure of the parameters or a prefix of it), a
    :class:`funcreg.Selection`, or a callable ``params -> mask`` (evaluated on the params, or on the
    updates when ``update`` is called without params). A mask that does not fit the tree raises
    ``ValueError`` naming the key. The mask is resolved once per parameter structure, so a mask
    function is called again only when the names, shapes or dtypes change (see the guarantees page).

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.masked(fr.scale(0.0), {"w": True, "b": False})
        >>> params = {"w": torch.ones(1), "b": torch.ones(1)}
        >>> tx.update({"w": torch.ones(1), "b": torch.ones(1)}, tx.init(params))[0]
        {'w': tensor([0.]), 'b': tensor([1.])}
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"masked expects a GradientTransformation, got {type(inner).__name__}")
    resolve = CachedMask(mask)

    def init(params: PyTree) -> MaskedState:
        keep = resolve(params)
        leaves, spec = flatten(params)
        return MaskedState(inner_state=inner.init(unflatten(_hide(leaves, keep), spec)))

    def update(
        updates: PyTree, state: MaskedState, params: PyTree | None = None
    ) -> tuple[PyTree, MaskedState]:
        expect_state(state, MaskedState, "masked")
        f = flat(updates, params, "masked")
        keep = resolve(params if params is not None else updates)
        out, inner_state = f.update_where(inner, state.inner_state, keep, "masked inner transform's updates")
        return unflatten(out, f.spec), MaskedState(inner_state=inner_state)

    return configured(GradientTransformation(init, update), "masked", inner, mask)


class _Saved(threading.local):
    """The copies a donated ``apply_if_finite`` step keeps of its inner state, per thread: reused
    while the state holds the same tensor objects (a donated state keeps them from step to step),
    so saving is one copy into kept buffers, not an allocation per tensor."""

    tensors: list[torch.Tensor] | None = None
    copies: list[torch.Tensor] = []

    def save(self, tensors: list[torch.Tensor]) -> None:
        """Copies the values of ``tensors`` into the kept buffers (allocated afresh for new tensors)."""
        kept = self.tensors
        # ids compare identities: the kept tensors are alive, so no other object has their ids
        if kept is None or list(map(id, kept)) != list(map(id, tensors)):
            self.tensors = tensors
            self.copies = [torch.empty_like(x) for x in tensors]
        _copy_(self.copies, tensors)

    def restore(self) -> None:
        """Writes the saved values back into the tensors they were saved from."""
        assert self.tensors is not None
        _copy_(self.tensors, self.copies)


def _copy_(into: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """``a.copy_(b)`` pairwise: one foreach launch where torch has it for these tensors."""
    if into and all(type(x) is torch.Tensor for x in into):  # not a DTensor, nor wrapped
        torch._foreach_copy_(into, values)
    else:
        for a, b in zip(into, values):
            a.copy_(b)


class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite`.

    ``notfinite_count``: consecutive non-finite updates so far; ``last_finite``: whether the last update
    was finite; ``total_notfinite``: all non-finite updates seen; ``inner_state``: the wrapped state.
    """

    notfinite_count: torch.Tensor
    last_finite: torch.Tensor
    total_notfinite: torch.Tensor
    inner_state: Any


def apply_if_finite(inner: GradientTransformation, max_consecutive_errors: int) -> GradientTransformation:
    """Skips updates that contain NaN or infinity: they become zeros and the inner state is kept.

    Both the incoming updates and what ``inner`` makes of them are checked: finite gradients that the
    inner transform turns into a non-finite update (an overflowing moment, a diverged state) are
    skipped as well.

    After more than ``max_consecutive_errors`` non-finite updates in a row, updates are passed to the
    inner transform whatever they hold (as in optax), so a run that has truly diverged shows it.

    A donated step (:func:`funcreg.donated_update`) runs the inner transform in place too: before
    it, the inner state's values are copied into buffers the wrapper keeps (one copy of the inner
    state, reused from step to step, per thread), and written back when the step is skipped.
    Compiled or vmapped, both outcomes are computed and one selected, so the inner step runs pure.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.apply_if_finite(fr.sgd(0.1), max_consecutive_errors=3)
        >>> params = {"w": torch.ones(1)}
        >>> u, state = tx.update({"w": torch.tensor([float("nan")])}, tx.init(params), params)
        >>> u["w"], int(state.total_notfinite)
        (tensor([0.]), 1)
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"apply_if_finite expects a GradientTransformation, got {type(inner).__name__}")
    check_int("max_consecutive_errors", max_consecutive_errors, low=0)
    saved = _Saved()

    def init(params: PyTree) -> ApplyIfFiniteState:
        leaves, _ = flatten(params)
        device = next((p.device for p in leaves if isinstance(p, torch.Tensor)), None)
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return ApplyIfFiniteState(
            zero, torch.ones((), dtype=torch.bool, device=device), zero.clone(), inner.init(params)
        )

    def update(
        updates: PyTree, state: ApplyIfFiniteState, params: PyTree | None = None
    ) -> tuple[PyTree, ApplyIfFiniteState]:
        expect_state(state, ApplyIfFiniteState, "apply_if_finite")
        if donating() and (compiling() or torch._C._are_functorch_transforms_active()):
            # traced, both outcomes are computed and one is selected: the inner state must survive a
            # skipped step, so the inner transform runs pure
            with donation(False):
                return update(updates, state, params)
        f = flat(updates, params, "apply_if_finite")
        device = state.last_finite.device
        finite_in = leafwise.all_finite(f.present_updates()).to(device)
        decided = leafwise.concrete(finite_in)
        if isinstance(decided, bool):  # eager: run the inner transform only when its result can be used
            tried = None
            finite = finite_in
            saving = False
            if decided:
                saving = donating()  # the inner step writes into its state: keep what a skip restores
                if saving:
                    saved.save(tensors_of(state.inner_state))
                tried = inner.update(updates, state.inner_state, params)
                # what the inner transform produced counts too (a schedule or state gone non-finite)
                # (its updates' tree was checked by the inner transform: only the values are read)
                finite = leafwise.all_finite(tensors_of(tried[0])).to(device)
            notfinite_count = torch.where(finite, 0, state.notfinite_count + 1)
            apply: bool | torch.Tensor = bool(finite) or int(notfinite_count) > max_consecutive_errors
            if apply:
                new_updates, inner_state = (
                    tried if tried is not None else inner.update(updates, state.inner_state, params)
                )
            else:
                new_updates = f.tree([torch.zeros_like(u) for u in f.present_updates()])
                inner_state = state.inner_state
                if saving:
                    saved.restore()
        else:  # traced (vmap, compile): compute both and select without a host sync
            tried, tried_state = inner.update(updates, state.inner_state, params)
            t = flat(tried, None, "apply_if_finite inner")
            finite = finite_in & leafwise.all_finite(t.present_updates()).to(device)
            notfinite_count = torch.where(finite, 0, state.notfinite_count + 1)
            apply = finite | (notfinite_count > max_consecutive_errors)
            new_updates = t.tree([torch.where(apply, u, torch.zeros_like(u)) for u in t.present_updates()])
            s_new, s_spec = flatten(tried_state)
            s_old, _ = flatten(state.inner_state)
            inner_state = unflatten(
                [n if n is None else torch.where(apply, n, o) for n, o in zip(s_new, s_old)], s_spec
            )
        total = state.total_notfinite + (~finite).to(torch.int64)
        return new_updates, ApplyIfFiniteState(notfinite_count, finite, total, inner_state)

    return configured(GradientTransformation(init, update), "apply_if_finite", inner, max_consecutive_errors)
