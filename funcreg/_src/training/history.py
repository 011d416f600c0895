"""Collecting metrics over steps; a pandas DataFrame when pandas is installed (it stays optional)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class History:
    """Metrics of many steps: ``history.append(metrics)`` after each step, then read them back.

    A history keeps scalar metrics: 0-d tensors for one run, or 1-D tensors with one value per member
    for an ensemble (the shape of ``"data_loss"`` decides which, when present). They are detached and
    moved to the CPU when appended. Python numbers (the floats of :func:`funcreg.metrics`) are kept
    as 0-d float64 tensors. Other entries (booleans, other objects, ``"aux"`` of other shapes) are skipped.

    Examples:
        >>> import torch, funcreg as fr
        >>> h = fr.History()
        >>> for t in range(3):
        ...     h.append({"data_loss": torch.tensor(1.0 / (t + 1)), "penalty": torch.tensor(0.5)})
        >>> h["data_loss"]
        tensor([1.0000, 0.5000, 0.3333])
        >>> h.to_dataframe().shape  # needs pandas: columns step, data_loss, penalty
        (3, 3)
        >>> h = fr.History()
        >>> h.append({"decay/lr": 0.01, "penalty": 0.5})  # floats, as fr.metrics(opt) returns them
        >>> h["decay/lr"]
        tensor([0.0100], dtype=torch.float64)
    """

    def __init__(self) -> None:
        self._rows: list[dict[str, torch.Tensor]] = []
        self._steps: list[int] = []

    def append(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Records one step's metrics (``step`` defaults to the number of records so far)."""
        if not isinstance(metrics, Mapping):
            raise TypeError(f"History.append expects a dict of metrics, got {type(metrics).__name__}")
        tensors = {
            k: (v if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64))
            for k, v in metrics.items()
            if isinstance(v, torch.Tensor) or (isinstance(v, (int, float)) and not isinstance(v, bool))
        }
        reference = tensors.get("data_loss", next((v for v in tensors.values() if v.ndim <= 1), None))
        shape = () if reference is None or reference.ndim == 0 else tuple(reference.shape)
        row = {k: v.detach().to("cpu") for k, v in tensors.items() if tuple(v.shape) == shape}
        if self._rows and set(row) != set(self._rows[0]):
            raise ValueError(f"metrics keys changed: {sorted(self._rows[0])} before, {sorted(row)} now")
        self._rows.append(row)
        self._steps.append(len(self._steps) if step is None else int(step))

    def __len__(self) -> int:
        return len(self._rows)

    def keys(self) -> list[str]:
        """The metric names."""
        return list(self._rows[0]) if self._rows else []

    def __getitem__(self, key: str) -> torch.Tensor:
        """One metric over steps: shape ``(steps,)``, or ``(steps, members)`` for an ensemble."""
        if key not in self.keys():
            raise KeyError(f"no metric {key!r}; metrics are {self.keys()}")
        return torch.stack([row[key] for row in self._rows])

    def to_dataframe(self) -> Any:
        """A pandas DataFrame: one row per step (and per member for ensembles, in long format)."""
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "History.to_dataframe needs pandas: pip install pandas (or the 'examples' extra)"
            ) from err
        records = []
        for step, row in zip(self._steps, self._rows):
            ensemble = any(v.ndim == 1 for v in row.values())
            members = next(iter(row.values())).numel() if ensemble else 1
            for m in range(members):
                rec: dict[str, Any] = {"step": step}
                if ensemble:
                    rec["member"] = m
                for k, v in row.items():
                    rec[k] = float(v.reshape(-1)[m if v.numel() > 1 else 0])
                records.append(rec)
        return pd.DataFrame.from_records(records)
