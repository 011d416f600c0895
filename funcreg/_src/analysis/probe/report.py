"""What :func:`funcreg.probe` reports: the kinds, the result, and the words and tables of each verdict.

Kept apart from the measurements (:mod:`funcreg._src.analysis.probe.measure`) and the decisions
(:mod:`funcreg._src.analysis.probe.probe`) so that each verdict's explanation can be read in one place.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class DecayKind(str, enum.Enum):
    """What a weight decay does, as found by :func:`probe`. ``str(kind)`` is its description."""

    NONE = "none"
    COUPLED_L2 = "coupled L2"
    DECOUPLED_LR = "decoupled, multiplied by lr"
    DECOUPLED_INDEPENDENT = "decoupled, independent of lr"
    NORM_DEPENDENT = "depends on the weight norm (trust ratio or projection)"
    L1_SIGN = "L1-like (sign)"
    CONSTANT_SHIFT = "constant shift"
    UNKNOWN = "unrecognised"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, eq=False)
class ProbeResult:
    """What :func:`probe` found. ``str(result)`` is a readable report with the weight tables.

    Attributes:
        kind: the :class:`DecayKind`.
        coefficient: the effective coefficient ``lam``, in the convention of ``kind``:
            coupled L2: the gradient added is ``lam * w`` (torch's ``weight_decay``);
            decoupled, multiplied by lr: ``w <- w * (1 - lr * lam)`` per step (AdamW's ``weight_decay``);
            decoupled, independent of lr: ``w <- w * (1 - lam)`` per step;
            L1-like: ``w <- w - lr * lam * sign(w)`` per step (``- lam * sign(w)`` if not ``lr_scaled``);
            constant shift: ``w <- w - lr * lam`` (``- lam`` if not ``lr_scaled``);
            none: ``0.0``; depends on the weight norm, unrecognised: ``None``.
        lr_scaled: whether the step is proportional to the learning rate (``None`` when it is
            neither proportional to it nor independent of it, or when nothing moved).
        table: the weights before and after each step, one block per learning rate (and, when
            the verdict used them, the gradient runs).
        explanation: what the numbers mean, in words.
        equivalent: other kinds that produce exactly the same steps on this optimizer (coupled L2
            under plain SGD is also decoupled-multiplied-by-lr).
        optimizer: the class name of the optimizer probed.
        learning_rates: the two learning rates of the runs.
        weights: the starting weights.
        trajectories: one ``(steps + 1, len(weights))`` float64 tensor per learning rate, row ``t``
            holding the weights after ``t`` zero-gradient steps.
        precision: the dtype the optimizer computes in, read off its results (``torch.float32`` for
            ``p.data.float()`` arithmetic); the probe's tolerances follow it.
        needs_gradient: the decay acts only when the data gradient is nonzero (nothing moves at
            zero gradient; LARS-type optimizers skip the step).
        gradient_trajectories: the gradient runs, ``{(lr, scale): (2, len(weights)) tensor}``, one step
            with the data gradient 0.5 on every weight, from ``scale * weights``.
    """

    kind: DecayKind
    coefficient: float | None
    lr_scaled: bool | None
    table: str
    explanation: str
    equivalent: tuple[DecayKind, ...] = ()
    optimizer: str = ""
    learning_rates: tuple[float, ...] = ()
    weights: tuple[float, ...] = ()
    trajectories: tuple[torch.Tensor, ...] = ()
    precision: torch.dtype = torch.float64
    needs_gradient: bool = False
    gradient_trajectories: dict | None = None

    def __str__(self) -> str:
        coef = "n/a" if self.coefficient is None else f"{self.coefficient:.6g}"
        lines = [
            f"weight decay probe of {self.optimizer or 'optimizer'}",
            f"kind:        {self.kind.value}",
            f"coefficient: {coef}",
            f"lr_scaled:   {self.lr_scaled}",
        ]
        if self.equivalent:
            lines.append(f"equivalent:  {', '.join(k.value for k in self.equivalent)}")
        if self.needs_gradient:
            lines.append("needs a nonzero gradient: True")
        if self.precision != torch.float64:
            lines.append(f"precision:   {str(self.precision).replace('torch.', '')}")
        lines += ["", self.explanation, "", self.table]
        return "\n".join(lines)


def table(
    trajectories: Sequence[torch.Tensor], lrs: Sequence[float], weights: Sequence[float], what: str
) -> str:
    """One block per learning rate: the weights before and after each step."""
    blocks = []
    for lr, traj in zip(lrs, trajectories):
        header = ["step"] + [f"w={w:g}" for w in weights]
        rows = [header] + [[str(t)] + [f"{v:.8g}" for v in row.tolist()] for t, row in enumerate(traj)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [f"lr = {lr:g}, {what}"]
        lines += ["  ".join(c.rjust(wd) for c, wd in zip(r, widths)) for r in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def precision_note(dtype: torch.dtype) -> str:
    """The sentence appended to the explanation when the optimizer computes below float64 (else empty)."""
    if dtype == torch.float64:
        return ""
    name = str(dtype).replace("torch.", "")
    return (
        f" The optimizer computes in {name} (every weight it wrote is a {name} number although the "
        f"parameter is float64, as with ``p.data.float()``); the probe read its steps at {name}'s rounding."
    )


def none(gradient_checked: bool) -> str:
    """The explanation when nothing decays (and, if ``gradient_checked``, not with a gradient either)."""
    text = (
        "With a zero data gradient no weight moved: no weight decay (or one below the optimizer's rounding)."
    )
    if gradient_checked:
        text += (
            " With a data gradient the same for every weight, every weight moved by the same amount: "
            "no decay "
            "that acts only when there is a gradient either."
        )
    return text


def coupled(lam: float, geometric: bool, proportional: bool) -> str:
    """The explanation of coupled L2, with what its zero-gradient steps look like: geometric (plain
    SGD), proportional with a changing factor (momentum), or not proportional (Adam-type)."""
    text = (
        f"Coupled L2: the decay acts exactly as an extra gradient {lam:.6g} * w (the gradient of "
        f"{lam:.6g}/2 * ||w||^2 in the loss): feeding the data gradient {-lam:.6g} * w cancels it at "
        "every step and at both learning rates, so it goes through the optimizer's momentum and "
        "normalisation like any gradient."
    )
    if geometric:
        return text + (
            f" With a zero data gradient each step is w <- w * (1 - lr * {lam:.6g}), which is also what "
            "a decoupled decay multiplied by lr does: for plain SGD without momentum coupled and "
            "decoupled decay are the same map."
        )
    if proportional:
        return text + (
            " The zero-gradient steps are proportional to w but the factor changes from step to step: "
            "the decay is accumulated by momentum."
        )
    return text + (
        " The zero-gradient steps are not proportional to w: the optimizer normalises the decay "
        "gradient (Adam-type m / sqrt(v)), so each step is about lr * sign(w) whatever the "
        "coefficient, small weights shrink as fast as large ones, and the coefficient only matters "
        "relative to the data gradient (and eps). Use a decoupled decay (AdamW) for a decay "
        "proportional to w."
    )


def decoupled(coef: float, scaled: bool, needs_gradient: bool) -> str:
    """The explanation of a decoupled decay, multiplied by lr or not, and whether it acts only with a
    gradient."""
    if scaled:
        text = (
            f"Decoupled weight decay multiplied by lr: w <- w * (1 - lr * {coef:.6g}) at every step, "
            "applied to the weights outside the gradient path (the data gradient -lam * w does not "
            "cancel it), like torch.optim.AdamW."
        )
    else:
        text = (
            f"Decoupled weight decay independent of lr: w <- w * (1 - {coef:.6g}) at every step whatever "
            "the learning rate, so it does not follow an lr schedule or warmup. The AdamW coefficient "
            f"with the same effect at a given lr is {coef:.6g} / lr."
        )
    if needs_gradient:
        text += (
            " It only acts when the data gradient is nonzero (no weight moved with a zero gradient): "
            "measured from the first step with a data gradient the same for every weight, whose part "
            "proportional to w is the decay. A parameter whose gradient is zero (unused, masked) "
            "is not decayed."
        )
    return text


def norm_dependent(
    apparent: tuple[float, bool] | None, needs_gradient: bool, changes_with_scale: bool
) -> str:
    """The explanation of a decay that depends on the weights: which run showed it, and the apparent
    decoupled coefficient ``(coef, lr_scaled)`` of the zero-gradient steps, which is not the optimizer's."""
    text = (
        "The decay depends on the weights themselves, not only on a coefficient: with a data gradient the "
        "same for every weight, the part of the step proportional to w "
        + (
            "changes when the weights are scaled by 2"
            if changes_with_scale
            else "differs from the zero-gradient one"
        )
        + ". That is what a trust ratio (LARS, LAMB: the step is rescaled by ||w|| / ||update||) or a "
        "projection (AdamP: the radial part of the update is removed, the decay reduced) does."
    )
    if apparent is not None:
        coef, scaled = apparent
        form = f"w <- w * (1 - lr * {coef:.6g})" if scaled else f"w <- w * (1 - {coef:.6g})"
        text += (
            f" With a zero data gradient the steps look like a decoupled decay, {form}; that coefficient "
            "is not the optimizer's weight_decay in general: LAMB's trust ratio ||w|| / ||wd * w|| cancels "
            "wd, so any weight_decay > 0 shows as 1.0 there."
        )
    if needs_gradient:
        text += " No weight moved with a zero gradient: the decay acts only with a nonzero data gradient."
    return text + " No single coefficient describes it; see the tables."


def sign(coef: float, scaled: bool | None) -> str:
    """The explanation of an L1-like sign step."""
    scale_text = "lr * " if scaled else ""
    return (
        f"L1-like: every weight moves {scale_text}{coef:.6g} towards zero per step whatever its size, "
        f"w <- w - {scale_text}lam * sign(w), the (sub)gradient step of lam * |w|. It does not stop at zero: "
        "small weights oscillate around it instead of becoming exact zeros (a proximal step, "
        "soft-thresholding, would give them)."
    )


def shift(coef: float, scaled: bool | None) -> str:
    """The explanation of a constant shift, and the bug that usually causes it."""
    scale_text = "lr * " if scaled else ""
    return (
        f"Constant shift: every weight moves by -{scale_text}{coef:.6g} per step whatever its sign, so "
        "positive weights shrink and negative ones grow away from zero. This is not a weight decay; it "
        "is what `p.add_(-lr * wd)` does where `p.mul_(1 - lr * wd)` or "
        "`p.add_(p, alpha=-lr * wd)` was meant."
    )


UNKNOWN_ZERO_GRADIENT = (
    "The zero-gradient steps are neither proportional to w with a gradient -lam * w cancelling them, "
    "nor a constant factor, nor the same size for every weight, nor the same shift: see the table."
)
UNKNOWN_PROPORTIONAL = (
    "The zero-gradient steps are proportional to w, but the factor changes from step to step "
    "(or with lr in a way that is neither proportional nor constant), and the data gradient "
    "-lam * w does not cancel them: see the table."
)
UNKNOWN_GATED = (
    "No weight moved with a zero data gradient, but with a data gradient the same for every weight the "
    "weights moved by different amounts, not as a common step plus a part proportional to w (or in a "
    "way that neither scales with lr nor is independent of it): a decay that acts only with a gradient, "
    "of a kind the probe does not name. See the tables."
)
