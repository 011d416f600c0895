"""The four forms of applying a penalty: loss term, coupled edit, decoupled update, proximal step.

=================  =============================================  ================================
form               what it does                                   where it sits
=================  =============================================  ================================
loss term          ``total = data_loss + P(w)``                   :func:`penalized`, before grad
coupled edit       ``u <- u + grad P(w)``                         :func:`add_penalty_grad`, first
decoupled update   ``u <- u - s_t * grad P(w)``                   :func:`decoupled`, after the lr
proximal step      ``w_new = prox_{s_t P}(w + u)``                :func:`proximal`, last
=================  =============================================  ================================

The loss term and the coupled edit give the optimizer the same gradient, whatever the optimizer.
For plain SGD without momentum the coupled edit also equals the decoupled update with
``s_t = lr_t``; with momentum or Adam they differ. The gradient-edit forms keep the penalty's value
(computed without autograd) in their state, so every form is observable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch

from funcreg._src.core import leafwise
from funcreg._src.core.base import GradientTransformation, configured, expect_state, find_states, flat
from funcreg._src.core.record import PenaltyForm, TransformRecord
from funcreg._src.core.steps import init_count
from funcreg._src.core.typing import PyTree, ScalarOrSchedule
from funcreg._src.core.validation import check_bool, check_rate, schedule_value
from funcreg._src.penalties import FlatParams, Penalty


class PenaltyState(NamedTuple):
    """State of the gradient-edit forms.

    ``count``: updates done; ``value``: the penalty at the params of the last update (at init: at the
    initial params); ``terms``: the value of each named term. Built with ``report=False``, ``value``
    and the terms are NaN: the penalty is not computed.
    """

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax
    value: torch.Tensor
    terms: dict[str, torch.Tensor]


def penalty_metrics(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Metrics for a penalty's terms: ``"penalty"`` (their sum) and ``"penalty/<name>"`` for each term."""
    values = list(terms.values())
    total = values[0]
    for v in values[1:]:
        total = total + v
    out = {"penalty": total}
    out.update({f"penalty/{name}": v for name, v in terms.items()})
    return out


def _check_penalty(penalty: Any, who: str) -> None:
    if not isinstance(penalty, Penalty):
        raise TypeError(
            f"{who} expects a funcreg penalty (fr.l2, fr.l1, fr.penalty, ...), got {type(penalty).__name__}"
        )


def _report(penalty: Penalty, fp: FlatParams, count: torch.Tensor) -> PenaltyState:
    with torch.no_grad():
        terms = dict(penalty.terms_flat(fp))
        value = penalty_metrics(terms)["penalty"]
    return PenaltyState(count=count, value=value, terms=terms)


def _unreported(like: PenaltyState, count: torch.Tensor) -> PenaltyState:
    """The state of a form built with ``report=False``: NaN where the values would be (in the dtype
    and on the device the report would have)."""
    nan = torch.full_like(like.value, float("nan"))
    return PenaltyState(count=count, value=nan, terms={name: nan for name in like.terms})


def _next_report(penalty: Penalty, fp: FlatParams, state: PenaltyState, report: bool) -> PenaltyState:
    """The state after an update: the penalty at the params before it, or NaN without a report."""
    if report:
        return _report(penalty, fp, state.count + 1)
    return _unreported(state, state.count + 1)


def _first_report(penalty: Penalty, fp: FlatParams, count: torch.Tensor, report: bool) -> PenaltyState:
    state = _report(penalty, fp, count)  # computed once, for the term names and the dtype
    return state if report else _unreported(state, count)


def penalized(
    loss_fn: Callable[..., Any], penalty: Penalty, has_aux: bool = False
) -> Callable[..., tuple[torch.Tensor, dict[str, Any]]]:
    """The loss-term form: ``f(params, *args) -> (data_loss + P(params), metrics)``.

    The returned function has ``loss_fn``'s arguments (params first) and is ready for
    ``torch.func.grad_and_value(f, has_aux=True)``. ``metrics`` holds ``"data_loss"``, ``"penalty"``,
    ``"penalty/<name>"`` for each term and ``"total"`` (detached), plus ``"aux"`` when ``loss_fn``
    returns ``(loss, aux)`` and ``has_aux=True``.

    Examples:
        >>> import torch, funcreg as fr
        >>> from torch.func import grad_and_value
        >>> f = fr.penalized(lambda p, x: (p["w"] * x).sum(), fr.l2(0.1))
        >>> g, (total, metrics) = grad_and_value(f, has_aux=True)({"w": torch.tensor([2.0])}, torch.tensor([1.0]))
        >>> g["w"], metrics["data_loss"], metrics["penalty/l2"]  # 1 + 0.1 * 2, 2, 0.1/2 * 4
        (tensor([1.2000]), tensor(2.), tensor(0.2000))
    """
    if not callable(loss_fn):
        raise TypeError(f"penalized expects a callable loss_fn, got {loss_fn!r}")
    _check_penalty(penalty, "penalized")
    check_bool("has_aux", has_aux)

    def total_fn(params: PyTree, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        out = loss_fn(params, *args, **kwargs)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError("loss_fn must return (loss, aux) when has_aux=True")
            data_loss, aux = out
        else:
            data_loss, aux = out, None
        if not isinstance(data_loss, torch.Tensor) or data_loss.ndim != 0:
            raise TypeError(f"loss_fn must return a 0-d tensor, got {data_loss!r}")
        pen = penalty_metrics(penalty.terms(params))
        total = data_loss + pen["penalty"]
        metrics: dict[str, Any] = {"data_loss": data_loss.detach()}
        metrics.update({k: v.detach() for k, v in pen.items()})
        metrics["total"] = total.detach()
        if has_aux:
            metrics["aux"] = aux
        return total, metrics

    return total_fn


def add_penalty_grad(penalty: Penalty, *, report: bool = True) -> GradientTransformation:
    """The coupled form: ``u <- u + grad P(w)``, placed first in a chain (before momentum/Adam).

    Gives the optimizer the same gradient as the loss term ``P(w)`` would, without autograd work.
    ``add_decayed_weights(wd)`` is ``add_penalty_grad(l2(wd))``. Parameters whose update is ``None``
    are left alone. The state (:class:`PenaltyState`) holds the penalty's value at the params;
    ``report=False`` leaves it NaN and saves computing it (one read of the parameters per step).

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.chain(fr.add_penalty_grad(fr.l1(0.1)), fr.sgd(1.0))
        >>> params = {"w": torch.tensor([2.0, -3.0])}
        >>> u, state = tx.update({"w": torch.zeros(2)}, tx.init(params), params)
        >>> u["w"], state[0].value  # -sign(w) * 0.1, and 0.1 * 5
        (tensor([-0.1000,  0.1000]), tensor(0.5000))
    """
    _check_penalty(penalty, "add_penalty_grad")
    check_bool("report", report)
    tx = _gradient_edit(penalty, "add_penalty_grad", lambda count: 1.0, report)
    tx = tx.with_record(form=PenaltyForm("coupled", penalty, None, report))  # see kernels/fused_forms.py
    return configured(tx, "add_penalty_grad", penalty, **_unless_reported(report))


def _unless_reported(report: bool) -> dict[str, bool]:
    return {} if report else {"report": False}  # the printed configuration names it only when off


def _gradient_edit(
    penalty: Penalty, who: str, alpha: Callable[[torch.Tensor], Any], report: bool
) -> GradientTransformation:
    """``u <- u + alpha(count) * grad P(w)``: the coupled form (alpha 1) and the decoupled one (-s_t)."""

    def init(params: PyTree) -> PenaltyState:
        return _first_report(penalty, FlatParams.of(params), init_count(params), report)

    def update(
        updates: PyTree, state: PenaltyState, params: PyTree | None = None
    ) -> tuple[PyTree, PenaltyState]:
        expect_state(state, PenaltyState, who)
        f = flat(updates, params, who, needs_params=True)
        fp = FlatParams.of(params)
        grads = penalty.grad_flat(fp)
        # leaves the penalty does not select (grad None) and frozen ones (update None) pass through
        idx = [i for i in f.index if grads[i] is not None]
        out = list(f.updates)
        present_grads = cast("list[torch.Tensor]", [grads[i] for i in idx])  # idx: where grads are not None
        for i, n in zip(
            idx, leafwise.add([f.updates[i] for i in idx], present_grads, alpha=alpha(state.count))
        ):
            out[i] = n
        return f.tree([out[i] for i in f.index]), _next_report(penalty, fp, state, report)

    return GradientTransformation(init, update)


def _step_size(learning_rate: ScalarOrSchedule | None, count: torch.Tensor) -> Any:
    if learning_rate is None:
        return 1.0
    return schedule_value(learning_rate, leafwise.concrete(count))


def decoupled(
    penalty: Penalty, learning_rate: ScalarOrSchedule | None = None, *, report: bool = True
) -> GradientTransformation:
    """The decoupled form: ``u <- u - s_t * grad P(w)``, placed after the learning-rate scaling.

    ``s_t`` follows :func:`funcreg.decoupled_weight_decay`: the learning rate (or schedule value) at
    this step when given, else 1. ``decoupled_weight_decay(wd, lr, scale_by="learning_rate")`` is ``decoupled(l2(wd), lr)``.
    ``report=False``: the state's value stays NaN (see :func:`add_penalty_grad`).

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.chain(fr.adam(0.1), fr.decoupled(fr.l2(0.5), learning_rate=0.1))  # AdamW
        >>> params = {"w": torch.tensor([2.0])}
        >>> u, _ = tx.update({"w": torch.zeros(1)}, tx.init(params), params)
        >>> u["w"]  # -0.1 * 0.5 * 2
        tensor([-0.1000])
    """
    _check_penalty(penalty, "decoupled")
    if learning_rate is not None:
        check_rate("learning_rate", learning_rate)
    check_bool("report", report)
    tx = _gradient_edit(penalty, "decoupled", lambda count: -_step_size(learning_rate, count), report)
    tx = tx.with_record(form=PenaltyForm("decoupled", penalty, learning_rate, report))
    return configured(tx, "decoupled", penalty, learning_rate=learning_rate, **_unless_reported(report))


def proximal(
    penalty: Penalty, learning_rate: ScalarOrSchedule, *, report: bool = True
) -> GradientTransformation:
    """The proximal form, last in a chain: the new weights are ``prox_{s_t P}(w + u)``.

    Returns the update ``prox_{s_t P}(w + u) - w``, so that :func:`funcreg.apply_updates` lands
    exactly on the prox (a zero of the prox is an exact zero: ``w + (-w) == 0`` in floating point).
    ``s_t`` is the learning rate (or schedule value) at this step. With L1 this is ISTA/proximal SGD
    and produces exact zeros; constraints (``max_norm``, ``non_negative``) become projections.
    ``report=False``: the state's value stays NaN (see :func:`add_penalty_grad`).

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.chain(fr.sgd(0.1), fr.proximal(fr.l1(1.0), learning_rate=0.1))
        >>> params = {"w": torch.tensor([0.05, 1.0])}
        >>> u, _ = tx.update({"w": torch.zeros(2)}, tx.init(params), params)
        >>> fr.apply_updates(params, u)["w"]  # soft-threshold by 0.1: an exact zero, and 0.9
        tensor([0.0000, 0.9000])
    """
    _check_penalty(penalty, "proximal")
    check_rate("learning_rate", learning_rate)
    check_bool("report", report)
    if not penalty.has_prox:
        raise NotImplementedError(
            f"penalty {penalty.name!r} has no closed-form proximal map; use another form"
        )

    def init(params: PyTree) -> PenaltyState:
        fp = FlatParams.of(params)
        # a sum of penalties has a prox only where one non-quadratic term selects a parameter: find out now,
        # not at the first update
        reason = penalty.why_no_prox(fp)
        if reason is not None:
            raise NotImplementedError(reason)
        return _first_report(penalty, fp, init_count(params), report)

    def update(
        updates: PyTree, state: PenaltyState, params: PyTree | None = None
    ) -> tuple[PyTree, PenaltyState]:
        expect_state(state, PenaltyState, "proximal")
        f = flat(updates, params, "proximal", needs_params=True)
        fp = FlatParams.of(params)
        new_state = _next_report(penalty, fp, state, report)
        s = _step_size(learning_rate, state.count)
        assert f.params is not None  # flat(..., needs_params=True)
        moved = list(f.params)
        for i, w in zip(f.index, leafwise.add(f.present_updates(), f.present_params())):
            moved[i] = w
        proxed = penalty.prox_flat(fp.with_leaves(moved), s)
        out = []
        for i in f.index:
            out.append(f.updates[i] if proxed[i] is None else proxed[i] - f.params[i])
        return f.tree(out), new_state

    form = PenaltyForm("proximal", penalty, learning_rate, report)
    return configured(
        GradientTransformation(init, update, TransformRecord(form=form)),
        "proximal",
        penalty,
        learning_rate=learning_rate,
        **_unless_reported(report),
    )


def penalty_states(state: Any) -> list[PenaltyState]:
    """Every :class:`PenaltyState` inside a (chained, masked, named) transform state, in order.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.chain(fr.add_penalty_grad(fr.l2(0.1)), fr.sgd(0.1))
        >>> [s.value for s in fr.penalty_states(tx.init({"w": torch.ones(2)}))]
        [tensor(0.1000)]
    """
    return find_states(state, PenaltyState)
