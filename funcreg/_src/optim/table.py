"""The optimizer table of :func:`funcreg.create_optimizer`: ``OPTIMIZERS``, names to :class:`OptimizerSpec`.

An entry says how to build the optimizer without weight decay, its hyperparameters with
torch.optim's defaults, and what torch's ``weight_decay=`` means for it. Adding an optimizer is
adding an entry (``_register``); :func:`funcreg._src.optim.factory.build_transform` composes an entry
with weight decay and a penalty.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from funcreg._src.core.base import GradientTransformation
from funcreg._src.optim import alias, alias_recent, alias_torch

FORMS = ("coupled", "decoupled", "proximal")


@dataclass(frozen=True)
class OptimizerSpec:
    """An entry of the optimizer table.

    ``base(lr, **hyperparameters)`` builds the optimizer without weight decay and without
    ``maximize`` (those are composed around it); ``hyperparameters`` are its other arguments with
    torch.optim's defaults; ``form`` is what torch's ``weight_decay=`` is for this optimizer
    (``"coupled"``: added to the gradient, SGD and Adam; ``"decoupled"``: ``w <- w - lr * wd * w``,
    AdamW); ``fused(lr, weight_decay, mask, maximize, **hyperparameters)``, when given, builds that
    default form in one transform equal to torch's step (``fr.adamw``).
    """

    name: str
    base: Callable[..., GradientTransformation]
    hyperparameters: Mapping[str, Any]
    form: str
    lr: float = 1e-3
    weight_decay: float = 0.0
    fused: Callable[..., GradientTransformation] | None = None
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)


OPTIMIZERS: dict[str, OptimizerSpec] = {}


def _register(spec: OptimizerSpec) -> None:
    if spec.form not in FORMS:
        raise ValueError(f"optimizer {spec.name!r}: form must be one of {FORMS}, got {spec.form!r}")
    OPTIMIZERS[spec.name.lower()] = spec


def _torch_like(
    name: str,
    build: Callable[..., GradientTransformation],
    hyperparameters: dict[str, Any],
    lr: float,
    form: str = "coupled",
    description: str = "",
) -> None:
    """An optimizer whose alias takes torch's arguments (``weight_decay``, ``maximize`` included)."""
    _register(
        OptimizerSpec(
            name=name,
            base=lambda lr, **h: build(lr, **h),
            hyperparameters=hyperparameters,
            form=form,
            lr=lr,
            fused=lambda lr, weight_decay, maximize, **h: build(
                lr, weight_decay=weight_decay, maximize=maximize, **h
            ),
            description=description or f"torch.optim.{name}: weight_decay is {form} L2",
        )
    )


_torch_like(
    "sgd",
    alias.sgd,
    {"momentum": 0.0, "dampening": 0.0, "nesterov": False},
    1e-3,
    description="torch.optim.SGD: weight_decay is coupled L2",
)
_torch_like(
    "adam",
    alias.adam,
    {"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False},
    1e-3,
    description="torch.optim.Adam: weight_decay is coupled L2 (divided by sqrt(v) with the gradient)",
)
_register(
    OptimizerSpec(
        name="adamw",
        base=lambda lr, betas, eps, amsgrad: alias.adam(lr, betas, eps, amsgrad=amsgrad),
        hyperparameters={"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False},
        form="decoupled",
        weight_decay=1e-2,
        fused=lambda lr, weight_decay, maximize, betas, eps, amsgrad, mask=None: alias.adamw(
            lr, betas, eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, mask=mask
        ),
        description="torch.optim.AdamW: weight_decay is decoupled, w <- w - lr * wd * w",
        extra={"fused_takes_mask": True},
    )
)


_torch_like("adamax", alias_torch.adamax, {"betas": (0.9, 0.999), "eps": 1e-8}, 2e-3)
_torch_like("nadam", alias_torch.nadam, {"betas": (0.9, 0.999), "eps": 1e-8, "momentum_decay": 4e-3}, 2e-3)
_torch_like("radam", alias_torch.radam, {"betas": (0.9, 0.999), "eps": 1e-8}, 1e-3)
_torch_like(
    "rmsprop", alias_torch.rmsprop, {"alpha": 0.99, "eps": 1e-8, "momentum": 0.0, "centered": False}, 1e-2
)
_torch_like(
    "adagrad", alias_torch.adagrad, {"lr_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 1e-10}, 1e-2
)
_torch_like("adadelta", alias_torch.adadelta, {"rho": 0.9, "eps": 1e-6}, 1.0)
_torch_like(
    "lion",
    alias_recent.lion,
    {"betas": (0.9, 0.99)},
    1e-4,
    form="decoupled",
    description="Lion (Chen et al., 2023): weight_decay is decoupled, w <- w - lr * wd * w",
)


def optimizer_spec(name: str) -> OptimizerSpec:
    """The table entry for ``name`` (case-insensitive); a name not in the table raises with suggestions."""
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string such as 'adamw', got {name!r}")
    spec = OPTIMIZERS.get(name.lower())
    if spec is None:
        close = difflib.get_close_matches(name.lower(), list(OPTIMIZERS), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise ValueError(f"unknown optimizer {name!r} ({hint}known: {', '.join(sorted(OPTIMIZERS))})")
    return spec


def _check_hyperparameters(spec: OptimizerSpec, given: Mapping[str, Any]) -> dict[str, Any]:
    known = set(spec.hyperparameters)
    unknown = [k for k in given if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        takes = ", ".join(sorted(known | {"lr", "weight_decay", "maximize", "penalty", "form", "decay"}))
        raise TypeError(f"optimizer {spec.name!r} takes no argument {unknown[0]!r}{hint}; it takes: {takes}")
    return {**spec.hyperparameters, **given}
