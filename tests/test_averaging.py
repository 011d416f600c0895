"""``fr.average_weights``: EMA and SWA of the parameters, against torch.optim.swa_utils.AveragedModel.

The reference is AveragedModel itself, updated after every ``optimizer.step()`` of torch.optim.SGD
(or Adam) on the same gradients: with ``multi_avg_fn=get_ema_multi_avg_fn(decay)`` for the EMA, with
its default running mean for SWA. Gradients drawn by Hypothesis; float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import funcreg as fr

PROPERTY = settings(deadline=None, max_examples=15, database=None)
TOL = {"atol": 1e-12, "rtol": 1e-10}


@pytest.mark.parametrize("decay", [None, 0.9, 0.0])
@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
@PROPERTY
@given(grads=st.lists(arrays(np.float64, (4,), elements=st.floats(-2, 2, width=64)), min_size=1, max_size=6))
def test_average_weights_equals_averaged_model(decay, optimizer, grads):
    w0 = torch.linspace(-1, 1, 4, dtype=torch.float64)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(w0.clone())
    avg = AveragedModel(model, multi_avg_fn=None if decay is None else get_ema_multi_avg_fn(decay))
    if optimizer == "sgd_momentum":
        opt, inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), fr.sgd(0.1, momentum=0.9)
    else:
        opt, inner = torch.optim.Adam(model.parameters(), lr=0.1), fr.adam(0.1)
    tx = fr.average_weights(inner, decay=decay)
    params = {"w": w0.clone()}
    state = tx.init(params)
    for g in grads:
        model.w.grad = torch.from_numpy(g).clone()
        opt.step()
        avg.update_parameters(model)
        u, state = tx.update({"w": torch.from_numpy(g)}, state, params)
        params = fr.apply_updates(params, u)
    torch.testing.assert_close(params["w"], model.w.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(fr.averaged_params(state)["w"], avg.module.w.detach(), **TOL)
    assert int(state.n_averaged) == int(avg.n_averaged)


def test_average_weights_donated_and_in_make_step_equal_the_pure_path():
    x = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)
    y = x.sum(dim=1)

    def loss(p, x, y):
        return ((x @ p["w"] - y) ** 2).mean()

    runs = []
    for donate in (False, True):
        step = fr.make_step(
            loss, fr.average_weights(fr.adamw(0.05, weight_decay=0.1), decay=0.8), donate=donate
        )
        state = step.init({"w": torch.zeros(3, dtype=torch.float64)})
        for _ in range(5):
            state, _ = step(state, x, y)
        runs.append(fr.averaged_params(state.opt_state)["w"].clone())
    torch.testing.assert_close(runs[1], runs[0], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("decay", [None, 0.8])
def test_average_weights_traced_equals_eager(decay):
    """Under torch.compile and vmap the first average is chosen by torch.where, not in Python."""
    tx = fr.average_weights(fr.sgd(0.1, momentum=0.9), decay=decay)
    gs = [torch.tensor([0.5, -1.0], dtype=torch.float64) * (k + 1) for k in range(4)]

    def run(update, params, state):
        for g in gs:
            u, state = update({"w": g}, state, params)
            params = fr.apply_updates(params, u)
        return fr.averaged_params(state)["w"]

    p0 = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    eager = run(tx.update, p0, tx.init(p0))
    compiled = run(torch.compile(tx.update, backend="eager", fullgraph=True), p0, tx.init(p0))
    torch.testing.assert_close(compiled, eager, atol=1e-12, rtol=1e-10)
    stacked = fr.stack([p0, p0])
    state = fr.vmap(tx.init)(stacked)
    params = stacked
    for g in gs:
        u, state = fr.vmap(tx.update)({"w": torch.stack([g, g])}, state, params)
        params = fr.apply_updates(params, u)
    torch.testing.assert_close(fr.averaged_params(state)["w"][1], eager, atol=1e-12, rtol=1e-10)


def test_average_weights_validation():
    with pytest.raises(TypeError, match="GradientTransformation"):
        fr.average_weights("sgd")
    with pytest.raises(ValueError, match="decay"):
        fr.average_weights(fr.sgd(0.1), decay=1.0)
    with pytest.raises(TypeError, match="decay"):
        fr.average_weights(fr.sgd(0.1), decay=torch.tensor(0.9))  # a number, fixed for the run
    tx = fr.average_weights(fr.sgd(0.1))
    with pytest.raises(ValueError, match="params"):
        tx.update({"w": torch.ones(2)}, tx.init({"w": torch.ones(2)}))
    with pytest.raises(ValueError, match="found 0"):
        fr.averaged_params(fr.sgd(0.1).init({"w": torch.ones(2)}))
