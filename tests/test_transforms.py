"""Each building block against the same math done by hand, and the protocol every transform keeps.

The hand-written math here uses plain tensor arithmetic on the leaves (never the code under test).
float64 results agree to 1e-12 absolute; float32 to ``assert_close(atol=1e-6, rtol=1e-5)``.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.utils._pytree as pytree
from helpers import (
    SLOW_OK,
    assert_lists_close,
    assert_tensors_close,
    assert_trees_close,
    assert_trees_equal,
    leaves,
    problems,
    run_funcreg,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import funcreg as fr
from funcreg.testing import gradient_sequences, gradients_like, like, param_trees

PROPERTY = settings(deadline=None, max_examples=30, suppress_health_check=SLOW_OK)


def updates_of(tx, params, grads_seq, with_params=True):
    """The update tree of every step (the params are not moved: transforms see the same params)."""
    state, out = tx.init(params), []
    for grads in grads_seq:
        u, state = tx.update(grads, state, params if with_params else None)
        out.append(u)
    return out, state


# --- scale, scale_by_learning_rate, identity ----------------------------------------------------------


@PROPERTY
@given(problem=problems(), c=st.floats(-10, 10))
def test_scale_multiplies_every_update(problem, c):
    params, grads = problem
    out, state = updates_of(fr.scale(c), params, grads, with_params=False)
    assert state == fr.EmptyState()
    for u, g in zip(out, grads):
        assert_lists_close(leaves(u), [c * x for x in leaves(g)], "scale")


@PROPERTY
@given(problem=problems(), lr=st.floats(0.0, 1.0), flip_sign=st.booleans())
def test_scale_by_learning_rate_float(problem, lr, flip_sign):
    params, grads = problem
    out, _ = updates_of(fr.scale_by_learning_rate(lr, flip_sign=flip_sign), params, grads)
    sign = -1.0 if flip_sign else 1.0
    for u, g in zip(out, grads):
        assert_lists_close(leaves(u), [sign * lr * x for x in leaves(g)], "scale_by_learning_rate")


@PROPERTY
@given(problem=problems(), data=st.data())
def test_scale_by_learning_rate_schedule_is_called_with_updates_done_so_far(problem, data):
    """The schedule sees 0 at the first update, then 1, 2, ...; state.count is the number of updates done."""
    params, grads = problem
    values = data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(grads), max_size=len(grads)))
    calls = []

    def schedule(count):
        calls.append(count)
        return values[count]

    tx = fr.scale_by_learning_rate(schedule)
    state = tx.init(params)
    assert isinstance(state, fr.ScaleByScheduleState) and int(state.count) == 0
    for step, g in enumerate(grads):
        u, state = tx.update(g, state, params)
        assert int(state.count) == step + 1
        assert_lists_close(leaves(u), [-values[step] * x for x in leaves(g)], f"step {step}")
    assert [int(c) for c in calls] == list(range(len(grads)))


def test_identity_returns_updates_unchanged():
    tx = fr.identity()
    grads = {"w": torch.randn(3, generator=torch.Generator().manual_seed(0)), "b": None}
    state = tx.init(grads)
    u, new_state = tx.update(grads, state)
    assert u["w"] is grads["w"] and u["b"] is None
    assert state == new_state == fr.EmptyState()


# --- trace --------------------------------------------------------------------------------------------


def trace_by_hand(grads_seq, momentum, dampening, nesterov):
    """torch.optim.SGD's momentum: b_1 = g_1, b_t = m b_{t-1} + (1 - d) g_t; u = b_t or g_t + m b_t."""
    bufs, outs = None, []
    for grads in grads_seq:
        gs = leaves(grads)
        if bufs is None:
            bufs = [g.clone() for g in gs]
        else:
            bufs = [momentum * b + (1 - dampening) * g for b, g in zip(bufs, gs)]
        outs.append([g + momentum * b for g, b in zip(gs, bufs)] if nesterov else [b.clone() for b in bufs])
    return outs, bufs


@PROPERTY
@given(
    problem=problems(),
    momentum=st.one_of(st.just(0.9), st.floats(0.0, 1.0)),
    dampening=st.one_of(st.just(0.0), st.floats(-1.0, 1.0)),
    nesterov=st.booleans(),
)
def test_trace_matches_torch_momentum_by_hand(problem, momentum, dampening, nesterov):
    params, grads = problem
    if momentum == 0 or dampening != 0:
        nesterov = False
    out, state = updates_of(fr.trace(momentum, dampening, nesterov), params, grads)
    expected_out, expected_bufs = trace_by_hand(grads, momentum, dampening, nesterov)
    for step, (u, e) in enumerate(zip(out, expected_out)):
        assert_lists_close(leaves(u), e, f"trace step {step}")
    assert isinstance(state, fr.TraceState) and int(state.count) == len(grads)
    assert_lists_close(leaves(state.trace), expected_bufs, "momentum_buffer")


def test_trace_first_buffer_is_the_gradient_without_dampening():
    tx = fr.trace(0.5, dampening=0.5)
    params = {"w": torch.zeros(1, dtype=torch.float64)}
    state = tx.init(params)
    assert torch.equal(state.trace["w"], torch.zeros(1, dtype=torch.float64))
    u, state = tx.update({"w": torch.tensor([4.0], dtype=torch.float64)}, state)
    assert u["w"].item() == 4.0 and state.trace["w"].item() == 4.0  # not (1 - 0.5) * 4
    u, state = tx.update({"w": torch.tensor([2.0], dtype=torch.float64)}, state)
    assert u["w"].item() == 0.5 * 4.0 + 0.5 * 2.0


# --- scale_by_adam ------------------------------------------------------------------------------------


def adam_by_hand(grads_seq, b1, b2, eps, amsgrad):
    m = v = vmax = None
    outs = []
    for t, grads in enumerate(grads_seq, start=1):
        gs = leaves(grads)
        if m is None:
            m = [torch.zeros_like(g) for g in gs]
            v = [torch.zeros_like(g) for g in gs]
            vmax = [torch.zeros_like(g) for g in gs]
        m = [b1 * mi + (1 - b1) * g for mi, g in zip(m, gs)]
        v = [b2 * vi + (1 - b2) * g * g for vi, g in zip(v, gs)]
        vmax = [torch.maximum(a, b) for a, b in zip(vmax, v)]
        second = vmax if amsgrad else v
        outs.append(
            [(mi / (1 - b1**t)) / (torch.sqrt(si) / math.sqrt(1 - b2**t) + eps) for mi, si in zip(m, second)]
        )
    return outs, m, v, vmax


@PROPERTY
@given(
    problem=problems(),
    b1=st.one_of(st.just(0.9), st.floats(0.0, 0.99)),
    db2=st.floats(0.0, 1.0),
    eps=st.one_of(st.just(1e-8), st.floats(1e-8, 1e-2)),
    amsgrad=st.booleans(),
)
def test_scale_by_adam_by_hand(problem, b1, db2, eps, amsgrad):
    # b2 in [b1^2, 0.9999]: m_hat / sqrt(v_hat) stays O(sqrt(steps)), so absolute tolerances hold.
    b2 = b1**2 + db2 * (0.9999 - b1**2)
    params, grads = problem
    out, state = updates_of(fr.scale_by_adam(b1, b2, eps, amsgrad), params, grads)
    expected, m, v, vmax = adam_by_hand(grads, b1, b2, eps, amsgrad)
    for step, (u, e) in enumerate(zip(out, expected)):
        assert_lists_close(leaves(u), e, f"adam step {step}")
    assert isinstance(state, fr.ScaleByAdamState) and int(state.count) == len(grads)
    assert_lists_close(leaves(state.mu), m, "mu")
    assert_lists_close(leaves(state.nu), v, "nu")
    if amsgrad:
        assert_lists_close(leaves(state.nu_max), vmax, "nu_max")
    else:
        assert state.nu_max is None


def test_scale_by_adam_amsgrad_uses_running_max_of_v():
    """g = 2 then 0 with b1 = 0, b2 = 0.5: v = 2, 1; amsgrad divides the second step by sqrt(2/(1-0.25))."""
    params = {"w": torch.zeros(1, dtype=torch.float64)}
    grads = [{"w": torch.tensor([2.0], dtype=torch.float64)}, {"w": torch.tensor([1.0], dtype=torch.float64)}]
    out, state = updates_of(fr.scale_by_adam(0.0, 0.5, 0.0, amsgrad=True), params, grads)
    # step 1: v = 0.5*4 = 2, v_hat = 2/0.5 = 4, u = 2/2 = 1. step 2: v = 0.5*2 + 0.5*1 = 1.5 < vmax = 2;
    # denominator sqrt(2) / sqrt(1 - 0.25); u = 1 / (sqrt(2)/sqrt(0.75)).
    assert abs(out[0]["w"].item() - 1.0) <= 1e-15
    assert abs(out[1]["w"].item() - math.sqrt(0.75) / math.sqrt(2.0)) <= 1e-15
    assert state.nu["w"].item() == 1.5 and state.nu_max["w"].item() == 2.0


# --- weight decay -------------------------------------------------------------------------------------


@PROPERTY
@given(problem=problems(), wd=st.floats(0.0, 1.0))
def test_add_decayed_weights_adds_wd_times_w(problem, wd):
    params, grads = problem
    out, _ = updates_of(fr.add_decayed_weights(wd), params, grads)
    for u, g in zip(out, grads):
        assert_lists_close(
            leaves(u), [x + wd * w for x, w in zip(leaves(g), leaves(params))], "add_decayed_weights"
        )


@PROPERTY
@given(problem=problems(), wd=st.floats(0.0, 1.0), data=st.data())
def test_decoupled_weight_decay_s_is_lr_schedule_or_one(problem, wd, data):
    params, grads = problem
    lr = data.draw(st.floats(0.0, 1.0))
    values = data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(grads), max_size=len(grads)))
    for learning_rate, scale_by, s in (
        (lr, "learning_rate", [lr] * len(grads)),
        (lambda count: values[count], "learning_rate", values),  # a learning-rate schedule
        (lambda count: values[count], "schedule", values),  # a multiplier schedule: the same arithmetic
        (None, "none", [1.0] * len(grads)),
    ):
        tx = fr.decoupled_weight_decay(wd, learning_rate=learning_rate, scale_by=scale_by)
        out, state = updates_of(tx, params, grads)
        for step, (u, g) in enumerate(zip(out, grads)):
            expected = [x - s[step] * wd * w for x, w in zip(leaves(g), leaves(params))]
            assert_lists_close(leaves(u), expected, f"decoupled_weight_decay step {step}")
        if callable(learning_rate) and wd != 0:
            assert isinstance(state, fr.DecoupledWeightDecayState) and int(state.count) == len(grads)


# --- clip_by_global_norm ------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single_tensor"])
@PROPERTY
@given(problem=problems(steps=st.just(1)), max_norm=st.one_of(st.floats(1e-3, 100.0), st.just(1.0)))
def test_clip_by_global_norm_matches_clip_grad_norm(foreach, problem, max_norm):
    params, (grads,) = problem
    ps = [torch.nn.Parameter(p.clone()) for p in leaves(params)]
    for p, g in zip(ps, leaves(grads)):
        p.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(ps, max_norm, foreach=foreach)
    u, _ = fr.clip_by_global_norm(max_norm).update(grads, fr.clip_by_global_norm(max_norm).init(params))
    assert_lists_close(leaves(u), [p.grad for p in ps], "clip_by_global_norm")
    # and by hand: scaled by min(1, max_norm / (||g|| + 1e-6))
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in leaves(grads)))
    assert abs(float(total) - norm) <= 1e-5 * max(1.0, norm)
    coef = min(1.0, max_norm / (norm + 1e-6))
    assert_lists_close(leaves(u), [g * coef for g in leaves(grads)], "clip by hand")


# --- apply_if_finite ----------------------------------------------------------------------------------


@PROPERTY
@given(
    problem=problems(steps=st.integers(1, 8), dtype=torch.float64, nested=False),
    max_errors=st.integers(0, 3),
    data=st.data(),
)
def test_apply_if_finite_skips_non_finite_updates_and_keeps_inner_state(problem, max_errors, data):
    params, grads = problem
    bad = data.draw(
        st.lists(
            st.sampled_from([None, math.nan, math.inf, -math.inf]), min_size=len(grads), max_size=len(grads)
        )
    )
    corrupted = []
    for g, b in zip(grads, bad):
        g = {k: v.clone() for k, v in g.items()}
        if b is not None:
            key = data.draw(st.sampled_from(sorted(g)))
            g[key].view(-1)[0] = b
        corrupted.append(g)
    inner = fr.sgd(0.1, momentum=0.9)
    tx = fr.apply_if_finite(inner, max_errors)
    state, ref_state = tx.init(params), inner.init(params)
    consecutive = total = 0
    for step, g in enumerate(corrupted):
        # a step counts as finite when its gradients and the inner transform's output both are (a
        # forced NaN step poisons the momentum, whose later outputs are then skipped too)
        tried, tried_state = inner.update(g, ref_state, params)
        finite = all(bool(torch.isfinite(x).all()) for x in g.values()) and all(
            bool(torch.isfinite(x).all()) for x in tried.values()
        )
        consecutive = 0 if finite else consecutive + 1
        total += not finite
        if finite or consecutive > max_errors:
            expected, ref_state = tried, tried_state
        else:
            expected = {k: torch.zeros_like(v) for k, v in g.items()}
        u, state = tx.update(g, state, params)
        assert_trees_equal(u, expected, f"updates at step {step}", equal_nan=True)
        assert_trees_equal(state.inner_state, ref_state, f"inner state at step {step}", equal_nan=True)
        assert isinstance(state, fr.ApplyIfFiniteState)
        assert int(state.notfinite_count) == consecutive
        assert bool(state.last_finite) == finite
        assert int(state.total_notfinite) == total


def test_apply_if_finite_passes_after_max_consecutive_errors():
    tx = fr.apply_if_finite(fr.scale(1.0), max_consecutive_errors=2)
    params = {"w": torch.zeros(1)}
    state = tx.init(params)
    nan = {"w": torch.tensor([math.nan])}
    seen = []
    for _ in range(4):
        u, state = tx.update(nan, state, params)
        seen.append(bool(torch.isnan(u["w"]).all()))
    assert seen == [False, False, True, True]  # zeros twice, then the NaN passes
    u, state = tx.update({"w": torch.ones(1)}, state, params)
    assert u["w"].item() == 1.0 and int(state.notfinite_count) == 0 and int(state.total_notfinite) == 4


# --- chain by hand ------------------------------------------------------------------------------------


@PROPERTY
@given(problem=problems(), wd=st.floats(0.0, 1.0), m=st.floats(0.0, 0.99), lr=st.floats(0.0, 1.0))
def test_chain_equals_the_same_steps_by_hand(problem, wd, m, lr):
    """chain(add_decayed_weights, trace, scale_by_learning_rate, decoupled_weight_decay) over a trajectory."""
    params, grads = problem
    tx = fr.chain(
        fr.add_decayed_weights(wd),
        fr.trace(m),
        fr.scale_by_learning_rate(lr),
        fr.decoupled_weight_decay(wd, scale_by="none"),
    )
    new_params, state = run_funcreg(tx, params, grads)
    # the reference in float64: float32 rounds each step at the scale of the terms it adds (up to
    # lr * |buffer|), which cancellation can leave far above the final weight's own size
    ws, bufs = [p.double() for p in leaves(params)], None
    scale = [w.abs() for w in ws]
    for g in grads:
        d = [x.double() + wd * w for x, w in zip(leaves(g), ws)]
        bufs = [x.clone() for x in d] if bufs is None else [m * b + x for b, x in zip(bufs, d)]
        ws = [w + (-lr * b - wd * w) for w, b in zip(ws, bufs)]
        scale = [torch.maximum(s, (lr * b).abs() + w.abs()) for s, b, w in zip(scale, bufs, ws)]
    for got, want, s in zip(leaves(new_params), ws, scale):
        if got.dtype == torch.float64:
            assert_tensors_close(got, want, "params")
        else:  # float32: a few roundings at the scale of the largest term of the trajectory
            err = (got.double() - want).abs()
            assert torch.all(err <= 1e-6 + 4 * torch.finfo(got.dtype).eps * s * len(grads)), (got, want)
    assert isinstance(state, tuple) and len(state) == 4


# --- None leaves pass through -------------------------------------------------------------------------


def transforms_under_test(names):
    """Every building block and combinator, stateful ones with non-trivial state."""
    chosen = set(names[::2])
    return {
        "scale": fr.scale(-2.0),
        "lr": fr.scale_by_learning_rate(0.1),
        # library schedules: float64 for a tensor count too (under vmap the count is an int64 tensor)
        "lr_schedule": fr.scale_by_learning_rate(fr.cosine_decay_schedule(0.1, 5)),
        "trace": fr.trace(0.9, dampening=0.1),
        "trace_nesterov": fr.trace(0.9, nesterov=True),
        "adam": fr.scale_by_adam(amsgrad=True),
        "add_decayed_weights": fr.add_decayed_weights(0.1),
        "decoupled": fr.decoupled_weight_decay(
            0.1, learning_rate=fr.linear_schedule(0.5, 2.0, 3), scale_by="schedule"
        ),
        "clip": fr.clip_by_global_norm(1.0),
        "masked": fr.masked(fr.trace(0.9), lambda tree: {k: k in chosen for k in tree}),
        "if_finite": fr.apply_if_finite(fr.scale_by_adam(), 2),
        "chain": fr.chain(fr.add_decayed_weights(0.1), fr.trace(0.5), fr.scale_by_learning_rate(0.1)),
        "named_chain": fr.named_chain(
            ("decay_step", fr.add_decayed_weights(0.1)), ("adam_step", fr.scale_by_adam())
        ),
        "sgd": fr.sgd(0.1, momentum=0.9, weight_decay=0.1),
        "adam_alias": fr.adam(0.1, weight_decay=0.1, amsgrad=True),
        "adamw_alias": fr.adamw(0.1, weight_decay=0.1),
    }


TRANSFORM_NAMES = list(transforms_under_test([]))


def per_param_trees(state, spec):
    """The subtrees of a state that have the parameters' structure (moments, buffers), in order."""
    if pytree.tree_structure(state, is_leaf=lambda x: x is None) == spec:
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in per_param_trees(v, spec)]
    if isinstance(state, (tuple, list)):
        return [t for v in state for t in per_param_trees(v, spec)]
    return []


@pytest.mark.parametrize("name", TRANSFORM_NAMES)
@settings(deadline=None, max_examples=10, suppress_health_check=SLOW_OK)
@given(data=st.data())
def test_none_leaves_pass_through_and_keep_their_state(name, data):
    params = data.draw(param_trees(min_leaves=2, nested=False))
    g0, g1 = data.draw(gradients_like(params)), data.draw(gradients_like(params, allow_none=True))
    tx = transforms_under_test(list(params))[name]
    state0 = tx.init(params)
    _, state1 = tx.update(g0, state0, params)
    out, state2 = tx.update(g1, state1, params)
    present = [k for k, v in g1.items() if v is not None]
    spec = pytree.tree_structure(params, is_leaf=lambda x: x is None)
    for k, v in g1.items():
        if v is None:
            assert out[k] is None, k
    trees1, trees2 = per_param_trees(state1, spec), per_param_trees(state2, spec)
    assert len(trees1) == len(trees2)
    for t1, t2 in zip(trees1, trees2):
        for k in params:
            if g1[k] is None and t1[k] is not None:
                assert torch.equal(t2[k], t1[k]), f"state of {k!r} changed"
    if not present:
        return
    # The present leaves behave as if the tree held only them.
    sub = {k: params[k] for k in present}
    sub_tx = transforms_under_test(list(params))[name]
    _, sub_state = sub_tx.update({k: g0[k] for k in present}, sub_tx.init(sub), sub)
    sub_out, sub_state = sub_tx.update({k: g1[k] for k in present}, sub_state, sub)
    assert_trees_close({k: out[k] for k in present}, sub_out, "present updates")
    sub_spec = pytree.tree_structure(sub, is_leaf=lambda x: x is None)
    for t2, s2 in zip(trees2, per_param_trees(sub_state, sub_spec)):
        assert_trees_close({k: t2[k] for k in present}, s2, "present state")


# --- states: NamedTuples of tensors that torch.save and vmap handle -----------------------------------


def state_leaves_are_tensors(state):
    kinds = []

    def walk(x):
        if isinstance(x, torch.Tensor) or x is None:
            kinds.append(True)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (tuple, list)):
            for v in x:
                walk(v)
        else:
            kinds.append(False)

    walk(state)
    return all(kinds)


@pytest.mark.parametrize("name", TRANSFORM_NAMES)
@settings(deadline=None, max_examples=5, suppress_health_check=SLOW_OK)
@given(problem=problems(steps=st.just(4), nested=True))
def test_state_survives_torch_save_and_load(name, problem):
    params, grads = problem
    tx = transforms_under_test(list(params))[name]
    state = tx.init(params)
    assert state_leaves_are_tensors(state)
    for g in grads[:2]:
        _, state = tx.update(g, state, params)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(state)
    assert_trees_equal(loaded, state, "loaded state")
    for g in grads[2:]:
        u, state = tx.update(g, state, params)
        u_loaded, loaded = tx.update(g, loaded, params)
        assert_trees_equal(u_loaded, u, "updates after loading")
    assert_trees_equal(loaded, state, "state after loading")


@pytest.mark.parametrize("name", TRANSFORM_NAMES)
@settings(deadline=None, max_examples=5, suppress_health_check=SLOW_OK)
@given(data=st.data())
def test_vmap_over_stacked_members_equals_separate_calls(name, data):
    """vmap(tx.update) over 3 members == 3 separate calls, float64, 1e-12 (traced counts, no foreach)."""
    members = 3
    first = data.draw(param_trees(dtype=torch.float64, nested=data.draw(st.booleans())))
    params = [first] + [data.draw(like(first)) for _ in range(members - 1)]
    steps = data.draw(st.integers(1, 4))
    grads = [data.draw(gradient_sequences(first, steps)) for _ in range(members)]
    if name == "if_finite":  # member 1 gets a NaN at step 0: skipped there, applied elsewhere
        leaf = leaves(grads[1][0])[0]
        leaf.view(-1)[0] = math.nan
    tx = transforms_under_test(list(first))[name]

    def stack(trees):
        return pytree.tree_map(lambda *xs: None if xs[0] is None else torch.stack(xs), *trees)

    states = [tx.init(p) for p in params]
    batched_state = stack(states)
    batched_params = stack(params)
    for t in range(steps):
        separate = [tx.update(grads[i][t], states[i], params[i]) for i in range(members)]
        states = [s for _, s in separate]
        batched_u, batched_state = vmap_with_none(tx.update)(
            stack([grads[i][t] for i in range(members)]), batched_state, batched_params
        )
        for i in range(members):
            u_i, s_i = pytree.tree_map(lambda x, i=i: None if x is None else x[i], (batched_u, batched_state))
            assert_trees_close(u_i, separate[i][0], f"updates of member {i} at step {t}", equal_nan=True)
            assert_trees_close(s_i, separate[i][1], f"state of member {i} at step {t}", equal_nan=True)


def vmap_with_none(fn):
    """``torch.func.vmap(fn)`` over the leading axis of every tensor, for trees that hold ``None`` leaves.

    vmap takes only tensors (a masked-out parameter's state and ``nu_max`` without amsgrad are ``None``):
    the ``None`` leaves are set aside, the tensors vmapped, and the trees rebuilt.
    """

    def call(*args):
        flat, spec = pytree.tree_flatten(args)  # None is a leaf of torch's pytree
        at = [i for i, x in enumerate(flat) if x is not None]
        layout = {}

        def inner(*tensors):
            full = list(flat)
            for i, x in zip(at, tensors):
                full[i] = x
            out, layout["spec"] = pytree.tree_flatten(fn(*pytree.tree_unflatten(full, spec)))
            layout["present"] = [x is not None for x in out]
            return tuple(x for x in out if x is not None)

        outs = iter(torch.func.vmap(inner)(*[flat[i] for i in at]))
        return pytree.tree_unflatten([next(outs) if p else None for p in layout["present"]], layout["spec"])

    return call


def test_vmap_trace_keeps_float64_precision():
    """Under vmap the count is traced; momentum 0.9 must not be rounded to float32 (it was, once)."""
    tx = fr.trace(0.9, dampening=0.1)
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    grads = [
        {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)},
        {"w": torch.tensor([3.0, -1.0], dtype=torch.float64)},
    ]
    # by hand: b1 = g1; b2 = 0.9 * g1 + (1 - 0.1) * g2
    expected = 0.9 * grads[0]["w"] + (1 - 0.1) * grads[1]["w"]
    batched = pytree.tree_map(lambda x: x.unsqueeze(0), tx.init(params))
    stacked_params = {"w": params["w"].unsqueeze(0)}
    for g in grads:
        u, batched = vmap_with_none(tx.update)({"w": g["w"].unsqueeze(0)}, batched, stacked_params)
    assert (u["w"][0] - expected).abs().max().item() <= 1e-12
