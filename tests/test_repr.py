"""Printable configuration and pickling: a transform prints the call that built it, a penalty its
coefficients and selection, and both survive a round trip (eval of the repr, pickle)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcreg as fr

NAMESPACE = {k: getattr(fr, k) for k in fr.__all__}


def test_transforms_print_their_configuration():
    assert (
        repr(fr.adamw(1e-3, weight_decay=1e-2))
        == "adamw(0.001, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.01)"
    )
    assert repr(fr.sgd(0.1, momentum=0.9, nesterov=True)) == "sgd(0.1, momentum=0.9, nesterov=True)"
    tx = fr.chain(fr.clip_by_global_norm(1.0), fr.sgd(0.1), fr.proximal(fr.l1(0.01), learning_rate=0.1))
    assert repr(tx) == "chain(clip_by_global_norm(1.0), sgd(0.1), proximal(l1(0.01), learning_rate=0.1))"
    assert repr(fr.masked(fr.trace(0.9), {"w": True})) == "masked(trace(0.9), {'w': True})"
    assert "function" not in repr(fr.named_chain(("a", fr.scale_by_adam()), ("b", fr.scale(-1.0))))


def test_penalties_print_coefficients_and_selection():
    P = fr.l1(0.001, mask={"w": True, "b": False}) + fr.l2(0.01)
    assert repr(P) == "l1(0.001, mask={'w': True, 'b': False}) + l2(0.01)"
    params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    assert P.describe(params) == "l1(0.001, mask={'w': True, 'b': False}) on 1 tensor + l2(0.01) on 2 tensors"
    assert repr(3.0 * fr.group_lasso(0.1, axis=1)) == "3.0 * group_lasso(0.1, axis=1)"


def test_masks_and_arguments_print_by_their_size_and_kind():
    # the rules of the printed configuration: up to 4 entries of a tuple, list or dict are shown,
    # a 1-tuple keeps its comma, a 0-d tensor its value, a larger one its shape, a long or multi-line
    # text its type only
    four = {"a": True, "b": False, "c": True, "d": False}
    assert repr(fr.masked(fr.scale(0.5), four)) == f"masked(scale(0.5), {four!r})"
    five = {**four, "e": True}
    assert repr(fr.masked(fr.scale(0.5), five)) == "masked(scale(0.5), <dict of 5 entries>)"
    assert repr(fr.adam(0.1, betas=(0.5, 0.6))) == "adam(0.1, betas=(0.5, 0.6), eps=1e-08, weight_decay=0.0)"
    tx = fr.chain(fr.scale(1.0), fr.scale(2.0), fr.scale(3.0), fr.scale(4.0), fr.scale(5.0))
    assert repr(tx) == "chain(scale(1.0), scale(2.0), scale(3.0), scale(4.0), scale(5.0))"
    assert repr(fr.scale(torch.tensor(0.25))) == "scale(tensor(0.25))"
    assert repr(fr.scale(torch.tensor(0.25, device="meta"))) == "scale(tensor(shape=()))"
    assert repr(fr.l1(0.1, mask=lambda params: params)) == "l1(0.1, mask=<lambda>)"
    from funcreg._src.core.describe import call_text, fmt

    assert fmt((1,)) == "(1,)" and fmt((1, 2)) == "(1, 2)" and fmt([1]) == "[1]"
    # up to 4 entries are rendered one by one (a function by its name); more take the plain repr,
    # if it is short (<= 120 characters, one line)
    assert fmt((len,) * 4) == "(len, len, len, len)" and fmt((len,) * 5) == "<tuple>"
    assert fmt((1, 2, 3, 4, 5)) == "(1, 2, 3, 4, 5)"
    assert fmt("x" * 200) == repr("x" * 200) and fmt(None) == "None" and fmt(True) == "True"

    class Long:
        def __init__(self, text):
            self.text = text

        def __repr__(self):
            return self.text

    assert fmt(Long("y" * 120)) == "y" * 120 and fmt(Long("y" * 121)) == "<Long>"
    assert fmt(Long("a\nb")) == "<Long>" and fmt(object()) == "<object>"
    assert call_text("f", 1, k=None, j=2) == "f(1, j=2)"


@settings(deadline=None, max_examples=25)
@given(
    lr=st.floats(1e-5, 1.0),
    wd=st.floats(0.0, 0.5),
    b1=st.floats(0.0, 0.99),
    amsgrad=st.booleans(),
)
def test_the_repr_of_an_alias_rebuilds_it(lr, wd, b1, amsgrad):
    """eval(repr(tx)) builds a transform with the same repr and the same updates."""
    tx = fr.adamw(lr, betas=(b1, 0.999), weight_decay=wd, amsgrad=amsgrad)
    again = eval(repr(tx), NAMESPACE)  # noqa: S307 - our own repr, in a test
    assert repr(again) == repr(tx)
    params = {"w": torch.tensor([0.5, -1.0], dtype=torch.float64)}
    g = {"w": torch.tensor([0.3, 0.7], dtype=torch.float64)}
    u1, _ = tx.update(g, tx.init(params), params)
    u2, _ = again.update(g, again.init(params), params)
    assert torch.equal(u1["w"], u2["w"])


PENALTIES = {
    "l2": lambda: fr.l2(0.1),
    "l1_masked": lambda: fr.l1(0.2, mask={"w": True, "b": False}),
    "elastic_net": lambda: fr.elastic_net(0.1, 0.2),
    "lp": lambda: fr.lp(0.3, 3),
    "group_lasso": lambda: fr.group_lasso(0.2, axis=1),
    "anchor": lambda: fr.anchor(0.3, {"w": torch.ones(2, 3), "b": torch.zeros(3)}),
    "orthogonal": lambda: fr.orthogonal(0.1),
    "max_norm": lambda: fr.max_norm(1.5),
    "non_negative": lambda: fr.non_negative(),
    "sum": lambda: fr.l2(0.1) + 2.0 * fr.l1(0.05),
    "joint_group_lasso": lambda: fr.joint_group_lasso(0.2, {"w": 1, "b": 0}, num_groups=3),
}


@pytest.mark.parametrize("name", sorted(PENALTIES))
def test_builtin_penalties_pickle_and_deepcopy(name):
    """Optimizer options are pickled by Lightning, multiprocessing and deepcopy: a penalty survives."""
    P = PENALTIES[name]()
    params = {"w": torch.tensor([[0.5, -1.0, 2.0], [0.1, 0.0, -0.3]]), "b": torch.tensor([0.2, -0.4, 1.0])}
    for other in (pickle.loads(pickle.dumps(P)), copy.deepcopy(P)):
        assert repr(other) == repr(P)
        assert torch.equal(other(params), P(params))
        if P.why_no_prox(fr.FlatParams.of(params)) is None:
            for a, b in zip(other.prox(params, 0.3).values(), P.prox(params, 0.3).values()):
                assert torch.equal(a, b)
