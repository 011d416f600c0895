"""Cautious updates: keep the coordinates where the update goes down the current gradient."""

from __future__ import annotations

from typing import Any

from funcreg._src.core.base import GradientTransformation, configured, flat
from funcreg._src.core.errors import LeafTypeError
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import check_number


def cautious(inner: GradientTransformation, floor: float = 1e-3) -> GradientTransformation:
    """``inner``'s update, zeroed where it does not descend along the current gradient (Liang et al.,
    2024, "Cautious Optimizers"; timm's ``cadamw``, ``claion``, ...).

    Per tensor, with ``u`` the inner update and ``g`` the incoming gradient, ``m = (u * g < 0)`` keeps
    the coordinates where ``u`` points down ``g``, and the update is ``u * m / max(mean(m), floor)``:
    the kept coordinates are scaled up so the update keeps its size. Where ``u = -lr * exp_avg /
    denom`` (Adam's), ``u * g < 0`` is timm's ``exp_avg * grad > 0``, so
    ``chain(cautious(adam(lr, betas)), decoupled_weight_decay(wd, lr, scale_by="learning_rate"))`` is
    timm's cautious AdamW: keep the weight decay outside, or it takes part in the sign test. The state
    is ``inner``'s own (the wrapper keeps none). Real parameters only.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.cautious(fr.sgd(1.0, momentum=0.9))
        >>> params = {"w": torch.zeros(4)}
        >>> state = tx.init(params)
        >>> _, state = tx.update({"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}, state, params)
        >>> # the momentum says descend along +1 everywhere; two gradients now point the other way
        >>> u, _ = tx.update({"w": torch.tensor([0.5, 0.5, -0.5, -0.5])}, state, params)
        >>> u["w"]  # momentum 1.4, 1.4, 0.4, 0.4: the last two go up g; the others x 1 / mean(mask) = 2
        tensor([-2.8000, -2.8000, -0.0000, -0.0000])
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"cautious expects a GradientTransformation, got {type(inner).__name__}")
    check_number("floor", floor, low=0.0, high=1.0, low_open=True, allow_tensor=False)

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, Any]:
        g = flat(updates, params, "cautious")
        new, state = inner.update(updates, state, params)
        u = flat(new, params, "cautious inner")
        out = []
        for i in u.index:
            ui, gi = u.updates[i], g.updates[i]
            if ui.is_complex():
                raise LeafTypeError(
                    f"cautious: parameter {u.name(i)!r} is complex; the sign test needs real updates"
                )
            if gi is None:  # a frozen gradient that the inner transform still moves: nothing to test
                out.append(ui)
                continue
            mask = (ui * gi < 0).to(ui.dtype)
            out.append(ui * (mask / mask.mean().clamp(min=floor)))
        return u.tree(out), state

    return configured(GradientTransformation(inner.init, update), "cautious", inner, floor=floor)
