"""fr.lasso_path and fr.lasso_cv: scikit-learn's lasso / elastic-net paths and LassoCV's choice, exactly.

Expected values come from scikit-learn (enet_path, LassoCV, ElasticNetCV, KFold) run at a tight
tolerance. Coefficients are compared within the distance the two duality gaps allow: the objective is
``mu``-strongly convex with ``mu = lambda_min(Xc^T Xc / n) + alpha (1 - l1_ratio)``, so a point whose gap
is ``g`` lies within ``sqrt(2 g / mu)`` of the solution.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import SLOW_OK
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import funcreg as fr

linear_model = pytest.importorskip("sklearn.linear_model")
datasets = pytest.importorskip("sklearn.datasets")


def objective(x: np.ndarray, y: np.ndarray, w: np.ndarray, alpha: float, l1_ratio: float) -> float:
    """scikit-learn's elastic-net objective on centered data (the intercept is the means')."""
    xc, yc = x - x.mean(axis=0), y - y.mean()
    r = yc - xc @ w
    return float(
        0.5 * (r @ r) / len(y) + alpha * (l1_ratio * np.abs(w).sum() + 0.5 * (1 - l1_ratio) * (w @ w))
    )


def sklearn_path(x: np.ndarray, y: np.ndarray, alphas: np.ndarray, l1_ratio: float, tol: float = 1e-12):
    xc, yc = x - x.mean(axis=0), y - y.mean()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a ConvergenceWarning at tol=1e-12 is fine: its gap is returned
        _, coefs, gaps = linear_model.enet_path(
            xc, yc, alphas=alphas, l1_ratio=l1_ratio, tol=tol, max_iter=100_000
        )
    return coefs.T, gaps


def assert_matches_sklearn(x: np.ndarray, y: np.ndarray, l1_ratio: float, path: fr.LassoPath) -> None:
    alphas = path.alphas.numpy()
    sk_coefs, sk_gaps = sklearn_path(x, y, alphas, l1_ratio)
    xc = x - x.mean(axis=0)
    low = max(float(np.linalg.eigvalsh(xc.T @ xc / len(y)).min()), 0.0)
    ours, gaps = path.coefs.numpy(), path.dual_gaps.numpy()
    for i, alpha in enumerate(alphas):
        # the objective values agree to the gaps (whatever the conditioning) ...
        f_ours, f_sk = (
            objective(x, y, ours[i], alpha, l1_ratio),
            objective(x, y, sk_coefs[i], alpha, l1_ratio),
        )
        slack = max(gaps[i], 0.0) + max(sk_gaps[i], 0.0) + 1e-12 * max(abs(f_sk), 1.0)
        assert abs(f_ours - f_sk) <= slack, (i, f_ours, f_sk)
        # ... and the coefficients to the distance the gaps allow
        mu = low + alpha * (1 - l1_ratio)
        if mu > 1e-8:
            radius = np.sqrt(2 * max(gaps[i], 0) / mu) + np.sqrt(2 * max(sk_gaps[i], 0) / mu)
            scale = np.abs(sk_coefs[i]).max()
            np.testing.assert_allclose(ours[i], sk_coefs[i], atol=radius + 1e-9 * scale + 1e-12, rtol=1e-7)
    intercepts = y.mean() - ours @ x.mean(axis=0)
    np.testing.assert_allclose(path.intercepts.numpy(), intercepts, rtol=1e-12, atol=1e-12)


def gap_below_tol(y: np.ndarray, path: fr.LassoPath, tol: float) -> bool:
    yc = y - y.mean()
    return bool((path.dual_gaps.numpy() <= tol * (yc @ yc) / len(y)).all())


@st.composite
def small_problems(draw):  # noqa: ANN001, ANN201
    n = draw(st.integers(6, 30))
    p = draw(st.integers(1, 8))
    x = draw(hnp.arrays(np.float64, (n, p), elements=st.floats(-3, 3, allow_subnormal=False)))
    w = draw(hnp.arrays(np.float64, (p,), elements=st.sampled_from([0.0, 0.0, 1.0, -2.0, 0.5])))
    noise = draw(hnp.arrays(np.float64, (n,), elements=st.floats(-1, 1, allow_subnormal=False)))
    return x, x @ w + noise


@settings(deadline=None, max_examples=40, suppress_health_check=SLOW_OK)
@given(problem=small_problems(), l1_ratio=st.sampled_from([1.0, 0.7, 0.2]), screening=st.booleans())
def test_path_equals_sklearns_enet_path_within_the_duality_gaps(problem, l1_ratio, screening) -> None:  # noqa: ANN001
    x, y = problem
    tol = 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no convergence warning: the gap is reached at every alpha
        path = fr.lasso_path(x, y, l1_ratio=l1_ratio, n_alphas=12, eps=1e-2, tol=tol, screening=screening)
    assert (torch.diff(path.alphas) < 0).all() or len(set(path.alphas.tolist())) == 1
    assert gap_below_tol(y, path, tol)
    assert_matches_sklearn(x, y, l1_ratio, path)


@settings(deadline=None, max_examples=40, suppress_health_check=SLOW_OK)
@given(problem=small_problems(), l1_ratio=st.sampled_from([1.0, 0.5]))
def test_screening_never_drops_a_feature_of_the_unscreened_solution(problem, l1_ratio) -> None:  # noqa: ANN001
    x, y = problem
    screened = fr.lasso_path(x, y, l1_ratio=l1_ratio, n_alphas=15, eps=1e-2, tol=1e-10)
    full = fr.lasso_path(x, y, l1_ratio=l1_ratio, n_alphas=15, eps=1e-2, tol=1e-10, screening=False)
    assert (full.n_screened == x.shape[1]).all() and (full.kkt_violations == 0).all()
    assert (screened.n_screened <= x.shape[1]).all()
    # every feature active without screening is active with it, with the same coefficient
    active = full.coefs != 0
    assert (screened.coefs[active] != 0).all()
    scale = float(full.coefs.abs().max()) + 1.0
    torch.testing.assert_close(screened.coefs, full.coefs, atol=1e-8 * scale, rtol=1e-8)


def diabetes(degree: int = 1) -> tuple[np.ndarray, np.ndarray]:
    x, y = datasets.load_diabetes(return_X_y=True)
    if degree > 1:
        from sklearn.preprocessing import PolynomialFeatures, StandardScaler

        x = StandardScaler().fit_transform(PolynomialFeatures(degree, include_bias=False).fit_transform(x))
    return x, y


@pytest.mark.parametrize("l1_ratio", [1.0, 0.5])
@pytest.mark.parametrize("degree", [1, 2])
def test_diabetes_path_equals_sklearns_with_its_grid(degree: int, l1_ratio: float) -> None:
    x, y = diabetes(degree)
    path = fr.lasso_path(torch.from_numpy(x), torch.from_numpy(y), l1_ratio=l1_ratio)
    xc, yc = x - x.mean(axis=0), y - y.mean()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk_alphas, _, _ = linear_model.enet_path(xc, yc, l1_ratio=l1_ratio, max_iter=1)  # its default grid
    np.testing.assert_allclose(path.alphas.numpy(), sk_alphas, rtol=1e-13)
    assert gap_below_tol(y, path, 1e-4)
    assert float(path.dual_gaps.max()) < 1e-8  # exact to rounding, far below the tolerance
    assert_matches_sklearn(x, y, l1_ratio, path)
    if l1_ratio < 1:  # the strong rule discards features the KKT check has to add back here
        assert int(path.kkt_violations.sum()) > 0


def test_kkt_check_restores_what_the_strong_rule_discards() -> None:
    x, y = diabetes()
    screened = fr.lasso_path(x, y, l1_ratio=0.5)
    full = fr.lasso_path(x, y, l1_ratio=0.5, screening=False)
    assert int(screened.kkt_violations.sum()) > 0
    assert ((full.coefs != 0) == (screened.coefs != 0)).all()
    torch.testing.assert_close(screened.coefs, full.coefs, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(
    ("estimator", "l1_ratio", "shuffle"), [("LassoCV", 1.0, False), ("ElasticNetCV", 0.5, True)]
)
def test_cv_chooses_what_lasso_cv_chooses_on_diabetes(estimator: str, l1_ratio: float, shuffle: bool) -> None:
    from sklearn.model_selection import KFold

    x, y = diabetes()
    splitter = KFold(5, shuffle=True, random_state=0) if shuffle else KFold(5)
    folds = list(splitter.split(x)) if shuffle else 5
    kwargs = {"l1_ratio": l1_ratio} if estimator == "ElasticNetCV" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cv = getattr(linear_model, estimator)(cv=splitter, tol=1e-12, max_iter=100_000, **kwargs).fit(x, y)
    path = fr.lasso_cv(x, y, folds=folds, l1_ratio=l1_ratio)
    np.testing.assert_allclose(path.coefficients.numpy()[::-1], cv.alphas_, rtol=1e-13)
    assert path.best == pytest.approx(cv.alpha_, rel=1e-12)
    mse = np.squeeze(cv.mse_path_)  # mean squared error per fold, alphas descending; ours is half, ascending
    np.testing.assert_allclose(2 * path.val_loss.numpy()[::-1], mse, rtol=1e-6)
    chosen = path.params_at(path.best)
    np.testing.assert_allclose(chosen["w"].numpy(), cv.coef_, rtol=1e-6, atol=1e-6)
    assert float(chosen["b"]) == pytest.approx(cv.intercept_, rel=1e-9)
    assert path.val_loss.shape == (100, 5) and path.params["w"].shape == (500, 10)


def test_cv_with_a_validation_split_and_its_table() -> None:
    x, y = diabetes()
    path = fr.lasso_cv(x[:300], y[:300], validation=(x[300:], y[300:]), n_alphas=20)
    assert path.replicates == ["seed 0, validation"] and path.val_loss.shape == (20, 1)
    best = path.params_at(path.best)
    val = 0.5 * np.mean((x[300:] @ best["w"].numpy() + float(best["b"]) - y[300:]) ** 2)
    assert float(path.val_loss[path.best_index, 0]) == pytest.approx(val, rel=1e-12)
    assert "best" in path.table()


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((np.ones(5), np.ones(5)), {}, ValueError, "2-D"),
        ((np.ones((5, 2)), np.ones((5, 1))), {}, ValueError, "1-D"),
        ((np.ones((5, 2)), np.ones(4)), {}, ValueError, "one row per example"),
        ((np.array([[1.0, np.nan], [0.0, 1.0], [2.0, 3.0]]), np.ones(3)), {}, ValueError, "row 0"),
        ((np.eye(3), np.array([1.0, np.inf, 0.0])), {}, ValueError, "non-finite"),
        ((np.eye(3), np.ones(3)), {"alphas": [0.1, 0.2]}, ValueError, "strictly decreasing"),
        ((np.eye(3), np.ones(3)), {"alphas": [0.1, 0.0]}, ValueError, "> 0"),
        ((np.eye(3), np.ones(3)), {"alphas": []}, ValueError, "empty"),
        ((np.eye(3), np.ones(3)), {"l1_ratio": 0.0}, ValueError, "l1_ratio"),
        ((np.eye(3), np.ones(3)), {"l1_ratio": 1.5}, ValueError, "l1_ratio"),
        ((np.eye(3), np.ones(3)), {"tol": 0.0}, ValueError, "tol"),
        ((np.eye(3), np.ones(3)), {"max_iter": 0}, ValueError, "max_iter"),
        ((np.eye(3), np.ones(3)), {"screening": "yes"}, TypeError, "screening"),
        ((torch.eye(3, dtype=torch.complex128), torch.ones(3)), {}, TypeError, "real"),
    ],
)
def test_invalid_arguments_are_named(args, kwargs, error, match) -> None:  # noqa: ANN001
    with pytest.raises(error, match=match):
        fr.lasso_path(*args, **kwargs)


def test_invalid_cv_arguments_are_named() -> None:
    x, y = np.random.default_rng(0).normal(size=(20, 3)), np.ones(20)
    with pytest.raises(ValueError, match="features"):
        fr.lasso_cv(x, y, validation=(np.ones((4, 2)), np.ones(4)))
    with pytest.raises(TypeError, match="pair"):
        fr.lasso_cv(x, y, validation=np.ones((4, 3)))
    with pytest.raises(ValueError, match="folds"):
        fr.lasso_cv(x, y, folds=None)
    with pytest.raises(ValueError, match="outside"):
        fr.lasso_cv(x, y, folds=[(np.arange(10), np.arange(10, 25)), (np.arange(5), np.arange(5, 10))])
