"""funcreg.testing: check_penalty and check_forms_agree pass for correct penalties and catch wrong ones."""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, settings

import funcreg as fr
from funcreg.testing import check_forms_agree, check_penalty

F64 = torch.float64
TEMPLATE = {
    "w": torch.zeros(3, 2, dtype=F64),
    "k": torch.zeros(2, 2, 3, dtype=F64),
    "b": torch.zeros(3, dtype=F64),
    "s": torch.zeros((), dtype=F64),
}
REF = {k: torch.full_like(v, 0.5) for k, v in TEMPLATE.items()}
PREC = {k: torch.full_like(v, 2.0) for k, v in TEMPLATE.items()}
N = 15


@pytest.fixture
def no_shrink():
    """Checks that must FAIL: skip Hypothesis' shrinking, which takes ~20 s for these checks.

    check_penalty/check_forms_agree build their settings at call time without ``phases``, so they
    inherit it from the loaded profile; the previous profile is restored afterwards.
    """
    previous = settings.get_current_profile_name()
    settings.register_profile(
        "funcreg-tests-no-shrink", parent=settings.get_profile(previous), phases=[Phase.explicit, Phase.reuse, Phase.generate]
    )
    settings.load_profile("funcreg-tests-no-shrink")
    yield
    settings.load_profile(previous)


def soft_threshold(v, t):
    return torch.sign(v) * torch.clamp(v.abs() - t, min=0)


BUILTINS = {
    "l2": lambda: fr.l2(0.3),
    "l1": lambda: fr.l1(0.3),
    "elastic_net": lambda: fr.elastic_net(0.2, 0.5),
    "lp3": lambda: fr.lp(0.3, 3),
    "lp1.5": lambda: fr.lp(0.3, 1.5),
    "group_lasso": lambda: fr.group_lasso(0.2),
    "group_lasso_cols": lambda: fr.group_lasso(0.2, axis=1),
    "anchor": lambda: fr.anchor(0.3, REF),
    "anchor_ewc": lambda: fr.anchor(0.3, REF, precision=PREC),
    "orthogonal": lambda: fr.orthogonal(0.1),
    "max_norm": lambda: fr.max_norm(1.0),
    "non_negative": lambda: fr.non_negative(),
    "sum": lambda: fr.l2(0.1, mask={"w": False, "k": True, "b": False, "s": True})
    + 2.0 * fr.l1(0.2, mask={"w": True, "k": False, "b": True, "s": False}),
    "masked_custom": lambda: fr.penalty(lambda q: (q["w"] ** 4).sum(), name="quartic", mask={"w": True, "k": False, "b": False, "s": False}),
}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_check_penalty_passes_for_builtins(name):
    check_penalty(BUILTINS[name](), TEMPLATE, max_examples=N)


@pytest.mark.parametrize("name", ["l2", "l1", "elastic_net", "lp3", "non_negative"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_check_penalty_passes_on_generic_trees(name, dtype):
    check_penalty(BUILTINS[name](), dtype=dtype, max_examples=N, atol=1e-5 if dtype == torch.float32 else 1e-6, rtol=1e-4 if dtype == torch.float32 else 1e-5)


# regression test: the library once failed this
@pytest.mark.parametrize("name", ["group_lasso", "orthogonal", "max_norm"])
def test_check_penalty_default_params_for_matrix_penalties(name, no_shrink):
    check_penalty(BUILTINS[name](), max_examples=30)


def test_check_penalty_catches_a_wrong_gradient(no_shrink):
    wrong = fr.penalty(lambda p: (p["w"] ** 2).sum(), name="sq", grad=lambda p: {"w": p["w"]})  # should be 2w
    with pytest.raises(AssertionError, match=r"P\.grad"):
        check_penalty(wrong, {"w": torch.zeros(3, dtype=F64)}, max_examples=N)
    right = fr.penalty(lambda p: (p["w"] ** 2).sum(), name="sq", grad=lambda p: {"w": 2 * p["w"]})
    check_penalty(right, {"w": torch.zeros(3, dtype=F64)}, max_examples=N)


def test_check_penalty_catches_a_wrong_prox(no_shrink):
    def l1(p):
        return 0.5 * p["w"].abs().sum()

    wrong = fr.penalty(l1, name="myl1", prox=lambda p, s: {"w": soft_threshold(p["w"], 2 * 0.5 * s)})  # by 2t
    with pytest.raises(AssertionError, match=r"prox"):
        check_penalty(wrong, {"w": torch.zeros(4, dtype=F64)}, max_examples=50)
    right = fr.penalty(l1, name="myl1", prox=lambda p, s: {"w": soft_threshold(p["w"], 0.5 * s)})
    check_penalty(right, {"w": torch.zeros(4, dtype=F64)}, max_examples=N)
    # a smooth penalty with the prox of another coefficient
    def sq(p):
        return 0.5 * (p["w"] ** 2).sum()

    wrong_l2 = fr.penalty(sq, name="sq", prox=lambda p, s: {"w": p["w"] / (1 + 2 * s)})
    with pytest.raises(AssertionError, match=r"prox"):
        check_penalty(wrong_l2, {"w": torch.zeros(4, dtype=F64)}, max_examples=50)


def test_check_penalty_catches_an_infeasible_projection(no_shrink):
    wrong = fr.penalty(
        lambda p: torch.where((p["w"] < 0).any(), torch.tensor(float("inf"), dtype=F64), torch.tensor(0.0, dtype=F64)),
        name="nonneg",
        prox=lambda p, s: {"w": p["w"]},  # does not project
    )
    with pytest.raises(AssertionError):
        check_penalty(wrong, {"w": torch.zeros(4, dtype=F64)}, max_examples=50)


# regression test: the library once failed this
def test_check_penalty_on_overlapping_sum(no_shrink):
    check_penalty(fr.l2(0.1) + fr.l1(0.2), TEMPLATE, max_examples=5)


def test_check_penalty_rejects_non_penalties():
    with pytest.raises(TypeError, match="penalty"):
        check_penalty(lambda p: p["w"].sum())


@pytest.mark.parametrize(
    "name, optimizer, lr",
    [
        ("l2", lambda: fr.sgd(0.05), 0.05),
        ("l1", lambda: fr.sgd(0.05), 0.05),
        ("group_lasso", lambda: fr.sgd(0.05), 0.05),
        ("anchor_ewc", lambda: fr.sgd(0.05), 0.05),
        ("elastic_net", lambda: fr.adam(0.01), None),
        ("lp3", lambda: fr.sgd(0.05, momentum=0.9, nesterov=True), None),
        ("sum", lambda: fr.adamw(0.01), None),
        ("masked_custom", lambda: fr.sgd(0.05, momentum=0.9), None),
    ],
)
def test_check_forms_agree_passes(name, optimizer, lr):
    check_forms_agree(BUILTINS[name](), optimizer(), TEMPLATE, learning_rate=lr, max_examples=8)


def test_check_forms_agree_generic_trees():
    check_forms_agree(fr.l2(0.1), fr.sgd(0.05), learning_rate=0.05, max_examples=8)
    check_forms_agree(fr.elastic_net(0.01, 0.1), fr.adam(0.01), max_examples=8)


@pytest.mark.parametrize("optimizer", [lambda: fr.sgd(0.05, momentum=0.9), lambda: fr.adam(0.05)], ids=["momentum", "adam"])
def test_check_forms_agree_raises_for_decoupled_with_momentum_or_adam(optimizer, no_shrink):
    with pytest.raises(AssertionError, match="decoupled"):
        check_forms_agree(fr.l2(0.5), optimizer(), {"w": torch.zeros(3, dtype=F64)}, learning_rate=0.05, max_examples=20)


def test_check_forms_agree_catches_a_wrong_gradient(no_shrink):
    wrong = fr.penalty(lambda p: (p["w"] ** 2).sum(), name="sq", grad=lambda p: {"w": p["w"]})
    with pytest.raises(AssertionError, match="coupled"):
        check_forms_agree(wrong, fr.sgd(0.1), {"w": torch.zeros(3, dtype=F64)}, max_examples=20)


def test_check_forms_agree_rejects_bad_arguments():
    with pytest.raises(TypeError, match="penalty"):
        check_forms_agree(0.1, fr.sgd(0.1))
    with pytest.raises(TypeError, match="GradientTransformation"):
        check_forms_agree(fr.l2(0.1), torch.optim.SGD)


def test_check_penalty_without_shrinking_still_catches_a_wrong_gradient():
    wrong = fr.penalty(lambda p: (p["w"] ** 2).sum(), grad=lambda p: {"w": p["w"]})  # the gradient is 2w
    with pytest.raises(AssertionError, match="P.grad"):
        check_penalty(wrong, {"w": torch.ones(3, dtype=torch.float64)}, max_examples=20, shrink=False)
