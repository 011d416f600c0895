"""The penalty protocol: what every penalty implements, and the sum of penalties.

A penalty works on a parameter tree flattened once (:class:`FlatParams`) and answers five questions
about it, each per leaf, in flattening order:

=======================  ==========================================================================
``selected_flat(fp)``    which leaves it touches (``SelectionError`` when none)
``terms_flat(fp)``       the value of each named term, ``[(name, 0-d tensor), ...]``
``grad_flat(fp)``        its gradient, ``None`` for leaves it does not touch
``why_no_prox(fp)``      ``None`` when a closed-form prox exists for these parameters, else the reason
``prox_flat(fp, step)``  ``argmin_z 1/2 ||z - v||^2 + step * P(z)``, ``None`` for untouched leaves
=======================  ==========================================================================

plus ``has_grad`` (a constraint has none). The forms (:mod:`funcreg._src.forms.forms`), the training step
and :mod:`funcreg.testing` use only this surface; a user's own penalty class implements it (see
``docs/architecture.md``). The tree-level methods (``P(params)``, ``P.grad``, ``P.prox``, ``P.terms``,
``P.selection``) and the algebra (``P1 + P2``, ``3.0 * P``) are built on it here, once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union, cast

import torch

from funcreg._src.core.describe import call_text, fmt
from funcreg._src.core.errors import SelectionError
from funcreg._src.core.tree import TreeSpec, compiling, flatten, tree_names, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import check_number
from funcreg._src.selection.mask_cache import CachedMask
from funcreg._src.selection.resolve import MaskLike, resolve_mask

Coefficient = Union[float, torch.Tensor, PyTree]


@dataclass
class FlatParams:
    """A parameter tree flattened once and shared by every term of a penalty.

    ``leaves`` and ``names`` are in flattening order; ``tree`` is the tree itself (masks and
    per-leaf coefficients are matched against it by key).

    Examples:
        >>> import torch, funcreg as fr
        >>> fp = fr.FlatParams.of({"w": torch.ones(2), "b": torch.zeros(1)})
        >>> fp.names
        ['w', 'b']
    """

    tree: PyTree
    leaves: list[Any]
    spec: TreeSpec
    names: list[str]

    @classmethod
    def of(cls, tree: PyTree) -> FlatParams:
        """Flattens ``tree`` (``None`` leaves kept in place)."""
        leaves, spec = flatten(tree)
        return cls(tree, leaves, spec, tree_names(tree))

    def with_leaves(self, leaves: list[Any]) -> FlatParams:
        """The same tree structure and names with other leaves (e.g. the moved point of a prox step)."""
        return FlatParams(unflatten(leaves, self.spec), list(leaves), self.spec, self.names)


def records_call(factory: Callable[..., Penalty]) -> Callable[..., Penalty]:
    """Makes ``repr`` of the penalty a factory returns the call that built it."""

    @functools.wraps(factory)
    def build(*args: Any, **kwargs: Any) -> Penalty:
        out = factory(*args, **kwargs)
        if not compiling():  # see funcreg._src.core.describe.configured
            out.config = call_text(factory.__name__, *args, **kwargs)
            out.recipe = (build, args, kwargs)  # pickles as the call that built it (its rules hold lambdas)
        return out

    return build


def _call(factory: Callable[..., Penalty], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Penalty:
    return factory(*args, **kwargs)


def is_scalar(x: Any) -> bool:
    """A Python number or a tensor (a coefficient that is not a per-leaf tree)."""
    return isinstance(x, torch.Tensor) or (isinstance(x, (int, float)) and not isinstance(x, bool))


def check_coefficient(name: str, coeff: Coefficient) -> None:
    """A coefficient: a number or 0-d tensor ``>= 0``, or a tree of them (one per leaf).

    ``None``, alone or as a leaf of the tree, is refused (``TypeError`` naming the key): a penalty
    built with it would fail only when first applied, far from the call that built it. A parameter
    the penalty is not to touch is left out with ``mask=``, or given the coefficient 0.

    Examples:
        >>> import funcreg as fr
        >>> try:
        ...     fr.l2({"w": 0.1, "b": None})
        ... except TypeError as err:
        ...     print(err)
        Invalid coeff value at 'b': None (expected a number >= 0 or a 0-d tensor; leave a parameter out with mask=, or give it 0)
    """
    if coeff is None:
        raise TypeError(
            f"Invalid {name} value: None (expected a number >= 0, a 0-d tensor or a tree of them)"
        )
    if is_scalar(coeff):
        check_number(name, coeff, low=0.0)
        return
    leaves, _ = flatten(coeff)
    if not leaves:
        raise ValueError(f"Invalid {name} value: {coeff!r} (an empty tree)")
    for key, leaf in zip(tree_names(coeff), leaves):
        if leaf is None:
            raise TypeError(
                f"Invalid {name} value at {key!r}: None (expected a number >= 0 or a 0-d tensor; leave a "
                "parameter out with mask=, or give it 0)"
            )
        check_number(name, leaf, low=0.0)


def selection(
    name: str, mask: MaskLike | None, fp: FlatParams, default: Callable[[torch.Tensor], bool] | None = None
) -> list[bool]:
    """Which leaves a penalty touches: its mask, or ``default`` (all tensors when ``None``).

    ``None`` leaves are parameters absent from this call (another param group's, in
    :class:`funcreg.TorchOptimizer`): a mask that selects only them selects nothing here, which is
    fine. A mask that selects no name of the tree, or a default rule that no present tensor passes
    when no parameter is absent, raises :class:`SelectionError`.
    """
    if mask is None:
        keep = [leaf is not None and (default is None or default(leaf)) for leaf in fp.leaves]
        matched = any(keep) or any(leaf is None for leaf in fp.leaves)
    else:
        resolved = (
            mask(fp.tree) if isinstance(mask, CachedMask) else resolve_mask(mask, fp.tree, f"{name} mask")
        )
        keep = [k and leaf is not None for k, leaf in zip(resolved, fp.leaves)]
        matched = any(resolved)
    if not matched:
        raise SelectionError(f"penalty {name!r} selects no parameter")
    return keep


def zero_like_present(fp: FlatParams) -> torch.Tensor:
    """The value of a penalty that selects no leaf present in this call: a 0-d zero with the dtype
    and device of the first tensor leaf (float32 on the default device when there is none)."""
    for leaf in fp.leaves:
        if isinstance(leaf, torch.Tensor):
            return torch.zeros((), dtype=leaf.dtype, device=leaf.device)
    return torch.zeros(())


class Penalty:
    """Base class of all penalties; build them with the factories (``fr.l2``, ``fr.l1``, ...).

    A subclass implements the protocol of this module (``selected_flat``, ``terms_flat``,
    ``grad_flat``, and for a prox ``why_no_prox``/``prox_flat``) and gets everything else: the value,
    gradient and prox of a tree, the algebra (``P1 + P2``, ``3.0 * P``; terms keep their names), every
    form (``fr.penalized``, ``fr.add_penalty_grad``, ``fr.decoupled``, ``fr.proximal``) and the checks of
    :mod:`funcreg.testing`.

    Examples:
        >>> import torch, funcreg as fr
        >>> class Quartic(fr.Penalty):
        ...     name = "quartic"
        ...     def selected_flat(self, fp):
        ...         return [leaf is not None for leaf in fp.leaves]
        ...     def terms_flat(self, fp):
        ...         return [(self.name, sum((w ** 4).sum() for w in fp.leaves if w is not None))]
        ...     def grad_flat(self, fp):
        ...         return [None if w is None else 4 * w ** 3 for w in fp.leaves]
        >>> Quartic().grad({"w": torch.tensor([1.0, -2.0])})["w"]
        tensor([  4., -32.])
    """

    name: str = "penalty"
    config: str | None = None
    recipe: tuple[Callable[..., Penalty], tuple[Any, ...], dict[str, Any]] | None = None

    def __reduce__(self) -> Any:
        """Built-in penalties pickle as the factory call that built them (Lightning, multiprocessing
        and ``copy.deepcopy`` pickle optimizer options); others pickle their attributes."""
        if self.recipe is not None:
            factory, args, kwargs = self.recipe
            return (_call, (factory, args, kwargs))
        return super().__reduce__()

    # -- the protocol --------------------------------------------------------------------------
    def selected_flat(self, fp: FlatParams) -> list[bool]:
        """Which leaves the penalty touches (``SelectionError`` when none)."""
        raise NotImplementedError

    def terms_flat(self, fp: FlatParams) -> list[tuple[str, torch.Tensor]]:
        """The value of each named term, as 0-d tensors autograd can differentiate."""
        raise NotImplementedError

    def grad_flat(self, fp: FlatParams) -> list[torch.Tensor | None]:
        """The gradient per leaf; ``None`` where the penalty does not touch the leaf."""
        raise NotImplementedError(f"penalty {self.name!r} has no gradient")

    def why_no_prox(self, fp: FlatParams) -> str | None:
        """``None`` when :meth:`prox_flat` has a closed form for these parameters, else the reason."""
        return f"penalty {self.name!r} has no closed-form proximal map"

    def quadratic_flat(self, fp: FlatParams) -> list[tuple[Any, torch.Tensor | None] | None] | None:
        """``None`` unless the penalty is ``sum curvature/2 * |w - center|^2`` over its leaves; then
        ``(curvature, center)`` per selected leaf (``None`` for the others; a ``None`` center is 0).
        A sum of penalties folds such a term into the prox of another on the same leaf."""
        return None

    def kernel_form(self) -> tuple[Literal["l1", "l2"], float] | None:
        """``("l2", c)`` when the penalty is ``c/2 * |w|^2`` over its selection with one number ``c``,
        ``("l1", c)`` when it is ``c * |w|_1``; else ``None``.

        A donated step folds such a penalty into torch's optimizer kernel: L2 as the kernel's own
        ``weight_decay``, L1 as a soft-threshold written after the step (no gradient buffer, no second
        pass). A penalty that says ``None`` runs the generic path, which equals the pure one.
        """
        return None

    def prox_flat(self, fp: FlatParams, step: Any) -> list[torch.Tensor | None]:
        """The prox per leaf; ``None`` where the leaf is left as it is."""
        raise NotImplementedError(
            self.why_no_prox(fp) or f"penalty {self.name!r} has no closed-form proximal map"
        )

    @property
    def has_prox(self) -> bool:
        """Whether this kind of penalty has a closed-form prox (a sum may still lack one for some
        parameters: see :meth:`why_no_prox`)."""
        return type(self).prox_flat is not Penalty.prox_flat

    @property
    def has_grad(self) -> bool:
        """Whether the penalty is differentiable (constraints such as ``max_norm`` are not)."""
        return True

    # -- tree-level interface ------------------------------------------------------------------
    def __call__(self, params: PyTree) -> torch.Tensor:
        """The penalty's value at ``params``: a 0-d tensor, differentiable by autograd and torch.func."""
        terms = self.terms_flat(FlatParams.of(params))
        total = terms[0][1]
        for _, v in terms[1:]:
            total = total + v
        return total

    def terms(self, params: PyTree) -> dict[str, torch.Tensor]:
        """The value of each named term at ``params``; they add up to ``P(params)``."""
        return dict(self.terms_flat(FlatParams.of(params)))

    def grad(self, params: PyTree) -> PyTree:
        """The gradient tree of the penalty (zeros for parameters it does not select).

        Closed form where known; equal to ``torch.func.grad(P)(params)`` away from kinks, and the
        documented subgradient (0 at ``w = 0`` for L1 terms) at them.
        """
        fp = FlatParams.of(params)
        grads = self.grad_flat(fp)
        out = [
            None if leaf is None else (torch.zeros_like(leaf) if g is None else g)
            for leaf, g in zip(fp.leaves, grads)
        ]
        return unflatten(out, fp.spec)

    def prox(self, params: PyTree, step: float | torch.Tensor) -> PyTree:
        """The proximal map ``argmin_z 1/2 ||z - params||^2 + step * P(z)``, leaf by leaf.

        Parameters the penalty does not select are returned as they are (the same tensors).
        Raises ``NotImplementedError`` (saying why) where no closed form exists.
        """
        check_number("step", step, low=0.0)
        fp = FlatParams.of(params)
        reason = self.why_no_prox(fp)
        if reason is not None:
            raise NotImplementedError(reason)
        new = self.prox_flat(fp, step)
        return unflatten([leaf if n is None else n for leaf, n in zip(fp.leaves, new)], fp.spec)

    def selection(self, params: PyTree) -> dict[str, bool]:
        """Which parameters the penalty touches, by name."""
        fp = FlatParams.of(params)
        return dict(zip(fp.names, self.selected_flat(fp)))

    # -- algebra and printing ------------------------------------------------------------------
    def __add__(self, other: Penalty) -> Penalty:
        if not isinstance(other, Penalty):
            return NotImplemented
        return SumPenalty([(1.0, self), (1.0, other)])

    def __radd__(self, other: Any) -> Penalty:
        if isinstance(other, (int, float)) and other == 0:  # sum([...]) starts from 0
            return self
        return NotImplemented

    def __mul__(self, factor: float | torch.Tensor) -> Penalty:
        if not is_scalar(factor):
            return NotImplemented
        check_number("penalty scale factor", factor, low=0.0)
        return SumPenalty([(factor, self)])

    __rmul__ = __mul__

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


class SumPenalty(Penalty):
    """``sum_k scale_k * P_k``. Its prox exists where at most one term that is not a quadratic
    (:meth:`Penalty.quadratic_flat`) selects each parameter: quadratic terms fold into that term's prox.

    Examples:
        >>> import torch, funcreg as fr
        >>> v = {"w": torch.tensor([3.0, -0.5])}
        >>> # L1 + L2 on one tensor: soft-threshold v / (1 + t c) by t a / (1 + t c), as elastic net
        >>> (fr.l1(1.0) + fr.l2(1.0)).prox(v, step=1.0)["w"]
        tensor([1., -0.])
    """

    def __init__(self, parts: Sequence[tuple[Any, Penalty]]) -> None:
        flat_parts: list[tuple[Any, Penalty]] = []
        for scale, p in parts:
            if isinstance(p, SumPenalty):
                flat_parts.extend((scale * s, q) for s, q in p.parts)
            else:
                flat_parts.append((scale, p))
        self.parts: list[tuple[Any, Penalty]] = flat_parts
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

    def selected_flat(self, fp: FlatParams) -> list[bool]:
        sel = [p.selected_flat(fp) for _, p in self.parts]
        return [any(col) for col in zip(*sel)]

    def terms_flat(self, fp: FlatParams) -> list[tuple[str, torch.Tensor]]:
        out = []
        for name, (scale, p) in zip(self._names, self.parts):
            (_, v), *rest = p.terms_flat(fp)
            for _, r in rest:
                v = v + r
            out.append((name, v if self._is_one(scale) else scale * v))
        return out

    def grad_flat(self, fp: FlatParams) -> list[torch.Tensor | None]:
        total: list[torch.Tensor | None] = [None] * len(fp.leaves)
        for scale, p in self.parts:
            for i, g in enumerate(p.grad_flat(fp)):
                if g is None:
                    continue
                g = g if self._is_one(scale) else scale * g
                total[i] = g if total[i] is None else cast(torch.Tensor, total[i]) + g
        return total

    def _plan(self, fp: FlatParams) -> tuple[list[Any], list[list[int]], str | None]:
        """Per part its quadratic form (or ``None``), per leaf the parts selecting it, and why the
        sum has no closed-form prox (``None`` when it has one)."""
        quads = [p.quadratic_flat(fp) for _, p in self.parts]
        owners: list[list[int]] = [[] for _ in fp.leaves]
        for k, (_, p) in enumerate(self.parts):
            if quads[k] is None:
                reason = p.why_no_prox(fp)
                if reason is not None:
                    return quads, owners, reason
            for i, sel in enumerate(p.selected_flat(fp)):
                if sel:
                    owners[i].append(k)
        for i, ks in enumerate(owners):
            other = [k for k in ks if quads[k] is None]
            if len(other) > 1:
                a, b = (self._names[k] for k in other[:2])
                return (
                    quads,
                    owners,
                    (
                        "the prox of a sum is only known when at most one non-quadratic term selects each "
                        f"parameter; {a!r} and {b!r} both select {fp.names[i]!r} (use fr.elastic_net for L1+L2)"
                    ),
                )
            if other and any(_elementwise(_curvature(quads[k], i)) for k in ks if quads[k] is not None):
                return (
                    quads,
                    owners,
                    (
                        f"the prox of a sum folds a quadratic term into {self._names[other[0]]!r} on "
                        f"{fp.names[i]!r} only with a scalar curvature, not an elementwise precision"
                    ),
                )
        return quads, owners, None

    def why_no_prox(self, fp: FlatParams) -> str | None:
        return self._plan(fp)[2]

    def prox_flat(self, fp: FlatParams, step: Any) -> list[torch.Tensor | None]:
        # Quadratic terms q_k = s_k c_k/2 |w - a_k|^2 fold into the prox of the one other term f:
        # prox_{t(f + sum q_k)}(v) = prox_{t s_f f/(1+T)}((v + t sum s_k c_k a_k)/(1+T)), T = t sum s_k c_k.
        quads, owners, reason = self._plan(fp)
        if reason is not None:
            raise NotImplementedError(reason)
        out: list[torch.Tensor | None] = [None] * len(fp.leaves)
        # the leaves of one other term with the same curvatures share its folded step: one call each
        batches: dict[tuple[Any, ...], tuple[Any, list[Any]]] = {}
        for i, ks in enumerate(owners):
            if not ks:
                continue
            curvature: Any = 0.0
            pull: Any = None
            key: list[Any] = []
            for k in ks:
                q = quads[k]
                if q is None:
                    continue
                c, center = q[i]
                sc = c if self._is_one(self.parts[k][0]) else self.parts[k][0] * c
                curvature = curvature + sc
                if center is not None:
                    pull = sc * center if pull is None else pull + sc * center
                key.append((k, id(c) if isinstance(c, torch.Tensor) else c))
            v = fp.leaves[i]
            if key:
                total = step * curvature
                moved = (v if pull is None else v + step * pull) / (1 + total)
            else:
                total, moved = 0.0, v
            other = [k for k in ks if quads[k] is None]
            if not other:
                out[i] = moved
                continue
            _, leaves = batches.setdefault((other[0], *key), (total, [None] * len(fp.leaves)))
            leaves[i] = moved
        for (k, *_), (total, leaves) in batches.items():
            scale, p = self.parts[k]
            t = (step if self._is_one(scale) else step * scale) / (1 + total)
            for i, z in enumerate(p.prox_flat(fp.with_leaves(leaves), t)):
                if leaves[i] is not None:
                    out[i] = leaves[i] if z is None else z
        return out


def _curvature(quad: Any, i: int) -> Any:
    return quad[i][0]


def _elementwise(curvature: Any) -> bool:
    return isinstance(curvature, torch.Tensor) and curvature.ndim > 0
