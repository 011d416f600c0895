"""FISTA: accelerated proximal gradient for ``f(w) + P(w)``, with adaptive restart.

Beck & Teboulle (2009), with the restarts of O'Donoghue & Candès (2015). One transform replaces the
hand-written extrapolation: give it the gradient of the smooth part ``f`` at the params, and apply its
updates. The params it moves are the *extrapolated* points ``y_k`` (where FISTA evaluates the
gradient); the proximal iterates ``x_k``, which have the exact zeros of an L1 prox, are
``state.iterate`` (:func:`fista_iterate`). At convergence the two coincide.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch

from funcreg._src.core import leafwise
from funcreg._src.core.base import Flat, GradientTransformation, begin, find_one_state
from funcreg._src.core.steps import init_count
from funcreg._src.core.tree import flatten, unflatten
from funcreg._src.core.typing import PyTree, ScalarOrSchedule
from funcreg._src.core.validation import check_rate, schedule_value
from funcreg._src.penalties.base import Penalty
from funcreg._src.transforms.block_utils import with_config

Restart = Literal["gradient", "function"] | None


class FistaState(NamedTuple):
    """State of :func:`fista`.

    ``count``: updates done; ``iterate``: the proximal iterate ``x_k`` (a copy of the params at init);
    ``momentum``: ``t_k`` (float64, 1 at the start and after each restart); ``restarts``: how many
    times the momentum was reset; ``value``: ``f(x_k) + P(x_k)`` for ``restart="function"``
    (``nan`` otherwise).
    """

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax
    iterate: PyTree
    momentum: torch.Tensor
    restarts: torch.Tensor
    value: torch.Tensor


def fista_iterate(state: Any) -> PyTree:
    """The proximal iterate ``x_k`` held by the :class:`FistaState` inside ``state`` (a chain's too).

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.fista(1.0, fr.l1(0.5))
        >>> params = {"w": torch.tensor([2.0, 0.2])}
        >>> u, state = tx.update({"w": params["w"] - torch.tensor([1.0, 0.3])}, tx.init(params), params)
        >>> fr.fista_iterate(state)["w"]  # prox of the gradient step: soft-threshold([1.0, 0.3], 0.5)
        tensor([0.5000, 0.0000])
    """
    return find_one_state(state, FistaState, "fista_iterate").iterate


def _check_arguments(
    learning_rate: ScalarOrSchedule,
    penalty: Penalty,
    restart: Restart,
    objective: Callable[[PyTree], torch.Tensor] | None,
) -> None:
    """Refuses, at construction, what :func:`fista` cannot run: a penalty without a prox, an unknown
    restart, or an ``objective`` that is missing for (or given without) ``restart="function"``."""
    check_rate("learning_rate", learning_rate)
    if not isinstance(penalty, Penalty):
        raise TypeError(
            f"fista expects a funcreg penalty (fr.l1, fr.elastic_net, ...), got {type(penalty).__name__}"
        )
    if not penalty.has_prox:
        raise NotImplementedError(f"fista: penalty {penalty.name!r} has no closed-form proximal map")
    if restart not in (None, "gradient", "function"):
        raise ValueError(f"Invalid restart value: {restart!r} (expected 'gradient', 'function' or None)")
    if restart == "function" and not callable(objective):
        raise ValueError(
            "Invalid objective value: restart='function' needs objective=f (params -> 0-d tensor)"
        )
    if restart != "function" and objective is not None:
        raise ValueError(
            f"Invalid objective value: it is only used with restart='function' (got restart={restart!r})"
        )


def _total_value(
    objective: Callable[[PyTree], torch.Tensor], penalty: Penalty, params: PyTree
) -> torch.Tensor:
    """``F = f + P`` at ``params``, detached in float64: the value ``restart="function"`` compares from
    one update to the next, kept out of any graph the caller may be building."""
    with torch.no_grad():
        return (objective(params) + penalty(params)).detach().to(torch.float64)


def _proximal_step(penalty: Penalty, f: Flat, x_leaves: list[Any], s: Any) -> list[Any]:
    """The leaves of ``x_{k+1} = prox_{s P}(y_k - s g)``; leaves without a gradient keep ``x_k``.

    The prox sees the whole tree, as a penalty may select parameters by name, but its result is kept
    only where there was a gradient, so a parameter without one does not move.
    """
    assert f.params is not None
    stepped = list(f.params)
    for i, v in zip(f.index, leafwise.add(f.present_params(), f.present_updates(), alpha=-s)):
        stepped[i] = v
    proxed, _ = flatten(penalty.prox(unflatten(stepped, f.spec), s))
    new_x = list(x_leaves)
    for i in f.index:
        new_x[i] = proxed[i]
    return new_x


def _restart_test(
    restart: Restart,
    f: Flat,
    x_leaves: list[Any],
    new_x: list[Any],
    state: FistaState,
    total: Callable[[PyTree], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether this update resets the momentum (a 0-d bool), and the ``value`` the next state keeps.

    ``"gradient"`` restarts when ``<y_k - x_{k+1}, x_{k+1} - x_k> > 0``; ``"function"`` when
    ``F(x_{k+1}) > F(x_k)``, the new value replacing the old; ``None`` never restarts.
    """
    assert f.params is not None
    device = state.momentum.device
    restarted = torch.zeros((), dtype=torch.bool, device=device)
    value = state.value
    if restart == "gradient":
        inner = sum(
            (((f.params[i] - new_x[i]) * (new_x[i] - x_leaves[i])).sum().to(torch.float64) for i in f.index),
            torch.zeros((), dtype=torch.float64, device=device),
        )
        restarted = inner > 0
    elif restart == "function":
        value = total(unflatten(new_x, f.spec)).to(device)
        restarted = value > state.value
    return restarted, value


def _next_momentum(t: torch.Tensor, restarted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The extrapolation weight ``beta = (t_k - 1) / t_{k+1}`` and ``t_{k+1}``; ``0`` and ``1`` on a
    restart. Both come from ``torch.where``, so a restart costs no host synchronisation."""
    t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
    beta = torch.where(restarted, torch.zeros_like(t), (t - 1) / t_next)
    t_next = torch.where(restarted, torch.ones_like(t), t_next)
    return beta, t_next


def _extrapolated_updates(f: Flat, x_leaves: list[Any], new_x: list[Any], beta: torch.Tensor) -> list[Any]:
    """The updates ``y_{k+1} - y_k``, with ``y_{k+1} = x_{k+1} + beta (x_{k+1} - x_k)``, at the
    leaves with a gradient: applying them moves the params to the next extrapolated point."""
    assert f.params is not None
    out = []
    for i in f.index:
        b = beta.to(new_x[i].dtype)
        y_next = new_x[i] + b * (new_x[i] - x_leaves[i])
        out.append(y_next - f.params[i])
    return out


def fista(
    learning_rate: ScalarOrSchedule,
    penalty: Penalty,
    restart: Restart = "gradient",
    objective: Callable[[PyTree], torch.Tensor] | None = None,
) -> GradientTransformation:
    """FISTA for ``min f(w) + P(w)``: feed it ``grad f`` at the params, apply the updates.

    With step ``s`` (``1/L`` for an ``L``-smooth ``f``; a float or a schedule) and ``t_0 = 1``, each
    update, given ``g = grad f(y_k)`` at the params ``y_k``, computes

    * ``x_{k+1} = prox_{s P}(y_k - s g)`` (the proximal step, :meth:`Penalty.prox`),
    * ``t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2`` and ``y_{k+1} = x_{k+1} + (t_k - 1)/t_{k+1} (x_{k+1} - x_k)``,

    and returns ``y_{k+1} - y_k``. Restart (momentum reset, ``t_{k+1} = 1`` and ``y_{k+1} = x_{k+1}``):

    * ``"gradient"`` (default): when ``<y_k - x_{k+1}, x_{k+1} - x_k> > 0``, i.e. the step goes against
      the momentum; costs nothing extra;
    * ``"function"``: when ``F(x_{k+1}) > F(x_k)`` with ``F = objective + P``; needs ``objective``
      (the smooth part ``f(params) -> 0-d tensor``), evaluated once per update;
    * ``None``: plain FISTA.

    Parameters whose gradient is ``None`` do not move. The first update is an ISTA step.

    Args:
        learning_rate: the step ``s``, ``>= 0``, or a schedule ``count -> s``.
        penalty: the non-smooth part, a penalty with a prox (``fr.l1``, ``fr.elastic_net``,
            ``fr.group_lasso``, ``fr.nuclear_norm``, constraints such as ``fr.non_negative``...).
        restart: ``"gradient"``, ``"function"`` or ``None``.
        objective: ``f``, for ``restart="function"`` only.

    Examples:
        >>> import torch, funcreg as fr
        >>> a = torch.tensor([3.0, 0.2, -1.0])  # f(w) = 1/2 ||w - a||^2, P = 0.5 ||w||_1
        >>> tx = fr.fista(0.5, fr.l1(0.5))
        >>> params = {"w": torch.zeros(3)}
        >>> state = tx.init(params)
        >>> for _ in range(50):
        ...     u, state = tx.update({"w": params["w"] - a}, state, params)
        ...     params = fr.apply_updates(params, u)
        >>> fr.fista_iterate(state)["w"]  # soft-threshold(a, 0.5): an exact zero
        tensor([ 2.5000,  0.0000, -0.5000])
    """
    _check_arguments(learning_rate, penalty, restart, objective)

    def total(params: PyTree) -> torch.Tensor:
        assert objective is not None
        return _total_value(objective, penalty, params)

    def init(params: PyTree) -> FistaState:
        leaves, spec = flatten(params)
        iterate = unflatten([None if p is None else p.detach().clone() for p in leaves], spec)
        count = init_count(params)
        value = total(params) if restart == "function" else torch.tensor(math.nan, dtype=torch.float64)
        one = torch.ones((), dtype=torch.float64, device=count.device)
        return FistaState(count, iterate, one, torch.zeros_like(count), value.to(count.device))

    def update(updates: PyTree, state: FistaState, params: PyTree | None = None) -> tuple[PyTree, FistaState]:
        f = begin(updates, state, params, FistaState, "fista", needs_params=True)
        assert f.params is not None
        s = schedule_value(learning_rate, leafwise.concrete(state.count))
        x_leaves, _ = flatten(state.iterate)
        new_x = _proximal_step(penalty, f, x_leaves, s)
        restarted, value = _restart_test(restart, f, x_leaves, new_x, state, total)
        beta, t_next = _next_momentum(state.momentum, restarted)
        new_state = FistaState(
            state.count + 1,
            unflatten(new_x, f.spec),
            t_next,
            state.restarts + restarted.to(state.restarts.dtype),
            value,
        )
        return f.tree(_extrapolated_updates(f, x_leaves, new_x, beta)), new_state

    given = dict(restart=restart, objective=objective)
    return with_config(
        GradientTransformation(init, update),
        "fista",
        (learning_rate, penalty),
        given,
        dict(restart="gradient"),
    )
