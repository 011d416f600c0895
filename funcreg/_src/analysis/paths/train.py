"""Training the members of a regularization path: each stage of coefficients is one vmapped run.

A member is one coefficient x seed x split, trained on its split's examples through a per-example
weight (its training mask, or ones on its own minibatch), so that splits of unequal sizes still stack.
The members of one coefficient are seed-major, then split; without warm starts every coefficient is in
one stage, with them each coefficient is a stage of its own, started from the previous stage's solution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from funcreg._src.analysis.paths.cv import _check_solution, _Splits
from funcreg._src.core.typing import PyTree
from funcreg._src.training.ensemble import EnsembleStep
from funcreg._src.training.members import stack, unstack
from funcreg._src.training.step import TrainState


def _stages(coeffs: torch.Tensor, warm_start: bool) -> list[torch.Tensor]:
    """The coefficients grouped into vmapped runs, in training order: all in one run, or with warm
    starts one run per coefficient from the largest down (each continues from the one before)."""
    if not warm_start:
        return [coeffs]
    descending = coeffs.flip(0)
    return [descending[i : i + 1] for i in range(len(coeffs))]


def _progress_bar(progress: bool, total: int, name: str) -> Any:
    """A tqdm bar over ``total`` steps, or ``None`` when none is asked for or tqdm is not installed
    (tqdm is an optional dependency, so it is imported only here)."""
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"path over {name}", leave=False)
    except ImportError:  # pragma: no cover - depends on the environment
        return None


def _index_streams(
    gen: torch.Generator, seeds: int, splits: _Splits, steps: int, batch_size: int, count: int
) -> torch.Tensor:
    """``(members, steps * batch_size)``: each member's minibatch order, drawn epoch by epoch from
    shuffles of its training examples, one order per seed and split, repeated for the ``count``
    coefficients of a stage (so that they are compared on the same batches)."""
    need = steps * batch_size
    streams = []
    for _ in range(seeds):
        for tr in splits.train_sets:
            reps = -(-need // tr.numel())
            streams.append(
                torch.cat([tr[torch.randperm(tr.numel(), generator=gen)] for _ in range(reps)])[:need]
            )
    return torch.stack(streams * count)


def _batches(
    gen: torch.Generator,
    seeds: int,
    splits: _Splits,
    data: tuple[torch.Tensor, ...],
    dtype: torch.dtype,
    count: int,
    steps: int,
    batch_size: int | None,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """The ``steps`` batches of a stage, ``(weights, *data)`` with one row per member: every example
    weighted by the member's training mask (full batch), or the member's next ``batch_size`` examples.

    Lazy, so a stage holds one minibatch at a time and its orders are drawn once it starts.
    """
    if batch_size is None:
        masks = torch.stack([m for _ in range(count) for _ in range(seeds) for m in splits.train_masks])
        members = masks.shape[0]
        full = (masks, *[d.expand(members, *d.shape) for d in data])
        for _ in range(steps):
            yield full
        return
    streams = _index_streams(gen, seeds, splits, steps, batch_size, count)
    for t in range(steps):
        idx = streams[:, t * batch_size : (t + 1) * batch_size]
        yield (torch.ones(idx.shape, dtype=dtype), *[d[idx] for d in data])


def _train(
    ens: EnsembleStep,
    coeffs: torch.Tensor,
    inits: list[PyTree],
    splits: _Splits,
    data: tuple[torch.Tensor, ...],
    dtype: torch.dtype,
    *,
    steps: int,
    batch_size: int | None,
    warm_start: bool,
    name: str,
    hparams: dict[str, float],
    seed: int,
    progress: bool,
    solution: Callable[[TrainState], PyTree] | None,
) -> dict[int, PyTree]:
    """Trains every member; returns, per index into ``coeffs``, the stacked solutions of that
    coefficient's members (seed-major, then split). Warm starts continue from the previous stage's."""
    seeds, per_seed = len(inits), len(splits.train_sets)
    per_coeff = seeds * per_seed
    gen = torch.Generator().manual_seed(seed)  # the minibatch orders, shared by every stage in turn
    stages = _stages(coeffs, warm_start)
    bar = _progress_bar(progress, steps * len(stages), name)
    trained: dict[int, PyTree] = {}
    previous: PyTree | None = None
    try:
        for stage in stages:
            count = len(stage)
            start = previous if previous is not None else stack([p for p in inits for _ in range(per_seed)])
            params0 = stack([m for _ in range(count) for m in unstack(start)]) if count > 1 else start
            hp = {name: stage.repeat_interleave(per_coeff).to(dtype), **hparams}
            state = ens.init(params0, hparams=hp)
            for batch in _batches(gen, seeds, splits, data, dtype, count, steps, batch_size):
                state, _ = ens(state, *batch)
                if bar is not None:
                    bar.update(1)
            solved = state.params if solution is None else solution(state)
            _check_solution(solved, state.params)
            final = unstack(solved)
            for j, c in enumerate(stage.tolist()):
                trained[int(torch.nonzero(coeffs == c))] = stack(final[j * per_coeff : (j + 1) * per_coeff])
            previous = solved if warm_start else None
    finally:
        if bar is not None:
            bar.close()
    return trained
