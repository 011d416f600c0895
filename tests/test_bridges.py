"""The bridges: TorchOptimizer (a real torch.optim.Optimizer) and checkpoints of transform states."""

import io
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import funcreg as fr

F64 = torch.float64


def _save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _model():
    # built outside @given with a fixed seed; Hypothesis draws the data
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(F64)


TRANSFORMS = {
    "sgd_momentum": lambda lr: fr.sgd(lr, momentum=0.9, weight_decay=0.01),
    "adamw_masked": lambda lr: fr.adamw(lr, weight_decay=0.1, mask=fr.by_name("*.weight")),
    "coupled_l1": lambda lr: fr.chain(fr.add_penalty_grad(fr.l1(0.01)), fr.adam(lr)),
    "proximal_l1": lambda lr: fr.chain(fr.sgd(lr), fr.proximal(fr.l1(0.05), lr)),
}


@settings(deadline=None, max_examples=8)
@given(
    name=st.sampled_from(sorted(TRANSFORMS)),
    x=arrays(np.float64, (5, 3), elements=st.floats(-2, 2)),
    steps=st.integers(1, 5),
)
def test_torch_optimizer_follows_the_functional_step(name, x, steps):
    model = _model()
    x = torch.from_numpy(x)
    params = {k: v.clone() for k, v in fr.params_of(model).items()}
    tx = TRANSFORMS[name](0.05)
    state = tx.init(params)
    opt = fr.TorchOptimizer(model.named_parameters(), TRANSFORMS[name], lr=0.05)

    def loss_fn(p):
        return torch.func.functional_call(model, p, (x,)).pow(2).sum()

    for _ in range(steps):
        grads = torch.func.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        params = fr.apply_updates(params, updates)
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[k], atol=1e-12, rtol=0)


def test_torch_optimizer_honours_lr_schedulers_like_torch_adamw():
    m1, m2 = _model(), _model()
    opt1 = torch.optim.AdamW(m1.parameters(), lr=0.01, weight_decay=0.1)
    opt2 = fr.TorchOptimizer(m2.named_parameters(), lambda lr: fr.adamw(lr, weight_decay=0.1), lr=0.01)
    s1 = torch.optim.lr_scheduler.StepLR(opt1, step_size=2, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    x = torch.linspace(-1, 1, 15, dtype=F64).reshape(5, 3)
    for _ in range(6):
        for model, opt, sched in ((m1, opt1, s1), (m2, opt2, s2)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
            sched.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**3)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_torch_optimizer_closure_and_skipped_grads():
    model = _model()
    opt = fr.TorchOptimizer(model.named_parameters(), fr.sgd(0.1))
    frozen = model[2].bias.detach().clone()

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(1, 3, dtype=F64)).sum()
        loss.backward()
        model[2].bias.grad = None  # as if frozen: no update for it
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert torch.equal(model[2].bias.detach(), frozen)


def test_fixed_transform_refuses_a_scheduler():
    model = _model()
    opt = fr.TorchOptimizer(model.named_parameters(), fr.sgd(0.1))
    torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.ones(1, 3, dtype=F64)).sum().backward()
    with pytest.raises(RuntimeError, match="factory"):
        opt.step()


def test_torch_optimizer_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="lr"):
        fr.TorchOptimizer(model.named_parameters(), lambda lr: fr.sgd(lr))
    with pytest.raises(ValueError, match="lr"):
        fr.TorchOptimizer(model.named_parameters(), fr.sgd(0.1), lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        fr.TorchOptimizer(model.named_parameters(), lambda lr: fr.sgd(lr), lr=float("nan"))
    with pytest.raises(TypeError, match="GradientTransformation"):
        fr.TorchOptimizer(model.named_parameters(), 3)
    with pytest.raises(ValueError, match="did you mean .*'adam'"):
        fr.TorchOptimizer(model.named_parameters(), "adma")
    with pytest.raises(ValueError, match="empty"):
        fr.TorchOptimizer([], fr.sgd(0.1))


def test_torch_optimizer_state_dict_round_trip_and_mismatch():
    model = _model()
    opt = fr.TorchOptimizer(model.named_parameters(), lambda lr: fr.adamw(lr), lr=0.01)
    model(torch.ones(2, 3, dtype=F64)).sum().backward()
    opt.step()
    saved = _save_load(opt.state_dict())
    other = fr.TorchOptimizer(model.named_parameters(), lambda lr: fr.adamw(lr), lr=0.5)
    other.load_state_dict(saved)
    assert other.param_groups[0]["lr"] == 0.01
    for a, b in zip(fr.tree_names(other.funcreg_state), fr.tree_names(opt.funcreg_state)):
        assert a == b
    torch.testing.assert_close(
        other.funcreg_state.mu["0.weight"], opt.funcreg_state.mu["0.weight"], atol=0, rtol=0
    )
    wrong = fr.TorchOptimizer(model.named_parameters(), fr.sgd(0.1, momentum=0.9))
    with pytest.raises(ValueError, match="fixed learning rate"):  # saved with an lr option
        wrong.load_state_dict(saved)
    wrong = fr.TorchOptimizer(model.named_parameters(), lambda lr: fr.sgd(lr, momentum=0.9), lr=0.5)
    with pytest.raises(ValueError, match="state_dict has no 'momentum_buffer' for parameter '0.weight'"):
        wrong.load_state_dict(saved)
    assert wrong.param_groups[0]["lr"] == 0.5  # a failed load leaves the optimizer as it was


def _run(step, state, batches):
    for x, y in batches:
        state, _ = step(state, x, y)
    return state


def test_resume_from_checkpoint_is_bitwise_identical():
    model = _model()

    def loss_fn(p, x, y):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, p, (x,)), y)

    step = fr.make_step(
        loss_fn, fr.adamw(0.01, weight_decay=0.1), penalty=fr.l1(1e-3), form="proximal", learning_rate=0.01
    )
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 2, generator=g, dtype=F64))
        for _ in range(6)
    ]
    straight = _run(step, step.init(fr.params_of(model)), batches)

    first = _run(step, step.init(fr.params_of(model)), batches[:3])
    restored = fr.load_state_dict(step.init(fr.params_of(model)), _save_load(fr.state_dict(first)))
    resumed = _run(step, restored, batches[3:])

    leaves_a, spec_a = torch.utils._pytree.tree_flatten(straight)
    leaves_b, spec_b = torch.utils._pytree.tree_flatten(resumed)
    assert spec_a == spec_b
    for a, b in zip(leaves_a, leaves_b):
        assert (a is None and b is None) or torch.equal(a, b)


def test_state_dict_is_plain_and_load_refuses_other_structures():
    params = {"w": torch.ones(2, 3), "b": torch.ones(3)}
    state = fr.adamw(0.1).init(params)
    with pytest.raises(pickle.UnpicklingError):
        _save_load(state)  # NamedTuple states are not weights_only-loadable as such...
    restored = fr.load_state_dict(
        fr.adamw(0.1).init(params), _save_load(fr.state_dict(state))
    )  # ...their dict is
    assert type(restored) is type(state)
    with pytest.raises(ValueError, match="'nu_max"):
        fr.load_state_dict(fr.adamw(0.1, amsgrad=True).init(params), fr.state_dict(state))
    with pytest.raises(ValueError, match="shape"):
        fr.load_state_dict(
            fr.adamw(0.1).init({"w": torch.ones(3, 3), "b": torch.ones(3)}), fr.state_dict(state)
        )
    with pytest.raises(ValueError, match="dtype"):
        fr.load_state_dict(
            fr.adamw(0.1).init({k: v.double() for k, v in params.items()}), fr.state_dict(state)
        )
    with pytest.raises(ValueError, match="no entry '1.count'"):
        fr.load_state_dict(fr.chain(fr.identity(), fr.adamw(0.1)).init(params), fr.state_dict(state))
    with pytest.raises(ValueError, match="structure"):  # same names, a dict where the state has a NamedTuple
        fr.load_state_dict(dict(state._asdict()), fr.state_dict(state))
    with pytest.raises(ValueError, match="not a funcreg"):
        fr.load_state_dict(state, {"something": 1})


# --- fr.metrics: one flat dict of floats for loggers ------------------------------------------------


def test_metrics_of_a_torch_optimizer_are_its_group_options():
    model = _model()
    opt = torch.optim.AdamW(
        [{"params": model[0].parameters(), "lr": 0.1, "name": "first"}, {"params": model[2].parameters()}],
        lr=0.01,
        weight_decay=0.5,
    )
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # adds initial_lr: bookkeeping, not reported
    m = fr.metrics(opt, prefix="opt/")
    assert m["opt/first/lr"] == 0.1 and m["opt/group1/lr"] == 0.01
    assert (
        m["opt/first/weight_decay"] == 0.5 and m["opt/first/beta1"] == 0.9 and m["opt/first/beta2"] == 0.999
    )
    assert not any("initial_lr" in k or "amsgrad" in k for k in m)  # bookkeeping and booleans left out
    assert all(isinstance(k, str) and type(v) is float for k, v in m.items())


def test_metrics_penalties_are_the_penalty_at_the_params_before_the_last_update():
    model = _model()
    c1, c2 = 1e-2, 1e-3
    x = torch.linspace(-1, 1, 15, dtype=F64).reshape(5, 3)
    # two groups, each penalizing its own parameters: the metric is the sum, the penalty over the model
    factory = lambda lr, c: fr.chain(fr.add_penalty_grad(fr.l1(c) + fr.l2(c, name="ridge")), fr.sgd(lr))  # noqa: E731
    opt = fr.TorchOptimizer(
        [
            {"params": model[0].named_parameters(prefix="0"), "c": c1},
            {"params": model[2].named_parameters(prefix="2"), "c": c2},
        ],
        factory,
        lr=0.1,
    )
    for _ in range(2):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    groups = [before[:2], before[2:]]
    l1 = sum(c * sum(w.abs().sum() for w in ws) for c, ws in zip((c1, c2), groups)).item()
    ridge = sum(c / 2 * sum(w.square().sum() for w in ws) for c, ws in zip((c1, c2), groups)).item()
    m = fr.metrics(opt)
    assert m["penalty/l1"] == pytest.approx(l1, rel=1e-12)
    assert m["penalty/ridge"] == pytest.approx(ridge, rel=1e-12)
    assert m["penalty"] == pytest.approx(l1 + ridge, rel=1e-12)
    assert m["group0/c"] == c1 and m["group1/lr"] == 0.1
    # the same from the functional state, and from the metrics dict of a training step
    state = opt.funcreg_state
    assert {k: v for k, v in fr.metrics(state).items()} == {
        k: v for k, v in m.items() if k.startswith("penalty")
    }
    assert fr.metrics({"data_loss": torch.tensor(0.5), "aux": "text", "flag": True}) == {"data_loss": 0.5}
    named = fr.named_chain(("l1", fr.add_penalty_grad(fr.l1(0.1))), ("sgd", fr.sgd(0.1)))  # a dict state
    assert fr.metrics(named.init({"w": torch.tensor([1.0, -2.0], dtype=F64)})) == {
        "penalty": pytest.approx(0.3, rel=1e-12),  # 0.1 * (1 + 2), at the initial params
        "penalty/l1": pytest.approx(0.3, rel=1e-12),
    }


def test_history_takes_the_floats_of_metrics():
    model = _model()
    opt = fr.create_optimizer(model, "adamw", lr=0.01, penalty=fr.l1(1e-3))
    history = fr.History()
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(2, 3, dtype=F64)).sum().backward()
        opt.step()
        history.append(fr.metrics(opt))
    assert history["decay/lr"].tolist() == [0.01] * 3
    assert history["penalty/l1"].shape == (3,) and history["penalty/l1"].dtype == F64
    pd = pytest.importorskip("pandas")
    assert isinstance(history.to_dataframe(), pd.DataFrame)


def test_reports_to_dataframe():
    pytest.importorskip("pandas")
    params = {"w": torch.tensor([[0.0, 3.0], [0.0, -4.0]]), "b": torch.tensor([1.0])}
    df = fr.sparsity(params).to_dataframe()
    assert df.to_dict("records") == [
        {"name": "w", "shape": (2, 2), "zeros": 2, "numel": 4, "fraction": 0.5},
        {"name": "b", "shape": (1,), "zeros": 0, "numel": 1, "fraction": 0.0},
    ]
    assert fr.norms(params).to_dataframe()["norm"].tolist() == [5.0, 1.0]
