"""The type aliases shared across funcreg, defined once.

Modules import them from here (``from funcreg._src.core.typing import PyTree``); the public ones are
used in the signatures of the public API.

- ``PyTree``: a nested structure of dicts, lists, tuples and NamedTuples whose leaves are tensors
  or ``None`` (a frozen parameter), as ``torch.utils._pytree`` flattens it.
- ``Schedule``: a callable ``count -> value`` of the number of updates done so far (see
  :mod:`funcreg._src.core.schedules`).
- ``ScalarOrSchedule``: a hyperparameter given as a number, a 0-d tensor or a schedule.

``MaskLike`` (what a ``mask=`` argument accepts) lives beside ``resolve_mask`` in
:mod:`funcreg._src.selection.resolve`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch

__all__ = ["PyTree", "ScalarOrSchedule", "Schedule"]

PyTree = Any
Schedule = Callable[[Any], Any]
ScalarOrSchedule = Union[float, torch.Tensor, Schedule]  # noqa: UP007  (a runtime alias on Python 3.10)
