"""Gradient accumulation: k micro-batches, one real step of the inner transform."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcreg._src.core import leafwise
from funcreg._src.core.base import GradientTransformation, configured, expect_state, flat
from funcreg._src.core.donation import donating, donation
from funcreg._src.core.steps import init_count
from funcreg._src.core.tree import check_same_spec, flatten, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import check_int


class AccumulateState(NamedTuple):
    """State of :func:`accumulate`.

    ``mini_step``: micro-steps taken since the last real step (0-d int64); ``grads``: their sum (zeros
    after a real step, ``None`` where a parameter is ``None``); ``inner_state``: the inner transform's
    state, which advances once per real step.
    """

    mini_step: torch.Tensor
    grads: PyTree
    inner_state: Any


def accumulate(inner: GradientTransformation, every: int) -> GradientTransformation:
    """Averages the gradients of ``every`` micro-steps, then runs ``inner`` once on their mean.

    The first ``every - 1`` calls return zero updates and leave ``inner``'s state alone; the
    ``every``-th returns what ``inner`` makes of the mean gradient. Everything inside ``inner``
    (weight decay, a penalty form, a schedule's step count, momentum) advances once per real step, so
    ``accumulate(chain(sgd, decoupled(P)), k)`` over k micro-batches of one size is one step on their
    concatenation (the mean loss), to rounding. Put the penalty forms that act after the optimizer
    (``decoupled``, ``proximal``) *inside* ``inner``: a form chained after ``accumulate`` would act at
    every micro-step. A ``None`` gradient leaves its parameter's sum as it is.

    Eagerly only the real step runs ``inner``; under ``vmap`` or ``torch.compile`` every call runs it
    and keeps its result where the micro-step is the last (no host synchronization, one graph).

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.accumulate(fr.sgd(1.0), every=2)
        >>> params = {"w": torch.zeros(1)}
        >>> state = tx.init(params)
        >>> u, state = tx.update({"w": torch.tensor([1.0])}, state, params)
        >>> u["w"], int(state.mini_step)
        (tensor([0.]), 1)
        >>> u, state = tx.update({"w": torch.tensor([3.0])}, state, params)  # the mean, 2.0, stepped once
        >>> u["w"], int(state.mini_step)
        (tensor([-2.]), 0)
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"accumulate expects a GradientTransformation, got {type(inner).__name__}")
    check_int("every", every, low=1)

    def init(params: PyTree) -> AccumulateState:
        leaves, spec = flatten(params)
        sums = unflatten([None if p is None else torch.zeros_like(p) for p in leaves], spec)
        return AccumulateState(init_count(params), sums, inner.init(params))

    def update(
        updates: PyTree, state: AccumulateState, params: PyTree | None = None
    ) -> tuple[PyTree, AccumulateState]:
        expect_state(state, AccumulateState, "accumulate")
        f = flat(updates, params, "accumulate")
        s = flat(state.grads, None, "accumulate state")
        check_same_spec(s.spec, f.spec, "accumulate's gradient sums", "updates")
        sums = list(s.updates)
        for i in f.index:
            if sums[i] is None:
                raise ValueError(
                    f"accumulate: parameter {f.name(i)!r} had no gradient sum (it was None at init)"
                )
            sums[i] = sums[i].add_(f.updates[i]) if donating() else sums[i] + f.updates[i]
        mini = state.mini_step + 1
        last = mini >= every
        decided = leafwise.concrete(last)
        present = set(f.index)
        mean_tree = unflatten([sums[i] / every if i in present else None for i in range(len(sums))], f.spec)
        if isinstance(decided, bool):
            if not decided:
                zeros = f.tree([torch.zeros_like(u) for u in f.present_updates()])
                return zeros, AccumulateState(mini, unflatten(sums, s.spec), state.inner_state)
            new_updates, inner_state = inner.update(mean_tree, state.inner_state, params)
            reset = [None if x is None else (x.zero_() if donating() else torch.zeros_like(x)) for x in sums]
            return new_updates, AccumulateState(torch.zeros_like(mini), unflatten(reset, s.spec), inner_state)
        # traced (vmap, compile): the inner step every call, kept where this micro-step is the last
        with donation(False):
            tried, tried_state = inner.update(mean_tree, state.inner_state, params)
        t = flat(tried, None, "accumulate inner")
        new_updates = t.tree([torch.where(last, u, torch.zeros_like(u)) for u in t.present_updates()])
        s_new, s_spec = flatten(tried_state)
        s_old, _ = flatten(state.inner_state)
        inner_state = unflatten(
            [n if n is None else torch.where(last, n, o) for n, o in zip(s_new, s_old)], s_spec
        )
        kept = [None if x is None else torch.where(last, torch.zeros_like(x), x) for x in sums]
        return new_updates, AccumulateState(
            torch.where(last, torch.zeros_like(mini), mini), unflatten(kept, s.spec), inner_state
        )

    return configured(GradientTransformation(init, update), "accumulate", inner, every)
