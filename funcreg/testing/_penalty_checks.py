"""``check_penalty``: a penalty's value, gradient and prox checked against each other."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given, reject
from hypothesis import strategies as st

from funcreg._src.core.errors import SelectionError
from funcreg._src.core.tree import flatten, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.penalties import Penalty, SumPenalty
from funcreg.testing._kinks import _assert_grad_matches
from funcreg.testing._search import ParamsLike, _check_seed, _params_strategy, _run, _settings
from funcreg.testing.strategies import like


def _quadratic(z: PyTree, v: PyTree) -> float:
    """``1/2 ||z - v||^2`` in float64."""
    z_leaves, _ = flatten(z)
    v_leaves, _ = flatten(v)
    return 0.5 * sum(
        float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(z_leaves, v_leaves) if a is not None
    )


def _objective(penalty: Penalty, z: PyTree, v: PyTree, step: float) -> float:
    """``1/2 ||z - v||^2 + step * P(z)`` in float64."""
    z_leaves, spec = flatten(z)
    z64 = unflatten([None if x is None else x.double() for x in z_leaves], spec)
    return _quadratic(z, v) + step * float(penalty(z64))


def _prox_objective(penalty: Penalty, z: PyTree, v: PyTree, step: float) -> float:
    """The objective at the prox output, in float64; a constraint's value at ``z`` is read in ``z``'s own
    dtype (a float32 projection is feasible to float32's precision, not to float64's)."""
    value = _objective(penalty, z, v, step)
    if value == float("inf") and float(penalty(z)) < float("inf"):
        # the quadratic alone: step * P in float64 is step * inf here, and 0 * inf would be nan
        return _quadratic(z, v) + step * float(penalty(z))
    return value


def _checked_value(penalty: Penalty, p: PyTree, generic: bool) -> torch.Tensor:
    """``P(p)``, asserted to be a 0-d tensor. On a ``generic`` drawn tree (no ``params`` given) a
    penalty that finds nothing to select is not a failure: Hypothesis rejects that example."""
    try:
        value = penalty(p)
    except SelectionError:
        if generic:
            reject()  # a generic tree without a tensor this penalty applies to (e.g. no matrix)
        raise
    assert isinstance(value, torch.Tensor) and value.ndim == 0, f"P(params) is not a 0-d tensor: {value!r}"
    return value


def _check_terms_and_grad(penalty: Penalty, p: PyTree, value: torch.Tensor, atol: float, rtol: float) -> None:
    """The properties of a penalty with a gradient: ``P(p)`` is finite, equals the sum of its terms,
    and ``P.grad`` matches autograd (up to the kink rule of :func:`_assert_grad_matches`)."""
    assert torch.isfinite(value), f"P(params) is not finite: {value}"
    total = sum(float(v) for v in penalty.terms(p).values())
    assert abs(total - float(value)) <= atol + rtol * abs(float(value)), "terms do not add up to P(params)"
    _assert_grad_matches(penalty, p, atol, rtol)


def _check_prox(penalty: Penalty, v: PyTree, data: Any) -> None:
    """``z = P.prox(v, step)``, for a drawn step, is feasible and no perturbation of it lowers the
    prox objective. A sum whose terms select the same parameters has no closed-form prox: skipped."""
    step = data.draw(st.floats(1e-3, 2.0), label="step")
    try:
        z = penalty.prox(v, step)
    except NotImplementedError:
        if isinstance(penalty, SumPenalty):
            return  # terms that select the same parameters: the sum has no closed-form prox
        raise
    best = _prox_objective(penalty, z, v, step)
    assert best < float("inf"), "prox returned a point where the penalty is infinite (infeasible)"
    _assert_no_better_point(penalty, z, v, step, best, _prox_directions(z, v, data))


def _prox_directions(z: PyTree, v: PyTree, data: Any) -> list[list[Any]]:
    """The leaves of the directions to perturb the prox output ``z`` along: toward ``v`` and toward
    zero (the two ends a shrinking prox moves between), and three drawn ones."""
    z_leaves, _ = flatten(z)
    v_leaves, _ = flatten(v)
    directions = [
        [None if a is None else (b - a) for a, b in zip(z_leaves, v_leaves)],  # toward v
        [None if a is None else -a for a in z_leaves],  # toward zero
    ]
    for _ in range(3):
        drawn, _ = flatten(data.draw(like(z, max_abs=1.0), label="direction"))
        directions.append(drawn)
    return directions


def _assert_no_better_point(
    penalty: Penalty, z: PyTree, v: PyTree, step: float, best: float, directions: list[list[Any]]
) -> None:
    """No move of ``z`` by ``+-h`` (three scales ``h``) along any of ``directions`` lowers the prox
    objective below ``best`` beyond rounding: ``z`` is then (locally) the prox's minimiser."""
    z_leaves, spec = flatten(z)
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
                other = _objective(penalty, moved, v, step)
                assert other >= best - tol, (
                    f"P.prox is not the minimiser of 1/2||z - v||^2 + step * P(z): moving z by {sign * h:g} "
                    f"along a direction lowers it from {best!r} to {other!r} (step={step!r})"
                )


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
        value = _checked_value(penalty, p, generic=params is None)
        if penalty.has_grad:
            _check_terms_and_grad(penalty, p, value, atol, rtol)
        if penalty.has_prox:
            _check_prox(penalty, p, data)

    _run(run, seed, "check_penalty")
