"""Complex parameters, the way ``torch.optim`` handles them: optimize the real view.

A complex tensor of shape ``s`` is viewed as a real one of shape ``s + (2,)`` (``torch.view_as_real``):
its real and imaginary parts become two independent real parameters. For linear transforms (SGD,
momentum, decay, clipping by the global norm) that changes nothing; for elementwise nonlinear ones
(Adam's ``g * g``, ``sqrt(v)``) it is what makes the complex optimizer equal ``torch.optim``'s, which
applies the same view. Squaring a complex gradient directly would be silently wrong.
"""

from __future__ import annotations

from typing import Any

import torch

from funcreg._src.core.base import GradientTransformation
from funcreg._src.core.tree import flatten, unflatten
from funcreg._src.core.typing import PyTree


def _has_complex(leaves: list[Any]) -> bool:
    return any(isinstance(x, torch.Tensor) and x.is_complex() for x in leaves)


def _real(leaves: list[Any]) -> list[Any]:
    return [torch.view_as_real(x) if isinstance(x, torch.Tensor) and x.is_complex() else x for x in leaves]


def as_real(tx: GradientTransformation) -> GradientTransformation:
    """``tx`` run on the real view of complex parameters, gradients and updates.

    ``init`` builds ``tx``'s state for the real views (a complex parameter of shape ``(3,)`` has Adam
    moments of shape ``(3, 2)``, as ``torch.optim.Adam`` keeps them); ``update`` views complex
    updates and parameters as real, runs ``tx`` and views the results back as complex. Trees without
    complex leaves go straight to ``tx``.

    Examples:
        >>> import torch, funcreg as fr
        >>> from funcreg._src.transforms.complex_params import as_real
        >>> tx = as_real(fr.scale_by_adam())
        >>> w = {"z": torch.tensor([1 + 1j])}
        >>> u, _ = tx.update({"z": torch.tensor([3 - 4j])}, tx.init(w), w)
        >>> u["z"]  # the first Adam step is sign(g) per real component, up to eps
        tensor([1.-1.j])
    """

    def init(params: PyTree) -> Any:
        leaves, spec = flatten(params)
        if not _has_complex(leaves):
            return tx.init(params)
        return tx.init(unflatten(_real(leaves), spec))

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, Any]:
        u_leaves, spec = flatten(updates)
        p_leaves = None if params is None else flatten(params)[0]
        if not _has_complex(u_leaves) and (p_leaves is None or not _has_complex(p_leaves)):
            return tx.update(updates, state, params)
        real_params = None if p_leaves is None else unflatten(_real(p_leaves), flatten(params)[1])
        out, state = tx.update(unflatten(_real(u_leaves), spec), state, real_params)
        o_leaves, o_spec = flatten(out)
        back = [
            torch.view_as_complex(o if o.is_contiguous() else o.contiguous())
            if isinstance(u, torch.Tensor) and u.is_complex() and o is not None
            else o
            for o, u in zip(o_leaves, u_leaves)
        ]
        return unflatten(back, o_spec), state

    return GradientTransformation(init, update)
