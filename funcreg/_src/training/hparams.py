"""Hyperparameters carried in a training state: plain dicts of tensors, one value per member in a sweep."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from funcreg._src.core.tree import flatten, is_functorch_tensor
from funcreg._src.core.typing import PyTree

Hyperparams = Mapping[str, Any]


def float_dtype(params: PyTree) -> torch.dtype:
    """The dtype of the first floating-point parameter (hyperparameters given as floats take it)."""
    leaves, _ = flatten(params)
    return next(
        (x.dtype for x in leaves if isinstance(x, torch.Tensor) and x.is_floating_point()),
        torch.get_default_dtype(),
    )


def as_hparams(hparams: Hyperparams | None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The hyperparameters as 0-d tensors keyed by name (Python numbers in ``dtype``, so that a
    float64 run keeps its coefficients in float64), refusing non-string keys and non-numbers."""
    if hparams is None:
        return {}
    if not isinstance(hparams, Mapping):
        raise TypeError(f"hparams must be a dict {{name: value}}, got {type(hparams).__name__}")
    out = {}
    for k, v in hparams.items():
        if not isinstance(k, str):
            raise TypeError(f"hparams keys must be strings, got {k!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float, torch.Tensor)):
            raise TypeError(f"hparams[{k!r}] must be a number or a tensor, got {v!r}")
        # a Python number takes the parameters' dtype: float64 runs must not see 0.01 rounded to float32
        t = (
            v
            if isinstance(v, torch.Tensor)
            else torch.tensor(float(v), dtype=dtype or torch.get_default_dtype())
        )
        if not is_functorch_tensor(t) and not torch.isfinite(t).all():
            raise ValueError(f"Invalid hparams[{k!r}] value: {v!r} (must be finite)")
        out[k] = t if t.is_floating_point() else t.to(dtype or torch.get_default_dtype())
    return out
