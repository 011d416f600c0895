"""Bad input raises at construction (or at the first call) with a message naming the argument and value."""

from __future__ import annotations

import math
import re

import pytest
import torch

import funcreg as fr

NAN, INF = math.nan, math.inf
BAD_NONNEGATIVE = [-0.1, NAN, INF, -INF]


def invalid(name: str, value: object) -> str:
    """The start of the message, as a regex: ``Invalid <name> value: <value>``."""
    return re.escape(f"Invalid {name} value: {value!r}")


# --- hyperparameters ----------------------------------------------------------------------------------

CASES = []
for v in BAD_NONNEGATIVE:
    CASES += [
        ("sgd lr", lambda v=v: fr.sgd(v), "learning_rate", v),
        ("sgd weight_decay", lambda v=v: fr.sgd(0.1, weight_decay=v), "weight_decay", v),
        ("sgd momentum", lambda v=v: fr.sgd(0.1, momentum=v), "momentum", v),
        ("adam lr", lambda v=v: fr.adam(v), "learning_rate", v),
        ("adam eps", lambda v=v: fr.adam(0.1, eps=v), "eps", v),
        ("adam weight_decay", lambda v=v: fr.adam(0.1, weight_decay=v), "weight_decay", v),
        ("adamw lr", lambda v=v: fr.adamw(v), "learning_rate", v),
        ("adamw eps", lambda v=v: fr.adamw(0.1, eps=v), "eps", v),
        ("adamw weight_decay", lambda v=v: fr.adamw(0.1, weight_decay=v), "weight_decay", v),
        ("scale_by_learning_rate", lambda v=v: fr.scale_by_learning_rate(v), "learning_rate", v),
        ("trace momentum", lambda v=v: fr.trace(v), "momentum", v),
        ("scale_by_adam eps", lambda v=v: fr.scale_by_adam(eps=v), "eps", v),
        ("add_decayed_weights", lambda v=v: fr.add_decayed_weights(v), "weight_decay", v),
        (
            "decoupled_weight_decay",
            lambda v=v: fr.decoupled_weight_decay(v, scale_by="none"),
            "weight_decay",
            v,
        ),
        (
            "decoupled_weight_decay lr",
            lambda v=v: fr.decoupled_weight_decay(0.1, learning_rate=v, scale_by="learning_rate"),
            "learning_rate",
            v,
        ),
    ]
for v in [NAN, INF, -INF]:
    CASES += [
        ("sgd dampening", lambda v=v: fr.sgd(0.1, momentum=0.9, dampening=v), "dampening", v),
        ("trace dampening", lambda v=v: fr.trace(0.9, dampening=v), "dampening", v),
        ("scale", lambda v=v: fr.scale(v), "step_size", v),
    ]
for v in [1.0, 1.5, -0.1, NAN, INF]:
    CASES += [
        ("adam beta1", lambda v=v: fr.adam(0.1, betas=(v, 0.999)), "betas[0]", v),
        ("adam beta2", lambda v=v: fr.adam(0.1, betas=(0.9, v)), "betas[1]", v),
        ("adamw beta1", lambda v=v: fr.adamw(0.1, betas=(v, 0.999)), "betas[0]", v),
        ("adamw beta2", lambda v=v: fr.adamw(0.1, betas=(0.9, v)), "betas[1]", v),
        ("scale_by_adam b1", lambda v=v: fr.scale_by_adam(b1=v), "b1", v),
        ("scale_by_adam b2", lambda v=v: fr.scale_by_adam(b2=v), "b2", v),
    ]
for v in [0.0, -1.0, NAN, INF]:
    CASES.append(("clip_by_global_norm", lambda v=v: fr.clip_by_global_norm(v), "max_norm", v))


@pytest.mark.parametrize("what, make, name, value", CASES, ids=[f"{c[0]}={c[3]}" for c in CASES])
def test_invalid_hyperparameter_raises_naming_argument_and_value(what, make, name, value):
    with pytest.raises(ValueError, match=invalid(name, value)):
        make()


def test_valid_edges_are_accepted():
    fr.sgd(0.0, momentum=0.0, weight_decay=0.0)
    fr.adam(0.0, betas=(0.0, 0.0), eps=0.0)
    fr.adamw(0.1, betas=(0.999999, 0.999999), weight_decay=0.0)
    fr.trace(0.9, dampening=-0.5)  # torch accepts any finite dampening
    fr.scale(-3.0)
    fr.clip_by_global_norm(1e-12)


def test_tensor_hyperparameters_are_checked_elementwise():
    with pytest.raises(ValueError, match=re.escape("Invalid weight_decay value: tensor [0.5, -0.5]")):
        fr.add_decayed_weights(torch.tensor([0.5, -0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match=re.escape("Invalid learning_rate value: tensor [nan]")):
        fr.scale_by_learning_rate(torch.tensor([NAN], dtype=torch.float64))


@pytest.mark.parametrize(
    "make, name, value",
    [
        (lambda: fr.sgd(0.1, momentum="0.9"), "momentum", "0.9"),
        (lambda: fr.sgd(0.1, nesterov=1), "nesterov", 1),
        (lambda: fr.sgd(True), "learning_rate", True),
        (lambda: fr.adam(0.1, amsgrad="yes"), "amsgrad", "yes"),
        (lambda: fr.adamw(0.1, maximize=None), "maximize", None),
        (lambda: fr.apply_if_finite(fr.scale(1.0), 1.5), "max_consecutive_errors", 1.5),
        (lambda: fr.scale_by_learning_rate(0.1, flip_sign=0), "flip_sign", 0),
    ],
)
def test_wrong_types_raise_type_error_naming_argument_and_value(make, name, value):
    with pytest.raises(TypeError, match=invalid(name, value)):
        make()


def test_betas_must_be_a_pair():
    with pytest.raises(TypeError, match=re.escape("Invalid betas value: (0.9,)")):
        fr.adam(0.1, betas=(0.9,))


@pytest.mark.parametrize(
    "make",
    [
        lambda: fr.sgd(0.1, nesterov=True),
        lambda: fr.sgd(0.1, momentum=0.9, dampening=0.1, nesterov=True),
        lambda: fr.trace(0.0, nesterov=True),
        lambda: fr.trace(0.9, dampening=0.1, nesterov=True),
    ],
    ids=["sgd without momentum", "sgd with dampening", "trace without momentum", "trace with dampening"],
)
def test_nesterov_needs_momentum_and_no_dampening(make):
    with pytest.raises(
        ValueError,
        match=r"Invalid nesterov value: True needs momentum > 0 and dampening == 0 \(got momentum=",
    ):
        make()


def test_apply_if_finite_max_consecutive_errors():
    with pytest.raises(ValueError, match=invalid("max_consecutive_errors", -1)):
        fr.apply_if_finite(fr.scale(1.0), -1)
    with pytest.raises(TypeError, match="GradientTransformation"):
        fr.apply_if_finite(lambda g: g, 1)


def test_schedule_arguments():
    with pytest.raises(ValueError, match=invalid("decay_steps", 0)):
        fr.cosine_decay_schedule(1.0, 0)
    with pytest.raises(ValueError, match=invalid("alpha", 2.0)):
        fr.cosine_decay_schedule(1.0, 10, alpha=2.0)
    with pytest.raises(ValueError, match=invalid("init_value", NAN)):
        fr.linear_schedule(NAN, 0.0, 10)


# --- mismatched tree structures -----------------------------------------------------------------------


def t(*shape):
    return torch.zeros(*shape)


PARAMS = {"enc": {"w": t(2, 2), "b": t(2)}, "layers": [t(3), t(3)]}

MISMATCHED = [
    ({"enc": {"w": t(2, 2), "c": t(2)}, "layers": [t(3), t(3)]}, "enc.b"),  # a key renamed
    ({"enc": {"w": t(2, 2)}, "layers": [t(3), t(3)]}, "enc.b"),  # a key missing
    ({"enc": {"w": t(2, 2), "b": t(2)}, "layers": [t(3)]}, "layers.1"),  # a list entry missing
    ({"enc": {"w": t(2, 2), "b": t(2), "x": t(1)}, "layers": [t(3), t(3)]}, "enc.x"),  # an extra key
    ({"enc": {"w": {"inner": t(2, 2)}, "b": t(2)}, "layers": [t(3), t(3)]}, "enc.w"),  # a subtree at a leaf
    ({"enc": {"w": t(2, 2), "b": t(2)}, "layers": (t(3), t(3))}, "layers"),  # a tuple for a list
]


@pytest.mark.parametrize("updates, key", MISMATCHED, ids=[k for _, k in MISMATCHED])
def test_apply_updates_mismatch_names_first_differing_key(updates, key):
    with pytest.raises(ValueError, match=re.escape(f"at key {key!r}")):
        fr.apply_updates(PARAMS, updates)


@pytest.mark.parametrize("updates, key", MISMATCHED, ids=[k for _, k in MISMATCHED])
@pytest.mark.parametrize(
    "make",
    [
        lambda: fr.sgd(0.1, momentum=0.9, weight_decay=0.1),
        lambda: fr.adamw(0.1),
        lambda: fr.chain(fr.add_decayed_weights(0.1), fr.scale_by_adam()),
        lambda: fr.masked(fr.add_decayed_weights(0.1), True),
        lambda: fr.decoupled_weight_decay(0.1, scale_by="none"),
    ],
    ids=["sgd", "adamw", "chain", "masked", "decoupled"],
)
def test_update_with_gradients_not_matching_params_names_first_differing_key(make, updates, key):
    tx = make()
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match=re.escape(f"{key!r}")):
        tx.update(updates, state, PARAMS)


@pytest.mark.parametrize(
    "make",
    [lambda: fr.trace(0.9), lambda: fr.scale_by_adam(), lambda: fr.adam(0.1)],
    ids=["trace", "adam", "adam_alias"],
)
def test_update_with_state_of_other_params_names_the_key(make):
    tx = make()
    state = tx.init({"a": t(2)})
    with pytest.raises(ValueError, match="'b'"):
        tx.update({"a": t(2), "b": t(2)}, state)


def test_apply_updates_to_a_none_parameter_raises():
    with pytest.raises(ValueError, match=re.escape("parameter 'w' is None but its update is not")):
        fr.apply_updates({"w": None, "b": t(1)}, {"w": t(1), "b": None})


def test_transform_needing_params_says_so():
    tx = fr.add_decayed_weights(0.1)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update({"w": t(1)}, tx.init({"w": t(1)}))


def test_masked_out_leaf_getting_an_update_later_raises():
    params = {"w": t(2), "b": t(2)}
    inner = fr.trace(0.9)
    state = inner.init({"w": t(2), "b": None})  # no state for "b"
    with pytest.raises(ValueError, match=r"no state for 'b'"):
        inner.update({"w": t(2), "b": t(2)}, state, params)
