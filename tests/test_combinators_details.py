"""Behaviour details of the combinators and the transforms/state-dict helpers that no other test pins."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import funcreg as fr
from funcreg._src.torch_optimizer.state_dict import checked_groups
from funcreg._src.transforms.block_utils import with_config
from funcreg._src.transforms.complex_params import as_real

# --- inject_hyperparams: a 0-d tensor is a value, any other shape is refused -----------------------


@settings(deadline=None, max_examples=25)
@given(
    lr=st.floats(0.01, 10.0),
    g=hnp.arrays(np.float64, st.integers(1, 5), elements=st.floats(-10.0, 10.0)),
)
def test_inject_hyperparams_takes_a_zero_dim_tensor_as_the_value(lr, g):
    grad = torch.from_numpy(g)
    tx = fr.inject_hyperparams(fr.sgd, learning_rate=torch.tensor(lr, dtype=torch.float64))
    params = {"w": torch.zeros_like(grad)}
    u, state = tx.update({"w": grad}, tx.init(params), params)
    torch.testing.assert_close(u["w"], -lr * grad, atol=1e-12, rtol=1e-10)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(lr)


@pytest.mark.parametrize("shape", [(2,), (1,), (2, 3)])
def test_inject_hyperparams_refuses_a_tensor_that_is_not_zero_dim(shape):
    value = torch.full(shape, 0.1)
    expected = f"Invalid learning_rate value: a tensor of shape {tuple(shape)!r} (expected 0-d)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        fr.inject_hyperparams(fr.sgd, learning_rate=value)


# --- compress_state: the default seed is 0 ----------------------------------------------------------


def _compressed_run(tx, grads):
    params = {"w": torch.zeros(grads[0].shape)}
    state = tx.init(params)
    for g in grads:
        _, state = tx.update({"w": g}, state, params)
    return [x for x in pytree.tree_leaves(state) if isinstance(x, torch.Tensor)]


@settings(deadline=None, max_examples=10)
@given(g=hnp.arrays(np.float32, (2, 256), elements=st.floats(0.5, 2.0, width=32)))
def test_compress_state_default_seed_is_zero(g):
    grads = [torch.from_numpy(g), torch.from_numpy(g[::-1].copy())]
    default = _compressed_run(fr.compress_state(fr.scale_by_adam()), grads)
    zero = _compressed_run(fr.compress_state(fr.scale_by_adam(), seed=0), grads)
    assert len(default) == len(zero)
    for a, b in zip(default, zero):
        assert torch.equal(a, b)
    assert "seed=0" in repr(fr.compress_state(fr.scale_by_adam()))


# --- checked_groups: a full copy of the saved groups, their parameter names included ---------------


def test_checked_groups_returns_a_copy_of_the_saved_groups_with_their_names():
    p, q, r = torch.zeros(1), torch.zeros(2), torch.zeros(3)
    groups = [{"params": [p, q], "lr": 0.1}, {"params": [r], "lr": 0.2}]
    names = [["a", "b"], ["c"]]
    sd = {
        "state": {0: {"step": torch.tensor(1.0)}},
        "param_groups": [
            {"params": [0, 1], "param_names": ["a", "b"], "lr": 0.5, "betas": (0.9, 0.99)},
            {"params": [2], "param_names": ["c"], "lr": 0.25},
        ],
    }
    expected = [
        dict(g, params=list(g["params"]), param_names=list(g["param_names"])) for g in sd["param_groups"]
    ]
    out = checked_groups(sd, groups, names)
    assert out == expected
    assert all(o is not s for o, s in zip(out, sd["param_groups"]))
    assert sd["param_groups"] == expected  # the state_dict itself is left as it was


# --- with_config: a value that cannot be compared with its default is shown -----------------------


def test_with_config_shows_a_value_that_cannot_be_compared_with_its_default():
    tx = with_config(
        fr.identity(),
        "probe",
        (),
        {"weights": np.array([1.0, 2.0]), "eps": 1e-8},
        {"weights": np.array([1.0, 2.0]), "eps": 1e-8},
    )
    text = repr(tx)
    assert "weights=" in text  # bool(array == array) raises: incomparable, so shown
    assert "eps=" not in text  # equal to its default: left out


# --- as_real: the inner transform sees the real views whenever a parameter is complex --------------


def _shape_recorder():
    """A transform whose state is the parameter shapes ``init`` saw, and which refuses an update
    whose parameters have other shapes."""

    def shapes(params):
        return tuple(tuple(p.shape) for p in pytree.tree_leaves(params))

    def init(params):
        return {"shapes": shapes(params)}

    def update(updates, state, params=None):
        seen = shapes(params)
        if seen != state["shapes"]:
            raise AssertionError(f"update saw parameters of shapes {seen}, init {state['shapes']}")
        return updates, state

    return fr.GradientTransformation(init, update)


def test_as_real_passes_real_views_of_complex_params_even_when_no_update_is_complex():
    params = {"a": torch.ones(2), "z": torch.tensor([1 + 2j, 3 - 1j, 0.5j])}
    tx = as_real(_shape_recorder())
    state = tx.init(params)
    assert state["shapes"] == ((2,), (3, 2))  # a complex (3,) is a real (3, 2)
    g = torch.tensor([0.5, -1.0])
    u, state = tx.update({"a": g, "z": None}, state, params)  # the complex parameter is frozen
    assert torch.equal(u["a"], g)
    assert u["z"] is None
    assert state["shapes"] == ((2,), (3, 2))
