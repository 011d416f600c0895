"""chain, named_chain, masked and partition."""

from __future__ import annotations

import re

import pytest
import torch
import torch.utils._pytree as pytree
from helpers import (
    SLOW_OK,
    assert_lists_close,
    assert_trees_equal,
    detached,
    find_state,
    leaves,
    lockstep,
    problems,
    run_funcreg,
    run_torch,
    torch_state,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import funcreg as fr
from funcreg.testing import gradient_sequences, param_trees

PROPERTY = settings(deadline=None, max_examples=25, suppress_health_check=SLOW_OK)
SHORT = st.integers(1, 6)  # steps
FOREACH = pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single_tensor"])


def unflatten_like(tree, values):
    return pytree.tree_unflatten(values, pytree.tree_structure(tree, is_leaf=lambda x: x is None))


def per_leaf_inner():
    """Acts on each leaf independently, holds per-leaf state, needs params."""
    return fr.chain(fr.add_decayed_weights(0.1), fr.trace(0.9), fr.scale_by_learning_rate(0.1))


# --- chain and named_chain ----------------------------------------------------------------------------


def test_empty_chain_is_identity():
    tx = fr.chain()
    g = {"w": torch.ones(2)}
    assert tx.init(g) == ()
    u, state = tx.update(g, ())
    assert u["w"] is g["w"] and state == ()


def test_chain_state_is_the_tuple_of_inner_states_in_order():
    params = {"w": torch.zeros(2)}
    tx = fr.chain(fr.trace(0.9), fr.scale_by_adam(), fr.scale_by_learning_rate(lambda c: 0.1))
    state = tx.init(params)
    assert [type(s) for s in state] == [fr.TraceState, fr.ScaleByAdamState, fr.ScaleByScheduleState]


def test_chain_rejects_what_is_not_a_transform():
    with pytest.raises(TypeError, match="chain argument 1"):
        fr.chain(fr.scale(1.0), lambda g: g)


@PROPERTY
@given(problem=problems(steps=SHORT))
def test_named_chain_equals_chain_with_a_readable_state(problem):
    params, grads = problem
    parts = [
        ("decay", fr.add_decayed_weights(0.1)),
        ("adam", fr.scale_by_adam()),
        ("lr", fr.scale_by_learning_rate(0.1)),
    ]
    named_params, named_state = run_funcreg(fr.named_chain(*parts), params, grads)
    chain_params, chain_state = run_funcreg(fr.chain(*[tx for _, tx in parts]), params, grads)
    assert_trees_equal(named_params, chain_params, "params")
    assert list(named_state) == ["decay", "adam", "lr"]
    for (name, _), s in zip(parts, chain_state):
        assert_trees_equal(named_state[name], s, f"state {name!r}")


def test_named_chain_errors():
    with pytest.raises(ValueError, match="duplicate name 'a'"):
        fr.named_chain(("a", fr.scale(1.0)), ("a", fr.scale(2.0)))
    with pytest.raises(TypeError, match="named_chain argument 0"):
        fr.named_chain(fr.scale(1.0))
    tx = fr.named_chain(("a", fr.scale(1.0)))
    with pytest.raises(ValueError, match=r"expects state keys \['a'\]"):
        tx.update({"w": torch.ones(1)}, {"b": fr.EmptyState()})


# --- masked -------------------------------------------------------------------------------------------


def check_masked(params, grads, mask, keep, inner_factory=per_leaf_inner):
    """masked(inner, mask) vs inner on all leaves: selected leaves equal, the others bit-identical, no state."""
    tx = fr.masked(inner_factory(), mask)
    state, full_state = tx.init(params), inner_factory().init(params)
    assert isinstance(state, fr.MaskedState)
    for g in grads:
        u, state = tx.update(g, state, params)
        u_full, full_state = inner_factory().update(g, full_state, params)
        for k, (out, given_, full) in enumerate(zip(leaves(u), leaves(g), leaves(u_full))):
            if keep[k]:
                assert torch.equal(out, full), f"selected leaf {k}"
            else:
                assert out.dtype == given_.dtype and torch.equal(out, given_), f"masked-out leaf {k} changed"
    buffers = find_state(state.inner_state, fr.TraceState).trace
    full_buffers = find_state(full_state, fr.TraceState).trace
    for k, (b, fb) in enumerate(zip(leaves(buffers), leaves(full_buffers))):
        if keep[k]:
            assert torch.equal(b, fb), f"state of selected leaf {k}"
        else:
            assert b is None, f"masked-out leaf {k} holds state"


@PROPERTY
@given(problem=problems(steps=SHORT), data=st.data())
def test_masked_with_bool_tree(problem, data):
    params, grads = problem
    n = len(leaves(params))
    keep = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    check_masked(params, grads, unflatten_like(params, keep), keep)


@PROPERTY
@given(problem=problems(steps=SHORT), data=st.data())
def test_masked_with_callable(problem, data):
    params, grads = problem
    n = len(leaves(params))
    keep = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    seen = []

    def mask(tree):
        seen.append(tree)
        return unflatten_like(tree, keep)

    check_masked(params, grads, mask, keep)
    assert seen and all(pytree.tree_structure(t) == pytree.tree_structure(params) for t in seen)


@PROPERTY
@given(problem=problems(steps=SHORT, nested=False), data=st.data())
def test_masked_with_selection(problem, data):
    params, grads = problem
    keep = data.draw(st.lists(st.booleans(), min_size=len(params), max_size=len(params)))
    check_masked(params, grads, fr.Selection(dict(zip(params, keep))), keep)


@PROPERTY
@given(data=st.data(), enc=st.booleans(), dec=st.booleans())
def test_masked_with_prefix_tree_on_nested_params(data, enc, dec):
    encoder = data.draw(param_trees(dtype=torch.float64, max_leaves=3))
    decoder = list(data.draw(param_trees(dtype=torch.float64, max_leaves=3)).values())
    params = {"encoder": encoder, "decoder": decoder}
    grads = data.draw(gradient_sequences(params, st.integers(1, 4)))
    keep = [enc] * len(encoder) + [dec] * len(decoder)
    check_masked(params, grads, {"decoder": dec, "encoder": enc}, keep)  # key order does not matter


@PROPERTY
@given(problem=problems(steps=SHORT), on=st.booleans())
def test_masked_with_a_single_bool(problem, on):
    params, grads = problem
    check_masked(params, grads, on, [on] * len(leaves(params)))


def test_masked_out_leaf_is_returned_as_given():
    tx = fr.masked(fr.scale(0.0), {"w": True, "b": False})
    g = {"w": torch.ones(2), "b": torch.tensor([-0.0, float("nan")])}
    u, _ = tx.update(g, tx.init(g))
    assert u["b"] is g["b"]  # not even a copy: NaN and -0.0 come out exactly as they went in
    assert torch.equal(u["w"], torch.zeros(2))


NESTED = {
    "encoder": {"w": torch.zeros(2, 2), "b": torch.zeros(2)},
    "decoder": [torch.zeros(3), torch.zeros(1)],
}


@pytest.mark.parametrize(
    "mask, key",
    [
        ({"encoder": True, "decoder": True, "head": False}, "'head'"),  # a key params lacks
        ({"encoder": True}, "'decoder'"),  # a key the mask lacks
        ({"encoder": {"w": True, "bias": False}, "decoder": True}, "'encoder.bias'"),
        ({"encoder": True, "decoder": [True]}, "'decoder'"),  # a list of the wrong length
        ({"encoder": {"w": {"x": True}, "b": True}, "decoder": True}, "'encoder.w'"),  # subtree at a leaf
    ],
)
def test_mask_that_does_not_fit_raises_naming_the_key(mask, key):
    tx = fr.masked(fr.scale(2.0), mask)
    with pytest.raises(ValueError, match=re.escape(key)):
        tx.init(NESTED)


def test_selection_mask_that_does_not_fit_raises_naming_the_parameter():
    params = {"w": torch.zeros(2), "b": torch.zeros(2)}
    with pytest.raises(ValueError, match="'b'"):
        fr.masked(fr.scale(2.0), fr.Selection({"w": True})).init(params)
    with pytest.raises(ValueError, match="'v'"):
        fr.masked(fr.scale(2.0), fr.Selection({"w": True, "b": False, "v": True})).init(params)


def test_mask_values_must_be_bools():
    with pytest.raises(TypeError, match="'w'"):
        fr.masked(fr.scale(2.0), {"w": 1}).init({"w": torch.zeros(1)})


# --- partition ----------------------------------------------------------------------------------------


@st.composite
def labelled_problems(draw):
    params, grads = draw(problems(steps=SHORT, min_leaves=2))
    n = len(leaves(params))
    labels = draw(
        st.lists(st.sampled_from(["decay", "plain"]), min_size=n, max_size=n).filter(
            lambda x: len(set(x)) == 2
        )
    )
    return params, grads, labels


@FOREACH
@PROPERTY
@given(
    problem=labelled_problems(),
    lrs=st.tuples(st.floats(1e-3, 1.0), st.floats(1e-3, 1.0)),
    wds=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)),
    momentum=st.one_of(st.just(0.0), st.floats(0.0, 0.95)),
    as_callable=st.booleans(),
)
def test_partition_equals_torch_sgd_param_groups(foreach, problem, lrs, wds, momentum, as_callable):
    params, grads, labels = problem
    transforms = {
        "decay": fr.sgd(lrs[0], momentum, weight_decay=wds[0]),
        "plain": fr.sgd(lrs[1], momentum, weight_decay=wds[1]),
    }
    label_tree = unflatten_like(params, labels)
    tx = fr.partition(transforms, (lambda p: label_tree) if as_callable else label_tree)

    def make(ps):
        groups = [
            {"params": [p for p, lab in zip(ps, labels) if lab == name], "lr": lr, "weight_decay": wd}
            for name, lr, wd in zip(["decay", "plain"], lrs, wds)
        ]
        return torch.optim.SGD(groups, momentum=momentum, foreach=foreach)

    def check(new_params, state, opt, ps, step):
        assert_lists_close(leaves(new_params), detached(ps), f"params after step {step}")
        assert isinstance(state, fr.PartitionState) and list(state.inner_states) == ["decay", "plain"]
        if momentum:
            expected = torch_state(opt, ps, "momentum_buffer")
            for name in ("decay", "plain"):
                bufs = leaves(find_state(state.inner_states[name], fr.TraceState).trace)
                for b, e, lab in zip(bufs, expected, labels):
                    if lab == name:
                        assert_lists_close([b], [e], f"{name} buffer")
                    else:
                        assert b is None  # no state for the other group's parameters

    lockstep(tx, params, grads, make, check)


@PROPERTY
@given(
    problem=labelled_problems(),
    lrs=st.tuples(st.floats(1e-3, 1.0), st.floats(1e-3, 1.0)),
    wd=st.floats(0.0, 1.0),
)
def test_partition_equals_torch_adamw_param_groups(problem, lrs, wd):
    params, grads, labels = problem
    tx = fr.partition(
        {"decay": fr.adamw(lrs[0], weight_decay=wd), "plain": fr.adam(lrs[1])}, unflatten_like(params, labels)
    )
    new_params, _ = run_funcreg(tx, params, grads)

    def make(ps):
        return torch.optim.AdamW(
            [
                {
                    "params": [p for p, lab in zip(ps, labels) if lab == "decay"],
                    "lr": lrs[0],
                    "weight_decay": wd,
                },
                {
                    "params": [p for p, lab in zip(ps, labels) if lab == "plain"],
                    "lr": lrs[1],
                    "weight_decay": 0.0,
                },
            ]
        )

    ps, _ = run_torch(make, params, grads)
    assert_lists_close(leaves(new_params), detached(ps), "params")


def test_partition_with_prefix_labels_on_nested_params():
    params = {
        "encoder": {"w": torch.ones(2, 2, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)},
        "decoder": [torch.ones(3, dtype=torch.float64)],
    }
    grads = pytree.tree_map(torch.zeros_like, params)
    tx = fr.partition(
        {"frozen": fr.scale(0.0), "decay": fr.sgd(0.5, weight_decay=0.1)},
        {"encoder": "frozen", "decoder": "decay"},
    )
    u, _ = tx.update(grads, tx.init(params), params)
    assert torch.equal(u["encoder"]["w"], torch.zeros(2, 2, dtype=torch.float64))
    assert torch.equal(u["decoder"][0], torch.full((3,), -0.05, dtype=torch.float64))  # -0.5 * 0.1 * 1


def test_partition_label_without_transform_raises():
    params = {"w": torch.zeros(2), "b": torch.zeros(2)}
    tx = fr.partition({"decay": fr.scale(1.0)}, {"w": "decay", "b": "no_decay"})
    with pytest.raises(ValueError, match=r"'b' has label 'no_decay', which has no transform"):
        tx.init(params)


def test_partition_transform_without_parameters_raises():
    params = {"w": torch.zeros(2), "b": torch.zeros(2)}
    tx = fr.partition(
        {"decay": fr.scale(1.0), "plain": fr.scale(1.0), "head": fr.scale(0.0)}, {"w": "decay", "b": "plain"}
    )
    with pytest.raises(ValueError, match=r"partition transform 'head' is given no parameter"):
        tx.init(params)


def test_partition_labels_that_do_not_fit_raise_naming_the_key():
    params = {"w": torch.zeros(2), "b": torch.zeros(2)}
    tx = fr.partition({"decay": fr.scale(1.0)}, {"w": "decay"})
    with pytest.raises(ValueError, match="'b'"):
        tx.init(params)


# regression test: the library once failed this
def test_partition_update_without_params_when_a_group_has_no_gradient():
    params = {"w": torch.ones(2), "b": torch.ones(2)}
    tx = fr.partition({"a": fr.sgd(0.1, momentum=0.9), "c": fr.sgd(0.2)}, {"w": "a", "b": "c"})
    state = tx.init(params)
    u, state = tx.update({"w": torch.ones(2), "b": None}, state)  # the same call with params works
    assert u["b"] is None and torch.equal(u["w"], torch.full((2,), -0.1))
