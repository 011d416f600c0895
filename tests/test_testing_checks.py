"""funcreg.testing: check_penalty and check_forms_agree pass for correct penalties and catch wrong ones."""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, settings
from hypothesis import strategies as st

import funcreg as fr
from funcreg.testing import check_forms_agree, check_penalty, tensors

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

    check_penalty/check_forms_agree build their settings at call time on top of the loaded profile
    and keep its phases (dropping shrink only when ``shrink=False``), so a profile without the shrink
    phase turns shrinking off; the profile's parent is the loaded one (dev, ci or thorough), so
    ``derandomize`` and ``print_blob`` carry over. The previous profile is restored afterwards.
    """
    previous = settings.get_current_profile_name()
    settings.register_profile(
        "funcreg-tests-no-shrink",
        parent=settings.get_profile(previous),
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
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
    "sum": lambda: (
        fr.l2(0.1, mask={"w": False, "k": True, "b": False, "s": True})
        + 2.0 * fr.l1(0.2, mask={"w": True, "k": False, "b": True, "s": False})
    ),
    "masked_custom": lambda: fr.penalty(
        lambda q: (q["w"] ** 4).sum(), name="quartic", mask={"w": True, "k": False, "b": False, "s": False}
    ),
}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_check_penalty_passes_for_builtins(name):
    check_penalty(BUILTINS[name](), TEMPLATE, max_examples=N)


@pytest.mark.parametrize("name", ["l2", "l1", "elastic_net", "lp3", "non_negative"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_check_penalty_passes_on_generic_trees(name, dtype):
    check_penalty(
        BUILTINS[name](),
        dtype=dtype,
        max_examples=N,
        atol=1e-5 if dtype == torch.float32 else 1e-6,
        rtol=1e-4 if dtype == torch.float32 else 1e-5,
    )


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
        lambda p: torch.where(
            (p["w"] < 0).any(), torch.tensor(float("inf"), dtype=F64), torch.tensor(0.0, dtype=F64)
        ),
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
        ("l1", lambda: fr.adam(0.01), None),
        ("elastic_net", lambda: fr.sgd(0.05), 0.05),
        ("group_lasso", lambda: fr.sgd(0.05), 0.05),
        ("group_lasso", lambda: fr.adam(0.01), None),
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


@pytest.mark.parametrize(
    "optimizer", [lambda: fr.sgd(0.05, momentum=0.9), lambda: fr.adam(0.05)], ids=["momentum", "adam"]
)
def test_check_forms_agree_raises_for_decoupled_with_momentum_or_adam(optimizer, no_shrink):
    with pytest.raises(AssertionError, match="decoupled"):
        check_forms_agree(
            fr.l2(0.5), optimizer(), {"w": torch.zeros(3, dtype=F64)}, learning_rate=0.05, max_examples=20
        )


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


# --- kinks: sound where the subgradient is ambiguous, strict everywhere else -------------------------

C = 0.3


def with_zeros(n: int = 6, max_abs: float = 2.0):
    """Vectors ``{"w": ...}`` with at least one exact zero (a kink of |w|) and values elsewhere."""

    @st.composite
    def trees(draw):
        values = draw(tensors((n,), dtype=F64, max_abs=max_abs)).numpy().copy()
        zeros = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n))
        values[zeros] = 0.0
        return {"w": torch.from_numpy(values)}

    return trees()


def where_abs(p):
    """``C * sum |w|`` written so that autograd's subgradient at 0 is +C (``where`` takes the w branch)."""
    return C * torch.where(p["w"] >= 0, p["w"], -p["w"]).sum()


def sign_grad(p):
    return {"w": C * torch.sign(p["w"])}  # a valid subgradient everywhere: 0 at the kink


def near_zero(n: int = 6):
    """Vectors ``{"w": ...}`` with every element within 1e-12 of the kink at 0 (Hypothesis often draws exact 0)."""
    return st.builds(lambda w: {"w": w}, tensors((n,), dtype=F64, max_abs=1e-12))


def test_kinked_penalty_precondition():
    """Autograd and the closed form really do pick different subgradients at the kink (so the
    tests below would fail under an exact gradient comparison), and the same one away from it."""
    zero = {"w": torch.zeros(3, dtype=F64)}
    assert torch.equal(torch.func.grad(where_abs)(zero)["w"], torch.full((3,), C, dtype=F64))
    assert torch.equal(sign_grad(zero)["w"], torch.zeros(3, dtype=F64))
    w = {"w": torch.tensor([-2.0, -1e-300, 1e-300, 3.0], dtype=F64)}
    torch.testing.assert_close(torch.func.grad(where_abs)(w)["w"], sign_grad(w)["w"], atol=0, rtol=0)


def test_check_penalty_accepts_any_subgradient_at_a_kink():
    check_penalty(fr.penalty(where_abs, name="where_abs", grad=sign_grad), with_zeros(), max_examples=N)


def test_check_penalty_catches_a_wrong_subgradient_away_from_kinks(no_shrink):
    # right at w > 0 and at the kink (C is in [-C, C]), wrong (0 instead of -C) at every w < 0
    wrong = fr.penalty(where_abs, name="half", grad=lambda p: {"w": C * (p["w"] >= 0).to(p["w"].dtype)})
    with pytest.raises(AssertionError, match=r"P\.grad"):
        check_penalty(wrong, with_zeros(), max_examples=50)


def test_check_penalty_catches_a_wrong_scale_near_zero(no_shrink):
    # 2 * C * sign(w) is not in [-C, C]: wrong even within rounding of the kink
    wrong = fr.penalty(where_abs, name="double", grad=lambda p: {"w": 2 * C * torch.sign(p["w"])})
    with pytest.raises(AssertionError, match=r"P\.grad"):
        check_penalty(wrong, near_zero(), max_examples=50)
    # the right scale passes on the same points, so it is the scale that is caught
    check_penalty(fr.penalty(where_abs, name="right", grad=sign_grad), near_zero(), max_examples=N)


@pytest.mark.parametrize(
    "optimizer, lr", [(lambda: fr.sgd(0.05), 0.05), (lambda: fr.adam(0.01), None)], ids=["sgd", "adam"]
)
def test_check_forms_agree_accepts_any_subgradient_at_a_kink(optimizer, lr):
    check_forms_agree(
        fr.penalty(where_abs, name="where_abs", grad=sign_grad),
        optimizer(),
        with_zeros(),
        learning_rate=lr,
        max_examples=8,
    )


@pytest.mark.parametrize(
    "optimizer, lr", [(lambda: fr.sgd(0.05), 0.05), (lambda: fr.adam(0.01), None)], ids=["sgd", "adam"]
)
def test_check_forms_agree_catches_a_wrong_subgradient_away_from_kinks(optimizer, lr, no_shrink):
    wrong = fr.penalty(where_abs, name="half", grad=lambda p: {"w": C * (p["w"] >= 0).to(p["w"].dtype)})
    with pytest.raises(AssertionError, match="coupled form vs loss-term form"):
        check_forms_agree(wrong, optimizer(), with_zeros(), learning_rate=lr, max_examples=20)


@pytest.mark.parametrize(
    "optimizer, lr", [(lambda: fr.sgd(0.05), 0.05), (lambda: fr.adam(0.01), None)], ids=["sgd", "adam"]
)
def test_check_forms_agree_catches_a_wrong_scale_near_zero(optimizer, lr, no_shrink):
    wrong = fr.penalty(where_abs, name="double", grad=lambda p: {"w": 2 * C * torch.sign(p["w"])})
    with pytest.raises(AssertionError, match="coupled form vs loss-term form"):
        check_forms_agree(wrong, optimizer(), near_zero(), learning_rate=lr, max_examples=20)
    check_forms_agree(
        fr.penalty(where_abs, name="right", grad=sign_grad),
        optimizer(),
        near_zero(),
        learning_rate=lr,
        max_examples=8,
    )


def test_check_forms_agree_catches_a_wrong_l1_scale_on_builtin_shapes(no_shrink):
    """The built-in L1's value with a closed form twice too large, on the shapes of the passing tests."""

    def value(p):
        return C * sum(w.abs().sum() for w in p.values())

    wrong = fr.penalty(
        value, name="double_l1", grad=lambda p: {k: 2 * C * torch.sign(w) for k, w in p.items()}
    )
    with pytest.raises(AssertionError, match="coupled form vs loss-term form"):
        check_forms_agree(wrong, fr.sgd(0.05), TEMPLATE, learning_rate=0.05, max_examples=20)


ONE_PLUS = 1.0 + 2 * torch.finfo(F64).eps  # 1 to two ulps: a rounding-level error in a gradient


def linear_rounded():
    """``sum(w)``, with a closed-form gradient two ulps above the true 1 (rounding, not a bug)."""
    return fr.penalty(
        lambda p: p["w"].sum(), name="linear", grad=lambda p: {"w": torch.full_like(p["w"], ONE_PLUS)}
    )


def test_adam_amplifies_a_rounding_level_gradient_difference():
    """Precondition of the test below: where the data gradient cancels the penalty's (g = -1), Adam's
    first step ``-lr * m / (sqrt(v) + eps)`` turns the two ulps into more than the check's atol."""
    lr, eps = 0.01, 1e-8
    p = {"w": torch.zeros(1, dtype=F64)}
    tx = fr.adam(lr, eps=eps)
    exact, _ = tx.update({"w": torch.full((1,), -1.0 + 1.0, dtype=F64)}, tx.init(p), p)
    rounded, _ = tx.update({"w": torch.full((1,), -1.0 + ONE_PLUS, dtype=F64)}, tx.init(p), p)
    delta = -1.0 + ONE_PLUS  # bias-corrected m = delta, v = delta**2 at step 1
    assert float(exact["w"]) == 0.0
    torch.testing.assert_close(
        rounded["w"], torch.full((1,), -lr * delta / (abs(delta) + eps), dtype=F64), atol=1e-18, rtol=1e-9
    )
    assert abs(float(rounded["w"])) > 1e-10  # check_forms_agree's default atol


def test_check_forms_agree_compares_gradients_before_the_optimizer():
    """A two-ulp gradient difference passes (it is within atol), though Adam amplifies it past atol
    in the parameters when a drawn data gradient of -1 cancels it; a 1e-6 error still fails."""
    tiny = st.builds(lambda w: {"w": w}, tensors((6,), dtype=F64, max_abs=1e-6))
    check_forms_agree(linear_rounded(), fr.adam(0.01), tiny, max_examples=15)
    off = fr.penalty(
        lambda p: p["w"].sum(), name="linear", grad=lambda p: {"w": torch.full_like(p["w"], 1.0 + 1e-6)}
    )
    with pytest.raises(AssertionError, match="coupled form vs loss-term form"):
        check_forms_agree(off, fr.adam(0.01), tiny, max_examples=15, shrink=False)


# --- Hypothesis settings: the checks inherit the loaded profile -------------------------------------


def recorder():
    """A correct smooth penalty that records every ``w`` its closed-form gradient is read at."""
    seen = []

    def grad(p):
        seen.append(p["w"].numpy().tobytes())
        return {"w": 2 * p["w"]}

    return fr.penalty(lambda p: (p["w"] ** 2).sum(), name="sq", grad=grad), seen


def draws_under(profile_kwargs, **check_kwargs):
    previous = settings.get_current_profile_name()
    settings.register_profile("funcreg-tests-probe", parent=settings.get_profile(previous), **profile_kwargs)
    settings.load_profile("funcreg-tests-probe")
    try:
        penalty, seen = recorder()
        check_penalty(penalty, {"w": torch.zeros(3, dtype=F64)}, max_examples=10, **check_kwargs)
        return seen
    finally:
        settings.load_profile(previous)


def test_checks_inherit_derandomize_from_the_profile():
    # database=None as in the ci profile; the checks' own database=None must not clash with it
    first = draws_under({"derandomize": True, "database": None})
    assert first == draws_under({"derandomize": True, "database": None})
    # not derandomized, the seed is random (or pytest's --hypothesis-seed), not derived from the
    # check: the draws differ, so the equality above comes from derandomize
    assert draws_under({"derandomize": False}) != first


def test_seed_replays_a_search():
    assert draws_under({"derandomize": False}, seed=7) == draws_under({"derandomize": False}, seed=7)
    assert draws_under({"derandomize": False}, seed=7) != draws_under({"derandomize": False}, seed=8)


def failure_under_random_profile(**check_kwargs):
    """The AssertionError of a wrong gradient under a random profile with ``print_blob``."""
    wrong = fr.penalty(lambda p: (p["w"] ** 2).sum(), name="sq", grad=lambda p: {"w": p["w"]})
    previous = settings.get_current_profile_name()
    settings.register_profile(
        "funcreg-tests-blob", parent=settings.get_profile(previous), derandomize=False, print_blob=True
    )
    settings.load_profile("funcreg-tests-blob")
    try:
        with pytest.raises(AssertionError) as failure:
            check_penalty(wrong, {"w": torch.zeros(3, dtype=F64)}, max_examples=20, **check_kwargs)
        return failure.value
    finally:
        settings.load_profile(previous)


def drawn(err):
    return [n for n in err.__notes__ if n.startswith("Draw ")]


def noted_seed(err):
    seeds = [
        int(n.rsplit("seed=", 1)[1].split(" ")[0])
        for n in err.__notes__
        if "replay this search by passing seed=" in n
    ]
    assert len(seeds) <= 1
    return seeds[0] if seeds else None


def test_a_failure_prints_its_reproduction(no_shrink):
    err = failure_under_random_profile(seed=12345)
    assert "@reproduce_failure(" in "\n".join(err.__notes__)  # print_blob is inherited
    assert noted_seed(err) == 12345
    assert drawn(err) and drawn(err) == drawn(failure_under_random_profile(seed=12345))


def test_a_failure_notes_the_seed_hypothesis_drew(no_shrink):
    err = failure_under_random_profile()
    seed = noted_seed(err)
    if seed is None:
        # no seed of its own: pytest's --hypothesis-seed seeded it, and the same run reproduces it
        assert drawn(err) == drawn(failure_under_random_profile())
    else:
        assert drawn(err) and drawn(err) == drawn(failure_under_random_profile(seed=seed))


def test_no_shrink_fixture_turns_shrinking_off(no_shrink):
    failing = []

    def grad(p):
        if bool((p["w"] != 0).any()):
            failing.append(p["w"].clone())  # every call with w != 0 fails: grad is w, not 2w
        return {"w": p["w"]}

    wrong = fr.penalty(lambda p: (p["w"] ** 2).sum(), name="sq", grad=grad)
    with pytest.raises(AssertionError):
        check_penalty(wrong, {"w": torch.zeros(3, dtype=F64)}, max_examples=50)
    assert 1 <= len(failing) <= 2, (
        f"{len(failing)} failing calls: the check shrank"
    )  # the first, and its replay


def test_shrink_is_on_without_the_fixture():
    """The counterpart of the test above: outside the fixture the same check shrinks (many failing calls)."""
    failing = []

    def grad(p):
        if bool((p["w"] != 0).any()):
            failing.append(p["w"].clone())
        return {"w": p["w"]}

    wrong = fr.penalty(lambda p: (p["w"] ** 2).sum(), name="sq", grad=grad)
    if Phase.shrink not in settings.default.phases:
        pytest.skip("the loaded profile does not shrink")
    with pytest.raises(AssertionError):
        check_penalty(wrong, {"w": torch.zeros(1, dtype=F64)}, max_examples=50)
    assert len(failing) > 2
