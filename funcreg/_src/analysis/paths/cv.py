"""The held-out data of a regularization path: k-fold splits, and the checks on what a path is given.

Everything a path trains on is checked here before the vmapped run starts: an error inside ``vmap``
names neither the argument nor the member, so the data, the folds, the per-example losses and the
``solution`` callable's output are validated up front with messages that do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import torch

from funcreg._src.core.tree import flatten
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import check_int

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
    leaves, spec = flatten(solved)
    ref, ref_spec = flatten(params)
    if spec != ref_spec or any(
        (a is None) != (b is None) or (a is not None and a.shape != b.shape) for a, b in zip(leaves, ref)
    ):
        raise ValueError(
            "solution(state) must return a tree like state.params (the same keys and stacked shapes)"
        )
