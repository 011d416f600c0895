"""Small helpers shared by the ``scale_by_*`` building blocks of the torch.optim aliases.

Kept apart from :mod:`funcreg._src.core.base` (the protocol) so that the optimizer-specific blocks
(``adam_variants``, ``adaptive``, ``sign_methods``, ``factored``, ``orthogonalize``) share one way of
reading per-parameter step counts and of refusing complex parameters.
"""

from __future__ import annotations

from typing import Any

import torch

from funcreg._src.core.base import configured
from funcreg._src.core.errors import ContractError
from funcreg._src.core.tree import check_same_spec, flatten, tree_names, unflatten
from funcreg._src.core.typing import PyTree


def reject_complex(params: PyTree, who: str) -> None:
    """Raises ``TypeError`` naming the first complex parameter.

    ``torch.optim`` treats a complex parameter as a pair of real ones (``torch.view_as_real``); these
    blocks do not do that themselves, and refuse rather than compute something else.
    """
    leaves, _ = flatten(params)
    for name, p in zip(tree_names(params), leaves):
        if isinstance(p, torch.Tensor) and p.is_complex():
            raise TypeError(
                f"{who}: parameter {name!r} is complex ({p.dtype}); this transform handles real tensors "
                "only: optimize torch.view_as_real(p) instead, as torch.optim does internally"
            )


def torch_scalar_dtype() -> torch.dtype:
    """The dtype torch.optim keeps its scalar state in (``_get_scalar_dtype``): float64 only when the
    default dtype is float64."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def empty_like_none(p: torch.Tensor) -> torch.Tensor:
    """A 0-element placeholder for a state field this parameter does not have (Adafactor's row and
    column factors of a vector), so state trees keep one leaf per parameter."""
    return torch.zeros(0, dtype=p.dtype, device=p.device)


def loose_state_leaves(f: Any, tree: PyTree, who: str, field: str) -> list[Any]:
    """Flattens a per-parameter state tree whose leaves are not shaped like the parameter (NAdam's
    0-d ``mu_product``, Adafactor's row and column factors): same structure as the updates
    (``StructureError`` naming the key otherwise), and a tensor wherever an update is present."""
    leaves, spec = flatten(tree)
    check_same_spec(f.spec, spec, "updates", f"{who} state {field!r}")
    for i in f.index:
        if not isinstance(leaves[i], torch.Tensor):
            name = tree_names(unflatten(f.updates, f.spec))[i]
            raise ContractError(
                f"{who}: no {field!r} state for {name!r} (its parameter was None or masked out at init)"
            )
    return leaves


def with_config(tx: Any, name: str, args: tuple, given: dict, defaults: dict) -> Any:
    """``tx`` with its ``repr`` set to ``name(args..., key=value)`` (see ``configured`` in :mod:`funcreg._src.core.base`),
    showing only the keyword arguments that differ from ``defaults``."""
    shown = {k: (None if k in defaults and _same_value(v, defaults[k]) else v) for k, v in given.items()}
    return configured(tx, name, *args, **shown)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or callable(a):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - anything incomparable is shown
        return False
