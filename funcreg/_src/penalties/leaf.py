"""Leafwise penalties: a sum over the selected tensors of one formula, described by a :class:`LeafRule`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch

from funcreg._src.core.dtensor import check_same_kind, full_value, is_dtensor, unsupported
from funcreg._src.core.errors import LeafTypeError
from funcreg._src.core.leafwise import can_foreach
from funcreg._src.core.tree import broadcast_prefix
from funcreg._src.core.typing import PyTree
from funcreg._src.penalties.base import (
    Coefficient,
    FlatParams,
    Penalty,
    is_scalar,
    selection,
    zero_like_present,
)
from funcreg._src.selection.mask_cache import CachedMask
from funcreg._src.selection.resolve import MaskLike


@dataclass(frozen=True)
class LeafRule:
    """What a leafwise penalty is, for one tensor ``w`` with coefficients ``c = (c1, ...)``.

    Attributes:
        value: ``value(w, *c, **aux) -> 0-d tensor``.
        grad: ``grad(w, *c, **aux)``, the closed-form gradient (``None``: autodiff of ``value``).
        prox: ``prox(v, *t, **aux)`` with ``t = step * c`` (``None``: no closed form); with
            ``prox_takes_step``, ``prox(v, step, *c, **aux)`` (a non-convex prox depends on the step
            and the coefficients apart, not only on their products).
        check: ``check(name, w)`` raising for a selected tensor the rule does not apply to.
        default_select: which tensors are selected when no mask is given (``None``: all).
        differentiable: ``False`` for a constraint (an indicator: a projection, no gradient).
        complex_ok: whether the rule means something for complex tensors.
        kernel_kind: ``"l2"`` for ``c/2 * |w|^2``, ``"l1"`` for ``c * |w|_1`` with one coefficient:
            the rules a donated step folds into torch's kernel (:meth:`funcreg.Penalty.kernel_form`).
        quadratic: ``quadratic(*c, **aux) -> (curvature, center)`` where the rule is
            ``curvature/2 * |w - center|^2`` (``center`` ``None``: 0; ``curvature`` a number, a 0-d
            or an elementwise tensor), so that a sum of penalties folds it into the prox of the
            other term on the same parameter (``None``: not a quadratic).
        value_many, grad_many, prox_many: the same over a list of tensors sharing scalar coefficients
            (``value_many(ws, *c)`` the summed value, unrecorded by autograd; the others one result
            per tensor), with ``torch._foreach_*`` kernels: a tree of many small tensors then costs a
            few kernel launches instead of a few per tensor. Optional; equal to the per-tensor forms
            (the value to rounding, the gradient and prox bit for bit).
    """

    value: Callable[..., torch.Tensor]
    grad: Callable[..., torch.Tensor] | None = None
    prox: Callable[..., torch.Tensor] | None = None
    check: Callable[[str, torch.Tensor], None] | None = None
    default_select: Callable[[torch.Tensor], bool] | None = None
    differentiable: bool = True
    complex_ok: bool = True
    quadratic: Callable[..., tuple[Any, torch.Tensor | None]] | None = None
    prox_takes_step: bool = False
    kernel_kind: Literal["l1", "l2"] | None = None
    value_many: Callable[..., torch.Tensor] | None = None
    grad_many: Callable[..., list[torch.Tensor]] | None = None
    prox_many: Callable[..., list[torch.Tensor]] | None = None


def in_dtype_of(coeff: Any, w: torch.Tensor) -> Any:
    """A tensor coefficient in the leaf's (real) dtype and device, so a float64 coefficient keeps a
    float32 parameter's gradient and prox float32 (0-d tensors would otherwise promote 0-d leaves)."""
    if isinstance(coeff, torch.Tensor):
        dtype = w.real.dtype if w.is_complex() else w.dtype
        return (
            coeff
            if coeff.dtype == dtype and coeff.device == w.device
            else coeff.to(dtype=dtype, device=w.device)
        )
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
        mask: MaskLike | None,
        rule: LeafRule,
        aux: Mapping[str, PyTree] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"penalty name must be a non-empty string, got {name!r}")
        self.name = name
        self.coefficients = tuple(coefficients)
        self.mask = mask
        self._selection_mask = None if mask is None else CachedMask(mask, f"{name} mask")
        self.rule = rule
        self._aux = {k: v for k, v in (aux or {}).items() if v is not None}

    def kernel_form(self) -> tuple[Literal["l1", "l2"], float] | None:
        kind = self.rule.kernel_kind
        if kind is None or self._aux or len(self.coefficients) != 1:
            return None
        c = self.coefficients[0]
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            return None  # a tensor (vmapped, learned) or per-leaf coefficient: the generic path
        return kind, float(c)

    @property
    def has_prox(self) -> bool:
        return self.rule.prox is not None

    @property
    def has_grad(self) -> bool:
        return self.rule.differentiable

    def selected_flat(self, fp: FlatParams) -> list[bool]:
        keep = selection(self.name, self._selection_mask, fp, self.rule.default_select)
        for name, leaf, k in zip(fp.names, fp.leaves, keep):
            if not k:
                continue
            if not isinstance(leaf, torch.Tensor) or not (leaf.is_floating_point() or leaf.is_complex()):
                what = type(leaf).__name__ if not isinstance(leaf, torch.Tensor) else f"a {leaf.dtype} tensor"
                raise LeafTypeError(
                    f"penalty {self.name!r}: parameter {name!r} is {what}, expected a floating-point tensor"
                )
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
            [c] * len(fp.leaves)
            if is_scalar(c)
            else broadcast_prefix(c, fp.tree, what=f"{self.name} coefficient")
            for c in self.coefficients
        ]
        return [tuple(col[i] for col in columns) for i in range(len(fp.leaves))]

    def _aux_leaves(self, fp: FlatParams, keep: list[bool]) -> list[dict[str, Any]]:
        """The auxiliary tensors (an anchor's reference and precision) of each selected leaf,
        matched by key and checked against the parameter's shape, dtype and device."""
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
                    raise TypeError(
                        f"{self.name} {aux_name} for {fp.names[i]!r} must be a tensor, got {type(a).__name__}"
                    )
                if a.shape != leaf.shape:
                    raise ValueError(
                        f"{self.name} {aux_name} for {fp.names[i]!r} has shape {tuple(a.shape)}, "
                        f"the parameter has {tuple(leaf.shape)}"
                    )
                # cast: mypy cannot infer a lambda with default arguments against Callable[[], str]
                check_same_kind(
                    a,
                    leaf,
                    cast(
                        "Callable[[], str]",
                        lambda i=i, aux_name=aux_name: f"{self.name} {aux_name} for {fp.names[i]!r}",
                    ),
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

    def _shared(self, fp: FlatParams) -> tuple[list[int], list[torch.Tensor], tuple[Any, ...]] | None:
        """The selected leaves and their one set of coefficients, where the list rules apply: scalar
        coefficients, no per-leaf aux, real tensors of one dtype and device, none wrapped by vmap."""
        if self._aux or not all(is_scalar(c) for c in self.coefficients):
            return None
        keep = self.selected_flat(fp)
        index = [i for i, k in enumerate(keep) if k]
        ws = [fp.leaves[i] for i in index]
        if (
            not ws
            or not can_foreach(ws, *self.coefficients)
            or len({(w.dtype, w.device) for w in ws}) != 1
            or ws[0].is_complex()
        ):
            return None
        if any(
            isinstance(c, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(c)
            for c in self.coefficients
        ):
            return None  # one coefficient per vmapped member: the per-tensor rules batch, foreach does not
        return index, ws, tuple(in_dtype_of(c, ws[0]) for c in self.coefficients)

    def terms_flat(self, fp: FlatParams) -> list[tuple[str, torch.Tensor]]:
        if self.rule.value_many is not None and not torch.is_grad_enabled():
            shared = self._shared(fp)
            if shared is not None:
                return [(self.name, full_value(self.rule.value_many(shared[1], *shared[2])))]
        total = None
        for i, w, c, aux in self._items(fp):
            v = self._apply(
                "its value", fp.names[i], w, lambda w=w, c=c, aux=aux: self.rule.value(w, *c, **aux)
            )
            total = v if total is None else total + v
        if total is None:
            return [(self.name, zero_like_present(fp))]
        # over DTensor leaves the sum is a partial (per-shard) one: reduce it, so the value is global
        return [(self.name, full_value(total))]

    def grad_flat(self, fp: FlatParams) -> list[torch.Tensor | None]:
        if not self.rule.differentiable:
            raise NotImplementedError(
                f"{self.name!r} is a constraint: it has a projection but no gradient; apply it with fr.proximal"
            )
        out: list[torch.Tensor | None] = [None] * len(fp.leaves)
        shared = self._shared(fp) if self.rule.grad_many is not None else None
        if shared is not None:
            assert self.rule.grad_many is not None  # shared is only computed when it is
            for i, g in zip(shared[0], self.rule.grad_many(shared[1], *shared[2])):
                out[i] = g
            return out
        rule_grad = self.rule.grad
        for i, w, c, aux in self._items(fp):
            if rule_grad is not None:
                out[i] = self._apply(
                    "its gradient", fp.names[i], w, lambda w=w, c=c, aux=aux: rule_grad(w, *c, **aux)
                )
            else:
                out[i] = torch.func.grad(lambda x, c=c, aux=aux: self.rule.value(x, *c, **aux))(w)
        return out

    def quadratic_flat(self, fp: FlatParams) -> list[tuple[Any, torch.Tensor | None] | None] | None:
        quadratic = self.rule.quadratic
        if quadratic is None:
            return None
        out: list[tuple[Any, torch.Tensor | None] | None] = [None] * len(fp.leaves)
        for i, _, c, aux in self._items(fp):
            out[i] = quadratic(*c, **aux)
        return out

    def why_no_prox(self, fp: FlatParams) -> str | None:
        return (
            None if self.rule.prox is not None else f"penalty {self.name!r} has no closed-form proximal map"
        )

    def prox_flat(self, fp: FlatParams, step: Any) -> list[torch.Tensor | None]:
        if self.rule.prox is None:
            raise NotImplementedError(f"penalty {self.name!r} has no closed-form proximal map")
        out: list[torch.Tensor | None] = [None] * len(fp.leaves)
        shared = (
            self._shared(fp)
            if self.rule.prox_many is not None and not isinstance(step, torch.Tensor)
            else None
        )
        if shared is not None and all(not isinstance(c, torch.Tensor) for c in shared[2]):
            assert self.rule.prox_many is not None  # shared is only computed when it is
            for i, z in zip(shared[0], self.rule.prox_many(shared[1], *(step * x for x in shared[2]))):
                out[i] = z
            return out
        for i, v, c, aux in self._items(fp):
            t = (step, *c) if self.rule.prox_takes_step else tuple(step * x for x in c)
            # cast: for mypy the check above (prox is not None) does not reach into the lambda
            out[i] = self._apply(
                "its prox",
                fp.names[i],
                v,
                lambda v=v, t=t, aux=aux: cast(Callable, self.rule.prox)(v, *t, **aux),
            )
        return out

    def _apply(self, what: str, name: str, w: torch.Tensor, fn: Callable[..., Any]) -> Any:
        """``fn()``, the rule applied to leaf ``name``: on a sharded (DTensor) leaf, an operation that
        torch.distributed.tensor cannot shard (an SVD's water level, say) raises naming the penalty and leaf."""
        if not is_dtensor(w):
            return fn()
        try:
            return fn()
        except (RuntimeError, NotImplementedError) as err:
            raise unsupported(f"penalty {self.name!r} ({what})", name, w, err) from err
