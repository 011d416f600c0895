"""Recent optimizers as chains: Muon (``torch.optim.Muon``, matrices only) and Lion (not in torch).

Muon orthogonalizes the momentum of each 2-D parameter; torch's ``Muon`` refuses other parameters
and documents that they go to another optimizer such as AdamW. :func:`muon` does the same, or
routes them to ``fallback``. Lion follows the update rule of its paper.
"""

from __future__ import annotations

import torch

from funcreg._src.combinators.combine import chain
from funcreg._src.combinators.wrappers import masked
from funcreg._src.core.base import GradientTransformation
from funcreg._src.core.tree import flatten, unflatten
from funcreg._src.core.typing import PyTree, ScalarOrSchedule
from funcreg._src.core.validation import check_rate
from funcreg._src.optim.alias_torch import betas_pair, head, tail
from funcreg._src.transforms.basic import scale_by_learning_rate
from funcreg._src.transforms.block_utils import with_config
from funcreg._src.transforms.orthogonalize import NS_COEFFICIENTS, AdjustLr, scale_by_muon
from funcreg._src.transforms.sign_methods import scale_by_lion


def _matrices(params: PyTree) -> PyTree:
    """The mask of 2-D parameters (``None`` leaves are not selected)."""
    leaves, spec = flatten(params)
    return unflatten([isinstance(p, torch.Tensor) and p.ndim == 2 for p in leaves], spec)


def _others(params: PyTree) -> PyTree:
    leaves, spec = flatten(params)
    return unflatten([isinstance(p, torch.Tensor) and p.ndim != 2 for p in leaves], spec)


def muon(
    learning_rate: ScalarOrSchedule = 1e-3,
    weight_decay: ScalarOrSchedule = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: AdjustLr = None,
    maximize: bool = False,
    fallback: GradientTransformation | None = None,
) -> GradientTransformation:
    """``torch.optim.Muon``: ``[negate] -> scale_by_muon -> scale_by_learning_rate -> decoupled decay``.

    Each matrix ``W`` moves by ``-lr * ratio * NS(momentum direction)`` and decays as
    ``W <- W * (1 - lr * wd)`` with the unadjusted ``lr`` (torch's defaults: ``weight_decay=0.1``,
    ``momentum=0.95``, Nesterov). Parameters that are not matrices raise ``ValueError`` at ``init``
    (torch raises at construction) unless ``fallback`` is given: then they are updated by
    ``fallback`` (e.g. ``fr.adamw(3e-4, weight_decay=0.01)``), which is the split torch documents
    (``Muon`` for the 2-D parameters, AdamW for the rest). ``maximize`` is a funcreg addition
    (torch's Muon has none): it negates every gradient first, the fallback's included.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.muon(0.02, weight_decay=0.0, fallback=fr.sgd(0.1))
        >>> params = {"w": torch.zeros(4, 2), "b": torch.zeros(2)}
        >>> u, _ = tx.update({"w": torch.ones(4, 2), "b": torch.ones(2)}, tx.init(params), params)
        >>> u["b"], u["w"].shape  # the bias went to SGD
        (tensor([-0.1000, -0.1000]), torch.Size([4, 2]))
    """
    check_rate("learning_rate", learning_rate)
    negate = head(maximize, weight_decay, coupled=False)  # before the split: maximize applies to all
    core = chain(
        scale_by_muon(momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn),
        scale_by_learning_rate(learning_rate),
        *tail(learning_rate, weight_decay),
    )
    given = dict(
        weight_decay=weight_decay,
        momentum=momentum,
        nesterov=nesterov,
        ns_coefficients=ns_coefficients,
        eps=eps,
        ns_steps=ns_steps,
        adjust_lr_fn=adjust_lr_fn,
        maximize=maximize,
        fallback=fallback,
    )
    defaults = dict(
        weight_decay=0.1,
        momentum=0.95,
        nesterov=True,
        ns_coefficients=NS_COEFFICIENTS,
        eps=1e-7,
        ns_steps=5,
        maximize=False,
    )
    if fallback is None:
        return with_config(chain(*negate, core), "muon", (learning_rate,), given, defaults)
    if not isinstance(fallback, GradientTransformation):
        raise TypeError(f"Invalid fallback value: a {type(fallback).__name__}, not a GradientTransformation")
    return with_config(
        chain(*negate, masked(core, _matrices), masked(fallback, _others)),
        "muon",
        (learning_rate,),
        given,
        defaults,
    )


def lion(
    learning_rate: ScalarOrSchedule = 1e-4,
    betas: tuple[float, float] = (0.9, 0.99),
    weight_decay: ScalarOrSchedule = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """Lion (Chen et al., 2023): ``[negate] -> scale_by_lion -> scale_by_learning_rate -> decoupled decay``.

    The paper's update: ``c = b1 m + (1 - b1) g``, ``w <- w - lr * (sign(c) + wd * w)``,
    ``m <- b2 m + (1 - b2) g``. The decay is decoupled and multiplied by ``lr``, as in the paper
    (whose ``wd`` is typically 3-10 times AdamW's, because Lion's ``lr`` is 3-10 times smaller).
    Not in ``torch.optim``; tested against the paper's rule written out.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.lion(0.1, weight_decay=1.0)
        >>> params = {"w": torch.tensor([2.0, 2.0])}
        >>> u, _ = tx.update({"w": torch.tensor([5.0, -1e-3])}, tx.init(params), params)
        >>> u["w"]  # -0.1 * sign(g) - 0.1 * 1.0 * 2
        tensor([-0.3000, -0.1000])
    """
    check_rate("learning_rate", learning_rate)
    b1, b2 = betas_pair(betas, high=1.0, high_open=False)
    parts = head(maximize, weight_decay, coupled=False)
    tx = chain(
        *parts,
        scale_by_lion(b1, b2),
        scale_by_learning_rate(learning_rate),
        *tail(learning_rate, weight_decay),
    )
    given = dict(betas=betas, weight_decay=weight_decay, maximize=maximize)
    return with_config(
        tx, "lion", (learning_rate,), given, dict(betas=(0.9, 0.99), weight_decay=0.0, maximize=False)
    )


__all__ = ["lion", "muon"]
