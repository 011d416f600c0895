"""Details of regularization paths and hypergradients: defaults, minibatches, sparsity, output.

Expected values are derived here: closed forms of plain gradient steps, counts of exact zeros in the
returned parameters, scikit-learn's KFold, and the layout the table and plot document.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import funcreg as fr

F64 = torch.float64


def linear_data(n: int, p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p))
    return torch.from_numpy(x), torch.from_numpy(x @ rng.normal(size=p) + 0.1 * rng.normal(size=n))


# ----------------------------------------------------------------------------------------------------
# regularization_path: coefficients, minibatches, seed, progress, sparsity


def test_negative_coefficients_are_refused_even_when_nothing_else_checks_them() -> None:
    x, y = linear_data(12, 2, 0)
    with pytest.raises(ValueError, match=r"Invalid coefficients value: \[-1.0, 0.5\] \(must be finite"):
        fr.regularization_path(
            lambda p, x, y: 0.5 * (x @ p["w"] - y) ** 2,
            lambda h: fr.sgd(0.1),  # nothing reads the coefficient: only the grid check can refuse it
            {"w": torch.zeros(2, dtype=F64)},
            (x, y),
            [-1.0, 0.5],
            steps=1,
            validation=(x, y),
        )


@settings(max_examples=10, deadline=None)
@given(
    y=hnp.arrays(np.float64, (12,), elements=st.floats(-3, 3, allow_subnormal=False)),
    batch_size=st.sampled_from([1, 2, 3, 4, 6]),
    epochs=st.integers(1, 2),
)
def test_each_step_averages_batch_size_examples_of_a_shuffled_epoch(y, batch_size, epochs) -> None:  # noqa: ANN001
    # loss -w * y_i: each SGD step adds lr * mean(y over its batch), whatever w is; over whole epochs
    # of batch_size examples the sum is lr * steps * mean(y), whatever the order
    yt = torch.from_numpy(y)
    x = torch.zeros(12, 1, dtype=F64)
    steps = epochs * 12 // batch_size
    coeffs = [0.0, 0.5, 2.0]
    path = fr.regularization_path(
        lambda p, x, y: -p["w"] * y, lambda h: fr.sgd(h["coeff"]), {"w": torch.zeros((), dtype=F64)},
        (x, yt), coeffs, steps=steps, batch_size=batch_size, validation=(x, yt),
    )  # fmt: skip
    expected = torch.tensor([c * steps * y.mean() for c in coeffs], dtype=F64)
    torch.testing.assert_close(path.params["w"], expected, atol=1e-12, rtol=1e-12)


def test_the_minibatch_orders_default_to_seed_zero() -> None:
    x, y = linear_data(12, 3, 1)

    def run(**kwargs) -> fr.RegularizationPath:  # noqa: ANN003
        return fr.regularization_path(
            lambda p, x, y: 0.5 * (x @ p["w"] - y) ** 2, fr.sgd(0.1), {"w": torch.zeros(3, dtype=F64)},
            (x, y), [0.0, 0.1], penalty=lambda h: fr.l2(h["coeff"]), steps=5, batch_size=3,
            validation=(x, y), **kwargs,
        )  # fmt: skip

    default, zero, one = run(), run(seed=0), run(seed=1)
    assert torch.equal(default.params["w"], zero.params["w"])
    assert not torch.equal(default.params["w"], one.params["w"])  # the seed does change the orders


class _Bar:
    """Stands in for tqdm: records the total and the updates."""

    made: list[_Bar] = []

    def __init__(self, total: int, desc: str, leave: bool) -> None:
        self.total, self.desc, self.updates, self.closed = total, desc, 0, False
        _Bar.made.append(self)

    def update(self, n: int = 1) -> None:
        self.updates += n

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("warm_start", [False, True])
def test_the_progress_bar_counts_every_training_step(warm_start: bool, monkeypatch) -> None:  # noqa: ANN001
    pytest.importorskip("tqdm")
    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", _Bar)
    _Bar.made.clear()
    x, y = linear_data(12, 2, 2)
    fr.regularization_path(
        lambda p, x, y: 0.5 * (x @ p["w"] - y) ** 2, fr.sgd(0.1), {"w": torch.zeros(2, dtype=F64)},
        (x, y), [0.0, 0.1, 1.0], penalty=lambda h: fr.l2(h["coeff"]), steps=4, validation=(x, y),
        warm_start=warm_start, progress=True,
    )  # fmt: skip
    (bar,) = _Bar.made
    runs = 3 if warm_start else 1  # with warm starts each coefficient trains 4 steps of its own
    assert bar.total == 4 * runs and bar.updates == 4 * runs and bar.closed
    assert bar.desc == "path over coeff"


def test_sparsity_counts_the_exact_zeros_of_every_parameter_tensor() -> None:
    x, y = linear_data(20, 5, 3)

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * (x[:, :2] @ p["u"] + x[:, 2:] @ p["v"] - y) ** 2

    lr = 0.1
    big = 10 * float((x.T @ y).abs().max()) / 20  # > max |x^T y| / n: from zero, no weight ever moves
    path = fr.regularization_path(
        loss, fr.sgd(lr), {"u": torch.zeros(2, dtype=F64), "v": torch.zeros(3, dtype=F64)}, (x, y),
        [0.0, 0.05, big], penalty=lambda h: fr.l1(h["coeff"]), form="proximal", learning_rate=lr,
        steps=30, folds=2,
    )  # fmt: skip
    assert (path.sparsity[-1] == 1.0).all()
    zeros = (path.params["u"] == 0).sum(dim=1) + (path.params["v"] == 0).sum(dim=1)
    torch.testing.assert_close(path.sparsity.reshape(-1), zeros.double() / 5, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------
# lasso_cv: default folds and sparsity


def test_lasso_cv_defaults_to_scikit_learns_five_contiguous_folds() -> None:
    pytest.importorskip("sklearn")
    from sklearn.model_selection import KFold

    x, y = linear_data(40, 4, 4)
    default = fr.lasso_cv(x, y, n_alphas=8)
    explicit = fr.lasso_cv(x, y, n_alphas=8, folds=list(KFold(5).split(x.numpy())))
    assert default.replicates == [f"seed 0, fold {f}" for f in range(5)]
    torch.testing.assert_close(default.val_loss, explicit.val_loss, atol=0, rtol=0)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), p=st.integers(1, 6))
def test_lasso_cv_sparsity_is_the_fraction_of_zeros_among_w_and_b(seed: int, p: int) -> None:
    x, y = linear_data(24, p, seed)
    path = fr.lasso_cv(x, y, folds=3, n_alphas=6, fit_intercept=seed % 2 == 0)
    zeros = (path.params["w"] == 0).sum(dim=1) + (path.params["b"] == 0)
    torch.testing.assert_close(path.sparsity.reshape(-1), zeros.double() / (p + 1), atol=0, rtol=0)
    assert float(path.sparsity.max()) > 0  # the largest alpha zeroes weights


# ----------------------------------------------------------------------------------------------------
# RegularizationPath: table and plot


def hand_path(replicates: int) -> fr.RegularizationPath:
    # means 1.1, 0.9, 0.95, 2.1 with a spread of +-0.1 (for R > 1): best 0.1, and 0.95 <= 0.9 + se
    base = torch.tensor([1.1, 0.9, 0.95, 2.1], dtype=F64)
    spread = torch.linspace(-0.1, 0.1, replicates, dtype=F64) if replicates > 1 else torch.zeros(1, dtype=F64)
    val = base[:, None] + spread[None, :]
    zeros = torch.zeros(4, replicates, dtype=F64)
    coeffs = torch.tensor([0.0, 0.1, 1.0, 10.0], dtype=F64)
    labels = [f"fold {r}" for r in range(replicates)]
    return fr.RegularizationPath("c", coeffs, zeros, val, zeros, labels, 1, {}, None)


@pytest.mark.parametrize("replicates", [1, 2, 3])
def test_table_footer_counts_replicates_in_words(replicates: int) -> None:
    footer = hand_path(replicates).table().splitlines()[-1]
    word = "replicate" if replicates == 1 else "replicates"
    assert footer.startswith(f"{replicates} {word} per coefficient; best ")


def test_table_choice_column_is_left_aligned_under_its_header() -> None:
    path = hand_path(2)  # se at the best = 0.2 / sqrt(2) / sqrt(2) = 0.1: one-SE is 1.0, not 10
    lines = path.table().splitlines()
    start = lines[0].index("choice")
    assert lines[0][start:] == "choice"
    expected = ["", "best", "1-se", ""]
    assert [line[start:] for line in lines[1:5]] == expected
    assert all(len(line) <= start for line, e in zip(lines[1:5], expected) if not e)


def test_plot_puts_zero_one_decade_left_of_the_smallest_coefficient() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        ax = hand_path(2).plot()
        np.testing.assert_allclose(tuple(ax.figure.get_size_inches()), (7.0, 4.5))
        (train,) = [line for line in ax.lines if line.get_label() == "train"]
        np.testing.assert_allclose(
            np.asarray(train.get_xdata(), dtype=float), [0.01, 0.1, 1.0, 10.0], rtol=1e-12
        )
        (val,) = [c for c in ax.containers if c.get_label() == "validation (± 1 SE)"]
        np.testing.assert_allclose(
            np.asarray(val.lines[0].get_xdata(), dtype=float), [0.01, 0.1, 1.0, 10.0], rtol=1e-12
        )
        assert ax.get_xscale() == "log"
    finally:
        plt.close("all")


# ----------------------------------------------------------------------------------------------------
# hypergradients


def test_unrolled_hypergradient_returns_the_trained_parameters() -> None:
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(10, 3)), rng.normal(size=10)
    lr, c, steps = 0.1, 0.3, 6
    step = fr.make_step(
        lambda p, x, y: 0.5 * ((x @ p["w"] - y) ** 2).mean(), fr.sgd(lr), penalty=lambda h: fr.l2(h["coeff"])
    )
    w0 = rng.normal(size=3)
    hg = fr.hypergradient(
        step, {"w": torch.from_numpy(w0)}, c, (torch.from_numpy(x), torch.from_numpy(y)),
        lambda p: p["w"].sum(), steps=steps,
    )  # fmt: skip
    w = w0.copy()
    for _ in range(steps):  # gradient descent on 1/2 mean (x w - y)^2 + c/2 ||w||^2
        w = w - lr * (x.T @ (x @ w - y) / len(y) + c * w)
    assert isinstance(hg.params["w"], torch.Tensor) and not hg.params["w"].requires_grad
    np.testing.assert_allclose(hg.params["w"].numpy(), w, rtol=1e-12, atol=1e-12)
    assert float(hg.value) == pytest.approx(w.sum(), rel=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), c=st.floats(0.01, 2.0))
def test_implicit_hypergradient_is_zero_where_the_validation_loss_is_minimal(seed: int, c: float) -> None:
    # V(w) = 1/2 ||w - w*(c)||^2 is minimal at w*(c): grad V = 0 there, so dV/dc = grad V . dw*/dc = 0
    rng = np.random.default_rng(seed)
    x, y = torch.from_numpy(rng.normal(size=(8, 3))), torch.from_numpy(rng.normal(size=8))
    a, b = x.T @ x / 8, x.T @ y / 8
    w_star = torch.linalg.solve(a + c * torch.eye(3, dtype=F64), b)

    def objective(p: dict[str, torch.Tensor], c_: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((x @ p["w"] - y) ** 2).mean() + fr.l2(c_)(p)

    hg = fr.implicit_hypergradient(
        objective, {"w": w_star.clone()}, c, lambda p: 0.5 * (p["w"] - w_star).pow(2).sum()
    )
    assert float(hg.grad) == 0.0 and float(hg.value) == 0.0
    assert hg.residual == 0.0
