"""Schedule-free SGD and AdamW against a line-by-line reimplementation of the reference optimizers.

The reference here is written as the schedule-free repository's ``SGDScheduleFreeReference`` and
``AdamWScheduleFreeReference`` step (three buffers z, x, y per parameter, the scalars in Python
floats), independently of funcreg's code; and on a quadratic the paper's averaging: with
``weight_lr_power=0`` and ``r=0`` the evaluation point ``x_k`` is the plain mean of ``z_1..z_k``.
Gradients drawn by Hypothesis; float64, ``atol=1e-12, rtol=1e-10``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import funcreg as fr

PROPERTY = settings(deadline=None, max_examples=15, database=None)
TOL = {"atol": 1e-12, "rtol": 1e-10}


def reference(kind, w0, grads_at, steps, lr, beta1, beta2, eps, wd, warmup, r, power):
    """``grads_at(y) -> g``; returns the final (y, x) of the reference step."""
    z, x, y = w0.clone(), w0.clone(), w0.clone()
    v = torch.zeros_like(w0)
    lr_max, weight_sum = -1.0, 0.0
    for k in range(steps):
        g = grads_at(y)
        sched = (k + 1) / warmup if k < warmup else 1.0
        lr_k = lr * sched
        if kind == "adamw":
            lr_k *= math.sqrt(1 - beta2 ** (k + 1))
        lr_max = max(lr_k, lr_max)
        weight = ((k + 1) ** r) * (lr_max**power)
        weight_sum += weight
        ckp1 = weight / weight_sum
        wd_k = wd(k) if callable(wd) else wd  # a weight-decay schedule, read at the step's count
        if kind == "sgd":
            g = g + wd_k * y
            z = z - lr_k * g
        else:
            z = z - lr_k * wd_k * y
            v = beta2 * v + (1 - beta2) * g * g
            z = z - lr_k * g / (v.sqrt() + eps)
        x = x * (1 - ckp1) + z * ckp1
        y = x * beta1 + z * (1 - beta1)
    return y, x


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@PROPERTY
@given(
    target=arrays(np.float64, (5,), elements=st.floats(-2, 2, width=64)),
    warmup=st.integers(0, 4),
    wd=st.sampled_from([0.0, 0.05, "schedule"]),
    r=st.sampled_from([0.0, 1.0]),
    power=st.sampled_from([0.0, 2.0]),
)
def test_schedule_free_equals_the_reference_step(kind, target, warmup, wd, r, power):
    t = torch.from_numpy(target)
    if wd == "schedule":
        wd = lambda count: 0.2 / (1 + count)  # noqa: E731
    A = torch.diag(torch.linspace(0.5, 2.0, 5, dtype=torch.float64))

    def grads_at(w):
        return A @ (w - t)  # a quadratic with its minimum at the target

    w0 = torch.zeros(5, dtype=torch.float64)
    lr, beta1, beta2, eps, steps = (0.3 if kind == "sgd" else 0.05), 0.9, 0.99, 1e-8, 12
    if kind == "sgd":
        tx = fr.schedule_free_sgd(
            lr, momentum=beta1, weight_decay=wd, warmup_steps=warmup, r=r, weight_lr_power=power
        )
    else:
        tx = fr.schedule_free_adamw(
            lr,
            betas=(beta1, beta2),
            eps=eps,
            weight_decay=wd,
            warmup_steps=warmup,
            r=r,
            weight_lr_power=power,
        )
    params = {"w": w0.clone()}
    state = tx.init(params)
    for _ in range(steps):
        u, state = tx.update({"w": grads_at(params["w"])}, state, params)
        params = fr.apply_updates(params, u)
    y, x = reference(kind, w0, grads_at, steps, lr, beta1, beta2, eps, wd, warmup, r, power)
    torch.testing.assert_close(params["w"], y, **TOL)
    torch.testing.assert_close(fr.schedule_free_eval_params(state)["w"], x, **TOL)


def test_uniform_weights_make_x_the_mean_of_the_z_sequence():
    """The paper's primal averaging: with weight_lr_power = 0 and r = 0, c_k = 1/k, so x_k is the
    mean of z_1..z_k (read from the state at each step)."""
    tx = fr.schedule_free_sgd(0.5, momentum=0.8, weight_lr_power=0.0)
    params = {"w": torch.tensor([3.0, -1.0], dtype=torch.float64)}
    state = tx.init(params)
    zs = []
    for _ in range(10):
        u, state = tx.update({"w": params["w"]}, state, params)  # the gradient of |w|^2 / 2
        params = fr.apply_updates(params, u)
        zs.append(state.z["w"].clone())
        torch.testing.assert_close(state.x["w"], torch.stack(zs).mean(dim=0), **TOL)
        torch.testing.assert_close(params["w"], 0.8 * state.x["w"] + 0.2 * state.z["w"], **TOL)


def test_schedule_free_in_make_step_compiled_and_vmapped():
    x = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def loss(p, x, y):
        return ((x @ p["w"] - y) ** 2).mean()

    finals = []
    for donate in (False, True):
        step = fr.make_step(loss, fr.schedule_free_adamw(0.05, warmup_steps=2), donate=donate)
        state = step.init({"w": torch.zeros(3, dtype=torch.float64)})
        for _ in range(6):
            state, _ = step(state, x, y)
        finals.append(state)
    torch.testing.assert_close(finals[1].params["w"], finals[0].params["w"], **TOL)
    tx = fr.schedule_free_sgd(0.2)
    p0 = {"w": torch.zeros(3, dtype=torch.float64)}
    eager = compiled = p0
    se, sc = tx.init(p0), tx.init(p0)
    update = torch.compile(tx.update, backend="eager", fullgraph=True)
    for _ in range(4):
        u, se = tx.update(torch.func.grad(loss)(eager, x, y), se, eager)
        eager = fr.apply_updates(eager, u)
        u, sc = update(torch.func.grad(loss)(compiled, x, y), sc, compiled)
        compiled = fr.apply_updates(compiled, u)
    torch.testing.assert_close(compiled["w"], eager["w"], **TOL)


def test_schedule_free_validation():
    with pytest.raises(ValueError, match="momentum"):
        fr.schedule_free_sgd(0.1, momentum=1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        fr.schedule_free_adamw(0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        fr.schedule_free_sgd(0.1, warmup_steps=-1)
    with pytest.raises(ValueError, match="found 0"):
        fr.schedule_free_eval_params(fr.sgd(0.1).init({"w": torch.ones(1)}))
    assert repr(fr.schedule_free_adamw(0.01, warmup_steps=5)) == "schedule_free_adamw(0.01, warmup_steps=5)"
    assert repr(fr.schedule_free_sgd(0.1)) == "schedule_free_sgd(0.1)"  # the defaults are not shown
    assert repr(fr.schedule_free_adamw(0.1)) == "schedule_free_adamw(0.1)"
    with pytest.raises(ValueError, match="momentum"):
        fr.schedule_free_sgd(0.1, momentum=0.0)
    # numbers fixed for the run, not swept tensors
    t = torch.tensor(0.1)
    for build in (
        lambda: fr.schedule_free_sgd(t),
        lambda: fr.schedule_free_sgd(0.1, momentum=t),
        lambda: fr.schedule_free_sgd(0.1, weight_decay=t),
        lambda: fr.schedule_free_sgd(0.1, r=t),
        lambda: fr.schedule_free_sgd(0.1, weight_lr_power=t),
        lambda: fr.schedule_free_adamw(0.1, eps=t),
    ):
        with pytest.raises(TypeError):
            build()
