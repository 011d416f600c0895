"""fr.sgd / fr.adam / fr.adamw against torch.optim.SGD / Adam / AdamW, and the conventions of the core.

Trajectories of 1 to 10 steps with fresh random gradients are compared leaf by leaf after every step:
the parameters and the optimizer state (torch's ``momentum_buffer`` vs ``TraceState.trace``;
``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``step`` vs ``ScaleByAdamState`` ``mu``, ``nu``,
``nu_max``, ``count``). float64: max abs diff <= 1e-12; float32: ``assert_close(atol=1e-6, rtol=1e-5)``.
The two run in lockstep (``helpers.lockstep``): after each comparison funcreg continues from torch's
params and moments, so a rounding difference in one step cannot be amplified by the next ones.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.utils._pytree as pytree
from helpers import (
    SLOW_OK,
    GroupWeightDecaySchedule,
    assert_lists_close,
    assert_tensors_close,
    assert_trees_close,
    assert_trees_equal,
    decay_schedule,
    detached,
    find_state,
    find_states,
    leaves,
    lockstep,
    problems,
    replace_field,
    run_funcreg,
    run_torch,
    torch_state,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import funcreg as fr

TRAJECTORY = settings(deadline=None, max_examples=40, suppress_health_check=SLOW_OK)
FOREACH = pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single_tensor"])

learning_rates = st.floats(1e-4, 1.0)
coefficients = st.one_of(st.just(0.0), st.floats(1e-4, 1.0))
momenta = st.one_of(st.just(0.0), st.floats(0.0, 0.99))
dampenings = st.one_of(st.just(0.0), st.floats(0.0, 0.9))
betas1 = st.one_of(st.just(0.9), st.just(0.0), st.floats(0.0, 0.99))
epsilons = st.one_of(st.just(1e-8), st.floats(1e-10, 1e-2))


@st.composite
def sgd_hparams(draw):
    momentum = draw(momenta)
    dampening = draw(dampenings)
    nesterov = draw(st.booleans()) if momentum > 0 and dampening == 0 else False
    return dict(
        lr=draw(learning_rates),
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=draw(coefficients),
        maximize=draw(st.booleans()),
    )


def betas2(b1):
    """b2 >= b1**2 (torch's defaults 0.9, 0.999 are such a pair).

    Then |m_hat| / sqrt(v_hat) stays below about sqrt(steps) (Cauchy-Schwarz over the moment sums), so
    updates stay O(lr) and an absolute tolerance means something. With b2 < b1**2, a zero gradient after
    a large one gives m_hat / (sqrt(v_hat) + eps) ~ 1e7 and any rounding difference shows in absolute terms.
    """
    return st.one_of(st.just(0.999), st.floats(b1**2, 0.9999))


@st.composite
def adam_hparams(draw):
    b1 = draw(betas1)
    return dict(
        lr=draw(learning_rates),
        betas=(b1, draw(betas2(b1))),
        eps=draw(epsilons),
        weight_decay=draw(coefficients),
        amsgrad=draw(st.booleans()),
        maximize=draw(st.booleans()),
    )


def fr_sgd(hp):
    return fr.sgd(
        hp["lr"], hp["momentum"], hp["dampening"], hp["nesterov"], hp["weight_decay"], hp["maximize"]
    )


def fr_adam(factory, hp, **extra):
    return factory(
        hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"], hp["amsgrad"], hp["maximize"], **extra
    )


def check_trace_state(state, opt, ps, steps, momentum):
    if momentum == 0:
        assert find_states(state, fr.TraceState) == []
        assert torch_state(opt, ps, "momentum_buffer") == [None] * len(ps)
        return
    trace = find_state(state, fr.TraceState)
    assert int(trace.count) == steps
    assert_lists_close(leaves(trace.trace), torch_state(opt, ps, "momentum_buffer"), "momentum_buffer")


def check_adam_state(state, opt, ps, steps, amsgrad):
    adam = find_state(state, fr.ScaleByAdamState)
    assert int(adam.count) == steps
    assert [float(s) for s in torch_state(opt, ps, "step")] == [float(steps)] * len(ps)
    assert_lists_close(leaves(adam.mu), torch_state(opt, ps, "exp_avg"), "mu vs exp_avg")
    assert_lists_close(leaves(adam.nu), torch_state(opt, ps, "exp_avg_sq"), "nu vs exp_avg_sq")
    if amsgrad:
        assert_lists_close(
            leaves(adam.nu_max), torch_state(opt, ps, "max_exp_avg_sq"), "nu_max vs max_exp_avg_sq"
        )
    else:
        assert adam.nu_max is None


def sgd_check(momentum):
    """Params and momentum buffers equal torch's after every step (for ``lockstep``)."""

    def check(new_params, state, opt, ps, step):
        assert_lists_close(leaves(new_params), detached(ps), f"params after step {step}")
        check_trace_state(state, opt, ps, step, momentum)

    return check


def adam_check(amsgrad):
    """Params, moments and step counts equal torch's after every step (for ``lockstep``)."""

    def check(new_params, state, opt, ps, step):
        assert_lists_close(leaves(new_params), detached(ps), f"params after step {step}")
        check_adam_state(state, opt, ps, step, amsgrad)

    return check


# --- trajectories equal torch.optim -------------------------------------------------------------------


@FOREACH
@TRAJECTORY
@given(problem=problems(), hp=sgd_hparams())
def test_sgd_matches_torch_sgd(foreach, problem, hp):
    params, grads = problem
    make = lambda ps: torch.optim.SGD(ps, foreach=foreach, **hp)  # noqa: E731
    lockstep(fr_sgd(hp), params, grads, make, sgd_check(hp["momentum"]))


@FOREACH
@TRAJECTORY
@given(problem=problems(), hp=adam_hparams())
def test_adam_matches_torch_adam(foreach, problem, hp):
    params, grads = problem
    make = lambda ps: torch.optim.Adam(ps, foreach=foreach, **hp)  # noqa: E731
    lockstep(fr_adam(fr.adam, hp), params, grads, make, adam_check(hp["amsgrad"]))


@FOREACH
@TRAJECTORY
@given(problem=problems(), hp=adam_hparams())
def test_adamw_matches_torch_adamw(foreach, problem, hp):
    params, grads = problem
    make = lambda ps: torch.optim.AdamW(ps, foreach=foreach, **hp)  # noqa: E731
    lockstep(fr_adam(fr.adamw, hp), params, grads, make, adam_check(hp["amsgrad"]))


@FOREACH
@settings(deadline=None, max_examples=15, suppress_health_check=SLOW_OK)
@given(data=st.data(), hp=adam_hparams())
def test_adamw_mask_matches_torch_param_groups(foreach, data, hp):
    """Unmasked leaves get no decay: torch's AdamW with a decayed group and a weight_decay=0 group."""
    params, grads = data.draw(problems())
    decide = data.draw(st.lists(st.booleans(), min_size=len(leaves(params)), max_size=len(leaves(params))))
    spec = pytree.tree_structure(params)
    if all(isinstance(v, torch.Tensor) for v in params.values()) and data.draw(st.booleans()):
        mask = fr.Selection(dict(zip(params, decide)))
    else:
        mask = pytree.tree_unflatten(decide, spec)

    def make(ps):
        decayed = [p for p, d in zip(ps, decide) if d]
        plain = [p for p, d in zip(ps, decide) if not d]
        groups = [{"params": decayed}] if decayed else []
        groups += [{"params": plain, "weight_decay": 0.0}] if plain else []
        return torch.optim.AdamW(groups, foreach=foreach, **hp)

    lockstep(fr_adam(fr.adamw, hp, mask=mask), params, grads, make, adam_check(hp["amsgrad"]))


# regression test: funcreg once kept one step count for the whole tree
def test_intermittent_none_gradient_matches_torch_per_parameter_step():
    """A parameter with no gradient at some steps: torch.optim keeps a step count per parameter."""
    params = {
        "a": torch.tensor([1.0, 2.0], dtype=torch.float64),
        "b": torch.tensor([3.0], dtype=torch.float64),
    }
    grads = [
        {"a": torch.tensor([0.5, -1.0], dtype=torch.float64), "b": None},
        {"a": torch.tensor([0.3, 0.2], dtype=torch.float64), "b": torch.tensor([2.0], dtype=torch.float64)},
    ]
    # "b" is updated once, at the second step, from 3.0 with g = 2.0. For torch that is b's first step:
    # Adam moves it by -lr * g / (|g| + eps) and SGD's momentum buffer starts as g (no dampening).
    lr = 0.1
    cases = [
        (fr.adam(lr), lambda ps: torch.optim.Adam(ps, lr=lr), 3.0 - lr * 2.0 / (2.0 + 1e-8)),
        (
            fr.sgd(lr, momentum=0.9, dampening=0.5),
            lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9, dampening=0.5),
            3.0 - lr * 2.0,
        ),
    ]
    for tx, make, expected in cases:
        ps, _ = run_torch(make, params, grads)
        assert abs(ps[1].item() - expected) <= 1e-12  # torch does what the derivation says
        new, _ = run_funcreg(tx, params, grads)
        assert abs(new["b"].item() - expected) <= 1e-12


@settings(deadline=None, max_examples=20, suppress_health_check=SLOW_OK)
@given(problem=problems(steps=st.integers(1, 6)), hp=adam_hparams())
def test_frozen_parameters_match_torch_grad_none(problem, hp):
    """A parameter whose gradient is always None is skipped by both, and keeps no moving state."""
    params, grads = problem
    n = len(leaves(params))
    frozen = [i % 2 == 1 for i in range(n)]  # every other leaf
    spec = pytree.tree_structure(params)
    grads = [
        pytree.tree_unflatten([None if f else g for g, f in zip(leaves(gr), frozen)], spec) for gr in grads
    ]
    new_params, state = run_funcreg(fr_adam(fr.adamw, hp), params, grads)
    ps, opt = run_torch(lambda ps: torch.optim.AdamW(ps, **hp), params, grads)
    for i, (new, old, p) in enumerate(zip(leaves(new_params), leaves(params), ps)):
        if frozen[i]:
            assert new is old  # untouched: the same tensor
            assert torch.equal(p.detach(), old)
        else:
            assert_tensors_close(new, p.detach(), f"param {i}")
    adam = find_state(state, fr.ScaleByAdamState)
    for i, (mu, p) in enumerate(zip(leaves(adam.mu), ps)):
        if frozen[i]:
            assert torch.equal(mu, torch.zeros_like(mu)) and opt.state[p] == {}
        else:
            assert_tensors_close(mu, opt.state[p]["exp_avg"], f"mu {i}")


@TRAJECTORY
@given(data=st.data(), hp=adam_hparams(), decoupled=st.booleans(), scheduled=st.booleans())
def test_adam_and_adamw_equal_their_documented_chains(data, hp, decoupled, scheduled):
    """fr.adam / fr.adamw (fused) == [negate] -> [add_decayed_weights] -> scale_by_adam -> lr -> [decoupled decay]."""
    params, grads = data.draw(problems())
    n = len(leaves(params))
    mask = None
    if decoupled and data.draw(st.booleans()):
        mask = pytree.tree_unflatten(
            data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), pytree.tree_structure(params)
        )
    lr = (lambda c: hp["lr"] / (1 + c)) if scheduled else hp["lr"]
    wd, (b1, b2) = hp["weight_decay"], hp["betas"]
    parts = [fr.scale(-1.0)] if hp["maximize"] else []
    if not decoupled:
        parts.append(fr.add_decayed_weights(wd))
    parts += [fr.scale_by_adam(b1, b2, hp["eps"], hp["amsgrad"]), fr.scale_by_learning_rate(lr)]
    if decoupled:
        parts.append(fr.decoupled_weight_decay(wd, learning_rate=lr, mask=mask, scale_by="learning_rate"))
    extra = {"mask": mask} if decoupled else {}
    fused = fr_adam(fr.adamw if decoupled else fr.adam, dict(hp, lr=lr), **extra)
    chain = fr.chain(*parts)
    # In lockstep, as with torch: each step from the same params and moments.
    state_fused, state_chain = fused.init(params), chain.init(params)
    for step, g in enumerate(grads, start=1):
        u_fused, state_fused = fused.update(g, state_fused, params)
        u_chain, state_chain = chain.update(g, state_chain, params)
        assert_trees_close(u_fused, u_chain, f"updates at step {step}")
        adam_fused = find_state(state_fused, fr.ScaleByAdamState)
        adam_chain = find_state(state_chain, fr.ScaleByAdamState)
        assert int(adam_fused.count) == int(adam_chain.count) == step
        for field in ("mu", "nu", "nu_max"):
            assert_trees_close(getattr(adam_fused, field), getattr(adam_chain, field), field)
            if getattr(adam_fused, field) is not None:
                state_chain = replace_field(
                    state_chain, fr.ScaleByAdamState, field, leaves(getattr(adam_fused, field))
                )
        params = fr.apply_updates(params, u_fused)


# --- schedules as learning rates vs torch.optim.lr_scheduler ------------------------------------------


@FOREACH
@settings(deadline=None, max_examples=15, suppress_health_check=SLOW_OK)
@given(data=st.data(), lr0=learning_rates, momentum=momenta, wd=coefficients)
def test_sgd_cosine_decay_schedule_matches_cosine_annealing_lr(foreach, data, lr0, momentum, wd):
    decay_steps = data.draw(st.integers(1, 10))
    alpha = data.draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0)))
    # CosineAnnealingLR rises again after T_max; fr's schedule stays at its end value: compare up to T_max.
    params, grads = data.draw(problems(steps=st.integers(1, decay_steps + 1)))
    tx = fr.chain(
        fr.add_decayed_weights(wd), fr.sgd(fr.cosine_decay_schedule(lr0, decay_steps, alpha), momentum)
    )

    def check(new_params, state, opt, ps, step):
        sgd_check(momentum)(new_params, state, opt, ps, step)
        assert int(find_state(state, fr.ScaleByScheduleState).count) == step

    lockstep(
        tx,
        params,
        grads,
        lambda ps: torch.optim.SGD(ps, lr=lr0, momentum=momentum, weight_decay=wd, foreach=foreach),
        check,
        schedulers=lambda opt: [
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=decay_steps, eta_min=alpha * lr0)
        ],
    )


@FOREACH
@settings(deadline=None, max_examples=15, suppress_health_check=SLOW_OK)
@given(problem=problems(), hp=adam_hparams(), gamma=st.floats(0.5, 1.0))
def test_adamw_lambda_schedule_matches_lambda_lr(foreach, problem, hp, gamma):
    """The schedule scales Adam's step and the decoupled decay alike, as torch's group lr does."""
    params, grads = problem

    def factor(count):
        return gamma**count / (1 + 0.5 * count)

    hp_fr = dict(hp, lr=lambda count: hp["lr"] * factor(count))
    lockstep(
        fr_adam(fr.adamw, hp_fr),
        params,
        grads,
        lambda ps: torch.optim.AdamW(ps, foreach=foreach, **hp),
        adam_check(hp["amsgrad"]),
        schedulers=lambda opt: [torch.optim.lr_scheduler.LambdaLR(opt, factor)],
    )


@settings(deadline=None, max_examples=15, suppress_health_check=SLOW_OK)
@given(problem=problems(), hp=sgd_hparams(), gamma=st.floats(0.5, 1.0))
def test_sgd_lambda_schedule_matches_lambda_lr(problem, hp, gamma):
    params, grads = problem
    lockstep(
        fr_sgd(dict(hp, lr=lambda c: hp["lr"] * gamma**c)),
        params,
        grads,
        lambda ps: torch.optim.SGD(ps, **hp),
        sgd_check(hp["momentum"]),
        schedulers=lambda opt: [torch.optim.lr_scheduler.LambdaLR(opt, lambda e: gamma**e)],
    )


# --- weight-decay schedules: torch's group["weight_decay"] set before each step ------------------------


@FOREACH
@settings(deadline=None, max_examples=15, suppress_health_check=SLOW_OK)
@given(
    problem=problems(),
    hp=sgd_hparams(),
    wd=st.floats(1e-3, 1.0),
    gamma=st.floats(0.3, 1.0),
    lr_gamma=st.one_of(st.none(), st.floats(0.5, 1.0)),
)
def test_sgd_weight_decay_schedule_matches_torch_group_weight_decay(
    foreach, problem, hp, wd, gamma, lr_gamma
):
    """``sgd(weight_decay=schedule)`` is torch's SGD whose group weight_decay a scheduler sets before
    each step (with an lr schedule beside it, on its own count)."""
    params, grads = problem
    schedule = decay_schedule(wd, gamma)
    lr = hp["lr"] if lr_gamma is None else (lambda c: hp["lr"] * lr_gamma**c)

    def schedulers(opt):
        decay = [GroupWeightDecaySchedule(opt, schedule)]
        return (
            decay
            if lr_gamma is None
            else decay + [torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_gamma**e)]
        )

    lockstep(
        fr_sgd(dict(hp, lr=lr, weight_decay=schedule)),
        params,
        grads,
        lambda ps: torch.optim.SGD(ps, foreach=foreach, **hp),
        sgd_check(hp["momentum"]),
        schedulers=schedulers,
    )


@FOREACH
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@settings(deadline=None, max_examples=15, suppress_health_check=SLOW_OK)
@given(problem=problems(), hp=adam_hparams(), wd=st.floats(1e-3, 1.0), gamma=st.floats(0.3, 1.0))
def test_adam_weight_decay_schedule_matches_torch_group_weight_decay(
    foreach, decoupled, problem, hp, wd, gamma
):
    """``adam``/``adamw(weight_decay=schedule)``: torch's Adam/AdamW with the group's weight_decay set
    before each step; AdamW's decay stays ``lr * wd_t * w``."""
    params, grads = problem
    schedule = decay_schedule(wd, gamma)
    torch_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    lockstep(
        fr_adam(fr.adamw if decoupled else fr.adam, dict(hp, weight_decay=schedule)),
        params,
        grads,
        lambda ps: torch_cls(ps, foreach=foreach, **hp),
        adam_check(hp["amsgrad"]),
        schedulers=lambda opt: [GroupWeightDecaySchedule(opt, schedule)],
    )


def test_weight_decay_schedule_values_are_checked_as_they_come_out():
    """A schedule's value is checked at the step that reads it, naming weight_decay and the count."""
    params = {"w": torch.ones(2)}
    for tx in (
        fr.sgd(0.1, weight_decay=lambda c: -0.1),
        fr.adamw(0.1, weight_decay=lambda c: float("nan")),
        fr.add_decayed_weights(lambda c: torch.ones(2)),
        fr.decoupled_weight_decay(lambda c: -1.0, scale_by="none"),
    ):
        with pytest.raises(ValueError, match="weight_decay schedule"):
            tx.update({"w": torch.ones(2)}, tx.init(params), params)


# --- conventions (shared/conventions.md) that involve only the core -----------------------------------


@settings(deadline=None, max_examples=25, suppress_health_check=SLOW_OK)
@given(problem=problems(), hp=sgd_hparams())
def test_convention_weight_decay_zero_is_exact_identity(problem, hp):
    """weight_decay=0 (coupled or decoupled) gives bitwise the trajectory of the chain without decay."""
    params, grads = problem
    plain = dict(hp, weight_decay=0.0)
    reference = run_funcreg(fr_sgd(plain), params, grads)
    for tx in (
        fr.chain(fr.add_decayed_weights(0.0), fr_sgd(plain)),
        fr.chain(
            fr_sgd(plain), fr.decoupled_weight_decay(0.0, learning_rate=hp["lr"], scale_by="learning_rate")
        ),
        fr.chain(fr_sgd(plain), fr.decoupled_weight_decay(0.0, scale_by="none")),
    ):
        assert_trees_equal(run_funcreg(tx, params, grads)[0], reference[0], "params")
    adam = run_funcreg(fr.adam(hp["lr"]), params, grads)[0]
    for tx in (fr.adam(hp["lr"], weight_decay=0.0), fr.adamw(hp["lr"], weight_decay=0.0)):
        assert_trees_equal(run_funcreg(tx, params, grads)[0], adam, "adam/adamw(weight_decay=0) params")
    chained = fr.chain(fr.scale_by_adam(), fr.scale_by_learning_rate(hp["lr"]), fr.add_decayed_weights(0.0))
    unchained = fr.chain(fr.scale_by_adam(), fr.scale_by_learning_rate(hp["lr"]))
    assert_trees_equal(
        run_funcreg(chained, params, grads)[0], run_funcreg(unchained, params, grads)[0], "chain"
    )


@FOREACH
@TRAJECTORY
@given(problem=problems(), hp=sgd_hparams())
def test_convention_torch_sgd_weight_decay_is_coupled_l2_first_in_chain(foreach, problem, hp):
    """torch SGD(momentum, weight_decay=lam, nesterov) == chain(add_decayed_weights(lam), sgd(...))."""
    params, grads = problem
    hp = dict(hp, maximize=False)  # torch negates the gradient before adding the decay
    tx = fr.chain(fr.add_decayed_weights(hp["weight_decay"]), fr_sgd(dict(hp, weight_decay=0.0)))
    make = lambda ps: torch.optim.SGD(ps, foreach=foreach, **hp)  # noqa: E731
    lockstep(tx, params, grads, make, sgd_check(hp["momentum"]))


@FOREACH
@TRAJECTORY
@given(problem=problems(), hp=adam_hparams())
def test_convention_torch_adamw_is_adam_then_lr_then_decoupled_decay_times_lr(foreach, problem, hp):
    """torch AdamW == chain(scale_by_adam, scale_by_learning_rate, decoupled_weight_decay(wd, learning_rate=lr, scale_by="learning_rate"))."""
    params, grads = problem
    b1, b2 = hp["betas"]
    tx = fr.chain(
        *([fr.scale(-1.0)] if hp["maximize"] else []),
        fr.scale_by_adam(b1, b2, hp["eps"], hp["amsgrad"]),
        fr.scale_by_learning_rate(hp["lr"]),
        fr.decoupled_weight_decay(hp["weight_decay"], learning_rate=hp["lr"], scale_by="learning_rate"),
    )
    make = lambda ps: torch.optim.AdamW(ps, foreach=foreach, **hp)  # noqa: E731
    lockstep(tx, params, grads, make, adam_check(hp["amsgrad"]))


@settings(deadline=None, max_examples=25, suppress_health_check=SLOW_OK)
@given(problem=problems(), lam=coefficients, lr=learning_rates, scheduled=st.booleans())
def test_convention_coupled_edit_equals_decoupled_update_with_s_lr_for_plain_sgd(problem, lam, lr, scheduled):
    """Plain SGD: g + lam*w then -lr_t, equals -lr_t*g then -lr_t*lam*w (s_t = lr_t)."""
    params, grads = problem
    rate = (lambda c: lr / (1 + c)) if scheduled else lr
    coupled = fr.chain(fr.add_decayed_weights(lam), fr.scale_by_learning_rate(rate))
    decoupled = fr.chain(
        fr.scale_by_learning_rate(rate),
        fr.decoupled_weight_decay(lam, learning_rate=rate, scale_by="learning_rate"),
    )
    assert_trees_close(
        run_funcreg(coupled, params, grads)[0], run_funcreg(decoupled, params, grads)[0], "params"
    )


def test_convention_coupled_edit_differs_from_decoupled_update_with_momentum():
    """'for plain SGD without momentum only': with momentum the decay goes through the buffer."""
    lr, lam, m = 0.1, 0.1, 0.9
    params = {"w": torch.tensor([1.0], dtype=torch.float64)}
    grads = [{"w": torch.zeros(1, dtype=torch.float64)}] * 2
    # Coupled, zero data gradient: step 1 g' = lam*1 = 0.1, buf = 0.1, w = 1 - 0.01 = 0.99;
    # step 2 g' = 0.099, buf = 0.9*0.1 + 0.099 = 0.189, w = 0.99 - 0.0189 = 0.9711.
    coupled = fr.chain(fr.add_decayed_weights(lam), fr.sgd(lr, momentum=m))
    # Decoupled: the buffer stays 0; each step w -= lr*lam*w: 0.99, then 0.99 * 0.99 = 0.9801.
    decoupled = fr.chain(
        fr.sgd(lr, momentum=m), fr.decoupled_weight_decay(lam, learning_rate=lr, scale_by="learning_rate")
    )
    assert abs(run_funcreg(coupled, params, grads)[0]["w"].item() - 0.9711) <= 1e-12
    assert abs(run_funcreg(decoupled, params, grads)[0]["w"].item() - 0.9801) <= 1e-12


def adam_first_step_coupled_and_decoupled(w, g, lam, lr, eps):
    """One step from w with gradient g: coupled L2 in front of Adam, and decoupled decay after it."""
    params = {"w": torch.tensor([w], dtype=torch.float64)}
    grads = [{"w": torch.tensor([g], dtype=torch.float64)}]
    coupled = fr.chain(fr.add_decayed_weights(lam), fr.scale_by_adam(eps=eps), fr.scale_by_learning_rate(lr))
    decoupled = fr.chain(
        fr.scale_by_adam(eps=eps),
        fr.scale_by_learning_rate(lr),
        fr.decoupled_weight_decay(lam, learning_rate=lr, scale_by="learning_rate"),
    )
    return run_funcreg(coupled, params, grads)[0]["w"].item(), run_funcreg(decoupled, params, grads)[0][
        "w"
    ].item()


@settings(deadline=None, max_examples=50, suppress_health_check=SLOW_OK)
@given(w=st.floats(-10, 10), g=st.floats(-10, 10), lam=coefficients, lr=learning_rates, eps=epsilons)
def test_convention_coupled_and_decoupled_differ_for_adam(w, g, lam, lr, eps):
    """Adam's first step is u = -lr * g / (|g| + eps): the coupled term is divided by sqrt(v), the decoupled one is not."""
    got_coupled, got_decoupled = adam_first_step_coupled_and_decoupled(w, g, lam, lr, eps)
    gc = g + lam * w
    assert abs(got_coupled - (w - lr * gc / (abs(gc) + eps))) <= 1e-12
    assert abs(got_decoupled - (w - lr * g / (abs(g) + eps) - lr * lam * w)) <= 1e-12


def test_convention_coupled_and_decoupled_differ_for_adam_example():
    """w = 2, g = 0, lam = lr = 0.1: coupled, Adam normalizes the decay gradient 0.2 to a full step,
    w = 2 - 0.1 = 1.9; decoupled, w = 2 - 0.1 * 0.1 * 2 = 1.98."""
    got_coupled, got_decoupled = adam_first_step_coupled_and_decoupled(2.0, 0.0, 0.1, 0.1, 1e-8)
    assert abs(got_coupled - 1.9) <= 1e-7  # 0.2 / (0.2 + 1e-8) = 1 - 5e-8
    assert abs(got_decoupled - 1.98) <= 1e-12


@settings(deadline=None, max_examples=15, suppress_health_check=SLOW_OK)
@given(problem=problems(dtype=torch.float64), lam=coefficients, hp=sgd_hparams(), use_adam=st.booleans())
def test_convention_loss_term_equals_coupled_edit(problem, lam, hp, use_adam):
    """Autograd of data_loss + lam/2 * ||w||^2 with weight_decay=0 == weight_decay=lam on the data gradient.

    Checked step by step along the trajectory, both forms stepping from the same params and state: the
    gradient the optimizer sees is the same up to one rounding (torch fuses g + lam*w), and a
    trajectory-level comparison would only measure how the dynamics amplify that rounding.
    """
    params, grads = problem
    coeffs = leaves(grads[0])  # the data loss is sum(c * sin(w)): any smooth loss will do

    def data_loss(p):
        return sum((torch.sin(w) * c).sum() for w, c in zip(leaves(p), coeffs))

    def total_loss(p):
        return data_loss(p) + lam / 2 * sum(w.square().sum() for w in leaves(p))

    def make(
        weight_decay,
    ):  # the coupled edit: add_decayed_weights first in the chain (0: identity, same state)
        base = fr.adam(hp["lr"]) if use_adam else fr_sgd(dict(hp, weight_decay=0.0, maximize=False))
        return fr.chain(fr.add_decayed_weights(weight_decay), base)

    loss_term, coupled = make(0.0), make(lam)
    p, state = params, loss_term.init(params)
    for _ in grads:
        u_loss, new_state = loss_term.update(torch.func.grad(total_loss)(p), state, p)
        u_edit, edit_state = coupled.update(torch.func.grad(data_loss)(p), state, p)
        assert_trees_close(u_loss, u_edit, "updates")
        assert_trees_close(
            [t for t in leaves(new_state) if isinstance(t, torch.Tensor) and t.is_floating_point()],
            [t for t in leaves(edit_state) if isinstance(t, torch.Tensor) and t.is_floating_point()],
            "state",
        )
        p, state = fr.apply_updates(p, u_loss), new_state


def test_convention_decoupled_decay_lr_independent_and_schedule_multiplier():
    """s_t = 1 (w <- (1 - wd) w per step), or the schedule multiplier eta_t, never a constant shift."""
    params = {"w": torch.tensor([2.0, -4.0], dtype=torch.float64)}
    zeros = [{"w": torch.zeros(2, dtype=torch.float64)}] * 3
    wd = 0.1
    independent, _ = run_funcreg(fr.decoupled_weight_decay(wd, scale_by="none"), params, zeros)
    assert_tensors_close(independent["w"], params["w"] * (1 - wd) ** 3, "independent")
    eta = [1.0, 0.5, 0.25]
    paper, _ = run_funcreg(
        fr.decoupled_weight_decay(wd, learning_rate=lambda c: eta[c], scale_by="schedule"), params, zeros
    )
    expected = params["w"] * math.prod(1 - e * wd for e in eta)
    assert_tensors_close(paper["w"], expected, "schedule multiplier")


@settings(deadline=None, max_examples=25, suppress_health_check=SLOW_OK)
@given(problem=problems(steps=st.integers(2, 5), dtype=torch.float64), data=st.data())
def test_intermittent_none_gradients_match_torch_per_parameter_steps(problem, data):
    """Gradients that are None at random steps: torch.optim skips those parameters and counts steps per
    parameter (Adam's bias corrections, SGD's first momentum step); funcreg must do the same."""
    params, grads = problem
    spec = pytree.tree_structure(params)
    holes = [
        data.draw(st.lists(st.booleans(), min_size=len(leaves(g)), max_size=len(leaves(g)))) for g in grads
    ]
    grads = [
        pytree.tree_unflatten([None if h else x for x, h in zip(leaves(g), hs)], spec)
        for g, hs in zip(grads, holes)
    ]
    cases = [
        (fr.adamw(0.01, weight_decay=0.1), lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1)),
        (
            fr.sgd(0.1, momentum=0.9, dampening=0.3),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.3),
        ),
    ]
    for tx, make in cases:
        new_params, _ = run_funcreg(tx, params, grads)
        ps, _ = run_torch(make, params, grads)
        for name, a, b in zip(fr.tree_names(params), leaves(new_params), ps):
            torch.testing.assert_close(a, b.detach(), atol=1e-12, rtol=0, msg=lambda m: f"{name}: {m}")
