"""FISTA (with restarts) and the preconditioned proximal step after Adam.

FISTA is checked against scikit-learn's coordinate-descent ``Lasso`` and ``ElasticNet`` (their
objectives ``1/(2n) ||y - Xw||^2 + alpha ||w||_1 (+ ...)``, no intercept), against the closed form of an
orthogonal design (soft-thresholding of ``X^T y / n``), against the optimality conditions of the group
lasso, and against plain ISTA (iterations to reach a tolerance). ``fr.proximal_adam`` is checked
against the minimizer of ``1/2 ||z - v||_D^2 + lr P(z)`` found by enumerating the 1-D candidates, and
by its fixed points: a lasso solution built to satisfy the optimality conditions exactly stays put.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SLOW_OK
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import funcreg as fr

sklearn_linear = pytest.importorskip("sklearn.linear_model")

SETTINGS = settings(deadline=None, max_examples=15, suppress_health_check=SLOW_OK)


def lasso_problem(seed: int = 0, n: int = 40, d: int = 12, spread: float = 3.0):
    """A least-squares problem with correlated-scale columns (condition number ~ 360 for spread 3)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ np.diag(np.linspace(0.2, spread, d))
    w = np.where(rng.random(d) < 0.4, 2 * rng.normal(size=d), 0.0)
    y = x @ w + 0.1 * rng.normal(size=n)
    return x, y


def run(tx, grad, w0, steps, read=lambda params, state: params["w"], stop=None):
    """``steps`` updates from ``w0`` feeding ``grad(params["w"])``; returns the last point read and the
    number of updates done (``stop(point)`` ends early)."""
    params = {"w": w0.clone()}
    state = tx.init(params)
    for k in range(1, steps + 1):
        u, state = tx.update({"w": grad(params["w"])}, state, params)
        params = fr.apply_updates(params, u)
        point = read(params, state)
        if stop is not None and stop(point):
            return point, k, state
    return read(params, state), steps, state


def least_squares(x: np.ndarray, y: np.ndarray):
    xt, yt, n = torch.from_numpy(x), torch.from_numpy(y), x.shape[0]

    def grad(w):
        return xt.T @ (xt @ w - yt) / n

    def loss(w):
        return float(((xt @ w - yt) ** 2).sum() / (2 * n))

    step = 1.0 / float(np.linalg.eigvalsh(x.T @ x / n).max())
    return grad, loss, step


def iterate(params, state):
    return fr.fista_iterate(state)["w"]


# --- FISTA against scikit-learn and closed forms ------------------------------------------------------


def settled(tol: float = 1e-14):
    """A ``stop`` for ``run``: the point moved by less than ``tol`` (max abs) in the last update."""
    last = []

    def stop(w: torch.Tensor) -> bool:
        moved = bool(last) and float((w - last[0]).abs().max()) < tol
        last[:] = [w.clone()]
        return moved

    return stop


@pytest.mark.parametrize("restart", [None, "gradient", "function"])
@pytest.mark.parametrize("alpha", [0.03, 0.3])
def test_fista_matches_sklearn_lasso(alpha, restart):
    x, y = lasso_problem()
    grad, loss, step = least_squares(x, y)
    reference = (
        sklearn_linear.Lasso(alpha=alpha, fit_intercept=False, tol=1e-14, max_iter=100_000).fit(x, y).coef_
    )
    objective = (lambda p: torch.tensor(loss(p["w"]), dtype=torch.float64)) if restart == "function" else None
    tx = fr.fista(step, fr.l1(alpha), restart=restart, objective=objective)
    w, k, _ = run(tx, grad, torch.zeros(x.shape[1], dtype=torch.float64), 2000, read=iterate, stop=settled())
    assert k < 2000
    np.testing.assert_allclose(w.numpy(), reference, atol=1e-9, rtol=0)
    assert np.array_equal(w.numpy() == 0.0, reference == 0.0)  # the same exact zeros


@pytest.mark.parametrize("l1_ratio", [0.2, 0.7])
def test_fista_matches_sklearn_elastic_net(l1_ratio):
    x, y = lasso_problem(seed=1)
    grad, _, step = least_squares(x, y)
    alpha = 0.2
    reference = (
        sklearn_linear.ElasticNet(
            alpha=alpha, l1_ratio=l1_ratio, fit_intercept=False, tol=1e-14, max_iter=100_000
        )
        .fit(x, y)
        .coef_
    )
    # sklearn: alpha * l1_ratio * ||w||_1 + alpha * (1 - l1_ratio) / 2 * ||w||^2
    penalty = fr.elastic_net(l1=alpha * l1_ratio, l2=alpha * (1 - l1_ratio))
    w, k, _ = run(
        fr.fista(step, penalty),
        grad,
        torch.zeros(x.shape[1], dtype=torch.float64),
        2000,
        read=iterate,
        stop=settled(),
    )
    assert k < 2000
    np.testing.assert_allclose(w.numpy(), reference, atol=1e-9, rtol=0)


@SETTINGS
@given(
    z=hnp.arrays(np.float64, st.integers(1, 6), elements=st.floats(-5, 5)),
    alpha=st.floats(0.0, 3.0),
    data=st.data(),
)
def test_fista_orthogonal_design_is_soft_thresholding(z, alpha, data):
    """With X^T X / n = I the lasso solution is soft_threshold(X^T y / n, alpha), written out here."""
    d = z.size
    n = d + data.draw(st.integers(0, 4))
    q, _ = np.linalg.qr(np.random.default_rng(d).normal(size=(n, n)))
    x = np.sqrt(n) * q[:, :d]
    y = x @ z  # so X^T y / n = z
    grad, _, _ = least_squares(x, y)
    expected = np.sign(z) * np.maximum(np.abs(z) - alpha, 0.0)
    w, _, _ = run(fr.fista(1.0, fr.l1(alpha)), grad, torch.zeros(d, dtype=torch.float64), 5, read=iterate)
    np.testing.assert_allclose(w.numpy(), expected, atol=1e-12, rtol=0)


def test_fista_group_lasso_satisfies_the_optimality_conditions():
    """Group lasso on a correlated design: at FISTA's limit, each nonzero group g has
    grad_g f = -c sqrt(|g|) w_g / ||w_g||, and each zero group ||grad_g f|| <= c sqrt(|g|)."""
    groups, size = 5, 3
    x, y = lasso_problem(seed=2, n=30, d=groups * size)
    grad_flat, _, step = least_squares(x, y)
    c = 0.15

    def grad(w):  # the parameter is a (groups, size) matrix: groups are its rows (axis=0)
        return grad_flat(w.reshape(-1)).reshape(groups, size)

    w0 = torch.zeros(groups, size, dtype=torch.float64)
    w, k, _ = run(fr.fista(step, fr.group_lasso(c, axis=0)), grad, w0, 3000, read=iterate, stop=settled())
    assert k < 3000
    g = grad(w)
    zero = (w == 0).all(dim=1)
    assert 0 < int(zero.sum()) < groups  # the problem has both kinds of groups
    for i in range(groups):
        if zero[i]:
            assert float(g[i].norm()) <= c * np.sqrt(size) + 1e-9
        else:
            torch.testing.assert_close(g[i], -c * np.sqrt(size) * w[i] / w[i].norm(), atol=1e-9, rtol=0)


def test_fista_converges_faster_than_ista():
    """Iterations to an objective gap of 1e-10 on an ill-conditioned lasso (reference: sklearn)."""
    x, y = lasso_problem(seed=0, spread=6.0)
    grad, loss, step = least_squares(x, y)
    alpha = 0.05
    ref = (
        sklearn_linear.Lasso(alpha=alpha, fit_intercept=False, tol=1e-15, max_iter=1_000_000).fit(x, y).coef_
    )
    best = loss(torch.from_numpy(ref)) + alpha * np.abs(ref).sum()

    def done(w):
        return loss(w) + alpha * float(w.abs().sum()) - best < 1e-10

    w0 = torch.zeros(x.shape[1], dtype=torch.float64)
    ista = fr.chain(fr.sgd(step), fr.proximal(fr.l1(alpha), learning_rate=step))
    _, k_ista, _ = run(ista, grad, w0, 5000, stop=done)
    _, k_fista, _ = run(fr.fista(step, fr.l1(alpha), restart=None), grad, w0, 5000, read=iterate, stop=done)
    _, k_restart, state = run(fr.fista(step, fr.l1(alpha)), grad, w0, 5000, read=iterate, stop=done)
    assert k_ista < 5000 and k_restart < k_fista < k_ista, (k_ista, k_fista, k_restart)
    assert k_restart * 3 < k_ista, (k_ista, k_restart)
    assert int(state.restarts) > 0


# --- FISTA's mechanics ------------------------------------------------------------------------------


def test_fista_first_update_is_an_ista_step_and_the_momentum_follows_the_recursion():
    params = {"w": torch.tensor([1.0, -2.0, 0.05], dtype=torch.float64)}
    g = {"w": torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)}
    tx = fr.fista(0.2, fr.l1(0.5), restart=None)
    u, state = tx.update(g, tx.init(params), params)
    ista = fr.chain(fr.sgd(0.2), fr.proximal(fr.l1(0.5), learning_rate=0.2))
    u_ista, _ = ista.update(g, ista.init(params), params)
    torch.testing.assert_close(u["w"], u_ista["w"], atol=1e-15, rtol=0)
    t1 = (1 + np.sqrt(5)) / 2
    assert abs(float(state.momentum) - t1) <= 1e-15
    # second update: y_2 = x_2 + (t_1 - 1) / t_2 (x_2 - x_1)
    y1 = fr.apply_updates(params, u)
    u2, state2 = tx.update(g, state, y1)
    x1, x2 = state.iterate["w"], state2.iterate["w"]
    t2 = (1 + np.sqrt(1 + 4 * t1 * t1)) / 2
    torch.testing.assert_close(
        fr.apply_updates(y1, u2)["w"], x2 + (t1 - 1) / t2 * (x2 - x1), atol=1e-15, rtol=0
    )


def test_fista_none_gradients_leave_the_parameter_and_its_iterate():
    params = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    tx = fr.fista(0.1, fr.l1(1.0))
    u, state = tx.update({"a": torch.ones(2), "b": None}, tx.init(params), params)
    assert u["b"] is None and torch.equal(state.iterate["b"], params["b"])
    assert not torch.equal(state.iterate["a"], params["a"])


def test_fista_function_restart_keeps_the_objective_of_the_iterate():
    x, y = lasso_problem(seed=3)
    grad, loss, step = least_squares(x, y)
    tx = fr.fista(
        step,
        fr.l1(0.1),
        restart="function",
        objective=lambda p: torch.tensor(loss(p["w"]), dtype=torch.float64),
    )
    w, _, state = run(tx, grad, torch.zeros(x.shape[1], dtype=torch.float64), 30, read=iterate)
    assert abs(float(state.value) - (loss(w) + 0.1 * float(w.abs().sum()))) <= 1e-12


def test_fista_validation():
    with pytest.raises(ValueError, match=r"restart value: 'always'"):
        fr.fista(0.1, fr.l1(1.0), restart="always")
    with pytest.raises(ValueError, match=r"objective value.*restart='function'"):
        fr.fista(0.1, fr.l1(1.0), restart="function")
    with pytest.raises(ValueError, match=r"objective value.*only used with restart='function'"):
        fr.fista(0.1, fr.l1(1.0), objective=lambda p: p["w"].sum())
    with pytest.raises(NotImplementedError, match="'orthogonal' has no closed-form proximal map"):
        fr.fista(0.1, fr.orthogonal(1.0))
    with pytest.raises(TypeError, match="funcreg penalty"):
        fr.fista(0.1, "l1")
    with pytest.raises(ValueError, match=r"learning_rate value: -0\.1"):
        fr.fista(-0.1, fr.l1(1.0))


# --- the preconditioned proximal step after Adam --------------------------------------------------


def weighted_prox_by_enumeration(v: np.ndarray, d: np.ndarray, t1: float, t2: float) -> np.ndarray:
    """argmin_z 1/2 d (z - v)^2 + t1 |z| + t2/2 z^2 per coordinate: the objective is convex and smooth
    off z = 0, so the minimizer is 0 or a stationary point of one of the two smooth pieces; try all three."""
    out = np.empty_like(v)
    for i in range(v.size):

        def h(z, i=i):
            return 0.5 * d[i] * (z - v[i]) ** 2 + t1 * abs(z) + 0.5 * t2 * z * z

        plus = (d[i] * v[i] - t1) / (d[i] + t2)  # stationary point of the piece z > 0
        minus = (d[i] * v[i] + t1) / (d[i] + t2)  # and of the piece z < 0
        candidates = [0.0] + ([plus] if plus > 0 else []) + ([minus] if minus < 0 else [])
        out.flat[i] = min(candidates, key=h)
    return out


@SETTINGS
@given(
    w=hnp.arrays(np.float64, 6, elements=st.floats(-3, 3)),
    a=hnp.arrays(np.float64, 6, elements=st.floats(-3, 3)),
    h=hnp.arrays(np.float64, 6, elements=st.floats(0.01, 10.0)),
    lr=st.floats(1e-3, 1.0),
    l1=st.floats(0.0, 2.0),
    l2=st.floats(0.0, 2.0),
)
def test_proximal_adam_first_step_on_a_quadratic_is_the_weighted_prox(w, a, h, lr, l1, l2):
    """f(w) = 1/2 sum h (w - a)^2 at w: g = h (w - a); Adam's first step has m_hat = g, v_hat = g^2, so
    D = |g| + eps and the point v = w - lr g / D; z minimizes 1/2 ||z - v||_D^2 + lr (l1 |z| + l2/2 z^2)."""
    eps = 1e-8
    g = h * (w - a)
    d = np.abs(g) + eps
    expected = weighted_prox_by_enumeration(w - lr * g / d, d, lr * l1, lr * l2)
    params = {"w": torch.from_numpy(w.copy())}
    tx = fr.proximal_adam(lr, l1=l1, l2=l2, eps=eps)
    u, _ = tx.update({"w": torch.from_numpy(g)}, tx.init(params), params)
    np.testing.assert_allclose(fr.apply_updates(params, u)["w"].numpy(), expected, atol=1e-12, rtol=1e-12)


def kkt_point(seed: int, l1: float):
    """A lasso solution w* and the gradient of the smooth part there, built to satisfy the optimality
    conditions exactly: grad_i = -l1 sign(w*_i) on the support, |grad_i| < l1 off it."""
    rng = np.random.default_rng(seed)
    w = np.where(rng.random(8) < 0.5, rng.normal(size=8), 0.0)
    g = np.where(w != 0, -l1 * np.sign(w), rng.uniform(-0.9, 0.9, size=8) * l1)
    return torch.from_numpy(w), torch.from_numpy(g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_proximal_adam_keeps_a_lasso_solution_where_adam_then_prox_does_not(seed):
    """Feed the gradient at w* for 20 steps: proximal_adam stays at w* (to rounding) because its
    fixed points are the lasso optima; fr.adam followed by fr.proximal(fr.l1) leaves it (its fixed
    points weight the L1 term by Adam's D)."""
    l1, lr = 0.3, 0.01
    w_star, g = kkt_point(seed, l1)
    ours, _, _ = run(fr.proximal_adam(lr, l1=l1), lambda w: g, w_star, 20)
    torch.testing.assert_close(ours, w_star, atol=1e-12, rtol=0)
    naive = fr.chain(fr.adam(lr), fr.proximal(fr.l1(l1), learning_rate=lr))
    theirs, _, _ = run(naive, lambda w: g, w_star, 20)
    assert float((theirs - w_star).abs().max()) > 1e-3


def _trajectory(tx, params, grads):
    state = tx.init(params)
    for g in grads:
        u, state = tx.update(g, state, params)
        params = fr.apply_updates(params, u)
    return params


@SETTINGS
@given(data=st.data())
def test_proximal_adam_without_penalty_is_adam_and_unmasked_leaves_follow_adam(data):
    from funcreg.testing import gradient_sequences, param_trees

    params = data.draw(param_trees(dtype=torch.float64, max_leaves=3))
    grads = data.draw(gradient_sequences(params, st.integers(1, 4)))
    mask = {k: data.draw(st.booleans()) for k in params}
    adam = _trajectory(fr.adam(0.05), params, grads)
    plain = _trajectory(fr.proximal_adam(0.05), params, grads)
    masked = _trajectory(fr.proximal_adam(0.05, l1=0.5, l2=0.1, mask=mask), params, grads)
    for k in params:
        torch.testing.assert_close(plain[k], adam[k], atol=1e-12, rtol=0)
        if not mask[k]:
            torch.testing.assert_close(masked[k], adam[k], atol=1e-12, rtol=0)


def test_proximal_adam_validation():
    with pytest.raises(ValueError, match=r"l1 value: -1\.0"):
        fr.proximal_adam(0.1, l1=-1.0)
    with pytest.raises(ValueError, match=r"eps value: 0\.0"):
        fr.proximal_adam(0.1, eps=0.0)
    with pytest.raises(TypeError, match=r"betas value"):
        fr.proximal_adam(0.1, betas=0.9)
