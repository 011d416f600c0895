"""Weight averaging (EMA, SWA) as a transform: the averaged weights live in the state."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcreg._src.core import leafwise
from funcreg._src.core.base import GradientTransformation, configured, expect_state, find_one_state, flat
from funcreg._src.core.steps import init_count
from funcreg._src.core.tree import check_same_spec, flatten, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import check_number


class AverageState(NamedTuple):
    """State of :func:`average_weights`: ``n_averaged`` (0-d int64, as AveragedModel's) averages taken, ``averaged`` the
    averaged parameters (``None`` where a parameter is), ``inner_state`` the inner transform's."""

    n_averaged: torch.Tensor
    averaged: PyTree
    inner_state: Any


def average_weights(inner: GradientTransformation, decay: float | None = None) -> GradientTransformation:
    """``inner``, and an average of the parameters it produces, kept in the state.

    After each update the new parameters ``w = params + update`` enter the average, as
    ``torch.optim.swa_utils.AveragedModel.update_parameters(model)`` called after every
    ``optimizer.step()``: the first one is copied, then with ``decay`` the exponential moving average
    ``a <- decay * a + (1 - decay) * w`` (``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))``),
    without it the running mean ``a <- a + (w - a) / (n + 1)`` (SWA, AveragedModel's default). The
    updates are ``inner``'s, unchanged. Read the average with :func:`averaged_params` (for evaluation
    and checkpoints); buffers such as BatchNorm statistics are not averaged
    (``torch.optim.swa_utils.update_bn`` recomputes them).

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.average_weights(fr.sgd(1.0), decay=0.5)
        >>> params = {"w": torch.tensor([0.0])}
        >>> state = tx.init(params)
        >>> for g in (-2.0, -2.0):
        ...     u, state = tx.update({"w": torch.tensor([g])}, state, params)
        ...     params = fr.apply_updates(params, u)
        >>> params["w"], fr.averaged_params(state)["w"]  # w is 2 then 4: the average 2, then 0.5 * 2 + 0.5 * 4
        (tensor([4.]), tensor([3.]))
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"average_weights expects a GradientTransformation, got {type(inner).__name__}")
    if decay is not None:
        check_number("decay", decay, low=0.0, high=1.0, high_open=True, allow_tensor=False)

    def init(params: PyTree) -> AverageState:
        leaves, spec = flatten(params)
        averaged = unflatten([None if p is None else p.detach().clone() for p in leaves], spec)
        return AverageState(init_count(params), averaged, inner.init(params))

    def update(
        updates: PyTree, state: AverageState, params: PyTree | None = None
    ) -> tuple[PyTree, AverageState]:
        expect_state(state, AverageState, "average_weights")
        flat(updates, params, "average_weights", needs_params=True)
        # donated, the inner step writes its own state in place; the parameters move only after this
        # returns (apply_updates), so w = params + update is read here
        new_updates, inner_state = inner.update(updates, state.inner_state, params)
        u = flat(new_updates, params, "average_weights inner")
        a_leaves, a_spec = flatten(state.averaged)
        check_same_spec(a_spec, u.spec, "average_weights' averaged params", "updates")
        n = state.n_averaged
        first = leafwise.concrete(n == 0)
        out = list(a_leaves)
        for i in u.index:
            assert u.params is not None  # needs_params above
            w = u.params[i] + u.updates[i]
            a = a_leaves[i]
            if decay is not None:
                moved = torch.lerp(a, w, 1 - decay)
            else:
                moved = a + (w - a) / (n + 1).to(a.dtype)
            out[i] = (w if first else moved) if isinstance(first, bool) else torch.where(n == 0, w, moved)
        return new_updates, AverageState(n + 1, unflatten(out, a_spec), inner_state)

    return configured(GradientTransformation(init, update), "average_weights", inner, decay=decay)


def averaged_params(state: Any) -> PyTree:
    """The averaged parameters held by the :class:`AverageState` inside ``state`` (a chain's too).

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.chain(fr.clip_by_global_norm(1.0), fr.average_weights(fr.sgd(0.1)))
        >>> sorted(fr.averaged_params(tx.init({"w": torch.zeros(2)})))
        ['w']
    """
    return find_one_state(state, AverageState, "averaged_params").averaged
