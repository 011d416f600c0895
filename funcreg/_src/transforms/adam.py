"""Adam's rescaling (``scale_by_adam``) and the moment update it shares with the ``adam``/``adamw`` aliases.

Operation order follows ``torch.optim.adam``'s foreach implementation so that the aliases reproduce its
trajectories; in a donated step the moments are updated in place, as torch does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from funcreg._src.core import leafwise
from funcreg._src.core.base import (
    Flat,
    GradientTransformation,
    configured,
    expect_state,
    flat,
    per_param_zeros,
)
from funcreg._src.core.steps import (
    StepCount,
    advance_steps,
    init_count,
    next_count,
    per_param_counts,
    power_at,
    sqrt_at,
)
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import check_bool, check_number
from funcreg._src.transforms.complex_params import as_real


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`: step count, first and second moments, and their running max."""

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax
    mu: PyTree
    nu: PyTree
    nu_max: PyTree | None
    steps: PyTree


def scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, amsgrad: bool = False
) -> GradientTransformation:
    """Adam's rescaling, as ``torch.optim.Adam`` computes it (without the learning rate).

    ``m_t = lerp(m_{t-1}, g_t, 1 - b1)``, ``v_t = b2 v_{t-1} + (1 - b2) g_t^2`` and the update is
    ``m_t / (1 - b1^t) / (sqrt(v_t) / sqrt(1 - b2^t) + eps)``; with ``amsgrad`` the running maximum of
    ``v_t`` replaces ``v_t`` in the denominator. Note where ``eps`` sits: outside the bias-corrected
    square root, as in torch and optax.

    The step ``t`` of the bias corrections is counted per parameter (``state.steps``), as in
    ``torch.optim``: a parameter whose gradient is ``None`` at an update is not stepped.
    ``state.count`` counts the updates of the transform.

    Args:
        b1: decay rate of the first moment, in ``[0, 1)``.
        b2: decay rate of the second moment, in ``[0, 1)``.
        eps: added to the denominator, ``>= 0``.
        amsgrad: use the running maximum of the second moment.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.scale_by_adam()
        >>> u, _ = tx.update({"w": torch.tensor([3.0])}, tx.init({"w": torch.zeros(1)}))
        >>> u["w"]  # the first Adam step is sign(g), up to eps
        tensor([1.0000])
    """
    check_number("b1", b1, low=0.0, high=1.0, high_open=True)
    check_number("b2", b2, low=0.0, high=1.0, high_open=True)
    check_number("eps", eps, low=0.0)
    check_bool("amsgrad", amsgrad)

    def init(params: PyTree) -> ScaleByAdamState:
        return ScaleByAdamState(
            count=init_count(params),
            mu=per_param_zeros(params),
            nu=per_param_zeros(params),
            nu_max=per_param_zeros(params) if amsgrad else None,
            steps=per_param_counts(params),
        )

    def update(
        updates: PyTree, state: ScaleByAdamState, params: PyTree | None = None
    ) -> tuple[PyTree, ScaleByAdamState]:
        expect_state(state, ScaleByAdamState, "scale_by_adam")
        f = flat(updates, params, "scale_by_adam")
        mu, denom, steps, new_state = adam_moments(
            f, state, f.present_updates(), b1=b1, b2=b2, amsgrad=amsgrad, who="scale_by_adam"
        )
        bias_correction1 = steps.map(lambda t: 1 - power_at(b1, t))
        leafwise.div_scalar_(denom, steps.map(lambda t: sqrt_at(1 - power_at(b2, t))))
        leafwise.add_scalar_(denom, eps)
        out = leafwise.div(mu, denom)
        leafwise.div_scalar_(out, bias_correction1)
        return f.tree(out), new_state

    # complex parameters: Adam's g * g and sqrt(v) act on the real and imaginary parts, as in torch
    return configured(
        as_real(GradientTransformation(init, update)),
        "scale_by_adam",
        b1=b1,
        b2=b2,
        eps=eps,
        amsgrad=amsgrad or None,
    )


def adam_moments(
    f: Flat,
    state: ScaleByAdamState,
    grads: list[torch.Tensor],
    *,
    b1: float,
    b2: float,
    amsgrad: bool,
    who: str,
) -> tuple[list[torch.Tensor], list[torch.Tensor], StepCount, ScaleByAdamState]:
    """Adam's moment updates, shared by :func:`scale_by_adam` and the fused ``adam``/``adamw``.

    Returns the new first moments, ``sqrt`` of the (running max of the) second moments as a fresh
    buffer for the caller to finish the denominator in, the parameters' steps (for the bias
    corrections), and the new state.
    """
    mu_leaves = f.state_leaves(state.mu, who, "mu")
    nu_leaves = f.state_leaves(state.nu, who, "nu")
    max_leaves = f.state_leaves(state.nu_max, who, "nu_max") if amsgrad else None
    mu, nu = f.present(mu_leaves), f.present(nu_leaves)
    nu_max = f.present(max_leaves) if max_leaves is not None else []
    if leafwise.owned(mu, nu, nu_max):  # donated: the state buffers are updated in place, as torch does
        leafwise.lerp_(mu, grads, 1 - b1)
        leafwise.mul_(nu, b2)
    else:
        mu = leafwise.lerp(mu, grads, 1 - b1)
        nu = leafwise.mul(nu, b2)
    leafwise.addcmul_(nu, grads, grads, 1 - b2)
    nu_max_tree = None
    if max_leaves is not None:
        if leafwise.owned(nu_max):
            leafwise.maximum_(nu_max, nu)
        else:
            nu_max = leafwise.maximum(nu_max, nu)
        nu_max_tree = f.tree(nu_max, max_leaves)
        denom = leafwise.sqrt(nu_max)
    else:
        denom = leafwise.sqrt(nu)
    step_leaves, new_steps, steps = advance_steps(f, state.steps, who)
    new_state = ScaleByAdamState(
        count=next_count(state.count),
        mu=f.tree(mu, mu_leaves),
        nu=f.tree(nu, nu_leaves),
        nu_max=nu_max_tree,
        steps=f.tree(new_steps, step_leaves),
    )
    return mu, denom, steps, new_state
