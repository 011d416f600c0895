"""fr.TorchOptimizer follows torch.optim's protocol: param groups with options, add_param_group,
schedulers (lr, weight_decay, momentum/betas), optimizer.state per parameter, state_dict in torch's
format, hooks, torch.distributed.checkpoint.

The references are torch.optim's own optimizers run on a copy of the same model with the same
param groups and schedulers (never values computed by funcreg), and torch's own optimizer-test
conventions: a state_dict round trip through torch.save/torch.load(weights_only=True) into a fresh
optimizer continues bitwise like the uninterrupted run.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import funcreg as fr

F64 = torch.float64
ATOL, RTOL = 1e-12, 1e-10  # float64; the two implementations round differently


def _save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.body(x))))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().to(F64)


def _batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=g, dtype=F64) for _ in range(n)]


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x) - 0.5).pow(2).mean()


def _groups(model: nn.Module, options: list[dict], split=("body", "norm", "head")) -> list[dict]:
    """One group per top-level module, with the given options (the same split for torch and funcreg)."""
    named = dict(model.named_parameters())
    return [
        {"params": [p for n, p in named.items() if n.startswith(prefix + ".")], **opts}
        for prefix, opts in zip(split, options)
    ]


def _run(model, opt, batches, scheds=(), each_step=None):
    for t, x in enumerate(batches):
        if each_step is not None:
            each_step(opt, t)
        opt.zero_grad()
        _loss(model, x).backward()
        opt.step()
        for s in scheds:
            s.step()


def _assert_same_params(a: nn.Module, b: nn.Module, atol=ATOL, rtol=RTOL) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(
            q.detach(), p.detach(), atol=atol, rtol=rtol, msg=lambda m, n=n: f"{n}: {m}"
        )


def _assert_equal_params(a: nn.Module, b: nn.Module) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def adamw_factory(lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, amsgrad=False, **rest):
    return fr.adamw(lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


def sgd_factory(lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, **rest):
    return fr.sgd(lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay)


# --- per-group options against torch.optim ------------------------------------------------------------

betas = st.tuples(st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([0.9, 0.99, 0.999]))
adam_group = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-4, 0.1),
        "weight_decay": st.sampled_from([0.0, 0.01, 0.5]),
        "betas": betas,
        "eps": st.sampled_from([1e-8, 1e-3]),
    }
)
sgd_group = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-3, 0.2),
        "weight_decay": st.sampled_from([0.0, 0.01, 0.5]),
        "momentum": st.sampled_from([0.0, 0.5, 0.9]),
    }
).map(lambda d: dict(d, nesterov=d["momentum"] > 0 and d["lr"] > 0.1))


@settings(deadline=None, max_examples=12)
@given(kind=st.sampled_from(["adamw", "adam", "sgd"]), data=st.data(), steps=st.integers(1, 5))
def test_param_groups_with_options_follow_torch(kind, data, steps):
    options = data.draw(st.lists(sgd_group if kind == "sgd" else adam_group, min_size=3, max_size=3))
    amsgrad = kind != "sgd" and data.draw(st.booleans())
    torch_cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[kind]
    m1, m2, m3 = _net(), _net(), _net()
    extra = {"amsgrad": amsgrad} if kind != "sgd" else {}
    reference = torch_cls(_groups(m1, options), lr=1e-3, **extra)
    # a factory of the group's options, and the name of funcreg's table entry
    factory = sgd_factory if kind == "sgd" else (adamw_factory if kind == "adamw" else _adam_factory)
    ours = fr.TorchOptimizer(_groups(m2, options), factory, lr=1e-3, **extra)
    named = fr.TorchOptimizer(_groups(m3, options), kind, lr=1e-3, **extra)
    batches = _batches(steps)
    for model, opt in ((m1, reference), (m2, ours), (m3, named)):
        _run(model, opt, batches)
    _assert_same_params(m1, m2)
    _assert_same_params(m1, m3)


def _adam_factory(lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, amsgrad=False, **rest):
    return fr.adam(lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


def test_hf_style_groups_and_kwargs():
    """The HF Trainer's call: optimizer_cls(grouped_parameters, **kwargs), groups of bare tensors."""
    m1, m2 = _net(), _net()
    decay = [n for n, _ in m1.named_parameters() if "bias" not in n and "norm" not in n]

    def grouped(model):
        named = list(model.named_parameters())
        return [
            {"params": [p for n, p in named if n in decay], "weight_decay": 0.1},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]

    reference = torch.optim.AdamW(grouped(m1), lr=0.01)
    ours = fr.TorchOptimizer(grouped(m2), **{"tx": "adamw", "lr": 0.01})
    assert ours.param_groups[1]["param_names"] == ["2", "3", "4", "5"]  # named by position
    for model, opt in ((m1, reference), (m2, ours)):
        _run(model, opt, _batches(4))
    _assert_same_params(m1, m2)


def test_a_group_option_the_factory_ignores_raises():
    model = _net()
    with pytest.raises(
        TypeError, match=r"param group 0 sets 'weight_decay'=0\.1, which the factory does not take"
    ):
        fr.TorchOptimizer(
            [{"params": model.parameters(), "weight_decay": 0.1}], lambda lr: fr.adamw(lr), lr=0.1
        )
    with pytest.raises(ValueError, match="the factory needs 'weight_decay'"):
        fr.TorchOptimizer(
            model.parameters(), lambda lr, weight_decay: fr.adamw(lr, weight_decay=weight_decay), lr=0.1
        )
    with pytest.raises(ValueError, match="takes no options"):
        fr.TorchOptimizer([{"params": model.parameters(), "weight_decay": 0.1}], fr.adamw(0.1))
    # a weight-decay schedule on an optimizer whose factory has the decay built in: an error, not a no-op
    opt = fr.TorchOptimizer(model.parameters(), lambda lr: fr.adamw(lr, weight_decay=0.1), lr=0.1)
    opt.param_groups[0]["weight_decay"] = 0.05
    _loss(model, _batches(1)[0]).backward()
    with pytest.raises(
        RuntimeError, match="'weight_decay'=0.05, which is not an option of this TorchOptimizer"
    ):
        opt.step()


def test_a_failing_factory_names_the_group():
    model = _net()
    with pytest.raises(
        ValueError, match=r"param group 1: the factory failed with options \(lr=0.1, weight_decay=-1"
    ):
        fr.TorchOptimizer(_groups(model, [{}, {"weight_decay": -1.0}, {}]), adamw_factory, lr=0.1)
    with pytest.raises(ValueError, match="param group 2: Invalid lr value"):
        fr.TorchOptimizer(_groups(model, [{}, {}, {"lr": float("nan")}]), adamw_factory, lr=0.1)


# --- duplicates, names, add_param_group ---------------------------------------------------------------


def test_duplicate_parameters_are_refused():
    w = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="lists parameter '1' twice"):
        fr.TorchOptimizer([w, w], fr.sgd(0.1))
    v = nn.Parameter(torch.ones(2))
    with pytest.raises(
        ValueError, match=r"parameter '2' of param group 1 is already in param group 0 \(as '0'\)"
    ):
        fr.TorchOptimizer([{"params": [w]}, {"params": [v, w]}], fr.sgd(0.1))
    with pytest.raises(ValueError, match="the parameter name 'a' is used twice"):
        fr.TorchOptimizer([("a", w), ("a", v)], fr.sgd(0.1))
    # torch itself steps a duplicated parameter twice (it only warns): the reason for refusing
    with pytest.warns(UserWarning, match="duplicate"):
        t = torch.optim.SGD([w, w], lr=0.1)
    w.grad = torch.ones(2)
    t.step()
    torch.testing.assert_close(
        w.detach(), torch.full((2,), 1.0 - 0.1 - 0.1), atol=1e-7, rtol=1e-6
    )  # two steps


def test_add_param_group_follows_torch():
    """Lightning's BackboneFinetuning: a frozen part is unfrozen and added as a new group with its lr."""
    m1, m2 = _net(), _net()
    for m in (m1, m2):
        m.body.requires_grad_(False)
    reference = torch.optim.AdamW([p for n, p in m1.named_parameters() if not n.startswith("body")], lr=0.01)
    ours = fr.TorchOptimizer(
        [(n, p) for n, p in m2.named_parameters() if not n.startswith("body")], "adamw", lr=0.01
    )
    batches = _batches(6)
    for model, opt in ((m1, reference), (m2, ours)):
        _run(model, opt, batches[:3])
        model.body.requires_grad_(True)
        opt.add_param_group({"params": list(model.body.parameters()), "lr": 0.001})
        _run(model, opt, batches[3:])
    assert ours.param_groups[1]["lr"] == 0.001 and ours.param_groups[1]["param_names"] == ["4", "5"]
    assert set(ours.state[m2.body.weight]) == {"count", "exp_avg", "exp_avg_sq", "step"}
    assert int(ours.state[m2.body.weight]["step"]) == 3 and int(ours.state[m2.head.weight]["step"]) == 6
    _assert_same_params(m1, m2)
    with pytest.raises(ValueError, match="already in param group"):
        ours.add_param_group({"params": [m2.body.weight]})
    assert len(ours.param_groups) == 2  # a refused group is not half-added


# --- schedulers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_onecycle_with_cycle_momentum_follows_torch(kind):
    """OneCycleLR(cycle_momentum=True) needs 'betas' or 'momentum' in the defaults, and sets them each step."""
    m1, m2 = _net(), _net()
    if kind == "adamw":
        reference = torch.optim.AdamW(m1.parameters(), lr=0.01, weight_decay=0.1)
        ours = fr.create_optimizer(m2, "adamw", lr=0.01, weight_decay=0.1, decay=True)
    else:
        reference = torch.optim.SGD(m1.parameters(), lr=0.01, momentum=0.9, weight_decay=0.01)
        ours = fr.create_optimizer(m2, "sgd", lr=0.01, momentum=0.9, weight_decay=0.01, decay=True)
    kwargs = {"max_lr": 0.05, "total_steps": 8}
    s1 = torch.optim.lr_scheduler.OneCycleLR(reference, **kwargs)
    s2 = torch.optim.lr_scheduler.OneCycleLR(ours, **kwargs)
    batches = _batches(8)
    _run(m1, reference, batches, [s1])
    _run(m2, ours, batches, [s2])
    key = "betas" if kind == "adamw" else "momentum"
    assert ours.param_groups[0][key] == reference.param_groups[0][key] != (0.9, 0.999)
    _assert_same_params(m1, m2)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_weight_decay_schedule_follows_torch(kind):
    """DINO/MAE style: group["weight_decay"] set before every step, from 0 up (the SGD chain gains a link)."""
    m1, m2 = _net(), _net()
    schedule = [0.0, 0.0, 0.02, 0.04, 0.06, 0.0, 0.08]
    groups1 = _groups(m1, [{}, {"weight_decay": 0.0}, {}], split=("body", "norm", "head"))
    groups2 = _groups(m2, [{}, {"weight_decay": 0.0}, {}], split=("body", "norm", "head"))
    if kind == "adamw":
        reference = torch.optim.AdamW(groups1, lr=0.01)
        ours = fr.TorchOptimizer(groups2, adamw_factory, lr=0.01, weight_decay=0.0)
    else:
        reference = torch.optim.SGD(groups1, lr=0.05, momentum=0.9)
        ours = fr.TorchOptimizer(groups2, sgd_factory, lr=0.05, momentum=0.9, weight_decay=0.0)

    def set_decay(opt, t):
        for g in (0, 2):
            opt.param_groups[g]["weight_decay"] = schedule[t]

    batches = _batches(len(schedule))
    _run(m1, reference, batches, each_step=set_decay)
    _run(m2, ours, batches, each_step=set_decay)
    _assert_same_params(m1, m2)
    if kind == "sgd":  # the momentum buffers were carried over the change of chain
        torch.testing.assert_close(
            ours.state[m2.body.weight]["momentum_buffer"],
            reference.state[m1.body.weight]["momentum_buffer"],
            atol=ATOL,
            rtol=RTOL,
        )


def test_lr_schedulers_follow_torch():
    m1, m2 = _net(), _net()
    options = [{"lr": 0.01}, {"lr": 0.02, "weight_decay": 0.0}, {}]
    reference = torch.optim.AdamW(_groups(m1, options), lr=0.005, weight_decay=0.1)
    ours = fr.TorchOptimizer(_groups(m2, options), "adamw", lr=0.005, weight_decay=0.1)
    scheds = []
    for opt in (reference, ours):
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
        scheds.append(torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[3]))
    batches = _batches(8)
    _run(m1, reference, batches, [scheds[0]])
    _run(m2, ours, batches, [scheds[1]])
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in reference.param_groups]
    _assert_same_params(m1, m2)


def test_an_option_that_changes_a_state_structure_raises():
    model = _net()
    opt = fr.TorchOptimizer(model.parameters(), adamw_factory, lr=0.01, amsgrad=False)
    _loss(model, _batches(1)[0]).backward()
    opt.step()
    opt.param_groups[0]["amsgrad"] = True
    with pytest.raises(
        ValueError,
        match="param group 0: changing amsgrad changes the structure of the transform's ScaleByAdamState",
    ):
        opt.step()


# --- optimizer.state and state_dict -----------------------------------------------------------------


def test_state_holds_torch_names_and_is_the_source_of_truth():
    m1, m2 = _net(), _net()
    reference = torch.optim.AdamW(m1.parameters(), lr=0.01, weight_decay=0.1, amsgrad=True)
    ours = fr.TorchOptimizer(m2.named_parameters(), "adamw", lr=0.01, weight_decay=0.1, amsgrad=True)
    assert set(ours.state[m2.body.weight]) == {"count", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"}
    x = _batches(1)[0]
    for model, opt in ((m1, reference), (m2, ours)):
        _run(model, opt, [x, x])
    for (_n, p), q in zip(m1.named_parameters(), m2.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(ours.state[q][key], reference.state[p][key], atol=ATOL, rtol=RTOL)
        assert int(ours.state[q]["step"]) == int(reference.state[p]["step"]) == 2
    # a state written into optimizer.state (as Lightning and accelerate do when moving it) is used:
    # a tensor replaced, a tensor changed in place, a parameter's dict replaced
    edits = [
        lambda opt, p: opt.state[p].__setitem__("exp_avg", opt.state[p]["exp_avg"] * 3.0),
        lambda opt, p: opt.state[p]["exp_avg_sq"].mul_(0.5),
        lambda opt, p: opt.state.__setitem__(p, {**opt.state[p], "exp_avg": -opt.state[p]["exp_avg"]}),
    ]
    for edit in edits:
        for opt, p in ((reference, m1.head.weight), (ours, m2.head.weight)):
            edit(opt, p)
        for model, opt in ((m1, reference), (m2, ours)):
            _run(model, opt, [x])
        _assert_same_params(m1, m2)
    sgd = fr.TorchOptimizer(m2.named_parameters(), "sgd", lr=0.1, momentum=0.9)
    assert set(sgd.state[m2.body.weight]) == {"count", "momentum_buffer", "step"}


def test_state_dict_is_torch_format_and_weights_only():
    model = _net()
    opt = fr.create_optimizer(model, "adamw", lr=0.01, weight_decay=0.1, penalty=fr.l1(1e-3))
    _run(model, opt, _batches(2))
    sd = _save_load(opt.state_dict())
    assert set(sd) == {"state", "param_groups"}
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert sorted(sd["state"]) == list(range(len(names)))
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3, 4, 5]]
    assert [g["param_names"] for g in sd["param_groups"]] == [g["param_names"] for g in opt.param_groups]
    group = sd["param_groups"][0]
    assert group["lr"] == 0.01 and group["weight_decay"] == 0.1 and group["betas"] == (0.9, 0.999)
    assert "penalty" not in group  # a Python object: left out of the state_dict, kept on loading
    assert set(sd["state"][0]) >= {"exp_avg", "exp_avg_sq", "step"}
    assert sd["state"][0]["exp_avg"].shape == model.body.weight.shape
    # a state_dict taken is a snapshot: later steps do not change it
    before = opt.state_dict()
    frozen = before["state"][0]["exp_avg"].clone()
    _run(model, opt, _batches(1, seed=5))
    assert torch.equal(before["state"][0]["exp_avg"], frozen)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_resume_from_state_dict_is_bitwise_identical(name):
    """torch's optimizer-test convention: save mid-run, load into a fresh optimizer, continue."""
    hp = {"betas": (0.8, 0.99)} if name == "adamw" else {"momentum": 0.9, "nesterov": True}
    batches = _batches(8)

    def make(model):
        opt = fr.create_optimizer(model, name, lr=0.02, weight_decay=0.05, penalty=fr.l1(1e-3), **hp)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=len(batches))
        return opt, sched

    straight = _net()
    opt_straight, sched = make(straight)
    _run(straight, opt_straight, batches, [sched])

    first = _net()
    opt, sched = make(first)
    _run(first, opt, batches[:3], [sched])
    saved = _save_load({"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    resumed = _net(seed=7)  # other initial weights: everything comes from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2, sched2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert _state_dicts_equal(opt2.state_dict(), opt.state_dict())
    _run(resumed, opt2, batches[3:], [sched2])
    _assert_equal_params(straight, resumed)
    assert _state_dicts_equal(opt2.state_dict(), opt_straight.state_dict())
    assert fr.metrics(opt2) == fr.metrics(opt_straight)  # the penalty values and the hyperparameters


def _state_dicts_equal(a, b) -> bool:
    if a["param_groups"] != b["param_groups"] or list(a["state"]) != list(b["state"]):
        return False
    for k in a["state"]:
        sa, sb = a["state"][k], b["state"][k]
        if list(sa) != list(sb) or not all(
            torch.equal(sa[x], sb[x]) and sa[x].dtype == sb[x].dtype for x in sa
        ):
            return False
    return True


def test_load_state_dict_refuses_what_does_not_fit_and_leaves_the_optimizer_as_it_was():
    model = _net()
    opt = fr.create_optimizer(model, "adamw", lr=0.01)
    _run(model, opt, _batches(1))
    sd = opt.state_dict()
    other = fr.create_optimizer(_net(), "sgd", lr=0.3, momentum=0.9)
    snapshot = copy.deepcopy(other.state_dict())
    with pytest.raises(
        ValueError, match="param group 0 has 'betas'=\\(0.9, 0.999\\), which is not an option"
    ):
        other.load_state_dict(sd)  # an AdamW checkpoint into SGD
    assert _state_dicts_equal(other.state_dict(), snapshot)
    other = fr.create_optimizer(_net(), "adamw", lr=0.3, penalty=fr.l1(1e-3))  # a chain with a PenaltyState
    snapshot = copy.deepcopy(other.state_dict())
    with pytest.raises(
        ValueError, match="state_dict has no '.+' for parameter 'body.weight' \\(param group 0\\)"
    ):
        other.load_state_dict(sd)
    assert _state_dicts_equal(other.state_dict(), snapshot)
    with pytest.raises(ValueError, match="state_dict has 1 param groups, this optimizer has 2"):
        opt.load_state_dict({"state": {}, "param_groups": sd["param_groups"][:1]})
    renamed = copy.deepcopy(sd)
    renamed["param_groups"][0]["param_names"][1] = "body.w"
    with pytest.raises(ValueError, match="parameter 1 is 'body.w' there, 'head.weight' here"):
        opt.load_state_dict(renamed)
    bad = copy.deepcopy(sd)
    bad["state"][0]["exp_avg"] = bad["state"][0]["exp_avg"].float()
    with pytest.raises(
        ValueError, match="'exp_avg' of parameter 'body.weight' has shape \\(4, 3\\) and dtype torch.float32"
    ):
        opt.load_state_dict(bad)
    with pytest.raises(ValueError, match="not an optimizer state_dict"):
        opt.load_state_dict({"funcreg": 1})


def test_funcreg_0_1_state_dicts_still_load():
    model = _net()
    tx = lambda lr: fr.adamw(lr, weight_decay=0.1)  # noqa: E731
    params = {k: v.clone() for k, v in fr.params_of(model).items()}
    state = tx(0.01).init(params)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    _, state = tx(0.01).update(grads, state, params)
    legacy = {"funcreg_state": fr.state_dict(state), "lr": 0.01, "names": list(params)}
    opt = fr.TorchOptimizer(model.named_parameters(), tx, lr=0.5)
    opt.load_state_dict(_save_load(legacy))
    assert opt.param_groups[0]["lr"] == 0.01
    assert torch.equal(opt.state[model.body.weight]["exp_avg"], state.mu["body.weight"])


def test_torch_distributed_checkpoint_state_dicts():
    """get_optimizer_state_dict / set_optimizer_state_dict (FSDP2, accelerate), one process, no process group."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    batches = _batches(5)
    straight = _net()
    opt = fr.create_optimizer(straight, "adamw", lr=0.01, weight_decay=0.1)
    _run(straight, opt, batches)
    for flatten in (False, True):
        first = _net()
        opt1 = fr.create_optimizer(first, "adamw", lr=0.01, weight_decay=0.1)
        _run(first, opt1, batches[:2])
        options = StateDictOptions(flatten_optimizer_state_dict=flatten)
        osd = get_optimizer_state_dict(first, opt1, options=options)
        if not flatten:
            assert set(osd["state"]) == {n for n, _ in first.named_parameters()}  # keyed by name
            assert set(osd["state"]["body.weight"]) >= {"exp_avg", "exp_avg_sq", "step"}
        resumed = _net(seed=3)
        resumed.load_state_dict(first.state_dict())
        opt2 = fr.create_optimizer(resumed, "adamw", lr=0.5, weight_decay=0.1)
        set_optimizer_state_dict(resumed, opt2, _save_load(osd), options=options)
        assert opt2.param_groups[0]["lr"] == 0.01
        _run(resumed, opt2, batches[2:])
        _assert_equal_params(straight, resumed)


# --- equivalences, hooks, copies ----------------------------------------------------------------------


def test_groups_are_fr_partition_with_group_labels():
    """Each group's transform sees the whole tree with None for other groups: fr.partition exactly."""
    model = _net()
    mask = fr.decay_mask(model)  # a selection over the whole model, used inside each group
    options = [{"lr": 0.01}, {"lr": 0.05}, {"lr": 0.02}]
    # a penalty over each group's own parameters, and a decay masked by the whole-model selection
    factory = lambda lr: fr.chain(fr.add_penalty_grad(fr.l1(1e-2)), fr.adamw(lr, mask=mask))  # noqa: E731
    opt = fr.TorchOptimizer(
        [
            {"params": [(n, p) for n, p in model.named_parameters() if n.startswith(k)], **o}
            for k, o in zip(("body", "norm", "head"), options)
        ],
        factory,
    )
    params = {k: v.clone() for k, v in fr.params_of(model).items()}
    labels = {n: str(["body", "norm", "head"].index(n.split(".")[0])) for n in params}
    tx = fr.partition({str(i): factory(o["lr"]) for i, o in enumerate(options)}, labels)
    state = tx.init(params)
    for x in _batches(4):
        grads = torch.func.grad(lambda p: _loss_functional(model, p, x))(params)
        updates, state = tx.update(grads, state, params)
        params = fr.apply_updates(params, updates)
        opt.zero_grad()
        _loss(model, x).backward()
        opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]), n
    ours, theirs = opt.funcreg_state, state
    assert isinstance(ours, fr.PartitionState) and list(ours.inner_states) == ["0", "1", "2"]
    a, spec_a = torch.utils._pytree.tree_flatten(ours, is_leaf=lambda x: x is None)
    b, spec_b = torch.utils._pytree.tree_flatten(theirs, is_leaf=lambda x: x is None)
    assert spec_a == spec_b and all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))


def _loss_functional(model, params, x):
    return (torch.func.functional_call(model, params, (x,)) - 0.5).pow(2).mean()


def test_torch_hooks_are_honoured():
    model = _net()
    opt = fr.create_optimizer(model, "adamw", lr=0.01)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("step pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("step post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd pre"))

    def sd_post(o, sd):
        calls.append("sd post")
        sd["param_groups"][0]["tag"] = "saved"

    opt.register_state_dict_post_hook(sd_post)

    def load_pre(o, sd):
        calls.append("load pre")
        sd = dict(sd)
        sd["param_groups"] = [dict(g, lr=0.123) for g in sd["param_groups"]]
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    _run(model, opt, _batches(1))
    sd = opt.state_dict()
    assert sd["param_groups"][0]["tag"] == "saved"
    opt.load_state_dict(sd)
    assert calls == ["step pre", "step post", "sd pre", "sd post", "load pre", "load post"]
    assert [g["lr"] for g in opt.param_groups] == [0.123, 0.123]


def test_deepcopy_is_an_independent_optimizer():
    model = _net()
    opt = fr.create_optimizer(model, "adamw", lr=0.01)
    _run(model, opt, _batches(2))
    twin_model = copy.deepcopy(model)
    pair = copy.deepcopy({"model": model, "opt": opt})  # deepcopy keeps params and state together
    twin_model, twin = pair["model"], pair["opt"]
    assert (
        twin.selection is not None
        and twin.param_groups[0]["param_names"] == opt.param_groups[0]["param_names"]
    )
    _run(model, opt, _batches(2, seed=9))
    _run(twin_model, twin, _batches(2, seed=9))
    _assert_equal_params(model, twin_model)
