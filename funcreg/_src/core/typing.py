"""The type aliases shared across funcreg, defined once.

Modules import them from here (``from funcreg._src.core.typing import PyTree``); the public ones are
used in the signatures of the public API.

- ``PyTree``: a nested structure of dicts, lists, tuples and NamedTuples whose leaves are tensors
  or ``None`` (a frozen parameter), as ``torch.utils._pytree`` flattens it.
- ``Schedule``: a callable ``count -> value`` of the number of updates done so far (see
  :mod:`funcreg._src.core.schedules`).
- ``ScalarOrSchedule``: a hyperparameter given as a number, a 0-d tensor or a schedule.
- ``MaskLike``: anything a ``mask=`` argument accepts: a bool, a bool tree (or prefix), a
  :class:`funcreg.Selection`, a :class:`funcreg.Selector`, or a callable ``params -> mask``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Union

import torch

if TYPE_CHECKING:  # selection imports this module: the classes are named, not imported, at runtime
    from funcreg._src.selection.resolve import Selection, Selector

__all__ = ["MaskLike", "PyTree", "ScalarOrSchedule", "Schedule"]

PyTree = Any
Schedule = Callable[[Any], Any]
ScalarOrSchedule = Union[float, torch.Tensor, Schedule]  # noqa: UP007  (a runtime alias on Python 3.10)
MaskLike = Union[bool, PyTree, "Selection", "Selector", Callable[[PyTree], Any]]  # noqa: UP007
