"""Step counting: the counters a transform keeps, and the :class:`StepCount` it reads its steps from.

A transform counts its updates (``state.count``, :func:`init_count`, :func:`next_count`) and, as
``torch.optim`` does, the steps of each parameter (``state.steps``, :func:`per_param_counts`); at an
update :func:`advance_steps` steps the counters of the parameters that have a gradient and returns
their values as a :class:`StepCount`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar, Union, cast

import torch

from funcreg._src.core import leafwise
from funcreg._src.core.tree import flatten, unflatten
from funcreg._src.core.typing import PyTree


class _Flattened(Protocol):
    """What :func:`advance_steps` needs of :class:`funcreg._src.core.base.Flat` (which imports this
    module): the per-parameter state check and the present positions."""

    def state_leaves(self, tree: PyTree, who: str, field: str, per_element: bool = True) -> list[Any]: ...

    def present(self, leaves: list[Any]) -> list[Any]: ...


Step = Union[int, torch.Tensor]
T = TypeVar("T")


# eq=False: the steps may be tensors, whose == is elementwise and has no truth value
@dataclass(frozen=True, eq=False)
class StepCount:
    """The steps of the present leaves at one update, one per leaf in the order of ``Flat.index``.

    Eager, each step is a Python int, so that everything derived from it (bias corrections, step
    sizes) is a Python float as in ``torch.optim``; under vmap or torch.compile it is a 0-d tensor.
    Usually every leaf is at the same step (:attr:`uniform`), and the values derived from it are
    single scalars; they are lists with one value per leaf when some parameters were stepped fewer
    times (their gradient was ``None`` at some updates) or the steps are traced. The ``leafwise``
    helpers take either.

    Examples:
        >>> import torch
        >>> from funcreg._src.core.steps import StepCount
        >>> same = StepCount((3, 3))
        >>> same.uniform, same.is_first, same.power(0.5), len(same)
        (3, False, 0.125, 2)
        >>> mixed = StepCount((1, 2))
        >>> mixed.uniform, mixed.is_first, mixed.power(0.5)
        (None, [True, False], [0.5, 0.25])
        >>> traced = StepCount((torch.tensor(1),))
        >>> traced.is_first, traced.power(0.5)
        ([tensor(True)], [tensor(0.5000, dtype=torch.float64)])
    """

    values: tuple[Step, ...]

    def __len__(self) -> int:
        return len(self.values)

    @property
    def uniform(self) -> int | None:
        """The step of every leaf when all are eager ints and agree (the usual case), else ``None``."""
        if not self.values:
            return None
        first = self.values[0]
        if isinstance(first, int) and all(isinstance(v, int) and v == first for v in self.values):
            return first
        return None

    @property
    def is_first(self) -> bool | list[bool | torch.Tensor]:
        """Whether this is the leaves' first step: one bool when :attr:`uniform`, else
        :meth:`first_per_leaf`."""
        t = self.uniform
        return t == 1 if t is not None else self.first_per_leaf()

    def first_per_leaf(self) -> list[bool | torch.Tensor]:
        """Whether this is each leaf's first step: a bool eager, a 0-d bool tensor (for a
        ``torch.where``) where the step is traced."""
        return [v == 1 for v in self.values]

    def per_leaf(self) -> list[Step]:
        """The step of each present leaf."""
        return list(self.values)

    def map(self, fn: Callable[[Step], T]) -> T | list[T]:
        """``fn`` of the step: one value when :attr:`uniform`, else a list with one per leaf."""
        t = self.uniform
        return fn(t) if t is not None else [fn(v) for v in self.values]

    def power(self, base: float) -> float | torch.Tensor | list[float | torch.Tensor]:
        """``base ** t`` (:func:`power_at`): one float when :attr:`uniform`, else one per leaf."""
        return self.map(partial(power_at, base))


def power_at(base: float, t: Step) -> float | torch.Tensor:
    """``base ** t`` as ``torch.optim``'s Adam computes its bias corrections: a Python float for an
    eager step, a float64 tensor for a traced one."""
    if isinstance(t, torch.Tensor):
        return torch.pow(torch.as_tensor(base, dtype=torch.float64, device=t.device), t)
    return base**t


def float_at(t: Step) -> float | int | torch.Tensor:
    """A step as a number to compute with: itself eager, a float64 tensor traced (an int64 step in
    arithmetic with Python floats would give a float32 tensor, losing float64 parameters' digits)."""
    return t.to(torch.float64) if isinstance(t, torch.Tensor) else t


def sqrt_at(x: float | torch.Tensor) -> float | torch.Tensor:
    """``sqrt`` of a value derived from a step (:func:`power_at`): a Python float or a tensor."""
    return torch.sqrt(x) if isinstance(x, torch.Tensor) else math.sqrt(x)


def per_param_counts(params: PyTree) -> PyTree:
    """A tree of 0-d int64 step counters, one per parameter (``None`` stays ``None``).

    ``torch.optim`` counts steps per parameter: a parameter whose gradient is ``None`` at a step is
    not stepped, so its Adam bias corrections and its first momentum step come later than others'.
    """
    leaves, spec = flatten(params)
    return unflatten(
        [None if p is None else torch.zeros((), dtype=torch.int64, device=p.device) for p in leaves], spec
    )


def advance_steps(f: _Flattened, steps: PyTree, who: str) -> tuple[list[Any], list[torch.Tensor], StepCount]:
    """Steps the per-parameter counters of the present leaves.

    Returns the full leaf list of counters (for :meth:`Flat.tree`), the new counters of the present
    leaves, and their values as a :class:`StepCount`.
    """
    leaves = f.state_leaves(steps, who, "steps", per_element=False)
    present = f.present(leaves)
    if leafwise.owned(present):  # a donated step counts in place
        leafwise.add_scalar_(present, 1)
        new = present
    else:
        new = [s + 1 for s in present]
    # cast: an int64 counter reads as an int (or stays a tensor), never as a float
    return leaves, new, StepCount(tuple(cast("Step", leafwise.concrete(s)) for s in new))


def next_count(count: torch.Tensor) -> torch.Tensor:
    """``count + 1``: in place in a donated step."""
    return count.add_(1) if leafwise.owned([count]) else count + 1


def init_count(params: PyTree) -> torch.Tensor:
    """A 0-d int64 step counter on the device of the parameters."""
    leaves, _ = flatten(params)
    device = next((p.device for p in leaves if isinstance(p, torch.Tensor)), None)
    return torch.zeros((), dtype=torch.int64, device=device)
