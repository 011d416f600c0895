"""Hypergradients against finite differences (float64), closed forms and Newton-solved minimizers.

Data, initial weights and coefficients are drawn with Hypothesis / numpy; expected derivatives come from
central finite differences of the same computation, from ridge regression's closed form, or from
logistic regression solved by Newton's method here, never from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcreg as fr

F64 = torch.float64
EPS = 1e-6


def regression(seed: int, n: int = 12, p: int = 3) -> tuple[torch.Tensor, ...]:
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(n, p)))
    y = torch.from_numpy(rng.normal(size=n)) + x[:, 0]
    xv = torch.from_numpy(rng.normal(size=(n, p)))
    yv = torch.from_numpy(rng.normal(size=n)) + xv[:, 0]
    init = {
        "w1": torch.from_numpy(rng.normal(size=(4, p)) * 0.5),
        "b1": torch.from_numpy(rng.normal(size=4) * 0.1),
        "w2": torch.from_numpy(rng.normal(size=4) * 0.5),
    }
    return x, y, xv, yv, init


def mlp(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"]


def mse(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((mlp(p, x) - y) ** 2).mean()


WEIGHTS = {"w1": True, "b1": False, "w2": True}
STEPS = {
    "l2, loss form": lambda: fr.make_step(
        mse, fr.sgd(0.1, momentum=0.9), penalty=lambda h: fr.l2(h["coeff"], mask=WEIGHTS)
    ),
    "l2, coupled": lambda: fr.make_step(
        mse, fr.adam(0.05), penalty=lambda h: fr.l2(h["coeff"], mask=WEIGHTS), form="coupled"
    ),
    "l2, decoupled": lambda: fr.make_step(
        mse,
        fr.adam(0.05),
        penalty=lambda h: fr.l2(h["coeff"], mask=WEIGHTS),
        form="decoupled",
        learning_rate=0.05,
    ),
    "l2, proximal": lambda: fr.make_step(
        mse,
        fr.sgd(0.1),
        penalty=lambda h: fr.l2(h["coeff"], mask=WEIGHTS),
        form="proximal",
        learning_rate=0.1,
    ),
    "group lasso, loss form": lambda: fr.make_step(
        mse, fr.sgd(0.1), penalty=lambda h: fr.group_lasso(h["coeff"], mask=WEIGHTS)
    ),
    "sgd weight_decay": lambda: fr.make_step(
        mse, lambda h: fr.sgd(0.1, momentum=0.5, weight_decay=h["coeff"])
    ),
    "adamw weight_decay": lambda: fr.make_step(mse, lambda h: fr.adamw(0.05, weight_decay=h["coeff"])),
}


@pytest.mark.parametrize("kind", sorted(STEPS))
@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    coeff=st.floats(0.01, 1.0),
    steps=st.integers(1, 5),
    minibatches=st.booleans(),
)
def test_unrolled_hypergradient_equals_finite_differences(kind, seed, coeff, steps, minibatches) -> None:  # noqa: ANN001
    x, y, xv, yv, init = regression(seed)
    step = STEPS[kind]()
    batches = [(x[:6], y[:6]), (x[6:], y[6:])] if minibatches else (x, y)
    val = lambda p: mse(p, xv, yv)  # noqa: E731
    hg = fr.hypergradient(step, init, coeff, batches, val, steps=steps)

    def value(c: float) -> float:
        state = step.init(init, hparams={"coeff": c})
        for t in range(steps):
            batch = batches[t % 2] if minibatches else batches
            state, _ = step(state, *batch)
        return float(val(state.params))

    assert float(hg.value) == pytest.approx(value(coeff), rel=1e-13, abs=1e-15)
    # Adam divides by sqrt(v): with gradients near its eps, V(c) curves sharply and the truncation error
    # of a central difference (h^2 V'''(c) / 6) is large at h = 1e-6; at h = 1e-7 it is 100x smaller and
    # the rounding error (1e-16 / h) still small. The exact derivative must match at one of the two.
    numeric = [(value(coeff + h) - value(coeff - h)) / (2 * h) for h in (EPS, EPS / 10)]
    errors = [abs(float(hg.grad) - n) - 1e-6 * abs(n) for n in numeric]
    assert min(errors) <= 1e-7, (float(hg.grad), numeric)


# ----------------------------------------------------------------------------------------------------
# Implicit differentiation


def ridge(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """argmin_w 1/(2n) ||Xw - y||^2 + c/2 ||w||^2 = (X^T X / n + c I)^-1 X^T y / n."""
    n, p = x.shape
    return torch.linalg.solve(x.T @ x / n + c * torch.eye(p, dtype=F64), x.T @ y / n)


def ridge_objective(x: torch.Tensor, y: torch.Tensor):  # noqa: ANN201
    return lambda p, c: 0.5 * ((x @ p["w"] - y) ** 2).mean() + fr.l2(c)(p)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(3, 20),
    p=st.integers(1, 6),
    coeff=st.floats(1e-3, 10.0),
    damping=st.one_of(st.just(0.0), st.floats(1e-3, 1.0)),
)
def test_implicit_hypergradient_of_ridge_equals_the_closed_form(seed, n, p, coeff, damping) -> None:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    x, y = torch.from_numpy(rng.normal(size=(n, p))), torch.from_numpy(rng.normal(size=n))
    xv, yv = torch.from_numpy(rng.normal(size=(7, p))), torch.from_numpy(rng.normal(size=7))
    val = lambda prm: 0.5 * ((xv @ prm["w"] - yv) ** 2).mean()  # noqa: E731
    w = ridge(x, y, coeff)
    hg = fr.implicit_hypergradient(ridge_objective(x, y), {"w": w}, coeff, val, damping=damping)
    # closed form: dw/dc = -(X^T X / n + c I)^-1 w, dV/dc = grad V . dw/dc; damping d solves with
    # the Hessian plus d I instead (the damped value is checked against that, the exact one below)
    a = x.T @ x / n + coeff * torch.eye(p, dtype=F64)
    grad_v = xv.T @ (xv @ w - yv) / 7
    exact = float(grad_v @ -torch.linalg.solve(a, w))
    damped = float(grad_v @ -torch.linalg.solve(a + damping * torch.eye(p, dtype=F64), w))
    numeric = (float(val({"w": ridge(x, y, coeff + EPS)})) - float(val({"w": ridge(x, y, coeff - EPS)}))) / (
        2 * EPS
    )
    scale = 1.0 + abs(exact)
    assert abs(float(hg.grad) - damped) <= 1e-9 * scale
    assert abs(exact - numeric) <= 1e-6 * scale  # the closed form itself, against finite differences
    assert hg.residual <= 1e-9 and hg.stationarity <= 1e-10 * (1 + float(w.abs().max()))


def logistic_problem(seed: int) -> tuple[torch.Tensor, ...]:
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(30, 4)))
    y = (x[:, 0] - x[:, 1] + torch.from_numpy(rng.normal(size=30)) > 0).double()
    xv = torch.from_numpy(rng.normal(size=(25, 4)))
    yv = (xv[:, 0] - xv[:, 1] + torch.from_numpy(rng.normal(size=25)) > 0).double()
    return x, y, xv, yv


def bce(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)


def newton(x: torch.Tensor, y: torch.Tensor, c: float) -> dict[str, torch.Tensor]:
    """The minimizer of the L2-penalized logistic loss (weights only), to machine precision."""

    def f(theta: torch.Tensor) -> torch.Tensor:
        w, b = theta[:-1], theta[-1]
        return bce(w, b, x, y) + 0.5 * c * (w * w).sum()

    theta = torch.zeros(x.shape[1] + 1, dtype=F64)
    for _ in range(50):
        g = torch.func.grad(f)(theta)
        if float(g.abs().max()) < 1e-15:
            break
        theta = theta - torch.linalg.solve(torch.func.jacrev(torch.func.grad(f))(theta), g)
    return {"w": theta[:-1], "b": theta[-1]}


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), coeff=st.floats(0.01, 1.0))
def test_implicit_hypergradient_of_logistic_regression_equals_finite_differences(seed, coeff) -> None:  # noqa: ANN001
    x, y, xv, yv = logistic_problem(seed)
    objective = lambda p, c: bce(p["w"], p["b"], x, y) + fr.l2(c, mask={"w": True, "b": False})(p)  # noqa: E731
    val = lambda p: bce(p["w"], p["b"], xv, yv)  # noqa: E731
    hg = fr.implicit_hypergradient(objective, newton(x, y, coeff), coeff, val)
    numeric = (float(val(newton(x, y, coeff + EPS))) - float(val(newton(x, y, coeff - EPS)))) / (2 * EPS)
    assert abs(float(hg.grad) - numeric) <= 1e-7 + 1e-6 * abs(numeric), (float(hg.grad), numeric)


def test_unrolled_hypergradient_approaches_the_implicit_one_as_training_converges() -> None:
    rng = np.random.default_rng(11)
    x, y = torch.from_numpy(rng.normal(size=(20, 3))), torch.from_numpy(rng.normal(size=20))
    xv, yv = torch.from_numpy(rng.normal(size=(10, 3))), torch.from_numpy(rng.normal(size=10))
    val = lambda p: 0.5 * ((xv @ p["w"] - yv) ** 2).mean()  # noqa: E731
    step = fr.make_step(
        lambda p, x, y: 0.5 * ((x @ p["w"] - y) ** 2).mean(), fr.sgd(0.5), penalty=lambda h: fr.l2(h["coeff"])
    )
    c = 0.2
    implicit = fr.implicit_hypergradient(ridge_objective(x, y), {"w": ridge(x, y, c)}, c, val)
    gaps = []
    for steps in (5, 20, 150):
        unrolled = fr.hypergradient(step, {"w": torch.zeros(3, dtype=F64)}, c, (x, y), val, steps=steps)
        gaps.append(abs(float(unrolled.grad) - float(implicit.grad)))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-10  # linear convergence of gradient descent


def test_stationarity_reports_parameters_that_are_not_a_minimizer() -> None:
    rng = np.random.default_rng(12)
    x, y = torch.from_numpy(rng.normal(size=(10, 2))), torch.from_numpy(rng.normal(size=10))
    hg = fr.implicit_hypergradient(
        ridge_objective(x, y), {"w": torch.zeros(2, dtype=F64)}, 0.1, lambda p: p["w"].sum()
    )
    expected = float(torch.linalg.norm(x.T @ y / 10))  # grad at w = 0 is -X^T y / n
    assert hg.stationarity == pytest.approx(expected, rel=1e-12)


def test_a_hessian_that_is_not_positive_definite_is_refused() -> None:
    objective = lambda p, c: -(p["w"] ** 2).sum() + c * p["w"].sum()  # noqa: E731  a maximum
    with pytest.raises(ValueError, match="not positive definite"):
        fr.implicit_hypergradient(objective, {"w": torch.ones(2, dtype=F64)}, 0.1, lambda p: p["w"].sum())


# ----------------------------------------------------------------------------------------------------
# Tuning


def test_tuning_the_ridge_coefficient_finds_the_minimum_a_dense_grid_finds() -> None:
    rng = np.random.default_rng(13)
    n, p = 15, 8
    w_true = rng.normal(size=p) * 0.3
    x = torch.from_numpy(rng.normal(size=(n, p)))
    y = x @ torch.from_numpy(w_true) + torch.from_numpy(rng.normal(size=n))
    xv = torch.from_numpy(rng.normal(size=(500, p)))
    yv = xv @ torch.from_numpy(w_true) + torch.from_numpy(rng.normal(size=500))
    val = lambda prm: 0.5 * ((xv @ prm["w"] - yv) ** 2).mean()  # noqa: E731
    grid = np.logspace(-3, 2, 2001)
    values = [float(val({"w": ridge(x, y, c)})) for c in grid]
    i = int(np.argmin(values))
    assert 0 < i < len(grid) - 1  # an interior minimum
    objective = ridge_objective(x, y)
    fn = lambda c: fr.implicit_hypergradient(objective, {"w": ridge(x, y, float(c))}, c, val)  # noqa: E731
    result = fr.tune_coefficient(fn, 1e-3, iterations=25, lr=5.0)
    assert result.coefficient == pytest.approx(grid[i], rel=0.01)  # the grid's resolution is 0.6%
    assert result.value <= values[i] + 1e-9
    assert [h["iteration"] for h in result.history] == list(range(25))
    assert result.history[0]["coefficient"] == pytest.approx(1e-3)


def test_tune_clips_moves_on_the_log_scale() -> None:
    result = fr.tune_coefficient(lambda c: (c, torch.tensor(1e6)), 1.0, iterations=4, lr=1.0, max_step=0.5)
    coeffs = [h["coefficient"] for h in result.history]
    np.testing.assert_allclose(np.diff(np.log(coeffs)), [-0.5] * 3, rtol=1e-12)
    assert result.coefficient == pytest.approx(math.exp(-1.5))  # the lowest value evaluated


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda s, i, b, v: fr.hypergradient(s, i, -1.0, b, v, steps=2),
            ValueError,
            r"Invalid coeff value: -1.0",
        ),
        (
            lambda s, i, b, v: fr.hypergradient(s, i, 0.1, b, v, steps=0),
            ValueError,
            r"Invalid steps value: 0",
        ),
        (
            lambda s, i, b, v: fr.hypergradient(s, i, 0.1, b, lambda p: mlp(p, b[0]), steps=1),
            TypeError,
            r"val_loss must return a 0-d tensor \(a mean loss\), got \(12,\)",
        ),
        (
            lambda s, i, b, v: fr.hypergradient(s, i, 0.1, [], v, steps=1),
            TypeError,
            "batches must be one batch",
        ),
        (
            lambda s, i, b, v: fr.hypergradient(s, i, 0.1, b, v, steps=1, hparams={"coeff": 1.0}),
            ValueError,
            r"hparams\['coeff'\] is the coefficient",
        ),
        (
            lambda s, i, b, v: fr.hypergradient(lambda st, *a: st, i, 0.1, b, v, steps=1),
            TypeError,
            "expects a funcreg Step",
        ),
        (
            lambda s, i, b, v: fr.tune_coefficient(lambda c: (c, c), 0.0),
            ValueError,
            r"Invalid coeff value: 0.0",
        ),
        (
            lambda s, i, b, v: fr.tune_coefficient(lambda c: (c, math.nan), 1.0),
            ValueError,
            r"fn\(1\) gave value 1.0 and grad nan",
        ),
    ],
)
def test_invalid_arguments_are_named(call, error, match) -> None:  # noqa: ANN001
    x, y, xv, yv, init = regression(0)
    step = STEPS["l2, loss form"]()
    with pytest.raises(error, match=match):
        call(step, init, (x, y), lambda p: mse(p, xv, yv))
