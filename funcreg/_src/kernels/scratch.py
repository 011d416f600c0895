"""Temporaries a donated kernel writes into, kept between its steps.

``torch.optim``'s foreach Adam allocates its denominator ``sqrt(nu)`` at every step, and with a
coupled ``weight_decay`` a decayed gradient too. For a large tensor the allocator hands that memory
back to the system when the step ends, and the next step faults every page in again: on a CPU this
costs as much as the arithmetic. A donated kernel instead keeps one set of buffers per parameter
structure and writes the same values into them (``torch.sqrt(x, out=b)`` computes what
``torch._foreach_sqrt`` does, to the bit). Small tensors are cheap to allocate and many of them are
cheaper in one foreach call than in a loop, so only tensors of at least :data:`LARGE` elements get a
kept buffer.

The cost is memory: between steps a kernel holds one buffer per large parameter (torch.optim
allocates the same buffer at every step, so the peak is unchanged), freed with the transform.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

LARGE = 1 << 16  # elements: 256 KiB of float32, past where the allocator maps memory afresh
_SETS = 8  # buffer sets kept per kernel (one per parameter structure and group), oldest dropped


class Scratch:
    """Buffer sets for a kernel's temporaries, one per structure of the tensors they stand for.

    :meth:`take` hands out the set for a list of tensors (``None`` where a tensor is small) and
    removes it while in use, so two threads stepping the same transform never share one;
    :meth:`give` puts it back.

    Examples:
        >>> import torch
        >>> from funcreg._src.kernels.scratch import Scratch, unary_into
        >>> scratch, xs = Scratch(), [torch.full((1 << 16,), 4.0), torch.full((3,), 9.0)]
        >>> bufs = scratch.take(xs)
        >>> [b is None for b in bufs]  # only the large tensor gets a kept buffer
        [False, True]
        >>> out = unary_into(torch.sqrt, torch._foreach_sqrt, xs, bufs)
        >>> out[0] is bufs[0], float(out[0][0]), float(out[1][0])
        (True, 2.0, 3.0)
        >>> scratch.give(xs, bufs)
        >>> scratch.take(xs)[0] is bufs[0]  # the next step gets the same buffer
        True
    """

    def __init__(self, large: int = LARGE) -> None:
        self.large = large  # the fewest elements a tensor needs to get a kept buffer
        # no lock (a transform may be built inside a compiled function): each dict operation is
        # atomic under the GIL, and a set is popped while in use
        self._sets: OrderedDict[tuple, list[torch.Tensor | None]] = OrderedDict()

    @staticmethod
    def _key(like: list[torch.Tensor]) -> tuple:
        return tuple((t.shape, t.stride(), t.dtype, t.device) for t in like)

    def take(self, like: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The buffers for ``like`` (kept ones, else new), ``None`` for its small tensors."""
        large = self.large
        if all(t.numel() < large for t in like):
            return [None] * len(like)  # nothing to keep (many small tensors): no key to build
        kept = self._sets.pop(self._key(like), None)
        if kept is not None:
            return kept
        # in the tensors' own layout (a channels-last or transposed parameter, and its moments)
        return [torch.empty_like(t) if t.numel() >= self.large else None for t in like]

    def give(self, like: list[torch.Tensor], bufs: list[torch.Tensor | None]) -> None:
        """Keep ``bufs`` (from :meth:`take` for the same ``like``) for the next step."""
        if all(b is None for b in bufs):
            return
        self._sets[self._key(like)] = bufs
        while len(self._sets) > _SETS:
            try:
                self._sets.popitem(last=False)
            except KeyError:  # emptied by another thread meanwhile
                break


def unary_into(
    op: Callable[..., torch.Tensor],
    foreach_op: Callable[..., tuple[torch.Tensor, ...]],
    xs: list[torch.Tensor],
    bufs: list[torch.Tensor | None],
) -> list[torch.Tensor]:
    """``foreach_op(xs)``, written into ``bufs`` where a buffer is given (``op(x, out=b)``)."""
    return _into(lambda i, b: op(xs[i], out=b), lambda idx: foreach_op([xs[i] for i in idx]), bufs)


def add_into(
    xs: list[torch.Tensor], ys: list[torch.Tensor], alpha: float, bufs: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    """``torch._foreach_add(xs, ys, alpha=alpha)``, written into ``bufs`` where a buffer is given."""
    return _into(
        lambda i, b: torch.add(xs[i], ys[i], alpha=alpha, out=b),
        lambda idx: torch._foreach_add([xs[i] for i in idx], [ys[i] for i in idx], alpha=alpha),
        bufs,
    )


def _into(
    one: Callable[[int, torch.Tensor], torch.Tensor],
    many: Callable[[list[int]], tuple[torch.Tensor, ...]],
    bufs: list[torch.Tensor | None],
) -> list[torch.Tensor]:
    """The results of an elementwise op, written by ``one`` into the kept buffers where a tensor
    has one, and computed by ``many`` (one foreach call) for the small tensors without."""
    out: list[torch.Tensor | None] = list(bufs)
    small = []
    for i, b in enumerate(bufs):
        if b is None:
            small.append(i)
        else:
            one(i, b)
    if small:
        for i, r in zip(small, many(small)):
            out[i] = r
    return out  # type: ignore[return-value]  # every None was filled
