"""Every public factory refuses a tensor or a non-finite value for a hyperparameter it takes only as
a Python float, naming it: found from the signatures (a parameter annotated ``float`` with a float
default), so a new factory joins by itself. Hyperparameters that may be tensors (learning rates,
weight decays and coefficients typed ``ScalarOrSchedule`` / ``Coefficient``) are not annotated
``float`` and are not drawn here."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import funcreg as fr

# the required arguments of the factories, by name
REQUIRED = {
    "learning_rate": 0.1,
    "coeff": 0.1,
    "inner": fr.sgd(0.1),
    "penalty": fr.l1(0.1),
    "peak_value": 1.0,
    "warmup_steps": 2,
    "decay_steps": 10,
    "init_value": 1.0,
    "end_value": 0.0,
    "transition_steps": 3,
    "value": 0.5,
    "sparsity": 0.5,
    "max_consecutive_errors": 2,
    "decay": 0.9,
    "momentum": 0.9,
}


def _float_parameters() -> list[tuple[str, str]]:
    out = []
    for name in fr.__all__:
        f = getattr(fr, name)
        if not inspect.isfunction(f):
            continue
        params = inspect.signature(f).parameters.values()
        required = [
            p.name for p in params if p.default is inspect.Parameter.empty and p.kind != p.VAR_KEYWORD
        ]
        if any(r not in REQUIRED for r in required):
            continue
        out += [(name, p.name) for p in params if p.annotation == "float" and isinstance(p.default, float)]
    return out


CASES = _float_parameters()
# annotated float, but taken as 0-d tensors too, on purpose: fr.inject_hyperparams drives them
TENSOR_OK = {
    ("scale_by_adam", "b1"),
    ("scale_by_adam", "b2"),
    ("scale_by_adam", "eps"),
    ("trace", "dampening"),
}


def _call(name: str, **given):  # noqa: ANN003, ANN202
    f = getattr(fr, name)
    params = inspect.signature(f).parameters.values()
    required = {p.name: REQUIRED[p.name] for p in params if p.default is inspect.Parameter.empty}
    return f(**{**required, **given})


def test_the_signatures_give_enough_cases():
    assert len(CASES) >= 60 and len({n for n, _ in CASES}) >= 30, CASES


@pytest.mark.parametrize(("factory", "arg"), CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_a_float_hyperparameter_refuses_a_tensor_and_a_non_finite_value(factory, arg):
    default = dict(inspect.signature(getattr(fr, factory)).parameters)[arg].default
    _call(factory)  # the defaults are valid
    if (factory, arg) in TENSOR_OK:
        _call(factory, **{arg: torch.tensor(default)})
    else:
        with pytest.raises(TypeError, match=rf"\b{arg}\b"):
            _call(factory, **{arg: torch.tensor(default)})
    for bad in (math.nan, math.inf):
        with pytest.raises((TypeError, ValueError), match=rf"\b{arg}\b"):
            _call(factory, **{arg: bad})
