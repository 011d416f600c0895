"""Leafwise penalties: a sum over the selected tensors of one formula, described by a :class:`LeafRule`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from funcreg._src.errors import LeafTypeError
from funcreg._src.penalties.base import Coefficient, FlatParams, Penalty, is_scalar, selection
from funcreg._src.selection import MaskLike
from funcreg._src.tree import PyTree, broadcast_prefix


@dataclass(frozen=True)
class LeafRule:
    """What a leafwise penalty is, for one tensor ``w`` with coefficients ``c = (c1, ...)``.

    Attributes:
        value: ``value(w, *c, **aux) -> 0-d tensor``.
        grad: ``grad(w, *c, **aux)``, the closed-form gradient (``None``: autodiff of ``value``).
        prox: ``prox(v, *t, **aux)`` with ``t = step * c`` (``None``: no closed form).
        check: ``check(name, w)`` raising for a selected tensor the rule does not apply to.
        default_select: which tensors are selected when no mask is given (``None``: all).
        differentiable: ``False`` for a constraint (an indicator: a projection, no gradient).
        complex_ok: whether the rule means something for complex tensors.
    """

    value: Callable[..., torch.Tensor]
    grad: Optional[Callable[..., torch.Tensor]] = None
    prox: Optional[Callable[..., torch.Tensor]] = None
    check: Optional[Callable[[str, torch.Tensor], None]] = None
    default_select: Optional[Callable[[torch.Tensor], bool]] = None
    differentiable: bool = True
    complex_ok: bool = True


def in_dtype_of(coeff: Any, w: torch.Tensor) -> Any:
    """A tensor coefficient in the leaf's (real) dtype and device, so a float64 coefficient keeps a
    float32 parameter's gradient and prox float32 (0-d tensors would otherwise promote 0-d leaves)."""
    if isinstance(coeff, torch.Tensor):
        dtype = w.real.dtype if w.is_complex() else w.dtype
        return coeff if coeff.dtype == dtype and coeff.device == w.device else coeff.to(dtype=dtype, device=w.device)
    return coeff


def same_as(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x`` in ``w``'s dtype and device: a float64 reference must not promote a float32 parameter."""
    return x if x.dtype == w.dtype and x.device == w.device else x.to(dtype=w.dtype, device=w.device)


class LeafPenalty(Penalty):
    """``sum over selected leaves w of rule.value(w, *coefficients, **aux)``.

    ``coefficients`` are numbers, 0-d tensors (vmappable) or per-leaf trees; ``aux`` holds per-leaf
    tensor trees matched to the parameters by key (an anchor's reference and precision).
    """

    def __init__(
        self,
        name: str,
        coefficients: Sequence[Coefficient],
        mask: Optional[MaskLike],
        rule: LeafRule,
        aux: Optional[Mapping[str, PyTree]] = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"penalty name must be a non-empty string, got {name!r}")
        self.name = name
        self.coefficients = tuple(coefficients)
        self.mask = mask
        self.rule = rule
        self._aux = {k: v for k, v in (aux or {}).items() if v is not None}

    @property
    def has_prox(self) -> bool:
        return self.rule.prox is not None

    @property
    def has_grad(self) -> bool:
        return self.rule.differentiable

    def selected_flat(self, fp: FlatParams) -> list[bool]:
        keep = selection(self.name, self.mask, fp, self.rule.default_select)
        for name, leaf, k in zip(fp.names, fp.leaves, keep):
            if not k:
                continue
            if not isinstance(leaf, torch.Tensor) or not (leaf.is_floating_point() or leaf.is_complex()):
                what = type(leaf).__name__ if not isinstance(leaf, torch.Tensor) else f"a {leaf.dtype} tensor"
                raise LeafTypeError(f"penalty {self.name!r}: parameter {name!r} is {what}, expected a floating-point tensor")
            if leaf.is_complex() and not self.rule.complex_ok:
                raise LeafTypeError(
                    f"penalty {self.name!r} is not defined for complex parameters ({name!r} is {leaf.dtype}); "
                    "select real parameters only"
                )
            if self.rule.check is not None:
                self.rule.check(name, leaf)
        return keep

    def _per_leaf_coefficients(self, fp: FlatParams) -> list[tuple[Any, ...]]:
        columns = [
            [c] * len(fp.leaves) if is_scalar(c) else broadcast_prefix(c, fp.tree, what=f"{self.name} coefficient")
            for c in self.coefficients
        ]
        return [tuple(col[i] for col in columns) for i in range(len(fp.leaves))]

    def _aux_leaves(self, fp: FlatParams, keep: list[bool]) -> list[dict[str, Any]]:
        per_leaf: list[dict[str, Any]] = [{} for _ in fp.leaves]
        for aux_name, tree in self._aux.items():
            # matched to the params by key (dict order does not matter), like masks and coefficients
            leaves = broadcast_prefix(tree, fp.tree, what=f"{self.name} {aux_name}")
            for i, (leaf, a, k) in enumerate(zip(fp.leaves, leaves, keep)):
                if not k:
                    continue
                if a is None:
                    raise ValueError(f"{self.name} {aux_name} is None for selected parameter {fp.names[i]!r}")
                if not isinstance(a, torch.Tensor):
                    raise TypeError(f"{self.name} {aux_name} for {fp.names[i]!r} must be a tensor, got {type(a).__name__}")
                if a.shape != leaf.shape:
                    raise ValueError(
                        f"{self.name} {aux_name} for {fp.names[i]!r} has shape {tuple(a.shape)}, "
                        f"the parameter has {tuple(leaf.shape)}"
                    )
                per_leaf[i][aux_name] = same_as(a, leaf)
        return per_leaf

    def _items(self, fp: FlatParams) -> list[tuple[int, torch.Tensor, tuple[Any, ...], dict[str, Any]]]:
        keep = self.selected_flat(fp)
        coeffs = self._per_leaf_coefficients(fp)
        aux = self._aux_leaves(fp, keep)
        return [
            (i, fp.leaves[i], tuple(in_dtype_of(c, fp.leaves[i]) for c in coeffs[i]), aux[i])
            for i in range(len(fp.leaves))
            if keep[i]
        ]

    def terms_flat(self, fp: FlatParams) -> list[tuple[str, torch.Tensor]]:
        total = None
        for _, w, c, aux in self._items(fp):
            v = self.rule.value(w, *c, **aux)
            total = v if total is None else total + v
        assert total is not None
        return [(self.name, total)]

    def grad_flat(self, fp: FlatParams) -> list[Optional[torch.Tensor]]:
        if not self.rule.differentiable:
            raise NotImplementedError(
                f"{self.name!r} is a constraint: it has a projection but no gradient; apply it with fr.proximal"
            )
        out: list[Optional[torch.Tensor]] = [None] * len(fp.leaves)
        for i, w, c, aux in self._items(fp):
            if self.rule.grad is not None:
                out[i] = self.rule.grad(w, *c, **aux)
            else:
                out[i] = torch.func.grad(lambda x, c=c, aux=aux: self.rule.value(x, *c, **aux))(w)
        return out

    def why_no_prox(self, fp: FlatParams) -> Optional[str]:
        return None if self.rule.prox is not None else f"penalty {self.name!r} has no closed-form proximal map"

    def prox_flat(self, fp: FlatParams, step: Any) -> list[Optional[torch.Tensor]]:
        if self.rule.prox is None:
            raise NotImplementedError(f"penalty {self.name!r} has no closed-form proximal map")
        out: list[Optional[torch.Tensor]] = [None] * len(fp.leaves)
        for i, v, c, aux in self._items(fp):
            out[i] = self.rule.prox(v, *(step * x for x in c), **aux)
        return out
