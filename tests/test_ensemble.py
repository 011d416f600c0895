"""Tests of funcreg's ensembles: stack/unstack/num_members, init_members, ensemble_step, and History.

The central property: a vmapped run of S members equals S separate runs of the same step, leaf by
leaf (parameters, transform states, buffers, metrics), to 1e-12 in float64 and 1e-5 in float32.
The separate runs use plain, non-factory transforms and penalties with Python-float coefficients, so
the per-member ``hparams`` plumbing of a sweep is checked against ordinary code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from helpers import assert_step_close as assert_close
from helpers import check_compiled_matches_eager, leaves
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import funcreg as fr

DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
# No shrinking: a failure here is a numeric difference, reported with the drawn data as it is;
# shrinking it costs ~20 s of test time for no better diagnosis.
FEW = settings(
    deadline=None,
    max_examples=3,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
SEEDS = [0, 1, 2]
STEPS = 3
LR = 1e-2


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def members(make_model: Callable[[], torch.nn.Module], dtype: torch.dtype, seeds=SEEDS):
    params, buffers, model = fr.init_members(lambda: make_model().to(dtype), seeds)
    return params, buffers, model


def mse_loss_of(model: torch.nn.Module):
    def loss(params, x, y):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)

    return loss


def assert_member_of(stacked: Any, member: Any, i: int, what: str) -> None:
    """``stacked``'s member ``i`` equals ``member``: same tree (torch's own pytree, None kept) and values."""
    s_leaves, s_spec = pytree.tree_flatten_with_path(stacked, is_leaf=lambda x: x is None)
    m_leaves, m_spec = pytree.tree_flatten(member, is_leaf=lambda x: x is None)
    assert s_spec == m_spec, f"{what}: structure differs\n{s_spec}\n{m_spec}"
    for (path, s), m in zip(s_leaves, m_leaves):
        where = f"{what}{pytree.keystr(path)} (member {i})"
        assert (s is None) == (m is None), where
        if s is not None:
            assert_close(s[i], m, where)


@st.composite
def regression_batches(draw, dtype, steps=STEPS, n=4, members=None):
    """``steps`` batches ``(x, y)`` of shapes (n, 3), (n, 2), or (members, n, ...) for per-member data."""
    lead = () if members is None else (members,)
    elements = st.floats(-2.0, 2.0, allow_nan=False, allow_subnormal=False, width=64)
    out = []
    for _ in range(steps):
        x = draw(arrays(np.float64, lead + (n, 3), elements=elements))
        y = draw(arrays(np.float64, lead + (n, 2), elements=elements))
        out.append((torch.from_numpy(x).to(dtype), torch.from_numpy(y).to(dtype)))
    return out


def fixed_batches(dtype, steps=STEPS, n=6, members=None, seed=0, out=2):
    g = torch.Generator().manual_seed(seed)
    lead = () if members is None else (members,)
    return [
        (
            torch.randn(lead + (n, 3), generator=g, dtype=dtype),
            torch.randn(lead + (n, out), generator=g, dtype=dtype),
        )
        for _ in range(steps)
    ]


def run_ensemble(ens: fr.EnsembleStep, params, batches, buffers=None, hparams=None):
    state = ens.init(params, buffers, hparams)
    history = []
    for batch in batches:
        state, metrics = ens(state, *batch)
        history.append(metrics)
    return state, history


def run_separately(make_step_i: Callable[[int], fr.Step], params, batches, buffers=None, per_member=False):
    """Member ``i`` alone with ``make_step_i(i)``; returns a list of ``(state, metrics per step)``."""
    out = []
    for i, p in enumerate(fr.unstack(params)):
        step = make_step_i(i)
        state = step.init(p, fr.unstack(buffers)[i] if buffers else None)
        history = []
        for batch in batches:
            state, metrics = step(state, *[b[i] for b in batch] if per_member else batch)
            history.append(metrics)
        out.append((state, history))
    return out


def assert_ensemble_equals_separate(ens_state, ens_history, separate, check_hparams=True) -> None:
    for i, (state, history) in enumerate(separate):
        assert_member_of(ens_state.params, state.params, i, "params")
        assert_member_of(ens_state.opt_state, state.opt_state, i, "opt_state")
        assert_member_of(ens_state.buffers, state.buffers, i, "buffers")
        if check_hparams:
            assert_member_of(ens_state.hparams, state.hparams, i, "hparams")
        for t, (ens_m, m) in enumerate(zip(ens_history, history)):
            assert sorted(ens_m) == sorted(m)
            assert_member_of(ens_m, m, i, f"step {t} metrics")


# --- vmapped run == separate runs -------------------------------------------------------------------


SCHEDULE = fr.warmup_cosine_decay_schedule(LR, warmup_steps=1, decay_steps=4)
L1_ON_BIASES = lambda model, c: fr.l1(c, mask=~fr.decay_mask(model))  # noqa: E731

CONFIGS: dict[str, Callable[[torch.nn.Module], dict[str, Any]]] = {
    "sgd_momentum": lambda model: dict(tx=fr.sgd(LR, momentum=0.9, nesterov=True)),
    "adamw": lambda model: dict(tx=fr.adamw(LR, weight_decay=0.1)),
    "adamw_decay_mask": lambda model: dict(tx=fr.adamw(LR, weight_decay=0.1, mask=fr.decay_mask(model))),
    "adamw_schedule_decoupled_l1": lambda model: dict(
        tx=fr.adamw(SCHEDULE, weight_decay=0.1),
        penalty=L1_ON_BIASES(model, 0.01),
        form="decoupled",
        learning_rate=SCHEDULE,
    ),
    "sgd_masked_l2": lambda model: dict(
        tx=fr.chain(fr.add_decayed_weights(0.1, mask=fr.decay_mask(model)), fr.sgd(LR))
    ),
    **{
        f"penalty_{form}": (
            lambda model, form=form: dict(
                tx=fr.adam(LR),
                penalty=fr.l2(0.1, mask=fr.decay_mask(model)) + L1_ON_BIASES(model, 0.01),
                form=form,
                learning_rate=LR,
            )
        )
        for form in ("loss", "coupled", "decoupled", "proximal")
    },
}


@DTYPES
@pytest.mark.parametrize("config", sorted(CONFIGS))
@FEW
@given(data=st.data())
def test_vmapped_run_equals_separate_runs(config, dtype, data):
    params, _, model = members(mlp, dtype)
    batches = data.draw(regression_batches(dtype), label="batches")
    step = fr.make_step(mse_loss_of(model), **CONFIGS[config](model))
    ens_state, ens_history = run_ensemble(fr.ensemble_step(step), params, batches)
    separate = run_separately(lambda i: step, params, batches)
    assert_ensemble_equals_separate(ens_state, ens_history, separate)


@DTYPES
@pytest.mark.parametrize("form", ["loss", "coupled", "decoupled", "proximal"])
def test_per_member_coefficients_equal_separate_runs_with_those_coefficients(form, dtype):
    """A sweep: tx and penalty are factories of hparams, one value per member (and one shared float)."""
    params, _, model = members(mlp, dtype, seeds=[3, 4, 5, 6])
    wd = [0.0, 0.05, 0.1, 0.3]
    l1 = [0.0, 0.01, 0.03, 0.1]
    batches = fixed_batches(dtype)

    step = fr.make_step(
        mse_loss_of(model),
        lambda h: fr.adamw(h["lr"], weight_decay=h["wd"]),
        penalty=lambda h: fr.l1(h["l1"]),
        form=form,
        learning_rate=LR,
    )
    # lr: a Python float shared by all members; it takes the parameters' dtype
    hparams = {"wd": torch.tensor(wd, dtype=dtype), "l1": torch.tensor(l1, dtype=dtype), "lr": LR}
    ens_state, ens_history = run_ensemble(fr.ensemble_step(step), params, batches, hparams=hparams)
    assert torch.equal(ens_state.hparams["lr"], torch.full((4,), LR, dtype=dtype))

    def plain(i):
        return fr.make_step(
            mse_loss_of(model),
            fr.adamw(LR, weight_decay=wd[i]),
            penalty=fr.l1(l1[i]),
            form=form,
            learning_rate=LR,
        )

    separate = run_separately(plain, params, batches)
    assert_ensemble_equals_separate(ens_state, ens_history, separate, check_hparams=False)
    # the coefficients did something: members 0 (no decay, no L1) and 3 moved differently
    assert ens_history[-1]["penalty"][0] == 0 and ens_history[-1]["penalty"][3] > 0


@pytest.mark.parametrize("ensemble", [False, True], ids=["step", "ensemble"])
def test_python_float_hparams_keep_float64_precision(ensemble):
    # Regression: a Python-float hparam was stored as torch.as_tensor(v), float32 whatever the
    # parameters' dtype, so a float64 run stepped with lr = float32(0.3), not 0.3 (relative error 1e-8).
    params, _, model = members(mlp, torch.float64, seeds=[0])
    ((x, y),) = fixed_batches(torch.float64, steps=1)
    swept = fr.make_step(mse_loss_of(model), lambda h: fr.sgd(h["lr"]))
    plain = fr.make_step(mse_loss_of(model), fr.sgd(0.3))
    expected, _ = plain(plain.init(fr.unstack(params)[0]), x, y)
    if ensemble:
        ens = fr.ensemble_step(swept)
        state, _ = ens(ens.init(params, hparams={"lr": 0.3}), x, y)
        state = state._replace(params=fr.unstack(state.params)[0])
    else:
        state, _ = swept(swept.init(fr.unstack(params)[0], hparams={"lr": 0.3}), x, y)
    for k in expected.params:
        assert_close(state.params[k], expected.params[k], f"params[{k!r}]")


def test_vmapped_float64_momentum_equals_eager_momentum():
    # Regression, the smallest reproduction: under vmap (and torch.compile) trace built its factors with
    # torch.where(first, 0.0, momentum), a float32 tensor, so float64 buffers got 0.9 rounded to
    # float32 and a vmapped float64 SGD-momentum run drifted ~1e-10 from the eager one in 2 steps.
    params = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    grads = [
        {"w": torch.tensor([0.3, 0.7], dtype=torch.float64)},
        {"w": torch.tensor([-0.1, 0.2], dtype=torch.float64)},
    ]
    tx = fr.trace(0.9)
    eager, vmapped = tx.init(params), fr.stack([tx.init(params)])
    update = torch.func.vmap(lambda g, state: tx.update(g, state))
    for g in grads:
        eager_u, eager = tx.update(g, eager)
        vmapped_u, vmapped = update(fr.stack([g]), vmapped)
    assert_close(vmapped_u["w"][0], eager_u["w"], "second momentum update")  # 0.9 * 0.3 - 0.1 = 0.17


def bn_mlp() -> torch.nn.Module:
    # bias=False before BatchNorm: BatchNorm subtracts the batch mean, so a bias there has a gradient
    # that is exactly zero in exact arithmetic and rounding noise (~1e-17) in floating point. The
    # batched (vmapped) and unbatched matmuls round differently, and any optimizer that normalises the
    # gradient (Adam: g / sqrt(v)) would blow that noise up to O(lr), making the two runs differ for
    # no fault of funcreg's. SGD with momentum does not amplify it; dropping the bias avoids it, so
    # AdamW is tested on this model too.
    return torch.nn.Sequential(
        torch.nn.Linear(3, 5, bias=False), torch.nn.BatchNorm1d(5), torch.nn.Tanh(), torch.nn.Linear(5, 2)
    )


BN_TX = {"sgd_momentum": lambda: fr.sgd(LR, momentum=0.9), "adamw": lambda: fr.adamw(LR, weight_decay=0.0)}


@DTYPES
@pytest.mark.parametrize("tx_name", sorted(BN_TX))
@pytest.mark.parametrize("batch", ["shared", "per_member"])
def test_batchnorm_members_carry_their_own_running_statistics(tx_name, dtype, batch):
    params, buffers, model = members(bn_mlp, dtype)
    assert set(buffers) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    apply = fr.functional_model(model)

    def loss(params, buffers, x, y):
        out, new_buffers = apply(params, buffers, x)
        return torch.nn.functional.mse_loss(out, y), new_buffers

    step = fr.make_step(
        loss,
        BN_TX[tx_name](),
        penalty=fr.l2(0.1, mask=fr.decay_mask(model)),
        form="decoupled",
        learning_rate=LR,
        buffers=True,
    )
    batches = fixed_batches(dtype, members=len(SEEDS) if batch == "per_member" else None)
    ens_state, ens_history = run_ensemble(
        fr.ensemble_step(step, batch=batch), params, batches, buffers=buffers
    )
    separate = run_separately(
        lambda i: step, params, batches, buffers=buffers, per_member=batch == "per_member"
    )
    assert_ensemble_equals_separate(ens_state, ens_history, separate)
    assert ens_state.buffers["1.num_batches_tracked"].tolist() == [STEPS] * len(SEEDS)
    assert not torch.equal(ens_state.buffers["1.running_mean"][0], ens_state.buffers["1.running_mean"][1])
    # the stacked buffers handed to init were not written into
    assert torch.equal(buffers["1.num_batches_tracked"], torch.zeros(len(SEEDS), dtype=torch.int64))
    assert torch.equal(buffers["1.running_mean"], torch.zeros(len(SEEDS), 5, dtype=dtype))


# --- shared and per-member batches ------------------------------------------------------------------


@DTYPES
@FEW
@given(data=st.data())
def test_per_member_batches_equal_separate_runs_on_each_members_data(dtype, data):
    params, _, model = members(mlp, dtype)
    batches = data.draw(regression_batches(dtype, members=len(SEEDS)), label="batches")
    step = fr.make_step(
        mse_loss_of(model), fr.adamw(LR), penalty=fr.l1(0.01), form="proximal", learning_rate=LR
    )
    ens_state, ens_history = run_ensemble(fr.ensemble_step(step, batch="per_member"), params, batches)
    separate = run_separately(lambda i: step, params, batches, per_member=True)
    assert_ensemble_equals_separate(ens_state, ens_history, separate)


def test_has_aux_gives_one_aux_per_member():
    params, _, model = members(mlp, torch.float64)

    def loss(params, x, y):
        out = torch.func.functional_call(model, params, (x,))
        return torch.nn.functional.mse_loss(out, y), out.mean(0)

    step = fr.make_step(loss, fr.adamw(LR), has_aux=True)
    batches = fixed_batches(torch.float64, steps=2)
    ens_state, ens_history = run_ensemble(fr.ensemble_step(step), params, batches)
    assert ens_history[-1]["aux"].shape == (len(SEEDS), 2)
    assert_ensemble_equals_separate(ens_state, ens_history, run_separately(lambda i: step, params, batches))


def test_shared_batch_equals_the_same_batch_given_to_every_member():
    params, _, model = members(mlp, torch.float64)
    batches = fixed_batches(torch.float64)
    repeated = [tuple(b.expand(len(SEEDS), *b.shape).clone() for b in batch) for batch in batches]
    step = fr.make_step(mse_loss_of(model), fr.sgd(LR, momentum=0.9))
    shared, shared_history = run_ensemble(fr.ensemble_step(step), params, batches)
    own, own_history = run_ensemble(fr.ensemble_step(step, batch="per_member"), params, repeated)
    for a, b in zip(leaves((shared, shared_history)), leaves((own, own_history))):
        assert (a is None and b is None) or torch.equal(a, b)


def dropout_mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 2))


@pytest.mark.parametrize("batch", ["shared", "per_member"])
def test_members_get_different_dropout_masks(batch):
    torch.manual_seed(0)
    model = dropout_mlp().double()
    one = fr.params_of(model)
    params = fr.stack([one, one])  # two identical members
    step = fr.make_step(mse_loss_of(model), fr.sgd(0.1))
    ((x, y),) = fixed_batches(torch.float64, steps=1, n=8)
    if batch == "per_member":
        x, y = torch.stack([x, x]), torch.stack([y, y])  # identical data as well
    state, metrics = fr.ensemble_step(step, batch=batch)(fr.ensemble_step(step).init(params), x, y)
    assert metrics["data_loss"][0] != metrics["data_loss"][1]
    assert not torch.equal(state.params["0.weight"][0], state.params["0.weight"][1])
    assert torch.isfinite(metrics["data_loss"]).all()


# --- stack, unstack, num_members, init_members ------------------------------------------------------


def test_stack_unstack_round_trip_and_num_members():
    trees = [
        {"enc": {"w": torch.full((2, 3), float(i))}, "b": torch.tensor([float(i)]), "none": None}
        for i in range(4)
    ]
    stacked = fr.stack(trees)
    assert stacked["enc"]["w"].shape == (4, 2, 3) and stacked["none"] is None
    assert fr.num_members(stacked) == 4
    for original, back in zip(trees, fr.unstack(stacked)):
        assert torch.equal(original["enc"]["w"], back["enc"]["w"]) and torch.equal(original["b"], back["b"])
        assert back["none"] is None


def test_init_members_differ_and_restore_the_global_random_state():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    params, buffers, model = fr.init_members(mlp, seeds=[7, 8, 9])
    assert torch.equal(torch.get_rng_state(), before), "init_members changed torch's global random state"
    assert buffers == {}
    assert isinstance(model, torch.nn.Module)
    for i, seed in enumerate([7, 8, 9]):
        torch.manual_seed(seed)
        expected = fr.params_of(mlp())
        for k in expected:
            assert torch.equal(params[k][i], expected[k]), (seed, k)
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.equal(params["0.weight"][a], params["0.weight"][b])
    # and the result does not depend on the global state beforehand
    torch.manual_seed(999)
    again, _, _ = fr.init_members(mlp, seeds=[7, 8, 9])
    assert all(torch.equal(again[k], params[k]) for k in params)


# --- errors -----------------------------------------------------------------------------------------


def test_stack_names_the_offending_key():
    w = torch.zeros(2)
    with pytest.raises(ValueError, match="'b'"):
        fr.stack([{"w": w, "b": torch.zeros(1)}, {"w": w, "c": torch.zeros(1)}])
    with pytest.raises(ValueError, match="'b'"):
        fr.stack([{"w": w, "b": torch.zeros(1)}, {"w": w}])
    with pytest.raises(ValueError, match=r"'enc\.w' has shape \(3,\)"):
        fr.stack([{"enc": {"w": w}}, {"enc": {"w": torch.zeros(3)}}])
    with pytest.raises(ValueError, match="'w'.*float64"):
        fr.stack([{"w": w}, {"w": w.double()}])
    with pytest.raises(ValueError, match="'b' is None"):
        fr.stack([{"w": w, "b": None}, {"w": w, "b": torch.zeros(1)}])
    with pytest.raises(ValueError, match="at least one"):
        fr.stack([])
    with pytest.raises(ValueError, match="'b' has 2 members"):
        fr.num_members({"w": torch.zeros(3, 2), "b": torch.zeros(2)})


def linear_step() -> fr.Step:
    return fr.make_step(lambda p, x: (p["w"] * x).sum(), lambda h: fr.sgd(0.1, weight_decay=h["wd"]))


def test_hparams_with_the_wrong_number_of_members_name_the_hparam():
    ens = fr.ensemble_step(linear_step())
    with pytest.raises(ValueError, match=r"hparams\['wd'\].*\(2,\).*3"):
        ens.init({"w": torch.zeros(3, 2)}, hparams={"wd": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"hparams\['wd'\]"):
        ens.init({"w": torch.zeros(3, 2)}, hparams={"wd": torch.zeros(3, 1)})


def test_per_member_batch_of_the_wrong_size_names_the_batch_argument():
    ens = fr.ensemble_step(linear_step(), batch="per_member")
    state = ens.init({"w": torch.zeros(3, 2)}, hparams={"wd": 0.1})
    ens(state, torch.zeros(3, 2))  # the right size works
    with pytest.raises(ValueError, match="batch argument 0 has 2 members"):
        ens(state, torch.zeros(2, 2))
    two = fr.ensemble_step(
        fr.make_step(lambda p, x, y: (p["w"] * x * y).sum(), fr.sgd(0.1)), batch="per_member"
    )
    with pytest.raises(ValueError, match="batch argument 1 has 4 members"):
        two(two.init({"w": torch.zeros(3, 2)}), torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="buffers has 2 members"):
        fr.ensemble_step(linear_step()).init(
            {"w": torch.zeros(3, 2)}, {"b": torch.zeros(2)}, hparams={"wd": 0.1}
        )


def test_init_members_and_ensemble_step_reject_bad_arguments():
    with pytest.raises(ValueError, match="seeds repeat"):
        fr.init_members(mlp, seeds=[1, 2, 1])
    with pytest.raises(ValueError, match="at least one seed"):
        fr.init_members(mlp, seeds=[])
    with pytest.raises(TypeError, match="seed"):
        fr.init_members(mlp, seeds=[1, 2.0])
    with pytest.raises(TypeError, match="nn.Module"):
        fr.init_members(lambda: "not a module", seeds=[1])
    with pytest.raises(ValueError, match="batch"):
        fr.ensemble_step(linear_step(), batch="each")
    with pytest.raises(TypeError, match="Step"):
        fr.ensemble_step(lambda state, x: (state, {}))


def test_ensemble_init_state_holds_no_expanded_tensors():
    # Regression: state entries that do not depend on the member (the step counts) came out of vmap
    # expanded (stride 0, one element shared by all members): in-place writes into them raised, and
    # torch.compile of the ensemble step recompiled at the second step (guard: stride 0 != 1).
    params, _, model = members(mlp, torch.float64)
    step = fr.make_step(
        mse_loss_of(model), fr.adamw(LR), penalty=fr.l1(0.01), form="decoupled", learning_rate=LR
    )
    state = fr.ensemble_step(step).init(params)
    paths, _ = pytree.tree_flatten_with_path(state)
    expanded = [
        pytree.keystr(p) for p, x in paths if isinstance(x, torch.Tensor) and x.ndim and 0 in x.stride()
    ]
    assert expanded == [], f"stride-0 (expanded) tensors in the initial state: {expanded}"
    state.opt_state["optimizer"].count.add_(1)  # each member owns its count


# --- torch.compile ----------------------------------------------------------------------------------


# Not skipped or marked slow: the CI's plain `pytest` runs it (~15 s, most of it inductor's C++ build).
def test_compiled_ensemble_step_equals_eager_and_compiles_once():
    torch._dynamo.reset()
    params, _, model = members(mlp, torch.float64)
    step = fr.make_step(
        mse_loss_of(model),
        lambda h: fr.adamw(LR, weight_decay=h["wd"]),
        penalty=lambda h: fr.l1(h["l1"]),
        form="decoupled",
        learning_rate=LR,
    )
    ens = fr.ensemble_step(step)
    hparams = {
        "wd": torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64),
        "l1": torch.tensor([0.0, 0.01, 0.02], dtype=torch.float64),
    }
    eager_state = ens.init(params, hparams=hparams)
    compiled_state = ens.init(params, hparams=hparams)  # straight from init: no recompilation at step 2
    check_compiled_matches_eager(ens, eager_state, compiled_state, fixed_batches(torch.float64, steps=4))


# --- History ----------------------------------------------------------------------------------------


def test_history_of_an_ensemble():
    params, _, model = members(mlp, torch.float64)
    step = fr.make_step(
        mse_loss_of(model), fr.sgd(LR), penalty=fr.l1(0.01), form="proximal", learning_rate=LR
    )
    ens = fr.ensemble_step(step)
    state = ens.init(params)
    history, seen = fr.History(), []
    for x, y in fixed_batches(torch.float64, steps=4):
        state, metrics = ens(state, x, y)
        history.append(metrics)
        seen.append(metrics)
    assert history["data_loss"].shape == (4, 3)
    assert torch.equal(history["penalty/l1"], torch.stack([m["penalty/l1"] for m in seen]))

    pytest.importorskip("pandas")
    df = history.to_dataframe()
    assert list(df.columns) == ["step", "member", "data_loss", "penalty", "penalty/l1", "total"]
    assert len(df) == 4 * 3
    assert df["step"].tolist() == [s for s in range(4) for _ in range(3)]
    assert df["member"].tolist() == [0, 1, 2] * 4
    for row in df.itertuples(index=False):
        assert row.data_loss == seen[row.step]["data_loss"][row.member].item()
        assert row.total == seen[row.step]["total"][row.member].item()
    wide = df.pivot(index="step", columns="member", values="data_loss")
    np.testing.assert_array_equal(wide.to_numpy(), history["data_loss"].numpy())


def test_fr_vmap_maps_states_with_none_leaves_like_separate_calls():
    """fr.vmap over init/update of a masked AdamW (None state for masked leaves, nu_max None) equals
    three separate calls bit for bit on the selected leaves, and keeps the None leaves."""
    g = torch.Generator().manual_seed(3)
    members = [
        {
            "w": torch.randn(2, 3, generator=g, dtype=torch.float64),
            "b": torch.randn(3, generator=g, dtype=torch.float64),
        }
        for _ in range(3)
    ]
    grads = [{"w": torch.randn(2, 3, generator=g, dtype=torch.float64), "b": None} for _ in range(3)]
    tx = fr.masked(fr.adamw(0.1, weight_decay=0.5), {"w": True, "b": False})
    with pytest.raises(ValueError):  # what fr.vmap exists for
        torch.func.vmap(tx.init)(fr.stack(members))
    state = fr.vmap(tx.init)(fr.stack(members))
    assert state.inner_state.mu["b"] is None and state.inner_state.nu_max is None
    stacked_grads = {"w": torch.stack([x["w"] for x in grads]), "b": None}
    updates, state = fr.vmap(tx.update)(stacked_grads, state, fr.stack(members))
    for i, (p, gr) in enumerate(zip(members, grads)):
        u, s = tx.update(gr, tx.init(p), p)
        torch.testing.assert_close(updates["w"][i], u["w"], atol=1e-12, rtol=0)
        torch.testing.assert_close(state.inner_state.mu["w"][i], s.inner_state.mu["w"], atol=1e-12, rtol=0)
        assert updates["b"] is None and u["b"] is None
    with pytest.raises(ValueError, match="in_dims"):
        fr.vmap(tx.init, in_dims=1)(fr.stack(members))


def test_learning_rate_sweep_scales_each_members_proximal_step():
    """make_step(learning_rate="lr"): the proximal step size is each member's hparams["lr"]; the vmapped
    sweep equals separate runs with that learning rate as a float (float64, 1e-12)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, generator=g, dtype=torch.float64)
    p0 = {"w": torch.randn(3, generator=g, dtype=torch.float64)}

    def loss(p, x, y):
        return ((x @ p["w"] - y) ** 2).mean()

    lrs = torch.tensor([0.01, 0.1, 0.3], dtype=torch.float64)
    step = fr.make_step(
        loss, lambda h: fr.sgd(h["lr"]), penalty=fr.l1(0.2), form="proximal", learning_rate="lr"
    )
    ens = fr.ensemble_step(step)
    state = ens.init(fr.stack([p0] * 3), hparams={"lr": lrs})
    for _ in range(4):
        state, _ = ens(state, x, y)
    for i, lr in enumerate(lrs.tolist()):
        single = fr.make_step(loss, fr.sgd(lr), penalty=fr.l1(0.2), form="proximal", learning_rate=lr)
        s = single.init(p0)
        for _ in range(4):
            s, _ = single(s, x, y)
        torch.testing.assert_close(state.params["w"][i], s.params["w"], atol=1e-12, rtol=0)
    named = fr.make_step(loss, fr.sgd(0.1), penalty=fr.l1(0.2), form="proximal", learning_rate="lr")
    with pytest.raises(ValueError, match="hparams\\['lr'\\]"):
        named.init(p0)  # no hparams["lr"] given


@pytest.mark.parametrize(
    "make",
    [
        lambda: fr.adamax(0.05),
        lambda: fr.nadam(0.05),
        lambda: fr.radam(0.05),
        lambda: fr.adagrad(0.05, lr_decay=0.1),
        lambda: fr.adafactor(0.05),
        lambda: fr.proximal_adam(0.05, l1=0.01),
        lambda: fr.adam(fr.linear_schedule(0.05, 0.01, 4)),
    ],
    ids=["adamax", "nadam", "radam", "adagrad_lr_decay", "adafactor", "proximal_adam", "adam_schedule"],
)
def test_vmapped_float64_steps_equal_each_member_eager(make):
    """Under vmap the step counts are tensors: the factors computed from them (bias corrections, RAdam's
    rectification, Adafactor's decay) keep float64 precision and branch without a host sync, so every
    member equals its own eager trajectory to float64 rounding."""
    tx = make()
    members = [
        {
            "w": torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3) * (m + 1),
            "b": torch.full((3,), 0.5 * m, dtype=torch.float64),
        }
        for m in range(3)
    ]
    grads = [
        [
            {k: torch.cos(v * (t + 2)) for k, v in p.items()} for t in range(7)
        ]  # 7 steps: RAdam rectifies from t = 6
        for p in members
    ]
    P = fr.stack(members)
    S = fr.vmap(tx.init)(P)
    for t in range(7):
        G = fr.stack([grads[m][t] for m in range(3)])
        U, S = fr.vmap(tx.update)(G, S, P)
        P = fr.vmap(fr.apply_updates)(P, U)
    for m, p0 in enumerate(members):
        p, s = p0, tx.init(p0)
        for t in range(7):
            u, s = tx.update(grads[m][t], s, p)
            p = fr.apply_updates(p, u)
        for k in p0:
            torch.testing.assert_close(P[k][m], p[k], atol=1e-13, rtol=1e-12)
