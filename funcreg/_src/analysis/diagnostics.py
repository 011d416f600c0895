"""Diagnostics over parameter trees: sparsity ("did the L1 penalty give any exact zeros?") and per-leaf norms.

Both functions take any parameter tree funcreg accepts (the flat dicts of :func:`funcreg.params_of`,
nested dicts, lists, tuples, a bare tensor) or a module, name the leaves with
:func:`funcreg.tree_names`, skip ``None`` leaves, and return a mapping ``{name: value}`` that prints as
a table.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from funcreg._src.core.dtensor import full_value
from funcreg._src.core.tree import flatten, tree_names
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import check_number
from funcreg._src.selection.named_params import params_of

__all__ = [
    "LeafNorm",
    "LeafSparsity",
    "NormReport",
    "SparsityReport",
    "norms",
    "sparsity",
]


def _named_tensors(params: PyTree, fn: str) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for each non-``None`` leaf; anything else that is not a tensor raises."""
    if isinstance(params, nn.Module):
        params = params_of(params)
    leaves, _ = flatten(params)
    out = []
    for name, leaf in zip(tree_names(params), leaves):
        if leaf is None:
            continue
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{fn}: leaf {name!r} is a {type(leaf).__name__}, not a tensor")
        out.append((name, leaf.detach()))
    if not out:
        raise ValueError(f"{fn}: params has no tensor leaves")
    return out


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _render(rows: Sequence[tuple[str, ...]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _dataframe(records: list[dict[str, Any]], columns: list[str], who: str) -> Any:
    try:
        import pandas as pd
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"{who}.to_dataframe needs pandas: pip install pandas") from err
    return pd.DataFrame.from_records(records, columns=columns)


# ----------------------------------------------------------------------------------------------------
# Sparsity


@dataclass(frozen=True)
class LeafSparsity:
    """The count of (near-)zero entries of one leaf."""

    name: str
    shape: tuple[int, ...]
    zeros: int
    numel: int

    @property
    def fraction(self) -> float:
        """``zeros / numel`` (NaN for a leaf with no elements)."""
        return self.zeros / self.numel if self.numel else math.nan


class SparsityReport(Mapping[str, float]):
    """Fraction of (near-)zero entries per leaf, by leaf name; ``overall`` weights leaves by size.

    ``report[name]`` is the leaf's fraction, ``report.leaves`` the counts, ``report.overall`` the
    fraction over all entries (``sum zeros / sum numel``), ``report.criterion`` the rule used;
    ``str(report)`` is a table.
    """

    def __init__(self, leaves: tuple[LeafSparsity, ...], criterion: str) -> None:
        self.leaves = leaves
        self.criterion = criterion
        self._by_name = {leaf.name: leaf for leaf in leaves}

    def __getitem__(self, name: str) -> float:
        return self._by_name[name].fraction

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    @property
    def zeros(self) -> int:
        """The number of (near-)zero entries over all leaves."""
        return sum(leaf.zeros for leaf in self.leaves)

    @property
    def numel(self) -> int:
        """The number of entries over all leaves."""
        return sum(leaf.numel for leaf in self.leaves)

    @property
    def overall(self) -> float:
        """``zeros / numel`` over all leaves: each leaf weighted by its element count."""
        return self.zeros / self.numel if self.numel else math.nan

    def table(self) -> str:
        """The report as a text table: name, shape, zeros, numel, fraction, and a total row."""
        rows = [("name", "shape", "zeros", "numel", "fraction")]
        for leaf in self.leaves:
            rows.append(
                (
                    leaf.name,
                    _shape_text(leaf.shape),
                    str(leaf.zeros),
                    str(leaf.numel),
                    f"{leaf.fraction:.4f}",
                )
            )
        rows.append(("total", "", str(self.zeros), str(self.numel), f"{self.overall:.4f}"))
        return f"sparsity ({self.criterion})\n" + _render(rows, right={2, 3, 4})

    __str__ = table

    def to_dataframe(self) -> Any:
        """A pandas DataFrame, one row per leaf: ``name``, ``shape`` (a tuple), ``zeros``, ``numel``, ``fraction``.

        Examples:
            >>> import torch, funcreg as fr
            >>> df = fr.sparsity({"w": torch.tensor([0.0, 1.0])}).to_dataframe()  # needs pandas
            >>> df.to_dict("records")
            [{'name': 'w', 'shape': (2,), 'zeros': 1, 'numel': 2, 'fraction': 0.5}]
        """
        return _dataframe(
            [
                {"name": x.name, "shape": x.shape, "zeros": x.zeros, "numel": x.numel, "fraction": x.fraction}
                for x in self.leaves
            ],
            ["name", "shape", "zeros", "numel", "fraction"],
            "SparsityReport",
        )

    def __repr__(self) -> str:
        return f"SparsityReport({self.criterion}, overall={self.overall:.4g}, {dict(self)!r})"


def sparsity(
    params: PyTree | nn.Module,
    threshold: float = 0.0,
    *,
    relative_threshold: float | None = None,
) -> SparsityReport:
    """Counts the (near-)zero entries of each leaf of a parameter tree.

    Absolute criterion (the default): an entry ``w`` counts when ``|w| <= threshold``; the default
    ``threshold=0.0`` counts exact zeros only (what a proximal L1 step produces; an L1 penalty in the
    loss, a subgradient step, produces none).

    Relative criterion (a tolerance that follows the tensor's scale, e.g. ``5e-4``): with ``relative_threshold=r`` an entry
    counts when ``|w| < r * max|w|``, the maximum taken over its own tensor, or when it is exactly zero
    (so an all-zero tensor is fully sparse). ``threshold`` must then be left at 0.

    Comparisons use the exact values of the entries (float64), so ``float32(0.1) <= 0.1`` is false.
    NaN entries never count. The overall fraction is ``sum(zeros) / sum(numel)``, i.e. the per-leaf
    fractions weighted by element count.

    Args:
        params: a parameter tree (``None`` leaves are skipped) or a module (its parameters).
        threshold: finite, ``>= 0``.
        relative_threshold: ``None``, or a finite number in ``[0, 1]``.

    Returns:
        A :class:`SparsityReport`: ``report[name]`` is a leaf's fraction, ``report.overall`` the total.

    Examples:
        >>> import torch, funcreg as fr
        >>> params = {"w": torch.tensor([[0.0, 1.0], [0.0, -2.0]]), "b": torch.tensor([1e-4, 3.0])}
        >>> report = fr.sparsity(params)
        >>> report["w"], report["b"], report.overall
        (0.5, 0.0, 0.3333333333333333)
        >>> fr.sparsity(params, relative_threshold=5e-4)["b"]  # 1e-4 < 5e-4 * 3.0
        0.5
        >>> print(fr.sparsity(params, threshold=1e-3))
        sparsity (|w| <= 0.001)
        name   shape  zeros  numel  fraction
        w      2x2        2      4    0.5000
        b      2          1      2    0.5000
        total             3      6    0.5000
    """
    check_number("threshold", threshold, low=0.0, allow_tensor=False)
    if relative_threshold is not None:
        check_number(
            "relative_threshold",
            relative_threshold,
            low=0.0,
            high=1.0,
            allow_tensor=False,
        )
        if threshold != 0:
            raise ValueError("give either threshold or relative_threshold, not both")
        criterion = f"|w| < {relative_threshold:g} * max|w| per tensor, or w == 0"
    else:
        criterion = f"|w| <= {threshold:g}" if threshold else "w == 0"
    leaves = []
    for name, x in _named_tensors(params, "sparsity"):
        a = x.abs()
        if a.is_floating_point() and a.dtype != torch.float64:
            a = a.to(torch.float64)  # compare exact values: float32(0.1) > 0.1
        if x.numel() == 0:
            count = 0
        elif relative_threshold is not None:
            # full_value: a sharded (DTensor) leaf's global count, not its shard's
            cutoff = full_value(a.max()) * relative_threshold
            count = int(full_value(((a < cutoff) | (a == 0)).sum()))
        else:
            count = int(full_value((a <= threshold).sum()))
        leaves.append(LeafSparsity(name, tuple(x.shape), count, x.numel()))
    return SparsityReport(tuple(leaves), criterion)


# ----------------------------------------------------------------------------------------------------
# Norms


@dataclass(frozen=True)
class LeafNorm:
    """The norm of one leaf."""

    name: str
    shape: tuple[int, ...]
    numel: int
    norm: float


class NormReport(Mapping[str, float]):
    """Per-leaf norms by leaf name, and ``total``, the norm of all entries together.

    ``report[name]`` is the leaf's norm, ``report.total`` the norm of the concatenation of all leaves
    (for ``ord=2`` the global norm that gradient clipping uses), ``str(report)`` a table.
    """

    def __init__(self, leaves: tuple[LeafNorm, ...], ord: float, total: float) -> None:
        self.leaves = leaves
        self.ord = ord
        self.total = total
        self._by_name = {leaf.name: leaf for leaf in leaves}

    def __getitem__(self, name: str) -> float:
        return self._by_name[name].norm

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def table(self) -> str:
        """The report as a text table: name, shape, numel, norm, and a total row."""
        rows = [("name", "shape", "numel", "norm")]
        for leaf in self.leaves:
            rows.append(
                (
                    leaf.name,
                    _shape_text(leaf.shape),
                    str(leaf.numel),
                    f"{leaf.norm:.6g}",
                )
            )
        rows.append(
            (
                "total",
                "",
                str(sum(leaf.numel for leaf in self.leaves)),
                f"{self.total:.6g}",
            )
        )
        return f"norms (ord={self.ord:g})\n" + _render(rows, right={2, 3})

    __str__ = table

    def to_dataframe(self) -> Any:
        """A pandas DataFrame, one row per leaf: ``name``, ``shape`` (a tuple), ``numel``, ``norm``.

        Examples:
            >>> import torch, funcreg as fr
            >>> fr.norms({"w": torch.tensor([3.0, 4.0])}).to_dataframe().to_dict("records")  # needs pandas
            [{'name': 'w', 'shape': (2,), 'numel': 2, 'norm': 5.0}]
        """
        return _dataframe(
            [{"name": x.name, "shape": x.shape, "numel": x.numel, "norm": x.norm} for x in self.leaves],
            ["name", "shape", "numel", "norm"],
            "NormReport",
        )

    def __repr__(self) -> str:
        return f"NormReport(ord={self.ord:g}, total={self.total:.6g}, {dict(self)!r})"


def _check_ord(ord: Any) -> float:
    if isinstance(ord, bool) or not isinstance(ord, (int, float)):
        raise TypeError(f"Invalid ord value: {ord!r} (expected a number >= 0, or math.inf)")
    if math.isnan(ord) or ord < 0:
        raise ValueError(f"Invalid ord value: {ord!r} (must be >= 0: 0, 1, 2, any p > 0, or math.inf)")
    return float(ord)


def _combine(values: list[float], p: float) -> float:
    """The ``p``-norm of a concatenation, from the ``p``-norms of its parts."""
    if p == 0:
        return float(sum(values))
    if math.isinf(p):
        return max(values)
    m = max(values)
    if m == 0 or math.isinf(m):
        return m
    return m * sum((v / m) ** p for v in values) ** (1.0 / p)


def norms(params: PyTree | nn.Module, ord: float = 2) -> NormReport:
    """The entrywise ``ord``-norm of each leaf of a parameter tree, by leaf name, and of all leaves.

    For a tensor ``w`` (of any shape, taken as a flat vector) the norm is ``(sum |w_i|^p)^(1/p)``
    for ``p = ord > 0``, ``max |w_i|`` for ``ord=math.inf`` and the count of nonzero entries for
    ``ord=0``. For a matrix, ``ord=2`` is the Frobenius norm, not the spectral norm. ``total`` is the
    same norm over all entries of all leaves, so for ``ord=2`` it is ``sqrt(sum of squared leaf norms)``.
    ``None`` leaves are skipped. Norms are computed in float64 and returned as Python floats.

    Note that ``torch.norm(w)``, often written as an "L2 penalty", is this (unsquared) norm: its gradient is
    ``w / ||w||``, unlike the ``w`` of ``1/2 * ||w||^2``.

    Args:
        params: a parameter tree or a module.
        ord: ``0``, any real ``p > 0`` (``1``, ``2``, ...), or ``math.inf``.

    Returns:
        A :class:`NormReport`: ``report[name]`` is a leaf's norm, ``report.total`` the norm of all.

    Examples:
        >>> import torch, funcreg as fr
        >>> report = fr.norms({"w": torch.tensor([[3.0, 4.0]]), "b": torch.tensor([12.0]), "frozen": None})
        >>> dict(report), report.total
        ({'w': 5.0, 'b': 12.0}, 13.0)
        >>> fr.norms({"w": torch.tensor([3.0, -4.0])}, ord=1)["w"]
        7.0
        >>> print(report)
        norms (ord=2)
        name   shape  numel  norm
        w      1x2        2     5
        b      1          1    12
        total             3    13
    """
    p = _check_ord(ord)
    leaves = []
    for name, x in _named_tensors(params, "norms"):
        if x.numel() == 0:
            value = 0.0  # the norm of an empty vector
        else:
            x = x.to(torch.complex128 if x.is_complex() else torch.float64)
            value = float(full_value(torch.linalg.vector_norm(x, p)))  # a DTensor's global norm
        leaves.append(LeafNorm(name, tuple(x.shape), x.numel(), value))
    total = _combine([leaf.norm for leaf in leaves], p)
    return NormReport(tuple(leaves), p, total)
