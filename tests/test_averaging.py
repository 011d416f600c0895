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


TRACED_CASES = {
    "swa": lambda: fr.average_weights(fr.sgd(0.1, momentum=0.9)),
    "ema": lambda: fr.average_weights(fr.sgd(0.1, momentum=0.9), decay=0.8),
    # the decay ramp computed from a tensor count, with a copy for the first two updates
    "ema_warmup": lambda: fr.average_weights(
        fr.adam(0.1), decay=0.99, warmup=True, min_decay=0.1, update_after_step=1
    ),
}


@pytest.mark.parametrize("case", sorted(TRACED_CASES))
def test_average_weights_traced_equals_eager(case):
    """Under torch.compile and vmap the first average (and the warm-up's decay) is chosen by
    torch.where from a tensor count, not in Python: the same average as eagerly."""
    tx = TRACED_CASES[case]()
    gs = [torch.tensor([0.5, -1.0], dtype=torch.float64) * (k + 1) for k in range(5)]

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


# --- timm ModelEmaV3's decay warm-up, and the buffers ---------------------------------------------


def timm_decay(
    step: int, decay: float, warmup: bool, gamma: float, power: float, min_decay: float, after: int
) -> float:
    """``ModelEmaV3.get_decay(step)``, written out from its definition (``step``: updates so far)."""
    s = max(0, step - after - 1)
    if s <= 0:
        return 0.0
    if not warmup:
        return decay
    return max(min(1 - (1 + s / gamma) ** -power, decay), min_decay)


@PROPERTY
@given(
    grads=st.lists(arrays(np.float64, (3,), elements=st.floats(-2, 2, width=64)), min_size=1, max_size=8),
    decay=st.floats(0.5, 0.9999),
    warmup=st.booleans(),
    gamma=st.floats(0.5, 4.0),
    power=st.floats(0.5, 1.0),
    min_frac=st.floats(0.0, 1.0),
    after=st.integers(0, 3),
)
def test_warmup_follows_timm_model_ema_v3(grads, decay, warmup, gamma, power, min_frac, after):
    """The average is the EMA of the weights with timm's decay at each update: a copy for the first
    ``update_after_step + 1`` updates, then ``decay`` or the warm-up ramp clipped to [min_decay, decay]."""
    min_decay = min_frac * decay
    tx = fr.average_weights(
        fr.sgd(0.1, momentum=0.9),
        decay=decay,
        warmup=warmup,
        warmup_gamma=gamma,
        warmup_power=power,
        min_decay=min_decay,
        update_after_step=after,
    )
    params = {"w": torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)}
    state = tx.init(params)
    ema = None
    for step, g in enumerate(grads, start=1):
        u, state = tx.update({"w": torch.from_numpy(g)}, state, params)
        params = fr.apply_updates(params, u)
        d = timm_decay(step, decay, warmup, gamma, power, min_decay, after)
        ema = params["w"].clone() if ema is None else d * ema + (1 - d) * params["w"]
        torch.testing.assert_close(fr.averaged_params(state)["w"], ema, **TOL)
        assert abs(float(state.weight) - (1 - d)) <= 1e-12


def _bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1)).double()


@pytest.mark.parametrize("decay", [0.7, None], ids=["ema", "swa"])
@pytest.mark.parametrize("donate", [False, True])
@settings(deadline=None, max_examples=8, database=None)
@given(xs=st.lists(arrays(np.float64, (6, 3), elements=st.floats(-2, 2, width=64)), min_size=1, max_size=5))
def test_average_buffers_equal_averaged_model_with_buffers(decay, donate, xs):
    """make_step(buffers=True) with average_weights + average_buffers: the averaged weights and
    BatchNorm statistics equal AveragedModel(use_buffers=True) updated after each torch.optim.SGD
    step, with the EMA or (no decay) the running mean of SWA, where the buffers enter with the
    parameters' weight 1 / (n + 1); num_batches_tracked is copied (timm's rule; AveragedModel would
    average the integer)."""
    model = _bn_model()
    apply = fr.functional_model(model)

    def loss(p, b, x):
        out, new = apply(p, b, x)
        return (out**2).mean(), new

    step = fr.make_step(loss, fr.average_weights(fr.sgd(0.1), decay=decay), buffers=True, donate=donate)
    state = step.init(fr.params_of(model), fr.buffers_of(model))
    averaged_buffers = {k: v.clone() for k, v in state.buffers.items()}
    reference = _bn_model()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    ema = None if decay is None else get_ema_multi_avg_fn(decay)
    avg = AveragedModel(reference, multi_avg_fn=ema, use_buffers=True)
    for x in xs:
        x = torch.from_numpy(x)
        state, _ = step(state, x)
        averaged_buffers = fr.average_buffers(averaged_buffers, state.buffers, state.opt_state)
        opt.zero_grad()
        (reference(x) ** 2).mean().backward()
        opt.step()
        avg.update_parameters(reference)
    for name, p in avg.module.named_parameters():
        torch.testing.assert_close(fr.averaged_params(state.opt_state)[name], p.detach(), **TOL)
    for name, b in avg.module.named_buffers():
        if b.is_floating_point():
            torch.testing.assert_close(averaged_buffers[name], b, **TOL)
        else:
            assert int(averaged_buffers[name]) == len(xs) == int(dict(reference.named_buffers())[name])


@pytest.mark.parametrize("mode", ["compile", "vmap"])
@settings(deadline=None, max_examples=6, database=None)
@given(
    grads=st.lists(arrays(np.float64, (2,), elements=st.floats(-2, 2, width=64)), min_size=2, max_size=5),
    means=st.lists(arrays(np.float64, (2,), elements=st.floats(-3, 3, width=64)), min_size=5, max_size=5),
)
def test_traced_swa_average_buffers_equal_averaged_model_running_mean(mode, grads, means):
    """Under torch.compile and vmap the SWA weight comes from a tensor count: the buffers passed to
    average_buffers after each traced step still form AveragedModel(use_buffers=True)'s running mean
    (the first copied, the (n + 1)-th entering with weight 1 / (n + 1)), beside the weights'."""
    w0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(w0.clone())
    model.register_buffer("running_mean", torch.zeros(2, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    avg = AveragedModel(model, use_buffers=True)
    tx = fr.average_weights(fr.sgd(0.1))

    def step(g, b, state, params, averaged):
        u, state = tx.update({"w": g}, state, params)
        return fr.apply_updates(params, u), state, fr.average_buffers(averaged, {"running_mean": b}, state)

    params = {"w": w0.clone()}
    if mode == "compile":
        traced, state, lead = (
            torch.compile(step, backend="eager", fullgraph=True),
            tx.init(params),
            (lambda t: t),
        )
    else:
        params = fr.stack([params, params])
        traced, state, lead = fr.vmap(step), fr.vmap(tx.init)(params), (lambda t: torch.stack([t, t]))
    averaged = {"running_mean": lead(torch.zeros(2, dtype=torch.float64))}
    for g, b in zip(grads, means):
        g, b = torch.from_numpy(g), torch.from_numpy(b)
        params, state, averaged = traced(lead(g), lead(b), state, params, averaged)
        model.w.grad = g.clone()
        opt.step()
        model.running_mean.copy_(b)
        avg.update_parameters(model)
    got_w, got_b = fr.averaged_params(state)["w"], averaged["running_mean"]
    if mode == "vmap":
        got_w, got_b = got_w[1], got_b[1]
    torch.testing.assert_close(got_w, avg.module.w.detach(), **TOL)
    torch.testing.assert_close(got_b, avg.module.running_mean, **TOL)


def test_average_buffers_and_warmup_validation():
    with pytest.raises(ValueError, match="give decay"):
        fr.average_weights(fr.sgd(0.1), warmup=True)
    with pytest.raises(ValueError, match="min_decay"):
        fr.average_weights(fr.sgd(0.1), decay=0.5, min_decay=0.6)
    with pytest.raises(ValueError, match="warmup_gamma"):
        fr.average_weights(fr.sgd(0.1), decay=0.5, warmup=True, warmup_gamma=0.0)
    with pytest.raises(TypeError, match="update_after_step"):
        fr.average_weights(fr.sgd(0.1), decay=0.5, update_after_step=1.5)
    tx = fr.average_weights(fr.sgd(0.1), decay=0.5)
    state = tx.init({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="running_mean"):
        fr.average_buffers({"running_mean": torch.zeros(2)}, {"running_mean": torch.zeros(3)}, state)
    with pytest.raises(ValueError):
        fr.average_buffers({"a": torch.zeros(2)}, {"b": torch.zeros(2)}, state)
    with pytest.raises(ValueError, match="found 0"):
        fr.average_buffers({}, {}, fr.sgd(0.1).init({"w": torch.zeros(2)}))


def test_warmup_defaults_are_timms():
    """Left at their defaults, warmup_gamma and warmup_power are ModelEmaV3's (1 and 2/3)."""
    tx = fr.average_weights(fr.sgd(1.0), decay=0.9999, warmup=True)
    params = {"w": torch.zeros(1, dtype=torch.float64)}
    state = tx.init(params)
    for step in range(1, 6):
        u, state = tx.update({"w": torch.ones(1, dtype=torch.float64)}, state, params)
        params = fr.apply_updates(params, u)
        want = 1 - timm_decay(step, 0.9999, True, 1.0, 2 / 3, 0.0, 0)
        assert abs(float(state.weight) - want) <= 1e-15


def test_average_buffers_keep_absent_buffers_absent():
    """A ``None`` buffer stays ``None``; one present now but absent from the average is copied."""
    tx = fr.average_weights(fr.sgd(0.1), decay=0.5)
    params = {"w": torch.zeros(1)}
    _, state = tx.update({"w": torch.zeros(1)}, tx.init(params), params)
    _, state = tx.update({"w": torch.zeros(1)}, state, params)
    out = fr.average_buffers({"a": None, "b": None}, {"a": None, "b": torch.tensor([3.0])}, state)
    assert out["a"] is None and torch.equal(out["b"], torch.tensor([3.0]))


def test_warmup_options_are_validated_and_shown():
    sgd = fr.sgd(0.1)
    for kwargs, err in (
        (dict(decay=0.5, warmup=True, warmup_power=0.0), ValueError),
        (dict(decay=0.5, warmup=True, warmup_power=torch.tensor(0.5)), TypeError),
        (dict(decay=0.5, warmup=True, warmup_gamma=torch.tensor(1.0)), TypeError),
        (dict(decay=0.5, min_decay=torch.tensor(0.1)), TypeError),
        (dict(decay=0.5, min_decay=1.0), ValueError),
        (dict(decay=0.5, warmup=1), TypeError),
        (dict(min_decay=0.1), ValueError),
        (dict(update_after_step=2), ValueError),
        (dict(decay=0.5, update_after_step=-1), ValueError),
    ):
        with pytest.raises(err):
            fr.average_weights(sgd, **kwargs)
    shown = repr(
        fr.average_weights(sgd, decay=0.9, warmup=True, warmup_gamma=2.0, min_decay=0.1, update_after_step=3)
    )
    for part in ("decay=0.9", "warmup=True", "warmup_gamma=2", "min_decay=0.1", "update_after_step=3"):
        assert part in shown, shown
    assert "warmup_power" not in shown and "warmup=" not in repr(fr.average_weights(sgd, decay=0.9))
    assert "warmup_power=0.75" in repr(fr.average_weights(sgd, decay=0.9, warmup=True, warmup_power=0.75))
