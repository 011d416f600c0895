"""Property checks users can run on their own penalties: gradient, prox and form consistency.

Each check runs a Hypothesis search and raises ``AssertionError`` with the shrunk counterexample
(Hypothesis attaches the drawn parameters to the error) when a property fails.

Kinks. A non-smooth penalty (L1, group lasso, a hinge) has no gradient at its kinks, and two
correct implementations may pick different subgradients there, or land on opposite sides of a kink
after rounding. The checks therefore compare gradients coordinate by coordinate and excuse a
mismatch only where a kink explains it: the closed-form value must lie between the one-sided
partial derivatives, read by autograd at the point moved by ``64 * eps * max(1, |x|)`` either way
along that coordinate. At a point where the penalty is differentiable those collapse onto the
gradient, so a wrong gradient is still caught there. ``check_forms_agree`` moreover steps every
form from the same parameters each step and compares gradients before the optimizer and parameters
after it (see its docstring), so a rounding residue in one form cannot flip ``sign(w)`` in the next
step, nor can the optimizer amplify a rounding-level gradient difference into a failure.

Settings. The checks build their Hypothesis settings at call time on top of the loaded profile:
they fix ``deadline=None`` and ``database=None``, drop the shrink phase when ``shrink=False``, and
inherit everything else (``derandomize``, ``print_blob``, the other phases, the profile's health
check suppressions). Pass ``seed=`` to replay one search; a failure notes the seed it ran with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from funcreg._src.base import GradientTransformation
from funcreg._src.combine import chain
from funcreg._src.errors import SelectionError
from funcreg._src.forms import add_penalty_grad, decoupled, penalized
from funcreg._src.penalties import Penalty, SumPenalty
from funcreg._src.tree import flatten, tree_names, unflatten
from funcreg._src.typing import PyTree
from funcreg._src.update import apply_updates
from funcreg.testing.strategies import like, param_trees, tensors

__all__ = ["check_forms_agree", "check_penalty"]

ParamsLike = Union[None, PyTree, st.SearchStrategy]


def _note(err: BaseException, text: str) -> None:
    """``err.add_note(text)`` (Python 3.11+); on 3.10 the note is appended to the message."""
    if hasattr(err, "add_note"):
        err.add_note(text)
    elif err.args:
        err.args = (f"{err.args[0]}\n{text}", *err.args[1:])


@st.composite
def _generic_trees(draw: Any, dtype: torch.dtype) -> PyTree:
    """Small flat trees that always hold a matrix (penalties such as group_lasso select only those)."""
    tree = draw(param_trees(dtype=dtype, max_leaves=3, max_ndim=2, max_side=4, max_abs=5.0))
    if not any(x.ndim >= 2 for x in tree.values()):
        rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        tree["matrix"] = draw(tensors((rows, cols), dtype=dtype, max_abs=5.0))
    return tree


def _params_strategy(params: ParamsLike, dtype: torch.dtype) -> st.SearchStrategy:
    if params is None:
        return _generic_trees(dtype)
    if isinstance(params, st.SearchStrategy):
        return params
    return like(params)


_SUPPRESSED = (HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much)


def _settings(max_examples: int, shrink: bool) -> settings:
    """Settings for one check, on top of the loaded profile (``derandomize``, ``print_blob``, ... inherited).

    The phases are the profile's, less ``Phase.shrink`` when ``shrink`` is false: a profile without
    the shrink phase (a test suite's "no shrink" profile) is honoured.
    """
    base = settings.default
    assert base is not None  # Hypothesis always has a loaded profile
    phases = [p for p in base.phases if shrink or p != Phase.shrink]
    suppressed = list(dict.fromkeys([*base.suppress_health_check, *_SUPPRESSED]))
    return settings(
        deadline=None,
        max_examples=max_examples,
        database=None,
        phases=phases,
        report_multiple_bugs=False,  # one AssertionError, never an ExceptionGroup
        suppress_health_check=suppressed,
    )


def _run(run: Callable[[], None], seed: int | None, check: str) -> None:
    """Runs a ``@given`` function, seeded when ``seed`` is given; a failure notes how to replay it."""
    if seed is not None:
        run = hypothesis_seed(seed)(run)
    try:
        run()
    except AssertionError as err:
        used = seed if seed is not None else getattr(run, "_hypothesis_internal_use_generated_seed", None)
        if used is not None:
            _note(err, f"{check}: replay this search by passing seed={used} (with the same arguments).")
        raise


def _check_seed(seed: int | None) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"Invalid seed value: {seed!r} (expected an int or None)")


def _assert_trees_close(actual: PyTree, expected: PyTree, atol: float, rtol: float, what: str) -> None:
    a_leaves, _ = flatten(actual)
    e_leaves, _ = flatten(expected)
    names = tree_names(expected)
    for name, a, e in zip(names, a_leaves, e_leaves):
        if a is None and e is None:
            continue
        if a is None or e is None:
            raise AssertionError(f"{what}: {name!r} is None on one side only")
        try:
            torch.testing.assert_close(a, e, atol=atol, rtol=rtol, check_dtype=False)
        except AssertionError as err:
            raise AssertionError(f"{what}: leaf {name!r} differs\n{err}") from None


def _kink_step(x: float, dtype: torch.dtype) -> float:
    """How far a kink may be from ``x`` and still count as being at ``x``: 64 units of rounding."""
    return 64.0 * torch.finfo(dtype).eps * max(1.0, abs(x))


def _one_sided_partials(penalty: Penalty, params: PyTree, leaf: int, index: int) -> tuple[float, float]:
    """Autograd's partial derivative of ``P`` along coordinate ``index`` of leaf ``leaf``, read at
    ``params`` moved by ``-h`` and by ``+h`` along that coordinate (``h`` from :func:`_kink_step`).

    At a point where ``P`` is differentiable both are the gradient (to rounding); at a kink (within
    ``h`` of one) they are the one-sided derivatives, and every subgradient lies between them.
    """
    leaves, spec = flatten(params)
    x = leaves[leaf]
    h = _kink_step(float(x.reshape(-1)[index]), x.dtype)
    out = []
    for sign in (-1.0, 1.0):
        moved = x.detach().reshape(-1).clone()
        moved[index] += sign * h
        tree = unflatten([moved.reshape(x.shape) if i == leaf else y for i, y in enumerate(leaves)], spec)
        g = flatten(torch.func.grad(penalty)(tree))[0][leaf]
        out.append(float(g.reshape(-1)[index]))
    return out[0], out[1]


def _kink_excused(
    penalty: Penalty,
    params: PyTree,
    closed: PyTree,
    autograd: PyTree,
    atol: float,
    rtol: float,
    stop_at_unexplained: bool = False,
) -> list[torch.Tensor | None]:
    """Per leaf, a mask of the coordinates where ``closed`` (``P.grad``) differs from ``autograd``
    (``torch.func.grad(P)``) beyond ``atol + rtol * |autograd|`` and a kink explains it: the closed
    form lies between the one-sided partials of :func:`_one_sided_partials` (with the same tolerance).
    ``None`` for a ``None`` leaf. At a point where ``P`` is differentiable nothing is excused.

    ``stop_at_unexplained``: return at the first difference no kink explains (the caller fails then
    anyway), leaving the coordinates after it unexcused; saves two autograd calls per coordinate of
    a wrong gradient while Hypothesis shrinks.
    """
    c_leaves, _ = flatten(closed)
    a_leaves, _ = flatten(autograd)
    out: list[torch.Tensor | None] = []
    for i, (c, a) in enumerate(zip(c_leaves, a_leaves)):
        if c is None or a is None:
            out.append(None)
            continue
        c64, a64 = c.detach().double().reshape(-1), a.detach().double().reshape(-1)
        mask = torch.zeros(c64.shape, dtype=torch.bool)
        mismatched = ~torch.isclose(c64, a64, rtol=rtol, atol=atol)
        for j in torch.nonzero(mismatched).flatten().tolist():
            below, above = _one_sided_partials(penalty, params, i, j)
            lo = min(below, above, float(a64[j]))
            hi = max(below, above, float(a64[j]))
            value = float(c64[j])
            if lo - (atol + rtol * abs(lo)) <= value <= hi + (atol + rtol * abs(hi)):
                mask[j] = True
            elif stop_at_unexplained:
                out.append(mask.reshape(c.shape))
                return out + [None] * (len(c_leaves) - len(out))
        out.append(mask.reshape(c.shape))
    return out


def _assert_grad_matches(
    penalty: Penalty,
    params: PyTree,
    atol: float,
    rtol: float,
    what: str = "P.grad vs torch.func.grad(P)",
    autograd: PyTree | None = None,
) -> PyTree:
    """``P.grad`` equals ``torch.func.grad(P)`` (or ``autograd``) coordinate by coordinate, except
    where a kink explains the difference (:func:`_kink_excused`). Returns ``P.grad(params)``."""
    closed = penalty.grad(params)
    if autograd is None:
        autograd = torch.func.grad(penalty)(params)
    a_leaves, spec = flatten(autograd)
    c_leaves, _ = flatten(closed)
    excused = _kink_excused(penalty, params, closed, autograd, atol, rtol, stop_at_unexplained=True)
    expected = [
        a if m is None or not bool(m.any()) else torch.where(m, c.to(a.dtype), a)
        for a, c, m in zip(a_leaves, c_leaves, excused)
    ]
    try:
        _assert_trees_close(closed, unflatten(expected, spec), atol, rtol, what)
    except AssertionError as err:
        _note(
            err,
            "Coordinates at a kink may take any value between the one-sided partial derivatives; "
            "these are not at a kink, or the value is outside them.",
        )
        raise
    return closed


def _objective(penalty: Penalty, z: PyTree, v: PyTree, step: float) -> float:
    """``1/2 ||z - v||^2 + step * P(z)`` in float64."""
    z_leaves, spec = flatten(z)
    v_leaves, _ = flatten(v)
    z64 = unflatten([None if x is None else x.double() for x in z_leaves], spec)
    quad = sum(
        float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(z_leaves, v_leaves) if a is not None
    )
    return 0.5 * quad + step * float(penalty(z64))


def _prox_objective(penalty: Penalty, z: PyTree, v: PyTree, step: float) -> float:
    """The objective at the prox output, in float64; a constraint's value at ``z`` is read in ``z``'s own
    dtype (a float32 projection is feasible to float32's precision, not to float64's)."""
    value = _objective(penalty, z, v, step)
    if value == float("inf") and float(penalty(z)) < float("inf"):
        return _objective(penalty, z, v, 0.0) + step * float(penalty(z))
    return value


def check_penalty(
    penalty: Penalty,
    params: ParamsLike = None,
    *,
    dtype: torch.dtype = torch.float64,
    max_examples: int = 50,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    shrink: bool = True,
    seed: int | None = None,
) -> None:
    """Checks a penalty's value, gradient and prox against each other on drawn parameters.

    Properties (each only where the penalty has that form):

    * ``P(params)`` is a finite 0-d tensor and equals the sum of ``P.terms(params)``;
    * ``P.grad(params)`` equals ``torch.func.grad(P)(params)`` (catches a wrong closed-form gradient),
      coordinate by coordinate, within ``atol + rtol * |autograd|``. At a kink the two may pick
      different subgradients: a coordinate that differs is accepted only if ``P.grad``'s value lies
      between the one-sided partial derivatives there (autograd's, read at the point moved by
      ``h = 64 * eps * max(1, |x|)`` either way along that coordinate). Where ``P`` is
      differentiable those collapse onto the gradient, so nothing is excused; a kink within ``h``
      counts as being at the point. This is a per-coordinate test: at a non-separable kink (a zero
      group of ``group_lasso``) it checks each coordinate of a subgradient, not its norm;
    * ``z = P.prox(v, step)`` minimises ``1/2 ||z - v||^2 + step * P(z)``: no perturbation of ``z``
      (drawn directions, and toward/away from ``v`` and zero, at several scales) does better.

    Args:
        penalty: the penalty to check.
        params: a parameter tree whose shapes and names to reuse (values are drawn), a Hypothesis
            strategy of trees, or ``None`` for generic small trees.
        dtype: dtype of drawn trees when ``params`` is ``None``.
        max_examples: Hypothesis examples to try.
        atol: absolute tolerance of the gradient comparison.
        rtol: relative tolerance of the gradient comparison.
        shrink: let Hypothesis shrink a failing example to a minimal one (seconds); ``False`` reports
            the first failure found at once. A loaded profile without the shrink phase never shrinks.
        seed: seed of the Hypothesis search (``None``: the loaded profile decides, random unless it
            sets ``derandomize``). A failure notes the seed it ran with.

    Raises:
        AssertionError: with the shrunk counterexample, when a property fails.

    Examples:
        >>> import torch, funcreg as fr
        >>> from funcreg.testing import check_penalty
        >>> check_penalty(fr.l1(0.3), max_examples=10)
        >>> wrong = fr.penalty(lambda p: (p["w"] ** 2).sum(), grad=lambda p: {"w": p["w"]})  # should be 2w
        >>> try:
        ...     check_penalty(wrong, {"w": torch.ones(3, dtype=torch.float64)}, max_examples=10, shrink=False)
        ... except AssertionError as e:
        ...     print("caught:", str(e).splitlines()[0])
        caught: P.grad vs torch.func.grad(P): leaf 'w' differs

        At a kink any subgradient passes: autograd reads ``d|w|/dw`` at 0 as 1 for this ``where``,
        the closed form says 0, and both lie in ``[-1, 1]``:

        >>> absolute = lambda p: torch.where(p["w"] >= 0, p["w"], -p["w"]).sum()
        >>> kinked = fr.penalty(absolute, grad=lambda p: {"w": torch.sign(p["w"])})
        >>> check_penalty(kinked, {"w": torch.zeros(3, dtype=torch.float64)}, max_examples=10, seed=0)
    """
    if not isinstance(penalty, Penalty):
        raise TypeError(f"check_penalty expects a funcreg penalty, got {type(penalty).__name__}")
    _check_seed(seed)
    strategy = _params_strategy(params, dtype)

    @_settings(max_examples, shrink)
    @given(data=st.data())
    def run(data: Any) -> None:
        p = data.draw(strategy, label="params")
        try:
            value = penalty(p)
        except SelectionError:
            if params is None:
                reject()  # a generic tree without a tensor this penalty applies to (e.g. no matrix)
            raise
        assert isinstance(value, torch.Tensor) and value.ndim == 0, (
            f"P(params) is not a 0-d tensor: {value!r}"
        )
        if penalty.has_grad:
            assert torch.isfinite(value), f"P(params) is not finite: {value}"
            total = sum(float(v) for v in penalty.terms(p).values())
            assert abs(total - float(value)) <= atol + rtol * abs(float(value)), (
                "terms do not add up to P(params)"
            )
            _assert_grad_matches(penalty, p, atol, rtol)
        if penalty.has_prox:
            step = data.draw(st.floats(1e-3, 2.0), label="step")
            try:
                z = penalty.prox(p, step)
            except NotImplementedError:
                if isinstance(penalty, SumPenalty):
                    return  # terms that select the same parameters: the sum has no closed-form prox
                raise
            best = _prox_objective(penalty, z, p, step)
            assert best < float("inf"), "prox returned a point where the penalty is infinite (infeasible)"
            z_leaves, spec = flatten(z)
            v_leaves, _ = flatten(p)
            directions = [
                [None if a is None else (b - a) for a, b in zip(z_leaves, v_leaves)],  # toward v
                [None if a is None else -a for a in z_leaves],  # toward zero
            ]
            for _ in range(3):
                drawn, _ = flatten(data.draw(like(z, max_abs=1.0), label="direction"))
                directions.append(drawn)
            tol = 1e-9 * (1 + abs(best))
            for d in directions:
                for h in (1e-1, 1e-2, 1e-3):
                    for sign in (1.0, -1.0):
                        moved = unflatten(
                            [
                                None if a is None or b is None else a.double() + sign * h * b.double()
                                for a, b in zip(z_leaves, d)
                            ],
                            spec,
                        )
                        other = _objective(penalty, moved, p, step)
                        assert other >= best - tol, (
                            f"P.prox is not the minimiser of 1/2||z - v||^2 + step * P(z): moving z by {sign * h:g} "
                            f"along a direction lowers it from {best!r} to {other!r} (step={step!r})"
                        )

    _run(run, seed, "check_penalty")


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
    others = {"coupled": chain(add_penalty_grad(penalty), optimizer), "no penalty": optimizer}
    if learning_rate is not None:
        others["decoupled"] = chain(optimizer, decoupled(penalty, learning_rate))
    compared = [form for form in ("coupled", "decoupled") if form in others]

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
            u, states["loss term"] = optimizer.update(grads, states["loss term"], p)
            reference = apply_updates(p, u)
            stepped = {}
            for form, tx in others.items():
                u, states[form] = tx.update(g, states[form], p)
                stepped[form] = apply_updates(p, u)
            for form in compared:
                _assert_trees_close(
                    stepped[form], reference, atol, rtol, f"step {t + 1}: {form} form vs loss-term form"
                )
            plain, _ = flatten(stepped["no penalty"])
            coupled_leaves, _ = flatten(stepped["coupled"])
            for name, a, b in zip(names, coupled_leaves, plain):
                if not selected[name] and a is not None and not torch.equal(a, b):
                    raise AssertionError(
                        f"step {t + 1}: unselected parameter {name!r} was changed by the penalty"
                    )
            p = reference

    _run(run, seed, "check_forms_agree")
