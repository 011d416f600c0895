"""``fr.accumulate``: k micro-batches, one real step, checked against torch.optim's accumulation recipe.

The reference is torch.optim used as its users accumulate: the loss of each micro-batch divided by
k, ``backward`` k times, ``step`` and ``zero_grad`` once (equal-sized micro-batches, so this is the
mean loss of their concatenation). Data are drawn by Hypothesis (NumPy, then ``torch.from_numpy``);
float64, ``atol=1e-12, rtol=1e-10``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import funcreg as fr

PROPERTY = settings(deadline=None, max_examples=10, database=None)
TOL = {"atol": 1e-12, "rtol": 1e-10}
F64 = torch.float64

OPTIMIZERS = {
    # name: (funcreg transform, torch.optim optimizer over a parameter list)
    "sgd_momentum_coupled": (
        lambda: fr.chain(fr.add_decayed_weights(0.1), fr.sgd(0.05, momentum=0.9)),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1),
    ),
    "adam": (lambda: fr.adam(0.01), lambda ps: torch.optim.Adam(ps, lr=0.01)),
    "adamw": (
        lambda: fr.adamw(0.01, weight_decay=0.3),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.3),
    ),
}


def loss(p, x, y):
    return ((x @ p["w"] + p["b"] - y) ** 2).mean()


@st.composite
def problems(draw):
    k = draw(st.integers(1, 4))
    per = draw(st.integers(1, 3))
    real_steps = draw(st.integers(1, 3))
    n = k * per * real_steps
    el = st.floats(-2, 2, allow_nan=False, width=64)
    x = draw(arrays(np.float64, (n, 3), elements=el))
    y = draw(arrays(np.float64, (n,), elements=el))
    w = draw(arrays(np.float64, (3,), elements=el))
    return k, per, torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(w)


def _torch_reference(make_torch, k, per, x, y, w0):
    w = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(torch.zeros((), dtype=F64))
    opt = make_torch([w, b])
    for start in range(0, x.shape[0], k * per):
        opt.zero_grad()
        for m in range(k):
            sl = slice(start + m * per, start + (m + 1) * per)
            (loss({"w": w, "b": b}, x[sl], y[sl]) / k).backward()
        opt.step()
    return {"w": w.detach(), "b": b.detach()}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@PROPERTY
@given(problem=problems(), donate=st.booleans())
def test_accumulate_equals_torch_optims_accumulation(name, problem, donate):
    k, per, x, y, w0 = problem
    make_fr, make_torch = OPTIMIZERS[name]
    tx = fr.accumulate(make_fr(), every=k)
    params = {"w": w0.clone(), "b": torch.zeros((), dtype=F64)}
    state = tx.init(params)
    for m in range(x.shape[0] // per):
        sl = slice(m * per, (m + 1) * per)
        grads = torch.func.grad(loss)(params, x[sl], y[sl])
        if donate:
            params, state = fr.donated_update(tx, grads, state, params)
        else:
            u, state = tx.update(grads, state, params)
            params = fr.apply_updates(params, u)
    expected = _torch_reference(make_torch, k, per, x, y, w0)
    for key in params:
        torch.testing.assert_close(params[key], expected[key], **TOL)
    assert int(state.mini_step) == 0


def test_a_decoupled_penalty_inside_acts_once_per_real_step():
    """``accumulate(chain(sgd, decoupled(P)), k)`` over k micro-batches is one step of
    ``chain(sgd, decoupled(P))`` on their concatenation (the mean loss)."""
    gen = np.random.default_rng(0)
    x, y = torch.from_numpy(gen.normal(size=(8, 3))), torch.from_numpy(gen.normal(size=8))
    p0 = {"w": torch.from_numpy(gen.normal(size=3)), "b": torch.zeros((), dtype=F64)}

    def inner():
        return fr.chain(fr.sgd(0.1, momentum=0.9), fr.decoupled(fr.l1(0.05), learning_rate=0.1))

    acc, one = fr.accumulate(inner(), every=4), inner()
    pa, sa = dict(p0), acc.init(p0)
    po, so = dict(p0), one.init(p0)
    for _ in range(3):
        for m in range(4):
            u, sa = acc.update(torch.func.grad(loss)(pa, x[2 * m : 2 * m + 2], y[2 * m : 2 * m + 2]), sa, pa)
            pa = fr.apply_updates(pa, u)
        u, so = one.update(torch.func.grad(loss)(po, x, y), so, po)
        po = fr.apply_updates(po, u)
    for key in p0:
        torch.testing.assert_close(pa[key], po[key], **TOL)


def test_accumulate_traced_equals_eager():
    """Under vmap and torch.compile every micro-step runs the inner transform and keeps it only at
    the last: the same trajectory as eager, which runs it only then."""
    gen = np.random.default_rng(1)
    x, y = torch.from_numpy(gen.normal(size=(6, 3))), torch.from_numpy(gen.normal(size=6))
    p0 = {"w": torch.from_numpy(gen.normal(size=3)), "b": torch.zeros((), dtype=F64)}
    tx = fr.accumulate(fr.adamw(0.01, weight_decay=0.1), every=3)

    def run(update):
        p, s = dict(p0), tx.init(p0)
        for m in range(6):
            g = torch.func.grad(loss)(p, x[m : m + 1], y[m : m + 1])
            u, s = update(g, s, p)
            p = fr.apply_updates(p, u)
        return p

    eager = run(tx.update)
    compiled = run(torch.compile(tx.update, backend="eager", fullgraph=True))
    stacked = fr.stack([p0, p0])
    vs = fr.vmap(tx.init)(stacked)
    vp = stacked
    for m in range(6):
        g = torch.func.vmap(torch.func.grad(loss), in_dims=(0, None, None))(vp, x[m : m + 1], y[m : m + 1])
        u, vs = fr.vmap(tx.update)(g, vs, vp)
        vp = fr.apply_updates(vp, u)
    for key in p0:
        torch.testing.assert_close(compiled[key], eager[key], **TOL)
        torch.testing.assert_close(vp[key][1], eager[key], **TOL)


def test_accumulate_in_torch_optimizer_and_make_step():
    """The factory form steps once per ``every`` calls of ``opt.step()`` (zero_grad at each
    micro-batch), as torch.optim does with ``step`` every k micro-batches."""
    gen = np.random.default_rng(2)
    x, y = torch.from_numpy(gen.normal(size=(8, 3))), torch.from_numpy(gen.normal(size=8))
    w0 = torch.from_numpy(gen.normal(size=3))
    w = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(torch.zeros((), dtype=F64))
    opt = fr.TorchOptimizer([("w", w), ("b", b)], lambda lr: fr.accumulate(fr.adam(lr), every=2), lr=0.01)
    for m in range(8):
        opt.zero_grad()
        loss({"w": w, "b": b}, x[m : m + 1], y[m : m + 1]).backward()
        opt.step()
    expected = _torch_reference(lambda ps: torch.optim.Adam(ps, lr=0.01), 2, 1, x, y, w0)
    torch.testing.assert_close(w.detach(), expected["w"], **TOL)
    step = fr.make_step(loss, fr.accumulate(fr.adam(0.01), every=2), donate=True)
    state = step.init({"w": w0.clone(), "b": torch.zeros((), dtype=F64)})
    for m in range(8):
        state, _ = step(state, x[m : m + 1], y[m : m + 1])
    torch.testing.assert_close(state.params["w"], expected["w"], **TOL)


def test_accumulate_validation():
    with pytest.raises(TypeError, match="GradientTransformation"):
        fr.accumulate(0.1, every=2)
    with pytest.raises(ValueError, match="every"):
        fr.accumulate(fr.sgd(0.1), every=0)
    tx = fr.accumulate(fr.sgd(0.1), every=2)
    state = tx.init({"w": torch.zeros(2)})
    with pytest.raises(fr.StructureError):
        tx.update({"v": torch.zeros(2)}, state, {"v": torch.zeros(2)})
    assert repr(tx) == "accumulate(sgd(0.1), 2)"
