"""What funcreg knows about a transform beyond its two functions, in one typed record.

A :class:`funcreg.GradientTransformation` is a pair of closures ``(init, update)``. Four facts travel
with it, each set by the factory that knows it and read by the code that needs it:

==========  ==========================================  =============================================
field       set by                                      read by
==========  ==========================================  =============================================
``config``  every factory (``base.configured``)         ``repr`` of the transform
``kernel``  ``optim/alias.py`` (adam, adamw, sgd)       ``kernels/update.py``: the donated step runs it
``form``    ``forms/forms.py`` (the three edit forms)   ``kernels/fused_forms.py``: folds it into a
                                                        kernel
``parts``   ``combinators/combine.py`` (chains)         ``kernels/fused_forms.py``
==========  ==========================================  =============================================

The record is the transform's ``record`` field (:attr:`funcreg.GradientTransformation.record`),
immutable, replaced with :meth:`~funcreg.GradientTransformation.with_record`: there is no other
place a donated step looks to decide which kernel runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from funcreg._src.core.typing import PyTree, ScalarOrSchedule

__all__ = ["DonatedKernel", "NO_RECORD", "PenaltyForm", "TransformRecord"]


class DonatedKernel(Protocol):
    """A kernel that runs a whole donated step: writes the new parameters and state into the given
    tensors and returns them, or returns ``None`` where it does not apply (the caller then runs the
    generic in-place path, which equals the pure one)."""

    def __call__(self, grads: PyTree, state: Any, params: PyTree) -> tuple[PyTree, Any] | None: ...


@dataclass(frozen=True)
class PenaltyForm:
    """A penalty applied as a gradient edit: what a donated step needs to fold it into a kernel.

    ``penalty`` is a :class:`funcreg.Penalty` (its wing sits above this one); ``learning_rate`` the
    decoupled/proximal form's step size (``None``: 1, and for the coupled form); ``report`` whether
    the form reports the penalty's value in its state.
    """

    kind: Literal["coupled", "decoupled", "proximal"]
    penalty: Any
    learning_rate: ScalarOrSchedule | None
    report: bool = True


@dataclass(frozen=True)
class TransformRecord:
    """The facts of one transform (see the module): how it prints, the torch kernel behind its
    donated step, the penalty form it applies, and a chain's parts (the transforms and, for a
    ``named_chain``, their names). ``folded`` marks a chain whose parts were already tried for a
    folded kernel, so the lookup runs once."""

    config: str | None = None
    kernel: DonatedKernel | None = None
    form: PenaltyForm | None = None
    parts: tuple[tuple[Any, ...], tuple[str, ...] | None] | None = None
    folded: bool = False


NO_RECORD = TransformRecord()
