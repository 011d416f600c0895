"""Donation: the caller hands its state and parameters over, and funcreg may write into them.

``update`` is pure by default: every step allocates new moment buffers and new parameters. When the
caller *donates* (as with JAX's ``donate_argnums``), the same transforms update their state buffers
and the parameters in place instead, as ``torch.optim`` does, and the step costs what torch's costs.
Results are those of the pure path; the donated tensors must not be used afterwards except through
what the step returns (they are the same tensor objects, with new contents).

Donation is a per-thread flag read by the state updates (:func:`donating`), so it also holds while
``torch.compile`` traces a step (as in-place writes into the graph's inputs). A transform that does
not know about donation simply stays pure: that is always correct.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from funcreg._src.core.tree import compiling


class _Donation(threading.local):
    active = False


class _TracedDonation:
    active = False


# Eager steps read a per-thread flag. While torch.compile traces a step it reads a plain object
# instead: Dynamo records a write to it as an ordinary side effect (it cannot guard on a thread-local
# written inside the frame), tracing holds Dynamo's compile lock, and the compiled graph bakes the
# donated (in-place) behaviour in, so the flag's runtime value does not matter there.
_FLAG = _Donation()
_TRACED = _TracedDonation()
_TRACED.active = (
    False  # an instance attribute from the start: a first write must not change what Dynamo guards on
)


def donating() -> bool:
    """Whether the current thread runs a donated step (state and params may be written into)."""
    return _TRACED.active if compiling() else _FLAG.active


@contextmanager
def donation(active: bool = True) -> Iterator[None]:
    """Runs the body with donation on (or off: ``donation(False)`` inside a wrapper that must keep
    its inner state intact, such as ``apply_if_finite``)."""
    previous = set_donating(active)
    try:
        yield
    finally:
        set_donating(previous)


def set_donating(active: bool) -> bool:
    """Sets the flag and returns its previous value (for code that ``torch.compile`` traces, where a
    plain ``try``/``finally`` is simpler to trace than a context manager)."""
    flag = _TRACED if compiling() else _FLAG
    previous = flag.active
    flag.active = active
    return previous


class _Generation:
    """The mark of one donated state object: alive exactly as long as the state (in its ``__dict__``)."""

    __slots__ = ("__weakref__",)


class DonationTracker:
    """Catches a misuse of donation: stepping a state that an earlier step consumed.

    A donated step overwrites the tensors of the state it is given; calling it again with that state
    object (instead of the one it returned) would silently step from overwritten values. States
    whose class sets ``_fr_generations = True`` (:class:`funcreg.TrainState`) carry a mark, and every
    state consumed by any earlier step of this tracker is refused, as long as it exists. Other states
    (the raw states of :func:`funcreg.donated_update`, which cannot carry a mark) are held by
    reference after they are consumed, for as long as someone else holds them too: any of them
    passed again is refused, and one nobody else holds is let go (it can never be passed again).
    """

    def __init__(self) -> None:
        self._consumed: weakref.WeakSet[_Generation] = weakref.WeakSet()
        # references, not ids: a freed state's id can be reused by a new object
        self._held: list[object] = []
        self._last_produced: object = None

    def consume(self, state: object) -> None:
        """Marks ``state`` as consumed by a donated step, refusing one consumed before (a stale
        state whose tensors were written into since)."""
        mark = _mark(state)
        if mark is not None:
            stale = mark in self._consumed
            self._consumed.add(mark)
        else:
            # the list, the loop variable and getrefcount's argument: 3 references are ours
            self._held = [x for x in self._held if sys.getrefcount(x) > 3]
            stale = any(x is state for x in self._held)
            if not stale:
                self._held.append(state)
        if stale:
            raise ValueError(
                "this state was donated to an earlier step, which overwrote its tensors: pass the state "
                "that the latest step returned"
            )

    def produce(self, state: object) -> None:
        self._last_produced = state
        # a transform may return the container it was given (written in place): it is fresh again
        self._held = [x for x in self._held if x is not state]

    def is_latest(self, state: object) -> bool:
        """Whether ``state`` is the one the last step returned (its memory layout is known)."""
        return state is self._last_produced


def _mark(state: object) -> _Generation | None:
    if not getattr(type(state), "_fr_generations", False):
        return None
    d = state.__dict__
    mark = d.get("_fr_generation")
    if mark is None:
        mark = d["_fr_generation"] = _Generation()
    return mark
