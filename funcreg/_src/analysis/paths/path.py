"""Regularization paths: a grid of coefficients x seeds x folds trained as one vmapped run, and the choice.

:func:`regularization_path` builds a training step (:func:`funcreg.make_step`) whose transform and/or
penalty read the coefficient from ``hparams[name]``, vmaps it over every member
(:func:`funcreg.ensemble_step`, one member per coefficient, seed and fold), evaluates each member on
its validation examples and returns a :class:`RegularizationPath`: the table of coefficient x (train
loss, validation loss mean +- std over seeds and folds, sparsity), the coefficient with the lowest mean
validation loss and glmnet's one-standard-error choice.

Folds are members. With ``folds=K`` every member sees all ``n`` examples and weights its per-example
losses by its fold's training mask (so folds of unequal sizes still stack), and the validation loss of
a member is the mean over its held-out fold, averaged over folds as scikit-learn's ``LassoCV`` and
glmnet's ``cv.glmnet`` do. Warm starts (``warm_start=True``) train the coefficients one after
another from the largest down, each starting from the previous solution, as glmnet does; the seeds and
folds of one coefficient are still one vmapped run.

This module runs the path; the folds and the checks on its inputs are in :mod:`funcreg._src.analysis.paths.cv`,
the vmapped training of the members in :mod:`funcreg._src.analysis.paths.train` and the result in
:mod:`funcreg._src.analysis.paths.result`, whose names stay importable from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from funcreg._src.analysis.paths.cv import (
    Folds,
    _check_batch_size,
    _check_coefficients,
    _check_data,
    _check_options,
    _make_splits,
    _per_example,
    _shared_hparams,
    _Splits,
)
from funcreg._src.analysis.paths.result import RegularizationPath
from funcreg._src.analysis.paths.train import _train
from funcreg._src.core.tree import flatten
from funcreg._src.core.typing import PyTree, ScalarOrSchedule
from funcreg._src.training.ensemble import ensemble_step
from funcreg._src.training.hparams import float_dtype
from funcreg._src.training.members import stack, unstack, vmap
from funcreg._src.training.step import Form, PenaltyLike, TrainState, TransformLike, make_step

__all__ = ["regularization_path"]


def regularization_path(
    loss: Callable[..., torch.Tensor],
    tx: TransformLike,
    params: PyTree | list[PyTree],
    data: Sequence[torch.Tensor],
    coefficients: Sequence[float] | torch.Tensor,
    *,
    steps: int,
    penalty: PenaltyLike = None,
    form: Form = "loss",
    learning_rate: None | str | ScalarOrSchedule = None,
    name: str = "coeff",
    folds: Folds | None = None,
    validation: Sequence[torch.Tensor] | None = None,
    eval_loss: Callable[..., torch.Tensor] | None = None,
    batch_size: int | None = None,
    warm_start: bool = False,
    refit: bool = True,
    hparams: Mapping[str, float] | None = None,
    seed: int = 0,
    progress: bool = False,
    solution: Callable[[TrainState], PyTree] | None = None,
) -> RegularizationPath:
    """Trains every coefficient x seed x fold as one vmapped run and evaluates each on held-out data.

    ``tx`` and/or ``penalty`` are factories of the hyperparameters ``h`` that read the coefficient as
    ``h[name]`` (as in a sweep with :func:`funcreg.make_step`): ``penalty=lambda h: fr.l1(h["coeff"])``,
    or ``tx=lambda h: fr.adamw(1e-3, weight_decay=h["coeff"])``. Each member trains ``steps`` steps of
    ``make_step(weighted_loss, tx, penalty, form, learning_rate)`` where ``weighted_loss`` is the mean of
    ``loss`` over the member's training examples: all of them per step (full batch, the default), or
    ``batch_size`` drawn from them epoch by epoch (each seed and fold its own shuffled order, from ``seed``,
    the same for every coefficient).

    For a linear least-squares lasso / elastic net, :func:`funcreg.lasso_path` (the exact path, with
    strong-rule screening and warm starts) and :func:`funcreg.lasso_cv` (its cross-validation, returning
    this same :class:`RegularizationPath`) solve the problem directly, as fast as scikit-learn's
    coordinate descent, instead of training it.

    Args:
        loss: ``loss(params, *batch) -> (n,)``: one (data) loss per example, e.g.
            ``cross_entropy(functional_call(model, p, (x,)), y, reduction="none")``.
        tx: a transform or a factory ``h -> transform``.
        params: the initial parameters, or a list of them (one per seed), each trained with every
            coefficient and fold (paired seeds: the coefficients are compared from the same start).
        data: ``(x, y, ...)``, one row per example: the training data (all of it, with ``folds``).
        coefficients: the grid (distinct numbers ``>= 0``); the result lists them ascending.
        steps: training steps per member (per coefficient with ``warm_start``).
        penalty, form, learning_rate: as in :func:`funcreg.make_step`.
        name: the hyperparameter the factories read.
        folds: ``K`` (contiguous folds, scikit-learn's ``KFold(K)``: see :func:`kfold`) or a list of
            ``(train_indices, validation_indices)`` (e.g. ``list(KFold(5, shuffle=True).split(x))``).
        validation: ``(x_val, y_val, ...)``: a held-out split instead of folds.
        eval_loss: per-example loss for validation (default ``loss``), e.g. a 0/1 error.
        batch_size: examples per step and member (default: all of the member's training examples).
        warm_start: train the coefficients from the largest to the smallest, each starting from the
            previous coefficient's solution (the optimizer state starts afresh), as glmnet does.
        refit: with folds, also train every coefficient and seed on all examples (one more member each),
            the models to keep (:meth:`RegularizationPath.params_at`), as ``LassoCV.coef_``.
        hparams: other hyperparameters the factories read, shared by every member.
        seed: the seed of the minibatch orders.
        progress: show a progress bar (tqdm, when installed).
        solution: which parameters to keep from the members' final :class:`funcreg.TrainState`
            (stacked over members): ``state.params`` by default. For ``tx=fr.fista(...)``, whose
            params are its extrapolated points, ``lambda s: fr.fista_iterate(s.opt_state)`` keeps
            the proximal iterates (with their exact zeros); warm starts continue from them too.

    Returns:
        A :class:`RegularizationPath`.

    Examples:
        >>> import torch, funcreg as fr
        >>> gen = torch.Generator().manual_seed(0)
        >>> x = torch.randn(40, 5, generator=gen, dtype=torch.float64)
        >>> y = x[:, 0] - 2 * x[:, 1] + 0.5 * torch.randn(40, generator=gen, dtype=torch.float64)
        >>> loss = lambda p, x, y: 0.5 * (x @ p["w"] - y) ** 2  # per example
        >>> path = fr.regularization_path(
        ...     loss, fr.sgd(0.3), {"w": torch.zeros(5, dtype=torch.float64)}, (x, y), [0.0, 0.01, 0.1, 3.0],
        ...     penalty=lambda h: fr.l1(h["coeff"]), form="proximal", learning_rate=0.3, steps=100, folds=4,
        ... )
        >>> path.coefficients.tolist(), path.val_loss.shape  # 4 coefficients x 4 folds
        ([0.0, 0.01, 0.1, 3.0], torch.Size([4, 4]))
        >>> path.sparsity.mean(dim=1).tolist()[-1]  # 3.0 > max |x^T y| / n: every weight is 0
        1.0
        >>> path.best <= path.one_se
        True
    """
    flags = {"warm_start": warm_start, "refit": refit, "progress": progress}
    _check_options(loss, eval_loss, name, steps, seed, solution, flags)
    data = _check_data(data, "data")
    inits = _initial_params(params)
    dtype = float_dtype(inits[0])
    coeffs = _check_coefficients(coefficients)
    extra = _shared_hparams(hparams, name)
    splits = _make_splits(data, folds, validation, refit, dtype)
    _check_batch_size(batch_size, splits.train_sets)

    def weighted(p: PyTree, w: torch.Tensor, *batch: torch.Tensor) -> torch.Tensor:
        return (w * loss(p, *batch)).sum() / w.sum()

    _per_example(loss, inits[0], data, "loss")  # fail early, outside vmap
    step = make_step(weighted, tx, penalty=penalty, form=form, learning_rate=learning_rate)
    ens = ensemble_step(step, batch="per_member")
    trained = _train(
        ens,
        coeffs,
        inits,
        splits,
        data,
        dtype,
        steps=steps,
        batch_size=batch_size,
        warm_start=warm_start,
        name=name,
        hparams=extra,
        seed=seed,
        progress=progress,
        solution=solution,
    )
    evaluate = eval_loss if eval_loss is not None else loss
    return _evaluate(name, coeffs, trained, len(inits), splits, data, loss, evaluate)


def _initial_params(params: PyTree | list[PyTree]) -> list[PyTree]:
    """One initial tree per seed: a non-empty list of trees is several seeds, anything else is one."""
    if isinstance(params, list) and params and not isinstance(params[0], torch.Tensor):
        return list(params)
    return [params]


# ----------------------------------------------------------------------------------------------------
# Evaluation: every member on its own training and validation examples.


def _zeros_fraction(stacked: PyTree) -> torch.Tensor:
    """``(members,)``: the fraction of exact zeros among all tensor entries of each stacked member
    (the sparsity a proximal step leaves; near-zeros do not count)."""
    leaves, _ = flatten(stacked)
    zeros, total = None, 0
    for x in leaves:
        if not isinstance(x, torch.Tensor):
            continue
        z = (x.reshape(x.shape[0], -1) == 0).sum(dim=1).double()
        zeros = z if zeros is None else zeros + z
        total += x[0].numel()
    assert zeros is not None
    return zeros / total


def _masked_mean(weights: torch.Tensor, losses: torch.Tensor) -> float:
    """The mean of ``losses`` over the examples a mask selects."""
    return float((weights * losses).sum() / weights.sum())


def _rows(
    stacked: PyTree,
    seeds: int,
    splits: _Splits,
    data: tuple[torch.Tensor, ...],
    loss: Callable[..., torch.Tensor],
    evaluate: Callable[..., torch.Tensor],
) -> tuple[list[float], list[float], list[float], list[PyTree], list[PyTree]]:
    """One coefficient's members: per validated replicate (seed-major) the mean training loss, the
    mean held-out loss, the fraction of zeros and the trained tree; then the refit members' trees
    (no row: they have no held-out examples)."""
    per_seed = len(splits.train_sets)
    trees = unstack(stacked)
    train_losses = vmap(lambda p: _per_example(loss, p, data, "loss"))(stacked)  # (members, n)
    val_losses = vmap(lambda p: _per_example(evaluate, p, splits.held_out, "eval_loss"))(stacked)
    zeros = _zeros_fraction(stacked)
    train_row: list[float] = []
    val_row: list[float] = []
    sparse_row: list[float] = []
    kept: list[PyTree] = []
    refits: list[PyTree] = []
    for s in range(seeds):
        for f in range(splits.validated):
            j = s * per_seed + f
            train_row.append(_masked_mean(splits.train_masks[f], train_losses[j]))
            if splits.val_masks:
                val_row.append(_masked_mean(splits.val_masks[f], val_losses[j]))
            else:
                val_row.append(float(val_losses[j].mean()))
            sparse_row.append(float(zeros[j]))
            kept.append(trees[j])
        if splits.refit:
            refits.append(trees[s * per_seed + per_seed - 1])
    return train_row, val_row, sparse_row, kept, refits


def _evaluate(
    name: str,
    coeffs: torch.Tensor,
    trained: dict[int, PyTree],
    seeds: int,
    splits: _Splits,
    data: tuple[torch.Tensor, ...],
    loss: Callable[..., torch.Tensor],
    evaluate: Callable[..., torch.Tensor],
) -> RegularizationPath:
    """The :class:`RegularizationPath` of the trained members: a row of losses and sparsities per
    coefficient, the validated members' parameters and, with ``refit``, the refit ones'."""
    train_rows: list[list[float]] = []
    val_rows: list[list[float]] = []
    sparse_rows: list[list[float]] = []
    kept: list[PyTree] = []
    refits: list[PyTree] = []
    with torch.no_grad():
        for i in range(len(coeffs)):
            train_row, val_row, sparse_row, trees, refit_trees = _rows(
                trained[i], seeds, splits, data, loss, evaluate
            )
            train_rows.append(train_row)
            val_rows.append(val_row)
            sparse_rows.append(sparse_row)
            kept.extend(trees)
            refits.extend(refit_trees)
    return RegularizationPath(
        name=name,
        coefficients=coeffs,
        train_loss=torch.tensor(train_rows, dtype=torch.float64),
        val_loss=torch.tensor(val_rows, dtype=torch.float64),
        sparsity=torch.tensor(sparse_rows, dtype=torch.float64),
        replicates=[f"seed {s}, {label}" for s in range(seeds) for label in splits.labels],
        seeds=seeds,
        params=stack(kept),
        refit_params=stack(refits) if splits.refit else None,
    )
