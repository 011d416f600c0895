"""Sign-based building blocks: Rprop's adaptive step sizes (``torch.optim.Rprop``) and Lion.

Both produce updates whose size does not depend on the gradient's magnitude, only on its sign.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcreg._src.core import leafwise
from funcreg._src.core.base import GradientTransformation, begin, per_param_zeros
from funcreg._src.core.steps import advance_steps, init_count, per_param_counts
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import check_number, check_rate, schedule_value
from funcreg._src.transforms.block_utils import reject_complex, with_config


class ScaleByRpropState(NamedTuple):
    """State of :func:`scale_by_rprop`: updates done, the previous gradient (torch's ``prev``, zeroed
    where the sign flipped), each coordinate's step size (``step_size``) and per-parameter steps."""

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax
    prev: PyTree
    step_size: PyTree
    steps: PyTree


def _pair(name: str, value: Any) -> tuple[float, float]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise TypeError(f"Invalid {name} value: {value!r} (expected a pair of floats)")
    for i, v in enumerate(value):
        check_number(f"{name}[{i}]", v, low=0.0, allow_tensor=False)
    return float(value[0]), float(value[1])


def scale_by_rprop(
    initial_step_size: Any = 1e-2,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50.0),
) -> GradientTransformation:
    """Rprop, as ``torch.optim.Rprop`` computes it; the update is ``sign(g) * step_size`` (negate it).

    Each coordinate keeps a step size, set to ``initial_step_size`` (torch's ``lr``) at the
    parameter's first step. At every step it is multiplied by ``etas[1]`` where the gradient kept its
    sign, by ``etas[0]`` where it flipped (and that coordinate's gradient is then taken as 0, so it
    does not move and the next step does not count a flip), and clamped to ``step_sizes``.

    Args:
        initial_step_size: ``>= 0``, or a schedule ``count -> value`` read at each parameter's first
            step (as torch reads ``lr`` when it creates the state).
        etas: ``(etaminus, etaplus)`` with ``0 < etaminus < 1 < etaplus``.
        step_sizes: ``(min, max)`` step size.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.scale_by_rprop(0.1)
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> u, state = tx.update({"w": torch.tensor([3.0, -1.0])}, state)
        >>> u, state = tx.update({"w": torch.tensor([2.0, 1.0])}, state)
        >>> u["w"]  # kept its sign: 0.1 * 1.2; flipped: no move
        tensor([0.1200, 0.0000])
    """
    check_rate("initial_step_size", initial_step_size)
    etaminus, etaplus = _pair("etas", etas)
    if not 0.0 < etaminus < 1.0 < etaplus:
        raise ValueError(f"Invalid etas value: {etas!r} (need 0 < etas[0] < 1 < etas[1])")
    low, high = _pair("step_sizes", step_sizes)
    if low > high:
        raise ValueError(f"Invalid step_sizes value: {step_sizes!r} (need step_sizes[0] <= step_sizes[1])")

    def init(params: PyTree) -> ScaleByRpropState:
        reject_complex(params, "scale_by_rprop")
        return ScaleByRpropState(
            init_count(params), per_param_zeros(params), per_param_zeros(params), per_param_counts(params)
        )

    def update(
        updates: PyTree, state: ScaleByRpropState, params: PyTree | None = None
    ) -> tuple[PyTree, ScaleByRpropState]:
        who = "scale_by_rprop"
        f = begin(updates, state, params, ScaleByRpropState, who)
        grads = f.present_updates()
        prev_leaves = f.state_leaves(state.prev, who, "prev")
        size_leaves = f.state_leaves(state.step_size, who, "step_size")
        step_leaves, new_steps, steps = advance_steps(f, state.steps, who)
        first = schedule_value(initial_step_size, leafwise.concrete(state.count))
        outs, prevs, sizes = [], [], []
        for g, prev, size, is_first in zip(
            grads, f.present(prev_leaves), f.present(size_leaves), steps.first_per_leaf()
        ):
            if isinstance(is_first, torch.Tensor):  # traced step (vmap, compile): select without a branch
                size = torch.where(is_first, torch.zeros_like(g) + first, size)
            elif is_first:
                size = torch.zeros_like(g) + first  # torch.full_like(grad, lr), lr read now
            sign = torch.sign(g * prev)
            ones = torch.ones_like(g)  # the factors in g's dtype, as torch's ``sign[sign.gt(0)] = etaplus``
            factor = torch.where(sign > 0, ones * etaplus, torch.where(sign < 0, ones * etaminus, ones))
            size = torch.clamp(size * factor, low, high)
            kept = torch.where(sign < 0, torch.zeros_like(g), g)
            outs.append(torch.sign(kept) * size)
            prevs.append(kept)
            sizes.append(size)
        new_state = ScaleByRpropState(
            state.count + 1,
            f.tree(prevs, prev_leaves),
            f.tree(sizes, size_leaves),
            f.tree(new_steps, step_leaves),
        )
        return f.tree(outs), new_state

    return with_config(
        GradientTransformation(init, update),
        "scale_by_rprop",
        (initial_step_size,),
        dict(etas=etas, step_sizes=step_sizes),
        dict(etas=(0.5, 1.2), step_sizes=(1e-6, 50.0)),
    )


class ScaleByLionState(NamedTuple):
    """State of :func:`scale_by_lion`: updates done and the momentum ``m``."""

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax
    mu: PyTree


def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> GradientTransformation:
    """Lion's update direction (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    ``u_t = sign(b1 m_{t-1} + (1 - b1) g_t)`` (interpolated with ``b1``), then the momentum is
    updated with ``b2``: ``m_t = b2 m_{t-1} + (1 - b2) g_t``. Every coordinate of the update is
    ``-1``, ``0`` or ``1``. Both interpolations are computed as written, ``b * m + (1 - b) * g``
    (not as ``torch.lerp``, which drops ``b * m`` when ``1 - b`` rounds to 1).

    Args:
        b1: interpolation weight of the update, in ``[0, 1]``.
        b2: decay rate of the momentum, in ``[0, 1]``.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.scale_by_lion()
        >>> u, state = tx.update({"w": torch.tensor([0.3, -2.0])}, tx.init({"w": torch.zeros(2)}))
        >>> u["w"], state.mu["w"]
        (tensor([ 1., -1.]), tensor([ 0.0030, -0.0200]))
    """
    check_number("b1", b1, low=0.0, high=1.0, allow_tensor=False)
    check_number("b2", b2, low=0.0, high=1.0, allow_tensor=False)

    def init(params: PyTree) -> ScaleByLionState:
        reject_complex(params, "scale_by_lion")
        return ScaleByLionState(init_count(params), per_param_zeros(params))

    def update(
        updates: PyTree, state: ScaleByLionState, params: PyTree | None = None
    ) -> tuple[PyTree, ScaleByLionState]:
        f = begin(updates, state, params, ScaleByLionState, "scale_by_lion")
        grads = f.present_updates()
        mu_leaves = f.state_leaves(state.mu, "scale_by_lion", "mu")
        mu = f.present(mu_leaves)
        c = leafwise.mul(mu, b1)
        leafwise.add_(c, grads, alpha=1 - b1)
        out = [torch.sign(x) for x in c]
        new_mu = leafwise.mul(mu, b2)
        leafwise.add_(new_mu, grads, alpha=1 - b2)
        return f.tree(out), ScaleByLionState(state.count + 1, f.tree(new_mu, mu_leaves))

    return with_config(
        GradientTransformation(init, update), "scale_by_lion", (), dict(b1=b1, b2=b2), dict(b1=0.9, b2=0.99)
    )
