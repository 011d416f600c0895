"""The checkers in funcreg.testing catch what they claim to catch, and accept what is right."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import funcreg as fr
from funcreg.testing import check_forms_agree, check_penalty
from funcreg.testing.checks import (
    _forms_gradient,
    _generic_trees,
    _kink_excused,
    _linear_loss,
    _note,
)

F64 = torch.float64


def _fixed(tree):
    """A params strategy that always draws ``tree`` (so the first step's values are known)."""
    return st.just(tree)


# --- _forms_checks ------------------------------------------------------------------------------


@settings(deadline=None, max_examples=30)
@given(
    w=arrays(np.float64, (2, 3), elements=st.floats(-5, 5)),
    b=arrays(np.float64, (3,), elements=st.floats(-5, 5)),
    gw=arrays(np.float64, (2, 3), elements=st.floats(-1, 1)),
    gb=arrays(np.float64, (3,), elements=st.floats(-1, 1)),
)
def test_linear_loss_is_the_inner_product_and_its_gradient_is_the_data_gradient(w, b, gw, gb):
    params = {"w": torch.from_numpy(w), "b": torch.from_numpy(b)}
    grads = {"w": torch.from_numpy(gw), "b": torch.from_numpy(gb)}
    expected = float(np.sum(w * gw) + np.sum(b * gb))
    assert math.isclose(float(_linear_loss(params, grads)), expected, rel_tol=1e-12, abs_tol=1e-12)
    autograd = torch.func.grad(_linear_loss)(params, grads)
    for name in params:
        torch.testing.assert_close(autograd[name], grads[name], atol=0, rtol=0)


def test_forms_gradient_rejects_a_wrong_closed_form_given_the_loss_term_gradient():
    """P = w^2 / 2 with a closed form of 2w: at w = 1, g = 1 the loss-term gradient is g + w = 2, its
    penalty part 1, and the closed form's 2 is no subgradient there."""
    wrong = fr.penalty(lambda p: 0.5 * (p["w"] ** 2).sum(), name="half_sq", grad=lambda p: {"w": 2 * p["w"]})
    params = {"w": torch.ones(1, dtype=F64)}
    g = {"w": torch.ones(1, dtype=F64)}
    grads = {"w": g["w"] + params["w"]}  # autograd of <g, w> + w^2 / 2
    with pytest.raises(AssertionError, match="step 3: coupled form vs loss-term form: leaf 'w' differs"):
        _forms_gradient(wrong, params, g, grads, {"w": True}, 1e-10, 1e-8, 3)
    right = fr.penalty(lambda p: 0.5 * (p["w"] ** 2).sum(), name="half_sq", grad=lambda p: {"w": p["w"]})
    out = _forms_gradient(right, params, g, grads, {"w": True}, 1e-10, 1e-8, 3)
    torch.testing.assert_close(out["w"], g["w"] + params["w"], atol=0, rtol=0)


def test_forms_failure_in_the_first_gradient_names_step_1():
    wrong = fr.penalty(lambda p: 0.5 * (p["w"] ** 2).sum(), name="half_sq", grad=lambda p: {"w": 2 * p["w"]})
    with pytest.raises(AssertionError) as failure:
        check_forms_agree(
            wrong, fr.sgd(0.05), _fixed({"w": torch.ones(3, dtype=F64)}), max_examples=3, shrink=False
        )
    assert str(failure.value).splitlines()[0] == "step 1: coupled form vs loss-term form: leaf 'w' differs"


def test_forms_failure_in_the_first_update_names_step_1():
    """The decoupled form under Adam differs from the loss-term form from the first step on."""
    with pytest.raises(AssertionError) as failure:
        check_forms_agree(
            fr.l2(0.1),
            fr.adam(0.01),
            _fixed({"w": torch.ones(3, dtype=F64)}),
            learning_rate=0.01,
            max_examples=3,
            shrink=False,
        )
    assert str(failure.value).splitlines()[0] == "step 1: decoupled form vs loss-term form: leaf 'w' differs"


class _LeaksIntoUnselected(fr.Penalty):
    """``|w|^2 / 2`` on ``w`` only, whose gradient edit also nudges the unselected ``b`` by ``leak``."""

    name = "leaky"

    def __init__(self, leak: float) -> None:
        self.leak = leak

    def selected_flat(self, fp):
        return [n == "w" for n in fp.names]

    def terms_flat(self, fp):
        return [(self.name, 0.5 * (fp.leaves[fp.names.index("w")] ** 2).sum())]

    def grad_flat(self, fp):
        return [x if n == "w" else torch.full_like(x, self.leak) for n, x in zip(fp.names, fp.leaves)]


def test_forms_check_catches_a_penalty_that_moves_an_unselected_parameter():
    """A leak of 1e-12 is within every tolerance, but unselected parameters must match bit for bit."""
    template = {"w": torch.zeros(3, dtype=F64), "b": torch.zeros(2, dtype=F64)}
    with pytest.raises(AssertionError, match="step 1: unselected parameter 'b' was changed by the penalty"):
        check_forms_agree(_LeaksIntoUnselected(1e-12), fr.sgd(0.1), template, max_examples=3, shrink=False)
    check_forms_agree(_LeaksIntoUnselected(0.0), fr.sgd(0.1), template, max_examples=5)


# --- _kinks ---------------------------------------------------------------------------------------


class _DropsAGradient(fr.Penalty):
    """``|w|^2 + |b|^2`` whose gradient tree leaves out ``b`` (``None``), though the value depends on it."""

    name = "drops_b"

    def selected_flat(self, fp):
        return [True for _ in fp.leaves]

    def terms_flat(self, fp):
        return [(self.name, sum((x**2).sum() for x in fp.leaves))]

    def grad_flat(self, fp):
        return [2 * x for x in fp.leaves]

    def grad(self, params):
        return {"w": 2 * params["w"], "b": None}


def test_check_penalty_rejects_a_gradient_tree_missing_a_leaf():
    template = {"w": torch.zeros(2, dtype=F64), "b": torch.zeros(3, dtype=F64)}
    with pytest.raises(AssertionError, match="'b' is None on one side only"):
        check_penalty(_DropsAGradient(), template, max_examples=3, shrink=False)


def test_kink_excused_has_one_entry_per_leaf_when_it_stops_early():
    """Stopping at the first unexplained difference (leaf 'a') still gives one entry per leaf."""
    penalty = fr.penalty(lambda p: sum((x**2).sum() for x in p.values()), name="sq")
    params = {"a": torch.ones(2, dtype=F64), "b": torch.ones(3, dtype=F64), "c": torch.ones(1, dtype=F64)}
    closed = {k: 5 * v for k, v in params.items()}  # wrong: the gradient is 2w
    autograd = {k: 2 * v for k, v in params.items()}
    masks = _kink_excused(penalty, params, closed, autograd, 1e-10, 1e-8, stop_at_unexplained=True)
    assert len(masks) == 3
    assert masks[0] is not None and not bool(masks[0].any())
    assert masks[1:] == [None, None]


# --- _penalty_checks ------------------------------------------------------------------------------


class _VectorValued(fr.Penalty):
    """A penalty whose value is a 1-element vector, not a 0-d tensor (no gradient, no prox)."""

    name = "vector"

    def selected_flat(self, fp):
        return [True for _ in fp.leaves]

    def terms_flat(self, fp):
        return [(self.name, (fp.leaves[0] ** 2).sum().reshape(1))]

    @property
    def has_grad(self):
        return False


def test_check_penalty_rejects_a_value_that_is_not_0d():
    with pytest.raises(AssertionError, match="P\\(params\\) is not a 0-d tensor"):
        check_penalty(_VectorValued(), {"w": torch.zeros(3, dtype=F64)}, max_examples=3, shrink=False)


class _NonNegative(fr.Penalty):
    """The constraint ``w >= 0`` (0 or infinity, no gradient); ``projects=False`` gives a prox that
    returns its input unprojected."""

    name = "nonneg"

    def __init__(self, projects: bool) -> None:
        self.projects = projects

    def selected_flat(self, fp):
        return [True for _ in fp.leaves]

    def terms_flat(self, fp):
        infeasible = any(bool((x < 0).any()) for x in fp.leaves)
        return [(self.name, torch.tensor(float("inf") if infeasible else 0.0, dtype=F64))]

    @property
    def has_grad(self):
        return False

    def why_no_prox(self, fp):
        return None

    def prox_flat(self, fp, step):
        return [x.clamp(min=0) if self.projects else x.clone() for x in fp.leaves]


def test_check_penalty_rejects_an_infeasible_prox_by_name():
    negative = _fixed({"w": torch.tensor([-1.0, 0.5], dtype=F64)})
    with pytest.raises(AssertionError, match="prox returned a point where the penalty is infinite"):
        check_penalty(_NonNegative(projects=False), negative, max_examples=3, shrink=False)
    check_penalty(_NonNegative(projects=True), negative, max_examples=5)


def _scaled_prox(gap: float):
    """The zero penalty with the wrong prox ``v / 0.999``, at a ``v`` where the prox objective at the
    output is ``gap`` above its minimum 0 (at ``z = v``): ``1/2 (v / 999)^2 = gap``. The check's move
    toward zero by 1e-3 lands on ``0.999 z = v`` exactly."""
    v = 999 * math.sqrt(2 * gap)
    zero = fr.penalty(lambda p: (0 * p["w"]).sum(), name="zero", prox=lambda p, s: {"w": p["w"] / 0.999})
    return zero, _fixed({"w": torch.tensor([v], dtype=F64)})


def test_check_penalty_tolerates_only_a_1e9_gap_in_the_prox_objective():
    check_penalty(*_scaled_prox(0.5e-9), max_examples=3)
    with pytest.raises(AssertionError, match="P.prox is not the minimiser"):
        check_penalty(*_scaled_prox(1.5e-9), max_examples=3, shrink=False)


def test_check_penalty_reports_a_single_assertion_error_for_two_different_bugs():
    """Two different failures (an infinite value for w[0] <= 0, a wrong gradient elsewhere) come back
    as one AssertionError, not an exception group."""

    def value(p):
        inf = torch.tensor(float("inf"), dtype=F64)
        return torch.where(p["w"][0] > 0, (p["w"] ** 2).sum(), inf)

    two_bugs = fr.penalty(value, name="two_bugs", grad=lambda p: {"w": p["w"]})  # should be 2w
    with pytest.raises(AssertionError):
        check_penalty(two_bugs, {"w": torch.zeros(2, dtype=F64)}, max_examples=30, seed=0)


# --- _search --------------------------------------------------------------------------------------


def test_note_appends_to_the_message_where_exceptions_have_no_add_note():
    """The Python 3.10 path: an exception without ``add_note`` gets the note in its message."""

    class NoNotes(AssertionError):
        @property
        def add_note(self):
            raise AttributeError("add_note")

    err = NoNotes("first line", 7)
    assert not hasattr(err, "add_note")
    _note(err, "the note")
    assert err.args == ("first line\nthe note", 7)


def _drawn(tree):
    return {k: v for k, v in tree.items() if k != "matrix"}


@settings(deadline=None, max_examples=150)
@given(st.data())
def test_generic_trees_are_small_and_hold_a_matrix(data):
    tree = data.draw(_generic_trees(F64))
    drawn = _drawn(tree)
    assert 1 <= len(drawn) <= 3
    assert any(x.ndim >= 2 for x in tree.values())
    # the extra "matrix" is added exactly when no drawn leaf is one
    assert ("matrix" in tree) == (not any(x.ndim >= 2 for x in drawn.values()))
    for x in tree.values():
        assert x.dtype == F64 and x.ndim <= 2
        assert all(1 <= s <= 4 for s in x.shape)
        assert float(x.abs().max()) <= 5.0


@pytest.mark.parametrize("axis", [0, 1])
def test_generic_trees_can_add_a_matrix_with_a_single_row_or_column(axis):
    def thin_added(tree):
        return (
            "matrix" in tree
            and not any(x.ndim >= 2 for x in _drawn(tree).values())
            and tree["matrix"].shape[axis] == 1
        )

    tree = find(_generic_trees(F64), thin_added, settings=settings(database=None, max_examples=500))
    assert tree["matrix"].shape[axis] == 1
