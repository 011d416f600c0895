"""Regularization paths: choose the coefficient by cross-validation, as LassoCV and glmnet do.

``fr.regularization_path`` trains a grid of coefficients x seeds x folds as ONE vmapped run (every
fold is a member) and returns the table of coefficient x (train loss, validation loss mean +- std over
folds, sparsity), the best coefficient and glmnet's one-standard-error choice (the largest coefficient
whose mean validation loss is within one standard error of the minimum).

Part 1, the lasso, against scikit-learn. A linear least-squares problem (200 examples, 20 features, 5
of them useful), scikit-learn's objective ``1/(2n) ||y - Xw - b||^2 + alpha ||w||_1`` with an
unpenalized intercept, solved by proximal gradient (``fr.sgd(1/L)`` with ``fr.l1`` in the proximal
form: ISTA) in float64, on the same alphas and the same folds (``KFold(5)``, no shuffling) as
``sklearn.linear_model.LassoCV``. It prints both choices, the largest differences of the
cross-validation curves and of the refit coefficients (``LassoCV.coef_``), and the path table. Then
the same choice by ``fr.lasso_cv``, the exact path a linear model has (an active-set solver with warm
starts and screening, milliseconds).

Part 2, an MLP on scikit-learn's digits (64-32-10, L1 in the proximal form on both weight matrices,
SGD with momentum and minibatches): 9 coefficients x 5 folds (plus one refit per coefficient on all
training images) in one run, with a progress bar (tqdm, when installed). The validation loss is the
cross-entropy; then the refit models at the best and one-SE coefficients are evaluated on the held-out
test split. The one-SE model is sparser at (nearly) the same accuracy: that is the point of the rule.

The figure (``lasso_path.png``): the lasso's cross-validation curve beside LassoCV's, and the digits
path (``RegularizationPath.plot``: validation loss +- 1 SE, training loss, sparsity, both choices).

    python examples/lasso_path.py [--quick] [--out DIR] [--epochs N]
"""

from __future__ import annotations

import time

import _common
import numpy as np
import torch
from torch.func import functional_call

import funcreg as fr

torch.set_num_threads(1)


def lasso_part(quick: bool) -> tuple[fr.RegularizationPath, object]:
    from sklearn.linear_model import LassoCV
    from sklearn.model_selection import KFold

    rng = np.random.default_rng(0)
    n, p = (100, 10) if quick else (200, 20)
    x = rng.normal(size=(n, p))
    x[:, 1] += 0.5 * x[:, 0]  # some correlation between features
    w_true = np.zeros(p)
    w_true[:5] = [3.0, -2.0, 1.5, 1.0, -0.5]
    y = x @ w_true + 1.0 + rng.normal(scale=2.0, size=n)
    alphas = np.logspace(-3, 0.5, 6 if quick else 12)
    cv = LassoCV(alphas=alphas, cv=KFold(5), tol=1e-12, max_iter=100_000).fit(x, y)

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    design = torch.cat([xt, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    curvature = max(  # the largest curvature over the training folds and all data: step 1/L converges
        float(torch.linalg.eigvalsh(design[tr].T @ design[tr] / len(tr)).max())
        for tr in [t for t, _ in fr.kfold(n, 5)] + [torch.arange(n)]
    )
    lr = 1.0 / curvature

    def squared_error(prm: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (
            0.5 * (x @ prm["w"] + prm["b"] - y) ** 2
        )  # per example; the mean is scikit-learn's 1/(2n)||.||^2

    steps = 150 if quick else 400
    start = time.perf_counter()
    path = fr.regularization_path(
        squared_error, fr.sgd(lr), {"w": torch.zeros(p, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)},  # noqa: E501
        (xt, yt), alphas.tolist(), penalty=lambda h: fr.l1(h["alpha"], mask={"w": True, "b": False}),
        form="proximal", learning_rate=lr, steps=steps, folds=5, name="alpha",
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    chosen = path.params_at(path.best)
    print(
        f"Part 1: lasso, {n} examples x {p} features, {len(alphas)} alphas x 5 folds (+ refit) = "
        f"{len(alphas) * 6} members, {steps} ISTA steps in {elapsed:.1f} s"
    )
    _common.print_table(
        [
            {"": "chosen alpha", "funcreg": path.best, "LassoCV": float(cv.alpha_)},
            {
                "": "nonzero coefficients",
                "funcreg": int((chosen["w"] != 0).sum()),
                "LassoCV": int((cv.coef_ != 0).sum()),
            },
            {"": "intercept", "funcreg": float(chosen["b"]), "LassoCV": float(cv.intercept_)},
        ],
        title="the choice, funcreg vs scikit-learn (same alphas, same folds)",
        float_format=".6g",
    )
    curve_diff = np.abs(
        2 * path.val_loss.numpy()[::-1] - cv.mse_path_
    ).max()  # ours: 1/2 mse, alphas ascending
    print(f"largest difference of the per-fold validation MSE (LassoCV.mse_path_): {curve_diff:.3e}")
    print(
        "largest difference of the refit coefficients (LassoCV.coef_):       "
        f"{np.abs(chosen['w'].numpy() - cv.coef_).max():.3e}"
    )
    print(f"one-SE choice (glmnet's lambda.1se): alpha = {path.one_se:.4g} (LassoCV has no such rule)")
    print("\n" + path.table())
    # a linear model has an exact path of its own: an active-set solver with warm starts and screening
    start = time.perf_counter()
    exact = fr.lasso_cv(x, y, folds=5, alphas=alphas[::-1].copy())
    exact_time = time.perf_counter() - start
    exact_w = exact.params_at(exact.best)["w"].numpy()
    print(
        f"\nfr.lasso_cv (the exact path, {exact_time * 1e3:.1f} ms): alpha = {exact.best:.4g} "
        f"(LassoCV {float(cv.alpha_):.4g}); largest difference of its coefficients from LassoCV.coef_: "
        f"{np.abs(exact_w - cv.coef_).max():.3e}"
    )
    assert exact.best == float(cv.alpha_)
    return path, cv


def digits_part(quick: bool, epochs: int) -> fr.RegularizationPath:
    x_train, x_test, y_train, y_test = _common.load_digits_split(seed=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    params = fr.params_of(model)
    weights = {k: k.endswith("weight") for k in params}
    coeffs = [0.0, 3e-4, 3e-3] if quick else [0.0] + np.logspace(-4, -1.5, 8).tolist()
    k = 3 if quick else 5
    batch = 64
    steps = epochs * ((len(x_train) * (k - 1) // k) // batch)

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y, reduction="none")

    print(
        f"\nPart 2: MLP 64-32-10 on digits, L1 (proximal) on the weights: "
        f"{len(coeffs)} coefficients x {k} folds "
        f"(+ refit) = {len(coeffs) * (k + 1)} members, {steps} SGD steps of batch {batch} each"
    )
    start = time.perf_counter()
    path = fr.regularization_path(
        loss, fr.sgd(0.1, momentum=0.9), params, (x_train, y_train), coeffs,
        penalty=lambda h: fr.l1(h["coeff"], mask=weights), form="proximal", learning_rate=0.1,
        steps=steps, folds=k, batch_size=batch, progress=True,
    )  # fmt: skip
    print(f"[path: {time.perf_counter() - start:.1f} s]")
    print(path.table())
    rows = []
    for label, c in (("best", path.best), ("one-SE", path.one_se)):
        refit = path.params_at(c)
        with torch.no_grad():
            acc = (functional_call(model, refit, (x_test,)).argmax(1) == y_test).float().mean().item()
        rows.append(
            {"choice": label, "coeff": c, "test accuracy": acc, "exact zeros": fr.sparsity(refit).overall}
        )
    _common.print_table(
        rows, title="refit models (all training images) on the held-out test split", float_format=".4g"
    )
    return path


def main() -> None:
    def options(parser):  # noqa: ANN001, ANN202
        parser.add_argument("--epochs", type=int, default=30)

    args = _common.parse_args(__doc__, options)
    lasso, cv = lasso_part(args.quick)
    digits = digits_part(args.quick, 2 if args.quick else args.epochs)

    plt = _common.pyplot()
    fig, (ax, ax_digits) = plt.subplots(1, 2, figsize=(13, 4.8))
    alphas = lasso.coefficients.numpy()
    ax.errorbar(
        alphas,
        2 * lasso.val_mean.numpy(),
        yerr=2 * lasso.val_se.numpy(),
        marker="o",
        capsize=3,
        label="funcreg (ISTA), ± 1 SE",
    )
    ax.plot(cv.alphas_, cv.mse_path_.mean(axis=1), "x--", color="black", label="LassoCV")
    ax.axvline(
        lasso.best, color="tab:red", linestyle=":", label=f"best {lasso.best:.3g} (LassoCV {cv.alpha_:.3g})"
    )
    ax.axvline(lasso.one_se, color="tab:purple", linestyle="-.", label=f"one-SE {lasso.one_se:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("alpha")
    ax.set_ylabel("validation MSE (mean over 5 folds)")
    ax.set_title("lasso: the same curve and choice as scikit-learn")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    digits.plot(ax_digits)
    ax_digits.set_title("MLP on digits: L1 path, cross-entropy (5 folds)")
    fig.tight_layout()
    _common.save_figure(fig, args.out, "lasso_path.png")


if __name__ == "__main__":
    main()
