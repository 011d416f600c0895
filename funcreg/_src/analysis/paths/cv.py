"""The held-out data of a regularization path: k-fold splits, and the checks on what a path is given.

Everything a path trains on is checked here before the vmapped run starts: an error inside ``vmap``
names neither the argument nor the member, so the data, the folds, the per-example losses and the
``solution`` callable's output are validated up front with messages that do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Union

import torch

from funcreg._src.core.tree import flatten
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import check_bool, check_int

Folds = Union[int, Sequence[tuple[Any, Any]]]  # noqa: UP007  (a runtime alias on Python 3.10)


def kfold(n: int, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``k`` contiguous folds of ``range(n)``, as scikit-learn's ``KFold(k)`` without shuffling.

    The first ``n % k`` folds have ``n // k + 1`` examples, the others ``n // k``. Returns a list of
    ``(train_indices, validation_indices)``. Shuffle the data first (with a seeded permutation) if its
    order is not random.

    Examples:
        >>> import funcreg as fr
        >>> [val.tolist() for _, val in fr.kfold(7, 3)]
        [[0, 1, 2], [3, 4], [5, 6]]
    """
    check_int("n", n, low=1)
    check_int("k", k, low=2)
    if k > n:
        raise ValueError(f"Invalid k value: {k} (more folds than the {n} examples)")
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    out, start = [], 0
    everything = torch.arange(n)
    for size in sizes:
        val = everything[start : start + size]
        train = torch.cat([everything[:start], everything[start + size :]])
        out.append((train, val))
        start += size
    return out


def _check_folds(folds: Folds, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The folds as ``(train, validation)`` index tensors: ``kfold(n, K)`` for an int, else the given
    pairs, each checked to be non-empty and inside ``range(n)`` (an index error inside vmap names no fold)."""
    if isinstance(folds, int) and not isinstance(folds, bool):
        return kfold(n, folds)
    if isinstance(folds, (str, bytes)) or not hasattr(folds, "__iter__"):
        raise TypeError(
            f"Invalid folds value: {folds!r} "
            "(expected an int K or a list of (train_indices, validation_indices))"
        )
    out = []
    for i, pair in enumerate(list(folds)):  # type: ignore[arg-type]
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(
                f"folds[{i}] must be a pair (train_indices, validation_indices), got {type(pair).__name__}"
            )
        train, val = (torch.as_tensor(idx).long().reshape(-1) for idx in pair)
        for what, idx in (("train", train), ("validation", val)):
            if idx.numel() == 0:
                raise ValueError(f"folds[{i}] has no {what} indices")
            if int(idx.min()) < 0 or int(idx.max()) >= n:
                raise ValueError(f"folds[{i}] has {what} indices outside range({n})")
        out.append((train, val))
    if len(out) < 2:
        raise ValueError(f"Invalid folds value: {len(out)} fold(s) (need at least 2)")
    return out


def _check_data(data: Any, what: str) -> tuple[torch.Tensor, ...]:
    """``data`` as a tuple of tensors with one common leading example axis and no NaN or inf, or an
    error naming the tensor and the row (a NaN found after training would only show as NaN losses)."""
    if isinstance(data, torch.Tensor) or not isinstance(data, (tuple, list)) or not data:
        raise TypeError(
            f"{what} must be a tuple of tensors (x, y, ...) with one row per example, "
            f"got {type(data).__name__}"
        )
    for i, d in enumerate(data):
        if not isinstance(d, torch.Tensor) or d.ndim == 0:
            raise TypeError(f"{what}[{i}] must be a tensor with a leading example axis, got {d!r:.60}")
        if d.shape[0] != data[0].shape[0]:
            raise ValueError(f"{what}[{i}] has {d.shape[0]} examples, {what}[0] has {data[0].shape[0]}")
        if (d.is_floating_point() or d.is_complex()) and not bool(torch.isfinite(d).all()):
            bad = (~torch.isfinite(d)).reshape(d.shape[0], -1).any(dim=1).nonzero().flatten()
            raise ValueError(
                f"{what}[{i}] has non-finite entries (NaN or inf) in {bad.numel()} example(s), the first at "
                f"row {int(bad[0])}: every coefficient's loss would be NaN; drop or impute them first"
            )
    return tuple(data)


def _per_example(
    fn: Callable[..., torch.Tensor], params: PyTree, data: tuple[torch.Tensor, ...], who: str
) -> torch.Tensor:
    """``fn(params, *data)``, checked to be one loss per example: a mean-reduced loss would otherwise
    be silently broadcast against the fold masks."""
    out = fn(params, *data)
    n = data[0].shape[0]
    if not isinstance(out, torch.Tensor) or out.shape != (n,):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"{who} must return one loss per example, shape ({n},), got {shape} "
            "(use reduction='none': e.g. torch.nn.functional.cross_entropy(logits, y, reduction='none'))"
        )
    return out


def _check_solution(solved: PyTree, params: PyTree) -> None:
    """Raises unless ``solution(state)`` returned a tree shaped like ``state.params``, which warm starts
    continue from and the evaluation unstacks per member."""
    leaves, spec = flatten(solved)
    ref, ref_spec = flatten(params)
    if spec != ref_spec or any(
        (a is None) != (b is None) or (a is not None and a.shape != b.shape) for a, b in zip(leaves, ref)
    ):
        raise ValueError(
            "solution(state) must return a tree like state.params (the same keys and stacked shapes)"
        )


def _check_options(
    loss: object,
    eval_loss: object,
    name: object,
    steps: object,
    seed: object,
    solution: object,
    flags: Mapping[str, object],
) -> None:
    """Checks the callables, the coefficient's name, ``steps``, ``seed`` and the boolean ``flags`` of a
    path, before any data is looked at."""
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
    for flag, value in flags.items():
        check_bool(flag, value)


def _check_coefficients(coefficients: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """The grid as an ascending float64 vector, checked to be non-empty, finite, ``>= 0`` and distinct
    (a repeated value would train the same members twice and make the choice ambiguous)."""
    coeffs = torch.as_tensor(coefficients, dtype=torch.float64).reshape(-1)
    if coeffs.numel() == 0:
        raise ValueError("coefficients is empty")
    if not torch.isfinite(coeffs).all() or (coeffs < 0).any():
        raise ValueError(f"Invalid coefficients value: {coeffs.tolist()} (must be finite and >= 0)")
    if coeffs.unique().numel() != coeffs.numel():
        raise ValueError(f"Invalid coefficients value: {coeffs.tolist()} (values repeat)")
    return coeffs.sort().values


def _shared_hparams(hparams: Mapping[str, float] | None, name: str) -> dict[str, float]:
    """The hyperparameters every member shares; the path's own coefficient may not be among them."""
    extra = dict(hparams or {})
    if name in extra:
        raise ValueError(f"hparams[{name!r}] is the coefficient of the path; do not give it in hparams")
    return extra


class _Splits(NamedTuple):
    """The replicates of one seed: which of the ``n`` examples each trains and is validated on."""

    train_sets: list[torch.Tensor]  # training indices per replicate; the refit member (all examples) last
    train_masks: list[torch.Tensor]  # the same as masks over all n examples (1 = a training example)
    val_masks: list[torch.Tensor]  # one per fold; empty with a validation split
    labels: list[str]  # one per validated replicate: "fold 0", ... or "validation"
    held_out: tuple[torch.Tensor, ...]  # the data the validation losses are computed on
    refit: bool  # whether the last of train_sets is the refit member

    @property
    def validated(self) -> int:
        """The replicates with held-out examples: all but the refit member."""
        return len(self.train_sets) - int(self.refit)


def _mask(indices: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A weight per example, 1 at ``indices`` and 0 elsewhere, so splits of any size stack."""
    m = torch.zeros(n, dtype=dtype)
    m[indices] = 1.0
    return m


def _make_splits(
    data: tuple[torch.Tensor, ...],
    folds: Folds | None,
    validation: Sequence[torch.Tensor] | None,
    refit: bool,
    dtype: torch.dtype,
) -> _Splits:
    """The replicates of one seed: every fold (and, with ``refit``, one more member trained on all
    examples), or the whole of ``data`` validated on the ``validation`` split (then never a refit)."""
    if (folds is None) == (validation is None):
        raise ValueError(
            "give exactly one of folds (K or a list of (train, validation) indices) "
            "and validation (x_val, y_val, ...)"
        )
    n = data[0].shape[0]
    if folds is not None:
        pairs = _check_folds(folds, n)
        train_sets = [tr for tr, _ in pairs] + ([torch.arange(n)] if refit else [])
        val_masks = [_mask(val, n, dtype) for _, val in pairs]
        labels = [f"fold {i}" for i in range(len(pairs))]
        held_out = data
    else:
        held_out = _check_data(validation, "validation")
        if len(held_out) != len(data):
            raise ValueError(f"validation has {len(held_out)} tensors, data has {len(data)}")
        train_sets, val_masks, labels, refit = [torch.arange(n)], [], ["validation"], False
    train_masks = [_mask(tr, n, dtype) for tr in train_sets]
    return _Splits(train_sets, train_masks, val_masks, labels, held_out, refit)


def _check_batch_size(batch_size: int | None, train_sets: list[torch.Tensor]) -> None:
    """Checks that every member has at least ``batch_size`` training examples (an epoch-wise draw from
    fewer would repeat examples within one batch)."""
    if batch_size is None:
        return
    check_int("batch_size", batch_size, low=1)
    smallest = min(int(t.numel()) for t in train_sets)
    if batch_size > smallest:
        raise ValueError(
            f"Invalid batch_size value: {batch_size} (a member has only {smallest} training examples)"
        )
