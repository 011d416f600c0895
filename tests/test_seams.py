"""Seams: a sum's prox with quadratic terms folded in, and penalties over param groups.

Expected values are derived here: closed forms written in NumPy float64 (soft thresholding, group
shrinkage, the weighted mean of a quadratic's centers), and the prox's own objective
``1/2 |z - v|^2 + t P(z)``, which the result must not exceed at perturbed points.
Tolerances: float64, ``atol=1e-12, rtol=1e-10``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

import funcreg as fr
from funcreg._src.core.errors import SelectionError

PROPERTY = settings(
    deadline=None, max_examples=25, database=None, suppress_health_check=[HealthCheck.too_slow]
)
TOL = {"atol": 1e-12, "rtol": 1e-10}


def _values(shape):
    # |v| <= 4, away from nothing in particular: every closed form below is exact on both sides of a kink
    return arrays(np.float64, shape, elements=st.floats(-4.0, 4.0, allow_nan=False, width=64))


coefficients = st.floats(0.0, 2.0, allow_nan=False, width=64)
steps = st.floats(0.0, 1.5, allow_nan=False, width=64)


def _soft(x: np.ndarray, t: float) -> np.ndarray:
    return np.sign(x) * np.maximum(np.abs(x) - t, 0.0)


@PROPERTY
@given(v=_values((3, 4)), a=coefficients, c=coefficients, d=coefficients, t=steps)
def test_l1_plus_quadratics_folds_into_soft_thresholding(v, a, c, d, t):
    # P = a|w|_1 + c/2 |w|^2 + d/2 |w - r|^2: the prox soft-thresholds the pulled point by t a / (1 + T)
    r = np.linspace(-1.0, 1.0, v.size).reshape(v.shape)
    P = fr.l1(a) + fr.l2(c) + fr.anchor(d, {"w": torch.from_numpy(r)})
    z = P.prox({"w": torch.from_numpy(v)}, step=t)["w"]
    T = t * (c + d)
    expected = _soft((v + t * d * r) / (1 + T), t * a / (1 + T))
    torch.testing.assert_close(z, torch.from_numpy(expected), **TOL)


@PROPERTY
@given(v=_values((3, 4)), a=coefficients, c=coefficients, t=steps, scale=st.floats(0.25, 4.0, width=64))
def test_group_lasso_plus_scaled_l2_folds_into_group_shrinkage(v, a, c, t, scale):
    P = fr.group_lasso(a, axis=0) + scale * fr.l2(c)
    z = P.prox({"w": torch.from_numpy(v), "b": torch.from_numpy(v[0])}, step=t)
    T = t * scale * c
    m = v / (1 + T)
    norms = np.sqrt((m * m).sum(axis=1, keepdims=True))
    threshold = t * a * math.sqrt(v.shape[1]) / (1 + T)
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(norms > 0, np.maximum(1 - threshold / norms, 0.0), 0.0)
    torch.testing.assert_close(z["w"], torch.from_numpy(m * factor), **TOL)
    # the bias: group lasso selects matrices only, so only the quadratic acts there
    torch.testing.assert_close(z["b"], torch.from_numpy(v[0] / (1 + T)), **TOL)


@PROPERTY
@given(
    v=_values((5,)),
    a=st.floats(0.1, 2.0, width=64),
    c=st.floats(0.1, 2.0, width=64),
    t=st.floats(0.1, 1.5, width=64),
)
def test_folded_prox_minimizes_its_objective(v, a, c, t):
    """The result is the argmin: no perturbed point has a lower ``1/2 |z - v|^2 + t P(z)``."""
    P = fr.l1(a) + fr.l2(c)
    vt = torch.from_numpy(v)
    z = P.prox({"w": vt}, step=t)["w"]

    def objective(x: torch.Tensor) -> float:
        return float(0.5 * ((x - vt) ** 2).sum() + t * P({"w": x}))

    best = objective(z)
    for i in range(v.size):
        for eps in (1e-4, -1e-4):
            moved = z.clone()
            moved[i] += eps
            assert objective(moved) >= best - 1e-12


def test_quadratics_alone_fold_to_a_weighted_mean_of_centers():
    v = torch.tensor([4.0, -2.0], dtype=torch.float64)
    r = torch.tensor([1.0, 1.0], dtype=torch.float64)
    z = (fr.l2(1.0) + fr.anchor(3.0, {"w": r})).prox({"w": v}, step=0.5)["w"]
    # (v + t * 3 r) / (1 + t (1 + 3)) with t = 0.5
    torch.testing.assert_close(z, torch.tensor([5.5 / 3.0, -0.5 / 3.0], dtype=torch.float64), **TOL)


def test_two_non_quadratic_terms_on_one_parameter_are_refused_by_name():
    p = {"w": torch.ones(2, 2)}
    with pytest.raises(NotImplementedError, match=r"'l1' and 'group_lasso' both select 'w'"):
        (fr.l1(0.1) + fr.group_lasso(0.1)).prox(p, step=0.1)
    with pytest.raises(NotImplementedError, match=r"'l1' and 'l1_2' both select 'w'"):
        fr.proximal(fr.l1(0.1) + fr.l1(0.2), learning_rate=0.1).init(p)
    # an elementwise precision is a quadratic with a tensor curvature: it does not fold into a step size
    anchor = fr.anchor(0.1, {"w": torch.zeros(2, 2)}, precision={"w": torch.ones(2, 2)})
    with pytest.raises(NotImplementedError, match="elementwise precision"):
        (fr.l1(0.1) + anchor).prox(p, step=0.1)
    # alone, or beside another quadratic, it has its closed form
    (fr.l2(0.1) + anchor).prox(p, step=0.1)


def test_create_optimizer_proximal_l1_with_weight_decay_is_the_elastic_net_prox():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    init = {n: w.detach().clone() for n, w in model.named_parameters()}
    opt = fr.create_optimizer(model, "sgd", lr=0.1, weight_decay=0.3, penalty=fr.l1(0.2), form="proximal")
    x = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)
    model(x).square().mean().backward()
    grads = {n: w.grad.detach().clone() for n, w in model.named_parameters()}
    opt.step()
    for n, w in model.named_parameters():
        v = (init[n] - 0.1 * grads[n]).numpy()
        decay = 0.3 if n == "weight" else 0.0  # create_optimizer's default: no decay on biases
        expected = _soft(v / (1 + 0.1 * decay), 0.1 * 0.2 / (1 + 0.1 * decay))
        torch.testing.assert_close(w.detach(), torch.from_numpy(expected), **TOL)


# --- penalties over param groups -------------------------------------------------------------------


def test_a_mask_inside_one_param_group_leaves_the_other_group_alone():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)).double()
    init = {n: w.detach().clone() for n, w in model.named_parameters()}
    named = dict(model.named_parameters())
    groups = [
        {"params": [named["0.weight"], named["0.bias"]], "lr": 0.1},
        {"params": [named["1.weight"], named["1.bias"]], "lr": 0.05},
    ]
    penalty = fr.l2(0.5, mask=fr.by_name("0.weight"))
    # plain tensors, as HF Trainer and timm hand them: names_from= names them, so the mask by name matches
    opt = fr.TorchOptimizer(
        groups, lambda lr: fr.chain(fr.add_penalty_grad(penalty), fr.sgd(lr)), names_from=model
    )
    assert opt.param_groups[1]["param_names"] == ["1.weight", "1.bias"]
    for w in model.parameters():
        w.grad = torch.ones_like(w)
    opt.step()
    for n, w in model.named_parameters():
        lr = 0.1 if n.startswith("0.") else 0.05
        decay = 0.5 * init[n] if n == "0.weight" else 0.0
        torch.testing.assert_close(w.detach(), init[n] - lr * (1.0 + decay), **TOL)


def test_a_mask_matching_no_parameter_of_the_model_still_raises():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    named = dict(model.named_parameters())
    groups = [
        {"params": [named["0.weight"], named["0.bias"]]},
        {"params": [named["1.weight"], named["1.bias"]]},
    ]
    penalty = fr.l2(0.5, mask={n: False for n in named})
    with pytest.raises(SelectionError, match="'l2' selects no parameter"):  # at construction, not at a step
        fr.TorchOptimizer(
            groups, lambda lr: fr.chain(fr.add_penalty_grad(penalty), fr.sgd(lr)), lr=0.1, names_from=model
        )


def test_names_from_names_unnamed_parameters_and_refuses_a_stranger():
    model = nn.Linear(2, 1)
    stranger = nn.Parameter(torch.ones(3))
    with pytest.raises(
        ValueError, match=r"param group 0: parameter 2 \(shape \(3,\)\) is not a parameter of the module"
    ):
        fr.TorchOptimizer([model.weight, model.bias, stranger], "sgd", lr=0.1, names_from=model)
    with pytest.raises(TypeError, match="names_from must be a torch.nn.Module"):
        fr.TorchOptimizer(model.parameters(), "sgd", lr=0.1, names_from=dict(model.named_parameters()))
    opt = fr.TorchOptimizer(model.parameters(), "sgd", lr=0.1, names_from=model)
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]


def test_a_penalty_over_absent_leaves_only_is_zero():
    # None leaves are parameters absent from this call (another group's): selecting only them is no error
    p = {"w": None, "b": torch.ones(2, dtype=torch.float64)}
    P = fr.l2(1.0, mask=fr.by_name("w"))
    assert float(P(p)) == 0.0
    assert P.grad(p)["b"] is None or torch.equal(P.grad(p)["b"], torch.zeros(2, dtype=torch.float64))
    mine = fr.penalty(lambda q: q["w"].sum(), name="mine", mask=fr.by_name("w"))
    assert float(mine(p)) == 0.0


# --- entry points: factories, names, decay sets --------------------------------------------------


def test_a_factory_taking_learning_rate_is_driven_by_torchs_schedulers():
    """``TorchOptimizer(params, fr.adamw, learning_rate=...)``: the groups say ``lr``, StepLR drives it,
    and the trajectory is torch.optim.AdamW's under the same schedule."""
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    grads = [torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64) * (k + 1) for k in range(4)]
    ours, theirs = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt = fr.TorchOptimizer([("w", ours)], fr.adamw, learning_rate=0.1, weight_decay=0.5)
    ref = torch.optim.AdamW([theirs], lr=0.1, weight_decay=0.5)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, ref)]
    for g in grads:
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for s in scheds:
            s.step()
    assert opt.param_groups[0]["lr"] == 0.1 * 0.5**4
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-12, rtol=1e-10)
    with pytest.raises(TypeError, match="lr= or learning_rate="):
        fr.TorchOptimizer([("w", ours)], fr.adamw, lr=0.1, learning_rate=0.1)


def test_print_says_which_decay_rule_each_entry_applies():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    by_name = fr.TorchOptimizer(model.named_parameters(), "adamw", lr=0.1, weight_decay=0.1)
    assert "decay: torch's rule" in str(by_name)
    assert [g["weight_decay"] for g in by_name.param_groups] == [0.1]  # biases and norms too
    created = fr.create_optimizer(model, "adamw", lr=0.1, weight_decay=0.1)
    assert "decay: 1 of 4 parameters" in str(created)


def test_a_group_added_later_follows_torchs_rule():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    opt = fr.create_optimizer(model[0], "adamw", lr=0.1, weight_decay=0.1)
    opt.add_param_group({"params": list(model[1].named_parameters(prefix="1"))})
    assert opt.param_groups[-1]["weight_decay"] == 0.1  # the default, for its bias too
    w = model[1].bias
    before = w.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    # zero gradient: AdamW moves the bias by its decoupled decay alone, lr * wd * w
    torch.testing.assert_close(w.detach(), before * (1 - 0.1 * 0.1), atol=1e-7, rtol=1e-6)


# --- validation at the seams ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [3, "x", 2.5], ids=["int", "str", "float"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: fr.adam(0.1),
        lambda: fr.sgd(0.1),
        lambda: fr.chain(fr.clip_by_global_norm(1.0), fr.adafactor(0.1)),
    ],
    ids=["adam", "sgd", "chain"],
)
def test_every_init_refuses_a_parameter_that_is_not_a_tensor(make, bad):
    with pytest.raises(fr.LeafTypeError, match=r"parameter 'b' is .* expected a tensor"):
        make().init({"w": torch.ones(2), "b": bad})


def test_sparse_gradients_get_a_named_error_everywhere():
    emb = nn.Embedding(5, 2, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    for name in ("sgd", "adam", "adamw"):
        opt = fr.TorchOptimizer(emb.named_parameters(), name, lr=0.1)
        with pytest.raises(fr.LeafTypeError, match=r"'weight' is a torch.sparse_coo tensor.*to_dense"):
            opt.step()
    p = {"w": emb.weight.detach().clone()}
    tx = fr.adam(0.1)
    with pytest.raises(fr.LeafTypeError, match=r"'w' is a torch.sparse_coo tensor"):
        tx.update({"w": emb.weight.grad}, tx.init(p), p)


def test_uninitialized_lazy_parameters_are_named():
    lazy = nn.Sequential(nn.LazyLinear(2))
    for build in (
        lambda: fr.params_of(lazy),
        lambda: fr.decay_mask(lazy),
        lambda: fr.create_optimizer(lazy, "adamw", lr=0.1),
        lambda: fr.TorchOptimizer(lazy.named_parameters(), "adamw", lr=0.1),
    ):
        with pytest.raises(ValueError, match=r"parameter '0.weight' is uninitialized .*forward pass"):
            build()
    lazy(torch.ones(1, 3))  # the dry run gives the shapes: everything works
    fr.create_optimizer(lazy, "adamw", lr=0.1)


def test_coefficients_of_none_are_refused_when_built():
    with pytest.raises(TypeError, match=r"coeff value: None"):
        fr.l2(None)
    with pytest.raises(TypeError, match=r"coeff value at 'b': None"):
        fr.l1({"w": 0.1, "b": None})


def _regression():
    x = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    y = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    return x, y, lambda p, x, y: ((x @ p["w"] - y) ** 2).mean()


def test_a_hypergradient_of_a_metric_outside_autograd_is_refused():
    x, y, loss = _regression()
    step = fr.make_step(loss, fr.sgd(0.1), penalty=lambda h: fr.l2(h["coeff"]))
    p = {"w": torch.zeros(1, dtype=torch.float64)}
    batches = [(x, y)] * 3
    through_item = lambda q: torch.tensor(loss(q, x, y).item(), dtype=torch.float64)  # noqa: E731
    with pytest.raises(ValueError, match=r"val_loss does not depend on the coefficient"):
        fr.hypergradient(step, p, 0.1, batches, through_item, steps=3)
    unused = fr.make_step(loss, fr.sgd(0.1))  # the step never reads hparams['coeff']
    with pytest.raises(ValueError, match=r"hparams\['coeff'\]"):
        fr.hypergradient(unused, p, 0.1, batches, lambda q: loss(q, x, y), steps=3)
    objective = lambda q, c: loss(q, x, y) + c * (q["w"] ** 2).sum()  # noqa: E731
    with pytest.raises(ValueError, match=r"val_loss does not depend on the parameters"):
        fr.implicit_hypergradient(
            objective, {"w": torch.tensor([1.0], dtype=torch.float64)}, 0.1, through_item
        )
    # the same metric through torch operations: a finite, nonzero hypergradient (finite differences)
    h = fr.hypergradient(step, p, 0.1, batches, lambda q: loss(q, x, y), steps=3)

    def final_loss(c: float) -> float:
        q = {"w": torch.zeros(1, dtype=torch.float64)}
        for _ in range(3):
            g = torch.func.grad(lambda v: loss(v, x, y) + c / 2 * (v["w"] ** 2).sum())(q)
            q = {"w": q["w"] - 0.1 * g["w"]}
        return float(loss(q, x, y))

    fd = (final_loss(0.1 + 1e-6) - final_loss(0.1 - 1e-6)) / 2e-6
    assert abs(float(h.grad) - fd) <= 1e-6 + 1e-5 * abs(fd) and fd != 0


def test_prune_of_one_module_used_twice_stays_exact():
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    with torch.no_grad():
        shared.weight[0].zero_()
        shared.bias[0] = 0.0
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.linspace(-1, 1, 12).reshape(4, 3)
    small = fr.prune(model)
    torch.testing.assert_close(small(x), model(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("where", ["data_x", "data_y", "validation_y"])
def test_regularization_path_refuses_non_finite_data_naming_the_array(where):
    gen = np.random.default_rng(0)
    x, y = gen.normal(size=(10, 3)), gen.normal(size=10)
    xv, yv = gen.normal(size=(5, 3)), gen.normal(size=5)
    target = {"data_x": x, "data_y": y, "validation_y": yv}[where]
    target[1] = np.nan if where != "validation_y" else np.inf
    expected = {"data_x": r"data\[0\]", "data_y": r"data\[1\]", "validation_y": r"validation\[1\]"}[where]
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    with pytest.raises(ValueError, match=expected + r" has non-finite entries .* at row 1"):
        fr.regularization_path(
            lambda p, x, y: (x @ p["w"] - y) ** 2,
            fr.sgd(0.1),
            {"w": torch.zeros(3, dtype=torch.float64)},
            (t(x), t(y)),
            [0.1, 0.2],
            steps=2,
            penalty=lambda h: fr.l2(h["coeff"]),
            validation=(t(xv), t(yv)),
        )


def test_regularization_path_names_data_whose_arrays_disagree_on_the_number_of_examples():
    gen = np.random.default_rng(1)
    x, y = torch.from_numpy(gen.normal(size=(10, 3))), torch.from_numpy(gen.normal(size=9))
    with pytest.raises(ValueError, match=r"data\[1\] has 9 examples, data\[0\] has 10"):
        fr.regularization_path(
            lambda p, x, y: (x @ p["w"] - y) ** 2,
            fr.sgd(0.1),
            {"w": torch.zeros(3, dtype=torch.float64)},
            (x, y),
            [0.1, 0.2],
            steps=2,
            penalty=lambda h: fr.l2(h["coeff"]),
            folds=2,
        )
