"""Tune a regularization coefficient by its hypergradient, beside a grid search.

The validation loss after training is a function of the coefficient, ``V(c)``; funcreg's training steps
are differentiable end to end, so ``dV/dc`` is one ``torch.func.grad`` away.

Part 1, unrolled, on an MLP. A 64-32-10 tanh MLP on 300 training digits (where regularization
matters), squared L2 on its weights in the loss form (``fr.l2(h["coeff"], mask=weights)``), ``K``
full-batch steps of SGD with momentum from a fixed initialisation, in float64. So ``V(c)`` is the
validation cross-entropy (500 other training images) after exactly those ``K`` steps.

1. Grid search: ``fr.regularization_path`` trains the grid of coefficients as one vmapped run on the
   same ``K`` steps and evaluates each on the validation split: the curve ``V(c)`` at the grid points.
2. ``fr.hypergradient(step, params, c, (x, y), val_loss, steps=K)``: ``dV/dc`` through the ``K`` unrolled
   steps, printed beside central finite differences at a few coefficients (they agree to ~1e-8).
3. ``fr.tune_coefficient``: gradient descent on ``log(c)`` with that hypergradient, from a coefficient
   far from the optimum. It lands in the neighbourhood of the grid's best coefficient (between its
   grid neighbours), having evaluated ``V`` and ``dV/dc`` a dozen times instead of at every grid point;
   between the grid points it can do better than the grid.

Part 2, implicit, at convergence. Multinomial logistic regression on the same images, trained to
convergence (L-BFGS) for each coefficient: ``V(c) = val_loss(w*(c))``.
``fr.implicit_hypergradient(objective, w_star, c, val_loss)`` differentiates the solution by the
implicit function theorem (conjugate gradients on Hessian-vector products), independent of how
``w*`` was found; it is printed beside finite differences of re-solved problems, and beside the
unrolled hypergradient of a few hundred gradient steps, which approaches it as training converges.

The figure (``hypergradient.png``): both ``V(c)`` curves from the grids, with the tuning trajectories
on them.

    python examples/hypergradient.py [--quick] [--out DIR] [--steps K]
"""

from __future__ import annotations

import time

import _common
import numpy as np
import torch
from torch.func import functional_call

import funcreg as fr

torch.set_num_threads(1)

LR, MOMENTUM = 0.1, 0.9
EPS = 1e-6  # central finite differences of the unrolled training (exact arithmetic up to rounding)
REL_EPS = 1e-3  # of the re-solved problems: relative to c (a solution is accurate to ~1e-9, not to eps^2)


def mlp_part(quick: bool, steps: int) -> dict[str, object]:
    x_train, _, y_train, _ = _common.load_digits_split(seed=0, dtype=torch.float64)
    x_tr, y_tr, x_val, y_val = x_train[:300], y_train[:300], x_train[300:800], y_train[300:800]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).double()
    params = fr.params_of(model)
    weights = {k: k.endswith("weight") for k in params}

    def per_example(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y, reduction="none")

    def mean_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_example(p, x, y).mean()

    penalty = lambda h: fr.l2(h["coeff"], mask=weights)  # noqa: E731
    tx = fr.sgd(LR, momentum=MOMENTUM)
    print(
        f"Part 1: MLP 64-32-10, {len(x_tr)} training / {len(x_val)} validation digits, "
        f"{steps} full-batch steps (float64)"
    )

    grid = np.logspace(-4, 0, 4 if quick else 9).tolist()
    start = time.perf_counter()
    path = fr.regularization_path(
        per_example, tx, params, (x_tr, y_tr), grid, penalty=penalty, steps=steps, validation=(x_val, y_val)
    )
    print(f"[grid search, {len(grid)} coefficients in one vmapped run: {time.perf_counter() - start:.1f} s]")
    print(path.table())

    step = fr.make_step(mean_loss, tx, penalty=penalty)
    val = lambda p: mean_loss(p, x_val, y_val)  # noqa: E731

    def v(c: float) -> float:
        return float(fr.hypergradient(step, params, c, (x_tr, y_tr), val, steps=steps).value)

    rows = []
    for c in [1e-2] if quick else [1e-3, 1e-2, 1e-1]:
        hg = fr.hypergradient(step, params, c, (x_tr, y_tr), val, steps=steps)
        numeric = (v(c + EPS) - v(c - EPS)) / (2 * EPS)
        grad = float(hg.grad)
        rows.append(
            {"coeff": c, "V(c)": float(hg.value), "dV/dc (unrolled)": grad, "finite differences": numeric,
             "difference": abs(grad - numeric)}
        )  # fmt: skip
    _common.print_table(
        rows,
        title=f"hypergradient through {steps} unrolled steps vs central differences (eps {EPS:g})",
        float_format=".6g",
    )

    start = time.perf_counter()
    fn = lambda c: fr.hypergradient(step, params, c, (x_tr, y_tr), val, steps=steps)  # noqa: E731
    start_at = 0.03 if quick else 0.3
    result = fr.tune_coefficient(fn, start_at, iterations=3 if quick else 12, lr=20.0, max_step=1.0)
    print(f"\n[tuning: {len(result.history)} hypergradients, {time.perf_counter() - start:.1f} s]")
    _common.print_table(
        result.history, title=f"gradient descent on log(coeff), from {start_at:g}", float_format=".5g"
    )
    i = path.best_index
    low, high = path.coefficients[max(i - 1, 0)].item(), path.coefficients[min(i + 1, len(grid) - 1)].item()
    inside = low <= result.coefficient <= high
    print(
        f"grid best {path.best:.3g} (V = {path.val_mean[i].item():.5f}); tuned {result.coefficient:.3g} "
        f"(V = {result.value:.5f}); {'inside' if inside else 'outside'} the grid neighbourhood "
        f"[{low:.3g}, {high:.3g}]"
    )
    return {"path": path, "result": result}


def lbfgs(objective, w0: torch.Tensor, iterations: int) -> torch.Tensor:  # noqa: ANN001
    """Minimizes ``objective(w)`` to convergence with torch.optim.LBFGS (strong Wolfe line search)."""
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=iterations, tolerance_grad=1e-13, tolerance_change=0.0,
                            history_size=50, line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def logistic_part(quick: bool) -> dict[str, object]:
    x_train, _, y_train, _ = _common.load_digits_split(seed=0, dtype=torch.float64)
    x_tr, y_tr, x_val, y_val = x_train[:300], y_train[:300], x_train[300:800], y_train[300:800]
    n_iter = 100 if quick else 500

    def data_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(x @ p["w"] + p["b"], y)

    def objective(p: dict[str, torch.Tensor], c: torch.Tensor) -> torch.Tensor:
        return data_loss(p, x_tr, y_tr) + fr.l2(c, mask={"w": True, "b": False})(p)

    def solve(c: float) -> dict[str, torch.Tensor]:
        def flat(theta: torch.Tensor) -> torch.Tensor:
            return objective(
                {"w": theta[:640].view(64, 10), "b": theta[640:]}, torch.tensor(c, dtype=torch.float64)
            )

        theta = lbfgs(flat, torch.zeros(650, dtype=torch.float64), n_iter)
        return {"w": theta[:640].view(64, 10), "b": theta[640:]}

    val = lambda p: data_loss(p, x_val, y_val)  # noqa: E731
    print(
        "\nPart 2: multinomial logistic regression (650 parameters), L2 on the weights, "
        "trained to convergence (L-BFGS)"
    )
    grid = np.logspace(-4, 0, 4 if quick else 9).tolist()
    curve = [float(val(solve(c))) for c in grid]
    rows = []
    step = fr.make_step(
        data_loss, fr.sgd(1.0), penalty=lambda h: fr.l2(h["coeff"], mask={"w": True, "b": False})
    )
    zeros = {"w": torch.zeros(64, 10, dtype=torch.float64), "b": torch.zeros(10, dtype=torch.float64)}
    for c in [1e-2] if quick else [1e-3, 1e-2, 1e-1]:
        w_star = solve(c)
        hg = fr.implicit_hypergradient(objective, w_star, c, val, cg_steps=650)  # at most one per parameter
        eps = REL_EPS * c
        numeric = (float(val(solve(c + eps))) - float(val(solve(c - eps)))) / (2 * eps)
        unrolled = [
            float(fr.hypergradient(step, zeros, c, (x_tr, y_tr), val, steps=k).grad)
            for k in ((20,) if quick else (20, 100, 400))
        ]
        row = {"coeff": c, "implicit": float(hg.grad), "finite differences": numeric}
        row.update({"CG residual": hg.residual, "||grad F|| at w*": hg.stationarity})
        row.update({f"unrolled, {k} steps": u for k, u in zip((20, 100, 400), unrolled)})
        rows.append(row)
    title = (
        "dV/dc at the converged solution: implicit vs central differences of re-solved problems "
        f"(eps {REL_EPS:g} c)"
    )
    _common.print_table(rows, title=title, float_format=".6g")
    fn = lambda c: fr.implicit_hypergradient(objective, solve(float(c)), c, val, cg_steps=650)  # noqa: E731
    result = fr.tune_coefficient(
        fn, 0.1 if quick else 1.0, iterations=3 if quick else 12, lr=20.0, max_step=1.0
    )
    best = int(np.argmin(curve))
    print(
        f"grid best {grid[best]:.3g} (V = {curve[best]:.5f}); "
        f"tuned by implicit hypergradients {result.coefficient:.3g} "
        f"(V = {result.value:.5f}) in {len(result.history)} solves"
    )
    return {"grid": grid, "curve": curve, "result": result}


def main() -> None:
    def options(parser):  # noqa: ANN001, ANN202
        parser.add_argument("--steps", type=int, default=100, help="unrolled training steps of part 1")

    args = _common.parse_args(__doc__, options)
    mlp = mlp_part(args.quick, 30 if args.quick else args.steps)
    logistic = logistic_part(args.quick)

    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    path = mlp["path"]
    panels = [
        (
            axes[0],
            path.coefficients.tolist(),
            path.val_mean.tolist(),
            mlp["result"],
            "MLP: V(c) after K unrolled steps",
        ),
        (
            axes[1],
            logistic["grid"],
            logistic["curve"],
            logistic["result"],
            "logistic regression: V(c) at convergence",
        ),
    ]
    for ax, xs, ys, result, title in panels:
        ax.plot(xs, ys, "o-", label="grid (regularization path)" if ax is axes[0] else "grid (re-solved)")
        hist = result.history
        ax.plot(
            [h["coefficient"] for h in hist],
            [h["value"] for h in hist],
            "x--",
            color="tab:red",
            label="tune_coefficient",
        )
        ax.plot([result.coefficient], [result.value], "*", color="tab:red", markersize=14)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("L2 coefficient c")
        ax.set_ylabel("validation cross-entropy V(c)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _common.save_figure(fig, args.out, "hypergradient.png")


if __name__ == "__main__":
    main()
