"""funcreg's error types: subclasses of the built-in ones, so ``except ValueError`` keeps working.

Callers that need to tell one failure from another (``funcreg.testing`` rejecting a drawn tree that a
penalty does not apply to, a framework retrying with another selection) catch these instead of
matching message text.
"""

from __future__ import annotations


class StructureError(ValueError):
    """Two trees that must match do not: a missing or extra key, another node type, another order."""


class SelectionError(ValueError):
    """A mask, selection or penalty selects no parameter, or names a parameter that does not exist."""


class ContractError(ValueError):
    """A gradient, update or state leaf breaks the per-parameter contract (shape, member count)."""


class LeafTypeError(TypeError):
    """A leaf has the wrong kind, dtype or device: an int parameter, a float64 gradient for a float32
    parameter, a Python number where a tensor is expected, a state of another transform."""
