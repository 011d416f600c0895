"""Details of the optimizer aliases and of the optimizer table: defaults against torch.optim and the
schedule-free reference, the text a transform prints, the boundaries Lion accepts, and what
``create_transform`` builds for the forms and inputs it takes (checked against torch.optim)."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import numpy as np
import pytest
import torch
from helpers import TORCH_NAMESAKES
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import funcreg as fr
from funcreg._src.optim.table import OPTIMIZERS, optimizer_spec

# the aliases whose printed call lists every argument
PRINTS_ALL = {"sgd", "adam", "adamw"}
# torch's implementation switches, which funcreg has no use for
TORCH_ONLY = {"foreach", "differentiable", "capturable", "fused"}

# The signatures of the reference implementation (facebookresearch/schedule_free,
# ``SGDScheduleFreeReference`` and ``AdamWScheduleFreeReference``), ``lr`` written ``learning_rate``.
SCHEDULE_FREE_REFERENCE = {
    "schedule_free_sgd": dict(
        learning_rate=1.0, momentum=0.9, weight_decay=0.0, warmup_steps=0, r=0.0, weight_lr_power=2.0
    ),
    "schedule_free_adamw": dict(
        learning_rate=0.0025,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        warmup_steps=0,
        r=0.0,
        weight_lr_power=2.0,
    ),
}


def _torch_defaults(cls: type) -> dict[str, Any]:
    return {
        k: p.default
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if k not in {"self", "params"} | TORCH_ONLY and p.default is not inspect.Parameter.empty
    }


@pytest.mark.parametrize("name", sorted(TORCH_NAMESAKES))
def test_alias_defaults_are_torch_defaults_and_print_as_the_bare_call(name: str) -> None:
    alias = getattr(fr, name)
    torch_defaults = _torch_defaults(getattr(torch.optim, TORCH_NAMESAKES[name]))
    ours = {k: p.default for k, p in inspect.signature(alias).parameters.items()}
    lr = torch_defaults.pop("lr")
    torch_defaults = {
        k: v for k, v in torch_defaults.items() if k in ours
    }  # fr.adam lacks decoupled_weight_decay
    for key, value in torch_defaults.items():
        assert ours[key] == value, f"fr.{name}: default {key}={ours[key]!r}, torch.optim has {value!r}"
    if name in PRINTS_ALL:
        return
    # the arguments torch takes, each given its torch default, and maximize=False where the alias has
    # one, are left out of the printed call: it reads as the bare call
    explicit = dict(torch_defaults)
    if "maximize" in ours:
        assert ours["maximize"] is False
        explicit["maximize"] = False
    assert repr(alias(lr, **explicit)) == f"{name}({lr!r})"
    if ours["learning_rate"] is not inspect.Parameter.empty:
        assert ours["learning_rate"] == lr
        assert repr(alias()) == f"{name}({lr!r})"


def test_a_non_default_argument_is_printed() -> None:
    assert repr(fr.radam(0.1, maximize=True)) == "radam(0.1, maximize=True)"
    assert repr(fr.muon(0.02, nesterov=False, ns_steps=6)) == "muon(0.02, nesterov=False, ns_steps=6)"


@pytest.mark.parametrize("name", sorted(SCHEDULE_FREE_REFERENCE))
def test_schedule_free_defaults_are_the_reference_defaults(name: str) -> None:
    factory = getattr(fr, name)
    reference = SCHEDULE_FREE_REFERENCE[name]
    ours = {k: p.default for k, p in inspect.signature(factory).parameters.items()}
    assert ours == reference
    lr = reference["learning_rate"]
    rest = {k: v for k, v in reference.items() if k != "learning_rate"}
    assert repr(factory(lr, **rest)) == f"{name}({lr!r})"
    assert repr(factory()) == f"{name}({lr!r})"


# ---------------------------------------------------------------- Lion at beta = 1


def _lion_reference(
    w: np.ndarray, grads: list[np.ndarray], lr: float, b1: float, b2: float
) -> list[np.ndarray]:
    """Lion's rule as the paper writes it, in float64: ``c = b1 m + (1 - b1) g``,
    ``w <- w - lr sign(c)``, ``m <- b2 m + (1 - b2) g``."""
    m = np.zeros_like(w)
    out = []
    for g in grads:
        c = b1 * m + (1 - b1) * g
        w = w - lr * np.sign(c)
        m = b2 * m + (1 - b2) * g
        out.append(w)
    return out


_nonzero = st.floats(0.01, 10.0) | st.floats(-10.0, -0.01)


@settings(max_examples=25, deadline=None)
@given(
    grads=hnp.arrays(np.float64, (4, 3), elements=_nonzero),
    b1=st.sampled_from([0.0, 0.5, 0.9]),
    one_first=st.booleans(),
)
def test_lion_accepts_a_beta_of_one_and_follows_the_rule(
    grads: np.ndarray, b1: float, one_first: bool
) -> None:
    # beta = 1 is inside Lion's range (the interpolation or the momentum never moves); above 1 is not
    betas = (1.0, b1) if one_first else (b1, 1.0)
    lr = 0.1
    w0 = np.linspace(-1.0, 1.0, 3)
    tx = fr.lion(lr, betas=betas)
    params = {"w": torch.from_numpy(w0.copy())}
    state = tx.init(params)
    expected = _lion_reference(w0, list(grads), lr, *betas)
    for g, want in zip(grads, expected):
        u, state = tx.update({"w": torch.from_numpy(g.copy())}, state, params)
        params = fr.apply_updates(params, u)
        np.testing.assert_allclose(params["w"].numpy(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("betas", [(1.01, 0.99), (0.9, 1.01), (-0.1, 0.99)])
def test_lion_refuses_betas_outside_zero_one(betas: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="betas"):
        fr.lion(1e-4, betas=betas)


# ---------------------------------------------------------------- the optimizer table


@pytest.mark.parametrize("name", sorted(set(OPTIMIZERS) & set(TORCH_NAMESAKES)))
def test_table_entries_hold_torch_defaults(name: str) -> None:
    spec = optimizer_spec(name)
    torch_defaults = _torch_defaults(getattr(torch.optim, TORCH_NAMESAKES[name]))
    assert spec.lr == torch_defaults["lr"]
    assert spec.weight_decay == torch_defaults["weight_decay"]
    for key, value in spec.hyperparameters.items():
        assert value == torch_defaults[key], (
            f"{name}: table has {key}={value!r}, torch.optim has {torch_defaults[key]!r}"
        )


def test_table_entries_are_immutable() -> None:
    spec = optimizer_spec("adam")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.lr = 1.0  # type: ignore[misc]
    assert optimizer_spec("adam").lr == 1e-3


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_table_entry_describes_its_weight_decay(name: str) -> None:
    spec = optimizer_spec(name)
    assert "weight_decay" in spec.description
    assert spec.form in spec.description


# ---------------------------------------------------------------- create_transform against torch.optim


def _run_torch(
    opt_cls: type, groups: list[dict[str, Any]], grads: list[list[np.ndarray]], **kw: Any
) -> list[list[np.ndarray]]:
    ps = [torch.nn.Parameter(g.pop("init").clone()) for g in groups]
    opt = opt_cls([{**g, "params": [p]} for g, p in zip(groups, ps)], **kw)
    out = []
    for step in grads:
        for p, g in zip(ps, step):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
        out.append([p.detach().clone().numpy() for p in ps])
    return out


def _run_funcreg(
    tx: fr.GradientTransformation, params: dict, grads: list[list[np.ndarray]]
) -> list[list[np.ndarray]]:
    state = tx.init(params)
    out = []
    for step in grads:
        g = {k: torch.from_numpy(a.copy()) for k, a in zip(params, step)}
        u, state = tx.update(g, state, params)
        params = fr.apply_updates(params, u)
        out.append([p.clone().numpy() for p in params.values()])
    return out


def _assert_runs_close(actual: list[list[np.ndarray]], expected: list[list[np.ndarray]]) -> None:
    for t, (a_step, e_step) in enumerate(zip(actual, expected)):
        for a, e in zip(a_step, e_step):
            np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-12, err_msg=f"step {t}")


_elems = st.floats(-3.0, 3.0, allow_subnormal=False)
_grad_steps = st.lists(
    st.tuples(hnp.arrays(np.float64, (3, 2), elements=_elems), hnp.arrays(np.float64, (2,), elements=_elems)),
    min_size=1,
    max_size=4,
)
W0 = torch.tensor([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]], dtype=torch.float64)
B0 = torch.tensor([0.3, -0.2], dtype=torch.float64)


@settings(max_examples=20, deadline=None)
@given(steps=_grad_steps, swap=st.booleans())
def test_create_transform_form_overrides_the_optimizers_own(steps: list, swap: bool) -> None:
    # "adam" with decoupled decay is torch's AdamW; "adamw" with coupled decay is torch's Adam
    name, torch_cls = ("adamw", torch.optim.Adam) if swap else ("adam", torch.optim.AdamW)
    form = "coupled" if swap else "decoupled"
    lr, wd = 0.05, 0.3
    params = {"w": W0.clone(), "b": B0.clone()}
    tx = fr.create_transform(params, name, lr=lr, weight_decay=wd, decay=True, form=form)
    grads = [list(s) for s in steps]
    expected = _run_torch(torch_cls, [{"init": W0}, {"init": B0}], grads, lr=lr, weight_decay=wd)
    _assert_runs_close(_run_funcreg(tx, params, grads), expected)


@settings(max_examples=20, deadline=None)
@given(steps=_grad_steps)
def test_create_transform_rmsprop_defaults_are_torch_rmsprop(steps: list) -> None:
    params = {"w": W0.clone(), "b": B0.clone()}
    tx = fr.create_transform(params, "rmsprop")
    grads = [list(s) for s in steps]
    expected = _run_torch(torch.optim.RMSprop, [{"init": W0}, {"init": B0}], grads)
    _assert_runs_close(_run_funcreg(tx, params, grads), expected)


@settings(max_examples=15, deadline=None)
@given(steps=_grad_steps)
def test_create_transform_takes_a_list_of_tensors(steps: list) -> None:
    # the tensors are named "0", "1", ...; the decay selection decays the matrix, not the vector
    lr, wd = 0.1, 0.5
    tx = fr.create_transform([W0.clone(), B0.clone()], "sgd", lr=lr, weight_decay=wd, momentum=0.9)
    params = {"0": W0.clone(), "1": B0.clone()}
    grads = [list(s) for s in steps]
    expected = _run_torch(
        torch.optim.SGD,
        [{"init": W0, "weight_decay": wd}, {"init": B0, "weight_decay": 0.0}],
        grads,
        lr=lr,
        momentum=0.9,
    )
    _assert_runs_close(_run_funcreg(tx, params, grads), expected)


@pytest.mark.parametrize("bad", [[], [torch.zeros(2), "b"]])
def test_create_transform_refuses_what_is_not_parameters(bad: Any) -> None:
    with pytest.raises(TypeError, match="create_optimizer expects a module"):
        fr.create_transform(bad, "sgd", lr=0.1)


def test_create_transform_without_decayable_parameters() -> None:
    # every parameter is 1-D: with no decay asked for, the optimizer is plain SGD on all of them;
    # a decay asked for has nothing to apply to, and the default selection says so
    params = {"b": B0.clone(), "scale": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}
    grads = {
        "b": torch.tensor([1.0, -2.0], dtype=torch.float64),
        "scale": torch.tensor([0.5, 0.0, -1.0], dtype=torch.float64),
    }
    tx = fr.create_transform(params, "sgd", lr=0.1)
    u, _ = tx.update(grads, tx.init(params), params)
    for k in params:
        torch.testing.assert_close(u[k], -0.1 * grads[k])
    for wd in (1.0, 0.1):
        with pytest.raises(ValueError, match="selects no parameter"):
            fr.create_transform(params, "sgd", lr=0.1, weight_decay=wd)
