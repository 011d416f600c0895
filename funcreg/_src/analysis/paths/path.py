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

This module runs the path; the folds and the checks on its inputs are in :mod:`funcreg._src.analysis.paths.cv`
and the result in :mod:`funcreg._src.analysis.paths.result`, whose names stay importable from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from funcreg._src.analysis.paths.cv import Folds, _check_data, _check_folds, _check_solution, _per_example
from funcreg._src.analysis.paths.result import RegularizationPath
from funcreg._src.core.tree import flatten
from funcreg._src.core.typing import PyTree, ScalarOrSchedule
from funcreg._src.core.validation import check_bool, check_int
from funcreg._src.training.ensemble import ensemble_step
from funcreg._src.training.hparams import float_dtype
from funcreg._src.training.members import stack, unstack, vmap
from funcreg._src.training.step import Form, PenaltyLike, TrainState, TransformLike, make_step

__all__ = ["regularization_path"]


def _zeros_fraction(stacked: PyTree) -> torch.Tensor:
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
    if not callable(loss):
        raise TypeError(f"regularization_path expects a callable loss, got {loss!r}")
    if eval_loss is not None and not callable(eval_loss):
        raise TypeError(f"eval_loss must be callable, got {eval_loss!r}")
    if not isinstance(name, str):
        raise TypeError(f"Invalid name value: {name!r} (expected a string: the hyperparameter's name)")
    check_int("steps", steps, low=1)
    check_int("seed", seed, low=0)
    if solution is not None and not callable(solution):
        raise TypeError(f"solution must be callable (TrainState -> params), got {solution!r}")
    for flag, value in (("warm_start", warm_start), ("refit", refit), ("progress", progress)):
        check_bool(flag, value)
    data = _check_data(data, "data")
    n = data[0].shape[0]
    inits = (
        list(params)
        if isinstance(params, list) and params and not isinstance(params[0], torch.Tensor)
        else [params]
    )
    dtype = float_dtype(inits[0])
    coeffs = torch.as_tensor(coefficients, dtype=torch.float64).reshape(-1)
    if coeffs.numel() == 0:
        raise ValueError("coefficients is empty")
    if not torch.isfinite(coeffs).all() or (coeffs < 0).any():
        raise ValueError(f"Invalid coefficients value: {coeffs.tolist()} (must be finite and >= 0)")
    if coeffs.unique().numel() != coeffs.numel():
        raise ValueError(f"Invalid coefficients value: {coeffs.tolist()} (values repeat)")
    coeffs = coeffs.sort().values
    extra = dict(hparams or {})
    if name in extra:
        raise ValueError(f"hparams[{name!r}] is the coefficient of the path; do not give it in hparams")
    if (folds is None) == (validation is None):
        raise ValueError(
            "give exactly one of folds (K or a list of (train, validation) indices) "
            "and validation (x_val, y_val, ...)"
        )

    # replicates: seeds x splits; masks over all n examples (1 = a training example of that member)
    if folds is not None:
        splits = _check_folds(folds, n)
        train_sets = [tr for tr, _ in splits] + ([torch.arange(n)] if refit else [])
        val_masks = []
        for _, val in splits:
            m = torch.zeros(n, dtype=dtype)
            m[val] = 1.0
            val_masks.append(m)
        split_labels = [f"fold {i}" for i in range(len(splits))]
    else:
        val_data = _check_data(validation, "validation")
        if len(val_data) != len(data):
            raise ValueError(f"validation has {len(val_data)} tensors, data has {len(data)}")
        splits, train_sets, val_masks, split_labels = [], [torch.arange(n)], [], ["validation"]
        refit = False
    n_seeds, n_splits = len(inits), len(train_sets)
    train_masks = []
    for tr in train_sets:
        m = torch.zeros(n, dtype=dtype)
        m[tr] = 1.0
        train_masks.append(m)
    if batch_size is not None:
        check_int("batch_size", batch_size, low=1)
        smallest = min(int(t.numel()) for t in train_sets)
        if batch_size > smallest:
            raise ValueError(
                f"Invalid batch_size value: {batch_size} (a member has only {smallest} training examples)"
            )
    per_coeff = n_seeds * n_splits  # members per coefficient: seed-major, then split

    def weighted(p: PyTree, w: torch.Tensor, *batch: torch.Tensor) -> torch.Tensor:
        return (w * loss(p, *batch)).sum() / w.sum()

    _per_example(loss, inits[0], data, "loss")  # fail early, outside vmap
    step = make_step(weighted, tx, penalty=penalty, form=form, learning_rate=learning_rate)
    ens = ensemble_step(step, batch="per_member")

    # minibatch orders: each member (seed, split) its own permutations of its training examples
    gen = torch.Generator().manual_seed(seed)
    stage_coeffs = coeffs.flip(0) if warm_start else coeffs
    stages = [stage_coeffs[i : i + 1] for i in range(len(coeffs))] if warm_start else [stage_coeffs]

    def index_streams(count: int) -> list[torch.Tensor]:
        streams = []
        for _ in range(n_seeds):
            for tr in train_sets:
                need = steps * int(batch_size)  # type: ignore[arg-type]
                reps = -(-need // tr.numel())
                streams.append(
                    torch.cat([tr[torch.randperm(tr.numel(), generator=gen)] for _ in range(reps)])[:need]
                )
        return streams * count

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps * len(stages), desc=f"path over {name}", leave=False)
        except ImportError:  # pragma: no cover - depends on the environment
            bar = None

    trained: dict[int, PyTree] = {}  # index into coeffs -> stacked params of its per_coeff members
    previous: PyTree | None = None
    try:
        for stage in stages:
            count = len(stage)
            start = (
                previous
                if previous is not None
                else stack([inits[s] for s in range(n_seeds) for _ in range(n_splits)])
            )
            params0 = stack([m for _ in range(count) for m in unstack(start)]) if count > 1 else start
            member_coeff = stage.repeat_interleave(per_coeff).to(dtype)
            hp = {name: member_coeff, **extra}
            state = ens.init(params0, hparams=hp)
            members = count * per_coeff
            if batch_size is None:
                masks = torch.stack([m for _ in range(count) for _ in range(n_seeds) for m in train_masks])
                full = (masks, *[d.expand(members, *d.shape) for d in data])
            else:
                streams = torch.stack(index_streams(count))
            for t in range(steps):
                if batch_size is None:
                    batch = full
                else:
                    idx = streams[:, t * batch_size : (t + 1) * batch_size]
                    batch = (torch.ones(idx.shape, dtype=dtype), *[d[idx] for d in data])
                state, _ = ens(state, *batch)
                if bar is not None:
                    bar.update(1)
            solved = state.params if solution is None else solution(state)
            _check_solution(solved, state.params)
            final = unstack(solved)
            for j, c in enumerate(stage.tolist()):
                i = int(torch.nonzero(coeffs == c))
                trained[i] = stack(final[j * per_coeff : (j + 1) * per_coeff])
            previous = solved if warm_start else None
    finally:
        if bar is not None:
            bar.close()

    # evaluation: every member on its own training and validation examples
    evaluate = eval_loss if eval_loss is not None else loss
    held_out = data if folds is not None else val_data
    n_val_splits = len(splits) if folds is not None else 1  # the refit member has no validation examples
    train_rows: list[list[float]] = []
    val_rows: list[list[float]] = []
    sparse_rows: list[list[float]] = []
    kept: list[PyTree] = []
    refits: list[PyTree] = []
    with torch.no_grad():
        for i in range(len(coeffs)):
            stacked = trained[i]
            trees = unstack(stacked)
            train_losses = vmap(lambda p: _per_example(loss, p, data, "loss"))(stacked)  # (per_coeff, n)
            val_losses = vmap(lambda p: _per_example(evaluate, p, held_out, "eval_loss"))(stacked)
            zeros = _zeros_fraction(stacked)
            tr_row, val_row, sp_row = [], [], []
            for s in range(n_seeds):
                for f in range(n_val_splits):
                    j = s * n_splits + f
                    w = train_masks[f]
                    tr_row.append(float((w * train_losses[j]).sum() / w.sum()))
                    if folds is not None:
                        v = val_masks[f]
                        val_row.append(float((v * val_losses[j]).sum() / v.sum()))
                    else:
                        val_row.append(float(val_losses[j].mean()))
                    sp_row.append(float(zeros[j]))
                    kept.append(trees[j])
                if refit:
                    refits.append(trees[s * n_splits + n_splits - 1])
            train_rows.append(tr_row)
            val_rows.append(val_row)
            sparse_rows.append(sp_row)
    labels = [f"seed {s}, {lab}" for s in range(n_seeds) for lab in split_labels]
    return RegularizationPath(
        name=name,
        coefficients=coeffs,
        train_loss=torch.tensor(train_rows, dtype=torch.float64),
        val_loss=torch.tensor(val_rows, dtype=torch.float64),
        sparsity=torch.tensor(sparse_rows, dtype=torch.float64),
        replicates=labels,
        seeds=n_seeds,
        params=stack(kept),
        refit_params=stack(refits) if refit else None,
    )
