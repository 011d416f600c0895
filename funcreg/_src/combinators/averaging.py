"""Weight averaging (EMA, SWA) as a transform: the averaged weights live in the state."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcreg._src.core import leafwise
from funcreg._src.core.base import GradientTransformation, configured, expect_state, find_one_state, flat
from funcreg._src.core.steps import init_count
from funcreg._src.core.tree import check_same_spec, flatten, tree_names, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import check_bool, check_int, check_number


class AverageState(NamedTuple):
    """State of :func:`average_weights`: ``n_averaged`` (0-d int64, as AveragedModel's) averages taken,
    ``averaged`` the averaged parameters (``None`` where a parameter is), ``inner_state`` the inner
    transform's, and ``weight`` (0-d float64) the weight the latest parameters entered the average
    with (``1 - decay_t``; 1 for a copy), which :func:`average_buffers` uses for the buffers."""

    n_averaged: torch.Tensor
    averaged: PyTree
    inner_state: Any
    weight: torch.Tensor


def _decay_at(
    n: Any, decay: float, warmup: bool, gamma: float, power: float, min_decay: float, after: int
) -> Any:
    """timm ``ModelEmaV3.get_decay`` at its ``step = n + 1`` (``n`` averages taken before this one):
    0 (a copy) until ``after`` updates have passed, then ``decay``, or with the warm-up
    ``1 - (1 + s / gamma) ** -power`` clipped to ``[min_decay, decay]``, ``s = n - after``."""
    s = n - after
    if isinstance(s, torch.Tensor):
        s = s.to(torch.float64)
        if warmup:
            ramp = 1 - (1 + torch.clamp(s, min=0) / gamma) ** -power
            value = torch.clamp(torch.clamp(ramp, max=decay), min=min_decay)
        else:
            value = torch.full_like(s, decay)
        return torch.where(s <= 0, torch.zeros_like(value), value)
    if s <= 0:
        return 0.0
    if not warmup:
        return decay
    return max(min(1 - (1 + s / gamma) ** -power, decay), min_decay)


def average_weights(
    inner: GradientTransformation,
    decay: float | None = None,
    *,
    warmup: bool = False,
    warmup_gamma: float = 1.0,
    warmup_power: float = 2 / 3,
    min_decay: float = 0.0,
    update_after_step: int = 0,
) -> GradientTransformation:
    """``inner``, and an average of the parameters it produces, kept in the state.

    After each update the new parameters ``w = params + update`` enter the average, as
    ``torch.optim.swa_utils.AveragedModel.update_parameters(model)`` called after every
    ``optimizer.step()``: the first one is copied, then with ``decay`` the exponential moving average
    ``a <- decay * a + (1 - decay) * w`` (``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))``),
    without it the running mean ``a <- a + (w - a) / (n + 1)`` (SWA, AveragedModel's default). The
    updates are ``inner``'s, unchanged. Read the average with :func:`averaged_params` (for evaluation
    and checkpoints).

    The EMA's decay can follow timm's ``ModelEmaV3`` (``update(model, step=num_updates)`` after each
    step): ``warmup=True`` ramps it as ``1 - (1 + s / warmup_gamma) ** -warmup_power``, clipped to
    ``[min_decay, decay]``, ``s`` the updates since ``update_after_step`` (the average copies the
    weights until then). Buffers (BatchNorm statistics) are not parameters: average them beside the
    weights with :func:`average_buffers`, or recompute them for the average with
    ``torch.optim.swa_utils.update_bn``.

    Args:
        inner: the transform whose parameters are averaged.
        decay: the EMA's decay in ``[0, 1)``; ``None``: the running mean (SWA).
        warmup: ramp the decay up as timm's ``use_warmup`` (needs ``decay``).
        warmup_gamma: timm's ``warmup_gamma``, ``> 0``.
        warmup_power: timm's ``warmup_power``, ``> 0`` (2/3 for long runs, 3/4 for shorter ones).
        min_decay: the lowest decay after the first averages (timm's ``min_decay``), in ``[0, decay]``.
        update_after_step: updates at which the average only copies the weights (timm's).

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
        >>> tx = fr.average_weights(fr.sgd(1.0), decay=0.9999, warmup=True)  # timm's ModelEmaV3 warm-up
        >>> state = tx.init(params)
        >>> for g in (-2.0, -2.0):
        ...     u, state = tx.update({"w": torch.tensor([g])}, state, params)
        ...     params = fr.apply_updates(params, u)
        >>> round(1 - float(state.weight), 4)  # the decay at the second update: 1 - 2 ** (-2/3)
        0.37
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"average_weights expects a GradientTransformation, got {type(inner).__name__}")
    if decay is not None:
        check_number("decay", decay, low=0.0, high=1.0, high_open=True, allow_tensor=False)
    check_bool("warmup", warmup)
    check_number("warmup_gamma", warmup_gamma, low=0.0, low_open=True, allow_tensor=False)
    check_number("warmup_power", warmup_power, low=0.0, low_open=True, allow_tensor=False)
    check_int("update_after_step", update_after_step, low=0)
    check_number("min_decay", min_decay, low=0.0, high=1.0, high_open=True, allow_tensor=False)
    if decay is None and (warmup or min_decay or update_after_step):
        raise ValueError(
            "warmup, min_decay and update_after_step shape the EMA's decay: give decay= (without it the "
            "average is the running mean of SWA)"
        )
    if decay is not None and min_decay > decay:
        raise ValueError(f"Invalid min_decay value: {min_decay!r} (must be <= decay, {decay!r})")

    def init(params: PyTree) -> AverageState:
        leaves, spec = flatten(params)
        averaged = unflatten([None if p is None else p.detach().clone() for p in leaves], spec)
        count = init_count(params)
        weight = torch.ones((), dtype=torch.float64, device=count.device)
        return AverageState(count, averaged, inner.init(params), weight)

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
        n = leafwise.concrete(state.n_averaged)
        if decay is None:  # the running mean: w enters with weight 1 / (n + 1), a copy at n == 0
            weight: Any = (
                1.0 / (n + 1) if not isinstance(n, torch.Tensor) else 1.0 / (n + 1).to(torch.float64)
            )
        else:
            weight = 1 - _decay_at(n, decay, warmup, warmup_gamma, warmup_power, min_decay, update_after_step)
        out = list(a_leaves)
        for i in u.index:
            assert u.params is not None  # needs_params above
            w, a = u.params[i] + u.updates[i], a_leaves[i]
            if decay is None:  # AveragedModel's own formula, a + (w - a) / (n + 1), a copy at n == 0
                if isinstance(n, torch.Tensor):
                    out[i] = torch.where(n == 0, w, a + (w - a) / (n + 1).to(a.dtype))
                else:
                    out[i] = w if n == 0 else a + (w - a) / (n + 1)
            else:
                out[i] = _blend(a, w, weight)
        new_weight = torch.as_tensor(weight, dtype=torch.float64, device=state.weight.device)
        return new_updates, AverageState(
            state.n_averaged + 1, unflatten(out, a_spec), inner_state, new_weight
        )

    return configured(
        GradientTransformation(init, update),
        "average_weights",
        inner,
        decay=decay,
        warmup=warmup or None,
        warmup_gamma=None if warmup_gamma == 1.0 else warmup_gamma,
        warmup_power=None if warmup_power == 2 / 3 else warmup_power,
        min_decay=min_decay or None,
        update_after_step=update_after_step or None,
    )


def _blend(a: torch.Tensor, w: torch.Tensor, weight: Any) -> torch.Tensor:
    """``a + weight * (w - a)``: exactly ``w`` where ``weight`` is 1 (a copy), ``torch.lerp`` else."""
    if isinstance(weight, torch.Tensor):
        moved = torch.lerp(a, w, weight.to(a.dtype))
        return torch.where(weight == 1, w, moved)
    return w if weight == 1 else torch.lerp(a, w, weight)


def average_buffers(averaged: PyTree, buffers: PyTree, state: Any) -> PyTree:
    """The averaged buffers after a step: each floating buffer enters the average with the weight
    the parameters just entered with (the :class:`AverageState` in ``state``), the others (a
    BatchNorm's ``num_batches_tracked``) are copied, as timm's ``ModelEmaV3`` does for the whole
    ``state_dict``. A pure function: ``averaged`` and ``buffers`` are only read.

    Call it after each step with the step's new buffers, starting from a copy of the initial ones;
    evaluate the average with :func:`averaged_params` and these.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.average_weights(fr.sgd(0.1), decay=0.5)
        >>> params, buffers = {"w": torch.zeros(1)}, {"running_mean": torch.zeros(1)}
        >>> state, averaged = tx.init(params), dict(buffers)
        >>> for mean in (2.0, 4.0):
        ...     _, state = tx.update({"w": torch.zeros(1)}, state, params)
        ...     averaged = fr.average_buffers(averaged, {"running_mean": torch.tensor([mean])}, state)
        >>> averaged["running_mean"]  # copied at the first step, then 0.5 * 2 + 0.5 * 4
        tensor([3.])
    """
    weight = find_one_state(state, AverageState, "average_buffers").weight
    a_leaves, a_spec = flatten(averaged)
    b_leaves, b_spec = flatten(buffers)
    check_same_spec(a_spec, b_spec, "the averaged buffers", "buffers")
    out: list[Any] = []
    for name, (a, b) in zip(tree_names(averaged), zip(a_leaves, b_leaves)):
        if a is None or b is None:
            out.append(None if b is None else b.clone())
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(
                f"buffer {name!r}: the average is {tuple(a.shape)} {a.dtype}, the buffer {tuple(b.shape)} {b.dtype}"
            )
        out.append(_blend(a, b, weight) if b.is_floating_point() else b.clone())
    return unflatten(out, a_spec)


def averaged_params(state: Any) -> PyTree:
    """The averaged parameters held by the :class:`AverageState` inside ``state`` (a chain's too).

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.chain(fr.clip_by_global_norm(1.0), fr.average_weights(fr.sgd(0.1)))
        >>> sorted(fr.averaged_params(tx.init({"w": torch.zeros(2)})))
        ['w']
    """
    return find_one_state(state, AverageState, "averaged_params").averaged
