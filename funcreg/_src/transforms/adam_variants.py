"""Adam's relatives as building blocks: Adamax, NAdam and RAdam rescalings (without the learning rate).

Each follows the single-tensor path of its ``torch.optim`` namesake (``torch/optim/adamax.py``,
``nadam.py``, ``radam.py`` in torch 2.13) operation for operation, so that the aliases in
:mod:`funcreg._src.optim.alias_torch` reproduce torch's trajectories. Steps are counted per parameter,
as torch does (a parameter whose gradient is ``None`` is not stepped).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from funcreg._src.core import leafwise
from funcreg._src.core.base import GradientTransformation, begin, per_param_zeros
from funcreg._src.core.steps import Step, advance_steps, float_at, init_count, per_param_counts, power_at
from funcreg._src.core.tree import flatten, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import check_number
from funcreg._src.transforms.block_utils import (
    loose_state_leaves,
    reject_complex,
    torch_scalar_dtype,
    with_config,
)


def _check_betas(b1: float, b2: float) -> None:
    check_number("b1", b1, low=0.0, high=1.0, high_open=True, allow_tensor=False)
    check_number("b2", b2, low=0.0, high=1.0, high_open=True, allow_tensor=False)


class ScaleByAdamaxState(NamedTuple):
    """State of :func:`scale_by_adamax`: updates done, first moment, infinity norm, per-parameter steps."""

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax
    mu: PyTree
    nu: PyTree
    steps: PyTree


def scale_by_adamax(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adamax's rescaling, as ``torch.optim.Adamax`` computes it (without the learning rate).

    ``m_t = lerp(m_{t-1}, g_t, 1 - b1)``, ``u_t = max(b2 * u_{t-1}, |g_t| + eps)`` (the exponentially
    weighted infinity norm; torch adds ``eps`` inside the max) and the update is
    ``m_t / u_t / (1 - b1^t)``, with ``t`` the step of the parameter.

    Args:
        b1: decay rate of the first moment, in ``[0, 1)``.
        b2: decay rate of the infinity norm, in ``[0, 1)``.
        eps: added to ``|g|``, ``>= 0``.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.scale_by_adamax()
        >>> u, _ = tx.update({"w": torch.tensor([2.0])}, tx.init({"w": torch.zeros(1)}))
        >>> u["w"]  # 0.1 * 2 / (2 + 1e-8) / (1 - 0.9)
        tensor([1.0000])
    """
    _check_betas(b1, b2)
    check_number("eps", eps, low=0.0, allow_tensor=False)

    def init(params: PyTree) -> ScaleByAdamaxState:
        reject_complex(params, "scale_by_adamax")
        return ScaleByAdamaxState(
            init_count(params), per_param_zeros(params), per_param_zeros(params), per_param_counts(params)
        )

    def update(
        updates: PyTree, state: ScaleByAdamaxState, params: PyTree | None = None
    ) -> tuple[PyTree, ScaleByAdamaxState]:
        f = begin(updates, state, params, ScaleByAdamaxState, "scale_by_adamax")
        grads = f.present_updates()
        mu_leaves = f.state_leaves(state.mu, "scale_by_adamax", "mu")
        nu_leaves = f.state_leaves(state.nu, "scale_by_adamax", "nu")
        step_leaves, new_steps, steps = advance_steps(f, state.steps, "scale_by_adamax")
        mu = leafwise.lerp(f.present(mu_leaves), grads, 1 - b1)
        abs_g = [torch.abs(g) for g in grads]
        leafwise.add_scalar_(abs_g, eps)
        nu = leafwise.maximum(leafwise.mul(f.present(nu_leaves), b2), abs_g)
        out = leafwise.div(mu, nu)
        leafwise.div_scalar_(out, [1 - power_at(b1, t) for t in steps.per_leaf()])
        new_state = ScaleByAdamaxState(
            state.count + 1, f.tree(mu, mu_leaves), f.tree(nu, nu_leaves), f.tree(new_steps, step_leaves)
        )
        return f.tree(out), new_state

    return with_config(
        GradientTransformation(init, update),
        "scale_by_adamax",
        (),
        dict(b1=b1, b2=b2, eps=eps),
        dict(b1=0.9, b2=0.999, eps=1e-8),
    )


class ScaleByNadamState(NamedTuple):
    """State of :func:`scale_by_nadam`.

    ``mu_product`` is one 0-d tensor per parameter, the product of the momentum schedule so far, kept
    in the dtype torch keeps it in (float32 unless the default dtype is float64), so that the step
    sizes derived from it round as torch's do.
    """

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax
    mu: PyTree
    nu: PyTree
    mu_product: PyTree
    steps: PyTree


def scale_by_nadam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, momentum_decay: float = 4e-3
) -> GradientTransformation:
    """NAdam's rescaling, as ``torch.optim.NAdam`` computes it (without the learning rate).

    With the momentum schedule ``mu_t = b1 * (1 - 0.5 * 0.96^(t * momentum_decay))`` and its running
    product ``P_t = mu_1 ... mu_t``, the moments of Adam (``m_t``, ``v_t``) give the update
    ``((1 - mu_t) / (1 - P_t) * g_t + mu_{t+1} / (1 - P_t mu_{t+1}) * m_t) / (sqrt(v_t / (1 - b2^t)) + eps)``.

    Args:
        b1: decay rate of the first moment, in ``[0, 1)``.
        b2: decay rate of the second moment, in ``[0, 1)``.
        eps: added to the denominator, ``>= 0``.
        momentum_decay: ``>= 0``; torch's default ``4e-3``.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.scale_by_nadam()
        >>> u, state = tx.update({"w": torch.tensor([3.0])}, tx.init({"w": torch.zeros(1)}))
        >>> # denominator sqrt(v / (1 - b2)) = |g| = 3, m = 0.3: 3/3 + 0.1 * mu_2 / (1 - mu_1 mu_2)
        >>> # P_1 = mu_1 = 0.9 * (1 - 0.5 * 0.96^0.004)
        >>> round(u["w"].item(), 4), round(state.mu_product["w"].item(), 6)
        (1.0565, 0.450073)
    """
    _check_betas(b1, b2)
    check_number("eps", eps, low=0.0, allow_tensor=False)
    check_number("momentum_decay", momentum_decay, low=0.0, allow_tensor=False)

    def momentum_at(t: Step) -> float | torch.Tensor:
        return b1 * (1.0 - 0.5 * (0.96 ** (float_at(t) * momentum_decay)))

    def init(params: PyTree) -> ScaleByNadamState:
        reject_complex(params, "scale_by_nadam")
        leaves, spec = flatten(params)
        dtype = torch_scalar_dtype()
        products = [None if p is None else torch.ones((), dtype=dtype, device=p.device) for p in leaves]
        return ScaleByNadamState(
            init_count(params),
            per_param_zeros(params),
            per_param_zeros(params),
            unflatten(products, spec),
            per_param_counts(params),
        )

    def update(
        updates: PyTree, state: ScaleByNadamState, params: PyTree | None = None
    ) -> tuple[PyTree, ScaleByNadamState]:
        who = "scale_by_nadam"
        f = begin(updates, state, params, ScaleByNadamState, who)
        grads = f.present_updates()
        mu_leaves = f.state_leaves(state.mu, who, "mu")
        nu_leaves = f.state_leaves(state.nu, who, "nu")
        prod_leaves = loose_state_leaves(f, state.mu_product, who, "mu_product")
        step_leaves, new_steps, steps = advance_steps(f, state.steps, who)
        mu = leafwise.lerp(f.present(mu_leaves), grads, 1 - b1)
        nu = leafwise.mul(f.present(nu_leaves), b2)
        leafwise.addcmul_(nu, grads, grads, 1 - b2)
        out, products = [], []
        for g, m, v, p, t in zip(grads, mu, nu, f.present(prod_leaves), steps.per_leaf()):
            mu_t, mu_next = momentum_at(t), momentum_at(t + 1)
            # in torch's scalar dtype, as torch's ``mu_product *= mu`` (a traced mu_t is float64)
            product = p * (mu_t.to(p.dtype) if isinstance(mu_t, torch.Tensor) else mu_t)
            products.append(product)
            prod = leafwise.concrete(product)
            if isinstance(prod, torch.Tensor):  # traced: in float64, as the eager Python float is
                prod = prod.to(torch.float64)
            denom = torch.sqrt(v / (1 - power_at(b2, t))) + eps
            step = torch.div(g, denom) * ((1.0 - mu_t) / (1.0 - prod))
            out.append(step + m / denom * (mu_next / (1.0 - prod * mu_next)))
        new_state = ScaleByNadamState(
            state.count + 1,
            f.tree(mu, mu_leaves),
            f.tree(nu, nu_leaves),
            f.tree(products, prod_leaves),
            f.tree(new_steps, step_leaves),
        )
        return f.tree(out), new_state

    return with_config(
        GradientTransformation(init, update),
        "scale_by_nadam",
        (),
        dict(b1=b1, b2=b2, eps=eps, momentum_decay=momentum_decay),
        dict(b1=0.9, b2=0.999, eps=1e-8, momentum_decay=4e-3),
    )


class ScaleByRadamState(NamedTuple):
    """State of :func:`scale_by_radam`: updates done, first and second moments, per-parameter steps."""

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax
    mu: PyTree
    nu: PyTree
    steps: PyTree


def radam_rectification(b2: float, t: Step) -> float | torch.Tensor:
    """RAdam's variance rectification ``r_t`` at step ``t``, or ``0.0`` while ``rho_t <= 5``.

    ``rho_inf = 2 / (1 - b2) - 1``, ``rho_t = rho_inf - 2 t b2^t / (1 - b2^t)`` and
    ``r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))``.

    Examples:
        >>> from funcreg._src.transforms.adam_variants import radam_rectification
        >>> radam_rectification(0.999, 5), round(radam_rectification(0.999, 6), 6)
        (0.0, 0.025821)
    """
    rho_inf = 2 / (1 - b2) - 1
    b2_t = power_at(b2, t)
    rho_t = rho_inf - 2 * float_at(t) * b2_t / (1 - b2_t)
    if isinstance(rho_t, torch.Tensor):  # traced (vmap, compile): select without a host sync
        r = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)).clamp(
            min=0
        ) ** 0.5
        return torch.where(rho_t > 5.0, r, torch.zeros_like(r))
    if rho_t <= 5.0:
        return 0.0
    return ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5


def scale_by_radam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """RAdam's rescaling, as ``torch.optim.RAdam`` computes it (without the learning rate).

    With ``m_hat = m_t / (1 - b1^t)`` and the rectification ``r_t`` of :func:`radam_rectification`,
    the update is ``m_hat * sqrt(1 - b2^t) / (sqrt(v_t) + eps) * r_t`` once ``rho_t > 5``, and the
    un-adapted ``m_hat`` (SGD with momentum) before that.

    Args:
        b1: decay rate of the first moment, in ``[0, 1)``.
        b2: decay rate of the second moment, in ``[0, 1)``.
        eps: added to the denominator, ``>= 0``.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.scale_by_radam()
        >>> u, _ = tx.update({"w": torch.tensor([3.0])}, tx.init({"w": torch.zeros(1)}))
        >>> u["w"]  # the first steps are m_hat, here the gradient itself
        tensor([3.0000])
    """
    _check_betas(b1, b2)
    check_number("eps", eps, low=0.0, allow_tensor=False)

    def init(params: PyTree) -> ScaleByRadamState:
        reject_complex(params, "scale_by_radam")
        return ScaleByRadamState(
            init_count(params), per_param_zeros(params), per_param_zeros(params), per_param_counts(params)
        )

    def update(
        updates: PyTree, state: ScaleByRadamState, params: PyTree | None = None
    ) -> tuple[PyTree, ScaleByRadamState]:
        who = "scale_by_radam"
        f = begin(updates, state, params, ScaleByRadamState, who)
        grads = f.present_updates()
        mu_leaves = f.state_leaves(state.mu, who, "mu")
        nu_leaves = f.state_leaves(state.nu, who, "nu")
        step_leaves, new_steps, steps = advance_steps(f, state.steps, who)
        mu = leafwise.lerp(f.present(mu_leaves), grads, 1 - b1)
        nu = leafwise.mul(f.present(nu_leaves), b2)
        leafwise.addcmul_(nu, grads, grads, 1 - b2)
        out = []
        for m, v, t in zip(mu, nu, steps.per_leaf()):
            m_hat = m / (1 - power_at(b1, t))
            rect = radam_rectification(b2, t)
            adaptive_of = lambda t=t, v=v: (1 - power_at(b2, t)) ** 0.5 / (torch.sqrt(v) + eps)  # noqa: E731
            if isinstance(rect, torch.Tensor):  # traced
                out.append(torch.where(rect > 0.0, m_hat * adaptive_of() * rect, m_hat))
            elif rect > 0.0:
                out.append(m_hat * adaptive_of() * rect)  # ** 0.5 as torch, not math.sqrt
            else:
                out.append(m_hat)
        new_state = ScaleByRadamState(
            state.count + 1, f.tree(mu, mu_leaves), f.tree(nu, nu_leaves), f.tree(new_steps, step_leaves)
        )
        return f.tree(out), new_state

    return with_config(
        GradientTransformation(init, update),
        "scale_by_radam",
        (),
        dict(b1=b1, b2=b2, eps=eps),
        dict(b1=0.9, b2=0.999, eps=1e-8),
    )
