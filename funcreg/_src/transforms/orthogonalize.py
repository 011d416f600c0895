"""Muon's building blocks: Newton–Schulz orthogonalization of a matrix, and the Muon rescaling.

Follows ``torch/optim/_muon.py`` (torch 2.13): the momentum is an exponential moving average
(``buf.lerp_(g, 1 - momentum)``), the orthogonalization runs in bfloat16, and the learning rate is
adjusted to the matrix's shape. ``torch.optim.Muon`` accepts 2-D parameters only and documents that
the others (biases, embeddings) go to another optimizer such as AdamW: :func:`funcreg.muon` takes
that optimizer as ``fallback``.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from funcreg._src.core.base import GradientTransformation, begin, per_param_zeros
from funcreg._src.core.steps import init_count
from funcreg._src.core.tree import flatten, tree_names
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import check_bool, check_int, check_number
from funcreg._src.transforms.block_utils import reject_complex, with_config

NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
"""torch's (and Keller Jordan's) quintic Newton–Schulz coefficients ``(a, b, c)``."""

AdjustLr = Literal["original", "match_rms_adamw"] | None


def newton_schulz(
    g: torch.Tensor,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    steps: int = 5,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Approximately orthogonalizes a matrix, as ``torch.optim.Muon`` does (in bfloat16).

    ``X = G / max(||G||_F, eps)`` (transposed when ``G`` has more rows than columns), then ``steps``
    times ``A = X X^T``, ``X <- a X + (b A + c A^2) X``. The result is close to ``U V^T`` of the SVD
    ``G = U S V^T`` (singular values roughly in ``[0.5, 1.5]``, not exactly 1: the coefficients trade
    accuracy for speed). Returned in bfloat16, as torch computes it.

    Args:
        g: a 2-D tensor.
        coefficients: ``(a, b, c)``.
        steps: iterations, ``0 <= steps < 100``.
        eps: lower bound of the Frobenius norm, ``>= 0``.

    Examples:
        >>> import torch
        >>> from funcreg._src.transforms.orthogonalize import newton_schulz
        >>> s = torch.linalg.svdvals(newton_schulz(torch.diag(torch.tensor([3.0, 0.5]))).float())
        >>> bool(((s > 0.5) & (s < 1.5)).all())
        True
    """
    if g.ndim != 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(g.shape)}")
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_lr_ratio(shape: torch.Size, adjust_lr_fn: AdjustLr = None) -> float:
    """The factor torch's Muon multiplies the learning rate by for a matrix of ``shape = (A, B)``.

    ``"original"`` (and ``None``): ``sqrt(max(1, A / B))``; ``"match_rms_adamw"``: ``0.2 * sqrt(max(A, B))``.

    Examples:
        >>> from funcreg._src.transforms.orthogonalize import muon_lr_ratio
        >>> muon_lr_ratio((8, 2)), muon_lr_ratio((2, 8)), muon_lr_ratio((4, 25), "match_rms_adamw")
        (2.0, 1.0, 1.0)
    """
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


class ScaleByMuonState(NamedTuple):
    """State of :func:`scale_by_muon`: updates done and the momentum buffer (torch's ``momentum_buffer``)."""

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as in optax
    trace: PyTree


def scale_by_muon(
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: AdjustLr = None,
) -> GradientTransformation:
    """Muon's rescaling of 2-D parameters, as ``torch.optim.Muon`` computes it (without lr and decay).

    ``B_t = lerp(B_{t-1}, g_t, 1 - momentum)`` from ``B_0 = 0``; the direction is ``B_t``, or
    ``lerp(g_t, B_t, momentum)`` with ``nesterov``; the update is ``ratio * newton_schulz(direction)``
    in the parameter's dtype, with ``ratio`` from :func:`muon_lr_ratio`. Every parameter must be a
    matrix (``ValueError`` at ``init`` naming the first one that is not); see :func:`funcreg.muon`
    for the fallback torch documents for the others.

    Args:
        momentum: ``>= 0``.
        nesterov: use the Nesterov direction.
        ns_coefficients: the Newton–Schulz ``(a, b, c)``.
        eps: lower bound of the norm before the iteration, ``>= 0``.
        ns_steps: Newton–Schulz iterations, ``0 <= ns_steps < 100``.
        adjust_lr_fn: ``None`` or ``"original"`` (``sqrt(max(1, A/B))``), or ``"match_rms_adamw"``.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.scale_by_muon()
        >>> params = {"w": torch.zeros(3, 3)}
        >>> u, _ = tx.update({"w": torch.diag(torch.tensor([4.0, 1.0, 0.25]))}, tx.init(params))
        >>> u["w"].dtype, bool((u["w"].diagonal() > 0.5).all())  # all directions of about unit size
        (torch.float32, True)
    """
    check_number("momentum", momentum, low=0.0, allow_tensor=False)
    check_bool("nesterov", nesterov)
    if not (isinstance(ns_coefficients, (tuple, list)) and len(ns_coefficients) == 3):
        raise TypeError(
            f"Invalid ns_coefficients value: {ns_coefficients!r} (expected three floats (a, b, c))"
        )
    for i, v in enumerate(ns_coefficients):
        check_number(f"ns_coefficients[{i}]", v, low=None, allow_tensor=False)
    check_number("eps", eps, low=0.0, allow_tensor=False)
    check_int("ns_steps", ns_steps, low=0)
    if ns_steps >= 100:
        raise ValueError(f"Invalid ns_steps value: {ns_steps!r} (must be < 100, as torch requires)")
    if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
        raise ValueError(
            f"Invalid adjust_lr_fn value: {adjust_lr_fn!r} (expected None, 'original' or 'match_rms_adamw')"
        )
    a, b, c = (float(v) for v in ns_coefficients)
    coefficients = (a, b, c)

    def init(params: PyTree) -> ScaleByMuonState:
        reject_complex(params, "scale_by_muon")
        leaves, _ = flatten(params)
        for name, p in zip(tree_names(params), leaves):
            if p is not None and p.ndim != 2:
                raise ValueError(
                    f"scale_by_muon: parameter {name!r} has shape {tuple(p.shape)}; Muon orthogonalizes "
                    "matrices only (use fr.muon(..., fallback=fr.adamw(...)) for the others, "
                    "as torch documents)"
                )
        return ScaleByMuonState(init_count(params), per_param_zeros(params))

    def update(
        updates: PyTree, state: ScaleByMuonState, params: PyTree | None = None
    ) -> tuple[PyTree, ScaleByMuonState]:
        f = begin(updates, state, params, ScaleByMuonState, "scale_by_muon")
        buf_leaves = f.state_leaves(state.trace, "scale_by_muon", "trace")
        bufs, out = [], []
        for g, b in zip(f.present_updates(), f.present(buf_leaves)):
            if g.ndim != 2:
                raise ValueError(f"scale_by_muon: an update of shape {tuple(g.shape)} is not a matrix")
            b = torch.lerp(b, g, 1 - momentum)
            direction = torch.lerp(g, b, momentum) if nesterov else b
            ortho = newton_schulz(direction, coefficients, ns_steps, eps).to(g.dtype)
            out.append(ortho * muon_lr_ratio(g.shape, adjust_lr_fn))
            bufs.append(b)
        return f.tree(out), ScaleByMuonState(state.count + 1, f.tree(bufs, buf_leaves))

    return with_config(
        GradientTransformation(init, update),
        "scale_by_muon",
        (),
        dict(
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        ),
        dict(
            momentum=0.95,
            nesterov=True,
            ns_coefficients=NS_COEFFICIENTS,
            eps=1e-7,
            ns_steps=5,
            adjust_lr_fn=None,
        ),
    )


__all__ = ["NS_COEFFICIENTS", "ScaleByMuonState", "muon_lr_ratio", "newton_schulz", "scale_by_muon"]
