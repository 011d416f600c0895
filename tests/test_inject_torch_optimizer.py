"""``fr.inject_hyperparams`` in ``fr.TorchOptimizer``: the injected hyperparameters are param-group options.

The reference is ``torch.optim.AdamW`` with the same param groups, driven by the same torch LR
schedulers (``StepLR``, ``LambdaLR``, ``OneCycleLR``) or by the same hand-written
``group["weight_decay"] = ...``, step for step, in float64 (``atol=1e-12, rtol=1e-10``). The values
reach the step through the state's tensors, written in place: the transform is never rebuilt, and a
compiled ``opt.step`` is not recompiled when they change (a compile counter).
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch._dynamo.testing import CompileCounter

import funcreg as fr

F64 = torch.float64
TOL = {"atol": 1e-12, "rtol": 1e-10}
STEPS = 10
W0 = torch.tensor([[1.0, -2.0], [0.5, 0.25], [-1.5, 3.0]], dtype=F64)
B0 = torch.tensor([0.1, -0.3, 0.7], dtype=F64)

grad_arrays = st.tuples(
    arrays(np.float64, (STEPS, 3, 2), elements=st.floats(-3, 3, width=64)),
    arrays(np.float64, (STEPS, 3), elements=st.floats(-3, 3, width=64)),
)


def _pair():
    """The same two parameters twice: ours (for fr.TorchOptimizer) and theirs (for torch.optim)."""
    ours = {"w": torch.nn.Parameter(W0.clone()), "b": torch.nn.Parameter(B0.clone())}
    theirs = {"w": torch.nn.Parameter(W0.clone()), "b": torch.nn.Parameter(B0.clone())}
    return ours, theirs


def _grads(k, data=None):
    if data is None:
        w = torch.linspace(-1.0, 1.0, 6, dtype=F64).reshape(3, 2) * (k + 1) + math.sin(k)
        return {"w": w, "b": torch.tensor([0.3, -0.2, 0.5], dtype=F64) * (k - 4.5)}
    gw, gb = data
    return {"w": torch.from_numpy(gw[k].copy()), "b": torch.from_numpy(gb[k].copy())}


def _set_grads(params, grads):
    for n, p in params.items():
        p.grad = grads[n].clone()


def _injected_adamw(lr=0.1, weight_decay=0.05):
    return fr.inject_hyperparams(fr.adamw, learning_rate=lr, weight_decay=weight_decay)


def _assert_same(ours, theirs):
    for n in ours:
        torch.testing.assert_close(ours[n].detach(), theirs[n].detach(), **TOL)


# --- the groups show the injected values ------------------------------------------------------------


def test_the_groups_show_the_injected_hyperparameters_under_torchs_names():
    ours, _ = _pair()
    opt = fr.TorchOptimizer(list(ours.items()), _injected_adamw(0.1, 0.05))
    group = opt.param_groups[0]
    assert group["lr"] == 0.1 and group["weight_decay"] == 0.05
    assert type(group["lr"]) is float and type(group["weight_decay"]) is float  # as torch keeps them
    assert "learning_rate" not in group
    assert opt.defaults == {"lr": 0.1, "weight_decay": 0.05}
    assert "lr, weight_decay as group options" in repr(opt)
    # in a chain too, with the other transforms' hyperparameters built in
    tx = fr.chain(
        fr.clip_by_global_norm(1e6), fr.inject_hyperparams(fr.sgd, learning_rate=0.2, weight_decay=0.01)
    )
    opt = fr.TorchOptimizer(list(ours.items()), tx)
    assert {k: opt.param_groups[0][k] for k in ("lr", "weight_decay")} == {"lr": 0.2, "weight_decay": 0.01}


def test_a_group_value_sets_the_step_and_the_state_follows():
    ours, theirs = _pair()
    opt = fr.TorchOptimizer(list(ours.items()), _injected_adamw(0.1, 0.0))
    ref = torch.optim.AdamW(list(theirs.values()), lr=0.1, weight_decay=0.0)
    built = opt.transform(0)
    for o in (opt, ref):
        o.param_groups[0]["lr"] = 0.01
    _set_grads(ours, _grads(0))
    _set_grads(theirs, _grads(0))
    opt.step()
    ref.step()
    _assert_same(ours, theirs)
    assert opt.transform(0) is built  # the values went into the state: no new transform
    assert float(opt.state[ours["w"]]["hyperparams.learning_rate"]) == 0.01
    assert float(opt.funcreg_state.hyperparams["learning_rate"]) == 0.01


# --- schedulers and hand-written values against torch.optim.AdamW -----------------------------------


def _run(opt, ref, ours, theirs, schedulers=(), data=None, before_step=None):
    for k in range(STEPS):
        if before_step is not None:
            before_step(k)
        g = _grads(k, data)
        _set_grads(ours, g)
        _set_grads(theirs, g)
        opt.step()
        ref.step()
        for s in schedulers:
            s.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(ref.param_groups[0]["lr"], rel=1e-15)
    _assert_same(ours, theirs)


@settings(deadline=None, max_examples=12)
@given(
    data=grad_arrays,
    lr=st.floats(1e-3, 0.3),
    wd=st.floats(0.0, 0.5),
    step_size=st.integers(1, 4),
    gamma=st.floats(0.1, 0.9),
)
def test_steplr_drives_the_injected_lr_as_in_torch_adamw(data, lr, wd, step_size, gamma):
    ours, theirs = _pair()
    opt = fr.TorchOptimizer(list(ours.items()), _injected_adamw(lr, wd))
    ref = torch.optim.AdamW(list(theirs.values()), lr=lr, weight_decay=wd)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=step_size, gamma=gamma) for o in (opt, ref)]
    _run(opt, ref, ours, theirs, scheds, data)


@pytest.mark.parametrize("kind", ["lambda", "onecycle"])
def test_lambdalr_and_onecyclelr_drive_it_as_in_torch_adamw(kind):
    ours, theirs = _pair()
    opt = fr.TorchOptimizer(list(ours.items()), _injected_adamw(0.05, 0.1))
    ref = torch.optim.AdamW(list(theirs.values()), lr=0.05, weight_decay=0.1)
    if kind == "lambda":
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1.0 + k)) for o in (opt, ref)]
    else:  # cycle_momentum needs betas or momentum among the groups' options: here only lr and weight_decay
        scheds = [
            torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=STEPS, cycle_momentum=False)
            for o in (opt, ref)
        ]
    _run(opt, ref, ours, theirs, scheds)


@settings(deadline=None, max_examples=12)
@given(
    data=grad_arrays,
    lrs=st.lists(st.floats(1e-3, 0.5), min_size=STEPS, max_size=STEPS),
    wds=st.lists(st.floats(0.0, 0.5), min_size=STEPS, max_size=STEPS),
)
def test_values_written_into_the_group_by_hand_follow_torch_adamw(data, lrs, wds):
    ours, theirs = _pair()
    opt = fr.TorchOptimizer(list(ours.items()), _injected_adamw(0.1, 0.05))
    ref = torch.optim.AdamW(list(theirs.values()), lr=0.1, weight_decay=0.05)

    def before_step(k):
        for o in (opt, ref):
            o.param_groups[0]["lr"] = lrs[k]
            o.param_groups[0]["weight_decay"] = wds[k]

    _run(opt, ref, ours, theirs, data=data, before_step=before_step)


def test_a_weight_decay_changed_mid_run_and_a_tensor_value():
    ours, theirs = _pair()
    opt = fr.TorchOptimizer(list(ours.items()), _injected_adamw(0.1, 0.05))
    ref = torch.optim.AdamW(list(theirs.values()), lr=0.1, weight_decay=0.05)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (opt, ref)]

    def before_step(k):
        if k == 4:  # by hand, mid-run, beside the scheduler of lr
            opt.param_groups[0]["weight_decay"] = 0.3
            ref.param_groups[0]["weight_decay"] = 0.3
        if k == 7:  # a 0-d tensor is taken as a value too (copied, not kept)
            opt.param_groups[0]["weight_decay"] = torch.tensor(0.0, dtype=F64)
            ref.param_groups[0]["weight_decay"] = 0.0

    _run(opt, ref, ours, theirs, scheds, before_step=before_step)


def test_two_param_groups_with_their_own_lr_follow_torch_adamw():
    ours, theirs = _pair()
    opt = fr.TorchOptimizer(
        [{"params": [("w", ours["w"])], "lr": 0.2}, {"params": [("b", ours["b"])], "weight_decay": 0.0}],
        _injected_adamw(0.05, 0.1),
    )
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.2, 0.1), (0.05, 0.0)]
    ref = torch.optim.AdamW(
        [{"params": [theirs["w"]], "lr": 0.2}, {"params": [theirs["b"]], "weight_decay": 0.0}],
        lr=0.05,
        weight_decay=0.1,
    )
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref)]
    _run(opt, ref, ours, theirs, scheds)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [g["lr"] for g in ref.param_groups], rel=1e-15
    )


def test_a_group_added_later_takes_the_defaults_or_its_own_values():
    ours, theirs = _pair()
    opt = fr.TorchOptimizer([("w", ours["w"])], _injected_adamw(0.05, 0.1))
    ref = torch.optim.AdamW([theirs["w"]], lr=0.05, weight_decay=0.1)
    opt.add_param_group({"params": [("b", ours["b"])], "lr": 0.3})
    ref.add_param_group({"params": [theirs["b"]], "lr": 0.3})
    assert (opt.param_groups[1]["lr"], opt.param_groups[1]["weight_decay"]) == (0.3, 0.1)
    _run(opt, ref, ours, theirs)


# --- state_dict ------------------------------------------------------------------------------------


def _scheduled(ours, lr=0.1):
    opt = fr.TorchOptimizer(list(ours.items()), _injected_adamw(lr, 0.05))
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def test_a_state_dict_round_trip_mid_run_continues_as_the_uninterrupted_run():
    ours, _ = _pair()
    opt, sched = _scheduled(ours)
    resumed_params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in ours.items()}
    for k in range(STEPS):
        if k == 4:
            opt.param_groups[0]["weight_decay"] = 0.2  # a value the group holds, not the transform
            buffer = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            for n, p in resumed_params.items():
                p.data.copy_(ours[n].detach())
            resumed, resumed_sched = _scheduled(
                resumed_params, lr=0.7
            )  # other values: the load replaces them
            resumed.load_state_dict(saved["opt"])
            resumed_sched.load_state_dict(saved["sched"])
            assert resumed.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
            assert resumed.param_groups[0]["weight_decay"] == 0.2
        g = _grads(k)
        _set_grads(ours, g)
        opt.step()
        sched.step()
        if k >= 4:
            _set_grads(resumed_params, g)
            resumed.step()
            resumed_sched.step()
    for n in ours:
        torch.testing.assert_close(resumed_params[n].detach(), ours[n].detach(), **TOL)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["lr"] == opt.param_groups[0]["lr"]
    # the state holds the values the next step uses, copies in the state_dict
    assert float(sd["state"][0]["hyperparams.learning_rate"]) == opt.param_groups[0]["lr"]


def test_a_state_dict_without_the_options_takes_the_values_its_state_holds():
    """As saved before the groups showed the injected values: a fixed transform's nan lr, no weight_decay."""
    ours, _ = _pair()
    opt = fr.TorchOptimizer(list(ours.items()), _injected_adamw(0.1, 0.05))
    opt.param_groups[0].update(lr=0.02, weight_decay=0.3)
    _set_grads(ours, _grads(0))
    opt.step()
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = float("nan")
    del sd["param_groups"][0]["weight_decay"]
    other, _ = _pair()
    loaded = fr.TorchOptimizer(list(other.items()), _injected_adamw(0.1, 0.05))
    loaded.load_state_dict(sd)
    assert (loaded.param_groups[0]["lr"], loaded.param_groups[0]["weight_decay"]) == (0.02, 0.3)


def test_a_deep_copy_keeps_the_values_and_steps_alike():
    ours, _ = _pair()
    opt = fr.TorchOptimizer(list(ours.items()), _injected_adamw(0.1, 0.05))
    _set_grads(ours, _grads(0))
    opt.step()
    opt.param_groups[0]["lr"] = 0.03
    twin = copy.deepcopy(opt)
    assert twin.param_groups[0]["lr"] == 0.03
    assert (twin.defaults["lr"], twin.defaults["weight_decay"]) == (0.1, 0.05)
    theirs = dict(zip(twin.param_groups[0]["param_names"], twin.param_groups[0]["params"]))
    for k in range(1, 4):
        for o, params in ((opt, ours), (twin, theirs)):
            o.param_groups[0]["weight_decay"] = 0.1 * k
            _set_grads(params, _grads(k))
            o.step()
    _assert_same(ours, theirs)


# --- torch.compile ---------------------------------------------------------------------------------


def test_a_compiled_step_follows_the_scheduler_without_recompiling():
    ours, theirs = _pair()
    opt = fr.TorchOptimizer(list(ours.items()), _injected_adamw(0.1, 0.05))
    ref = torch.optim.AdamW(list(theirs.values()), lr=0.1, weight_decay=0.05)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.7) for o in (opt, ref)]
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter)
    frames = []
    for k in range(6):
        g = _grads(k)
        _set_grads(ours, g)
        _set_grads(theirs, g)
        step()
        ref.step()
        for s in scheds:
            s.step()
        for o in (opt, ref):
            o.param_groups[0]["weight_decay"] = 0.05 * (k + 2)
        frames.append(counter.frame_count)
    assert frames == [frames[0]] * len(frames), frames  # changing lr and weight_decay recompiles nothing
    _assert_same(ours, theirs)


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (float("nan"), ValueError, "is nan; expected a finite number"),
        (float("inf"), ValueError, "is inf; expected a finite number"),
        (torch.tensor(float("inf")), ValueError, "expected a finite number"),
        ("0.1", TypeError, "expected a number or a 0-d tensor"),
        (True, TypeError, "expected a number or a 0-d tensor"),
        (None, TypeError, "expected a number or a 0-d tensor"),
        (torch.ones(2), ValueError, r"shape \(2,\)"),
        (torch.tensor(1 + 1j), TypeError, "complex"),
    ],
)
def test_a_group_value_that_is_not_a_finite_number_names_the_group_and_key(bad, error, match):
    ours, _ = _pair()
    opt = fr.TorchOptimizer(
        [{"params": [("w", ours["w"])]}, {"params": [("b", ours["b"])]}], _injected_adamw(0.1, 0.05)
    )
    _set_grads(ours, _grads(0))
    before = {n: p.detach().clone() for n, p in ours.items()}
    opt.param_groups[1]["weight_decay"] = bad
    with pytest.raises(error, match=rf"param group 1: 'weight_decay' .*{match}"):
        opt.step()
    for n, p in ours.items():  # refused before any group stepped
        assert torch.equal(p.detach(), before[n])
    opt.param_groups[1]["weight_decay"] = 0.05
    opt.step()
    # at construction, a group's own value
    with pytest.raises(error, match=rf"param group 0: 'weight_decay' .*{match}"):
        fr.TorchOptimizer([{"params": [("w", ours["w"])], "weight_decay": bad}], _injected_adamw())


def test_a_scheduler_that_gives_nan_is_refused_at_the_step():
    ours, _ = _pair()
    opt = fr.TorchOptimizer(list(ours.items()), _injected_adamw())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 if k == 0 else float("nan"))
    _set_grads(ours, _grads(0))
    opt.step()
    sched.step()
    with pytest.raises(ValueError, match=r"param group 0: 'lr' is nan"):
        opt.step()


def test_a_key_injected_twice_in_one_chain_is_refused():
    ours, _ = _pair()
    twice = fr.chain(
        fr.inject_hyperparams(fr.add_decayed_weights, weight_decay=0.1),
        fr.inject_hyperparams(fr.adamw, learning_rate=0.1, weight_decay=0.0),
    )
    with pytest.raises(
        ValueError, match=r"injects 'weight_decay' \(at state \[0\]\) and 'weight_decay'.*ambiguous"
    ):
        fr.TorchOptimizer(list(ours.items()), twice)
    # two names under one group option: learning_rate is shown as lr
    both = fr.chain(
        fr.inject_hyperparams(fr.sgd, learning_rate=0.1),
        fr.inject_hyperparams(lambda lr: fr.scale(lr), lr=1.0),
    )
    with pytest.raises(ValueError, match=r"'learning_rate' .* and 'lr' .*both the group option 'lr'"):
        fr.TorchOptimizer(list(ours.items()), both)
    # the functional state itself stays usable: set_hyperparams refuses the ambiguity too
    with pytest.raises(ValueError, match="found 2"):
        fr.set_hyperparams(twice.init({n: p.detach() for n, p in ours.items()}), weight_decay=0.2)


def test_options_the_transform_does_not_inject_are_refused():
    ours, _ = _pair()
    lr_only = fr.inject_hyperparams(fr.adamw, learning_rate=0.1)
    with pytest.raises(ValueError, match=r"'weight_decay'.*only the hyperparameters it injects, lr"):
        fr.TorchOptimizer([{"params": list(ours.items()), "weight_decay": 0.1}], lr_only)
    with pytest.raises(ValueError, match="inject"):
        fr.TorchOptimizer(list(ours.items()), lr_only, lr=0.1)  # the value is the transform's
    # a transform that injects weight_decay only keeps a fixed lr: a scheduler of lr is refused
    wd_only = fr.inject_hyperparams(
        lambda weight_decay: fr.adamw(0.1, weight_decay=weight_decay), weight_decay=0.1
    )
    opt = fr.TorchOptimizer(list(ours.items()), wd_only)
    assert math.isnan(opt.param_groups[0]["lr"]) and opt.param_groups[0]["weight_decay"] == 0.1
    torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _set_grads(ours, _grads(0))
    with pytest.raises(RuntimeError, match=r"fixed learning rate; inject it"):
        opt.step()


def test_a_removed_option_is_named():
    ours, _ = _pair()
    opt = fr.TorchOptimizer(list(ours.items()), _injected_adamw())
    del opt.param_groups[0]["weight_decay"]
    _set_grads(ours, _grads(0))
    with pytest.raises(ValueError, match=r"param group 0 has no 'weight_decay'"):
        opt.step()


def test_a_factory_that_injects_is_refused():
    """A factory is called again with a group's new options, but the injected values are in the kept
    state: they would silently stay at their first values."""
    ours, _ = _pair()
    with pytest.raises(
        ValueError, match=r"factory's transform injects .*learning_rate \(as 'lr'\).*transform itself"
    ):
        fr.TorchOptimizer(
            list(ours.items()), lambda lr: fr.inject_hyperparams(fr.adamw, learning_rate=lr), lr=0.1
        )
