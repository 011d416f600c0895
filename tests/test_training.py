"""Tests of funcreg's training step (make_step, Step, TrainState, functional_model) and History.

References are derived independently of funcreg: penalty values and gradients are written out by hand
(``c/2 * sum w^2`` over the decayed weights plus ``c * sum |w|``) and differentiated with
``torch.autograd.grad`` on ordinary leaf tensors, not with ``torch.func``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import assert_step_close as assert_close
from helpers import check_compiled_matches_eager, leaves
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import funcreg as fr

FORMS = ("loss", "coupled", "decoupled", "proximal")
FEW = settings(deadline=None, max_examples=6, database=None, suppress_health_check=[HealthCheck.too_slow])
L2, L1, LR = 0.1, 0.01, 0.05


def mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(dtype)


def mse_loss_of(model: torch.nn.Module):
    def loss(params, x, y):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)

    return loss


def hand_penalty(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`the_penalty` written out: L2 on the two weight matrices, L1 on the two biases."""
    l2 = sum(params[k].square().sum() for k in ("0.weight", "2.weight")) * (L2 / 2)
    l1 = sum(params[k].abs().sum() for k in ("0.bias", "2.bias")) * L1
    return {"l2": l2, "l1": l1}


def the_penalty(model: torch.nn.Module) -> fr.Penalty:
    # disjoint selections: the prox of a sum is only known term by term (the proximal form needs it)
    decay = fr.decay_mask(model)
    return fr.l2(L2, mask=decay) + fr.l1(L1, mask=~decay)


@st.composite
def regression_data(draw, dtype=torch.float64, n=5):
    """``(x, y)`` of shapes (n, 3), (n, 2): NumPy arrays drawn by Hypothesis, then ``torch.from_numpy``."""
    elements = st.floats(-2.0, 2.0, allow_nan=False, allow_subnormal=False, width=64)
    x = draw(arrays(np.float64, (n, 3), elements=elements))
    y = draw(arrays(np.float64, (n, 2), elements=elements))
    return torch.from_numpy(x).to(dtype), torch.from_numpy(y).to(dtype)


def fixed_batches(steps: int, dtype=torch.float64, n=5, seed=0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, generator=g, dtype=dtype), torch.randn(n, 2, generator=g, dtype=dtype))
        for _ in range(steps)
    ]


# --- metrics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
@FEW
@given(batches=st.lists(regression_data(), min_size=3, max_size=3))
def test_metrics_of_every_form_report_the_penalty_at_the_start_of_the_step(form, batches):
    model = mlp()
    loss = mse_loss_of(model)
    step = fr.make_step(
        loss, fr.sgd(LR, momentum=0.9), penalty=the_penalty(model), form=form, learning_rate=LR
    )
    state = step.init(fr.params_of(model))
    for t, (x, y) in enumerate(batches):
        before = {k: v.clone() for k, v in state.params.items()}
        state, metrics = step(state, x, y)
        assert sorted(metrics) == ["data_loss", "penalty", "penalty/l1", "penalty/l2", "total"], (form, t)
        expected = hand_penalty(before)
        data_loss = loss(before, x, y)
        assert_close(metrics["data_loss"], data_loss, f"{form} step {t} data_loss")
        assert_close(metrics["penalty/l2"], expected["l2"], f"{form} step {t} penalty/l2")
        assert_close(metrics["penalty/l1"], expected["l1"], f"{form} step {t} penalty/l1")
        assert_close(metrics["penalty"], expected["l2"] + expected["l1"], f"{form} step {t} penalty")
        assert_close(metrics["total"], data_loss + expected["l2"] + expected["l1"], f"{form} step {t} total")
        for k, v in metrics.items():
            assert not v.requires_grad, f"{form}: metrics[{k!r}] is attached to a graph"


def test_metrics_without_a_penalty_hold_only_the_data_loss():
    model = mlp()
    step = fr.make_step(mse_loss_of(model), fr.adamw(1e-2))
    ((x, y),) = fixed_batches(1)
    _, metrics = step(step.init(fr.params_of(model)), x, y)
    assert sorted(metrics) == ["data_loss"]


def test_has_aux_reports_aux_in_the_metrics():
    model = mlp()

    def loss(params, x, y):
        out = torch.func.functional_call(model, params, (x,))
        return torch.nn.functional.mse_loss(out, y), out.detach()

    step = fr.make_step(loss, fr.sgd(LR), has_aux=True)
    ((x, y),) = fixed_batches(1)
    params = fr.params_of(model)
    _, metrics = step(step.init(params), x, y)
    assert_close(metrics["aux"], model(x).detach(), "aux")


def recording():
    """A transform whose state is the last gradient it saw (and whose update is that gradient)."""
    return fr.GradientTransformation(
        init=lambda params: {k: torch.zeros_like(v) for k, v in params.items()},
        update=lambda updates, state, params=None: (updates, dict(updates)),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@FEW
@given(data=st.data())
def test_loss_form_gradient_equals_autograd_of_loss_plus_penalty(dtype, data):
    model = mlp(dtype)
    elements = st.floats(-1.5, 1.5, allow_nan=False, allow_subnormal=False, width=32).filter(
        lambda v: abs(v) > 1e-3
    )
    # weights away from 0: |w| has a kink there, and both sides would pick the subgradient 0 anyway
    params = {
        k: torch.from_numpy(data.draw(arrays(np.float32, tuple(p.shape), elements=elements), label=k)).to(
            dtype
        )
        for k, p in fr.params_of(model).items()
    }
    x, y = data.draw(regression_data(dtype), label="batch")
    step = fr.make_step(mse_loss_of(model), recording(), penalty=the_penalty(model), form="loss")
    state, metrics = step(step.init(params), x, y)

    leaves_ = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    out = torch.nn.functional.linear(
        torch.tanh(torch.nn.functional.linear(x, leaves_["0.weight"], leaves_["0.bias"])),
        leaves_["2.weight"],
        leaves_["2.bias"],
    )
    pen = hand_penalty(leaves_)
    total = torch.nn.functional.mse_loss(out, y) + pen["l2"] + pen["l1"]
    expected = dict(zip(leaves_, torch.autograd.grad(total, list(leaves_.values()))))
    for k in params:
        assert_close(state.opt_state[k], expected[k], f"gradient of {k}")
    assert_close(metrics["total"], total.detach(), "total")
    # and the step applied exactly that update (recording() passes the gradient through: w + g)
    for k in params:
        assert torch.equal(state.params[k], params[k] + state.opt_state[k])


@pytest.mark.parametrize("form", ["coupled", "decoupled", "proximal"])
def test_metrics_report_the_step_penalty_when_tx_holds_another_penalty_form(form):
    # Regression: the metrics were read from the FIRST PenaltyState in the state, but the step appends
    # its own form last for decoupled/proximal (chain(tx, decoupled(P))), so tx's penalty was reported.
    loss = lambda p, x: ((p["w"] * x).sum() - 1.0) ** 2  # noqa: E731
    params = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    tx = fr.chain(fr.add_penalty_grad(fr.l2(0.1)), fr.sgd(0.1))
    step = fr.make_step(loss, tx, penalty=fr.l1(0.01), form=form, learning_rate=0.1)
    _, metrics = step(step.init(params), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert "penalty/l1" in metrics and "penalty/l2" not in metrics, sorted(metrics)
    assert_close(metrics["penalty"], torch.tensor(0.03, dtype=torch.float64), "penalty")


# --- buffers ----------------------------------------------------------------------------------------


def bn_model(dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4, bias=False), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    ).to(dtype)


def test_functional_model_leaves_the_callers_buffers_alone_but_functional_call_does_not():
    model = bn_model()
    params, buffers = fr.params_of(model), fr.buffers_of(model)
    original = {k: v.clone() for k, v in buffers.items()}
    ((x, _),) = fixed_batches(1)

    _, new = fr.functional_model(model)(params, buffers, x)
    for k in buffers:
        assert torch.equal(buffers[k], original[k]), f"functional_model wrote into the caller's {k}"
    assert not torch.equal(new["1.running_mean"], original["1.running_mean"])
    assert new["1.num_batches_tracked"].item() == 1

    # Why functional_model exists: torch.func.functional_call updates the running statistics in place,
    # in the very tensors of the dict it is given (here: the module's own buffers, shared by buffers_of).
    torch.func.functional_call(model, (params, buffers), (x,))
    assert not torch.equal(buffers["1.running_mean"], original["1.running_mean"])
    assert torch.equal(buffers["1.running_mean"], new["1.running_mean"])
    assert buffers["1.num_batches_tracked"].item() == 1


def test_a_step_with_buffers_mutates_neither_the_state_nor_the_module():
    model = bn_model()
    apply = fr.functional_model(model)

    def loss(params, buffers, x, y):
        out, new_buffers = apply(params, buffers, x)
        return torch.nn.functional.mse_loss(out, y), new_buffers

    step = fr.make_step(
        loss, fr.sgd(LR, momentum=0.9), penalty=fr.l2(L2), form="decoupled", learning_rate=LR, buffers=True
    )
    buffers = fr.buffers_of(model)  # shares memory with the module
    snapshot = {k: v.clone() for k, v in buffers.items()}
    state0 = step.init(fr.params_of(model), buffers)
    state0_copy = copy.deepcopy(state0)
    state = state0
    for x, y in fixed_batches(3):
        state, _ = step(state, x, y)
    assert state.buffers["1.num_batches_tracked"].item() == 3
    for k in buffers:
        assert torch.equal(buffers[k], snapshot[k]), f"the caller's buffers[{k!r}] changed"
        assert torch.equal(model.get_buffer(k), snapshot[k]), f"the module's {k} changed"
    for a, b in zip(leaves(state0), leaves(state0_copy)):
        assert (a is None and b is None) or torch.equal(a, b), "the initial TrainState was written into"


def test_buffers_flag_must_match_init():
    model = bn_model()
    step = fr.make_step(lambda p, b, x: (p["0.weight"].sum(), b), fr.sgd(0.1), buffers=True)
    with pytest.raises(ValueError, match="buffers=True"):
        step.init(fr.params_of(model))
    plain = fr.make_step(lambda p, x: p["0.weight"].sum(), fr.sgd(0.1))
    with pytest.raises(ValueError, match="buffers=False"):
        plain.init(fr.params_of(model), fr.buffers_of(model))


# --- errors -----------------------------------------------------------------------------------------


def test_make_step_rejects_bad_arguments():
    loss = lambda p, x: (p["w"] * x).sum()  # noqa: E731
    with pytest.raises(ValueError, match="form"):
        fr.make_step(loss, fr.sgd(0.1), penalty=fr.l1(0.1), form="lasso")
    with pytest.raises(ValueError, match="learning_rate"):
        fr.make_step(loss, fr.sgd(0.1), penalty=fr.l1(0.1), form="proximal")
    with pytest.raises(ValueError, match="needs a penalty"):
        fr.make_step(loss, fr.sgd(0.1), form="coupled")
    with pytest.raises(TypeError):
        fr.make_step("not callable", fr.sgd(0.1))
    with pytest.raises(TypeError):
        fr.make_step(loss, fr.sgd(0.1), has_aux=1)


def test_step_rejects_bad_calls():
    params = {"w": torch.ones(2)}
    step = fr.make_step(lambda p, x: p["w"] * x, fr.sgd(0.1))  # not a scalar loss
    with pytest.raises(TypeError, match="0-d"):
        step(step.init(params), torch.ones(2))
    with pytest.raises(TypeError, match="TrainState"):
        step((params, (), {}, {}), torch.ones(2))
    bad_tx = fr.make_step(lambda p, x: (p["w"] * x).sum(), lambda h: "not a transform")
    with pytest.raises(TypeError, match="GradientTransformation"):
        bad_tx.init(params)


# --- torch.compile ----------------------------------------------------------------------------------


# Not skipped or marked slow: the CI's plain `pytest` runs it (~15 s, most of it inductor's C++ build).
def test_compiled_step_equals_eager_and_compiles_once():
    torch._dynamo.reset()
    model = mlp(torch.float32)
    tx = fr.adamw(1e-2, weight_decay=1e-2, mask=fr.decay_mask(model))
    step = fr.make_step(mse_loss_of(model), tx, penalty=fr.l1(1e-3), form="proximal", learning_rate=1e-2)
    eager_state = step.init(fr.params_of(model))
    compiled_state = step.init(fr.params_of(model))
    check_compiled_matches_eager(step, eager_state, compiled_state, fixed_batches(4, torch.float32))


# --- History ----------------------------------------------------------------------------------------


def test_history_collects_metrics_over_steps():
    model = mlp()
    step = fr.make_step(
        mse_loss_of(model), fr.sgd(LR), penalty=the_penalty(model), form="proximal", learning_rate=LR
    )
    state = step.init(fr.params_of(model))
    history, seen = fr.History(), []
    for x, y in fixed_batches(4):
        state, metrics = step(state, x, y)
        history.append(metrics)
        seen.append(metrics)
    assert len(history) == 4
    assert sorted(history.keys()) == ["data_loss", "penalty", "penalty/l1", "penalty/l2", "total"]
    assert history["data_loss"].shape == (4,)
    assert torch.equal(history["penalty/l1"], torch.stack([m["penalty/l1"] for m in seen]))
    with pytest.raises(KeyError, match="nope"):
        history["nope"]
    with pytest.raises(ValueError, match="keys changed"):
        history.append({"data_loss": torch.tensor(1.0)})

    pd = pytest.importorskip("pandas")
    df = history.to_dataframe()
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ["step", "data_loss", "penalty", "penalty/l2", "penalty/l1", "total"]
    assert df["step"].tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(df["total"].to_numpy(), history["total"].numpy())


def test_history_skips_metrics_that_are_not_one_value_per_run_or_member():
    # Regression: a tensor aux of shape (3,) in a single run (make_step(..., has_aux=True) puts it in
    # metrics["aux"]) was taken for "one value per member": to_dataframe made a "member" column and
    # 3 rows per step with data_loss repeated. The shape of data_loss decides now; aux is skipped.
    history = fr.History()
    for t in range(2):
        history.append({"data_loss": torch.tensor(float(t)), "aux": torch.tensor([1.0, 2.0, 3.0])})
    assert history.keys() == ["data_loss"]
    ensemble = fr.History()
    ensemble.append({"data_loss": torch.zeros(3), "aux": torch.zeros(3, 4)})  # an ensemble's (members, k) aux
    assert ensemble.keys() == ["data_loss"]
    pytest.importorskip("pandas")
    df = history.to_dataframe()
    assert len(df) == 2 and list(df.columns) == ["step", "data_loss"], df
    assert len(ensemble.to_dataframe()) == 3
