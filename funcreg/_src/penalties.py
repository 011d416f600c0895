"""Penalties: one object per regularizer, from which every form of applying it is derived.

A penalty ``P`` is a pure function of a parameter tree with

* ``P(params)``: the value, a 0-d tensor that ``torch.func.grad`` can differentiate (the loss term);
* ``P.grad(params)``: its gradient (closed form where known, autodiff otherwise; zeros for parameters
  the penalty does not select), used by the coupled and decoupled forms;
* ``P.prox(params, step)``: the proximal map ``argmin_z 1/2 ||z - v||^2 + step * P(z)`` where a closed
  form exists (exact zeros for L1-type penalties), used by the proximal form;
* ``P.terms(params)``: the value of each named term, so a sum of penalties stays readable.

Conventions (see ``docs/conventions.md``): ``l2(c)`` is ``c/2 ||w||^2``, whose gradient ``c w`` is what
``torch.optim``'s ``weight_decay=c`` adds; ``lp(c, p)`` is ``c/p sum |w|^p`` so that ``lp(c, 2) == l2(c)``
and ``lp(c, 1) == l1(c)``; subgradients at kinks are 0 (``sign(0) = 0``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

import functools

from funcreg._src.describe import call_text, fmt
from funcreg._src.errors import LeafTypeError, SelectionError
from funcreg._src.selection import MaskLike, resolve_mask
from funcreg._src.tree import PyTree, TreeSpec, broadcast_prefix, check_same_spec, flatten, leaf_names, unflatten
from funcreg._src.validation import check_number, is_traced

Coefficient = Union[float, torch.Tensor, PyTree]


@dataclass
class FlatParams:
    """A parameter tree flattened once and shared by every term of a penalty."""

    tree: PyTree
    leaves: list[Any]
    spec: TreeSpec
    names: list[str]

    @classmethod
    def of(cls, tree: PyTree) -> FlatParams:
        leaves, spec = flatten(tree)
        return cls(tree, leaves, spec, leaf_names(tree))


def _records_call(factory: Callable[..., Penalty]) -> Callable[..., Penalty]:
    """Makes ``repr`` of the penalty a factory returns the call that built it."""

    @functools.wraps(factory)
    def build(*args: Any, **kwargs: Any) -> Penalty:
        out = factory(*args, **kwargs)
        out.config = call_text(factory.__name__, *args, **kwargs)
        return out

    return build


def _is_scalar(x: Any) -> bool:
    return isinstance(x, torch.Tensor) or (isinstance(x, (int, float)) and not isinstance(x, bool))


def _check_coefficient(name: str, coeff: Coefficient) -> None:
    if _is_scalar(coeff):
        check_number(name, coeff, low=0.0)
        return
    leaves, _ = flatten(coeff)
    if not leaves:
        raise ValueError(f"Invalid {name} value: {coeff!r} (an empty tree)")
    for leaf in leaves:
        if leaf is not None:
            check_number(name, leaf, low=0.0)


class Penalty:
    """Base class of all penalties. Build them with the factories (``fr.l2``, ``fr.l1``, ...).

    Penalties add (``P1 + P2``) and scale (``3.0 * P``); the terms keep their names.
    """

    name: str

    # -- the flat interface every penalty implements -------------------------------------------
    def _terms_flat(self, fp: FlatParams) -> list[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def _grad_flat(self, fp: FlatParams) -> list[Optional[torch.Tensor]]:
        """Gradient per leaf; ``None`` where the penalty does not touch the leaf."""
        raise NotImplementedError

    def _prox_flat(self, fp: FlatParams, step: Any) -> list[Optional[torch.Tensor]]:
        """Prox per leaf; ``None`` where the leaf is left as it is."""
        raise NotImplementedError(f"penalty {self.name!r} has no closed-form proximal map")

    def _selected_flat(self, fp: FlatParams) -> list[bool]:
        raise NotImplementedError

    @property
    def has_prox(self) -> bool:
        """Whether :meth:`prox` has a closed form for this penalty."""
        return False

    @property
    def has_grad(self) -> bool:
        """Whether the penalty is differentiable (constraints such as ``max_norm`` are not)."""
        return True

    # -- the public interface ------------------------------------------------------------------
    def __call__(self, params: PyTree) -> torch.Tensor:
        """The penalty's value at ``params``: a 0-d tensor, differentiable by autograd and torch.func."""
        terms = self._terms_flat(FlatParams.of(params))
        total = terms[0][1]
        for _, v in terms[1:]:
            total = total + v
        return total

    def terms(self, params: PyTree) -> dict[str, torch.Tensor]:
        """The value of each named term at ``params``; they add up to ``P(params)``."""
        return dict(self._terms_flat(FlatParams.of(params)))

    def grad(self, params: PyTree) -> PyTree:
        """The gradient tree of the penalty (zeros for parameters it does not select).

        Closed form where known; equal to ``torch.func.grad(P)(params)`` away from kinks, and the
        documented subgradient (0 at ``w = 0`` for L1 terms) at them.
        """
        fp = FlatParams.of(params)
        grads = self._grad_flat(fp)
        out = [
            None if leaf is None else (torch.zeros_like(leaf) if g is None else g)
            for leaf, g in zip(fp.leaves, grads)
        ]
        return unflatten(out, fp.spec)

    def prox(self, params: PyTree, step: float | torch.Tensor) -> PyTree:
        """The proximal map ``argmin_z 1/2 ||z - params||^2 + step * P(z)``, leaf by leaf.

        Parameters the penalty does not select are returned as they are (the same tensors).
        Raises ``NotImplementedError`` for penalties without a closed form.
        """
        check_number("step", step, low=0.0)
        fp = FlatParams.of(params)
        new = self._prox_flat(fp, step)
        return unflatten([leaf if n is None else n for leaf, n in zip(fp.leaves, new)], fp.spec)

    def selection(self, params: PyTree) -> dict[str, bool]:
        """Which parameters the penalty touches, by name."""
        fp = FlatParams.of(params)
        return dict(zip(fp.names, self._selected_flat(fp)))

    # -- algebra -------------------------------------------------------------------------------
    def __add__(self, other: Penalty) -> Penalty:
        if not isinstance(other, Penalty):
            return NotImplemented
        return SumPenalty([(1.0, self), (1.0, other)])

    def __radd__(self, other: Any) -> Penalty:
        if isinstance(other, (int, float)) and other == 0:  # sum([...]) starts from 0
            return self
        return NotImplemented

    def __mul__(self, factor: float | torch.Tensor) -> Penalty:
        if not _is_scalar(factor):
            return NotImplemented
        check_number("penalty scale factor", factor, low=0.0)
        return SumPenalty([(factor, self)])

    __rmul__ = __mul__

    config: Optional[str] = None

    def __repr__(self) -> str:
        """The factory call that built the penalty, e.g. ``l1(0.001, mask=by_name('*.weight'))``."""
        return self.config if self.config is not None else f"<penalty {self.name}>"

    def describe(self, params: PyTree) -> str:
        """The configuration with what it selects in ``params``: ``l1(0.001) on 2 tensors``.

        Examples:
            >>> import torch, funcreg as fr
            >>> P = fr.l1(0.001, mask={"w": True, "b": False}) + fr.l2(0.01)
            >>> P.describe({"w": torch.ones(2, 2), "b": torch.ones(2)})
            "l1(0.001, mask={'w': True, 'b': False}) on 1 tensor + l2(0.01) on 2 tensors"
        """
        n = sum(self.selection(params).values())
        return f"{self!r} on {n} tensor{'s' if n != 1 else ''}"


def _like(coeff: Any, w: torch.Tensor) -> Any:
    """A tensor coefficient in the leaf's dtype and device, so a float64 coefficient keeps a float32
    parameter's gradient and prox float32 (0-d tensors would otherwise promote 0-d leaves)."""
    if isinstance(coeff, torch.Tensor):
        # a complex parameter's coefficient is real (its dtype's real counterpart)
        dtype = w.real.dtype if w.is_complex() else w.dtype
        return coeff.to(dtype=dtype, device=w.device)
    if isinstance(coeff, _Pair):
        return _Pair(_like(coeff.first, w), _like(coeff.second, w))
    return coeff


def _selection(
    name: str, mask: Optional[MaskLike], fp: FlatParams, default: Optional[Callable[[torch.Tensor], bool]] = None
) -> list[bool]:
    """Which leaves a penalty touches: its mask, or ``default`` (all tensors when ``None``); never none."""
    if mask is None:
        keep = [leaf is not None and (default is None or default(leaf)) for leaf in fp.leaves]
    else:
        resolved = resolve_mask(mask, fp.tree, what=f"{name} mask")
        keep = [k and leaf is not None for k, leaf in zip(resolved, fp.leaves)]
    if not any(keep):
        raise SelectionError(f"penalty {name!r} selects no parameter")
    return keep


class LeafPenalty(Penalty):
    """A penalty that is a sum over selected leaves of ``value(w, c, **aux)``.

    ``grad`` and ``prox`` are per-leaf closed forms (``prox(v, t, **aux)`` with ``t = step * c``
    folded in by the caller via ``c``); missing ones fall back to autodiff / ``NotImplementedError``.
    """

    def __init__(
        self,
        name: str,
        coeff: Coefficient,
        mask: Optional[MaskLike],
        value: Callable[..., torch.Tensor],
        grad: Optional[Callable[..., torch.Tensor]] = None,
        prox: Optional[Callable[..., torch.Tensor]] = None,
        aux: Optional[Mapping[str, PyTree]] = None,
        leaf_check: Optional[Callable[[str, torch.Tensor], None]] = None,
        default_select: Optional[Callable[[torch.Tensor], bool]] = None,
        differentiable: bool = True,
        complex_ok: bool = True,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"penalty name must be a non-empty string, got {name!r}")
        self.name = name
        self.coeff = coeff
        self.mask = mask
        self._value = value
        self._grad = grad
        self._prox = prox
        self._aux = dict(aux or {})
        self._leaf_check = leaf_check
        self._default_select = default_select
        self._differentiable = differentiable
        self._complex_ok = complex_ok

    @property
    def has_prox(self) -> bool:
        return self._prox is not None

    @property
    def has_grad(self) -> bool:
        return self._differentiable

    def _selected_flat(self, fp: FlatParams) -> list[bool]:
        keep = _selection(self.name, self.mask, fp, self._default_select)
        for name, leaf, k in zip(fp.names, fp.leaves, keep):
            if not k:
                continue
            if not isinstance(leaf, torch.Tensor) or not (leaf.is_floating_point() or leaf.is_complex()):
                what = type(leaf).__name__ if not isinstance(leaf, torch.Tensor) else f"a {leaf.dtype} tensor"
                raise LeafTypeError(f"penalty {self.name!r}: parameter {name!r} is {what}, expected a floating-point tensor")
            if leaf.is_complex() and not self._complex_ok:
                raise LeafTypeError(
                    f"penalty {self.name!r} is not defined for complex parameters ({name!r} is {leaf.dtype}); "
                    "select real parameters only"
                )
            if self._leaf_check is not None:
                self._leaf_check(name, leaf)
        return keep

    def _coefficients(self, fp: FlatParams) -> list[Any]:
        if _is_scalar(self.coeff) or isinstance(self.coeff, _Pair):
            return [self.coeff] * len(fp.leaves)
        return broadcast_prefix(self.coeff, fp.tree, what=f"{self.name} coefficient")

    def _aux_leaves(self, fp: FlatParams, keep: list[bool]) -> list[dict[str, Any]]:
        per_leaf: list[dict[str, Any]] = [{} for _ in fp.leaves]
        for aux_name, tree in self._aux.items():
            if tree is None:
                continue
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
                per_leaf[i][aux_name] = a
        return per_leaf

    def _prepare(self, fp: FlatParams) -> list[tuple[int, torch.Tensor, Any, dict[str, Any]]]:
        keep = self._selected_flat(fp)
        coeffs = self._coefficients(fp)
        aux = self._aux_leaves(fp, keep)
        return [(i, fp.leaves[i], _like(coeffs[i], fp.leaves[i]), aux[i]) for i in range(len(fp.leaves)) if keep[i]]

    def _terms_flat(self, fp: FlatParams) -> list[tuple[str, torch.Tensor]]:
        items = self._prepare(fp)
        total = None
        for _, w, c, aux in items:
            v = self._value(w, c, **aux)
            total = v if total is None else total + v
        assert total is not None
        return [(self.name, total)]

    def _grad_flat(self, fp: FlatParams) -> list[Optional[torch.Tensor]]:
        if not self._differentiable:
            raise NotImplementedError(
                f"{self.name!r} is a constraint: it has a projection but no gradient; apply it with fr.proximal"
            )
        items = self._prepare(fp)
        out: list[Optional[torch.Tensor]] = [None] * len(fp.leaves)
        for i, w, c, aux in items:
            if self._grad is not None:
                out[i] = self._grad(w, c, **aux)
            else:
                out[i] = torch.func.grad(lambda x, c=c, aux=aux: self._value(x, c, **aux))(w)
        return out

    def _prox_flat(self, fp: FlatParams, step: Any) -> list[Optional[torch.Tensor]]:
        if self._prox is None:
            raise NotImplementedError(f"penalty {self.name!r} has no closed-form proximal map")
        items = self._prepare(fp)
        out: list[Optional[torch.Tensor]] = [None] * len(fp.leaves)
        for i, w, c, aux in items:
            out[i] = self._prox(w, step * c, **aux)
        return out


class SumPenalty(Penalty):
    """``sum_k scale_k * P_k``. Its prox is the terms' proxes when they select disjoint parameters."""

    def __init__(self, parts: Sequence[tuple[Any, Penalty]]) -> None:
        flat_parts: list[tuple[Any, Penalty]] = []
        for scale, p in parts:
            if isinstance(p, SumPenalty):
                flat_parts.extend((scale * s, q) for s, q in p.parts)
            else:
                flat_parts.append((scale, p))
        self.parts = flat_parts
        names: list[str] = []
        for _, p in flat_parts:
            base, n = p.name, 2
            name = base
            while name in names:
                name, n = f"{base}_{n}", n + 1
            names.append(name)
        self._names = names
        self.name = " + ".join(names) if len(names) > 1 else names[0]

    @staticmethod
    def _is_one(scale: Any) -> bool:
        return not isinstance(scale, torch.Tensor) and scale == 1

    def _scaled(self, scale: Any, text: str) -> str:
        return text if self._is_one(scale) else f"{fmt(scale)} * {text}"

    def __repr__(self) -> str:
        return " + ".join(self._scaled(scale, repr(p)) for scale, p in self.parts)

    def describe(self, params: PyTree) -> str:
        return " + ".join(self._scaled(scale, p.describe(params)) for scale, p in self.parts)

    @property
    def has_prox(self) -> bool:
        return all(p.has_prox for _, p in self.parts)

    @property
    def has_grad(self) -> bool:
        return all(p.has_grad for _, p in self.parts)

    def _selected_flat(self, fp: FlatParams) -> list[bool]:
        sel = [p._selected_flat(fp) for _, p in self.parts]
        return [any(col) for col in zip(*sel)]

    def _terms_flat(self, fp: FlatParams) -> list[tuple[str, torch.Tensor]]:
        out = []
        for name, (scale, p) in zip(self._names, self.parts):
            (_, v), *rest = p._terms_flat(fp)
            for _, r in rest:
                v = v + r
            out.append((name, v if self._is_one(scale) else scale * v))
        return out

    def _grad_flat(self, fp: FlatParams) -> list[Optional[torch.Tensor]]:
        total: list[Optional[torch.Tensor]] = [None] * len(fp.leaves)
        for scale, p in self.parts:
            for i, g in enumerate(p._grad_flat(fp)):
                if g is None:
                    continue
                g = g if self._is_one(scale) else scale * g
                total[i] = g if total[i] is None else total[i] + g
        return total

    def _prox_flat(self, fp: FlatParams, step: Any) -> list[Optional[torch.Tensor]]:
        missing = [p.name for _, p in self.parts if not p.has_prox]
        if missing:
            raise NotImplementedError(f"penalty {missing[0]!r} has no closed-form proximal map")
        owner: list[Optional[str]] = [None] * len(fp.leaves)
        out: list[Optional[torch.Tensor]] = [None] * len(fp.leaves)
        for name, (scale, p) in zip(self._names, self.parts):
            for i, k in enumerate(p._selected_flat(fp)):
                if k and owner[i] is not None:
                    raise NotImplementedError(
                        f"the prox of a sum is only known when the terms select different parameters; "
                        f"{owner[i]!r} and {name!r} both select {fp.names[i]!r} (use fr.elastic_net for L1+L2)"
                    )
                if k:
                    owner[i] = name
            for i, n in enumerate(p._prox_flat(fp, step if self._is_one(scale) else step * scale)):
                if n is not None:
                    out[i] = n
        return out


# -- leaf formulas ------------------------------------------------------------------------------


def _soft_threshold(v: torch.Tensor, t: Any) -> torch.Tensor:
    """``sgn(v) * max(|v| - t, 0)``: for complex ``v`` this shrinks the modulus (``sgn = v / |v|``)."""
    return torch.sgn(v) * torch.clamp(torch.abs(v) - t, min=0)


def _abs2(w: torch.Tensor) -> torch.Tensor:
    """``|w|^2`` elementwise: ``w * w`` for real tensors, ``re^2 + im^2`` for complex ones (``w * w``
    of ``1j`` is ``-1``)."""
    if w.is_complex():
        return torch.real(w) ** 2 + torch.imag(w) ** 2
    return w * w


@_records_call
def l2(coeff: Coefficient, mask: Optional[MaskLike] = None, name: str = "l2") -> Penalty:
    """Squared L2: ``coeff/2 * sum ||w||^2``; gradient ``coeff * w``; prox ``v / (1 + step*coeff)``.

    The 1/2 makes ``coeff`` mean what torch's ``weight_decay=coeff`` means: adding this to the loss
    gives the same gradient as ``torch.optim.SGD(weight_decay=coeff)``. Keras' ``L2(l2)`` has no 1/2:
    Keras ``l2`` is ``coeff / 2``. Not ``torch.norm(w)``, whose gradient is ``w / ||w||``.

    Args:
        coeff: ``>= 0``: a float, a 0-d tensor (vmap over it for sweeps), or a tree of per-leaf values.
        mask: which parameters to penalize (default: all).
        name: the term's name in ``terms`` and metrics.

    Examples:
        >>> import torch, funcreg as fr
        >>> P = fr.l2(0.1)
        >>> P({"w": torch.tensor([3.0, 4.0])})  # 0.1/2 * 25
        tensor(1.2500)
        >>> P.grad({"w": torch.tensor([3.0, 4.0])})["w"]
        tensor([0.3000, 0.4000])
    """
    _check_coefficient("coeff", coeff)
    return LeafPenalty(
        name,
        coeff,
        mask,
        value=lambda w, c: 0.5 * c * torch.sum(_abs2(w)),
        grad=lambda w, c: c * w,
        prox=lambda v, t: v / (1 + t),
    )


@_records_call
def l1(coeff: Coefficient, mask: Optional[MaskLike] = None, name: str = "l1") -> Penalty:
    """L1: ``coeff * sum |w|``; subgradient ``coeff * sign(w)`` (0 at 0); prox soft-thresholding.

    The prox ``sign(v) * max(|v| - step*coeff, 0)`` produces exact zeros; the subgradient form
    oscillates around zero and does not.

    Examples:
        >>> import torch, funcreg as fr
        >>> P = fr.l1(0.5)
        >>> P.prox({"w": torch.tensor([-2.0, 0.3, 1.0])}, step=1.0)["w"]
        tensor([-1.5000,  0.0000,  0.5000])
    """
    _check_coefficient("coeff", coeff)
    return LeafPenalty(
        name,
        coeff,
        mask,
        value=lambda w, c: c * torch.sum(torch.abs(w)),
        grad=lambda w, c: c * torch.sgn(w),
        prox=_soft_threshold,
    )


@_records_call
def elastic_net(l1: Coefficient, l2: Coefficient, mask: Optional[MaskLike] = None, name: str = "elastic_net") -> Penalty:
    """Elastic net: ``l1 * sum |w| + l2/2 * sum ||w||^2``; prox ``softthreshold(v, s*l1) / (1 + s*l2)``.

    Examples:
        >>> import torch, funcreg as fr
        >>> P = fr.elastic_net(l1=0.5, l2=1.0)
        >>> P.prox({"w": torch.tensor([-2.0, 0.3, 1.5])}, step=1.0)["w"]
        tensor([-0.7500,  0.0000,  0.5000])
    """
    _check_coefficient("l1", l1)
    _check_coefficient("l2", l2)
    coeffs = _pair_coefficients(l1, l2)
    return LeafPenalty(
        name,
        coeffs,
        mask,
        value=lambda w, c: c.first * torch.sum(torch.abs(w)) + 0.5 * c.second * torch.sum(_abs2(w)),
        grad=lambda w, c: c.first * torch.sgn(w) + c.second * w,
        prox=lambda v, t: _soft_threshold(v, t.first) / (1 + t.second),
    )


class _Pair:
    """Two coefficients carried together through ``step * c`` (scales both)."""

    def __repr__(self) -> str:
        return f"({fmt(self.first)}, {fmt(self.second)})"

    __slots__ = ("first", "second")

    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second

    def __rmul__(self, s: Any) -> _Pair:
        return _Pair(s * self.first, s * self.second)

    __mul__ = __rmul__


def _pair_coefficients(a: Coefficient, b: Coefficient) -> Any:
    if _is_scalar(a) and _is_scalar(b):
        return _Pair(a, b)
    raise TypeError("elastic_net takes scalar (float or tensor) coefficients; use l1(...) + l2(...) for per-leaf trees")


@_records_call
def lp(coeff: Coefficient, p: float, mask: Optional[MaskLike] = None, name: Optional[str] = None) -> Penalty:
    """``coeff/p * sum |w|^p`` for ``p >= 1``; gradient ``coeff * |w|^(p-1) * sign(w)``.

    With this scaling ``lp(c, 2)`` equals ``l2(c)`` and ``lp(c, 1)`` equals ``l1(c)`` (and has their
    proxes); other ``p`` have no closed-form prox. To write the common ``wd * sum |w|^p``, use
    ``lp(p * wd, p)``.

    Examples:
        >>> import torch, funcreg as fr
        >>> P = fr.lp(0.3, p=3)
        >>> P({"w": torch.tensor([-1.0, 2.0])})  # 0.3/3 * (1 + 8)
        tensor(0.9000)
    """
    _check_coefficient("coeff", coeff)
    check_number("p", p, low=1.0, allow_tensor=False)
    name = name or f"l{p:g}"
    if p == 1:
        return l1(coeff, mask, name)
    if p == 2:
        return l2(coeff, mask, name)
    return LeafPenalty(
        name,
        coeff,
        mask,
        value=lambda w, c: (c / p) * torch.sum(torch.abs(w) ** p),
        grad=lambda w, c: c * torch.abs(w) ** (p - 1) * torch.sgn(w),
    )


def _group_dims(name: str, w: torch.Tensor, axis: int) -> tuple[int, ...]:
    if w.ndim == 0 or not -w.ndim <= axis < w.ndim:
        raise ValueError(f"Invalid axis value: {axis} for parameter {name!r} of shape {tuple(w.shape)}")
    a = axis % w.ndim
    return tuple(d for d in range(w.ndim) if d != a)


def _group_norms(w: torch.Tensor, axis: int) -> torch.Tensor:
    """The 2-norm of each slice along ``axis``, scaled so that it neither overflows nor underflows.

    ``||w_g|| = m * ||w_g / m||`` with ``m = max |w_g|``: in float32 the squares of ``4e19`` overflow and
    those of ``5e-24`` underflow to 0, where the scaled norm is exact to rounding.
    """
    dims = tuple(d for d in range(w.ndim) if d != axis % w.ndim)
    if not dims:
        return torch.abs(w)
    scale = torch.amax(torch.abs(w), dim=dims, keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return safe * torch.linalg.vector_norm(w / safe, dim=dims, keepdim=True)


@_records_call
def group_lasso(coeff: Coefficient, axis: int = 0, mask: Optional[MaskLike] = None, name: str = "group_lasso") -> Penalty:
    """Group lasso: ``coeff * sum_g sqrt(|g|) * ||w_g||_2`` over the slices of each tensor along ``axis``.

    ``axis=0`` makes each output unit a group (rows of a ``Linear`` weight, filters of a ``Conv``
    kernel), ``axis=1`` each input (columns). ``|g|`` is the number of elements in a group. The prox
    ``w_g * max(0, 1 - step*coeff*sqrt(|g|) / ||w_g||)`` zeroes whole groups; the gradient is 0 for a
    zero group. By default only tensors with ``ndim >= 2`` are selected; a selected tensor without
    ``axis`` raises ``ValueError``.

    Examples:
        >>> import torch, funcreg as fr
        >>> w = torch.tensor([[3.0, 4.0], [0.06, 0.08]])
        >>> # row norms 5 and 0.1, threshold 0.1 * sqrt(2): the first row shrinks by 1 - 0.1414/5, the second is zeroed
        >>> fr.group_lasso(0.1, axis=0).prox({"w": w}, step=1.0)["w"]
        tensor([[2.9151, 3.8869],
                [0.0000, 0.0000]])
    """
    _check_coefficient("coeff", coeff)
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"Invalid axis value: {axis!r} (expected an int)")

    def check(name_: str, w: torch.Tensor) -> None:
        _group_dims(name_, w, axis)

    def weight(w: torch.Tensor) -> float:
        return math.sqrt(w.numel() // w.shape[axis]) if w.ndim else 1.0

    def value(w: torch.Tensor, c: Any) -> torch.Tensor:
        return c * weight(w) * torch.sum(_group_norms(w, axis))

    def grad(w: torch.Tensor, c: Any) -> torch.Tensor:
        norms = _group_norms(w, axis)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        return torch.where(norms > 0, c * weight(w) * w / safe, torch.zeros_like(w))

    def prox(v: torch.Tensor, t: Any) -> torch.Tensor:
        norms = _group_norms(v, axis)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        # a group whose norm underflows to 0 is within any threshold: it goes to exact zero
        factor = torch.where(norms > 0, torch.clamp(1 - t * weight(v) / safe, min=0), torch.zeros_like(norms))
        return v * factor

    return LeafPenalty(name, coeff, mask, value, grad, prox, leaf_check=check, default_select=lambda w: w.ndim >= 2)


@_records_call
def anchor(
    coeff: Coefficient,
    reference: PyTree,
    precision: Optional[PyTree] = None,
    mask: Optional[MaskLike] = None,
    name: str = "anchor",
) -> Penalty:
    """Decay toward reference weights: ``coeff/2 * sum precision * (w - ref)^2``.

    With ``reference`` the pre-trained (or initial) weights this is L2-SP; with a diagonal Fisher
    information tree as ``precision`` it is EWC. Gradient ``coeff * precision * (w - ref)``; prox
    ``(v + t*F*ref) / (1 + t*F)`` with ``t = step * coeff``. ``reference`` and ``precision`` must have the
    structure and shapes of the parameters (``ValueError`` naming the key otherwise).

    Examples:
        >>> import torch, funcreg as fr
        >>> ref = {"w": torch.tensor([1.0, 1.0])}
        >>> fr.anchor(2.0, ref)({"w": torch.tensor([1.0, 3.0])})  # 2/2 * 4
        tensor(4.)
    """
    _check_coefficient("coeff", coeff)
    if reference is None:
        raise TypeError("anchor needs a reference tree")
    # the penalty owns copies: a reference taken from fr.params_of(model) shares storage with the
    # module, and training in place would move it with the weights (the penalty would stay 0)
    reference = _owned_tree("reference", reference)
    if precision is not None:
        precision = _owned_tree("precision", precision, non_negative=True)

    def value(w: torch.Tensor, c: Any, reference: torch.Tensor, precision: Any = None) -> torch.Tensor:
        d = w - _same_as(reference, w)
        sq = _abs2(d) if precision is None else _same_as(precision, w) * _abs2(d)
        return 0.5 * c * torch.sum(sq)

    def grad(w: torch.Tensor, c: Any, reference: torch.Tensor, precision: Any = None) -> torch.Tensor:
        d = w - _same_as(reference, w)
        return c * d if precision is None else c * _same_as(precision, w) * d

    def prox(v: torch.Tensor, t: Any, reference: torch.Tensor, precision: Any = None) -> torch.Tensor:
        tf = t if precision is None else t * _same_as(precision, v)
        return (v + tf * _same_as(reference, v)) / (1 + tf)

    aux = {"reference": reference}
    if precision is not None:
        aux["precision"] = precision
    return LeafPenalty(name, coeff, mask, value, grad, prox, aux=aux)


def _same_as(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x`` in ``w``'s dtype and device: a float64 reference must not promote a float32 parameter."""
    return x if x.dtype == w.dtype and x.device == w.device else x.to(dtype=w.dtype, device=w.device)


def _owned_tree(argument: str, tree: PyTree, non_negative: bool = False) -> PyTree:
    """A detached copy of ``tree`` (tensors or ``None``), every entry finite (and ``>= 0``)."""
    leaves, spec = flatten(tree)
    names = leaf_names(tree)
    out = []
    for name, leaf in zip(names, leaves):
        if leaf is None:
            out.append(None)
            continue
        if not isinstance(leaf, torch.Tensor) or not (leaf.is_floating_point() or leaf.is_complex()):
            what = type(leaf).__name__ if not isinstance(leaf, torch.Tensor) else f"a {leaf.dtype} tensor"
            raise LeafTypeError(f"Invalid {argument} value for {name!r}: {what} (expected a floating-point tensor)")
        if not is_traced(leaf):
            bad = ~torch.isfinite(leaf)
            if non_negative:
                bad = bad | (leaf < 0)
            if bool(bad.any()):
                rule = "finite and >= 0" if non_negative else "finite"
                raise ValueError(f"Invalid {argument} value for {name!r}: every entry must be {rule}")
        out.append(leaf.detach().clone())
    return unflatten(out, spec)


def _as_matrix(w: torch.Tensor) -> torch.Tensor:
    m = w.reshape(w.shape[0], -1)
    return m.T if m.shape[0] < m.shape[1] else m


@_records_call
def orthogonal(coeff: Coefficient, mask: Optional[MaskLike] = None, name: str = "orthogonal") -> Penalty:
    """Soft orthogonality: ``coeff * ||W^T W - I||_F^2`` for each selected matrix.

    A tensor of shape ``(out, ...)`` is reshaped to ``(out, rest)`` (conv kernels: one row per
    filter) and oriented so that ``W`` has at least as many rows as columns, so ``W^T W`` is the
    smaller Gram matrix (the one that can equal the identity). Gradient ``4 W (W^T W - I)``. By default
    only tensors with ``ndim >= 2`` are selected; selecting a 1-D tensor raises ``ValueError``. No prox.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.orthogonal(1.0)({"w": torch.eye(3)})
        tensor(0.)
    """
    _check_coefficient("coeff", coeff)

    def check(name_: str, w: torch.Tensor) -> None:
        if w.ndim < 2:
            raise ValueError(f"orthogonal needs matrices; parameter {name_!r} has shape {tuple(w.shape)}")

    def value(w: torch.Tensor, c: Any) -> torch.Tensor:
        m = _as_matrix(w)
        gram = m.T @ m - torch.eye(m.shape[1], dtype=m.dtype, device=m.device)
        return c * torch.sum(gram * gram)

    def grad(w: torch.Tensor, c: Any) -> torch.Tensor:
        m = w.reshape(w.shape[0], -1)
        if m.shape[0] < m.shape[1]:
            gram = m @ m.T - torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
            g = 4 * c * (gram @ m)
        else:
            gram = m.T @ m - torch.eye(m.shape[1], dtype=m.dtype, device=m.device)
            g = 4 * c * (m @ gram)
        return g.reshape(w.shape)

    return LeafPenalty(
        name, coeff, mask, value, grad, leaf_check=check, default_select=lambda w: w.ndim >= 2, complex_ok=False
    )


def _indicator(violated: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.where(violated, torch.tensor(math.inf, dtype=like.dtype, device=like.device), torch.zeros((), dtype=like.dtype, device=like.device))


@_records_call
def max_norm(max_value: float, axis: int = 0, mask: Optional[MaskLike] = None, name: str = "max_norm") -> Penalty:
    """Constraint ``||w_g||_2 <= max_value`` for each slice ``g`` along ``axis`` (a projection only).

    Its value is 0 where the constraint holds and ``inf`` where it does not (the indicator function);
    it has no gradient, so use it with :func:`funcreg.proximal`, whose step projects each group:
    ``w_g * min(1, max_value / ||w_g||)``. ``axis`` as in :func:`group_lasso`.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.max_norm(1.0).prox({"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}, step=0.1)["w"]
        tensor([[0.6000, 0.8000],
                [0.3000, 0.4000]])
    """
    check_number("max_value", max_value, low=0.0, low_open=True)
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"Invalid axis value: {axis!r} (expected an int)")

    def check(name_: str, w: torch.Tensor) -> None:
        _group_dims(name_, w, axis)

    def value(w: torch.Tensor, c: Any) -> torch.Tensor:
        # feasible up to the rounding of the projection itself, in the parameter's precision
        slack = 16 * torch.finfo(w.dtype).eps
        return _indicator((_group_norms(w, axis) > max_value * (1 + slack)).any(), w)

    def prox(v: torch.Tensor, t: Any) -> torch.Tensor:
        del t  # a projection does not depend on the step
        norms = _group_norms(v, axis)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        return v * torch.where(norms > 0, torch.clamp(max_value / safe, max=1.0), torch.ones_like(norms))

    return LeafPenalty(
        name, 1.0, mask, value, None, prox, leaf_check=check, default_select=lambda w: w.ndim >= 2, differentiable=False
    )


@_records_call
def non_negative(mask: Optional[MaskLike] = None, name: str = "non_negative") -> Penalty:
    """Constraint ``w >= 0`` (a projection only): value 0 or ``inf``; prox ``max(v, 0)``.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.non_negative().prox({"w": torch.tensor([-1.0, 2.0])}, step=1.0)["w"]
        tensor([0., 2.])
    """

    def value(w: torch.Tensor, c: Any) -> torch.Tensor:
        return _indicator((w < 0).any(), w)

    def prox(v: torch.Tensor, t: Any) -> torch.Tensor:
        del t
        return torch.clamp(v, min=0)

    return LeafPenalty(name, 1.0, mask, value, None, prox, differentiable=False, complex_ok=False)


class CustomPenalty(Penalty):
    """A penalty from a user's value function; see :func:`penalty`."""

    def __init__(
        self,
        fn: Callable[[PyTree], torch.Tensor],
        name: str,
        grad: Optional[Callable[[PyTree], PyTree]],
        prox: Optional[Callable[[PyTree, Any], PyTree]],
        mask: Optional[MaskLike],
    ) -> None:
        self.fn = fn
        self.name = name
        self._grad = grad
        self._prox = prox
        self.mask = mask

    @property
    def has_prox(self) -> bool:
        return self._prox is not None

    def _selected_flat(self, fp: FlatParams) -> list[bool]:
        return _selection(self.name, self.mask, fp)

    def _view(self, fp: FlatParams, leaves: list[Any], keep: list[bool]) -> PyTree:
        """The selected tree handed to the user's functions."""
        if self.mask is None:
            return unflatten(leaves, fp.spec)
        if isinstance(fp.tree, dict) and all(not isinstance(v, (dict, list, tuple)) for v in fp.tree.values()):
            return {n: x for n, x, k in zip(fp.names, leaves, keep) if k}
        return unflatten([x if k else None for x, k in zip(leaves, keep)], fp.spec)

    def _unview(self, fp: FlatParams, tree: PyTree, keep: list[bool], what: str) -> list[Optional[torch.Tensor]]:
        if self.mask is not None and isinstance(tree, dict) and isinstance(fp.tree, dict) and set(tree) != set(fp.tree):
            expected = [n for n, k in zip(fp.names, keep) if k]
            if sorted(tree) != sorted(expected):
                raise ValueError(f"{self.name} {what} returned keys {sorted(tree)}, expected {expected}")
            return [tree[n] if k else None for n, k in zip(fp.names, keep)]
        leaves, spec = flatten(tree)
        check_same_spec(flatten(self._view(fp, fp.leaves, keep))[1], spec, "params", f"{self.name} {what}")
        return [x if k else None for x, k in zip(leaves, keep)]

    def _terms_flat(self, fp: FlatParams) -> list[tuple[str, torch.Tensor]]:
        keep = self._selected_flat(fp)
        value = self.fn(self._view(fp, fp.leaves, keep))
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            raise TypeError(f"penalty {self.name!r} must return a 0-d tensor, got {value!r}")
        return [(self.name, value)]

    def _grad_flat(self, fp: FlatParams) -> list[Optional[torch.Tensor]]:
        keep = self._selected_flat(fp)
        if self._grad is not None:
            return self._unview(fp, self._grad(self._view(fp, fp.leaves, keep)), keep, "grad")
        idx = [i for i, k in enumerate(keep) if k]

        def value_of(selected: list[torch.Tensor]) -> torch.Tensor:
            leaves = list(fp.leaves)
            for i, x in zip(idx, selected):
                leaves[i] = x
            return self.fn(self._view(fp, leaves, keep))

        grads = torch.func.grad(value_of)([fp.leaves[i] for i in idx])
        out: list[Optional[torch.Tensor]] = [None] * len(fp.leaves)
        for i, g in zip(idx, grads):
            out[i] = g
        return out

    def _prox_flat(self, fp: FlatParams, step: Any) -> list[Optional[torch.Tensor]]:
        if self._prox is None:
            raise NotImplementedError(f"penalty {self.name!r} has no closed-form proximal map (pass prox=...)")
        keep = self._selected_flat(fp)
        return self._unview(fp, self._prox(self._view(fp, fp.leaves, keep), step), keep, "prox")


@_records_call
def penalty(
    fn: Callable[[PyTree], torch.Tensor],
    name: str = "penalty",
    grad: Optional[Callable[[PyTree], PyTree]] = None,
    prox: Optional[Callable[[PyTree, Any], PyTree]] = None,
    mask: Optional[MaskLike] = None,
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
