"""fr.lasso_path / fr.lasso_cv against scikit-learn's coordinate descent (and skglm) on diabetes.

Two datasets that ship with scikit-learn: ``load_diabetes`` (442 x 10) and its degree-2 polynomial
features, standardized (442 x 65, a nearly singular Gram). For each: the path on scikit-learn's default
grid (100 alphas, eps=1e-3), funcreg's active-set solver against ``sklearn.linear_model.enet_path``
(Gram precomputed, as ``lasso_path`` does for n > p) at ``tol=1e-4`` and ``1e-8``, and skglm's
working-set ``Lasso.path`` / ``ElasticNet.path`` where skglm is installed; then ``LassoCV`` /
``ElasticNetCV`` with ``KFold(5)`` against ``fr.lasso_cv`` (same folds, same grid). Times are medians
of interleaved repeats on one thread; the ratio is funcreg / the other (below 1: funcreg is faster).
Every solution's duality gap is computed with scikit-learn's formula (``cd_fast.gap_enet_gram``), and
the CV rows print both chosen alphas and the largest difference of the chosen coefficients.

    python benchmarks/lasso_path_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import _machine
import numpy as np
import torch

import funcreg as fr

torch.set_num_threads(1)


def gap(x: np.ndarray, y: np.ndarray, w: np.ndarray, alpha: float, l1_ratio: float) -> float:
    """The duality gap of ``w`` (objective units), as scikit-learn's ``cd_fast.gap_enet_gram``."""
    xc, yc = x - x.mean(axis=0), y - y.mean()
    n = len(y)
    a, beta = alpha * l1_ratio * n, alpha * (1 - l1_ratio) * n
    r = yc - xc @ w
    xta = xc.T @ r - beta * w
    r2, ry, w2 = r @ r, r @ yc, w @ w
    dual_norm = np.abs(xta).max()
    primal = 0.5 * (r2 + beta * w2) + a * np.abs(w).sum()
    scale = a / dual_norm if dual_norm > a else 1.0
    return float(primal - (-0.5 * scale**2 * (r2 + beta * w2) + scale * ry)) / n


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out = fn()  # warm-up (numba compiles skglm here)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def datasets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_diabetes
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    x, y = load_diabetes(return_X_y=True)
    poly = StandardScaler().fit_transform(PolynomialFeatures(2, include_bias=False).fit_transform(x))
    return {"diabetes (442x10)": (x, y), "diabetes poly2 (442x65)": (poly, y)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, diabetes only (a smoke run)")
    args = parser.parse_args()
    from sklearn.linear_model import ElasticNetCV, LassoCV, enet_path
    from sklearn.model_selection import KFold

    try:
        import skglm
    except ImportError:  # pragma: no cover - depends on the environment
        skglm = None
    repeats = 3 if args.quick else 15
    data = datasets()
    if args.quick:
        data = dict(list(data.items())[:1])
    print(f"CPU: {_machine.cpu_model()}; torch {torch.__version__}, 1 thread; median of {repeats} repeats")
    print(f"skglm: {skglm.__version__ if skglm else 'not installed'}")
    rows = []
    for dname, (x, y) in data.items():
        xc, yc = x - x.mean(axis=0), y - y.mean()
        for l1 in (1.0, 0.5):
            what = "lasso" if l1 == 1 else "enet 0.5"
            for tol in (1e-4, 1e-8):
                t_fr, ours = timed(lambda: fr.lasso_path(x, y, l1_ratio=l1, tol=tol), repeats)  # noqa: B023
                alphas = ours.alphas.numpy()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t_sk, (_, sk_coefs, _) = timed(
                        lambda: enet_path(xc, yc, alphas=alphas, l1_ratio=l1, tol=tol, max_iter=10_000),  # noqa: B023
                        repeats,
                    )
                gaps_fr = max(gap(x, y, w, a, l1) for w, a in zip(ours.coefs.numpy(), alphas))
                gaps_sk = max(gap(x, y, w, a, l1) for w, a in zip(sk_coefs.T, alphas))
                rows.append(
                    (dname, f"{what} path, tol {tol:g}", "sklearn enet_path", t_fr, t_sk, gaps_fr, gaps_sk)
                )
                if skglm is not None:
                    est = (
                        skglm.Lasso(fit_intercept=False, tol=tol)
                        if l1 == 1
                        else (skglm.ElasticNet(l1_ratio=l1, fit_intercept=False, tol=tol))
                    )
                    t_sg, (_, sg_coefs, _, _) = timed(lambda: est.path(xc, yc, alphas), repeats)  # noqa: B023
                    gaps_sg = max(gap(x, y, w, a, l1) for w, a in zip(sg_coefs.T, alphas))
                    rows.append(
                        (dname, f"{what} path, tol {tol:g}", "skglm path", t_fr, t_sg, gaps_fr, gaps_sg)
                    )
            cv_cls = LassoCV if l1 == 1 else ElasticNetCV
            kw = {} if l1 == 1 else {"l1_ratio": l1}
            t_fr, path = timed(lambda: fr.lasso_cv(x, y, folds=5, l1_ratio=l1), repeats)  # noqa: B023
            t_sk, cv = timed(lambda: cv_cls(cv=KFold(5), **kw).fit(x, y), repeats)  # noqa: B023
            chosen = path.params_at(path.best)["w"].numpy()
            g_fr, g_sk = gap(x, y, chosen, path.best, l1), gap(x, y, cv.coef_, cv.alpha_, l1)
            same = "same alpha" if np.isclose(path.best, cv.alpha_, rtol=1e-12) else "DIFFERENT alpha"
            coef_diff = float(np.abs(chosen - cv.coef_).max())
            label = f"{what} CV 5 folds ({same}, max abs dw {coef_diff:.2g})"
            rows.append((dname, label, cv_cls.__name__, t_fr, t_sk, g_fr, g_sk))
    header = ("dataset", "task", "against", "funcreg ms", "other ms", "ratio", "gap funcreg", "gap other")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for dname, task, other, t_fr, t_o, g_fr, g_o in rows:
        cells = (
            dname,
            task,
            other,
            f"{1e3 * t_fr:.2f}",
            f"{1e3 * t_o:.2f}",
            f"{t_fr / t_o:.2f}",
            f"{g_fr:.1e}",
            f"{g_o:.1e}",
        )
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
