"""fr.regularization_path: the choice agrees with scikit-learn's LassoCV, members equal runs trained alone.

Expected values come from scikit-learn (LassoCV, Lasso, KFold), from the same training run done member
by member with fr.make_step, or from glmnet's one-standard-error rule written out here with numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcreg as fr

F64 = torch.float64


def lasso_problem(n: int = 60, p: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p))
    w = np.zeros(p)
    w[: min(p, 4)] = [2.0, -1.5, 1.0, 0.5][: min(p, 4)]
    return x, x @ w + 0.3 + rng.normal(size=n)


def squared_error(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """scikit-learn's Lasso objective is mean(1/2 (y - Xw - b)^2) + alpha ||w||_1: its per-example term."""
    return 0.5 * (x @ p["w"] + p["b"] - y) ** 2


def ista_path(
    x: np.ndarray, y: np.ndarray, alphas: list[float], steps: int, **kwargs
) -> fr.RegularizationPath:  # noqa: ANN003
    """Proximal gradient (ISTA) with step 1/L, L the largest curvature over all training sets."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    a = torch.cat([xt, torch.ones(len(x), 1, dtype=F64)], dim=1)
    curvature = max(
        float(torch.linalg.eigvalsh(a[tr].T @ a[tr] / len(tr)).max())
        for tr in _train_sets(len(x), kwargs["folds"])
    )
    lr = 1.0 / curvature
    params = {"w": torch.zeros(x.shape[1], dtype=F64), "b": torch.zeros((), dtype=F64)}
    return fr.regularization_path(
        squared_error, fr.sgd(lr), params, (xt, yt), alphas,
        penalty=lambda h: fr.l1(h["coeff"], mask={"w": True, "b": False}),  # the intercept is not penalized
        form="proximal", learning_rate=lr, steps=steps, **kwargs,
    )  # fmt: skip


def _train_sets(n: int, folds) -> list[torch.Tensor]:  # noqa: ANN001
    pairs = fr.kfold(n, folds) if isinstance(folds, int) else folds
    return [torch.as_tensor(tr) for tr, _ in pairs] + [torch.arange(n)]


def test_lasso_path_selects_what_lasso_cv_selects_with_the_same_folds() -> None:
    sklearn = pytest.importorskip("sklearn")
    from sklearn.linear_model import Lasso, LassoCV
    from sklearn.model_selection import KFold

    x, y = lasso_problem()
    alphas = [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
    cv = LassoCV(alphas=alphas, cv=KFold(5), tol=1e-12, max_iter=100_000).fit(x, y)
    path = ista_path(x, y, alphas, steps=150, folds=5)
    assert sklearn is not None and path.best == pytest.approx(cv.alpha_, rel=1e-12)
    # LassoCV's mse_path_: mean squared error per fold, alphas descending; ours is half of it, ascending
    np.testing.assert_allclose(2 * path.val_loss.numpy()[::-1], cv.mse_path_, rtol=1e-9, atol=1e-12)
    chosen = path.params_at(path.best)  # refit on all examples, as LassoCV.coef_
    np.testing.assert_allclose(chosen["w"].numpy(), cv.coef_, atol=1e-6, rtol=0)
    assert abs(float(chosen["b"]) - cv.intercept_) < 1e-6
    # the whole refit path: every alpha against scikit-learn's Lasso on all examples, zeros included
    for alpha in alphas:
        ref = Lasso(alpha=alpha, tol=1e-12, max_iter=100_000).fit(x, y)
        ours = path.params_at(alpha)["w"].numpy()
        np.testing.assert_allclose(ours, ref.coef_, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(ours == 0, ref.coef_ == 0)
        i = path.index_of(alpha)
        assert path.sparsity[i].shape == (5,)


def test_warm_started_path_with_shuffled_folds_agrees_with_lasso_cv() -> None:
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LassoCV
    from sklearn.model_selection import KFold

    x, y = lasso_problem(n=45, p=6, seed=1)
    alphas = [0.01, 0.05, 0.2, 0.8]
    folds = list(KFold(3, shuffle=True, random_state=0).split(x))
    cv = LassoCV(alphas=alphas, cv=folds, tol=1e-12, max_iter=100_000).fit(x, y)
    path = ista_path(x, y, alphas, steps=120, folds=folds, warm_start=True)
    assert path.best == pytest.approx(cv.alpha_, rel=1e-12)
    np.testing.assert_allclose(2 * path.val_loss.numpy()[::-1], cv.mse_path_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(path.params_at(path.best)["w"].numpy(), cv.coef_, atol=1e-6, rtol=0)


def test_fista_path_keeps_the_proximal_iterates_and_agrees_with_lasso_cv() -> None:
    """fr.fista moves the params to extrapolated points; solution= keeps its sparse iterates instead."""
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LassoCV
    from sklearn.model_selection import KFold

    x, y = lasso_problem(seed=2)
    alphas = [0.003, 0.03, 0.3]
    cv = LassoCV(alphas=alphas, cv=KFold(4), tol=1e-12, max_iter=100_000).fit(x, y)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    a = torch.cat([xt, torch.ones(len(x), 1, dtype=F64)], dim=1)
    lr = 1.0 / max(
        float(torch.linalg.eigvalsh(a[tr].T @ a[tr] / len(tr)).max()) for tr in _train_sets(len(x), 4)
    )
    lasso = lambda h: fr.l1(h["coeff"], mask={"w": True, "b": False})  # noqa: E731
    path = fr.regularization_path(
        squared_error, lambda h: fr.fista(lr, lasso(h)),
        {"w": torch.zeros(8, dtype=F64), "b": torch.zeros((), dtype=F64)}, (xt, yt), alphas,
        steps=80, folds=4, solution=lambda s: fr.fista_iterate(s.opt_state),
    )  # fmt: skip
    assert path.best == pytest.approx(cv.alpha_, rel=1e-12)
    np.testing.assert_allclose(2 * path.val_loss.numpy()[::-1], cv.mse_path_, rtol=1e-9, atol=1e-12)
    chosen = path.params_at(path.best)["w"].numpy()
    np.testing.assert_allclose(chosen, cv.coef_, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(chosen == 0, cv.coef_ == 0)  # the iterates' exact zeros


# ----------------------------------------------------------------------------------------------------
# Members are the runs they stand for


def small_regression(n: int = 30, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(n, 3)))
    return x, torch.from_numpy(rng.normal(size=n)) + x[:, 0]


def mlp_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ p["w1"].T + p["b1"])
    return (h @ p["w2"] - y) ** 2


def mlp_init(seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(100 + seed)
    return {
        k: torch.from_numpy(rng.normal(size=s) * 0.5) for k, s in (("w1", (4, 3)), ("b1", (4,)), ("w2", (4,)))
    }


def test_every_member_equals_the_run_it_stands_for() -> None:
    x, y = small_regression()
    inits = [mlp_init(0), mlp_init(1)]
    coeffs = [0.3, 0.0, 0.05]
    tx = lambda h: fr.adamw(0.05, weight_decay=h["coeff"])  # noqa: E731
    path = fr.regularization_path(mlp_loss, tx, inits, (x, y), coeffs, steps=15, folds=3)
    assert path.coefficients.tolist() == [0.0, 0.05, 0.3]
    assert path.replicates == [f"seed {s}, fold {f}" for s in range(2) for f in range(3)]
    members = fr.unstack(path.params)
    mean_loss = lambda p, x, y: mlp_loss(p, x, y).mean()  # noqa: E731
    step = fr.make_step(mean_loss, tx)
    for i, c in enumerate(path.coefficients.tolist()):
        for s, init in enumerate(inits):
            for f, (train, val) in enumerate(fr.kfold(30, 3)):
                state = step.init(init, hparams={"coeff": c})
                for _ in range(15):
                    state, _ = step(state, x[train], y[train])  # only this fold's training examples
                r = s * 3 + f
                member = members[i * 6 + r]
                for k in init:
                    torch.testing.assert_close(member[k], state.params[k], atol=1e-12, rtol=0)
                assert path.val_loss[i, r].item() == pytest.approx(
                    mlp_loss(state.params, x[val], y[val]).mean().item(), rel=1e-12
                )
                assert path.train_loss[i, r].item() == pytest.approx(
                    mean_loss(state.params, x[train], y[train]).item(), rel=1e-12
                )
            alone = step.init(init, hparams={"coeff": c})
            for _ in range(15):
                alone, _ = step(alone, x, y)
            refit = path.params_at(c, seed=s)
            for k in init:
                torch.testing.assert_close(refit[k], alone.params[k], atol=1e-12, rtol=0)


def test_warm_start_trains_from_the_largest_coefficient_down() -> None:
    x, y = small_regression()
    x_val, y_val = small_regression(seed=4)
    coeffs = [0.0, 0.1, 1.0]
    penalty = lambda h: fr.l2(h["coeff"])  # noqa: E731
    path = fr.regularization_path(
        mlp_loss, fr.sgd(0.05, momentum=0.9), mlp_init(0), (x, y), coeffs, penalty=penalty, steps=10,
        validation=(x_val, y_val), warm_start=True,
    )  # fmt: skip
    step = fr.make_step(lambda p, x, y: mlp_loss(p, x, y).mean(), fr.sgd(0.05, momentum=0.9), penalty=penalty)
    params = mlp_init(0)
    for c in sorted(coeffs, reverse=True):
        state = step.init(
            params, hparams={"coeff": c}
        )  # each coefficient: the previous solution, fresh momentum
        for _ in range(10):
            state, _ = step(state, x, y)
        params = state.params
        for k in params:
            torch.testing.assert_close(path.params_at(c)[k], params[k], atol=1e-12, rtol=0)
        i = path.index_of(c)
        assert path.val_loss[i, 0].item() == pytest.approx(
            mlp_loss(params, x_val, y_val).mean().item(), rel=1e-12
        )


def test_minibatches_come_from_each_members_own_training_examples() -> None:
    x, y = small_regression()
    y = y.clone()
    folds = fr.kfold(30, 3)
    # fold 0's validation examples: finite, but any member that trains on one overflows (NaN data
    # itself is refused, naming the array)
    y[folds[0][1]] = 1e300
    path = fr.regularization_path(
        mlp_loss, fr.sgd(0.05), mlp_init(0), (x, y), [0.0, 0.1], penalty=lambda h: fr.l2(h["coeff"]),
        steps=12, folds=folds, batch_size=7, refit=False,
    )  # fmt: skip
    members = fr.unstack(path.params)
    for i in range(2):
        for f in range(3):
            finite = all(bool(torch.isfinite(v).all()) for v in members[i * 3 + f].values())
            assert finite == (f == 0), (i, f)
    assert not bool(torch.isfinite(path.val_loss[:, 1:]).any())  # the others evaluate on those targets too
    assert path.best_index in (0, 1)  # a non-finite mean never wins
    with pytest.raises(ValueError, match="refit=False"):
        path.params_at(0.0)


# ----------------------------------------------------------------------------------------------------
# The choice: glmnet's rules, written out


def glmnet_choice(coeffs: np.ndarray, cv: np.ndarray) -> tuple[float, float]:
    """cv.glmnet: cvm = mean over folds, cvsd = sd / sqrt(K); lambda.min = the largest lambda at the
    minimum of cvm; lambda.1se = the largest lambda with cvm <= cvm[min] + cvsd[min]."""
    cvm = cv.mean(axis=1)
    k = cv.shape[1]
    cvsd = cv.std(axis=1, ddof=1) / np.sqrt(k) if k > 1 else np.zeros(len(cvm))
    lambda_min = max(c for c, m in zip(coeffs, cvm) if m == cvm.min())
    i = list(coeffs).index(lambda_min)
    lambda_1se = max(c for c, m in zip(coeffs, cvm) if m <= cvm[i] + cvsd[i])
    return lambda_min, lambda_1se


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(1, 6), st.integers(0, 2**32 - 1), st.booleans())
def test_best_and_one_standard_error_choices_follow_glmnet(n_coeffs, n_reps, seed, ties) -> None:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    coeffs = np.sort(rng.choice(np.logspace(-4, 1, 50), size=n_coeffs, replace=False))
    cv = rng.gamma(2.0, 1.0, size=(n_coeffs, n_reps))
    if ties:
        cv = np.round(cv, 0)  # repeated means: the larger coefficient must win
    path = fr.RegularizationPath(
        "coeff", torch.from_numpy(coeffs), torch.zeros(n_coeffs, n_reps, dtype=F64), torch.from_numpy(cv),
        torch.zeros(n_coeffs, n_reps, dtype=F64), [f"r{i}" for i in range(n_reps)], 1, {}, None,
    )  # fmt: skip
    lambda_min, lambda_1se = glmnet_choice(coeffs, cv)
    assert path.best == lambda_min
    assert path.one_se == lambda_1se
    assert path.best <= path.one_se


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 60), st.data())
def test_kfold_is_scikit_learns_kfold(n, data) -> None:  # noqa: ANN001
    pytest.importorskip("sklearn")
    from sklearn.model_selection import KFold

    k = data.draw(st.integers(2, n))
    ours = fr.kfold(n, k)
    theirs = list(KFold(k).split(np.zeros(n)))
    assert len(ours) == len(theirs)
    for (tr, va), (tr_ref, va_ref) in zip(ours, theirs):
        assert tr.tolist() == tr_ref.tolist() and va.tolist() == va_ref.tolist()


# ----------------------------------------------------------------------------------------------------
# Output and errors


def test_table_dataframe_and_plot() -> None:
    x, y = small_regression()
    path = fr.regularization_path(
        mlp_loss, fr.sgd(0.05), [mlp_init(0), mlp_init(1)], (x, y), [0.0, 0.01, 1.0],
        penalty=lambda h: fr.l1(h["coeff"]), form="proximal", learning_rate=0.05, steps=5, folds=2,
    )  # fmt: skip
    pd = pytest.importorskip("pandas")
    df = path.to_dataframe()
    assert isinstance(df, pd.DataFrame)
    assert df.columns.tolist() == [
        "coeff",
        "train_loss",
        "val_loss",
        "val_std",
        "val_se",
        "sparsity",
        "choice",
    ]
    np.testing.assert_allclose(df["val_loss"], path.val_loss.mean(dim=1).numpy())
    np.testing.assert_allclose(df["val_se"], path.val_loss.std(dim=1).numpy() / 2.0)  # 4 replicates
    assert "best" in df["choice"][path.best_index]
    text = str(path)
    assert "4 replicates per coefficient" in text and "val loss (mean +- std)" in text
    assert repr(path).startswith("RegularizationPath(coeff: 3 coefficients x 4 replicates")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = path.plot()
    assert ax.get_xscale() == "log"
    plt.close("all")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"folds": 3, "validation": None, "coefficients": [0.1, 0.1]},
            ValueError,
            r"coefficients value: \[0.1, 0.1\] \(values repeat\)",
        ),
        ({"folds": 3, "validation": None, "coefficients": [-1.0]}, ValueError, r"must be finite and >= 0"),
        ({"folds": None, "validation": None}, ValueError, "exactly one of folds"),
        (
            {"folds": 40, "validation": None},
            ValueError,
            r"Invalid k value: 40 \(more folds than the 30 examples\)",
        ),
        (
            {"folds": [([0, 1], [2, 99]), ([2], [0])], "validation": None},
            ValueError,
            r"folds\[0\] has validation indices outside range\(30\)",
        ),
        (
            {"folds": 3, "validation": None, "batch_size": 25},
            ValueError,
            r"batch_size value: 25 \(a member has only 20",
        ),
        (
            {"folds": 3, "validation": None, "hparams": {"coeff": 1.0}},
            ValueError,
            r"hparams\['coeff'\] is the coefficient",
        ),
        ({"folds": 3, "validation": None, "steps": 0}, ValueError, r"Invalid steps value: 0"),
        (
            {"folds": 3, "validation": None, "solution": lambda s: {k: v[:1] for k, v in s.params.items()}},
            ValueError,
            r"solution\(state\) must return a tree like state.params",
        ),
    ],
)
def test_invalid_arguments_are_named(kwargs, error, match) -> None:  # noqa: ANN001
    x, y = small_regression()
    args = {"coefficients": [0.0, 0.1], "steps": 2, **kwargs}
    coefficients = args.pop("coefficients")
    with pytest.raises(error, match=match):
        fr.regularization_path(
            mlp_loss,
            fr.sgd(0.1),
            mlp_init(0),
            (x, y),
            coefficients,
            penalty=lambda h: fr.l2(h["coeff"]),
            **args,
        )


def test_a_loss_that_is_not_per_example_is_refused_with_the_fix() -> None:
    x, y = small_regression()
    with pytest.raises(ValueError, match=r"one loss per example, shape \(30,\), got \(\).*reduction='none'"):
        fr.regularization_path(
            lambda p, x, y: mlp_loss(p, x, y).mean(),
            fr.sgd(0.1),
            mlp_init(0),
            (x, y),
            [0.0],
            steps=1,
            folds=2,
        )
