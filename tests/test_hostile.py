"""Hostile but ordinary input: every case gets a named error or the right answer.

Organised by family: hyperparameters, trees and shapes, dtypes and devices, schedules, state,
threads, complex parameters, differentiation, overflow, ownership (funcreg never writes into the
caller's tensors, and a penalty owns its reference). Each test asserts the exact error type and that
the message names the culprit, or checks the result against torch.optim, autograd, finite
differences or a closed form derived here.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from helpers import SLOW_OK
from helpers import TRANSFORMS as ALIASES
from hypothesis import given, settings
from hypothesis import strategies as st

import funcreg as fr
from funcreg._src.core.errors import ContractError, LeafTypeError, SelectionError, StructureError
from funcreg.testing import tensors

F32, F64 = torch.float32, torch.float64


def two_leaf_params(dtype=F32):
    return {
        "w": torch.arange(6, dtype=dtype).reshape(2, 3) / 10 + 0.1,
        "b": torch.arange(3, dtype=dtype) / 10 - 0.1,
    }


# -- hyperparameters ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda v: fr.sgd(v), "learning_rate"),
        (lambda v: fr.adam(0.1, weight_decay=v), "weight_decay"),
        (lambda v: fr.adamw(v), "learning_rate"),
        (lambda v: fr.scale(v), "step_size"),
        (lambda v: fr.l2(v), "coeff"),
        (lambda v: fr.decoupled(fr.l2(0.1), learning_rate=v), "learning_rate"),
        (lambda v: fr.proximal(fr.l1(0.1), learning_rate=v), "learning_rate"),
        (lambda v: fr.clip_by_global_norm(v), "max_norm"),
    ],
)
@settings(deadline=None, max_examples=10)
@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=2))
def test_tensor_hyperparameters_are_0d(build, argument, shape):
    """A (3,)-tensor learning rate would broadcast into a per-column rate: refused, naming the argument."""
    with pytest.raises(ValueError, match=rf"Invalid {argument} value.*0-d tensor"):
        build(torch.full(tuple(shape), 0.1))
    build(torch.tensor(0.1))  # a 0-d tensor is fine


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_hyperparameters(value):
    with pytest.raises(ValueError, match="Invalid learning_rate value"):
        fr.adamw(value)
    with pytest.raises(ValueError, match="Invalid weight_decay value"):
        fr.sgd(0.1, weight_decay=value)


def test_per_member_hyperparameters_are_checked_before_vmap():
    loss = lambda p, x: ((p["w"] * x).sum() - 1.0) ** 2
    ens = fr.ensemble_step(fr.make_step(loss, lambda h: fr.sgd(0.1, weight_decay=h["wd"])))
    with pytest.raises(ValueError, match=r"member 1 \(hparams \{'wd': -5.0\}\).*weight_decay"):
        ens.init({"w": torch.ones(2, 2)}, hparams={"wd": torch.tensor([0.1, -5.0])})
    state = ens.init({"w": torch.ones(2, 2)}, hparams={"wd": torch.tensor([0.1, 0.2])})
    state, _ = ens(state, torch.ones(2))
    state.hparams["wd"][0] = float("nan")  # edited between steps: checked again
    with pytest.raises(ValueError, match="member 0"):
        ens(state, torch.ones(2))


def test_per_member_learning_rate_for_the_penalty_step_is_checked():
    loss = lambda p, x: ((p["w"] * x).sum() - 1.0) ** 2
    step = fr.make_step(
        loss, lambda h: fr.sgd(h["lr"]), penalty=fr.l1(0.1), form="proximal", learning_rate="lr"
    )
    with pytest.raises(ValueError, match=r"member 2 .*learning_rate"):
        fr.ensemble_step(step).init({"w": torch.ones(3, 2)}, hparams={"lr": torch.tensor([0.1, 0.2, -0.1])})


# -- trees and shapes ---------------------------------------------------------------------------


@st.composite
def mismatched_shapes(draw):
    """A parameter shape and a different gradient shape that broadcasts against it."""
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    kind = draw(st.sampled_from(["lead", "ones", "scalar"]))
    if kind == "lead":
        other = (draw(st.integers(2, 3)),) + shape
    elif kind == "ones":
        other = (1,) + shape
    else:
        other = ()
    return shape, other


@pytest.mark.parametrize("name", sorted(ALIASES))
@settings(deadline=None, max_examples=8, suppress_health_check=SLOW_OK)
@given(shapes=mismatched_shapes())
def test_wrong_gradient_shape_is_refused(name, shapes):
    """Broadcasting a (2, 3) gradient into a (3,) parameter would change the parameter's shape."""
    shape, other = shapes
    params = {"w": torch.ones(shape), "b": torch.ones(2)}
    tx = ALIASES[name]()
    grads = {"w": torch.ones(other), "b": torch.ones(2)}
    with pytest.raises(ContractError, match=r"'w' has shape"):
        u, _ = tx.update(grads, tx.init(params), params)
        fr.apply_updates(params, u)


def test_apply_updates_refuses_broadcasting():
    with pytest.raises(ContractError, match=r"update for 'w' has shape \(2, 3\), its parameter \(3,\)"):
        fr.apply_updates({"w": torch.ones(3)}, {"w": torch.ones(2, 3)})


@pytest.mark.parametrize("field_shape", [(1, 4), (4, 1), (2,)])
def test_wrong_state_shape_is_refused(field_shape):
    """A momentum buffer of shape (1, 4) for a (4,) parameter would silently become (4, 4)."""
    tx = fr.trace(0.9)
    state = tx.init({"w": torch.ones(4)})
    state = state._replace(trace={"w": torch.ones(field_shape)}, steps={"w": torch.tensor(1)})
    with pytest.raises(ContractError, match=r"trace state 'trace' for 'w' has shape"):
        tx.update({"w": torch.ones(4)}, state)
    adam = fr.adam(0.1)
    s = adam.init({"w": torch.ones(4)})
    with pytest.raises(ContractError, match=r"state 'mu' for 'w'"):
        adam.update({"w": torch.ones(4)}, s._replace(mu={"w": torch.ones(field_shape)}), {"w": torch.ones(4)})


def test_structure_errors_are_typed_and_name_the_key():
    with pytest.raises(StructureError, match="'b'"):
        fr.apply_updates({"w": torch.ones(1), "b": torch.ones(1)}, {"w": torch.ones(1)})
    with pytest.raises(StructureError, match="different order"):
        fr.apply_updates({"w": torch.ones(1), "b": torch.ones(1)}, {"b": torch.ones(1), "w": torch.ones(1)})


def test_int_parameter_and_number_gradient_name_the_key():
    tx = fr.sgd(0.1)
    with pytest.raises(LeafTypeError, match=r"parameter 'steps' has dtype torch.int64"):
        tx.update(
            {"w": torch.ones(1), "steps": torch.ones(1)},
            tx.init(None),
            {"w": torch.ones(1), "steps": torch.ones(1, dtype=torch.int64)},
        )
    with pytest.raises(LeafTypeError, match=r"update for 'w' is a float"):
        tx.update({"w": 0.5}, tx.init(None), {"w": torch.ones(1)})
    with pytest.raises(LeafTypeError, match=r"update for 'w' has dtype torch.int64"):
        fr.apply_updates({"w": torch.ones(1)}, {"w": torch.ones(1, dtype=torch.int64)})


def test_selection_that_matches_nothing_is_a_selection_error():
    with pytest.raises(SelectionError, match="selects no parameter"):
        fr.group_lasso(0.1)({"b": torch.ones(3)})


# -- dtypes and devices -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALIASES))
@pytest.mark.parametrize("param_dtype, grad_dtype", [(F32, F64), (F32, torch.float16), (F64, F32)])
def test_gradient_of_another_dtype_is_refused(name, param_dtype, grad_dtype):
    """A float64 gradient would turn float32 state into float64 (and the checkpoint would not load)."""
    params = two_leaf_params(param_dtype)
    tx = ALIASES[name]()
    grads = {"w": torch.ones(2, 3, dtype=grad_dtype), "b": torch.ones(3, dtype=param_dtype)}
    with pytest.raises(LeafTypeError, match=r"'w' is torch\.float"):
        u, _ = tx.update(grads, tx.init(params), params)
        fr.apply_updates(params, u)


@pytest.mark.parametrize("name", sorted(ALIASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, F32, F64])
def test_state_keeps_the_parameter_dtype(name, dtype):
    params = two_leaf_params(dtype)
    tx = ALIASES[name]()
    state = tx.init(params)
    grads = {k: torch.full_like(v, 0.5) for k, v in params.items()}
    for _ in range(2):
        u, state = tx.update(grads, state, params)
        params = fr.apply_updates(params, u)
    for x in torch.utils._pytree.tree_leaves(state):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            assert x.dtype == dtype
    assert all(v.dtype == dtype for v in params.values())


def test_float64_anchor_reference_does_not_promote_float32():
    params = {"w": torch.ones(3)}
    P = fr.anchor(0.5, {"w": torch.zeros(3, dtype=F64)})
    assert P.grad(params)["w"].dtype == F32
    assert P.prox(params, 0.1)["w"].dtype == F32
    tx = fr.chain(fr.add_penalty_grad(P), fr.adam(0.1))
    _, state = tx.update({"w": torch.ones(3)}, tx.init(params), params)
    assert state[1].mu["w"].dtype == F32 and state[1].nu["w"].dtype == F32


# -- schedules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (float("nan"), ValueError, "finite"),
        (float("inf"), ValueError, "finite"),
        (-0.1, ValueError, ">= 0"),
        (torch.tensor([0.1, 0.2]), ValueError, "0-d tensor"),
        (torch.tensor(float("nan")), ValueError, "finite"),
        ("0.1", TypeError, "a number or a 0-d tensor"),
    ],
)
@pytest.mark.parametrize(
    "build",
    [
        lambda s: fr.sgd(s),
        lambda s: fr.adamw(s),
        lambda s: fr.chain(fr.sgd(0.1), fr.decoupled(fr.l2(0.1), learning_rate=s)),
        lambda s: fr.chain(fr.sgd(0.1), fr.proximal(fr.l1(0.1), learning_rate=s)),
    ],
)
def test_bad_schedule_values_are_refused_at_the_step(build, bad, error, match):
    schedule = lambda count: 0.1 if count < 1 else bad
    tx = build(schedule)
    params = {"w": torch.ones(2)}
    state = tx.init(params)
    u, state = tx.update({"w": torch.ones(2)}, state, params)  # count 0: fine
    with pytest.raises(error, match=rf"learning_rate schedule \(at count 1\).*{match}"):
        tx.update({"w": torch.ones(2)}, state, params)


def test_apply_if_finite_checks_what_the_inner_transform_produced():
    """Finite gradients that the inner transform turns into inf (here a state that overflowed) are skipped."""
    inner = fr.trace(0.9)
    tx = fr.apply_if_finite(inner, max_consecutive_errors=5)
    params = {"w": torch.ones(2)}
    state = tx.init(params)
    u, state = tx.update({"w": torch.ones(2)}, state, params)
    poisoned = state._replace(
        inner_state=state.inner_state._replace(trace={"w": torch.tensor([float("inf"), 1.0])})
    )
    u, new = tx.update({"w": torch.ones(2)}, poisoned, params)
    assert torch.equal(u["w"], torch.zeros(2))
    assert int(new.total_notfinite) == 1 and not bool(new.last_finite)
    assert new.inner_state is poisoned.inner_state  # the inner state is kept, not advanced


def test_warmup_cosine_end_above_peak_is_a_cosine_interpolation():
    sched = fr.warmup_cosine_decay_schedule(1.0, warmup_steps=2, decay_steps=6, end_value=5.0)
    for count in range(2, 9):
        frac = min(count - 2, 4) / 4
        assert sched(count) == pytest.approx(5.0 + (1.0 - 5.0) * (1 + np.cos(np.pi * frac)) / 2, abs=1e-12)
    with pytest.raises(TypeError, match="end_value"):
        fr.warmup_cosine_decay_schedule(1.0, 2, 6, end_value="5")


# -- state --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_missing_or_foreign_state_names_what_was_expected(name):
    params = two_leaf_params()
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    tx = ALIASES[name]()
    with pytest.raises(TypeError, match=r"expects .*got None"):
        tx.update(grads, None, params)
    foreign = fr.scale_by_learning_rate(lambda c: 0.1).init(params)  # a ScaleByScheduleState
    if type(tx.init(params)) is type(foreign):
        return
    with pytest.raises(TypeError, match="expects"):
        tx.update(grads, foreign, params)


def test_sgd_state_given_to_adam():
    params = {"w": torch.ones(2)}
    with pytest.raises(LeafTypeError, match=r"adam expects its state to be a ScaleByAdamState.*tuple of 2"):
        fr.adam(0.1).update({"w": torch.ones(2)}, fr.sgd(0.1, momentum=0.9).init(params), params)


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_updates_never_alias_the_state(name):
    """Editing the returned updates in place must not rewrite the optimizer's state (trace used to
    return its own momentum buffer)."""
    params = two_leaf_params(F64)
    tx = ALIASES[name]()
    state = tx.init(params)
    grads = {k: torch.full_like(v, 0.3) for k, v in params.items()}
    for _ in range(2):
        u, state = tx.update(grads, state, params)
    before = [x.clone() if isinstance(x, torch.Tensor) else x for x in torch.utils._pytree.tree_leaves(state)]
    for v in u.values():
        v.add_(1000.0)
    after = torch.utils._pytree.tree_leaves(state)
    for b, a in zip(before, after):
        if isinstance(b, torch.Tensor):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(ALIASES))
@settings(deadline=None, max_examples=5, suppress_health_check=SLOW_OK)
@given(data=st.data())
def test_callers_tensors_are_never_written(name, data):
    params = {"w": data.draw(tensors((2, 3), dtype=F64)), "b": data.draw(tensors((3,), dtype=F64))}
    grads = {"w": data.draw(tensors((2, 3), dtype=F64)), "b": data.draw(tensors((3,), dtype=F64))}
    kept_p = {k: v.clone() for k, v in params.items()}
    kept_g = {k: v.clone() for k, v in grads.items()}
    tx = ALIASES[name]()
    state = tx.init(params)
    for _ in range(2):
        u, state = tx.update(grads, state, params)
        new = fr.apply_updates(params, u)
    for k in params:
        assert torch.equal(params[k], kept_p[k]) and torch.equal(grads[k], kept_g[k])
        assert new[k] is not params[k]


# -- ownership: a penalty owns its reference ------------------------------------------------------


def test_anchor_reference_does_not_move_with_the_model():
    """L2-SP with fr.params_of(model) as the reference: training the model in place must not move it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    reference = fr.params_of(model)
    P = fr.anchor(1.0, reference)
    start = {k: v.detach().clone() for k, v in reference.items()}
    opt = fr.TorchOptimizer(model.named_parameters(), fr.sgd(0.5))
    for _ in range(3):
        model(torch.ones(4, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
    now = fr.params_of(model)
    expected = 0.5 * sum(float(((now[k] - start[k]) ** 2).sum()) for k in now)
    assert expected > 0
    assert float(P(now)) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_anchor_reference_and_precision_are_checked():
    with pytest.raises(ValueError, match=r"Invalid reference value for 'w'.*finite"):
        fr.anchor(1.0, {"w": torch.tensor([0.0, float("nan")])})
    with pytest.raises(LeafTypeError, match=r"Invalid precision value for 'w'.*float"):
        fr.anchor(1.0, {"w": torch.zeros(2)}, precision={"w": 2.0})
    with pytest.raises(ValueError, match=r"Invalid precision value for 'w'.*>= 0"):
        fr.anchor(1.0, {"w": torch.zeros(2)}, precision={"w": torch.tensor([1.0, -1.0])})


# -- threads ------------------------------------------------------------------------------------


def test_concurrent_steps_on_one_module_are_correct_and_leave_it_unchanged():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    original = {k: (v, v.detach().clone()) for k, v in model.named_parameters()}
    apply = fr.functional_model(model)
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def loss(p, b, x, y):
        out, b = apply(p, b, x)
        return ((out - y) ** 2).mean(), b

    step = fr.make_step(loss, fr.adam(0.01), buffers=True)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}

    def run(n):
        state = step.init(init, {})
        for _ in range(n):
            state, _ = step(state, x, y)
        return state.params

    expected = run(20)
    results, errors = [None] * 4, []

    def worker(i):
        try:
            results[i] = run(20)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for r in results:
        for k in expected:
            assert torch.equal(r[k], expected[k])
    for k, v in model.named_parameters():
        assert v is original[k][0] and torch.equal(v.detach(), original[k][1])


# -- complex parameters -------------------------------------------------------------------------


COMPLEX_ALIASES = [
    (
        "sgd",
        lambda lr: fr.sgd(lr, momentum=0.9, weight_decay=0.01),
        lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=0.01),
    ),
    (
        "adam",
        lambda lr: fr.adam(lr, weight_decay=0.01),
        lambda ps, lr: torch.optim.Adam(ps, lr=lr, weight_decay=0.01, foreach=False),
    ),
    (
        "adam_amsgrad",
        lambda lr: fr.adam(lr, amsgrad=True),
        lambda ps, lr: torch.optim.Adam(ps, lr=lr, amsgrad=True, foreach=False),
    ),
    (
        "adamw",
        lambda lr: fr.adamw(lr, weight_decay=0.1),
        lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1, foreach=False),
    ),
]


@pytest.mark.parametrize("name, make_fr, make_torch", COMPLEX_ALIASES, ids=[c[0] for c in COMPLEX_ALIASES])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@settings(deadline=None, max_examples=8, suppress_health_check=SLOW_OK)
@given(data=st.data())
def test_complex_parameters_match_torch_optim(name, make_fr, make_torch, dtype, data):
    real = F32 if dtype == torch.complex64 else F64
    shape = data.draw(st.sampled_from([(3,), (2, 2)]))
    draw_c = lambda: torch.complex(
        data.draw(tensors(shape, dtype=real, max_abs=2.0)), data.draw(tensors(shape, dtype=real, max_abs=2.0))
    )
    w0 = draw_c()
    p = torch.nn.Parameter(w0.clone())
    opt = make_torch([p], 0.05)
    tx = make_fr(0.05)
    params = {"z": w0.clone()}
    state = tx.init(params)
    for _ in range(data.draw(st.integers(1, 5))):
        g = draw_c()
        p.grad = g.clone()
        opt.step()
        u, state = tx.update({"z": g}, state, params)
        params = fr.apply_updates(params, u)
    atol = 1e-12 if dtype == torch.complex128 else 1e-6
    torch.testing.assert_close(params["z"], p.detach(), atol=atol, rtol=1e-5 if atol > 1e-10 else 1e-10)


def test_complex_penalties():
    z = {"z": torch.tensor([1j, 3 + 4j], dtype=torch.complex128)}
    assert float(fr.l2(1.0)(z)) == pytest.approx(0.5 * (1 + 25), abs=1e-12)  # |1j|^2 = 1, not -1
    assert float(fr.l1(1.0)(z)) == pytest.approx(1 + 5, abs=1e-12)
    # prox of the modulus: shrink |z| by t, keep the phase
    prox = fr.l1(1.0).prox(z, 0.5)["z"]
    torch.testing.assert_close(
        prox, torch.tensor([0.5j, (3 + 4j) * 4.5 / 5], dtype=torch.complex128), atol=1e-12, rtol=0
    )
    # the closed-form gradient equals autograd's (torch's convention for real functions of complex inputs)
    for P in (fr.l2(0.3), fr.anchor(0.3, {"z": torch.ones(2, dtype=torch.complex128)})):
        torch.testing.assert_close(P.grad(z)["z"], torch.func.grad(P)(z)["z"], atol=1e-12, rtol=0)
    with pytest.raises(LeafTypeError, match="not defined for complex"):
        fr.non_negative()(z)
    with pytest.raises(LeafTypeError, match="not defined for complex"):
        fr.orthogonal(0.1)({"z": torch.ones(2, 2, dtype=torch.complex64)})


# -- differentiating through the optimizer ---------------------------------------------------------


def _problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 3, generator=g, dtype=F64)
    y = torch.randn(12, generator=g, dtype=F64)
    w0 = {"w": torch.randn(3, generator=g, dtype=F64), "b": torch.randn((), generator=g, dtype=F64)}
    return X, y, w0


def _unrolled(make_tx, value, steps=4, penalty=None, form=None):
    X, y, w0 = _problem()

    def loss(p, X, y):
        return ((X @ p["w"] + p["b"] - y) ** 2).mean()

    if penalty is None:
        step = fr.make_step(loss, make_tx(value))
    else:
        step = fr.make_step(loss, make_tx(None), penalty=penalty(value), form=form, learning_rate=0.05)
    state = step.init(w0)
    for _ in range(steps):
        state, _ = step(state, X, y)
    return loss(state.params, X, y)


def _central_difference(fn, x, h=1e-6):
    return (fn(x + h) - fn(x - h)) / (2 * h)


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda lr: fr.sgd(lr, momentum=0.9, nesterov=True),
        lambda lr: fr.adam(lr, amsgrad=True),
        lambda lr: fr.adamw(lr, weight_decay=0.1),
    ],
    ids=["sgd", "adam", "adamw"],
)
@pytest.mark.parametrize("mode", ["torch.func.grad", "backward"])
def test_gradient_with_respect_to_the_learning_rate(make_tx, mode):
    lr = torch.tensor(0.05, dtype=F64)
    fd = _central_difference(lambda v: _unrolled(make_tx, v), lr)
    if mode == "torch.func.grad":
        g = torch.func.grad(lambda v: _unrolled(make_tx, v))(lr)
    else:
        leaf = lr.clone().requires_grad_()
        _unrolled(make_tx, leaf).backward()
        g = leaf.grad
    assert float(g) == pytest.approx(float(fd), rel=1e-6, abs=1e-8)
    assert abs(float(g)) > 1e-3  # the learning rate matters: a zero gradient would pass trivially


@pytest.mark.parametrize("form", ["loss", "coupled", "decoupled", "proximal"])
@pytest.mark.parametrize(
    "penalty",
    [lambda c: fr.l2(c), lambda c: fr.elastic_net(c, 0.1)],
    ids=["l2", "elastic_net"],
)
def test_gradient_with_respect_to_a_penalty_coefficient(form, penalty):
    make_tx = lambda _: fr.sgd(0.05, momentum=0.5)
    c = torch.tensor(0.3, dtype=F64)
    f = lambda v: _unrolled(make_tx, v, penalty=penalty, form=form)
    g = torch.func.grad(f)(c)
    fd = _central_difference(f, c)
    assert float(g) == pytest.approx(float(fd), rel=1e-5, abs=1e-8)
    assert abs(float(g)) > 1e-4


# -- overflow and underflow in group norms -------------------------------------------------------


def test_group_norms_do_not_overflow_or_underflow_in_float32():
    out = fr.max_norm(1.0).prox({"w": torch.tensor([[3e19, 4e19]])}, step=0.1)["w"]
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8]]), atol=1e-6, rtol=1e-6)
    for scale in (1e19, 1e-24):
        w = torch.tensor([[3.0, 4.0]]) * scale
        g = fr.group_lasso(1.0).grad({"w": w})["w"]
        # sqrt(2) * w / ||w||, whatever the scale
        torch.testing.assert_close(g, (2**0.5) * torch.tensor([[0.6, 0.8]]), atol=1e-6, rtol=1e-5)


@settings(deadline=None, max_examples=25)
@given(
    w=st.integers(1, 3).flatmap(lambda r: tensors((r, 3), dtype=F32, max_abs=10.0)),
    exponent=st.integers(-100, 100),
)
def test_group_penalties_are_scale_covariant(w, exponent):
    """Scaling by an exact power of two: the group-lasso gradient is unchanged and the max-norm
    projection of ``2^k w`` has the unscaled row directions, for any k float32 can represent."""
    k = torch.tensor(2.0, dtype=F64) ** exponent
    scaled = (w.double() * k).float()
    assert torch.isfinite(scaled).all()
    nonzero = w.abs().amax(dim=1) > 1e-3
    g = fr.group_lasso(0.5).grad({"w": w})["w"]
    gs = fr.group_lasso(0.5).grad({"w": scaled})["w"]
    torch.testing.assert_close(gs[nonzero], g[nonzero], atol=1e-5, rtol=1e-5)
    proj = fr.max_norm(1.0).prox({"w": scaled}, step=1.0)["w"].double()
    norms = torch.linalg.vector_norm(w.double() * k, dim=1, keepdim=True)
    expected = (w.double() * k) * torch.clamp(1.0 / norms, max=1.0)
    torch.testing.assert_close(proj[nonzero], expected[nonzero], atol=1e-6, rtol=1e-5)


# -- checkpoints --------------------------------------------------------------------------------


def test_damaged_checkpoint_is_refused_with_a_reason():
    tx = fr.adam(0.1)
    state = tx.init({"w": torch.ones(2), "b": torch.ones(1)})
    ck = fr.state_dict(state)
    short = dict(ck, leaves=ck["leaves"][:-1])
    with pytest.raises(ValueError, match="names 8 entries but holds 7 values"):
        fr.load_state_dict(state, short)
    with pytest.raises(ValueError, match="no 'leaves' entry"):
        fr.load_state_dict(state, {k: v for k, v in ck.items() if k != "leaves"})


def test_checkpoint_of_a_dict_in_another_key_order_says_so():
    tx = fr.adam(0.1)
    ck = fr.state_dict(tx.init({"w": torch.ones(2), "b": torch.ones(1)}))
    with pytest.raises(ValueError, match="another order.*key order"):
        fr.load_state_dict(tx.init({"b": torch.ones(1), "w": torch.ones(2)}), ck)
    restored = fr.load_state_dict(tx.init({"w": torch.ones(2), "b": torch.ones(1)}), ck)
    assert torch.equal(restored.nu["w"], torch.zeros(2))
