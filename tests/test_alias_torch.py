"""The other torch.optim aliases against torch.optim 2.13, step by step, params and state.

Adamax, NAdam, RAdam, RMSprop, Adagrad, Adadelta, Rprop, Adafactor and Muon each run in lockstep with
their torch namesake (foreach and single-tensor paths where torch has both) on drawn trees (float32
and float64, flat and nested), 1 to 10 steps with fresh gradients, some of them ``None`` at random
steps (torch then skips the parameter and counts steps per parameter), with and without a learning-rate
schedule (torch's ``LambdaLR``). After every step the params and every state buffer are compared
(float64: max abs diff <= 1e-12; float32: atol 1e-6 + rtol 1e-5) and funcreg continues from torch's
values (see ``helpers.lockstep``). Lion is not in torch: it runs against the paper's update rule,
written out below as a torch.optim.Optimizer.
"""

from __future__ import annotations

import collections
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
import torch.utils._pytree as pytree
from helpers import (
    SLOW_OK,
    TORCH_NAMESAKES,
    GroupWeightDecaySchedule,
    assert_tensors_close,
    decay_schedule,
    detached,
    find_state,
    find_states,
    leaves,
    replace_field,
    torch_state,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import funcreg as fr
from funcreg.testing import gradient_sequences, param_trees

EXAMPLES = settings(deadline=None, max_examples=12, suppress_health_check=SLOW_OK)

lrs = st.floats(1e-4, 1.0)
coefficients = st.one_of(st.just(0.0), st.floats(1e-4, 1.0))
epsilons = st.one_of(st.just(1e-8), st.floats(1e-10, 1e-2))
b1s = st.one_of(st.just(0.9), st.just(0.0), st.floats(0.0, 0.99))


def adam_betas(draw: Any) -> tuple[float, float]:
    """b2 >= b1**2, as in test_alias.py: then |m_hat| / sqrt(v_hat) stays O(sqrt(steps))."""
    b1 = draw(b1s)
    return b1, draw(st.one_of(st.just(0.999), st.just(0.9), st.floats(b1**2, 0.9999)))


# --- drawn problems -----------------------------------------------------------------------------------


@st.composite
def problems(draw: Any, matrices: bool = False) -> tuple[Any, list[Any]]:
    """A tree and 1 to 10 gradient trees for it, each gradient ``None`` at random steps."""
    nested = draw(st.booleans())
    params = draw(param_trees(nested=nested, max_leaves=4, max_ndim=3, max_side=4))
    if matrices:  # Muon: at least one matrix, beside whatever else was drawn
        dtype = leaves(params)[0].dtype
        extra = draw(param_trees(dtype=dtype, min_leaves=1, max_leaves=1, min_ndim=2, max_ndim=2, max_side=5))
        params = {"rest": params, "m": next(iter(extra.values()))}
    grads = draw(gradient_sequences(params, st.integers(1, 10), allow_none=True))
    return params, grads


# --- lockstep with any state mapping ------------------------------------------------------------------


class Sync(NamedTuple):
    """A per-parameter field of a funcreg state and the torch.optim state key it equals."""

    cls: type
    field: str
    key: str


def compare_state(state: Any, opt: Any, ps: list[Any], syncs: list[Sync], step: int) -> None:
    for s in syncs:
        found = find_states(state, s.cls)
        if (
            not found or getattr(found[0], s.field) is None
        ):  # an optional part (momentum, centering) not in use
            assert all(v is None for v in torch_state(opt, ps, s.key)), (
                f"torch has {s.key!r} but funcreg does not"
            )
            continue
        ours = leaves(getattr(found[0], s.field))
        for i, (mine, theirs) in enumerate(zip(ours, torch_state(opt, ps, s.key))):
            if theirs is None:  # never stepped (torch creates state lazily), or a field it lacks
                continue
            assert_tensors_close(
                mine, theirs, f"step {step}: {s.cls.__name__}.{s.field} vs {s.key!r}, leaf {i}"
            )


def compare_steps(state: Any, opt: Any, ps: list[Any], cls: type, step: int) -> None:
    ours = leaves(find_state(state, cls).steps)
    for i, (mine, theirs) in enumerate(zip(ours, torch_state(opt, ps, "step"))):
        expected = 0 if theirs is None else int(theirs.item())
        assert int(mine) == expected, f"step {step}: steps of leaf {i}: {int(mine)} vs torch {expected}"


def run_lockstep(
    tx: fr.GradientTransformation,
    params: Any,
    grads_seq: list[Any],
    make: Callable[[list[Any]], Any],
    syncs: list[Sync],
    steps_cls: type | None,
    schedulers: Callable[[Any], list[Any]] | None = None,
    torch_grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """funcreg and torch side by side; after each step compare, then continue from torch's values.

    ``torch_grad(g, p)`` is the gradient torch is given (default ``g``). Returns the largest
    parameter difference seen (for the report in the module docstring's spirit).
    """
    ps = [torch.nn.Parameter(p.detach().clone()) for p in leaves(params)]
    opt = make(ps)
    scheds = schedulers(opt) if schedulers is not None else []
    spec = pytree.tree_structure(params, is_leaf=lambda x: x is None)
    state = tx.init(params)
    worst = 0.0
    for step, grads in enumerate(grads_seq, start=1):
        updates, state = tx.update(grads, state, params)
        new_params = fr.apply_updates(params, updates)
        for p, g in zip(ps, leaves(grads)):
            p.grad = None if g is None else (g.clone() if torch_grad is None else torch_grad(g, p.detach()))
        opt.step()
        for s in scheds:
            s.step()
        for i, (mine, theirs) in enumerate(zip(leaves(new_params), detached(ps))):
            assert_tensors_close(mine, theirs, f"params after step {step}, leaf {i}")
            if mine.numel():
                worst = max(worst, float((mine - theirs).abs().max()))
        compare_state(state, opt, ps, syncs, step)
        if steps_cls is not None:
            compare_steps(state, opt, ps, steps_cls, step)
        params = pytree.tree_unflatten([p.detach().clone() for p in ps], spec)
        for s in syncs:
            state = replace_field(state, s.cls, s.field, torch_state(opt, ps, s.key))
    return worst


# --- one spec per alias: hyperparameters, both constructors, the state mapping -------------------------


class Spec(NamedTuple):
    hparams: Callable[[Any], dict]  # draw -> torch kwargs (without lr)
    ours: Callable[..., fr.GradientTransformation]  # (lr, **kwargs) -> funcreg
    theirs: type
    syncs: list[Sync]
    steps_cls: type
    foreach: bool = True


def _adamax(draw):
    return dict(
        betas=adam_betas(draw),
        eps=draw(epsilons),
        weight_decay=draw(coefficients),
        maximize=draw(st.booleans()),
    )


def _nadam(draw):
    return dict(
        betas=adam_betas(draw),
        eps=draw(epsilons),
        weight_decay=draw(coefficients),
        momentum_decay=draw(st.one_of(st.just(4e-3), st.floats(0.0, 0.1))),
        decoupled_weight_decay=draw(st.booleans()),
        maximize=draw(st.booleans()),
    )


def _radam(draw):
    return dict(
        betas=adam_betas(draw),
        eps=draw(epsilons),
        weight_decay=draw(coefficients),
        decoupled_weight_decay=draw(st.booleans()),
        maximize=draw(st.booleans()),
    )


def _rmsprop(draw):
    return dict(
        alpha=draw(st.one_of(st.just(0.99), st.floats(0.5, 0.999))),
        eps=draw(epsilons),
        weight_decay=draw(coefficients),
        momentum=draw(st.one_of(st.just(0.0), st.floats(0.0, 0.99))),
        centered=draw(st.booleans()),
        maximize=draw(st.booleans()),
    )


def _adagrad(draw):
    return dict(
        lr_decay=draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0))),
        weight_decay=draw(coefficients),
        initial_accumulator_value=draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0))),
        eps=draw(st.one_of(st.just(1e-10), st.floats(1e-10, 1e-2))),
        maximize=draw(st.booleans()),
    )


def _adadelta(draw):
    return dict(
        rho=draw(st.one_of(st.just(0.9), st.floats(0.0, 1.0))),
        eps=draw(st.one_of(st.just(1e-6), st.floats(1e-8, 1e-2))),
        weight_decay=draw(coefficients),
        maximize=draw(st.booleans()),
    )


def _rprop(draw):
    return dict(
        etas=(draw(st.floats(0.1, 0.9)), draw(st.floats(1.1, 2.0))),
        step_sizes=(draw(st.floats(1e-7, 1e-3)), draw(st.floats(1.0, 100.0))),
        maximize=draw(st.booleans()),
    )


def _adafactor(draw):
    # eps1 >= 1e-16: eps1**2 must not underflow in float32, or a zero gradient gives 0 * rsqrt(0) = NaN
    # (in torch as in funcreg)
    return dict(
        beta2_decay=draw(st.one_of(st.just(-0.8), st.floats(-1.0, 0.0))),
        eps=(
            draw(st.one_of(st.none(), st.floats(1e-16, 1e-3))),
            draw(st.one_of(st.just(1e-3), st.floats(1e-4, 1e-2))),
        ),
        d=draw(st.one_of(st.just(1.0), st.floats(1.0, 3.0))),
        weight_decay=draw(coefficients),
        maximize=draw(st.booleans()),
    )


SPECS = {
    "adamax": Spec(
        _adamax,
        fr.adamax,
        torch.optim.Adamax,
        [Sync(fr.ScaleByAdamaxState, "mu", "exp_avg"), Sync(fr.ScaleByAdamaxState, "nu", "exp_inf")],
        fr.ScaleByAdamaxState,
    ),
    "nadam": Spec(
        _nadam,
        fr.nadam,
        torch.optim.NAdam,
        [
            Sync(fr.ScaleByNadamState, "mu", "exp_avg"),
            Sync(fr.ScaleByNadamState, "nu", "exp_avg_sq"),
            Sync(fr.ScaleByNadamState, "mu_product", "mu_product"),
        ],
        fr.ScaleByNadamState,
    ),
    "radam": Spec(
        _radam,
        fr.radam,
        torch.optim.RAdam,
        [Sync(fr.ScaleByRadamState, "mu", "exp_avg"), Sync(fr.ScaleByRadamState, "nu", "exp_avg_sq")],
        fr.ScaleByRadamState,
    ),
    "rmsprop": Spec(
        _rmsprop,
        fr.rmsprop,
        torch.optim.RMSprop,
        [
            Sync(fr.ScaleByRmsState, "nu", "square_avg"),
            Sync(fr.ScaleByRmsState, "mu", "grad_avg"),
            Sync(fr.TraceState, "trace", "momentum_buffer"),
        ],
        fr.ScaleByRmsState,
    ),
    "adagrad": Spec(
        _adagrad,
        fr.adagrad,
        torch.optim.Adagrad,
        [Sync(fr.ScaleByAdagradState, "sum_of_squares", "sum")],
        fr.ScaleByAdagradState,
    ),
    "adadelta": Spec(
        _adadelta,
        fr.adadelta,
        torch.optim.Adadelta,
        [
            Sync(fr.ScaleByAdadeltaState, "nu", "square_avg"),
            Sync(fr.ScaleByAdadeltaState, "delta_nu", "acc_delta"),
        ],
        fr.ScaleByAdadeltaState,
    ),
    "rprop": Spec(
        _rprop,
        fr.rprop,
        torch.optim.Rprop,
        [Sync(fr.ScaleByRpropState, "prev", "prev"), Sync(fr.ScaleByRpropState, "step_size", "step_size")],
        fr.ScaleByRpropState,
    ),
    "adafactor": Spec(
        _adafactor,
        fr.adafactor,
        torch.optim.Adafactor,
        [
            Sync(fr.ScaleByAdafactorState, "row_var", "row_var"),
            Sync(fr.ScaleByAdafactorState, "col_var", "col_var"),
            Sync(fr.ScaleByAdafactorState, "variance", "variance"),
        ],
        fr.ScaleByAdafactorState,
    ),
}

CASES = [(name, fe) for name, spec in SPECS.items() for fe in ([True, False] if spec.foreach else [None])]
DEVIATIONS: dict[tuple[str, torch.dtype], float] = {}  # largest param difference seen, per alias and dtype


@pytest.mark.parametrize(
    "name, foreach", CASES, ids=[f"{n}-{'foreach' if f else 'single'}" for n, f in CASES]
)
@EXAMPLES
@given(data=st.data())
def test_alias_matches_torch_optim(name, foreach, data):
    spec = SPECS[name]
    params, grads = data.draw(problems(), label="problem")
    hp = spec.hparams(data.draw)
    lr = data.draw(lrs, label="lr")
    gamma = data.draw(st.one_of(st.none(), st.floats(0.5, 1.0)), label="schedule gamma")
    rate = lr if gamma is None else (lambda count: lr * gamma**count)
    # a weight-decay schedule where torch has the decay: its group["weight_decay"] set before each step
    wd = hp.get("weight_decay", 0.0) if name != "rprop" else 0.0
    wd_gamma = data.draw(st.one_of(st.none(), st.floats(0.3, 1.0)), label="decay gamma") if wd else None
    decay = None if wd_gamma is None else decay_schedule(wd, wd_gamma)
    tx = spec.ours(rate, **(hp if decay is None else dict(hp, weight_decay=decay)))
    extra = {} if foreach is None else {"foreach": foreach}
    make = lambda ps: spec.theirs(ps, lr=lr, **hp, **extra)  # noqa: E731

    def schedulers(opt: Any) -> list[Any]:
        out: list[Any] = [] if decay is None else [GroupWeightDecaySchedule(opt, decay)]
        if gamma is not None:
            out.append(torch.optim.lr_scheduler.LambdaLR(opt, lambda e: gamma**e))
        return out

    worst = run_lockstep(tx, params, grads, make, spec.syncs, spec.steps_cls, schedulers)
    key = (name, leaves(params)[0].dtype)
    DEVIATIONS[key] = max(DEVIATIONS.get(key, 0.0), worst)


# --- Rprop's weight decay: torch's Rprop fed the gradient of loss + wd/2 ||w||^2 -------------------


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@EXAMPLES
@given(data=st.data())
def test_rprop_weight_decay_is_coupled_l2(foreach, data):
    """torch's Rprop has no weight_decay; funcreg's equals torch's Rprop given g + wd * w (maximize: the
    gradient torch negates is g - wd * w, so that it steps along -g + wd * w)."""
    params, grads = data.draw(problems(), label="problem")
    hp, lr, wd = _rprop(data.draw), data.draw(lrs), data.draw(st.floats(1e-4, 1.0))
    sign = -1.0 if hp["maximize"] else 1.0
    spec = SPECS["rprop"]
    run_lockstep(
        fr.rprop(lr, weight_decay=wd, **hp),
        params,
        grads,
        lambda ps: torch.optim.Rprop(ps, lr=lr, foreach=foreach, **hp),
        spec.syncs,
        spec.steps_cls,
        torch_grad=lambda g, p: g + sign * wd * p,
    )


# --- Muon: torch.optim.Muon on the matrices, torch.optim.AdamW on the rest ------------------------


class Split:
    """Two torch optimizers stepped together, with one ``state`` view (for ``torch_state``)."""

    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = opts

    @property
    def state(self) -> dict:
        merged: dict = {}
        for o in self.opts:
            merged.update(o.state)
        return collections.defaultdict(dict, merged)

    def step(self) -> None:
        for o in self.opts:
            o.step()


@EXAMPLES
@given(data=st.data())
def test_muon_matches_torch_muon_with_adamw_fallback(data):
    params, grads = data.draw(problems(matrices=True), label="problem")
    lr = data.draw(st.floats(1e-4, 0.1), label="lr")
    hp = dict(
        weight_decay=data.draw(st.one_of(st.just(0.1), coefficients)),
        momentum=data.draw(st.one_of(st.just(0.95), st.floats(0.0, 0.99))),
        nesterov=data.draw(st.booleans()),
        ns_steps=data.draw(st.integers(0, 6)),
        adjust_lr_fn=data.draw(st.sampled_from([None, "original", "match_rms_adamw"])),
    )
    maximize = data.draw(st.booleans())
    gamma = data.draw(st.one_of(st.none(), st.floats(0.5, 1.0)), label="schedule gamma")
    rate = lr if gamma is None else (lambda count: lr * gamma**count)
    adamw_lr, adamw_wd = 3e-3, 0.01
    adamw_rate = adamw_lr if gamma is None else (lambda count: adamw_lr * gamma**count)
    wd = hp["weight_decay"]
    wd_gamma = data.draw(st.one_of(st.none(), st.floats(0.3, 1.0)), label="decay gamma") if wd else None
    decay = None if wd_gamma is None else decay_schedule(wd, wd_gamma)
    ours = hp if decay is None else dict(hp, weight_decay=decay)
    tx = fr.muon(rate, **ours, maximize=maximize, fallback=fr.adamw(adamw_rate, weight_decay=adamw_wd))

    def make(ps):
        matrices = [p for p in ps if p.ndim == 2]
        others = [p for p in ps if p.ndim != 2]
        opts = [torch.optim.Muon(matrices, lr=lr, **hp)]
        if others:
            opts.append(torch.optim.AdamW(others, lr=adamw_lr, weight_decay=adamw_wd))
        return Split(*opts)

    def schedulers(split: Any) -> list[Any]:
        # the decay schedule drives Muon's group only (the AdamW fallback keeps its constant decay)
        out: list[Any] = [] if decay is None else [GroupWeightDecaySchedule(split.opts[0], decay)]
        if gamma is not None:
            out += [torch.optim.lr_scheduler.LambdaLR(o, lambda e: gamma**e) for o in split.opts]
        return out

    syncs = [
        Sync(fr.ScaleByMuonState, "trace", "momentum_buffer"),
        Sync(fr.ScaleByAdamState, "mu", "exp_avg"),
        Sync(fr.ScaleByAdamState, "nu", "exp_avg_sq"),
    ]
    sign = -1.0 if maximize else 1.0  # torch's Muon has no maximize: give it -g
    worst = run_lockstep(tx, params, grads, make, syncs, None, schedulers, torch_grad=lambda g, p: sign * g)
    key = ("muon", leaves(params)[0].dtype)
    DEVIATIONS[key] = max(DEVIATIONS.get(key, 0.0), worst)


def test_newton_schulz_is_torchs_bit_for_bit():
    from torch.optim._muon import _zeropower_via_newtonschulz

    from funcreg._src.transforms.orthogonalize import NS_COEFFICIENTS, newton_schulz

    g = torch.linspace(-2.0, 3.0, 12, dtype=torch.float64).reshape(4, 3).sin()
    for m in (g, g.T, g.float()):
        assert torch.equal(newton_schulz(m), _zeropower_via_newtonschulz(m, NS_COEFFICIENTS, 5, 1e-7))


def test_muon_refuses_non_matrices_without_fallback():
    tx = fr.muon(0.02)
    with pytest.raises(ValueError, match=r"'enc\.bias'.*shape \(3,\).*fallback"):
        tx.init({"enc": {"weight": torch.zeros(3, 2), "bias": torch.zeros(3)}})
    with pytest.raises(TypeError, match="fallback"):
        fr.muon(0.02, fallback="adamw")


# --- Lion against the paper's rule ----------------------------------------------------------------


class PaperLion(torch.optim.Optimizer):
    """Chen et al. (2023), Algorithm 2, written out: c = b1 m + (1 - b1) g; w <- w - lr (sign(c) + wd w);
    m <- b2 m + (1 - b2) g. Records c and the size of its terms (to step around the kink of sign at 0)."""

    def __init__(self, params, lr, betas, weight_decay, maximize):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (b1, b2), lr, wd = group["betas"], group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                m = state.setdefault("exp_avg", torch.zeros_like(p))
                c = b1 * m + (1 - b1) * g
                state["c"], state["scale"] = c, b1 * m.abs() + (1 - b1) * g.abs()
                p.copy_(p - lr * (torch.sign(c) + wd * p))
                m.copy_(b2 * m + (1 - b2) * g)


@EXAMPLES
@given(data=st.data())
def test_lion_matches_the_papers_update_rule(data):
    params, grads = data.draw(problems(), label="problem")
    lr = data.draw(st.floats(1e-4, 0.1), label="lr")
    b1 = data.draw(st.one_of(st.just(0.9), st.floats(0.0, 1.0)))
    b2 = data.draw(st.one_of(st.just(0.99), st.floats(0.0, 1.0)))
    wd, maximize = data.draw(coefficients), data.draw(st.booleans())
    wd_gamma = data.draw(st.one_of(st.none(), st.floats(0.3, 1.0)), label="decay gamma") if wd else None
    decay = None if wd_gamma is None else decay_schedule(wd, wd_gamma)
    tx = fr.lion(lr, betas=(b1, b2), weight_decay=wd if decay is None else decay, maximize=maximize)
    ps = [torch.nn.Parameter(p.detach().clone()) for p in leaves(params)]
    opt = PaperLion(ps, lr, (b1, b2), wd, maximize)
    decay_scheduler = None if decay is None else GroupWeightDecaySchedule(opt, decay)
    state, spec = tx.init(params), pytree.tree_structure(params, is_leaf=lambda x: x is None)
    for step, g in enumerate(grads, start=1):
        u, state = tx.update(g, state, params)
        new = fr.apply_updates(params, u)
        for p, gi in zip(ps, leaves(g)):
            p.grad = None if gi is None else gi.clone()
        opt.step()
        if decay_scheduler is not None:
            decay_scheduler.step()
        for i, (mine, p) in enumerate(zip(leaves(new), ps)):
            st_ = opt.state.get(p, {})
            if "c" in st_:
                # sign(c) is discontinuous at 0: compare where c is not a rounding away from it
                eps = torch.finfo(p.dtype).eps
                clear = (st_["c"].abs() > 8 * eps * st_["scale"]) | (st_["scale"] == 0)
                assert_tensors_close(mine[clear], p.detach()[clear], f"params after step {step}, leaf {i}")
            else:
                assert_tensors_close(mine, p.detach(), f"untouched leaf {i}")
        compare_state(state, opt, ps, [Sync(fr.ScaleByLionState, "mu", "exp_avg")], step)
        params = pytree.tree_unflatten([p.detach().clone() for p in ps], spec)
        state = replace_field(state, fr.ScaleByLionState, "mu", torch_state(opt, ps, "exp_avg"))


# --- construction checks, complex parameters, state layout ----------------------------------------

ALL = {
    "adamax": fr.adamax,
    "nadam": fr.nadam,
    "radam": fr.radam,
    "rmsprop": fr.rmsprop,
    "adagrad": fr.adagrad,
    "adadelta": fr.adadelta,
    "rprop": fr.rprop,
    "adafactor": fr.adafactor,
    "muon": fr.muon,
    "lion": fr.lion,
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_complex_parameters_are_refused_at_init_naming_the_key(name):
    tx = ALL[name](0.01)
    params = {"enc": {"w": torch.zeros(2, 2, dtype=torch.complex64)}}
    with pytest.raises(TypeError, match=r"'enc\.w' is complex.*view_as_real"):
        tx.init(params)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: fr.adamax(-1.0), r"learning_rate value: -1\.0"),
        (lambda: fr.adamax(betas=(0.9, 1.0)), r"betas\[1\] value: 1\.0 .*< 1\.0"),
        (lambda: fr.nadam(betas=0.9), r"betas value: 0\.9 \(expected a pair"),
        (lambda: fr.nadam(momentum_decay=-0.1), r"momentum_decay value: -0\.1"),
        (lambda: fr.radam(weight_decay=float("nan")), r"weight_decay value: nan"),
        (lambda: fr.rmsprop(alpha=1.5), r"alpha value: 1\.5 .*<= 1\.0"),
        (lambda: fr.rmsprop(centered=1), r"centered value: 1 \(expected a bool\)"),
        (lambda: fr.adagrad(lr_decay=-1.0), r"lr_decay value: -1\.0"),
        (lambda: fr.adagrad(initial_accumulator_value=-1.0), r"initial_accumulator_value value: -1\.0"),
        (lambda: fr.adadelta(rho=2.0), r"rho value: 2\.0"),
        (
            lambda: fr.rprop(etas=(1.5, 1.2)),
            r"etas value: \(1\.5, 1\.2\) \(need 0 < etas\[0\] < 1 < etas\[1\]\)",
        ),
        (lambda: fr.rprop(step_sizes=(1.0, 0.1)), r"step_sizes value"),
        (lambda: fr.adafactor(d=0.5), r"d value: 0\.5 .*>= 1\.0"),
        (lambda: fr.adafactor(beta2_decay=0.5), r"beta2_decay value: 0\.5 .*<= 0\.0"),
        (lambda: fr.adafactor(eps=1e-3), r"eps value: 0\.001 \(expected a pair"),
        (lambda: fr.muon(ns_steps=100), r"ns_steps value: 100"),
        (lambda: fr.muon(adjust_lr_fn="rms"), r"adjust_lr_fn value: 'rms'"),
        (lambda: fr.muon(momentum=-0.5), r"momentum value: -0\.5"),
        (lambda: fr.lion(betas=(0.9, 1.5)), r"betas\[1\] value: 1\.5"),
        (lambda: fr.lion(maximize="yes"), r"maximize value: 'yes'"),
    ],
)
def test_invalid_hyperparameters_are_refused_naming_the_argument(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_adafactor_state_layout_is_torchs():
    params = {"k": torch.zeros(2, 3, 4), "w": torch.zeros(3, 4), "b": torch.zeros(4), "s": torch.zeros(())}
    state = find_state(fr.adafactor(0.01).init(params), fr.ScaleByAdafactorState)
    assert state.row_var["k"].shape == (2, 3, 1) and state.col_var["k"].shape == (2, 1, 4)
    assert state.row_var["w"].shape == (3, 1) and state.col_var["w"].shape == (1, 4)
    assert state.variance["b"].shape == (4,) and state.variance["s"].shape == ()
    for name in ("k", "w"):
        assert state.variance[name].numel() == 0
    for name in ("b", "s"):
        assert state.row_var[name].numel() == 0 and state.col_var[name].numel() == 0


@pytest.mark.parametrize("nan_in", ["grad", "param"])
def test_adafactor_a_nan_entry_stays_in_its_place_as_in_torch(nan_in):
    """torch takes the update's RMS clip and the parameter's RMS scale as Python maxima
    (``max(1.0, nan)`` is 1.0): a NaN entry of a vector's gradient or weight leaves the others finite."""
    w = torch.tensor([1.0, 2.0, -3.0, 0.5])
    g = torch.tensor([0.5, -1.0, 1.0, 2.0])
    (g if nan_in == "grad" else w)[1] = float("nan")
    p = torch.nn.Parameter(w.clone())
    p.grad = g.clone()
    torch.optim.Adafactor([p], lr=0.01).step()
    tx = fr.adafactor(0.01)
    updates, _ = tx.update({"w": g}, tx.init({"w": w}), {"w": w})
    ours = fr.apply_updates({"w": w}, updates)["w"]
    assert torch.isfinite(p.detach()).sum() == 3  # the reference itself keeps three entries finite
    torch.testing.assert_close(ours, p.detach(), atol=1e-7, rtol=1e-6, equal_nan=True)


def test_nadam_mu_product_is_kept_in_torchs_scalar_dtype():
    """torch keeps mu_product in float32 (float64 params or not): funcreg must, or the step sizes
    1 / (1 - mu_product) differ from torch's by about 1e-7 relative."""
    state = find_state(fr.nadam().init({"w": torch.zeros(2, dtype=torch.float64)}), fr.ScaleByNadamState)
    opt = torch.optim.NAdam([p := torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))])
    p.grad = torch.ones(2, dtype=torch.float64)
    opt.step()
    assert state.mu_product["w"].dtype == opt.state[p]["mu_product"].dtype == torch.float32


# --- defaults -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TORCH_NAMESAKES))
def test_every_default_is_torch_optims(name):
    # built with no arguments (the learning rate only where funcreg has no default: torch's then),
    # each alias follows its torch.optim namesake built with no arguments, so every default
    # (momentum, betas, eps, weight decay, maximize, centered, ...) is torch's
    cls = getattr(torch.optim, TORCH_NAMESAKES[name])
    needs_lr = (
        inspect.signature(getattr(fr, name)).parameters["learning_rate"].default is inspect.Parameter.empty
    )
    g = torch.Generator().manual_seed(7)
    shapes = {"w": (3, 4)} if name == "muon" else {"w": (3, 4), "b": (4,)}
    params = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    grads = [
        {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()} for _ in range(6)
    ]
    lr = inspect.signature(cls).parameters["lr"].default
    tx = getattr(fr, name)(lr) if needs_lr else getattr(fr, name)()
    state, mine = tx.init(params), params
    theirs = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = cls(list(theirs.values()))
    for grad in grads:
        updates, state = tx.update(grad, state, mine)
        mine = fr.apply_updates(mine, updates)
        for k, p in theirs.items():
            p.grad = grad[k].clone()
        opt.step()
        for k in shapes:
            assert_tensors_close(mine[k], theirs[k].detach(), f"{name} {k!r}")  # float64: 1e-12
