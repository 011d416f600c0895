"""The lasso and elastic-net path of a linear least-squares model: an exact active-set solver on the Gram.

:func:`lasso_path` solves scikit-learn's objective

    1/(2n) ||y - Xw - b||^2 + alpha * (l1_ratio * ||w||_1 + (1 - l1_ratio) / 2 * ||w||^2)

along a decreasing grid of ``alpha`` (scikit-learn's grid by default), and :func:`lasso_cv` cross-validates
it into a :class:`RegularizationPath`, the result type of :func:`funcreg.regularization_path`, choosing
what ``LassoCV`` / ``ElasticNetCV`` choose.

The solver works on the Gram matrix ``Q = Xc^T Xc`` and ``q = Xc^T yc`` of the centered data (computed
once per training set; n_features up to a few hundred), in scikit-learn's coordinate-descent units
(``n`` times the objective). Each alpha starts from the previous solution (warm start). The sequential
strong rule (Tibshirani et al., 2012) keeps the features with ``|c_j(alpha_prev)| >= 2 a - a_prev``
(``c = q - Qw - beta w``, ``a = n alpha l1_ratio``) and the previous support; on those, an active-set
method in the manner of the feature-sign search (Lee et al., 2007) solves the linear system of the active
features with their signs, ``(Q_AA + beta I) w_A = q_A - a sign(w_A)``, line-searches the true objective
at the sign changes when a sign flips, and adds the features that violate ``|c_j| <= a``, until no
violator is left: the solution of the screened problem, to rounding. Then the KKT check on the features
the rule discarded adds any violator back and solves again, so screening never drops a feature of the
unscreened solution. The duality gap is computed as scikit-learn's ``cd_fast.gap_enet_gram`` does and
must be below ``tol * ||yc||^2`` (reported divided by ``n``, as ``enet_path``'s ``dual_gaps``); where the
linear algebra cannot reach it (a singular active Gram, a stalled line search) cyclic coordinate descent
on the Gram finishes the alpha.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from funcreg._src.analysis.paths.cv import Folds, _check_folds
from funcreg._src.analysis.paths.result import RegularizationPath
from funcreg._src.core.validation import check_bool, check_int, check_number

__all__ = ["LassoPath", "lasso_cv", "lasso_path"]

_VIOLATION_RTOL = 1e-9  # |c_j| > a (1 + rtol) is a KKT violation: rounding of an exact solve stays below
_RESOLUTION = float(np.finfo(np.float64).resolution)


class LassoPath(NamedTuple):
    """The result of :func:`lasso_path`, one row per alpha (alphas descending, as scikit-learn's).

    Attributes:
        alphas: ``(A,)`` float64, decreasing.
        coefs: ``(A, n_features)``: the coefficients (``coefs.T`` is ``enet_path``'s ``coefs``).
        intercepts: ``(A,)``: ``mean(y) - mean(X) @ w`` with ``fit_intercept``, else zeros.
        dual_gaps: ``(A,)``: the duality gap at each solution, in the objective's units (``enet_path``'s).
        n_iter: ``(A,)`` int64: the linear solves (active-set steps) plus coordinate-descent epochs.
        n_screened: ``(A,)`` int64: the features the strong rule kept (before the KKT check).
        kkt_violations: ``(A,)`` int64: the discarded features the KKT check had to add back.
    """

    alphas: torch.Tensor
    coefs: torch.Tensor
    intercepts: torch.Tensor
    dual_gaps: torch.Tensor
    n_iter: torch.Tensor
    n_screened: torch.Tensor
    kkt_violations: torch.Tensor


# ----------------------------------------------------------------------------------------------------
# Checks


def _as_matrix(x: Any, what: str) -> np.ndarray:
    """``x`` as a float64 numpy array, checked to be real and finite (the rows the messages name)."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"{what} must be real, got a complex tensor")
        arr = x.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{what} must be a real tensor or array, got {type(x).__name__}") from err
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)) if arr.ndim else [0]
        raise ValueError(
            f"{what} has non-finite entries (NaN or inf) in {len(bad)} row(s), the first at row {int(bad[0])}"
        )
    return arr


def _check_xy(x: Any, y: Any, what: str = "x") -> tuple[np.ndarray, np.ndarray]:
    xa = _as_matrix(x, what)
    ya = _as_matrix(y, "y" if what == "x" else f"{what}'s y")
    if xa.ndim != 2:
        raise ValueError(f"{what} must be 2-D (n_samples, n_features), got shape {xa.shape}")
    if ya.ndim != 1:
        raise ValueError(f"y must be 1-D (n_samples,), got shape {ya.shape} (one target only)")
    if xa.shape[0] != ya.shape[0]:
        raise ValueError(f"{what} has {xa.shape[0]} rows and y has {ya.shape[0]}: one row per example")
    if xa.shape[0] < 2 or xa.shape[1] < 1:
        raise ValueError(f"{what} must have at least 2 rows and 1 column, got shape {xa.shape}")
    return xa, ya


def _check_options(l1_ratio: Any, eps: Any, n_alphas: Any, tol: Any, max_iter: Any, flags: dict) -> None:
    check_number("l1_ratio", l1_ratio, low=0.0, high=1.0, low_open=True, allow_tensor=False)
    check_number("eps", eps, low=0.0, high=1.0, low_open=True, allow_tensor=False)
    check_int("n_alphas", n_alphas, low=1)
    check_number("tol", tol, low=0.0, low_open=True, allow_tensor=False)
    check_int("max_iter", max_iter, low=1)
    for flag, value in flags.items():
        check_bool(flag, value)


def _check_alphas(alphas: Any) -> np.ndarray:
    a = _as_matrix(alphas, "alphas").reshape(-1)
    if a.size == 0:
        raise ValueError("alphas is empty")
    if (a <= 0).any():
        raise ValueError(f"Invalid alphas value: {a.tolist()} (must be > 0)")
    if a.size > 1 and not (np.diff(a) < 0).all():
        raise ValueError(
            f"Invalid alphas value: {a.tolist()} (must be strictly decreasing: the path warm-starts "
            "from the largest; sort them descending)"
        )
    return a


# ----------------------------------------------------------------------------------------------------
# The solver, in scikit-learn's cd units: 1/2 w^T Q w - q^T w + a ||w||_1 + beta/2 ||w||^2 (+ 1/2 y^T y)


class _Gram(NamedTuple):
    """A training set's centered Gram: ``Q``, ``q``, ``||yc||^2``, the means and ``n``."""

    Q: np.ndarray
    q: np.ndarray
    y2: float
    x_mean: np.ndarray
    y_mean: float
    n: int


def _gram(x: np.ndarray, y: np.ndarray, fit_intercept: bool) -> _Gram:
    if fit_intercept:
        x_mean, y_mean = x.mean(axis=0), float(y.mean())
        xc, yc = x - x_mean, y - y_mean
    else:
        x_mean, y_mean = np.zeros(x.shape[1]), 0.0
        xc, yc = x, y
    return _Gram(xc.T @ xc, xc.T @ yc, float(yc @ yc), x_mean, y_mean, x.shape[0])


def _alpha_grid(g: _Gram, l1_ratio: float, eps: float, n_alphas: int) -> np.ndarray:
    """scikit-learn's ``_alpha_grid``: ``max |X^T y| / (n l1_ratio)`` down to ``eps`` times it."""
    alpha_max = float(np.abs(g.q).max()) / (g.n * l1_ratio)
    if alpha_max <= _RESOLUTION:
        return np.full(n_alphas, _RESOLUTION)
    return np.geomspace(alpha_max, alpha_max * eps, num=n_alphas)


def _gap(g: _Gram, w: np.ndarray, qw_vec: np.ndarray, a: float, beta: float) -> tuple[float, np.ndarray]:
    """The duality gap as ``cd_fast.gap_enet_gram`` computes it (formulation A), and ``XtA = q - Qw - beta w``."""
    xta = g.q - qw_vec - beta * w
    dual_norm = float(np.abs(xta).max())
    w2 = float(w @ w) if beta > 0 else 0.0
    q_dot_w = float(g.q @ w)
    r2 = g.y2 + float(w @ qw_vec) - 2.0 * q_dot_w
    ry = g.y2 - q_dot_w
    primal = 0.5 * (r2 + beta * w2) + a * float(np.abs(w).sum())
    scale = a / dual_norm if dual_norm > a else 1.0
    dual = -0.5 * scale**2 * (r2 + beta * w2) + scale * ry
    return primal - dual, xta


def _qw(Q: np.ndarray, w: np.ndarray) -> np.ndarray:
    s = np.flatnonzero(w)
    return Q[:, s] @ w[s] if s.size else np.zeros_like(w)


def _active_set(
    g: _Gram, w: np.ndarray, a: float, beta: float, keep: np.ndarray, budget: int
) -> tuple[int, bool]:
    """Active-set steps on the features ``keep`` marks, in place on ``w``, until no violator is left
    (returns the steps and ``True``) or the steps stall / run out / meet a singular system (``False``).

    From a point that is optimal on its support, the violators are activated with the signs of their
    correlations; if one of them comes out of the solve with the other sign, only the largest is
    activated (its sign is then right: the feature-sign search's guarantee). From a point that is not
    (after a line search, or a warm start), the support is solved again first."""
    Q, q = g.Q, g.q
    exact = False
    single = False
    steps = 0
    limit = a * (1.0 + _VIOLATION_RTOL)
    while steps < budget:
        c = q - _qw(Q, w) - beta * w
        theta = np.sign(w)
        new = np.zeros(len(w), dtype=bool)
        if exact:
            new = keep & (theta == 0) & (np.abs(c) > limit)
            if not new.any():
                return steps, True
            if single:
                j = int(np.argmax(np.where(new, np.abs(c), -1.0)))
                new[:] = False
                new[j] = True
            theta[new] = np.sign(c[new])
        idx = np.flatnonzero(theta)
        if idx.size == 0:  # w = 0 is optimal on the empty support
            exact = True
            continue
        m = Q[np.ix_(idx, idx)]
        if beta > 0:
            m = m + beta * np.eye(idx.size)
        steps += 1
        try:
            z = np.linalg.solve(m, q[idx] - a * theta[idx])
        except np.linalg.LinAlgError:
            return steps, False
        if not np.isfinite(z).all():
            return steps, False
        right = np.sign(z) == theta[idx]
        if right.all():
            w[idx] = z
            exact, single = True, False
            continue
        x0 = w[idx]
        if exact and not right[x0 == 0].all():
            if single:
                return steps, False
            single = True  # a new feature came out with the other sign: activate one at a time
            continue
        # An old coefficient changes sign: the best point of the true objective among the crossings
        # (the objective decreases up to the first: it equals the signed quadratic there).
        d = z - x0
        flips = (x0 != 0) & ~right
        t_flip = x0[flips] / (x0[flips] - z[flips])
        where = np.flatnonzero(flips)
        points = x0[None, :] + t_flip[:, None] * d[None, :]
        points[np.arange(where.size), where] = 0.0  # exact zeros at each coordinate's own crossing
        gd = -float(c[idx] @ d)
        dmd = float(d @ (m @ d))
        phi = t_flip * gd + 0.5 * t_flip**2 * dmd + a * (np.abs(points).sum(axis=1) - np.abs(x0).sum())
        k = int(np.argmin(phi))
        if not phi[k] < 0.0:
            return steps, False
        w[idx] = points[k]
        exact = False
    return steps, False


def _coordinate_descent(
    g: _Gram, w: np.ndarray, a: float, beta: float, tol_abs: float, epochs: int
) -> tuple[int, float]:
    """Cyclic coordinate descent on the Gram (scikit-learn's ``enet_coordinate_descent_gram`` without
    its screening), in place on ``w``, until the duality gap is below ``tol_abs``; the fallback."""
    Q, q = g.Q, g.q
    qw_vec = Q @ w
    diag = np.diag(Q)
    gap = math.inf
    for epoch in range(1, epochs + 1):
        for j in range(len(w)):
            if diag[j] == 0.0:
                continue
            wj = w[j]
            tmp = q[j] - qw_vec[j] + wj * diag[j]
            new = math.copysign(max(abs(tmp) - a, 0.0), tmp) / (diag[j] + beta)
            if new != wj:
                qw_vec += (new - wj) * Q[j]
                w[j] = new
        gap, _ = _gap(g, w, qw_vec, a, beta)
        if gap <= tol_abs:
            return epoch, gap
    return epochs, gap


def _solve_path(
    g: _Gram, alphas: np.ndarray, l1_ratio: float, tol: float, max_iter: int, screening: bool
) -> tuple[np.ndarray, ...]:
    """The path on one training set: coefficients ``(A, p)``, gaps (cd units), steps, screened, violations."""
    p = g.Q.shape[0]
    n = g.n
    tol_abs = tol * g.y2
    w = np.zeros(p)
    coefs = np.empty((len(alphas), p))
    gaps = np.empty(len(alphas))
    steps = np.zeros(len(alphas), dtype=np.int64)
    screened = np.zeros(len(alphas), dtype=np.int64)
    violations = np.zeros(len(alphas), dtype=np.int64)
    c_prev = g.q.copy()  # c at w = 0
    a_prev = float(np.abs(g.q).max())  # the alpha_max of this training set, in cd units
    everything = np.ones(p, dtype=bool)
    for i, alpha in enumerate(alphas):
        a = float(alpha) * l1_ratio * n
        beta = float(alpha) * (1.0 - l1_ratio) * n
        if screening:
            keep = (np.abs(c_prev) >= 2.0 * a - a_prev) | (w != 0)
        else:
            keep = everything.copy()
        screened[i] = int(keep.sum())
        done, ok = 0, True
        while True:
            k, ok = _active_set(g, w, a, beta, keep, max_iter - done)
            done += k
            if not ok:
                break
            c = g.q - _qw(g.Q, w) - beta * w
            outside = ~keep & (np.abs(c) > a * (1.0 + _VIOLATION_RTOL))
            if not outside.any():
                break
            violations[i] += int(outside.sum())
            keep |= outside
        qw_vec = _qw(g.Q, w)
        gap, xta = _gap(g, w, qw_vec, a, beta)
        if not ok or gap > tol_abs:
            epochs, gap = _coordinate_descent(g, w, a, beta, tol_abs, max(max_iter - done, 1))
            done += epochs
            qw_vec = g.Q @ w
            gap, xta = _gap(g, w, qw_vec, a, beta)
            if gap > tol_abs:
                warnings.warn(
                    f"lasso_path did not converge at alpha={alpha:.6g}: duality gap {gap / n:.3e} > "
                    f"tolerance {tol_abs / n:.3e}; raise max_iter or tol, or regularize more",
                    RuntimeWarning,
                    stacklevel=3,
                )
        coefs[i] = w
        gaps[i] = gap
        steps[i] = done
        c_prev, a_prev = xta, a
    return coefs, gaps, steps, screened, violations


def _intercepts(g: _Gram, coefs: np.ndarray) -> np.ndarray:
    return g.y_mean - coefs @ g.x_mean


# ----------------------------------------------------------------------------------------------------
# Public entries


def lasso_path(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    alphas: Sequence[float] | torch.Tensor | np.ndarray | None = None,
    l1_ratio: float = 1.0,
    n_alphas: int = 100,
    eps: float = 1e-3,
    fit_intercept: bool = True,
    tol: float = 1e-4,
    max_iter: int = 1000,
    screening: bool = True,
) -> LassoPath:
    """The lasso / elastic-net path of linear least squares, exactly solved with warm starts and screening.

    Minimizes scikit-learn's ``1/(2n) ||y - Xw - b||^2 + alpha (l1_ratio ||w||_1 + (1 - l1_ratio)/2
    ||w||^2)`` at each alpha (``b`` unpenalized; none with ``fit_intercept=False``, as
    ``sklearn.linear_model.lasso_path`` / ``enet_path``). An active-set solver on the Gram matrix with the
    sequential strong rule and a KKT check (see the module); it stops where the duality gap is below
    ``tol * ||y - mean(y)||^2 / n`` (scikit-learn's convention; the active-set solution is exact to
    rounding, so the gap is usually far below). For a loss or model that is not linear least squares,
    use :func:`funcreg.regularization_path`.

    Args:
        x: ``(n, p)`` features (a tensor or an array; float64 inside).
        y: ``(n,)`` target.
        alphas: a strictly decreasing grid (default: scikit-learn's, ``n_alphas`` log-spaced from
            ``alpha_max = max |Xc^T yc| / (n l1_ratio)`` down to ``eps * alpha_max``).
        l1_ratio: the L1 share of the penalty, in ``(0, 1]`` (1: the lasso).
        n_alphas, eps: the default grid.
        fit_intercept: center ``x`` and ``y`` (an unpenalized intercept).
        tol: the duality-gap tolerance, relative to ``||yc||^2 / n``.
        max_iter: the most linear solves plus coordinate-descent epochs per alpha.
        screening: use the sequential strong rule (the KKT check keeps the result exact).

    Returns:
        A :class:`LassoPath` (float64 tensors, alphas descending).

    Examples:
        >>> import torch, funcreg as fr
        >>> gen = torch.Generator().manual_seed(0)
        >>> x = torch.randn(50, 4, generator=gen, dtype=torch.float64)
        >>> y = 3 * x[:, 0] - x[:, 1] + 0.1 * torch.randn(50, generator=gen, dtype=torch.float64)
        >>> path = fr.lasso_path(x, y, n_alphas=5)
        >>> (path.coefs != 0).sum(dim=1).tolist()  # features enter as alpha decreases
        [0, 2, 2, 2, 3]
        >>> bool((path.dual_gaps <= 1e-4 * ((y - y.mean()) ** 2).mean()).all())
        True
    """
    _check_options(
        l1_ratio, eps, n_alphas, tol, max_iter, {"fit_intercept": fit_intercept, "screening": screening}
    )
    xa, ya = _check_xy(x, y)
    g = _gram(xa, ya, fit_intercept)
    grid = _alpha_grid(g, float(l1_ratio), float(eps), n_alphas) if alphas is None else _check_alphas(alphas)
    coefs, gaps, steps, screened, violations = _solve_path(
        g, grid, float(l1_ratio), float(tol), max_iter, screening
    )
    return LassoPath(
        alphas=torch.from_numpy(grid.copy()),
        coefs=torch.from_numpy(coefs),
        intercepts=torch.from_numpy(_intercepts(g, coefs)),
        dual_gaps=torch.from_numpy(gaps / g.n),
        n_iter=torch.from_numpy(steps),
        n_screened=torch.from_numpy(screened),
        kkt_violations=torch.from_numpy(violations),
    )


def lasso_cv(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    folds: Folds | None = 5,
    validation: Sequence[Any] | None = None,
    alphas: Sequence[float] | torch.Tensor | np.ndarray | None = None,
    l1_ratio: float = 1.0,
    n_alphas: int = 100,
    eps: float = 1e-3,
    fit_intercept: bool = True,
    tol: float = 1e-4,
    max_iter: int = 1000,
    screening: bool = True,
    refit: bool = True,
) -> RegularizationPath:
    """The lasso / elastic net cross-validated: :func:`lasso_path` per fold, as a :class:`RegularizationPath`.

    What ``LassoCV`` (``ElasticNetCV`` for one ``l1_ratio``) does, returned as
    :func:`funcreg.regularization_path` returns it: one path per training fold (centered on its own
    means) on one grid (computed on all of ``x``, as scikit-learn's), the validation loss of each fold
    ``1/2 mean((x w + b - y)^2)`` over its held-out examples (half of ``LassoCV.mse_path_``), and
    ``path.best`` is ``LassoCV.alpha_`` for the same folds and grid. The coefficient is named
    ``"alpha"``; the parameters are ``{"w": (p,), "b": ()}`` trees, stacked.

    Args:
        x, y: all the training data.
        folds: ``K`` (scikit-learn's ``KFold(K)``: :func:`funcreg.kfold`) or ``(train, validation)``
            index pairs; ignored with ``validation``.
        validation: ``(x_val, y_val)``: one held-out split instead of folds.
        alphas, l1_ratio, n_alphas, eps, fit_intercept, tol, max_iter, screening: as in :func:`lasso_path`.
        refit: with folds, also solve the path on all examples (``path.params_at(alpha)``, as
            ``LassoCV.coef_``).

    Returns:
        A :class:`RegularizationPath` (coefficients ascending; ``sparsity`` counts ``w`` and ``b``).

    Examples:
        >>> import torch, funcreg as fr
        >>> gen = torch.Generator().manual_seed(0)
        >>> x = torch.randn(60, 5, generator=gen, dtype=torch.float64)
        >>> y = 2 * x[:, 0] - x[:, 1] + torch.randn(60, generator=gen, dtype=torch.float64)
        >>> path = fr.lasso_cv(x, y, folds=5, n_alphas=20)
        >>> path.val_loss.shape, path.name
        (torch.Size([20, 5]), 'alpha')
        >>> (path.params_at(path.one_se)["w"] != 0).tolist()
        [True, True, False, False, False]
    """
    _check_options(
        l1_ratio,
        eps,
        n_alphas,
        tol,
        max_iter,
        {"fit_intercept": fit_intercept, "screening": screening, "refit": refit},
    )
    xa, ya = _check_xy(x, y)
    n = xa.shape[0]
    splits: list[tuple[np.ndarray, np.ndarray | None]]
    if validation is not None:
        if not isinstance(validation, (tuple, list)) or len(validation) != 2:
            raise TypeError("validation must be a pair (x_val, y_val)")
        xv, yv = _check_xy(validation[0], validation[1], "validation")
        if xv.shape[1] != xa.shape[1]:
            raise ValueError(f"validation has {xv.shape[1]} features, x has {xa.shape[1]}")
        splits = [(np.arange(n), None)]
        labels = ["seed 0, validation"]
        refit = False
    else:
        if folds is None:
            raise ValueError("give folds (an int K or index pairs) or validation=(x_val, y_val)")
        splits = [(tr.numpy(), va.numpy()) for tr, va in _check_folds(folds, n)]
        labels = [f"seed 0, fold {f}" for f in range(len(splits))]
    l1 = float(l1_ratio)
    if alphas is None:
        grid = _alpha_grid(_gram(xa, ya, fit_intercept), l1, float(eps), n_alphas)
    else:
        grid = _check_alphas(alphas)
    order = np.arange(len(grid))[::-1]  # the result lists coefficients ascending

    def fit(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = _gram(xa[rows], ya[rows], fit_intercept)
        coefs = _solve_path(g, grid, l1, float(tol), max_iter, screening)[0]
        return coefs[order], _intercepts(g, coefs)[order]

    def half_mse(xs: np.ndarray, ys: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
        return 0.5 * ((xs @ w.T + b[None, :] - ys[:, None]) ** 2).mean(axis=0)

    train_loss, val_loss, sparsity, ws, bs = [], [], [], [], []
    for tr, va in splits:
        w, b = fit(tr)
        train_loss.append(half_mse(xa[tr], ya[tr], w, b))
        held = (xv, yv) if va is None else (xa[va], ya[va])
        val_loss.append(half_mse(held[0], held[1], w, b))
        sparsity.append(((w == 0).sum(axis=1) + (b == 0)) / (w.shape[1] + 1))
        ws.append(w)
        bs.append(b)
    c, r = len(grid), len(splits)
    refit_params = None
    if refit:
        w_all, b_all = fit(np.arange(n))
        refit_params = {"w": torch.from_numpy(w_all.copy()), "b": torch.from_numpy(b_all.copy())}
    stacked_w = np.stack(ws, axis=1).reshape(c * r, -1)  # member c * R + r
    stacked_b = np.stack(bs, axis=1).reshape(c * r)
    return RegularizationPath(
        name="alpha",
        coefficients=torch.from_numpy(grid[order].copy()),
        train_loss=torch.from_numpy(np.stack(train_loss, axis=1)),
        val_loss=torch.from_numpy(np.stack(val_loss, axis=1)),
        sparsity=torch.from_numpy(np.stack(sparsity, axis=1).astype(np.float64)),
        replicates=labels,
        seeds=1,
        params={"w": torch.from_numpy(stacked_w), "b": torch.from_numpy(stacked_b)},
        refit_params=refit_params,
    )
