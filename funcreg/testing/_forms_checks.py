"""``check_forms_agree``: the loss-term, coupled and decoupled forms of a penalty step alike.

Every form steps from the same parameters each step, and gradients are compared before the
optimizer and parameters after it (see the docstring of ``check_forms_agree``), so a rounding
residue in one form cannot flip ``sign(w)`` in the next step, nor can the optimizer amplify a
rounding-level gradient difference into a failure.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given
from hypothesis import strategies as st

from funcreg._src.combinators.combine import chain
from funcreg._src.core.base import GradientTransformation
from funcreg._src.core.tree import flatten, tree_names, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.forms.forms import add_penalty_grad, decoupled, penalized
from funcreg._src.kernels.update import apply_updates
from funcreg._src.penalties import Penalty
from funcreg.testing._kinks import _assert_grad_matches, _assert_trees_close
from funcreg.testing._search import ParamsLike, _check_seed, _note, _params_strategy, _run, _settings
from funcreg.testing.strategies import like


def _linear_loss(params: PyTree, data_grads: PyTree) -> torch.Tensor:
    """A data loss whose gradient is exactly ``data_grads``: ``sum_leaves <g, w>``."""
    p_leaves, _ = flatten(params)
    g_leaves, _ = flatten(data_grads)
    total = None
    for w, g in zip(p_leaves, g_leaves):
        if w is None:
            continue
        term = torch.sum(w * g)
        total = term if total is None else total + term
    assert total is not None
    return total


def _forms_gradient(
    penalty: Penalty,
    params: PyTree,
    data_grads: PyTree,
    grads: PyTree,
    selected: dict[str, bool],
    atol: float,
    rtol: float,
    step: int,
) -> PyTree:
    """Checks the loss-term form's gradient ``grads`` (autograd of ``<g, w> + P(w)``) against the
    coupled form's edit, ``P.grad(params)``, and returns the gradient the coupled form feeds the
    optimizer: ``data_grads + P.grad(params)`` on the parameters ``P`` selects, ``data_grads`` on
    the others.

    The penalty part of ``grads`` is ``grads - data_grads``; it must equal ``P.grad`` coordinate by
    coordinate within ``atol + rtol * |.|``, or, at a kink, ``P.grad`` must lie between the
    one-sided partials (:func:`_assert_grad_matches`).
    """
    g_leaves, spec = flatten(grads)
    d_leaves, _ = flatten(data_grads)
    if not penalty.has_grad:
        return grads
    autograd = unflatten(
        [None if x is None or d is None else x - d for x, d in zip(g_leaves, d_leaves)], spec
    )
    try:
        closed = _assert_grad_matches(
            penalty, params, atol, rtol, f"step {step}: coupled form vs loss-term form", autograd
        )
    except AssertionError as err:
        _note(
            err,
            "Compared at the same parameters: the coupled form's gradient edit P.grad(w) against the "
            "penalty part of the loss-term form's gradient (autograd of <g, w> + P(w), less g).",
        )
        raise
    c_leaves, _ = flatten(closed)
    out = [
        None if x is None else (x if d is None else (d + c.to(d.dtype) if selected[name] else d))
        for name, x, d, c in zip(tree_names(params), g_leaves, d_leaves, c_leaves)
    ]
    return unflatten(out, spec)


def _other_forms(
    penalty: Penalty, optimizer: GradientTransformation, learning_rate: float | None
) -> dict[str, GradientTransformation]:
    """The transforms stepped beside the loss-term form, fed the data gradient alone: the coupled
    form, the optimizer without the penalty (what unselected parameters must follow), and the
    decoupled form when ``learning_rate`` is given."""
    others = {"coupled": chain(add_penalty_grad(penalty), optimizer), "no penalty": optimizer}
    if learning_rate is not None:
        others["decoupled"] = chain(optimizer, decoupled(penalty, learning_rate))
    return others


def _step_forms(
    optimizer: GradientTransformation,
    others: dict[str, GradientTransformation],
    states: dict[str, Any],
    p: PyTree,
    data_grads: PyTree,
    grads: PyTree,
) -> tuple[PyTree, dict[str, PyTree]]:
    """One step of every form from the common point ``p``, updating ``states`` in place: the
    reference ``w_{t+1}`` (the optimizer fed ``grads``) and each other form's ``w_{t+1}``."""
    u, states["loss term"] = optimizer.update(grads, states["loss term"], p)
    reference = apply_updates(p, u)
    stepped = {}
    for form, tx in others.items():
        u, states[form] = tx.update(data_grads, states[form], p)
        stepped[form] = apply_updates(p, u)
    return reference, stepped


def _assert_forms_agree(
    stepped: dict[str, PyTree],
    reference: PyTree,
    selected: dict[str, bool],
    names: list[str],
    atol: float,
    rtol: float,
    step: int,
) -> None:
    """The coupled (and decoupled) form's ``w_{t+1}`` is close to the reference, and the coupled
    form leaves the parameters the penalty does not select exactly where the plain optimizer does."""
    for form in ("coupled", "decoupled"):
        if form in stepped:
            _assert_trees_close(
                stepped[form], reference, atol, rtol, f"step {step}: {form} form vs loss-term form"
            )
    plain, _ = flatten(stepped["no penalty"])
    coupled_leaves, _ = flatten(stepped["coupled"])
    for name, a, b in zip(names, coupled_leaves, plain):
        if not selected[name] and a is not None and not torch.equal(a, b):
            raise AssertionError(f"step {step}: unselected parameter {name!r} was changed by the penalty")


def check_forms_agree(
    penalty: Penalty,
    optimizer: GradientTransformation,
    params: ParamsLike = None,
    *,
    learning_rate: float | None = None,
    steps: int = 5,
    dtype: torch.dtype = torch.float64,
    max_examples: int = 25,
    atol: float = 1e-10,
    rtol: float = 1e-8,
    shrink: bool = True,
    seed: int | None = None,
) -> None:
    """Checks that the forms of a penalty that must agree do, at each of several optimizer steps.

    With random data gradients ``g_t`` (a linear data loss), steps

    * the loss-term form: ``torch.func.grad(fr.penalized(loss, P))`` fed to ``optimizer``;
    * the coupled form: ``fr.chain(fr.add_penalty_grad(P), optimizer)`` fed ``g_t``;
    * when ``learning_rate`` is given (only valid for plain SGD without momentum, where the forms
      coincide): the decoupled form ``fr.chain(optimizer, fr.decoupled(P, learning_rate))``;

    and checks at every step that they agree (the rule below). Parameters the penalty does not
    select must follow the optimizer without the penalty exactly (bit for bit).

    Comparison rule. Every step starts all forms from the same parameters ``w_t`` (each keeps its own
    state: momentum, Adam's moments, the penalty state), and compares each quantity where it is
    computed:

    1. the gradients: the penalty part of the loss-term form's gradient (autograd of
       ``<g_t, w> + P(w)``, less ``g_t``) must equal the coupled form's edit ``P.grad(w_t)``
       coordinate by coordinate within ``atol + rtol * |.|``; at a kink, where autograd and
       ``P.grad`` may pick different subgradients, ``P.grad`` must lie between the one-sided partial
       derivatives (the kink rule of :func:`check_penalty`). A wrong gradient fails here, as
       ``step t: coupled form vs loss-term form``;
    2. the updates: the optimizer fed that gradient, ``g_t + P.grad(w_t)``, gives the reference
       ``w_{t+1}``, the next common point; the coupled (and decoupled) form's own ``w_{t+1}`` must
       agree with it within ``atol + rtol * |w|``. A form that edits the gradient wrongly, or keeps
       its state wrongly (the decoupled form under momentum or Adam), fails here.

    So a rounding residue cannot flip ``sign(w)`` at the next step (one form at ``0.0``, another at
    ``-8e-19``, a difference of ``lr * coeff`` for L1), and rounding-level gradient differences are
    not judged after the optimizer has amplified them (Adam's first step ``lr * g / (|g| + eps)`` has
    slope ``lr / eps``, 1e6 for ``adam(0.01)``, at ``g = 0``).

    Args:
        penalty: the penalty to check.
        optimizer: the optimizer the forms feed (``fr.sgd(lr)``, ``fr.adam(lr)``, ...).
        params: a parameter tree whose shapes and names to reuse (values are drawn), a Hypothesis
            strategy of trees, or ``None`` for generic small trees.
        learning_rate: the optimizer's learning rate, to check the decoupled form too (plain SGD only).
        steps: optimizer steps per example.
        dtype: dtype of drawn trees when ``params`` is ``None``.
        max_examples: Hypothesis examples to try.
        atol: absolute tolerance of the comparisons (gradients and parameters).
        rtol: relative tolerance of the comparisons.
        shrink: let Hypothesis shrink a failing example; ``False`` reports the first failure at once.
        seed: seed of the Hypothesis search (``None``: the loaded profile decides). A failure notes
            the seed it ran with.

    Raises:
        AssertionError: with the shrunk counterexample, when a property fails.

    Examples:
        >>> import torch, funcreg as fr
        >>> from funcreg.testing import check_forms_agree
        >>> check_forms_agree(fr.l2(0.1), fr.sgd(0.05), learning_rate=0.05, max_examples=5)
        >>> check_forms_agree(fr.elastic_net(0.01, 0.1), fr.adam(0.01), max_examples=5)
        >>> wrong = fr.penalty(lambda p: 0.1 * p["w"].abs().sum(), grad=lambda p: {"w": 0.2 * torch.sign(p["w"])})
        >>> try:
        ...     check_forms_agree(wrong, fr.sgd(0.05), {"w": torch.zeros(4, dtype=torch.float64)}, max_examples=5, shrink=False)
        ... except AssertionError as e:
        ...     print("caught:", str(e).splitlines()[0])  # doctest: +ELLIPSIS
        caught: step ...: coupled form vs loss-term form: leaf 'w' differs
    """
    if not isinstance(penalty, Penalty):
        raise TypeError(f"check_forms_agree expects a funcreg penalty, got {type(penalty).__name__}")
    if not isinstance(optimizer, GradientTransformation):
        raise TypeError(f"check_forms_agree expects a GradientTransformation, got {type(optimizer).__name__}")
    _check_seed(seed)
    strategy = _params_strategy(params, dtype)
    loss_term = penalized(_linear_loss, penalty)
    others = _other_forms(penalty, optimizer, learning_rate)

    @_settings(max_examples, shrink)
    @given(data=st.data())
    def run(data: Any) -> None:
        p0 = data.draw(strategy, label="params")
        selected = penalty.selection(p0)
        names = tree_names(p0)
        states = {"loss term": optimizer.init(p0), **{form: tx.init(p0) for form, tx in others.items()}}
        p = p0  # the common point: the loss-term form's parameters
        for t in range(steps):
            g = data.draw(like(p0, max_abs=1.0), label=f"data gradient {t}")
            grads, _ = torch.func.grad(loss_term, has_aux=True)(p, g)
            grads = _forms_gradient(penalty, p, g, grads, selected, atol, rtol, t + 1)
            reference, stepped = _step_forms(optimizer, others, states, p, g, grads)
            _assert_forms_agree(stepped, reference, selected, names, atol, rtol, t + 1)
            p = reference

    _run(run, seed, "check_forms_agree")
