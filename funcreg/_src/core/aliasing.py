"""Memory shared between the tensors a donated step writes and the tensors it reads.

A donated step writes into the parameters and the state in place. Two of those that share memory
(views of one storage: ``flat[:4]`` and ``flat[2:]``), or a gradient that shares memory with one of
them (a gradient that *is* the momentum buffer), would make the step read what it has just written:
a silently wrong result. :class:`OverlapCheck` refuses them with a named error. Overlap is judged on
each tensor's address range (from its first to its last element), so two views that interleave
without touching one element (``flat[0::2]`` and ``flat[1::2]``) are refused too: conservative, never
wrong. Tensors without plain strided memory of their own (empty, sparse, meta, vmapped or
``torch.func``-wrapped ones, tensor subclasses such as DTensor) are not compared.

State tensors may share memory with each other (a transform's own business); they may not share it
with a parameter or a gradient. The state's 0-d tensors (step counts, reported values, new at every
step) are not compared.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from funcreg._src.core.tree import flatten, tensors_of, tree_names

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def memory_span(x: Any) -> tuple[int, int] | None:
    """``(first byte, one past the last byte)`` of ``x``'s elements, or ``None`` when ``x`` has no plain
    strided memory to compare (not a tensor, empty, sparse, meta, wrapped, a subclass).

    Examples:
        >>> import torch
        >>> from funcreg._src.core.aliasing import memory_span
        >>> flat = torch.zeros(6)
        >>> a, b = memory_span(flat[:4]), memory_span(flat[2:])
        >>> b[0] < a[1]  # they overlap: flat[2] and flat[3] are in both
        True
    """
    if type(x) not in _PLAIN:
        return None
    try:
        start = x.data_ptr()
    except RuntimeError:  # no storage of its own: vmapped or grad-tracked by torch.func, sparse
        return None
    if start == 0 or x.layout is not torch.strided:  # meta, or no elements
        return None
    if x.is_contiguous():
        return (start, start + x.nbytes) if x.nbytes else None
    if x.numel() == 0:
        return None
    size = x.element_size()
    if any(s < 0 for s in x.stride()):  # pragma: no cover - torch has no negative strides today
        return None
    extent = (sum((n - 1) * s for n, s in zip(x.shape, x.stride())) + 1) * size
    return start, start + extent


def _address(x: torch.Tensor) -> int:
    """Where ``x``'s elements start, or 0 for a tensor without memory of its own to compare."""
    if type(x) not in _PLAIN:
        return 0
    try:
        return x.data_ptr()
    except RuntimeError:
        return 0


class _Layout(NamedTuple):
    """Where a (params, state) pair's donated tensors lie: the merged address intervals, the tensors
    each covers, and the storages they live in."""

    starts: list[int]
    ends: list[int]
    members: list[list[tuple[int, int, str]]]
    storages: set[int]


_LAYOUTS = 8  # (params, state) pairs whose layouts are kept: optimizers stepping in turn, each its own


class OverlapCheck:
    """Refuses donated tensors that share memory (``ValueError`` naming both), for the donated steps
    of one thread.

    The spans of the donated tensors (parameters and state) are recomputed only when their tensors
    or addresses change (a donated step keeps them); the layouts of the last few distinct pairs are
    kept, so that optimizers stepping in turn (a GAN's two, a sweep's members) do not recompute each
    other's. Gradients are new at each step and are looked up against them: one set lookup for a
    gradient in a storage of its own, a binary search otherwise.
    """

    def __init__(self) -> None:
        self._layouts: OrderedDict[tuple[Any, ...], _Layout] = OrderedDict()

    def check(
        self,
        params: Any,
        state: Any,
        grads: Any = None,
        names: Sequence[str] = ("params", "state"),
        tensors: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    ) -> None:
        """Raises where a parameter overlaps another parameter or a state tensor, or a gradient
        overlaps either. ``names`` are how the error calls the two trees; ``tensors``:
        ``(tensors_of(params), tensors_of(state))`` where the caller has them already."""
        # the state's 0-d tensors (step counts, reported values) are new at every step and hold no
        # parameter's memory: leaving them out keeps the key, and the spans, from changing each step
        param_tensors, state_tensors = (tensors_of(params), tensors_of(state)) if tensors is None else tensors
        donated = param_tensors + [x for x in state_tensors if x.ndim]
        if donated and torch._C._functorch.is_functorch_wrapped_tensor(donated[0]):
            return  # inside vmap or grad: the step is pure there (see funcreg._src.kernels.update)
        # ids and addresses: a tensor freed and another allocated in its place has a new address or id
        key = (tuple(map(id, donated)), tuple(map(_address, donated)))
        layout = self._layouts.get(key)
        if layout is None:
            layout = _rebuild(params, state, names)
            self._layouts[key] = layout
            while len(self._layouts) > _LAYOUTS:
                self._layouts.popitem(last=False)
        else:
            self._layouts.move_to_end(key)
        if grads is not None and layout.starts:
            _check_grads(grads, layout)


def _rebuild(params: Any, state: Any, names: Sequence[str]) -> _Layout:
    """The address ranges of the parameters and the state (0-d counters aside) and the storages they
    live in, refusing any two that overlap, naming both."""
    spans: list[tuple[int, int, bool, str]] = []
    storages: set[int] = set()
    for tree, what, is_param in ((params, names[0], True), (state, names[1], False)):
        leaves, _ = flatten(tree)
        for name, leaf in zip(tree_names(tree), leaves):
            if not is_param and isinstance(leaf, torch.Tensor) and leaf.ndim == 0:
                continue  # as in check's key
            span = memory_span(leaf)
            if span is not None:
                spans.append((span[0], span[1], is_param, f"{what} {name!r}"))
                storages.add(leaf.untyped_storage().data_ptr())
    spans.sort()
    # sweep: every span still open when the next one starts overlaps it
    open_spans: list[tuple[int, bool, str]] = []
    for start, end, is_param, label in spans:
        open_spans = [o for o in open_spans if o[0] > start]
        for _, other_is_param, other in open_spans:
            if is_param or other_is_param:
                raise ValueError(
                    f"cannot donate: {other} and {label} share memory (views of one storage); a donated "
                    "step would read what it has just written. Give each its own tensor (.clone()), or "
                    "use the pure path"
                )
        open_spans.append((end, is_param, label))
    # merged, for the gradients: disjoint intervals, each with the tensors it covers
    layout = _Layout([], [], [], storages)
    for start, end, _, label in spans:
        if layout.ends and start < layout.ends[-1]:
            layout.ends[-1] = max(layout.ends[-1], end)
            layout.members[-1].append((start, end, label))
        else:
            layout.starts.append(start)
            layout.ends.append(end)
            layout.members.append([(start, end, label)])
    return layout


def _check_grads(grads: Any, layout: _Layout) -> None:
    """Refuses a gradient that shares memory with a parameter or a state tensor: the donated
    step would read it after writing into it."""
    leaves, _ = flatten(grads)
    storages = layout.storages
    for i, leaf in enumerate(leaves):
        # the common case in one lookup: a gradient in a storage of its own (autograd's)
        if type(leaf) not in _PLAIN:
            continue
        try:
            if leaf.untyped_storage().data_ptr() not in storages:
                continue
        except RuntimeError:  # no storage of its own (vmapped, sparse)
            continue
        span = memory_span(leaf)
        if span is None:
            continue
        k = bisect.bisect_right(layout.starts, span[0]) - 1
        hit = k if k >= 0 and layout.ends[k] > span[0] else None
        if hit is None and k + 1 < len(layout.starts) and layout.starts[k + 1] < span[1]:
            hit = k + 1
        if hit is not None:
            owner = next(m for a, b, m in layout.members[hit] if a < span[1] and span[0] < b)
            raise ValueError(
                f"cannot donate: gradient {tree_names(grads)[i]!r} shares memory with {owner}, which "
                "the step writes; pass a gradient of its own (.clone())"
            )
