"""Elementwise penalties: L2, L1, elastic net, Lp, and decay toward reference weights (L2-SP, EWC).

Conventions (``docs/conventions.md``): ``l2(c)`` is ``c/2 ||w||^2``, whose gradient ``c w`` is what
``torch.optim``'s ``weight_decay=c`` adds; ``lp(c, p)`` is ``c/p sum |w|^p`` so that ``lp(c, 2) == l2(c)``
and ``lp(c, 1) == l1(c)``; subgradients at kinks are 0 (``sgn(0) = 0``). Complex parameters use the
modulus: ``|w|^2`` and ``|w|``.
"""

from __future__ import annotations

from typing import Any

import torch

from funcreg._src.core.dtensor import is_dtensor
from funcreg._src.core.errors import LeafTypeError
from funcreg._src.core.tree import flatten, tree_names, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import check_number, is_traced
from funcreg._src.penalties import proxes
from funcreg._src.penalties.base import Coefficient, Penalty, check_coefficient, records_call
from funcreg._src.penalties.leaf import LeafPenalty, LeafRule
from funcreg._src.selection.resolve import MaskLike


def abs2(w: torch.Tensor) -> torch.Tensor:
    """``|w|^2`` elementwise: ``w * w`` for real tensors, ``re^2 + im^2`` for complex ones (``w * w``
    of ``1j`` is ``-1``)."""
    if w.is_complex():
        return torch.real(w) ** 2 + torch.imag(w) ** 2
    return w * w


_CHUNK = 1 << 18  # elements per partial sum of squares in _sum_of_norms


def _sum_of_norms(ws: list[torch.Tensor], ord: float) -> torch.Tensor:
    """``sum ||w||_2^2`` (``ord=2``) or ``sum ||w||_1`` (``ord=1``) over the tensors.

    torch's norm kernels accumulate a whole tensor in one running sum: in float32 that loses digits
    with size (over 4M elements the sum of squares came out 2e-4 low, the L1 norm 1e-3 low). For
    the squares a contiguous tensor is cut into views of ``_CHUNK`` elements (one foreach launch;
    within 3e-6 at 4M elements); the L1 norm of a large tensor is ``sum(abs(w))``, whose pairwise
    summation is exact to about 1e-7 and which is faster than the ord-1 norm kernel (no vectorized
    path on CPU); small tensors go to the norm kernel in one launch.
    """
    if any(is_dtensor(w) for w in ws):  # sharded: per-shard norms, reduced by the caller
        norms = torch.stack(torch._foreach_norm(ws, ord))
        return torch.sum(norms * norms) if ord == 2 else torch.sum(norms)
    if ord == 1:
        # small tensors in one launch (few terms each: the norm kernel keeps their digits)
        small = [w for w in ws if w.numel() <= _CHUNK]
        sums = list(torch._foreach_norm(small, 1)) if small else []
        sums += [torch.sum(torch.abs(w)) for w in ws if w.numel() > _CHUNK]
        return torch.sum(torch.stack(sums))
    pieces = []
    for w in ws:
        if w.numel() > _CHUNK and w.is_contiguous():
            pieces.extend(w.view(-1).split(_CHUNK))
        else:
            pieces.append(w)
    norms = torch.stack(torch._foreach_norm(pieces, 2))
    return torch.sum(norms * norms)


def _l1_prox_many(vs: list[torch.Tensor], t: float) -> list[torch.Tensor]:
    # softshrink is sign(v) * max(|v| - t, 0) to the bit, in one kernel instead of four
    return (
        [torch.nn.functional.softshrink(v, t) for v in vs]
        if t >= 0
        else [proxes.soft_threshold(v, t) for v in vs]
    )


L2 = LeafRule(
    value=lambda w, c: 0.5 * c * torch.sum(abs2(w)),
    grad=lambda w, c: c * w,
    prox=proxes.shrink,
    quadratic=lambda c: (c, None),
    kernel_kind="l2",
    value_many=lambda ws, c: 0.5 * c * _sum_of_norms(ws, 2),
    grad_many=lambda ws, c: list(torch._foreach_mul(ws, c)),
    prox_many=lambda vs, t: list(torch._foreach_div(vs, 1 + t)),
)
L1 = LeafRule(
    value=lambda w, c: c * torch.sum(torch.abs(w)),
    grad=lambda w, c: c * torch.sgn(w),
    prox=proxes.soft_threshold,
    kernel_kind="l1",
    value_many=lambda ws, c: c * _sum_of_norms(ws, 1),
    grad_many=lambda ws, c: list(torch._foreach_mul(torch._foreach_sign(ws), c)),
    prox_many=_l1_prox_many,
)
ELASTIC_NET = LeafRule(
    value=lambda w, a, b: a * torch.sum(torch.abs(w)) + 0.5 * b * torch.sum(abs2(w)),
    grad=lambda w, a, b: a * torch.sgn(w) + b * w,
    prox=proxes.elastic_net_prox,
    value_many=lambda ws, a, b: a * _sum_of_norms(ws, 1) + 0.5 * b * _sum_of_norms(ws, 2),
    prox_many=lambda vs, t1, t2: list(torch._foreach_div(_l1_prox_many(vs, t1), 1 + t2)),
)


@records_call
def l2(coeff: Coefficient, mask: MaskLike | None = None, name: str = "l2") -> Penalty:
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
    check_coefficient("coeff", coeff)
    return LeafPenalty(name, (coeff,), mask, L2)


@records_call
def l1(coeff: Coefficient, mask: MaskLike | None = None, name: str = "l1") -> Penalty:
    """L1: ``coeff * sum |w|``; subgradient ``coeff * sign(w)`` (0 at 0); prox soft-thresholding.

    The prox ``sign(v) * max(|v| - step*coeff, 0)`` (:func:`funcreg.proxes.soft_threshold`) produces
    exact zeros; the subgradient form oscillates around zero and does not.

    Examples:
        >>> import torch, funcreg as fr
        >>> P = fr.l1(0.5)
        >>> P.prox({"w": torch.tensor([-2.0, 0.3, 1.0])}, step=1.0)["w"]
        tensor([-1.5000,  0.0000,  0.5000])
    """
    check_coefficient("coeff", coeff)
    return LeafPenalty(name, (coeff,), mask, L1)


@records_call
def elastic_net(
    l1: Coefficient, l2: Coefficient, mask: MaskLike | None = None, name: str = "elastic_net"
) -> Penalty:
    """Elastic net: ``l1 * sum |w| + l2/2 * sum ||w||^2``; prox ``softthreshold(v, s*l1) / (1 + s*l2)``.

    Each coefficient is a float, a 0-d tensor or a tree of per-leaf values.

    Examples:
        >>> import torch, funcreg as fr
        >>> P = fr.elastic_net(l1=0.5, l2=1.0)
        >>> P.prox({"w": torch.tensor([-2.0, 0.3, 1.5])}, step=1.0)["w"]
        tensor([-0.7500,  0.0000,  0.5000])
    """
    check_coefficient("l1", l1)
    check_coefficient("l2", l2)
    return LeafPenalty(name, (l1, l2), mask, ELASTIC_NET)


@records_call
def lp(coeff: Coefficient, p: float, mask: MaskLike | None = None, name: str | None = None) -> Penalty:
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
    check_coefficient("coeff", coeff)
    check_number("p", p, low=1.0, allow_tensor=False)
    name = name or f"l{p:g}"
    if p == 1:
        return l1(coeff, mask, name)
    if p == 2:
        return l2(coeff, mask, name)
    rule = LeafRule(
        value=lambda w, c: (c / p) * torch.sum(torch.abs(w) ** p),
        grad=lambda w, c: c * torch.abs(w) ** (p - 1) * torch.sgn(w),
    )
    return LeafPenalty(name, (coeff,), mask, rule)


def _anchor_value(w: torch.Tensor, c: Any, reference: torch.Tensor, precision: Any = None) -> torch.Tensor:
    d = abs2(w - reference)
    return 0.5 * c * torch.sum(d if precision is None else precision * d)


def _anchor_grad(w: torch.Tensor, c: Any, reference: torch.Tensor, precision: Any = None) -> torch.Tensor:
    d = w - reference
    return c * d if precision is None else c * precision * d


def _anchor_quadratic(c: Any, reference: torch.Tensor, precision: Any = None) -> tuple[Any, torch.Tensor]:
    return (c if precision is None else c * precision), reference


ANCHOR = LeafRule(
    value=_anchor_value, grad=_anchor_grad, prox=proxes.anchor_prox, quadratic=_anchor_quadratic
)


def owned_tree(argument: str, tree: PyTree, non_negative: bool = False) -> PyTree:
    """A detached copy of ``tree`` (tensors or ``None``), every entry finite (and ``>= 0``).

    A penalty owns what it holds: a reference taken from ``fr.params_of(model)`` shares storage with
    the module, and training in place would otherwise move it with the weights.
    """
    leaves, spec = flatten(tree)
    names = tree_names(tree)
    out: list[torch.Tensor | None] = []
    for name, leaf in zip(names, leaves):
        if leaf is None:
            out.append(None)
            continue
        if not isinstance(leaf, torch.Tensor) or not (leaf.is_floating_point() or leaf.is_complex()):
            what = type(leaf).__name__ if not isinstance(leaf, torch.Tensor) else f"a {leaf.dtype} tensor"
            raise LeafTypeError(
                f"Invalid {argument} value for {name!r}: {what} (expected a floating-point tensor)"
            )
        if not is_traced(leaf):
            bad = ~torch.isfinite(leaf)
            if non_negative:
                bad = bad | (leaf < 0)
            if bool(bad.any()):
                rule = "finite and >= 0" if non_negative else "finite"
                raise ValueError(f"Invalid {argument} value for {name!r}: every entry must be {rule}")
        out.append(leaf.detach().clone())
    return unflatten(out, spec)


@records_call
def anchor(
    coeff: Coefficient,
    reference: PyTree,
    precision: PyTree | None = None,
    mask: MaskLike | None = None,
    name: str = "anchor",
) -> Penalty:
    """Decay toward reference weights: ``coeff/2 * sum precision * (w - ref)^2``.

    With ``reference`` the pre-trained (or initial) weights this is L2-SP; with a diagonal Fisher
    information tree as ``precision`` it is EWC. Gradient ``coeff * precision * (w - ref)``; prox
    ``(v + t*F*ref) / (1 + t*F)`` with ``t = step * coeff``. ``reference`` and ``precision`` must have the
    structure and shapes of the parameters (``ValueError`` naming the key otherwise), hold finite
    tensors (precision ``>= 0``), and are copied: the penalty does not move when the model they came
    from trains in place. They are applied in each parameter's dtype.

    Examples:
        >>> import torch, funcreg as fr
        >>> ref = {"w": torch.tensor([1.0, 1.0])}
        >>> fr.anchor(2.0, ref)({"w": torch.tensor([1.0, 3.0])})  # 2/2 * 4
        tensor(4.)
    """
    check_coefficient("coeff", coeff)
    if reference is None:
        raise TypeError("anchor needs a reference tree")
    aux = {"reference": owned_tree("reference", reference)}
    if precision is not None:
        aux["precision"] = owned_tree("precision", precision, non_negative=True)
    return LeafPenalty(name, (coeff,), mask, ANCHOR, aux=aux)
