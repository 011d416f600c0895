"""``fr.metrics``: what an optimizer or a transform state is doing, as one flat dict of floats.

The dict is what ``LightningModule.log_dict``, TensorBoard's ``SummaryWriter.add_scalars`` and
``wandb.log`` take: string keys, Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from funcreg._src.combinators.wrappers import ApplyIfFiniteState
from funcreg._src.core.base import find_states
from funcreg._src.forms.forms import penalty_metrics, penalty_states

# group keys that are bookkeeping of schedulers, not hyperparameters
_SKIP = frozenset(
    {"params", "param_names", "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"}
)


def _put(out: dict[str, float], key: str, value: Any) -> None:
    """Adds ``value`` (a number or a tensor) under ``key``; a tensor of several values as ``key/i``."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        out[key] = float(value)
    elif isinstance(value, torch.Tensor) and value.numel() > 0 and not value.is_complex():
        flat = value.detach().reshape(-1).to("cpu", torch.float64).tolist()
        if len(flat) == 1:
            out[key] = flat[0]
        else:
            for i, v in enumerate(flat):
                out[f"{key}/{i}"] = v


def _add(out: dict[str, float], key: str, value: Any) -> None:
    part: dict[str, float] = {}
    _put(part, key, value)
    for k, v in part.items():
        out[k] = out.get(k, 0.0) + v


def _state_metrics(state: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in penalty_states(state):
        if s.terms:
            for key, value in penalty_metrics(dict(s.terms)).items():
                _add(out, key, value)
        else:
            _add(out, "penalty", s.value)
    finite = find_states(state, ApplyIfFiniteState)
    for s in finite:
        _add(out, "apply_if_finite/total_notfinite", s.total_notfinite)
    return out


def _group_label(group: Mapping[str, Any], index: int) -> str:
    name = group.get("name")
    return name if isinstance(name, str) and name else f"group{index}"


def metrics(source: Any, prefix: str = "") -> dict[str, float]:
    """A flat ``{name: float}`` of an optimizer's hyperparameters and penalties, ready for loggers.

    ``source`` may be:

    * a ``torch.optim.Optimizer`` (any, a :class:`funcreg.TorchOptimizer` or torch's own): the
      numeric options of each param group as ``"<group>/<option>"`` (``"decay/lr"``,
      ``"group0/weight_decay"``; ``betas`` as ``"<group>/beta1"`` and ``"<group>/beta2"``), the group
      named by its ``"name"`` entry or ``group<i>``; for a :class:`funcreg.TorchOptimizer` also the
      penalties of its transforms' states, as below;
    * a transform state (or a ``TrainState``): ``"penalty"``, the sum of the values of every
      :class:`funcreg.PenaltyState` in it, and ``"penalty/<term>"`` for each named term (summed over
      the states that have it: over param groups, each penalizing its own parameters), as of the
      last update (at its parameters before that update); ``"apply_if_finite/total_notfinite"``
      where an ``apply_if_finite`` is inside;
    * a metrics dict (of ``fr.make_step``): its scalar entries as floats.

    Booleans are left out; a tensor of several values (an ensemble) becomes ``"<key>/<i>"``.

    Args:
        source: an optimizer, a state, or a dict of metrics.
        prefix: prepended to every key (``"opt/"``).

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = fr.create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1, penalty=fr.l1(1e-3))
        >>> model(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> m = fr.metrics(opt)
        >>> m["decay/lr"], m["decay/weight_decay"], m["no_decay/weight_decay"], m["decay/beta2"]
        (0.001, 0.1, 0.0, 0.999)
        >>> sorted(k for k in m if k.startswith("penalty"))
        ['penalty', 'penalty/l1']
    """
    out: dict[str, float] = {}
    if isinstance(source, torch.optim.Optimizer):
        for i, group in enumerate(source.param_groups):
            label = _group_label(group, i)
            for key, value in group.items():
                if key in _SKIP or key == "name":
                    continue
                if key == "lr" and isinstance(value, float) and math.isnan(value):
                    continue  # a TorchOptimizer over a fixed transform: the lr is built in
                if key == "betas" and isinstance(value, (tuple, list)):
                    for j, b in enumerate(value, start=1):
                        _put(out, f"{label}/beta{j}", b)
                elif isinstance(value, (tuple, list)):
                    for j, v in enumerate(value):
                        _put(out, f"{label}/{key}.{j}", v)
                else:
                    _put(out, f"{label}/{key}", value)
        state = getattr(source, "funcreg_state", None)
        if state is not None:
            out.update(_state_metrics(state))
    elif isinstance(source, Mapping) and not any(
        isinstance(v, tuple) and hasattr(v, "_fields") for v in source.values()
    ):  # a dict of metrics (a named_chain state is a dict of NamedTuple states)
        for key, value in source.items():
            if isinstance(key, str):
                _put(out, key, value)
    else:
        out.update(_state_metrics(source))
    return {f"{prefix}{k}": v for k, v in out.items()}
