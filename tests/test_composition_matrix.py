"""The composition matrix: every penalty in every form, with every selection, on every entry point.

One parametrized test crosses

* the penalty kind: ``l2``, ``l1``, ``elastic_net``, ``group_lasso``, ``anchor`` (L2-SP), and the
  non-convex ``mcp`` and ``scad`` (their proximal references: firm and Fan & Li thresholding);
* the form: ``loss``, ``coupled``, ``decoupled``, ``proximal``;
* the selection: ``all`` (the penalty's own default), ``mask`` (a mask by name), ``groups`` (two
  parameter groups with their own learning rates, the penalty's mask selecting parameters of one
  group only);
* the base optimizer: SGD with momentum, Adam; and a column of ``fr.sgd(momentum=0.9, fused=True)``
  (torch's fused SGD kernel in the donated steps) on the donated entry points (see ``FUSED_CELLS``);
* the entry point and how it runs: the functional step (``fr.make_step``) ``pure``, ``donated``,
  ``compiled`` (pure and donated) and ``vmapped`` (``fr.ensemble_step``, one coefficient per member);
  ``fr.TorchOptimizer`` and ``fr.create_optimizer`` (with weight decay beside the penalty), eager and
  compiled.

Each cell trains a small float64 MLP for three steps and compares every parameter with a reference
written here from scratch: ``torch.optim.SGD``/``Adam`` on the data gradient, the penalty's value
written out as a formula and differentiated by autograd (the loss-term reference), and for the
proximal form the closed-form prox of the whole sum of terms on each parameter (quadratic terms fold
into ``v / (1 + t c)``, see below). The cells that do not exist are named refusals, listed in
``docs/guarantees.md`` ("Composition matrix") and checked here to raise or to be absent for a stated
reason (:data:`NOT_APPLICABLE`).

The compiled cells run under ``torch.compile(backend="eager")`` (Dynamo's tracing and guards, no
code generation: what differs between eager and compiled funcreg code is what Dynamo traces). Every
eager cell runs in CI; of the 672 compiled cells CI runs a pairwise cover (28 cells in which every
pair of values of any two dimensions meets), since each costs seconds of tracing;
``FUNCREG_MATRIX_FULL=1`` runs them all. ``FUNCREG_MATRIX_BACKEND=aot_eager`` (or ``inductor``)
reruns the compiled column through AOTAutograd or inductor.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import funcreg as fr

KINDS = ("l2", "l1", "elastic_net", "group_lasso", "anchor", "mcp", "scad")
MCP_GAMMA, SCAD_A = 3.0, 3.7  # the non-convex penalties' shape parameters (their defaults)
FORMS = ("loss", "coupled", "decoupled", "proximal")
SELECTIONS = ("all", "mask", "groups")
OPTIMIZERS = ("sgd", "adam")
RUNS = (
    ("functional", "pure"),
    ("functional", "donated"),
    ("functional", "compiled"),
    ("functional", "compiled_donated"),
    ("functional", "vmapped"),
    ("torch_optimizer", "eager"),
    ("torch_optimizer", "compiled"),
    ("create_optimizer", "eager"),
    ("create_optimizer", "compiled"),
)

# The cells that do not exist, each with the reason docs/guarantees.md gives (tested below).
NOT_APPLICABLE = {
    ("torch_optimizer", "pure"): "a torch.optim.Optimizer steps its parameters in place",
    ("torch_optimizer", "vmapped"): "an Optimizer steps one model; ensembles are fr.ensemble_step",
    ("create_optimizer", "pure"): "create_optimizer returns a TorchOptimizer",
    ("create_optimizer", "vmapped"): "create_optimizer returns a TorchOptimizer",
}

BACKEND = os.environ.get("FUNCREG_MATRIX_BACKEND", "eager")
STEPS = 3
LR = {"sgd": 0.1, "sgd_fused": 0.1, "adam": 0.02}
LR_B = {"sgd": 0.05, "sgd_fused": 0.05, "adam": 0.01}  # the second group's learning rate
PENALTY_STEP = 0.07  # s_t of the functional step's decoupled / proximal forms (make_step's learning_rate)
WEIGHT_DECAY = 0.03  # create_optimizer's weight decay, beside the penalty
MASKED = ("0.weight", "0.bias")  # the "mask" and "groups" selections: the first layer only
GROUP_A = ("0.weight", "0.bias")
COEFF = {
    "l2": 0.3,
    "l1": 0.02,
    "elastic_net": 0.02,
    "group_lasso": 0.05,
    "anchor": 0.4,
    "mcp": 0.1,  # gamma * coeff = 0.3: the small weights are in the concave part, the large ones past it
    "scad": 0.1,
}


# --- the model and the data -------------------------------------------------------------------------


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _init() -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in _model().named_parameters()}


def _draw_reference() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(1)
    return {n: torch.from_numpy(rng.normal(size=tuple(p.shape))) for n, p in _init().items()}


REFERENCE = _draw_reference()


def _reference_weights() -> dict[str, torch.Tensor]:
    """The anchor's reference: fixed weights drawn once (not the initial ones, so the penalty acts)."""
    return {n: w.clone() for n, w in REFERENCE.items()}


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(0)
    return [
        (torch.from_numpy(rng.normal(size=(8, 3))), torch.from_numpy(rng.normal(size=(8, 2))))
        for _ in range(STEPS)
    ]


MODEL = _model()


def data_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = torch.func.functional_call(MODEL, params, (x,))
    return ((out - y) ** 2).mean()


# --- the reference: penalties written out, torch.optim, closed-form proxes ---------------------------


@dataclass(frozen=True)
class Term:
    """One penalty term of the reference: its kind, coefficient, the names it applies to, its form."""

    kind: str
    coeff: float
    names: frozenset[str]
    form: str


def _selected(
    kind: str, selection: str, names: list[str], shapes: dict[str, tuple[int, ...]]
) -> frozenset[str]:
    chosen = [n for n in names if selection == "all" or n in MASKED]
    if kind == "group_lasso" and selection == "all":  # group lasso's default: tensors with ndim >= 2
        chosen = [n for n in chosen if len(shapes[n]) >= 2]
    return frozenset(chosen)


def _quadratic(term: Term, n: str, ref: dict[str, torch.Tensor]) -> tuple[float, Any] | None:
    """``(c, a)`` when the term is ``c/2 ||w - a||^2`` on ``n`` (``a`` 0 for L2), else ``None``."""
    if term.kind in ("l2", "weight_decay"):
        return term.coeff, 0.0
    if term.kind == "anchor":
        return term.coeff, ref[n]
    if term.kind == "elastic_net":
        return term.coeff / 2, 0.0  # its L2 part: l2 = coeff / 2 (see _penalty)
    return None


def _value(term: Term, w: torch.Tensor, n: str, ref: dict[str, torch.Tensor]) -> torch.Tensor:
    c = term.coeff
    if term.kind in ("l2", "weight_decay"):
        return c / 2 * (w * w).sum()
    if term.kind == "l1":
        return c * w.abs().sum()
    if term.kind == "elastic_net":
        return c * w.abs().sum() + (c / 2) / 2 * (w * w).sum()
    if term.kind == "group_lasso":  # rows (slices along axis 0), each weighted by sqrt(its size)
        return c * math.sqrt(w[0].numel()) * torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1).sum()
    if term.kind == "anchor":
        return c / 2 * ((w - ref[n]) ** 2).sum()
    a = w.abs()
    if term.kind == "mcp":  # Zhang (2010): c|w| - w^2 / (2 gamma) up to gamma c, then gamma c^2 / 2
        g = MCP_GAMMA
        return torch.where(a <= g * c, c * a - a * a / (2 * g), torch.full_like(a, g * c * c / 2)).sum()
    if term.kind == "scad":  # Fan & Li (2001)
        k = SCAD_A
        middle = (2 * k * c * a - a * a - c * c) / (2 * (k - 1))
        return torch.where(
            a <= c, c * a, torch.where(a <= k * c, middle, torch.full_like(a, c * c * (k + 1) / 2))
        ).sum()
    raise AssertionError(term.kind)


def _grad(term: Term, w: torch.Tensor, n: str, ref: dict[str, torch.Tensor]) -> torch.Tensor:
    """The gradient of the term's formula, by autograd (the loss-term reference)."""
    with torch.enable_grad():
        w = w.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_value(term, w, n, ref), w)
    return g


def _prox_of_sum(terms: list[Term], v: torch.Tensor, t: dict[int, float], n: str, ref: Any) -> torch.Tensor:
    """The prox of the sum of ``terms`` on ``n`` (each with its step size): the quadratic terms
    ``c/2 ||w - a||^2`` fold in as ``v <- (v + t c a) / (1 + t c)``, which scales the step of the
    one non-quadratic term (L1, group lasso, elastic net's L1 part) by ``1 / (1 + t c)``."""
    num, den = v.clone(), torch.ones((), dtype=v.dtype)
    rough: list[tuple[Term, float]] = []
    for i, term in enumerate(terms):
        q = _quadratic(term, n, ref)
        if q is not None:
            num = num + t[i] * q[0] * q[1]
            den = den + t[i] * q[0]
        if term.kind in ("l1", "elastic_net", "group_lasso", "mcp", "scad"):
            rough.append((term, t[i]))
    v = num / den
    assert len(rough) <= 1, "at most one non-quadratic term per parameter in the matrix"
    for term, step in rough:
        thr = step / den * term.coeff
        # prox of t f after the quadratic terms folded in: prox_{t/den f}(v / den), for any f
        tt, c, a = step / den, term.coeff, v.abs()
        if term.kind == "mcp":  # firm thresholding (tt < gamma: the objective is convex)
            firm = torch.sign(v) * (a - tt * c) / (1 - tt / MCP_GAMMA)
            v = torch.where(a <= tt * c, torch.zeros_like(v), torch.where(a <= MCP_GAMMA * c, firm, v))
            continue
        if term.kind == "scad":  # Fan & Li's thresholding with step tt (tt < a - 1)
            k = SCAD_A
            soft = torch.sign(v) * torch.clamp(a - tt * c, min=0)
            middle = torch.sign(v) * ((k - 1) * a - tt * k * c) / (k - 1 - tt)
            v = torch.where(a <= c * (1 + tt), soft, torch.where(a <= k * c, middle, v))
            continue
        if term.kind == "group_lasso":
            rows = v.reshape(v.shape[0], -1)
            norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
            scale = torch.clamp(1 - thr * math.sqrt(rows.shape[1]) / norms, min=0)
            v = (rows * scale).reshape(v.shape)
        else:
            v = torch.sign(v) * torch.clamp(v.abs() - thr, min=0)
    return v


def reference(
    optimizer: str,
    init: dict[str, torch.Tensor],
    groups: list[tuple[list[str], float]],
    terms: list[Term],
    penalty_step: dict[str, float] | Callable[[str], float],
    trajectory: list[dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """``STEPS`` steps of ``torch.optim.SGD(momentum=0.9)`` / ``Adam`` over ``groups`` on the data
    loss, with each term in its form: ``loss``/``coupled`` added to the loss, ``decoupled``
    ``w <- w - s grad P(w_old)`` after the step, ``proximal`` the prox of the sum after that.
    ``trajectory``, if given, receives the weights after every step."""
    ref = _reference_weights()
    p = {n: w.clone().requires_grad_(True) for n, w in init.items()}
    param_groups = [{"params": [p[n] for n in names], "lr": lr} for names, lr in groups]
    opt = (
        torch.optim.SGD(param_groups, lr=0.1, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(param_groups, lr=0.01)
    )
    step_of = penalty_step if callable(penalty_step) else penalty_step.__getitem__
    for x, y in _batches():
        opt.zero_grad()
        loss = data_loss(p, x, y)
        for term in terms:
            if term.form in ("loss", "coupled"):
                for n in term.names:
                    loss = loss + _value(term, p[n], n, ref)
        loss.backward()
        old = {n: w.detach().clone() for n, w in p.items()}
        opt.step()
        with torch.no_grad():
            for term in terms:
                if term.form == "decoupled":
                    for n in term.names:
                        p[n] -= step_of(n) * _grad(term, old[n], n, ref)
            for n in p:
                proxed = [tm for tm in terms if tm.form == "proximal" and n in tm.names]
                if proxed:
                    p[n].copy_(
                        _prox_of_sum(proxed, p[n], {i: step_of(n) for i in range(len(proxed))}, n, ref)
                    )
        if trajectory is not None:
            trajectory.append({n: w.detach().clone() for n, w in p.items()})
    return {n: w.detach() for n, w in p.items()}


# --- funcreg's side -------------------------------------------------------------------------------


def _penalty(kind: str, coeff: Any, selection: str) -> fr.Penalty:
    mask = None if selection == "all" else fr.by_name(*MASKED)
    if kind == "l2":
        return fr.l2(coeff, mask=mask)
    if kind == "l1":
        return fr.l1(coeff, mask=mask)
    if kind == "elastic_net":
        return fr.elastic_net(coeff, coeff / 2, mask=mask)
    if kind == "group_lasso":
        return fr.group_lasso(coeff, axis=0, mask=mask)
    if kind == "anchor":
        return fr.anchor(coeff, _reference_weights(), mask=mask)
    if kind == "mcp":
        return fr.mcp(coeff, gamma=MCP_GAMMA, mask=mask)
    if kind == "scad":
        return fr.scad(coeff, a=SCAD_A, mask=mask)
    raise AssertionError(kind)


def _tx(optimizer: str, lr: float) -> fr.GradientTransformation:
    if optimizer == "sgd_fused":  # the fused column: the reference is the "sgd" one
        return fr.sgd(lr, momentum=0.9, fused=True)
    return fr.sgd(lr, momentum=0.9) if optimizer == "sgd" else fr.adam(lr)


def _functional_tx(optimizer: str, selection: str) -> fr.GradientTransformation:
    if selection != "groups":
        return _tx(optimizer, LR[optimizer])
    labels = {n: ("a" if n in GROUP_A else "b") for n in _init()}
    return fr.partition({"a": _tx(optimizer, LR[optimizer]), "b": _tx(optimizer, LR_B[optimizer])}, labels)


def _groups(selection: str, optimizer: str) -> list[tuple[list[str], float]]:
    names = list(_init())
    if selection != "groups":
        return [(names, LR[optimizer])]
    return [
        ([n for n in names if n in GROUP_A], LR[optimizer]),
        ([n for n in names if n not in GROUP_A], LR_B[optimizer]),
    ]


def _group_lr(selection: str, optimizer: str) -> Callable[[str], float]:
    lrs = {n: lr for names, lr in _groups(selection, optimizer) for n in names}
    return lrs.__getitem__


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn, backend=BACKEND)


def run_functional(
    kind: str, form: str, selection: str, optimizer: str, mode: str
) -> dict[str, torch.Tensor]:
    tx = _functional_tx(optimizer, selection)
    donate = mode in ("donated", "compiled_donated")
    rate = None if form in ("loss", "coupled") else PENALTY_STEP
    if mode == "vmapped":
        step = fr.make_step(
            data_loss,
            tx,
            penalty=lambda h: _penalty(kind, h["c"], selection),
            form=form,  # type: ignore[arg-type]
            learning_rate=rate,
        )
        ens = fr.ensemble_step(step)
        init = _init()
        stacked = {n: torch.stack([w, 0.5 * w]) for n, w in init.items()}
        coeffs = torch.tensor([COEFF[kind], 2 * COEFF[kind]], dtype=torch.float64)
        state = ens.init(stacked, hparams={"c": coeffs})
        for x, y in _batches():
            state, _ = ens(state, x, y)
        return {n: w.detach() for n, w in state.params.items()}
    step = fr.make_step(
        data_loss,
        tx,
        penalty=_penalty(kind, COEFF[kind], selection),
        form=form,  # type: ignore[arg-type]
        learning_rate=rate,
        donate=donate,
    )
    state = step.init(_init())
    run = _compiled(step) if mode.startswith("compiled") else step
    for x, y in _batches():
        state, _ = run(state, x, y)
    return {n: w.detach() for n, w in state.params.items()}


def _named_params_groups(model: nn.Module, selection: str, optimizer: str) -> Any:
    named = list(model.named_parameters())
    if selection != "groups":
        return named
    return [
        {"params": [(n, p) for n, p in named if n in GROUP_A]},
        {"params": [(n, p) for n, p in named if n not in GROUP_A], "lr": LR_B[optimizer]},
    ]


def run_imperative(
    entry: str, kind: str, form: str, selection: str, optimizer: str, mode: str
) -> dict[str, torch.Tensor]:
    model = _model()
    penalty = _penalty(kind, COEFF[kind], selection)
    given = None if form == "loss" else penalty  # the loss form: the penalty is added to the loss below
    opts: dict[str, Any] = {"momentum": 0.9} if optimizer == "sgd" else {}
    if entry == "torch_optimizer":
        if given is not None:
            opts.update(penalty=given, form=form)
        opt = fr.TorchOptimizer(
            _named_params_groups(model, selection, optimizer), optimizer, lr=LR[optimizer], **opts
        )
    else:
        decay = None if selection == "groups" else True  # "groups": decay_mask's decay / no_decay groups
        opt = fr.create_optimizer(
            model,
            optimizer,
            lr=LR[optimizer],
            weight_decay=WEIGHT_DECAY,
            decay=decay,
            penalty=given,
            form=None if form == "loss" else form,
            **opts,
        )
    return _train_imperative(model, opt, penalty, form, mode, _batches())


def _train_imperative(
    model: nn.Module, opt: Any, penalty: fr.Penalty, form: str, mode: str, batches: list[Any]
) -> dict[str, torch.Tensor]:
    """The torch.optim loop over ``batches`` (the penalty added to the loss in the loss form)."""
    step = _compiled(opt.step) if mode == "compiled" else opt.step
    for x, y in batches:
        opt.zero_grad()
        loss = data_loss(dict(model.named_parameters()), x, y)
        if form == "loss":
            loss = loss + penalty(dict(model.named_parameters()))
        loss.backward()
        step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --- the cells ------------------------------------------------------------------------------------


def _expected(
    entry: str,
    kind: str,
    form: str,
    selection: str,
    optimizer: str,
    coeff: float,
    init: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    names = list(init)
    shapes = {n: tuple(w.shape) for n, w in init.items()}
    terms = [Term(kind, coeff, _selected(kind, selection, names, shapes), form)]
    groups = _groups(selection, optimizer)
    if entry == "functional":
        return reference(optimizer, init, groups, terms, lambda n: PENALTY_STEP)
    step_of = _group_lr(selection, optimizer)
    if entry == "create_optimizer":
        decayed = frozenset(fr.decay_mask(_model()).selected) if selection == "groups" else frozenset(names)
        # weight decay in the optimizer's own form (torch's meaning) unless a form is given
        wd_form = {"sgd": "coupled", "adam": "coupled"}[optimizer] if form == "loss" else form
        terms.append(Term("weight_decay", WEIGHT_DECAY, decayed, wd_form))
        groups = [(names, LR[optimizer])]  # its groups (decay / no_decay) share one learning rate
        step_of = _group_lr("all", optimizer)
    return reference(optimizer, init, groups, terms, step_of)


COMPILED = tuple(run for run in RUNS if run[1].startswith("compiled"))
FULL = os.environ.get("FUNCREG_MATRIX_FULL") == "1"


def _pairs(cell: tuple[Any, ...]) -> set[tuple[Any, ...]]:
    return {(i, cell[i], j, cell[j]) for i in range(len(cell)) for j in range(i + 1, len(cell))}


def pairwise_cover(dims: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """A deterministic greedy set of cells in which every pair of values of any two dimensions meets
    at least once (28 cells for the compiled column's 4 x 7 x 4 x 3 x 2 = 672)."""
    cells = list(itertools.product(*dims))
    need = set().union(*map(_pairs, cells))
    chosen = []
    while need:
        best = max(cells, key=lambda c: len(_pairs(c) & need))  # ties: the first, so the set is fixed
        chosen.append(best)
        need -= _pairs(best)
    return chosen


def _cell(run: tuple[str, str], kind: str, form: str, selection: str, optimizer: str) -> Any:
    entry, mode = run
    return pytest.param(
        entry,
        mode,
        kind,
        form,
        selection,
        optimizer,
        id=f"{entry}-{mode}-{kind}-{form}-{selection}-{optimizer}",
    )


EAGER_CELLS = [
    _cell(run, *rest)
    for run in RUNS
    if run not in COMPILED
    for rest in itertools.product(KINDS, FORMS, SELECTIONS, OPTIMIZERS)
]
# A compiled cell costs seconds of tracing: CI runs a pairwise cover of the compiled column (each
# compiled run with every kind, form, selection and optimizer, and every kind with every form, ...);
# FUNCREG_MATRIX_FULL=1 runs all 672 (docs/guarantees.md records the last full run).
COMPILED_CELLS = [
    _cell(*c)
    for c in (
        itertools.product(COMPILED, KINDS, FORMS, SELECTIONS, OPTIMIZERS)
        if FULL
        else pairwise_cover([COMPILED, KINDS, FORMS, SELECTIONS, OPTIMIZERS])
    )
]
CELLS = EAGER_CELLS + COMPILED_CELLS


def test_the_compiled_cover_meets_every_pair():
    """The CI subset of the compiled column leaves no pair of values untried."""
    dims = [COMPILED, KINDS, FORMS, SELECTIONS, OPTIMIZERS]
    cover = pairwise_cover(dims)
    met = set().union(*map(_pairs, cover))
    for i, j in itertools.combinations(range(len(dims)), 2):
        for a, b in itertools.product(dims[i], dims[j]):
            assert (i, a, j, b) in met, (dims[i], a, dims[j], b)


@pytest.mark.parametrize(("entry", "mode", "kind", "form", "selection", "optimizer"), CELLS)
def test_cell_equals_the_loss_term_reference(entry, mode, kind, form, selection, optimizer):
    torch._dynamo.reset()
    init = _init()
    if entry == "functional":
        got = run_functional(kind, form, selection, optimizer, mode)
    else:
        got = run_imperative(entry, kind, form, selection, optimizer, mode)
    if mode == "vmapped":
        members = [(init, COEFF[kind]), ({n: 0.5 * w for n, w in init.items()}, 2 * COEFF[kind])]
        for m, (start, coeff) in enumerate(members):
            want = _expected(entry, kind, form, selection, optimizer, coeff, start)
            for n in want:
                torch.testing.assert_close(
                    got[n][m], want[n], atol=1e-10, rtol=1e-8, msg=lambda s, n=n, m=m: f"member {m} {n}: {s}"
                )
        return
    want = _expected(entry, kind, form, selection, optimizer, COEFF[kind], init)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-10, rtol=1e-8, msg=lambda s, n=n: f"{n}: {s}")
    moved = any(not torch.allclose(want[n], init[n], atol=1e-6) for n in want)
    assert moved, "the cell's reference did not move: the comparison would prove nothing"


def test_every_reference_depends_on_its_penalty():
    """Each cell's reference moves with its penalty: the same run without the term lands elsewhere,
    so a cell whose penalty funcreg dropped (or applied in another form) fails."""
    init = _init()
    names, shapes = list(init), {n: tuple(w.shape) for n, w in init.items()}
    for kind in KINDS:
        for form in FORMS:
            for selection in SELECTIONS:
                for optimizer in OPTIMIZERS:
                    groups = _groups(selection, optimizer)
                    chosen = _selected(kind, selection, names, shapes)
                    base = reference(optimizer, init, groups, [], lambda n: PENALTY_STEP)
                    others = {
                        f: reference(
                            optimizer,
                            init,
                            groups,
                            [Term(kind, COEFF[kind], chosen, f)],
                            lambda n: PENALTY_STEP,
                        )
                        for f in FORMS
                    }
                    for n in chosen:
                        assert (others[form][n] - base[n]).abs().max() > 1e-6, (
                            kind,
                            form,
                            selection,
                            optimizer,
                            n,
                        )
                    if form in ("decoupled", "proximal") or optimizer == "adam":
                        # forms that must differ do (loss == coupled always; decoupled == coupled only for plain SGD)
                        if form != "loss" and form != "coupled":
                            assert any(
                                (others[form][n] - others["coupled"][n]).abs().max() > 1e-9 for n in chosen
                            )


@pytest.mark.parametrize(("entry", "mode"), sorted(NOT_APPLICABLE))
def test_cells_that_do_not_exist_are_listed_in_the_guarantees(entry, mode):
    import pathlib

    page = (pathlib.Path(__file__).parent.parent / "docs" / "guarantees.md").read_text()
    assert f"`{entry}` × `{mode}`" in page, NOT_APPLICABLE[(entry, mode)]


# --- fr.sgd(fused=True): torch's fused kernel in the donated cells -----------------------------------
#
# The column of fr.sgd(momentum=0.9, fused=True) on the entry points whose steps are donated: the
# functional step with donate=True, the ensemble step (vmapped, or the stacked kernel where the penalty
# is in the loss) and fr.TorchOptimizer on the same chain, each against the reference of the "sgd"
# cells. Where the form folds into the kernel (an L2 coupled or decoupled, an L1 proximal) or the
# penalty is in the loss, the step is torch._fused_sgd_'s (counted below); elsewhere the generic
# donated path. (The pure step is that of fr.sgd, tested in tests/test_fused_forms.py; create_optimizer
# builds named optimizers, whose fused variants are not options of its table.)

FUSED_RUNS = (("functional", "donated"), ("functional", "vmapped"), ("torch_optimizer", "eager"))
FUSED_CELLS = [
    _cell(run, *rest, "sgd_fused")
    for run in FUSED_RUNS
    for rest in itertools.product(KINDS, FORMS, SELECTIONS)
]


def _with_form(tx: fr.GradientTransformation, penalty: fr.Penalty, form: str) -> fr.GradientTransformation:
    """``tx`` with the penalty in ``form`` as make_step places it (the loss form: ``tx`` itself)."""
    if form == "coupled":
        return fr.named_chain(("penalty", fr.add_penalty_grad(penalty)), ("optimizer", tx))
    if form == "decoupled":
        return fr.named_chain(
            ("optimizer", tx), ("penalty", fr.decoupled(penalty, learning_rate=PENALTY_STEP))
        )
    if form == "proximal":
        return fr.named_chain(("optimizer", tx), ("penalty", fr.proximal(penalty, PENALTY_STEP)))
    return tx


def _folds(kind: str, form: str) -> bool:
    """Whether the donated step of the cell runs torch's kernel: the bare alias (the loss form) or a form
    the kernel takes (see funcreg/_src/kernels/fused_forms.py)."""
    return (
        form == "loss"
        or (kind == "l2" and form in ("coupled", "decoupled"))
        or (kind == "l1" and form == "proximal")
    )


@pytest.mark.parametrize(("entry", "mode", "kind", "form", "selection", "optimizer"), FUSED_CELLS)
def test_fused_sgd_cell_equals_the_loss_term_reference(entry, mode, kind, form, selection, optimizer):
    init = _init()
    calls: list[bool] = []
    kernel = torch._fused_sgd_

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["is_first_step"])
        return kernel(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "_fused_sgd_", counting)
        if entry == "functional":
            got = run_functional(kind, form, selection, optimizer, "donated" if mode == "donated" else mode)
        else:
            model = _model()
            penalty = _penalty(kind, COEFF[kind], selection)
            tx = _with_form(_functional_tx(optimizer, selection), penalty, form)
            opt = fr.TorchOptimizer(model.named_parameters(), tx)
            got = _train_imperative(model, opt, penalty, form, "eager", _batches())
    if selection != "groups" and _folds(kind, form) and (mode != "vmapped" or form == "loss"):
        assert calls, "torch's fused SGD kernel ran"
    members = [(init, COEFF[kind])]
    if mode == "vmapped":
        members.append(({n: 0.5 * w for n, w in init.items()}, 2 * COEFF[kind]))
    for m, (start, coeff) in enumerate(members):
        want = _expected("functional", kind, form, selection, "sgd", coeff, start)
        for n in want:
            mine = got[n][m] if mode == "vmapped" else got[n]
            torch.testing.assert_close(
                mine, want[n], atol=1e-10, rtol=1e-8, msg=lambda s, n=n, m=m: f"member {m} {n}: {s}"
            )


# --- the training-loop transforms: a second matrix --------------------------------------------------
#
# The transforms of the training loop wrap the optimizer, so the penalty's form goes inside the wrapped
# chain (``add_penalty_grad`` first, ``decoupled``/``proximal`` last; the loss form is added to the
# loss). Each has an exact loss-term reference:
#
# * ``inject``: the optimizer built by ``fr.inject_hyperparams`` from numbers held in its state (in
#   ``fr.TorchOptimizer`` they are the groups' options): the reference itself;
# * ``accumulate``: ``fr.accumulate(chain, every=2)`` fed every batch twice: the mean of two equal
#   micro-batch gradients, one real step per batch, so the reference's three steps;
# * ``average``: ``fr.average_weights(chain, decay=0.5)``: the reference's weights, and its average
#   the EMA of the reference's trajectory (checked where the state is at hand: the functional runs);
# * ``layer_decay``: ``fr.scale_by_layer`` after the optimizer (layer-wise learning-rate decay): the
#   reference with one param group per layer, its learning rate scaled;
# * ``decay_schedule``: the alias with ``weight_decay=fr.constant_schedule(wd)`` beside the penalty:
#   the reference with a coupled ``wd/2 ||w||^2`` term on every parameter (the kernels read the
#   schedule in donated steps).
#
# ``fr.create_optimizer`` builds a named optimizer from options: it takes no wrapped transform (the
# cells are named refusals in docs/guarantees.md, ``LOOP_NOT_APPLICABLE``). ``fr.cautious``,
# ``fr.compress_state`` and the schedule-free optimizers change the update, so
# the loss-term reference does not describe them: they are tested against their own references
# (tests/test_cautious.py, test_low_memory.py, test_schedule_free.py) and as
# rows of tests/test_donation_coverage.py.

LOOP_WRAPPERS = ("inject", "accumulate", "average", "decay_schedule", "layer_decay")
# fr.scale_by_layer after the optimizer: SGD's and Adam's updates are proportional to the learning rate,
# so the reference is one param group per layer with lr * scale (the penalty's own step unscaled)
LAYER_SCALES = {"0.weight": 0.5, "0.bias": 0.5, "2.weight": 1.0, "2.bias": 1.0}
LOOP_KINDS = ("l2", "l1", "group_lasso")
LOOP_RUNS = tuple(run for run in RUNS if run[0] != "create_optimizer")  # see LOOP_NOT_APPLICABLE
LOOP_NOT_APPLICABLE = {
    (
        "create_optimizer",
        "wrapped",
    ): "create_optimizer builds a named optimizer; a wrapped one goes to fr.TorchOptimizer",
}
EMA_DECAY = 0.5


def _loop_base(wrapper: str, optimizer: str) -> fr.GradientTransformation:
    lr = LR[optimizer]
    if wrapper == "inject":
        if optimizer == "sgd":
            return fr.inject_hyperparams(functools.partial(fr.sgd, momentum=0.9), learning_rate=lr)
        return fr.inject_hyperparams(fr.adam, learning_rate=lr)
    if wrapper == "decay_schedule":
        decay = fr.constant_schedule(WEIGHT_DECAY)
        if optimizer == "sgd":
            return fr.sgd(lr, momentum=0.9, weight_decay=decay)
        return fr.adam(lr, weight_decay=decay)
    return _tx(optimizer, lr)


def _loop_tx(wrapper: str, optimizer: str, form: str, penalty: fr.Penalty) -> fr.GradientTransformation:
    """The wrapped chain with the penalty's form inside it (the loss form: the bare optimizer)."""
    base = _loop_base(wrapper, optimizer)
    if wrapper == "layer_decay":
        base = fr.chain(base, fr.scale_by_layer(LAYER_SCALES))
    if form == "coupled":
        base = fr.chain(fr.add_penalty_grad(penalty), base)
    elif form == "decoupled":
        base = fr.chain(base, fr.decoupled(penalty, learning_rate=PENALTY_STEP))
    elif form == "proximal":
        base = fr.chain(base, fr.proximal(penalty, PENALTY_STEP))
    if wrapper == "accumulate":
        return fr.accumulate(base, every=2)
    if wrapper == "average":
        return fr.average_weights(base, decay=EMA_DECAY)
    return base


def _loop_batches(wrapper: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [b for b in _batches() for _ in range(2 if wrapper == "accumulate" else 1)]


def run_loop_functional(
    wrapper: str, kind: str, form: str, optimizer: str, mode: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The final weights and, for ``average``, the averaged ones (stacked over members when vmapped)."""
    loss_penalty = (lambda h: _penalty(kind, h["c"], "mask")) if form == "loss" else None
    step = fr.make_step(
        data_loss,
        lambda h: _loop_tx(wrapper, optimizer, form, _penalty(kind, h["c"], "mask")),
        penalty=loss_penalty,
        form="loss",
        donate=mode in ("donated", "compiled_donated"),
    )
    init = _init()
    if mode == "vmapped":
        run: Any = fr.ensemble_step(step)
        start = {n: torch.stack([w, 0.5 * w]) for n, w in init.items()}
        coeff = torch.tensor([COEFF[kind], 2 * COEFF[kind]], dtype=torch.float64)
    else:
        run, start, coeff = step, init, torch.tensor(COEFF[kind], dtype=torch.float64)
    state = run.init(start, hparams={"c": coeff})
    if mode.startswith("compiled"):
        run = _compiled(run)
    for x, y in _loop_batches(wrapper):
        state, _ = run(state, x, y)
    averaged = fr.averaged_params(state.opt_state) if wrapper == "average" else None
    return {n: w.detach() for n, w in state.params.items()}, averaged


def run_loop_torch_optimizer(
    wrapper: str, kind: str, form: str, optimizer: str, mode: str
) -> dict[str, torch.Tensor]:
    model = _model()
    penalty = _penalty(kind, COEFF[kind], "mask")
    opt = fr.TorchOptimizer(model.named_parameters(), _loop_tx(wrapper, optimizer, form, penalty))
    if wrapper == "inject":  # the injected values are the group's options, as torch's schedulers see them
        assert opt.param_groups[0]["lr"] == LR[optimizer], opt.param_groups[0]
    return _train_imperative(model, opt, penalty, form, mode, _loop_batches(wrapper))


def _loop_expected(
    wrapper: str, kind: str, form: str, optimizer: str, coeff: float, init: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The reference's final weights and the EMA of its trajectory."""
    names = list(init)
    shapes = {n: tuple(w.shape) for n, w in init.items()}
    terms = [Term(kind, coeff, _selected(kind, "mask", names, shapes), form)]
    if wrapper == "decay_schedule":
        terms.append(Term("weight_decay", WEIGHT_DECAY, frozenset(names), "coupled"))
    groups = [(names, LR[optimizer])]
    if wrapper == "layer_decay":
        groups = [
            ([n for n in names if LAYER_SCALES[n] == scale], LR[optimizer] * scale)
            for scale in sorted(set(LAYER_SCALES.values()))
        ]
    trajectory: list[dict[str, torch.Tensor]] = []
    final = reference(optimizer, init, groups, terms, lambda n: PENALTY_STEP, trajectory)
    ema = dict(trajectory[0])  # the average starts at the first step's weights
    for w in trajectory[1:]:
        ema = {n: EMA_DECAY * ema[n] + (1 - EMA_DECAY) * w[n] for n in ema}
    return final, ema


def _loop_cell(run: tuple[str, str], wrapper: str, kind: str, form: str, optimizer: str) -> Any:
    entry, mode = run
    return pytest.param(
        entry, mode, wrapper, kind, form, optimizer, id=f"{entry}-{mode}-{wrapper}-{kind}-{form}-{optimizer}"
    )


LOOP_COMPILED = tuple(run for run in LOOP_RUNS if "compiled" in run[1])
LOOP_DIMS = [LOOP_WRAPPERS, LOOP_KINDS, FORMS, OPTIMIZERS]
LOOP_CELLS = [
    _loop_cell(run, *rest)
    for run in LOOP_RUNS
    if run not in LOOP_COMPILED
    for rest in itertools.product(*LOOP_DIMS)
] + [
    _loop_cell(*c)
    for c in (
        itertools.product(LOOP_COMPILED, *LOOP_DIMS) if FULL else pairwise_cover([LOOP_COMPILED, *LOOP_DIMS])
    )
]


@pytest.mark.parametrize(("entry", "mode", "wrapper", "kind", "form", "optimizer"), LOOP_CELLS)
def test_loop_cell_equals_the_loss_term_reference(entry, mode, wrapper, kind, form, optimizer):
    torch._dynamo.reset()
    init = _init()
    averaged = None
    if entry == "functional":
        got, averaged = run_loop_functional(wrapper, kind, form, optimizer, mode)
    else:
        got = run_loop_torch_optimizer(wrapper, kind, form, optimizer, mode)
    members = [(init, COEFF[kind])]
    if mode == "vmapped":
        members.append(({n: 0.5 * w for n, w in init.items()}, 2 * COEFF[kind]))
    for m, (start, coeff) in enumerate(members):
        want, ema = _loop_expected(wrapper, kind, form, optimizer, coeff, start)
        for n in want:
            mine = got[n][m] if mode == "vmapped" else got[n]
            torch.testing.assert_close(mine, want[n], atol=1e-10, rtol=1e-8, msg=lambda s, n=n: f"{n}: {s}")
            if averaged is not None:
                avg = averaged[n][m] if mode == "vmapped" else averaged[n]
                torch.testing.assert_close(
                    avg, ema[n], atol=1e-10, rtol=1e-8, msg=lambda s, n=n: f"EMA {n}: {s}"
                )
        assert any(not torch.allclose(want[n], start[n], atol=1e-6) for n in want), (
            "the reference did not move"
        )
        if averaged is not None:
            assert any(not torch.allclose(ema[n], want[n], atol=1e-6) for n in want), (
                "the EMA equals the weights"
            )


def test_the_loop_compiled_cover_meets_every_pair():
    dims = [LOOP_COMPILED, *LOOP_DIMS]
    met = set().union(*map(_pairs, pairwise_cover(dims)))
    for i, j in itertools.combinations(range(len(dims)), 2):
        for a, b in itertools.product(dims[i], dims[j]):
            assert (i, a, j, b) in met, (dims[i], a, dims[j], b)


def test_create_optimizer_takes_no_wrapped_transform():
    """The loop matrix's ``create_optimizer`` column is a named refusal: it takes an optimizer's name."""
    with pytest.raises((TypeError, ValueError)):
        fr.create_optimizer(_model(), fr.accumulate(fr.sgd(0.1), every=2))  # type: ignore[arg-type]
    import pathlib

    page = (pathlib.Path(__file__).parent.parent / "docs" / "guarantees.md").read_text()
    for (entry, mode), why in LOOP_NOT_APPLICABLE.items():
        assert f"`{entry}` × `{mode}`" in page, why
