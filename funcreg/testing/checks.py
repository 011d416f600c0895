"""Property checks users can run on their own penalties: gradient, prox and form consistency.

Each check runs a Hypothesis search and raises ``AssertionError`` with the shrunk counterexample
(Hypothesis attaches the drawn parameters to the error) when a property fails.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st

from funcreg._src.base import GradientTransformation
from funcreg._src.combine import chain
from funcreg._src.forms import add_penalty_grad, decoupled, penalized
from funcreg._src.penalties import Penalty, SumPenalty
from funcreg._src.tree import PyTree, flatten, leaf_names, unflatten
from funcreg._src.update import apply_updates
from funcreg.testing.strategies import like, param_trees, tensors

__all__ = ["check_forms_agree", "check_penalty"]

ParamsLike = Union[None, PyTree, st.SearchStrategy]


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


def _settings(max_examples: int, shrink: bool) -> settings:
    phases = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target] + ([Phase.shrink] if shrink else [])
    return settings(
        deadline=None,
        max_examples=max_examples,
        database=None,
        phases=phases,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def _assert_trees_close(actual: PyTree, expected: PyTree, atol: float, rtol: float, what: str) -> None:
    a_leaves, _ = flatten(actual)
    e_leaves, _ = flatten(expected)
    names = leaf_names(expected)
    for name, a, e in zip(names, a_leaves, e_leaves):
        if a is None and e is None:
            continue
        if a is None or e is None:
            raise AssertionError(f"{what}: {name!r} is None on one side only")
        try:
            torch.testing.assert_close(a, e, atol=atol, rtol=rtol, check_dtype=False)
        except AssertionError as err:
            raise AssertionError(f"{what}: leaf {name!r} differs\n{err}") from None


def _objective(penalty: Penalty, z: PyTree, v: PyTree, step: float) -> float:
    """``1/2 ||z - v||^2 + step * P(z)`` in float64."""
    z_leaves, spec = flatten(z)
    v_leaves, _ = flatten(v)
    z64 = unflatten([None if x is None else x.double() for x in z_leaves], spec)
    quad = sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(z_leaves, v_leaves) if a is not None)
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
) -> None:
    """Checks a penalty's value, gradient and prox against each other on drawn parameters.

    Properties (each only where the penalty has that form):

    * ``P(params)`` is a finite 0-d tensor and equals the sum of ``P.terms(params)``;
    * ``P.grad(params)`` equals ``torch.func.grad(P)(params)`` (catches a wrong closed-form gradient);
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
            the first failure found at once.

    Raises:
        AssertionError: with the shrunk counterexample, when a property fails.

    Examples:
        >>> import torch, funcreg as fr
        >>> from funcreg.testing import check_penalty
        >>> check_penalty(fr.l1(0.3), max_examples=10)
        >>> wrong = fr.penalty(lambda p: (p["w"] ** 2).sum(), grad=lambda p: {"w": p["w"]})  # should be 2w
        >>> try:
        ...     check_penalty(wrong, {"w": torch.ones(3, dtype=torch.float64)}, max_examples=10)
        ... except AssertionError as e:
        ...     print("caught:", str(e).splitlines()[0])
        caught: P.grad vs torch.func.grad(P): leaf 'w' differs
    """
    if not isinstance(penalty, Penalty):
        raise TypeError(f"check_penalty expects a funcreg penalty, got {type(penalty).__name__}")
    strategy = _params_strategy(params, dtype)

    @_settings(max_examples, shrink)
    @given(data=st.data())
    def run(data: Any) -> None:
        p = data.draw(strategy, label="params")
        try:
            value = penalty(p)
        except ValueError as err:
            if "selects no parameter" in str(err) and params is None:
                reject()  # a generic tree without a tensor this penalty applies to (e.g. no matrix)
            raise
        assert isinstance(value, torch.Tensor) and value.ndim == 0, f"P(params) is not a 0-d tensor: {value!r}"
        if penalty.has_grad:
            assert torch.isfinite(value), f"P(params) is not finite: {value}"
            total = sum(float(v) for v in penalty.terms(p).values())
            assert abs(total - float(value)) <= atol + rtol * abs(float(value)), "terms do not add up to P(params)"
            _assert_trees_close(penalty.grad(p), torch.func.grad(penalty)(p), atol, rtol, "P.grad vs torch.func.grad(P)")
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
                            [None if a is None else a.double() + sign * h * b.double() for a, b in zip(z_leaves, d)], spec
                        )
                        other = _objective(penalty, moved, p, step)
                        assert other >= best - tol, (
                            f"P.prox is not the minimiser of 1/2||z - v||^2 + step * P(z): moving z by {sign * h:g} "
                            f"along a direction lowers it from {best!r} to {other!r} (step={step!r})"
                        )

    run()


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


def check_forms_agree(
    penalty: Penalty,
    optimizer: GradientTransformation,
    params: ParamsLike = None,
    *,
    learning_rate: Optional[float] = None,
    steps: int = 5,
    dtype: torch.dtype = torch.float64,
    max_examples: int = 25,
    atol: float = 1e-10,
    rtol: float = 1e-8,
    shrink: bool = True,
) -> None:
    """Checks that the forms of a penalty that must agree do, over several optimizer steps.

    With random data gradients ``g_t`` (a linear data loss), runs

    * the loss-term form: ``torch.func.grad(fr.penalized(loss, P))`` fed to ``optimizer``;
    * the coupled form: ``fr.chain(fr.add_penalty_grad(P), optimizer)`` fed ``g_t``;
    * when ``learning_rate`` is given (only valid for plain SGD without momentum, where the forms
      coincide): the decoupled form ``fr.chain(optimizer, fr.decoupled(P, learning_rate))``;

    and checks that the parameter trajectories agree at every step. Parameters the penalty does not
    select must follow the optimizer without the penalty exactly (bit for bit). ``shrink=False``
    reports the first failing example without minimising it.

    Raises:
        AssertionError: with the shrunk counterexample, when a property fails.

    Examples:
        >>> import torch, funcreg as fr
        >>> from funcreg.testing import check_forms_agree
        >>> check_forms_agree(fr.l2(0.1), fr.sgd(0.05), learning_rate=0.05, max_examples=5)
        >>> check_forms_agree(fr.elastic_net(0.01, 0.1), fr.adam(0.01), max_examples=5)
    """
    if not isinstance(penalty, Penalty):
        raise TypeError(f"check_forms_agree expects a funcreg penalty, got {type(penalty).__name__}")
    if not isinstance(optimizer, GradientTransformation):
        raise TypeError(f"check_forms_agree expects a GradientTransformation, got {type(optimizer).__name__}")
    strategy = _params_strategy(params, dtype)
    loss_term = penalized(_linear_loss, penalty)
    coupled = chain(add_penalty_grad(penalty), optimizer)
    decoupled_form = None if learning_rate is None else chain(optimizer, decoupled(penalty, learning_rate))

    @_settings(max_examples, shrink)
    @given(data=st.data())
    def run(data: Any) -> None:
        p0 = data.draw(strategy, label="params")
        selected = penalty.selection(p0)
        names = leaf_names(p0)
        runs = {"loss term": [p0, optimizer.init(p0)], "coupled": [p0, coupled.init(p0)], "no penalty": [p0, optimizer.init(p0)]}
        if decoupled_form is not None:
            runs["decoupled"] = [p0, decoupled_form.init(p0)]
        for t in range(steps):
            g = data.draw(like(p0, max_abs=1.0), label=f"data gradient {t}")
            for form, (p, s) in runs.items():
                if form == "loss term":
                    grads, _ = torch.func.grad(loss_term, has_aux=True)(p, g)
                    u, s = optimizer.update(grads, s, p)
                elif form == "coupled":
                    u, s = coupled.update(g, s, p)
                elif form == "decoupled":
                    u, s = decoupled_form.update(g, s, p)
                else:
                    u, s = optimizer.update(g, s, p)
                runs[form] = [apply_updates(p, u), s]
            reference = runs["loss term"][0]
            for form in runs:
                if form in ("loss term", "no penalty"):
                    continue
                _assert_trees_close(runs[form][0], reference, atol, rtol, f"step {t + 1}: {form} form vs loss-term form")
            plain, _ = flatten(runs["no penalty"][0])
            coupled_leaves, _ = flatten(runs["coupled"][0])
            for name, a, b in zip(names, coupled_leaves, plain):
                if not selected[name] and a is not None and not torch.equal(a, b):
                    raise AssertionError(f"step {t + 1}: unselected parameter {name!r} was changed by the penalty")

    run()
