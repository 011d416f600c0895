"""The four forms of a penalty (loss term, coupled edit, decoupled update, proximal step), checked
against each other, against ``torch.optim`` and against updates computed by hand.

Data gradients are random: the data loss is linear, ``sum_leaves <g_t, w>``, whose gradient is exactly
``g_t``. Trajectories of 1 to 5 steps are compared leaf by leaf: float64 ``atol=1e-10, rtol=1e-9``,
float32 ``atol=2e-5, rtol=1e-4``. Masks are checked bit for bit (``torch.equal``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import funcreg as fr

DTYPES = [torch.float32, torch.float64]
PER_DTYPE = pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
NP = {torch.float32: np.float32, torch.float64: np.float64}
TOL = {torch.float32: {"atol": 2e-5, "rtol": 1e-4}, torch.float64: {"atol": 1e-10, "rtol": 1e-9}}
TRAJECTORY = settings(
    deadline=None, max_examples=15, database=None, suppress_health_check=[HealthCheck.too_slow]
)


# --- strategies ---------------------------------------------------------------------------------------


def floats(dtype, lo, hi):
    return st.floats(
        lo,
        hi,
        allow_nan=False,
        allow_infinity=False,
        allow_subnormal=False,
        width=32 if dtype == torch.float32 else 64,
    )


def elements(dtype, hi=2.0):
    """Exact zeros (kinks) or 2^-20 <= |x| <= hi."""
    return st.one_of(st.just(0.0), floats(dtype, 2.0**-20, hi), floats(dtype, -hi, -(2.0**-20)))


def arr(dtype, shape, elems):
    return arrays(NP[dtype], shape, elements=elems).map(lambda a: torch.from_numpy(np.array(a, copy=True)))


@st.composite
def param_tree(draw, dtype):
    """{"w": matrix, "k": conv kernel, "b": vector, "s": 0-d}."""
    shapes = {
        "w": (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        "k": (
            draw(st.integers(1, 2)),
            draw(st.integers(1, 2)),
            draw(st.integers(1, 2)),
            draw(st.integers(1, 2)),
        ),
        "b": (draw(st.integers(1, 3)),),
        "s": (),
    }
    return {k: draw(arr(dtype, shape, elements(dtype))) for k, shape in shapes.items()}


def like(tree, hi=1.0):
    keys = list(tree)
    return st.tuples(
        *[arr(tree[k].dtype, tuple(tree[k].shape), elements(tree[k].dtype, hi)) for k in keys]
    ).map(lambda xs: dict(zip(keys, xs)))


UP_TO_5_STEPS = st.integers(1, 5)


@st.composite
def problem(draw, dtype, steps=UP_TO_5_STEPS):
    p = draw(param_tree(dtype), label="params")
    n = draw(steps, label="steps")
    grads = [draw(like(p), label=f"g{t}") for t in range(n)]
    return p, grads


# --- forms --------------------------------------------------------------------------------------------


def linear_loss(params, g):
    return sum((params[k] * g[k]).sum() for k in params)


def run_loss_term(P, opt, p, grads):
    f = fr.penalized(linear_loss, P)
    state = opt.init(p)
    history = []
    for g in grads:
        total_grad, _ = torch.func.grad(f, has_aux=True)(p, g)
        u, state = opt.update(total_grad, state, p)
        p = fr.apply_updates(p, u)
        history.append(p)
    return history


def run_tx(tx, p, grads):
    state = tx.init(p)
    history = []
    for g in grads:
        u, state = tx.update(g, state, p)
        p = fr.apply_updates(p, u)
        history.append(p)
    return history


def assert_histories_close(a, b, dtype, what, **tol):
    tol = tol or TOL[dtype]
    assert len(a) == len(b)
    for t, (x, y) in enumerate(zip(a, b)):
        assert list(x) == list(y)
        for k in x:
            assert x[k].dtype == dtype and x[k].shape == y[k].shape
            torch.testing.assert_close(
                x[k], y[k], **tol, msg=lambda m, t=t, k=k: f"{what}, step {t + 1}, {k}: {m}"
            )


ALIASES = {
    "sgd": lambda: fr.sgd(0.1),
    "sgd_momentum": lambda: fr.sgd(0.1, momentum=0.9),
    "sgd_nesterov": lambda: fr.sgd(0.05, momentum=0.8, nesterov=True),
    "sgd_dampening": lambda: fr.sgd(0.1, momentum=0.5, dampening=0.3),
    "adam": lambda: fr.adam(0.01),
    "adam_amsgrad": lambda: fr.adam(0.01, betas=(0.8, 0.99), amsgrad=True),
    "adamw": lambda: fr.adamw(0.01, weight_decay=0.1),
    "sgd_schedule": lambda: fr.sgd(fr.linear_schedule(0.1, 0.01, 4), momentum=0.5),
}


def penalty_catalogue(p, ref):
    """Built-in and custom penalties, with coefficients that are not round numbers."""
    return {
        "l2": fr.l2(0.0731),
        "l1": fr.l1(0.0473),
        "elastic_net": fr.elastic_net(0.0391, 0.0817),
        "lp3": fr.lp(0.0613, 3),
        "group_lasso": fr.group_lasso(0.0529),
        "group_lasso_cols": fr.group_lasso(0.0529, axis=1),
        "anchor": fr.anchor(0.137, ref),
        "orthogonal": fr.orthogonal(0.0117),
        "custom": fr.penalty(lambda q: 0.0213 * sum((x**4).sum() for x in q.values()), name="quartic"),
        "sum": fr.l2(0.0731) + 2.0 * fr.l1(0.0211, mask={"w": True, "k": False, "b": True, "s": False}),
    }


PENALTY_NAMES = list(penalty_catalogue({}, {}))


@pytest.mark.parametrize("alias", sorted(ALIASES))
@PER_DTYPE
@TRAJECTORY
@given(data=st.data())
def test_loss_term_equals_coupled_edit_for_any_optimizer(alias, dtype, data):
    p, grads = data.draw(problem(dtype))
    ref = data.draw(like(p, hi=2.0), label="reference")
    name = data.draw(st.sampled_from(PENALTY_NAMES), label="penalty")
    P = penalty_catalogue(p, ref)[name]
    opt = ALIASES[alias]()
    loss_term = run_loss_term(P, opt, p, grads)
    coupled = run_tx(fr.chain(fr.add_penalty_grad(P), opt), p, grads)
    assert_histories_close(coupled, loss_term, dtype, f"{name} with {alias}: coupled vs loss term")


@PER_DTYPE
@TRAJECTORY
@given(data=st.data(), lr=st.floats(1e-3, 0.5), scheduled=st.booleans())
def test_plain_sgd_loss_term_coupled_and_decoupled_agree(dtype, data, lr, scheduled):
    p, grads = data.draw(problem(dtype))
    ref = data.draw(like(p, hi=2.0), label="reference")
    name = data.draw(st.sampled_from(PENALTY_NAMES), label="penalty")
    P = penalty_catalogue(p, ref)[name]
    rate = fr.linear_schedule(lr, lr / 10, 3) if scheduled else lr
    loss_term = run_loss_term(P, fr.sgd(rate), p, grads)
    coupled = run_tx(fr.chain(fr.add_penalty_grad(P), fr.sgd(rate)), p, grads)
    decoupled = run_tx(fr.chain(fr.sgd(rate), fr.decoupled(P, learning_rate=rate)), p, grads)
    assert_histories_close(coupled, loss_term, dtype, f"{name}: coupled vs loss term")
    assert_histories_close(decoupled, loss_term, dtype, f"{name}: decoupled vs loss term")


def test_decoupled_differs_with_momentum_by_hand():
    """l2(0.5), SGD(lr=0.1, momentum=0.9), zero data gradient, w0 = 1, two steps.
    coupled:   b1 = 0.5,               w1 = 0.95;  b2 = 0.9*0.5 + 0.5*0.95 = 0.925, w2 = 0.8575
    decoupled: momentum sees 0: w1 = 1 - 0.1*0.5*1 = 0.95; w2 = 0.95 - 0.1*0.5*0.95 = 0.9025"""
    p = {"w": torch.tensor([1.0], dtype=torch.float64)}
    grads = [{"w": torch.zeros(1, dtype=torch.float64)}] * 2
    P = fr.l2(0.5)
    coupled = run_tx(fr.chain(fr.add_penalty_grad(P), fr.sgd(0.1, momentum=0.9)), p, grads)
    decoupled = run_tx(fr.chain(fr.sgd(0.1, momentum=0.9), fr.decoupled(P, learning_rate=0.1)), p, grads)
    loss_term = run_loss_term(P, fr.sgd(0.1, momentum=0.9), p, grads)
    close = {"atol": 1e-15, "rtol": 0}
    torch.testing.assert_close(coupled[-1]["w"], torch.tensor([0.8575], dtype=torch.float64), **close)
    torch.testing.assert_close(loss_term[-1]["w"], torch.tensor([0.8575], dtype=torch.float64), **close)
    torch.testing.assert_close(decoupled[-1]["w"], torch.tensor([0.9025], dtype=torch.float64), **close)
    # torch.optim agrees with the coupled form
    w = torch.nn.Parameter(p["w"].clone())
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.5)
    for _ in range(2):
        w.grad = torch.zeros(1, dtype=torch.float64)
        opt.step()
    torch.testing.assert_close(w.detach(), coupled[-1]["w"], **close)


def test_decoupled_differs_with_adam_by_hand():
    """l2(0.5), Adam(lr=0.1), zero data gradient, w0 = 1: the first coupled step is
    lr * 0.5/(0.5 + eps) ~ 0.1 (Adam divides the penalty's gradient by its own size); the decoupled step
    is lr*0.5*w = 0.05 (Adam's own step is 0/(0 + eps) = 0)."""
    p = {"w": torch.tensor([1.0], dtype=torch.float64)}
    grads = [{"w": torch.zeros(1, dtype=torch.float64)}]
    P = fr.l2(0.5)
    coupled = run_tx(fr.chain(fr.add_penalty_grad(P), fr.adam(0.1)), p, grads)
    decoupled = run_tx(fr.chain(fr.adam(0.1), fr.decoupled(P, learning_rate=0.1)), p, grads)
    torch.testing.assert_close(
        coupled[-1]["w"],
        torch.tensor([1 - 0.1 * 0.5 / (0.5 + 1e-8)], dtype=torch.float64),
        atol=1e-15,
        rtol=0,
    )
    torch.testing.assert_close(
        decoupled[-1]["w"], torch.tensor([0.95], dtype=torch.float64), atol=1e-15, rtol=0
    )
    adam = torch_run(lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.5), p, grads)
    adamw = torch_run(lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.5), p, grads)
    torch.testing.assert_close(coupled[-1]["w"], adam[-1]["w"], atol=1e-15, rtol=0)
    torch.testing.assert_close(decoupled[-1]["w"], adamw[-1]["w"], atol=1e-15, rtol=0)


def torch_run(make_opt, p, grads):
    ps = {k: torch.nn.Parameter(v.clone()) for k, v in p.items()}
    opt = make_opt(list(ps.values()))
    history = []
    for g in grads:
        for k, param in ps.items():
            param.grad = g[k].clone()
        opt.step()
        history.append({k: v.detach().clone() for k, v in ps.items()})
    return history


@PER_DTYPE
@TRAJECTORY
@given(data=st.data(), lr=st.floats(1e-3, 0.1), wd=st.floats(1e-3, 1.0), amsgrad=st.booleans())
def test_adam_coupled_is_torch_adam_and_decoupled_is_torch_adamw(dtype, data, lr, wd, amsgrad):
    p, grads = data.draw(problem(dtype))
    coupled = run_tx(fr.chain(fr.add_penalty_grad(fr.l2(wd)), fr.adam(lr, amsgrad=amsgrad)), p, grads)
    decoupled = run_tx(
        fr.chain(fr.adam(lr, amsgrad=amsgrad), fr.decoupled(fr.l2(wd), learning_rate=lr)), p, grads
    )
    adam = torch_run(lambda ps: torch.optim.Adam(ps, lr=lr, weight_decay=wd, amsgrad=amsgrad), p, grads)
    adamw = torch_run(lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=wd, amsgrad=amsgrad), p, grads)
    assert_histories_close(coupled, adam, dtype, "coupled l2 + adam vs torch Adam(weight_decay)")
    assert_histories_close(decoupled, adamw, dtype, "adam + decoupled l2 vs torch AdamW")


@PER_DTYPE
@TRAJECTORY
@given(
    data=st.data(),
    lr=st.floats(1e-3, 0.5),
    wd=st.floats(1e-3, 1.0),
    momentum=st.sampled_from([0.0, 0.9]),
    nesterov=st.booleans(),
)
def test_sgd_weight_decay_is_l2_loss_term_and_torch_sgd(dtype, data, lr, wd, momentum, nesterov):
    nesterov = nesterov and momentum > 0
    p, grads = data.draw(problem(dtype))
    builtin = run_tx(fr.sgd(lr, momentum=momentum, nesterov=nesterov, weight_decay=wd), p, grads)
    loss_term = run_loss_term(fr.l2(wd), fr.sgd(lr, momentum=momentum, nesterov=nesterov), p, grads)
    reference = torch_run(
        lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd), p, grads
    )
    assert_histories_close(builtin, reference, dtype, "fr.sgd(weight_decay) vs torch SGD(weight_decay)")
    assert_histories_close(loss_term, reference, dtype, "l2 loss term + fr.sgd vs torch SGD(weight_decay)")


@PER_DTYPE
@TRAJECTORY
@given(data=st.data(), wd=st.floats(0.0, 1.0), lr=st.floats(1e-3, 0.5))
def test_weight_decay_transforms_are_l2_penalty_forms(dtype, data, wd, lr):
    p, grads = data.draw(problem(dtype, steps=st.integers(1, 3)))
    for g in grads:
        u1, _ = fr.add_decayed_weights(wd).update(g, fr.add_decayed_weights(wd).init(p), p)
        u2, _ = fr.add_penalty_grad(fr.l2(wd)).update(g, fr.add_penalty_grad(fr.l2(wd)).init(p), p)
        d1, _ = fr.decoupled_weight_decay(wd, lr, scale_by="learning_rate").update(
            g, fr.decoupled_weight_decay(wd, lr, scale_by="learning_rate").init(p), p
        )
        d2, _ = fr.decoupled(fr.l2(wd), lr).update(g, fr.decoupled(fr.l2(wd), lr).init(p), p)
        for k in p:
            expected_coupled = g[k] + wd * p[k]
            expected_decoupled = g[k] - lr * wd * p[k]
            torch.testing.assert_close(u1[k], expected_coupled, **TOL[dtype])
            torch.testing.assert_close(u2[k], expected_coupled, **TOL[dtype])
            torch.testing.assert_close(d1[k], expected_decoupled, **TOL[dtype])
            torch.testing.assert_close(d2[k], expected_decoupled, **TOL[dtype])
    # in chains over several steps, with momentum and with Adam, and with a schedule
    sched = fr.linear_schedule(lr, lr / 4, 2)
    for opt in (fr.sgd(lr, momentum=0.9), fr.adam(lr / 10)):
        a = run_tx(fr.chain(fr.add_decayed_weights(wd), opt), p, grads)
        b = run_tx(fr.chain(fr.add_penalty_grad(fr.l2(wd)), opt), p, grads)
        assert_histories_close(a, b, dtype, "add_decayed_weights vs add_penalty_grad(l2)")
        a = run_tx(fr.chain(opt, fr.decoupled_weight_decay(wd, sched, scale_by="learning_rate")), p, grads)
        b = run_tx(fr.chain(opt, fr.decoupled(fr.l2(wd), sched)), p, grads)
        assert_histories_close(a, b, dtype, "decoupled_weight_decay vs decoupled(l2)")


def soft_threshold(v, t):
    return torch.sign(v) * torch.clamp(v.abs() - t, min=0)


@PER_DTYPE
@TRAJECTORY
@given(data=st.data(), lr0=st.floats(0.01, 1.0), c=st.floats(0.01, 2.0), scheduled=st.booleans())
def test_proximal_l1_after_sgd_is_ista(dtype, data, lr0, c, scheduled):
    p, grads = data.draw(problem(dtype))
    rate = fr.linear_schedule(lr0, lr0 / 5, 3) if scheduled else lr0
    history = run_tx(fr.chain(fr.sgd(rate), fr.proximal(fr.l1(c), learning_rate=rate)), p, grads)
    w = p
    for step, (g, actual) in enumerate(zip(grads, history)):
        lr = lr0 + (lr0 / 5 - lr0) * min(step / 3, 1.0) if scheduled else lr0  # the schedule by hand
        t = lr * c
        moved = {k: w[k] - lr * g[k] for k in w}
        w = {k: soft_threshold(moved[k], t) for k in w}  # ISTA by hand
        for k in w:
            torch.testing.assert_close(
                actual[k], w[k], **TOL[dtype], msg=lambda m, k=k, step=step: f"step {step + 1} {k}: {m}"
            )
            clearly_zero = moved[k].abs() < t * (1 - 1e-4)
            assert torch.all(actual[k][clearly_zero] == 0), f"step {step + 1} {k}: not exact zeros"
        w = actual  # continue from the library's point (rounding does not accumulate)


def test_proximal_l1_gives_exact_zeros_subgradient_does_not():
    """The optimum of <g, w> + c*|w| with |g| < c is w = 0. Proximal SGD reaches it exactly; the
    subgradient form oscillates around it and never lands on 0."""
    w0 = {"w": torch.tensor([0.3137, -0.2718, 0.0577, -0.1414, 0.5772], dtype=torch.float64)}
    g = {"w": torch.tensor([1.3e-4, -2.7e-4, 0.9e-4, 3.1e-4, -1.1e-4], dtype=torch.float64)}
    c, lr, steps = 1.0, 0.0123, 200
    grads = [g] * steps
    prox = run_tx(fr.chain(fr.sgd(lr), fr.proximal(fr.l1(c), learning_rate=lr)), w0, grads)[-1]["w"]
    sub = run_tx(fr.chain(fr.add_penalty_grad(fr.l1(c)), fr.sgd(lr)), w0, grads)
    assert torch.equal(prox, torch.zeros(5, dtype=torch.float64)), prox
    assert all(torch.all(h["w"] != 0) for h in sub), "the subgradient form landed on an exact zero"
    final = sub[-1]["w"]
    assert torch.all(final.abs() <= lr * (c + 1e-3)), final  # it oscillates within one step of 0


# --- observability ------------------------------------------------------------------------------------


@PER_DTYPE
@TRAJECTORY
@given(data=st.data())
def test_penalty_states_hold_the_value_at_the_params_of_each_update(dtype, data):
    p0, grads = data.draw(problem(dtype))
    ref = data.draw(like(p0, hi=2.0), label="reference")
    P = fr.l2(0.0731) + fr.l1(0.0473, name="sparse") + fr.anchor(0.137, ref)
    for form, tx in (
        ("coupled", fr.chain(fr.add_penalty_grad(P), fr.sgd(0.1, momentum=0.9))),
        (
            "decoupled",
            fr.named_chain(("adam", fr.adam(0.01)), ("decay", fr.decoupled(P, learning_rate=0.01))),
        ),
        ("proximal", fr.chain(fr.sgd(0.1), fr.proximal(fr.l1(0.0473), learning_rate=0.1))),
    ):
        Q = fr.l1(0.0473) if form == "proximal" else P
        p, state = p0, tx.init(p0)
        (s,) = fr.penalty_states(state)
        assert int(s.count) == 0
        torch.testing.assert_close(s.value, Q(p0), **TOL[dtype])
        for t, g in enumerate(grads):
            u, state = tx.update(g, state, p)
            (s,) = fr.penalty_states(state)
            assert isinstance(s, fr.PenaltyState) and int(s.count) == t + 1
            expected_terms = Q.terms(p)  # at the params this update was computed from
            torch.testing.assert_close(
                s.value, Q(p), **TOL[dtype], msg=lambda m, form=form, t=t: f"{form} step {t + 1}: {m}"
            )
            assert list(s.terms) == list(expected_terms)
            for name in expected_terms:
                torch.testing.assert_close(s.terms[name], expected_terms[name], **TOL[dtype])
            assert not s.value.requires_grad
            p = fr.apply_updates(p, u)


@PER_DTYPE
@settings(deadline=None, max_examples=20, database=None)
@given(data=st.data())
def test_penalized_metrics(dtype, data):
    p, (g,) = data.draw(problem(dtype, steps=st.just(1)))
    P = fr.l2(0.0731) + fr.group_lasso(0.0529, name="groups")
    f = fr.penalized(linear_loss, P)
    grad, (total, metrics) = torch.func.grad_and_value(f, has_aux=True)(p, g)
    assert set(metrics) == {"data_loss", "penalty", "penalty/l2", "penalty/groups", "total"}
    data_loss = linear_loss(p, g)
    torch.testing.assert_close(metrics["data_loss"], data_loss, **TOL[dtype])
    torch.testing.assert_close(metrics["penalty/l2"], fr.l2(0.0731)(p), **TOL[dtype])
    torch.testing.assert_close(metrics["penalty/groups"], fr.group_lasso(0.0529)(p), **TOL[dtype])
    torch.testing.assert_close(metrics["penalty"], P(p), **TOL[dtype])
    torch.testing.assert_close(metrics["total"], data_loss + P(p), **TOL[dtype])
    torch.testing.assert_close(total, metrics["total"], **TOL[dtype])
    for k in p:
        torch.testing.assert_close(grad[k], g[k] + P.grad(p)[k], **TOL[dtype])
    # has_aux passes the loss function's aux through
    f_aux = fr.penalized(lambda q, g: (linear_loss(q, g), {"n": 3}), P, has_aux=True)
    _, metrics = f_aux(p, g)
    assert metrics["aux"] == {"n": 3}


# --- story 1: XOR ------------------------------------------------------------------------------------


def xor_setup():
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 2), torch.nn.Sigmoid(), torch.nn.Linear(2, 1), torch.nn.Sigmoid()
    ).double()
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[0.0], [1.0], [1.0], [0.0]], dtype=torch.float64)
    return model, x, y


def test_story1_xor_three_ways_identical():
    lr, wd, epochs = 2.0, 0.1, 5
    model, x, y = xor_setup()
    p0 = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss_fn(params):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)

    # 1. torch.optim.SGD(weight_decay)
    ps = {k: torch.nn.Parameter(v.clone()) for k, v in p0.items()}
    opt = torch.optim.SGD(ps.values(), lr=lr, weight_decay=wd)
    torch_hist = []
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(torch.func.functional_call(model, dict(ps), (x,)), y)
        torch_hist.append(loss.item())
        loss.backward()
        opt.step()
    # 2. the loss term, observable
    f = fr.penalized(loss_fn, fr.l2(wd))
    tx = fr.sgd(lr)
    p, state = p0, tx.init(p0)
    term_hist, table = [], []
    for _ in range(epochs):
        grads, (_, m) = torch.func.grad_and_value(f, has_aux=True)(p)
        sq = sum(v.square().sum() for v in p.values())
        table.append((m["data_loss"].item(), sq.item(), m["penalty/l2"].item(), m["total"].item()))
        torch.testing.assert_close(m["penalty/l2"], wd / 2 * sq, atol=1e-15, rtol=0)
        term_hist.append(m["data_loss"].item())
        u, state = tx.update(grads, state, p)
        p = fr.apply_updates(p, u)
    # 3. the gradient edit, observable through its state
    tx3 = fr.chain(fr.add_penalty_grad(fr.l2(wd)), fr.sgd(lr))
    p3, state3 = p0, tx3.init(p0)
    edit_hist = []
    for epoch in range(epochs):
        g, loss = torch.func.grad_and_value(loss_fn)(p3)
        edit_hist.append(loss.item())
        u, state3 = tx3.update(g, state3, p3)
        (s,) = fr.penalty_states(state3)
        assert abs(s.value.item() - table[epoch][2]) <= 1e-12
        p3 = fr.apply_updates(p3, u)
    assert max(abs(a - b) for a, b in zip(torch_hist, term_hist)) <= 1e-12, (torch_hist, term_hist)
    assert max(abs(a - b) for a, b in zip(torch_hist, edit_hist)) <= 1e-12, (torch_hist, edit_hist)
    for k in p0:
        torch.testing.assert_close(p[k], ps[k].detach(), atol=1e-12, rtol=0)
        torch.testing.assert_close(p3[k], ps[k].detach(), atol=1e-12, rtol=0)
    assert torch_hist[0] != torch_hist[-1]  # it trained


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")
def test_story1_detached_penalty_does_not_regularize():
    """The trap of story 1: a penalty built with torch.tensor([...]) has the right value and no gradient,
    so training with it is training without it."""
    lr, wd, epochs = 2.0, 0.1, 5
    model, x, y = xor_setup()
    p0 = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss_fn(params):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)

    trap = fr.penalty(
        lambda q: wd / 2 * torch.tensor([w.square().sum() for w in q.values()]).sum(), name="trap"
    )
    runs = {}
    for name, P in (("trap", trap), ("l2", fr.l2(wd))):
        g = torch.func.grad(P)(p0)
        nonzero = any(bool(v.abs().sum() > 0) for v in g.values())
        assert nonzero == (name == "l2"), name
        runs[name] = run_loss_term_fn(fr.penalized(loss_fn, P), fr.sgd(lr), p0, epochs)
    runs["none"] = run_loss_term_fn(lambda q: (loss_fn(q), {}), fr.sgd(lr), p0, epochs)
    for k in p0:
        assert torch.equal(runs["trap"][k], runs["none"][k])
        assert not torch.equal(runs["l2"][k], runs["none"][k])


def run_loss_term_fn(f, tx, p, epochs):
    state = tx.init(p)
    for _ in range(epochs):
        grads, _ = torch.func.grad(f, has_aux=True)(p)
        u, state = tx.update(grads, state, p)
        p = fr.apply_updates(p, u)
    return p


# --- masks: unselected leaves are bit for bit unpenalized, in every form --------------------------------

MASK_PENALTIES = ["l2", "l1", "elastic_net", "lp3", "anchor", "custom"]


def masked_penalty(name, mask, ref):
    return {
        "l2": lambda: fr.l2(0.0731, mask=mask),
        "l1": lambda: fr.l1(0.0473, mask=mask),
        "elastic_net": lambda: fr.elastic_net(0.0391, 0.0817, mask=mask),
        "lp3": lambda: fr.lp(0.0613, 3, mask=mask),
        "anchor": lambda: fr.anchor(0.137, ref, mask=mask),
        "custom": lambda: fr.penalty(
            lambda q: 0.0213 * sum((x**4).sum() for x in q.values() if x is not None),
            name="quartic",
            mask=mask,
        ),
    }[name]()


def make_mask(kind, selected, keys):
    if kind == "bool_tree":
        return {k: k in selected for k in keys}
    if kind == "by_name":
        return fr.by_name(*sorted(selected))
    if kind == "callable":
        return lambda params: {k: k in selected for k in params}
    if kind == "selection":
        return fr.Selection({k: k in selected for k in keys})
    raise AssertionError(kind)


@PER_DTYPE
@settings(deadline=None, max_examples=30, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_masks_leave_unselected_leaves_bitwise_unpenalized(dtype, data):
    p, grads = data.draw(problem(dtype))
    ref = data.draw(like(p, hi=2.0), label="reference")
    keys = list(p)
    if data.draw(st.booleans(), label="default selection"):
        # group lasso and orthogonal select matrices only by default: b and s are unselected
        name = data.draw(st.sampled_from(["group_lasso", "orthogonal"]), label="penalty")
        P = fr.group_lasso(0.0529) if name == "group_lasso" else fr.orthogonal(0.0117)
        selected = {"w", "k"}
    else:
        selected = set(
            data.draw(
                st.lists(st.sampled_from(keys), min_size=1, max_size=len(keys) - 1, unique=True),
                label="selected",
            )
        )
        kind = data.draw(
            st.sampled_from(["bool_tree", "by_name", "callable", "selection"]), label="mask kind"
        )
        name = data.draw(st.sampled_from(MASK_PENALTIES), label="penalty")
        P = masked_penalty(name, make_mask(kind, selected, keys), ref)
    assert P.selection(p) == {k: k in selected for k in keys}
    alias = data.draw(st.sampled_from(sorted(ALIASES)), label="optimizer")
    lr = 0.05
    plain = run_tx(ALIASES[alias](), p, grads)
    forms = {
        "loss term": run_loss_term(P, ALIASES[alias](), p, grads),
        "coupled": run_tx(fr.chain(fr.add_penalty_grad(P), ALIASES[alias]()), p, grads),
        "decoupled": run_tx(fr.chain(ALIASES[alias](), fr.decoupled(P, learning_rate=lr)), p, grads),
    }
    if P.has_prox:
        forms["proximal"] = run_tx(fr.chain(ALIASES[alias](), fr.proximal(P, learning_rate=lr)), p, grads)
    for form, history in forms.items():
        for t, (h, ref_h) in enumerate(zip(history, plain)):
            for k in keys:
                if k not in selected:
                    assert torch.equal(h[k], ref_h[k]), (
                        f"{name} {form} step {t + 1}: unselected {k!r} changed"
                    )
    # and the selected ones were penalized (in some step, for some form) unless the penalty is flat there
    moved = any(not torch.equal(h[-1][k], plain[-1][k]) for h in forms.values() for k in selected)
    flat = all(P.grad(p)[k].abs().sum() == 0 for k in selected) and all(
        torch.equal(P.prox(p, lr)[k], p[k]) for k in selected if P.has_prox
    )
    assert moved or flat


# --- bad input to the forms -------------------------------------------------------------------------------


def test_forms_bad_input():
    p = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    with pytest.raises(NotImplementedError, match=r"'orthogonal'.*proximal"):
        fr.proximal(fr.orthogonal(0.1), learning_rate=0.1)
    with pytest.raises(NotImplementedError, match=r"'l3'.*proximal"):
        fr.proximal(fr.lp(0.1, 3), learning_rate=0.1)
    for form in (fr.add_penalty_grad, fr.decoupled, fr.penalized):
        with pytest.raises(TypeError, match="penalty"):
            form(0.1) if form is not fr.penalized else form(linear_loss, 0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        fr.decoupled(fr.l2(0.1), learning_rate=-1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        fr.proximal(fr.l1(0.1), learning_rate=float("nan"))
    tx = fr.add_penalty_grad(fr.l2(0.1, mask={"w": False, "b": False}))
    with pytest.raises(ValueError, match="selects no parameter"):
        tx.init(p)
    tx = fr.add_penalty_grad(fr.l2(0.1))
    with pytest.raises(ValueError, match="params"):
        tx.update(p, tx.init(p))  # the coupled form needs the parameters
    with pytest.raises(NotImplementedError, match="constraint"):
        tx = fr.add_penalty_grad(fr.max_norm(1.0))
        tx.update(p, tx.init(p), p)
    # a constraint works as a projection
    tx = fr.chain(
        fr.sgd(1.0),
        fr.proximal(fr.max_norm(1.0) + fr.non_negative(mask={"w": False, "b": True}), learning_rate=1.0),
    )
    u, _ = tx.update({"w": -torch.ones(2, 2), "b": torch.tensor([2.0, -1.0])}, tx.init(p), p)
    new = fr.apply_updates(p, u)
    torch.testing.assert_close(new["w"], torch.full((2, 2), 2.0**-0.5), atol=1e-7, rtol=0)
    torch.testing.assert_close(new["b"], torch.tensor([0.0, 2.0]), atol=0, rtol=0)
