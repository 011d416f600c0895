"""Custom penalties: a user's value function, with optional closed-form gradient and prox."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from funcreg._src.core.tree import check_same_spec, flatten, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.penalties.base import FlatParams, Penalty, records_call, selection, zero_like_present
from funcreg._src.selection.mask_cache import CachedMask
from funcreg._src.selection.resolve import MaskLike


class CustomPenalty(Penalty):
    """A penalty from a user's value function; see :func:`penalty`."""

    def __init__(
        self,
        fn: Callable[[PyTree], torch.Tensor],
        name: str,
        grad: Callable[[PyTree], PyTree] | None,
        prox: Callable[[PyTree, Any], PyTree] | None,
        mask: MaskLike | None,
    ) -> None:
        self.fn = fn
        self.name = name
        self._grad = grad
        self._prox = prox
        self.mask = mask
        self._selection_mask = None if mask is None else CachedMask(mask, f"{name} mask")

    @property
    def has_prox(self) -> bool:
        return self._prox is not None

    def selected_flat(self, fp: FlatParams) -> list[bool]:
        return selection(self.name, self._selection_mask, fp)

    def _view(self, fp: FlatParams, leaves: list[Any], keep: list[bool]) -> PyTree:
        """The selected tree handed to the user's functions."""
        if self.mask is None:
            return unflatten(leaves, fp.spec)
        if isinstance(fp.tree, dict) and all(
            not isinstance(v, (dict, list, tuple)) for v in fp.tree.values()
        ):
            return {n: x for n, x, k in zip(fp.names, leaves, keep) if k}
        return unflatten([x if k else None for x, k in zip(leaves, keep)], fp.spec)

    def _unview(self, fp: FlatParams, tree: PyTree, keep: list[bool], what: str) -> list[torch.Tensor | None]:
        """The leaf list of a tree the user's function returned for the selected parameters (a dict
        of the selected names, or the structure of the view it was given), checked against that view."""
        if (
            self.mask is not None
            and isinstance(tree, dict)
            and isinstance(fp.tree, dict)
            and set(tree) != set(fp.tree)
        ):
            expected = [n for n, k in zip(fp.names, keep) if k]
            if sorted(tree) != sorted(expected):
                raise ValueError(f"{self.name} {what} returned keys {sorted(tree)}, expected {expected}")
            return [tree[n] if k else None for n, k in zip(fp.names, keep)]
        leaves, spec = flatten(tree)
        check_same_spec(flatten(self._view(fp, fp.leaves, keep))[1], spec, "params", f"{self.name} {what}")
        return [x if k else None for x, k in zip(leaves, keep)]

    def terms_flat(self, fp: FlatParams) -> list[tuple[str, torch.Tensor]]:
        keep = self.selected_flat(fp)
        if not any(keep):  # only absent (None) leaves are selected: another param group's
            return [(self.name, zero_like_present(fp))]
        value = self.fn(self._view(fp, fp.leaves, keep))
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            raise TypeError(f"penalty {self.name!r} must return a 0-d tensor, got {value!r}")
        return [(self.name, value)]

    def grad_flat(self, fp: FlatParams) -> list[torch.Tensor | None]:
        keep = self.selected_flat(fp)
        if not any(keep):
            return [None] * len(fp.leaves)
        if self._grad is not None:
            return self._unview(fp, self._grad(self._view(fp, fp.leaves, keep)), keep, "grad")
        idx = [i for i, k in enumerate(keep) if k]

        def value_of(selected: list[torch.Tensor]) -> torch.Tensor:
            leaves = list(fp.leaves)
            for i, x in zip(idx, selected):
                leaves[i] = x
            return self.fn(self._view(fp, leaves, keep))

        grads = torch.func.grad(value_of)([fp.leaves[i] for i in idx])
        out: list[torch.Tensor | None] = [None] * len(fp.leaves)
        for i, g in zip(idx, grads):
            out[i] = g
        return out

    def why_no_prox(self, fp: FlatParams) -> str | None:
        if self._prox is None:
            return f"penalty {self.name!r} has no closed-form proximal map (pass prox=...)"
        return None

    def prox_flat(self, fp: FlatParams, step: Any) -> list[torch.Tensor | None]:
        if self._prox is None:
            raise NotImplementedError(
                f"penalty {self.name!r} has no closed-form proximal map (pass prox=...)"
            )
        keep = self.selected_flat(fp)
        if not any(keep):
            return [None] * len(fp.leaves)
        return self._unview(fp, self._prox(self._view(fp, fp.leaves, keep), step), keep, "prox")


@records_call
def penalty(
    fn: Callable[[PyTree], torch.Tensor],
    name: str = "penalty",
    grad: Callable[[PyTree], PyTree] | None = None,
    prox: Callable[[PyTree, Any], PyTree] | None = None,
    mask: MaskLike | None = None,
) -> Penalty:
    """A penalty from its value function ``fn(params) -> 0-d tensor``; gradient by autodiff.

    ``fn`` receives the selected parameters: the whole tree without a mask; with a mask, a flat dict
    holds only the selected entries and other trees have ``None`` at unselected leaves. Optional
    closed forms: ``grad(params) -> tree`` and ``prox(params, step) -> tree`` over the same view.
    Check them with :func:`funcreg.testing.check_penalty`.

    Examples:
        >>> import torch, funcreg as fr
        >>> P = fr.penalty(lambda p: sum((w ** 4).sum() for w in p.values()), name="quartic")
        >>> P.grad({"w": torch.tensor([1.0, -2.0])})["w"]
        tensor([  4., -32.])
    """
    if not callable(fn):
        raise TypeError(f"penalty expects a callable params -> 0-d tensor, got {fn!r}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"penalty name must be a non-empty string, got {name!r}")
    for arg, f in (("grad", grad), ("prox", prox)):
        if f is not None and not callable(f):
            raise TypeError(f"penalty {arg} must be callable, got {f!r}")
    return CustomPenalty(fn, name, grad, prox, mask)
