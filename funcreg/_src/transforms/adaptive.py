"""Accumulated-square rescalings as building blocks: RMSprop, Adagrad and Adadelta (without the lr).

Each follows the single-tensor path of its ``torch.optim`` namesake (``torch/optim/rmsprop.py``,
``adagrad.py``, ``adadelta.py`` in torch 2.13), so that the aliases in
:mod:`funcreg._src.optim.alias_torch` reproduce torch's trajectories. Steps are counted per parameter.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from funcreg._src.core import leafwise
from funcreg._src.core.base import GradientTransformation, begin, per_param_zeros
from funcreg._src.core.steps import advance_steps, float_at, init_count, per_param_counts
from funcreg._src.core.tree import flatten, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import check_bool, check_number
from funcreg._src.transforms.block_utils import reject_complex, with_config


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`: updates done, the average of ``g^2`` (torch's ``square_avg``),
    the average of ``g`` when centered (``grad_avg``, else ``None``) and per-parameter steps."""

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax
    nu: PyTree
    mu: PyTree | None
    steps: PyTree


def scale_by_rms(alpha: float = 0.99, eps: float = 1e-8, centered: bool = False) -> GradientTransformation:
    """RMSprop's rescaling, as ``torch.optim.RMSprop`` computes it (without momentum and lr).

    ``v_t = alpha v_{t-1} + (1 - alpha) g_t^2`` (from ``v_0 = 0``, no bias correction) and the update
    is ``g_t / (sqrt(v_t) + eps)``; centered, ``m_t = lerp(m_{t-1}, g_t, 1 - alpha)`` and the
    denominator is ``sqrt(v_t - m_t^2) + eps``. Note where ``eps`` sits: outside the square root, as
    in torch (optax's ``scale_by_rms`` puts it inside).

    Args:
        alpha: smoothing constant, in ``[0, 1]``.
        eps: added to the denominator, ``>= 0``.
        centered: normalise by the estimated variance rather than the second moment.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.scale_by_rms(alpha=0.75)
        >>> u, _ = tx.update({"w": torch.tensor([2.0])}, tx.init({"w": torch.zeros(1)}))
        >>> u["w"]  # 2 / sqrt(0.25 * 4)
        tensor([2.0000])
    """
    check_number("alpha", alpha, low=0.0, high=1.0, allow_tensor=False)
    check_number("eps", eps, low=0.0, allow_tensor=False)
    check_bool("centered", centered)

    def init(params: PyTree) -> ScaleByRmsState:
        reject_complex(params, "scale_by_rms")
        mu = per_param_zeros(params) if centered else None
        return ScaleByRmsState(init_count(params), per_param_zeros(params), mu, per_param_counts(params))

    def update(
        updates: PyTree, state: ScaleByRmsState, params: PyTree | None = None
    ) -> tuple[PyTree, ScaleByRmsState]:
        f = begin(updates, state, params, ScaleByRmsState, "scale_by_rms")
        grads = f.present_updates()
        nu_leaves = f.state_leaves(state.nu, "scale_by_rms", "nu")
        step_leaves, new_steps, _ = advance_steps(f, state.steps, "scale_by_rms")
        nu = leafwise.mul(f.present(nu_leaves), alpha)
        leafwise.addcmul_(nu, grads, grads, 1 - alpha)
        mu_tree = None
        if centered:
            mu_leaves = f.state_leaves(state.mu, "scale_by_rms", "mu")
            mu = leafwise.lerp(f.present(mu_leaves), grads, 1 - alpha)
            mu_tree = f.tree(mu, mu_leaves)
            avg = [torch.addcmul(v, m, m, value=-1) for v, m in zip(nu, mu)]
            avg = leafwise.sqrt(avg)
        else:
            avg = leafwise.sqrt(nu)
        leafwise.add_scalar_(avg, eps)
        out = leafwise.div(grads, avg)
        new_state = ScaleByRmsState(
            state.count + 1, f.tree(nu, nu_leaves), mu_tree, f.tree(new_steps, step_leaves)
        )
        return f.tree(out), new_state

    return with_config(
        GradientTransformation(init, update),
        "scale_by_rms",
        (),
        dict(alpha=alpha, eps=eps, centered=centered),
        dict(alpha=0.99, eps=1e-8, centered=False),
    )


class ScaleByAdagradState(NamedTuple):
    """State of :func:`scale_by_adagrad`: updates done, the sum of ``g^2`` (torch's ``sum``), steps."""

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax
    sum_of_squares: PyTree
    steps: PyTree


def scale_by_adagrad(
    lr_decay: float = 0.0, initial_accumulator_value: float = 0.0, eps: float = 1e-10
) -> GradientTransformation:
    """Adagrad's rescaling, as ``torch.optim.Adagrad`` computes it (without the learning rate).

    ``s_t = s_{t-1} + g_t^2`` from ``s_0 = initial_accumulator_value`` and the update is
    ``g_t / (sqrt(s_t) + eps) / (1 + (t - 1) * lr_decay)``: torch's learning-rate decay is part of
    this block because it follows each parameter's own step ``t``, not the optimizer's.

    Args:
        lr_decay: ``>= 0``.
        initial_accumulator_value: ``>= 0``.
        eps: added to the denominator, ``>= 0``.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.scale_by_adagrad(initial_accumulator_value=5.0)
        >>> u, _ = tx.update({"w": torch.tensor([2.0])}, tx.init({"w": torch.zeros(1)}))
        >>> u["w"]  # 2 / sqrt(5 + 4)
        tensor([0.6667])
    """
    check_number("lr_decay", lr_decay, low=0.0, allow_tensor=False)
    check_number("initial_accumulator_value", initial_accumulator_value, low=0.0, allow_tensor=False)
    check_number("eps", eps, low=0.0, allow_tensor=False)

    def init(params: PyTree) -> ScaleByAdagradState:
        reject_complex(params, "scale_by_adagrad")
        leaves, spec = flatten(params)
        sums = [None if p is None else torch.full_like(p, initial_accumulator_value) for p in leaves]
        return ScaleByAdagradState(init_count(params), unflatten(sums, spec), per_param_counts(params))

    def update(
        updates: PyTree, state: ScaleByAdagradState, params: PyTree | None = None
    ) -> tuple[PyTree, ScaleByAdagradState]:
        f = begin(updates, state, params, ScaleByAdagradState, "scale_by_adagrad")
        grads = f.present_updates()
        sum_leaves = f.state_leaves(state.sum_of_squares, "scale_by_adagrad", "sum_of_squares")
        step_leaves, new_steps, steps = advance_steps(f, state.steps, "scale_by_adagrad")
        sums = leafwise.clone(f.present(sum_leaves))
        leafwise.addcmul_(sums, grads, grads, 1.0)
        std = leafwise.sqrt(sums)
        leafwise.add_scalar_(std, eps)
        out = leafwise.div(grads, std)
        if lr_decay != 0:
            leafwise.div_scalar_(out, [1 + (float_at(t) - 1) * lr_decay for t in steps.per_leaf()])
        new_state = ScaleByAdagradState(
            state.count + 1, f.tree(sums, sum_leaves), f.tree(new_steps, step_leaves)
        )
        return f.tree(out), new_state

    return with_config(
        GradientTransformation(init, update),
        "scale_by_adagrad",
        (),
        dict(lr_decay=lr_decay, initial_accumulator_value=initial_accumulator_value, eps=eps),
        dict(lr_decay=0.0, initial_accumulator_value=0.0, eps=1e-10),
    )


class ScaleByAdadeltaState(NamedTuple):
    """State of :func:`scale_by_adadelta`: updates done, the average of ``g^2`` (torch's
    ``square_avg``), the average of the squared steps (``acc_delta``), per-parameter steps."""

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax
    nu: PyTree
    delta_nu: PyTree
    steps: PyTree


def scale_by_adadelta(rho: float = 0.9, eps: float = 1e-6) -> GradientTransformation:
    """Adadelta's rescaling, as ``torch.optim.Adadelta`` computes it (without the learning rate).

    ``v_t = rho v_{t-1} + (1 - rho) g_t^2``, the step ``d_t = sqrt(a_{t-1} + eps) / sqrt(v_t + eps) * g_t``
    is the update, and ``a_t = rho a_{t-1} + (1 - rho) d_t^2`` accumulates it (before the learning
    rate, which torch applies afterwards and defaults to 1).

    Args:
        rho: decay rate of both averages, in ``[0, 1]``.
        eps: inside both square roots, ``>= 0``.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.scale_by_adadelta(rho=0.0, eps=1.0)
        >>> u, _ = tx.update({"w": torch.tensor([3.0])}, tx.init({"w": torch.zeros(1)}))
        >>> u["w"]  # sqrt(0 + 1) / sqrt(9 + 1) * 3
        tensor([0.9487])
    """
    check_number("rho", rho, low=0.0, high=1.0, allow_tensor=False)
    check_number("eps", eps, low=0.0, allow_tensor=False)

    def init(params: PyTree) -> ScaleByAdadeltaState:
        reject_complex(params, "scale_by_adadelta")
        return ScaleByAdadeltaState(
            init_count(params), per_param_zeros(params), per_param_zeros(params), per_param_counts(params)
        )

    def update(
        updates: PyTree, state: ScaleByAdadeltaState, params: PyTree | None = None
    ) -> tuple[PyTree, ScaleByAdadeltaState]:
        who = "scale_by_adadelta"
        f = begin(updates, state, params, ScaleByAdadeltaState, who)
        grads = f.present_updates()
        nu_leaves = f.state_leaves(state.nu, who, "nu")
        acc_leaves = f.state_leaves(state.delta_nu, who, "delta_nu")
        step_leaves, new_steps, _ = advance_steps(f, state.steps, who)
        nu = leafwise.mul(f.present(nu_leaves), rho)
        leafwise.addcmul_(nu, grads, grads, 1 - rho)
        std = leafwise.clone(nu)
        leafwise.add_scalar_(std, eps)
        std = leafwise.sqrt(std)
        acc = f.present(acc_leaves)
        delta = leafwise.clone(acc)
        leafwise.add_scalar_(delta, eps)
        delta = [torch.sqrt(d) / s * g for d, s, g in zip(delta, std, grads)]
        new_acc = leafwise.mul(acc, rho)
        leafwise.addcmul_(new_acc, delta, delta, 1 - rho)
        new_state = ScaleByAdadeltaState(
            state.count + 1,
            f.tree(nu, nu_leaves),
            f.tree(new_acc, acc_leaves),
            f.tree(new_steps, step_leaves),
        )
        return f.tree(delta), new_state

    return with_config(
        GradientTransformation(init, update),
        "scale_by_adadelta",
        (),
        dict(rho=rho, eps=eps),
        dict(rho=0.9, eps=1e-6),
    )
