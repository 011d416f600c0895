"""fr.TorchOptimizer details, each checked against torch.optim doing the same thing side by side
(or against the update written out by hand): a transform is rebuilt exactly when a group option
changes (tensors, tuples, floats), the factory's signature decides what it receives, the groups'
options as ``print(opt)`` shows them, ``add_param_group`` refusing options at once, state_dict hooks
and malformed state_dicts, funcreg 0.1 state_dicts, ``create_optimizer`` with nothing to decay.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import funcreg as fr

F64 = torch.float64
ATOL, RTOL = 1e-12, 1e-10

_grads = hnp.arrays(np.float64, (3,), elements=st.floats(-2.0, 2.0, allow_nan=False, allow_infinity=False))
_scale = st.floats(0.25, 4.0, allow_nan=False, allow_infinity=False)


def _pair(values: np.ndarray) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """The same parameter twice: one for the funcreg optimizer, one for torch's."""
    t = torch.from_numpy(values.copy()).to(F64)
    return torch.nn.Parameter(t.clone()), torch.nn.Parameter(t.clone())


def _set_grad(g: np.ndarray, *params: torch.Tensor) -> None:
    for p in params:
        p.grad = torch.from_numpy(g.copy()).to(F64)


def _step_both(
    g: np.ndarray, optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer], *params: torch.Tensor
) -> None:
    """Give every parameter the gradient ``g``, then step both optimizers (funcreg's, then torch's)."""
    _set_grad(g, *params)
    for opt in optimizers:
        opt.step()


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.detach(), b.detach(), atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------------------
# a transform is rebuilt when (and only when) a group option changes


@settings(max_examples=25, deadline=None)
@given(w=_grads, g1=_grads, g2=_grads, s1=_scale, s2=_scale)
def test_a_tensor_option_changed_in_value_rebuilds_the_transform(w, g1, g2, s1, s2):
    assume(abs(s1 - s2) > 0.1)
    p, q = _pair(w)
    lr = 0.1
    opt = fr.TorchOptimizer(
        [("w", p)],
        lambda lr, scale: fr.chain(fr.scale(float(scale)), fr.sgd(lr)),
        lr=lr,
        scale=torch.tensor(s1, dtype=F64),
    )
    ref = torch.optim.SGD([q], lr=lr * s1)
    _step_both(g1, (opt, ref), p, q)
    # same shape and dtype, another value: the next step uses it
    opt.param_groups[0]["scale"] = torch.tensor(s2, dtype=F64)
    ref.param_groups[0]["lr"] = lr * s2
    _step_both(g2, (opt, ref), p, q)
    _close(p, q)


@settings(max_examples=25, deadline=None)
@given(w=_grads, g1=_grads, g2=_grads, s1=_scale, s2=_scale)
def test_a_tuple_option_changed_in_length_rebuilds_the_transform(w, g1, g2, s1, s2):
    assume(abs(s2 - 1.0) > 0.1)
    p, q = _pair(w)
    lr = 0.1
    opt = fr.TorchOptimizer(
        [("w", p)],
        lambda lr, scales: fr.chain(fr.scale(math.prod(scales)), fr.sgd(lr)),
        lr=lr,
        scales=(s1,),
    )
    ref = torch.optim.SGD([q], lr=lr * s1)
    _step_both(g1, (opt, ref), p, q)
    opt.param_groups[0]["scales"] = (s1, s2)  # the first element unchanged, one more
    ref.param_groups[0]["lr"] = lr * s1 * s2
    _step_both(g2, (opt, ref), p, q)
    _close(p, q)


def test_an_option_changed_from_a_number_to_a_tuple_rebuilds_the_transform():
    w = np.array([1.0, -2.0, 0.5])
    p, q = _pair(w)
    opt = fr.TorchOptimizer(
        [("w", p)],
        lambda lr, scales: fr.chain(
            fr.scale(math.prod(scales) if isinstance(scales, tuple) else scales), fr.sgd(lr)
        ),
        lr=0.1,
        scales=2.0,
    )
    ref = torch.optim.SGD([q], lr=0.2)
    _step_both(w, (opt, ref), p, q)
    opt.param_groups[0]["scales"] = (2.0, 3.0)
    ref.param_groups[0]["lr"] = 0.6
    _step_both(w, (opt, ref), p, q)
    _close(p, q)


@settings(max_examples=15, deadline=None)
@given(w=_grads, grads=st.lists(_grads, min_size=4, max_size=4))
def test_unchanged_options_build_the_transform_once(w, grads):
    """Options read back unchanged at every step are no change: ``betas`` as they were, an ``lr``
    that a constant scheduler sets anew (an equal float, another object) each step. The factory is
    called once, and again only when new betas are set, as torch.optim.Adam reads them at each step."""
    p, q = _pair(w)
    calls = []

    def factory(lr, betas):
        calls.append((lr, betas))
        return fr.adam(lr, betas=betas)

    opt = fr.TorchOptimizer([("w", p)], factory, lr=0.01, betas=(0.9, 0.999))
    ref = torch.optim.Adam([q], lr=0.01, betas=(0.9, 0.999))
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: 1.0) for o in (opt, ref)]
    for g in grads[:2]:
        _step_both(g, (opt, ref), p, q)
        for s in schedulers:
            s.step()
    assert opt.transform(0) is opt.transform(0)
    assert calls == [(0.01, (0.9, 0.999))]
    opt.param_groups[0]["betas"] = ref.param_groups[0]["betas"] = (0.8, 0.99)
    for g in grads[2:]:
        _step_both(g, (opt, ref), p, q)
        for s in schedulers:
            s.step()
    assert calls == [(0.01, (0.9, 0.999)), (0.01, (0.8, 0.99))]
    _close(p, q)
    _close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"])
    _close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])


@settings(max_examples=15, deadline=None)
@given(w=_grads, grads=st.lists(_grads, min_size=4, max_size=4))
def test_weight_decay_and_lr_schedules_follow_torch_adamw(w, grads):
    p, q = _pair(w)
    opt = fr.TorchOptimizer(
        [("w", p)],
        lambda lr, weight_decay: fr.adamw(lr, weight_decay=weight_decay),
        lr=0.05,
        weight_decay=0.1,
    )
    ref = torch.optim.AdamW([q], lr=0.05, weight_decay=0.1)
    schedule = [(0.05, 0.1), (0.02, 0.5), (0.01, 0.0), (0.03, 0.25)]
    for g, (lr, wd) in zip(grads, schedule):
        for group in (opt.param_groups[0], ref.param_groups[0]):
            group["lr"], group["weight_decay"] = lr, wd
        _step_both(g, (opt, ref), p, q)
        _close(p, q)


# ----------------------------------------------------------------------------------------------------
# the factory's signature


def test_a_factory_with_var_keyword_receives_every_group_option():
    w = np.array([1.0, -2.0, 0.5])
    p, q = _pair(w)
    seen = []

    def factory(lr, **rest):
        seen.append(dict(rest))
        return fr.sgd(lr, momentum=rest["momentum"], weight_decay=rest["weight_decay"])

    opt = fr.TorchOptimizer([("w", p)], factory, lr=0.1, momentum=0.9, weight_decay=0.01)
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9, weight_decay=0.01)
    assert seen[-1] == {"momentum": 0.9, "weight_decay": 0.01}
    for g in (w, -w, 2 * w):
        _step_both(g, (opt, ref), p, q)
    _close(p, q)
    _close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])


def test_a_factory_with_var_positional_is_called_with_keywords():
    w = np.array([1.0, -2.0, 0.5])
    p, q = _pair(w)

    def factory(*args, lr, **rest):
        assert args == ()
        return fr.sgd(lr, weight_decay=rest["weight_decay"])

    opt = fr.TorchOptimizer([("w", p)], factory, lr=0.1, weight_decay=0.01)
    ref = torch.optim.SGD([q], lr=0.1, weight_decay=0.01)
    _step_both(w, (opt, ref), p, q)
    _close(p, q)


def test_a_factory_with_a_required_positional_only_parameter_is_refused():
    p = torch.nn.Parameter(torch.ones(2, dtype=F64))
    with pytest.raises(TypeError, match="the factory's parameter 'lr' is positional-only"):
        fr.TorchOptimizer([("w", p)], lambda lr, /: fr.sgd(lr), lr=0.1)


# ----------------------------------------------------------------------------------------------------
# a state whose structure an option changes


class _AccState(NamedTuple):
    acc: dict


def _accumulate(lr: float, acc_dtype: torch.dtype) -> fr.GradientTransformation:
    def init(params):
        return _AccState(
            {n: None if x is None else torch.zeros_like(x, dtype=acc_dtype) for n, x in params.items()}
        )

    def update(updates, state, params=None):
        acc = {
            n: a if g is None else a + g.to(a.dtype) for (n, a), g in zip(state.acc.items(), updates.values())
        }
        return {n: None if g is None else -lr * g for n, g in updates.items()}, _AccState(acc)

    return fr.GradientTransformation(init, update)


def test_an_option_changing_a_state_dtype_is_refused_as_a_structure_change():
    p = torch.nn.Parameter(torch.ones(3, dtype=F64))
    opt = fr.TorchOptimizer([("w", p)], _accumulate, lr=0.1, acc_dtype=F64)
    p.grad = torch.ones(3, dtype=F64)
    opt.step()
    assert opt.state[p]["acc"].dtype == F64
    opt.param_groups[0]["acc_dtype"] = torch.float32
    with pytest.raises(
        ValueError, match="changing acc_dtype changes the structure of the transform's _AccState"
    ):
        opt.step()


# ----------------------------------------------------------------------------------------------------
# the groups' options as print(opt) shows them


def test_print_shows_a_one_element_tensor_option_as_its_number_and_others_as_their_repr():
    p = torch.nn.Parameter(torch.ones(2, dtype=F64))
    big = torch.arange(3.0)
    opt = fr.TorchOptimizer([("w", p)], lambda lr, **rest: fr.sgd(lr), lr=torch.tensor(0.01), big=big)
    lines = str(opt).splitlines()
    assert f"    lr: tensor({0.01:g})" in lines
    assert f"    big: {big!r}" in lines


def test_print_shortens_option_values_longer_than_60_characters():
    p = torch.nn.Parameter(torch.ones(2, dtype=F64))
    fits, too_long = "x" * 58, "y" * 59  # reprs of 60 and 61 characters
    opt = fr.TorchOptimizer([("w", p)], lambda lr, **rest: fr.sgd(lr), lr=0.1, fits=fits, too_long=too_long)
    lines = str(opt).splitlines()
    assert f"    fits: {fits!r}" in lines
    shown = repr(too_long)[:57] + "..."
    assert len(shown) == 60
    assert f"    too_long: {shown}" in lines


# ----------------------------------------------------------------------------------------------------
# add_param_group, state_dict hooks, malformed and funcreg 0.1 state_dicts


def test_add_param_group_refuses_an_option_the_factory_does_not_take_at_once():
    p = torch.nn.Parameter(torch.ones(2, dtype=F64))
    q = torch.nn.Parameter(torch.ones(3, dtype=F64))
    opt = fr.TorchOptimizer([("w", p)], lambda lr: fr.sgd(lr), lr=0.1)
    with pytest.raises(TypeError, match="param group 1 sets 'momentum'=0.9, which the factory does not take"):
        opt.add_param_group({"params": [("v", q)], "momentum": 0.9})
    assert len(opt.param_groups) == 1


def test_a_state_dict_post_hook_may_drop_the_param_groups_as_in_torch():
    def drop_groups(optimizer, sd):
        return {"state": sd["state"]}

    w = np.array([1.0, -2.0, 0.5])
    p, q = _pair(w)
    opt = fr.TorchOptimizer([("w", p)], lambda lr: fr.sgd(lr, momentum=0.9), lr=0.1)
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    for o in (opt, ref):
        o.register_state_dict_post_hook(drop_groups)
    _step_both(w, (opt, ref), p, q)
    ours, theirs = opt.state_dict(), ref.state_dict()
    assert sorted(ours) == sorted(theirs) == ["state"]
    _close(ours["state"][0]["momentum_buffer"], theirs["state"][0]["momentum_buffer"])


@pytest.mark.parametrize("sd", [{"state": {}}, {"param_groups": []}])
def test_a_state_dict_lacking_state_or_param_groups_is_refused(sd):
    p = torch.nn.Parameter(torch.ones(2, dtype=F64))
    opt = fr.TorchOptimizer([("w", p)], lambda lr: fr.sgd(lr), lr=0.1)
    with pytest.raises(
        ValueError, match="not an optimizer state_dict: expected the keys 'state' and 'param_groups'"
    ):
        opt.load_state_dict(sd)


def test_loading_a_funcreg_0_1_state_dict_replaces_the_whole_state_as_torch_does():
    w = np.array([1.0, -2.0, 0.5])
    p, q = _pair(w)
    tx = lambda lr: fr.adamw(lr, weight_decay=0.1)  # noqa: E731
    params = {"w": p.detach().clone()}
    state = tx(0.01).init(params)
    _, state = tx(0.01).update({"w": torch.ones(3, dtype=F64)}, state, params)
    legacy = {"funcreg_state": fr.state_dict(state), "lr": 0.01, "names": ["w"]}

    opt = fr.TorchOptimizer([("w", p)], tx, lr=0.5)
    ref = torch.optim.AdamW([q], lr=0.5, weight_decay=0.1)
    _step_both(w, (opt, ref), p, q)
    saved = torch.optim.AdamW([q.detach().clone()], lr=0.01, weight_decay=0.1).state_dict()
    for o, x in ((opt, p), (ref, q)):
        o.state[x]["note"] = torch.zeros(())  # something else kept in optimizer.state
    opt.load_state_dict(legacy)
    ref.load_state_dict(saved)
    assert "note" not in ref.state[q]
    assert "note" not in opt.state[p]
    assert torch.equal(opt.state[p]["exp_avg"], state.mu["w"])


# ----------------------------------------------------------------------------------------------------
# create_optimizer with nothing to decay


def test_create_optimizer_with_nothing_to_decay_makes_one_no_decay_group():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).to(F64)
    ref_model = torch.nn.Linear(3, 2).to(F64)
    ref_model.load_state_dict(model.state_dict())
    opt = fr.create_optimizer(model, "adamw", lr=0.01, weight_decay=0.1, decay=False)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=0.01, weight_decay=0.0)
    assert [g["name"] for g in opt.param_groups] == ["no_decay"]
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    assert opt.param_groups[0]["weight_decay"] == 0.0
    x = torch.randn(4, 3, dtype=F64)
    for _ in range(2):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            (m(x) - 0.5).pow(2).mean().backward()
            o.step()
    _close(model.weight, ref_model.weight)
    _close(model.bias, ref_model.bias)


# ----------------------------------------------------------------------------------------------------
# ensembles on a torch without torch.compiler.is_compiling (torch 2.2)


class _TorchWithoutIsCompiling:
    """``torch`` as torch 2.2 shows it to a module: no ``torch.compiler.is_compiling``."""

    compiler = object()

    def __getattr__(self, name):
        return getattr(torch, name)


def test_ensemble_checks_each_members_hparams_without_torch_compiler_is_compiling(monkeypatch):
    import funcreg._src.training.ensemble as ensemble

    monkeypatch.setattr(ensemble, "torch", _TorchWithoutIsCompiling())
    step = fr.make_step(
        lambda p, x: ((p["w"] * x).sum() - 1.0) ** 2, lambda h: fr.sgd(0.1, weight_decay=h["wd"])
    )
    ens = fr.ensemble_step(step)
    state = ens.init({"w": torch.ones(3, 2)}, hparams={"wd": torch.tensor([0.0, 0.1, 0.2])})
    state, _ = ens(state, torch.tensor([0.5, 0.5]))
    bad = state._replace(hparams={"wd": torch.tensor([0.0, -5.0, 0.2])})
    with pytest.raises(ValueError, match="member 1"):
        ens(bad, torch.tensor([0.5, 0.5]))
