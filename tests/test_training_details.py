"""Details of the training helpers: History, hparams, fr.metrics and the ensemble's member checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import funcreg as fr
from funcreg._src.training.hparams import float_dtype

_floats = st.floats(-1e3, 1e3, allow_nan=False, width=64)


def _ensemble_rows(min_members: int = 1, max_members: int = 5):
    """(members, steps, data_loss, penalty): per-step per-member values as float64 arrays."""
    return st.tuples(st.integers(min_members, max_members), st.integers(1, 4)).flatmap(
        lambda ns: st.tuples(
            st.just(ns[0]),
            st.just(ns[1]),
            hnp.arrays(np.float64, (ns[1], ns[0]), elements=_floats),
            hnp.arrays(np.float64, (ns[1], ns[0]), elements=_floats),
        )
    )


# --- History ---------------------------------------------------------------------------------------


def test_history_skips_booleans_and_non_numbers():
    h = fr.History()
    h.append({"data_loss": torch.tensor(1.5), "flag": True, "name": "run-1", "obj": object(), "n": 3})
    assert sorted(h.keys()) == ["data_loss", "n"]
    torch.testing.assert_close(h["n"], torch.tensor([3.0], dtype=torch.float64))
    torch.testing.assert_close(h["data_loss"], torch.tensor([1.5]))


@settings(deadline=None, max_examples=30)
@given(hnp.arrays(np.float64, st.integers(1, 5), elements=_floats))
def test_history_without_data_loss_keeps_per_member_metrics(values):
    # no "data_loss": the first scalar-or-1-D metric decides the shape, here a per-member one
    h = fr.History()
    h.append({"penalty": torch.from_numpy(values.copy()), "matrix": torch.zeros(2, 2)})
    assert h.keys() == ["penalty"]
    np.testing.assert_allclose(h["penalty"].numpy(), values[None, :], rtol=0, atol=0)


@settings(deadline=None, max_examples=30)
@example((2, 1, np.array([[1.0, 2.0]]), np.array([[3.0, 4.0]])))
@given(_ensemble_rows())
def test_history_dataframe_long_format_has_each_members_value(rows):
    pd = pytest.importorskip("pandas")
    members, steps, data_loss, penalty = rows
    h = fr.History()
    for t in range(steps):
        h.append(
            {
                "data_loss": torch.from_numpy(data_loss[t].copy()),
                "penalty": torch.from_numpy(penalty[t].copy()),
            }
        )
    df = h.to_dataframe()
    expected = pd.DataFrame(
        {
            "step": np.repeat(np.arange(steps), members),
            "member": np.tile(np.arange(members), steps),
            "data_loss": data_loss.reshape(-1),
            "penalty": penalty.reshape(-1),
        }
    )
    assert list(df.columns) == ["step", "member", "data_loss", "penalty"]
    np.testing.assert_array_equal(df["step"].to_numpy(), expected["step"].to_numpy())
    np.testing.assert_array_equal(df["member"].to_numpy(), expected["member"].to_numpy())
    np.testing.assert_allclose(df["data_loss"].to_numpy(), expected["data_loss"].to_numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(df["penalty"].to_numpy(), expected["penalty"].to_numpy(), rtol=0, atol=0)


# --- hparams ---------------------------------------------------------------------------------------


def _step():
    return fr.make_step(lambda p, x: ((p["w"] * x).sum() - 1.0) ** 2, fr.sgd(0.1))


@pytest.mark.parametrize("value", [True, False, "0.1", None, [0.1]])
def test_hparams_refuse_booleans_and_non_numbers(value):
    with pytest.raises(TypeError, match=r"hparams\['wd'\] must be a number or a tensor"):
        _step().init({"w": torch.ones(2)}, hparams={"wd": value})


def test_float_dtype_is_that_of_the_first_floating_leaf():
    params = {"mask": None, "count": torch.tensor([1, 2]), "w": torch.ones(2, dtype=torch.float64)}
    assert float_dtype(params) == torch.float64
    assert float_dtype({"count": torch.tensor(3)}) == torch.get_default_dtype()


def test_float_hparams_take_the_dtype_of_the_floating_params_not_of_integer_buffers():
    params = {"count": torch.tensor([1, 2]), "w": torch.ones(2, dtype=torch.float64)}
    state = _step().init(params, hparams={"wd": 0.01})
    assert state.hparams["wd"].dtype == torch.float64
    assert state.hparams["wd"].item() == 0.01


# --- fr.metrics ------------------------------------------------------------------------------------


def test_metrics_of_a_dict_with_tuple_entries_reads_it_as_metrics():
    m = fr.metrics({"data_loss": torch.tensor(2.0), "shape": (3, 4), "lr": 0.5})
    assert m == {"data_loss": 2.0, "lr": 0.5}


def test_metrics_total_penalty_comes_before_its_terms_in_first_seen_order():
    w = torch.tensor([1.0, -2.0, 3.0])
    tx = fr.chain(fr.add_penalty_grad(fr.l1(0.1)), fr.add_penalty_grad(fr.l2(0.2)), fr.sgd(0.1))
    m = fr.metrics(tx.init({"w": w}))
    l1 = 0.1 * float(w.abs().sum())
    l2 = 0.5 * 0.2 * float((w**2).sum())
    # the keys in the order they first appear: the total, then each term as its state is met
    assert list(m) == ["penalty", "penalty/l1", "penalty/l2"]
    assert m["penalty/l1"] == pytest.approx(l1, rel=1e-6)
    assert m["penalty/l2"] == pytest.approx(l2, rel=1e-6)
    assert m["penalty"] == pytest.approx(l1 + l2, rel=1e-6)


# --- ensemble member checks ------------------------------------------------------------------------


def test_ensemble_checks_member_hparams_once_until_they_change():
    eager_calls = []

    def tx(h):
        wd = h["wd"]
        if not torch._C._functorch.is_functorch_wrapped_tensor(wd) and wd.ndim == 0:
            eager_calls.append(float(wd))
        return fr.sgd(0.1, weight_decay=h["wd"])

    loss = lambda p, x: ((p["w"] * x).sum() - 1.0) ** 2  # noqa: E731
    ens = fr.ensemble_step(fr.make_step(loss, tx))
    wd = torch.tensor([0.0, 0.1, 0.2])
    state = ens.init({"w": torch.ones(3, 2)}, hparams={"wd": wd})
    after_init = list(eager_calls)
    assert after_init[-3:] == pytest.approx([0.0, 0.1, 0.2])
    x = torch.tensor([0.5, 0.5])
    for _ in range(3):
        state, _ = ens(state, x)
    assert eager_calls == after_init  # unchanged hparams: not re-checked
    state.hparams["wd"].add_(0.1)  # changed in place: checked again, member by member
    state, _ = ens(state, x)
    assert eager_calls[len(after_init) :] == pytest.approx([0.1, 0.2, 0.3])
