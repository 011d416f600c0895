"""Donation coverage: ``fr.donated_update`` equals the pure path for every public transform.

The pure path (``tx.update`` + ``fr.apply_updates``) is the oracle. ``TABLE`` below holds every
public alias (with its notable options), building block, combinator, wrapper and penalty form, and
``test_the_table_covers_every_public_factory`` keeps it complete. Each entry is checked

* eagerly, by Hypothesis, in float32 and float64, with ``None`` gradients at some steps (and
  non-finite ones for ``apply_if_finite``): bitwise (zero tolerance, NaN where NaN), except where the
  donated step may run torch.optim's own kernels (a different operation order,
  ``_runs_torch_kernels``): there within atol + rtol; the gradients are only read;
* under ``torch.compile``: the compiled donated step against the pure eager path, with aot_eager
  (``COMPILE_SWEEP`` in CI, every entry in both dtypes with ``FUNCREG_COMPILE_ALL=1``) and with
  inductor (``INDUCTOR``);
* under vmap (3 stacked members, fixed problems): ``fr.vmap`` of the donated update against
  ``fr.vmap`` of the pure one (float32 and float64), and ``fr.ensemble_step(make_step(donate=True))``
  against ``donate=False`` (float64), bitwise; a transform that refuses vmap raises its documented
  error instead (``VMAP_REFUSED``).

Known bugs are ``xfail(strict=True)`` cases with the reason (``EAGER_BUGS``, ``COMPILE_BUGS``,
``VMAP_BUGS``): when one is fixed its case passes, the strict xfail fails, and the entry is to be
removed from the list.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from helpers import SLOW_OK
from hypothesis import given, settings
from hypothesis import strategies as st

import funcreg as fr
from funcreg._src.kernels.update import kernel_of
from funcreg._src.optim.table import OPTIMIZERS
from funcreg.testing import tensors

F32, F64 = torch.float32, torch.float64
SHAPES = {"w": (2, 3), "b": (3,)}
W_ONLY = {"w": True, "b": False}
B_ONLY = {"w": False, "b": True}
# a warmup: the learning rate at count 0 is 0, so reading the schedule at the wrong count shows at once
SCHED = fr.warmup_cosine_decay_schedule(0.05, warmup_steps=2, decay_steps=8)
# a weight-decay schedule: a different value at each of the first steps (read at the wrong count, it shows)
WD_SCHED = fr.linear_schedule(0.2, 0.02, 4)


def _reference() -> dict[str, torch.Tensor]:
    """A fixed tree with the problem's names and shapes (anchor's reference, create_transform's model);
    its values are exact in float32, and anchor applies it in each parameter's dtype."""
    return {"w": torch.full((2, 3), 0.25, dtype=F64), "b": torch.full((3,), -0.5, dtype=F64)}


def _two_layers() -> torch.nn.Module:
    """A module whose parameters are named like the problem's tree: "w" a layer below "b"."""
    module = torch.nn.Module()
    for name, x in _reference().items():
        module.register_parameter(name, torch.nn.Parameter(x.clone()))
    return module


def _is_matrix(p: Any) -> dict[str, bool]:
    return {k: v.ndim >= 2 for k, v in p.items()}


def _soft_threshold_prox(params: Any, step: Any) -> Any:
    return {k: fr.proxes.soft_threshold(v, 0.05 * step) for k, v in params.items()}


# Every public penalty factory (kept complete by test_the_table_covers_every_public_factory); each is
# used below in every form it has: coupled and decoupled where it has a gradient, proximal where it
# has a closed-form prox.
PENALTIES: dict[str, Callable[[], fr.Penalty]] = {
    "l1": lambda: fr.l1(0.01),
    "l2": lambda: fr.l2(0.1),
    "elastic_net": lambda: fr.elastic_net(0.01, 0.1),
    "group_lasso": lambda: fr.group_lasso(0.05, mask=W_ONLY),
    "lp": lambda: fr.lp(0.01, 1.5),
    "max_norm": lambda: fr.max_norm(1.0, mask=W_ONLY),
    "non_negative": lambda: fr.non_negative(),
    "orthogonal": lambda: fr.orthogonal(0.01, mask=W_ONLY),
    "anchor": lambda: fr.anchor(0.1, _reference()),
    "anchor_precision": lambda: fr.anchor(
        0.1, _reference(), precision={"w": torch.full((2, 3), 2.0), "b": torch.full((3,), 0.5)}
    ),
    "penalty": lambda: fr.penalty(lambda p: 0.01 * (p["w"] ** 4).sum(), name="quartic"),
    "penalty_closed_form": lambda: fr.penalty(
        lambda p: 0.05 * sum(v.abs().sum() for v in p.values()),
        name="closed_form_l1",
        grad=lambda p: {k: 0.05 * torch.sign(v) for k, v in p.items()},
        prox=_soft_threshold_prox,
    ),
    "spectral_norm": lambda: fr.spectral_norm(0.01, mask=W_ONLY),
    "nuclear_norm": lambda: fr.nuclear_norm(0.01, mask=W_ONLY),
    "max_spectral_norm": lambda: fr.max_spectral_norm(1.0, mask=W_ONLY),
    "orthogonal_cosine": lambda: fr.orthogonal_cosine(0.01, mask=W_ONLY),
    "mcp": lambda: fr.mcp(0.05, gamma=3.0),
    "scad": lambda: fr.scad(0.05),
    "l0": lambda: fr.l0(0.01),
    "log_sum": lambda: fr.log_sum(0.01, eps=0.5),
    "bridge": lambda: fr.bridge(0.01, q=0.5),
    "sparsity_target": lambda: fr.sparsity_target(0.5),
    "sparsity_target_global": lambda: fr.sparsity_target(0.5, per="global"),
    "n_m_sparsity": lambda: fr.n_m_sparsity(1, 3, mask=W_ONLY),
    # one group per column of "w" joined with one entry of "b": a group lasso across tensors
    "joint_group_lasso": lambda: fr.joint_group_lasso(0.05, {"w": 1, "b": 0}, num_groups=3),
    # three "heads" of one column of w (as output projection) and one entry of b each
    "head_lasso": lambda: fr.head_lasso(
        0.05, fr.AttentionHeads("", "projections", 3, 1, 1, (("w", 1, 1), ("b", 0, 1)))
    ),
}


def _build_table() -> dict[str, Callable[[], fr.GradientTransformation]]:
    t: dict[str, Callable[[], fr.GradientTransformation]] = {}
    # --- building blocks (after an adaptive scaling, a fixed negative scale makes it a descent step)
    t["identity"] = lambda: fr.identity()
    t["scale"] = lambda: fr.scale(-0.1)
    t["scale_by_learning_rate"] = lambda: fr.scale_by_learning_rate(0.1)
    t["scale_by_learning_rate_schedule"] = lambda: fr.scale_by_learning_rate(SCHED)
    t["scale_by_adam"] = lambda: fr.chain(fr.scale_by_adam(), fr.scale(-0.01))
    t["scale_by_adam_amsgrad"] = lambda: fr.chain(
        fr.scale_by_adam(amsgrad=True), fr.scale_by_learning_rate(SCHED)
    )
    t["scale_by_adamax"] = lambda: fr.chain(fr.scale_by_adamax(), fr.scale(-0.01))
    t["scale_by_nadam"] = lambda: fr.chain(fr.scale_by_nadam(), fr.scale(-0.01))
    t["scale_by_radam"] = lambda: fr.chain(fr.scale_by_radam(), fr.scale(-0.01))
    t["scale_by_rms_centered"] = lambda: fr.chain(fr.scale_by_rms(centered=True), fr.scale(-0.01))
    t["scale_by_adagrad"] = lambda: fr.chain(fr.scale_by_adagrad(lr_decay=0.01), fr.scale(-0.01))
    t["scale_by_adadelta"] = lambda: fr.chain(fr.scale_by_adadelta(), fr.scale(-1.0))
    t["scale_by_adafactor"] = lambda: fr.chain(fr.scale_by_adafactor(), fr.scale_by_relative_step(0.01))
    t["scale_by_relative_step_schedule"] = lambda: fr.chain(
        fr.scale_by_adafactor(d=2.0), fr.scale_by_relative_step(SCHED)
    )
    t["scale_by_lion"] = lambda: fr.chain(fr.scale_by_lion(), fr.scale(-0.01))
    t["scale_by_rprop"] = lambda: fr.scale_by_rprop(0.01)
    t["scale_by_rprop_schedule"] = lambda: fr.scale_by_rprop(SCHED)
    # Newton-Schulz orthogonalizes matrices: the bias is masked out
    t["scale_by_muon"] = lambda: fr.masked(fr.chain(fr.scale_by_muon(), fr.scale(-0.01)), W_ONLY)
    t["trace"] = lambda: fr.trace(0.9)
    t["trace_nesterov"] = lambda: fr.trace(0.9, nesterov=True)
    t["trace_dampening"] = lambda: fr.trace(0.9, dampening=0.3)
    t["clip_by_global_norm"] = lambda: fr.chain(fr.clip_by_global_norm(0.5), fr.sgd(0.1))
    t["add_decayed_weights"] = lambda: fr.chain(fr.add_decayed_weights(0.1, mask=W_ONLY), fr.sgd(0.1))
    t["decoupled_weight_decay_lr"] = lambda: fr.chain(
        fr.sgd(0.1, momentum=0.9), fr.decoupled_weight_decay(0.1, 0.1, scale_by="learning_rate")
    )
    t["decoupled_weight_decay_schedule"] = lambda: fr.chain(
        fr.sgd(0.1), fr.decoupled_weight_decay(0.1, SCHED, mask=W_ONLY, scale_by="schedule")
    )
    t["decoupled_weight_decay_none"] = lambda: fr.chain(
        fr.scale_by_learning_rate(0.1), fr.decoupled_weight_decay(0.01, scale_by="none")
    )
    t["add_decayed_weights_schedule"] = lambda: fr.chain(
        fr.add_decayed_weights(WD_SCHED, mask=W_ONLY), fr.sgd(0.1)
    )
    t["decoupled_weight_decay_wd_schedule"] = lambda: fr.chain(
        fr.sgd(SCHED, momentum=0.9), fr.decoupled_weight_decay(WD_SCHED, SCHED, scale_by="learning_rate")
    )
    t["decoupled_weight_decay_none_wd_schedule"] = lambda: fr.chain(
        fr.scale_by_learning_rate(0.1), fr.decoupled_weight_decay(WD_SCHED, scale_by="none")
    )
    # --- aliases equal to torch.optim, with their notable options
    t["sgd"] = lambda: fr.sgd(0.1)
    t["sgd_momentum_dampening_wd"] = lambda: fr.sgd(0.1, momentum=0.9, dampening=0.2, weight_decay=0.01)
    t["sgd_nesterov_maximize"] = lambda: fr.sgd(0.1, momentum=0.9, nesterov=True, maximize=True)
    t["sgd_schedule"] = lambda: fr.sgd(SCHED, momentum=0.5)
    t["sgd_fused_momentum_dampening_wd"] = lambda: fr.sgd(
        0.1, momentum=0.9, dampening=0.2, weight_decay=0.01, fused=True
    )
    t["sgd_fused_nesterov_maximize_schedules"] = lambda: fr.sgd(
        SCHED, momentum=0.9, nesterov=True, weight_decay=WD_SCHED, maximize=True, fused=True
    )
    t["adam"] = lambda: fr.adam(0.01)
    t["adam_wd_amsgrad_maximize"] = lambda: fr.adam(0.01, weight_decay=0.1, amsgrad=True, maximize=True)
    t["adam_fused"] = lambda: fr.adam(0.01, weight_decay=0.1, fused=True)
    t["adam_schedule"] = lambda: fr.adam(SCHED)
    t["adamw"] = lambda: fr.adamw(0.01)
    t["adamw_amsgrad_mask"] = lambda: fr.adamw(0.01, weight_decay=0.1, amsgrad=True, mask=W_ONLY)
    t["adamw_callable_mask_maximize"] = lambda: fr.adamw(
        0.01, weight_decay=0.1, mask=_is_matrix, maximize=True
    )
    t["adamw_fused_amsgrad_maximize"] = lambda: fr.adamw(
        0.01, weight_decay=0.1, amsgrad=True, maximize=True, fused=True
    )
    t["adamw_fused_mask"] = lambda: fr.adamw(0.01, weight_decay=0.1, mask=W_ONLY, fused=True)
    t["adamw_schedule"] = lambda: fr.adamw(SCHED, weight_decay=0.1)
    # weight_decay as a schedule: the fused kernels read it at the step's count
    t["sgd_wd_schedule"] = lambda: fr.sgd(0.1, momentum=0.9, weight_decay=WD_SCHED)
    t["sgd_wd_schedule_lr_schedule_maximize"] = lambda: fr.sgd(SCHED, weight_decay=WD_SCHED, maximize=True)
    t["adam_wd_schedule"] = lambda: fr.adam(SCHED, weight_decay=WD_SCHED)
    t["adam_fused_wd_schedule"] = lambda: fr.adam(0.01, weight_decay=WD_SCHED, fused=True)
    t["adamw_wd_schedule_mask"] = lambda: fr.adamw(SCHED, weight_decay=WD_SCHED, mask=W_ONLY)
    t["adamw_fused_wd_schedule"] = lambda: fr.adamw(0.01, weight_decay=WD_SCHED, fused=True)
    t["nadam_decoupled_wd_schedule_both"] = lambda: fr.nadam(
        SCHED, weight_decay=WD_SCHED, decoupled_weight_decay=True
    )
    t["rmsprop_wd_schedule"] = lambda: fr.rmsprop(0.01, weight_decay=WD_SCHED)
    t["lion_wd_schedule"] = lambda: fr.lion(0.01, weight_decay=WD_SCHED)
    t["adamax"] = lambda: fr.adamax(0.01)
    t["adamax_wd_maximize_schedule"] = lambda: fr.adamax(SCHED, weight_decay=0.1, maximize=True)
    t["nadam"] = lambda: fr.nadam(0.01)
    t["nadam_decoupled_wd_schedule"] = lambda: fr.nadam(SCHED, weight_decay=0.1, decoupled_weight_decay=True)
    t["radam"] = lambda: fr.radam(0.01)
    t["radam_decoupled_wd_maximize"] = lambda: fr.radam(
        0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True
    )
    t["rmsprop"] = lambda: fr.rmsprop(0.01)
    t["rmsprop_centered_momentum_wd"] = lambda: fr.rmsprop(
        0.01, centered=True, momentum=0.9, weight_decay=0.01
    )
    t["adagrad"] = lambda: fr.adagrad(0.1)
    t["adagrad_lr_decay_wd_init"] = lambda: fr.adagrad(
        0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1
    )
    t["adadelta"] = lambda: fr.adadelta(1.0)
    t["adadelta_wd_maximize"] = lambda: fr.adadelta(1.0, weight_decay=0.1, maximize=True)
    t["rprop"] = lambda: fr.rprop(0.01)
    t["rprop_wd_maximize"] = lambda: fr.rprop(0.01, weight_decay=0.1, maximize=True)
    t["adafactor"] = lambda: fr.adafactor(0.01)
    t["adafactor_wd_maximize"] = lambda: fr.adafactor(0.01, weight_decay=0.1, maximize=True)
    t["muon"] = lambda: fr.muon(0.02, fallback=fr.adamw(0.01))
    t["muon_plain_maximize"] = lambda: fr.muon(
        0.02, weight_decay=0.0, nesterov=False, maximize=True, fallback=fr.sgd(0.1)
    )
    t["lion"] = lambda: fr.lion(0.01)
    t["lion_wd_maximize_schedule"] = lambda: fr.lion(SCHED, weight_decay=0.1, maximize=True)
    t["proximal_adam"] = lambda: fr.proximal_adam(0.01, l1=0.1)
    t["proximal_adam_elastic_mask_schedule"] = lambda: fr.proximal_adam(SCHED, l1=0.1, l2=0.1, mask=W_ONLY)
    t["fista"] = lambda: fr.fista(0.1, fr.l1(0.1))
    t["fista_no_restart"] = lambda: fr.fista(0.1, fr.group_lasso(0.05, mask=W_ONLY), restart=None)
    t["fista_function_restart"] = lambda: fr.fista(
        0.1, fr.l1(0.1), restart="function", objective=lambda p: sum((v**2).sum() for v in p.values())
    )
    # --- combinators and wrappers
    t["chain"] = lambda: fr.chain(
        fr.clip_by_global_norm(1.0), fr.scale_by_adam(), fr.scale_by_learning_rate(0.01)
    )
    t["chain_clip_adamw"] = lambda: fr.chain(fr.clip_by_global_norm(1.0), fr.adamw(0.01, weight_decay=0.1))
    t["chain_clip_adamw_schedule"] = lambda: fr.chain(
        fr.clip_by_global_norm(1.0), fr.adamw(SCHED, weight_decay=0.1)
    )
    t["named_chain"] = lambda: fr.named_chain(("m", fr.trace(0.9)), ("lr", fr.scale_by_learning_rate(0.1)))
    t["masked"] = lambda: fr.masked(fr.sgd(0.1, momentum=0.9), W_ONLY)
    t["masked_callable_adam"] = lambda: fr.masked(fr.adam(0.01), _is_matrix)
    t["masked_adam_schedule"] = lambda: fr.masked(fr.adam(SCHED), W_ONLY)
    t["partition"] = lambda: fr.partition(
        {"a": fr.adam(0.01), "s": fr.sgd(0.1, momentum=0.9)}, {"w": "a", "b": "s"}
    )
    t["partition_nested_callable"] = lambda: fr.partition(
        {
            "a": fr.chain(fr.clip_by_global_norm(1.0), fr.adamw(0.01)),
            "s": fr.masked(fr.lion(0.01), B_ONLY),
        },
        lambda p: {"w": "a", "b": "s"},
    )
    t["accumulate"] = lambda: fr.accumulate(fr.adamw(0.01, weight_decay=0.1), every=2)
    t["accumulate_chain_decoupled"] = lambda: fr.accumulate(
        fr.chain(fr.sgd(0.1, momentum=0.9), fr.decoupled(fr.l1(0.01), learning_rate=0.1)), every=3
    )
    t["cautious"] = lambda: fr.cautious(fr.adam(0.01))
    t["scale_by_layer"] = lambda: fr.chain(
        fr.adamw(0.01, weight_decay=0.1), fr.scale_by_layer({"w": 0.5, "b": 0.25})
    )
    t["scale_by_layer/layer_decay"] = lambda: fr.chain(
        fr.sgd(0.1, momentum=0.9), fr.scale_by_layer(fr.layer_decay(_two_layers(), 0.5, matcher={"w": r"^w"}))
    )
    t["compress_state/float8"] = lambda: fr.compress_state(fr.adam(0.01), format="float8", block=4)
    t["compress_state"] = lambda: fr.compress_state(fr.adam(0.01))
    t["inject_hyperparams"] = lambda: fr.inject_hyperparams(fr.adamw, learning_rate=0.01, weight_decay=0.1)
    t["average_weights"] = lambda: fr.average_weights(fr.adamw(0.01, weight_decay=0.1), decay=0.9)
    t["average_weights_swa"] = lambda: fr.average_weights(fr.sgd(0.1, momentum=0.9))
    t["average_weights_warmup"] = lambda: fr.average_weights(
        fr.sgd(0.1, momentum=0.9), decay=0.99, warmup=True, min_decay=0.2, update_after_step=1
    )
    t["schedule_free_sgd"] = lambda: fr.schedule_free_sgd(0.1, weight_decay=0.01, warmup_steps=2)
    t["schedule_free_adamw"] = lambda: fr.schedule_free_adamw(0.01, weight_decay=0.1, warmup_steps=2)
    t["schedule_free_adamw_wd_schedule"] = lambda: fr.schedule_free_adamw(0.01, weight_decay=WD_SCHED)
    t["apply_if_finite"] = lambda: fr.apply_if_finite(fr.adam(0.01), max_consecutive_errors=2)
    t["apply_if_finite_chain"] = lambda: fr.apply_if_finite(
        fr.chain(fr.add_decayed_weights(0.1), fr.sgd(0.1, momentum=0.9)), max_consecutive_errors=0
    )
    # --- create_transform: every name of its table, with weight decay on its default decay selection
    for name in sorted(OPTIMIZERS):
        t[f"create_transform/{name}"] = lambda name=name: fr.create_transform(
            _reference(), name, lr=0.01, weight_decay=0.01
        )
    t["create_transform/adamw_proximal_l1"] = lambda: fr.create_transform(
        _reference(), "adamw", lr=0.01, weight_decay=0.01, penalty=fr.l1(0.01, mask=B_ONLY), form="proximal"
    )
    t["create_transform/sgd_decoupled_l1"] = lambda: fr.create_transform(
        _reference(), "sgd", lr=0.01, weight_decay=0.01, penalty=fr.l1(0.01), form="decoupled", momentum=0.9
    )
    t["create_transform/adam_coupled_maximize"] = lambda: fr.create_transform(
        _reference(), "adam", lr=0.01, weight_decay=0.01, penalty=fr.l2(0.01), form="coupled", maximize=True
    )
    # --- penalty forms: every penalty in every form it has
    for pname, make in PENALTIES.items():
        pen = make()
        if pen.has_grad:
            t[f"add_penalty_grad/{pname}"] = lambda make=make: fr.chain(
                fr.add_penalty_grad(make()), fr.sgd(0.1, momentum=0.9)
            )
            t[f"decoupled/{pname}"] = lambda make=make: fr.chain(
                fr.adam(0.01), fr.decoupled(make(), learning_rate=0.01)
            )
        if pen.has_prox:
            t[f"proximal/{pname}"] = lambda make=make: fr.chain(
                fr.sgd(0.1), fr.proximal(make(), learning_rate=0.1)
            )
    t["add_penalty_grad/sum"] = lambda: fr.chain(
        fr.add_penalty_grad(fr.l1(0.01) + fr.orthogonal(0.01, mask=W_ONLY)), fr.adam(0.01)
    )
    t["decoupled/no_learning_rate"] = lambda: fr.chain(fr.sgd(0.1), fr.decoupled(fr.l2(0.01)))
    t["decoupled/schedule"] = lambda: fr.chain(
        fr.sgd(SCHED, momentum=0.9), fr.decoupled(fr.l1(0.01), learning_rate=SCHED)
    )
    t["proximal/sum"] = lambda: fr.chain(
        fr.adam(0.01), fr.proximal(fr.l1(0.01, mask=W_ONLY) + fr.l2(0.1, mask=B_ONLY), learning_rate=0.01)
    )
    t["proximal/scaled_schedule"] = lambda: fr.chain(
        fr.sgd(SCHED), fr.proximal(0.5 * fr.elastic_net(0.01, 0.1), learning_rate=SCHED)
    )
    # --- data parallelism (torch.distributed, a one-rank gloo group here: see _process_group)
    t["mean_gradients"] = lambda: fr.chain(fr.distributed.mean_gradients(), fr.sgd(0.1, momentum=0.9))
    t["sum_gradients"] = lambda: fr.chain(fr.distributed.sum_gradients(), fr.adam(0.01))
    return t


TABLE = _build_table()
DISTRIBUTED = {"mean_gradients", "sum_gradients"}
# where a non-finite gradient is an input the transform handles (it skips the step)
SKIPS_NONFINITE = {"apply_if_finite", "apply_if_finite_chain"}

# Public names that are not step transforms, so not in TABLE (every other public function must be
# used by some entry: test_the_table_covers_every_public_factory).
NOT_STEP_TRANSFORMS = {
    "attention_heads": "a selection (head_lasso's groups), not a transform",
    "semi_structured": "an export of N:M weights, not a transform",
    # the steps under test themselves, and the step builders (tested here under vmap with each entry)
    "apply_updates": "the pure path's second half: the oracle",
    "donated_update": "the function under test",
    "make_step": "builds a training step around a transform (test_donated_ensemble_step_...)",
    "ensemble_step": "vmaps a make_step step (test_donated_ensemble_step_...)",
    "vmap": "a vmap wrapper (test_vmapped_donated_update_...)",
    "create_optimizer": "a torch.optim.Optimizer (fr.TorchOptimizer), whose transforms create_transform builds",
    "layer_decay_groups": "param groups for an Optimizer (tests/test_layer_decay.py steps them in fr.TorchOptimizer)",
    # schedules: learning-rate values, not transforms (several entries take SCHED, built at import)
    "constant_schedule": "a schedule",
    "cosine_decay_schedule": "a schedule",
    "join_schedules": "a schedule",
    "linear_schedule": "a schedule",
    "linear_warmup": "a schedule",
    "warmup_cosine_decay_schedule": "a schedule",
    # the loss-term form: the penalty goes into the loss, no transform is involved
    "penalized": "the loss-term form (no transform)",
    # state and tree utilities
    "fista_iterate": "reads a FistaState",
    "averaged_params": "reads an AverageState",
    "average_buffers": "a pure function over buffers, after the step (tests/test_averaging.py)",
    "set_hyperparams": "edits an InjectState",
    "schedule_free_eval_params": "reads a ScheduleFreeState",
    "penalty_metrics": "reads penalty terms",
    "penalty_states": "reads a state",
    "load_state_dict": "checkpointing",
    "state_dict": "checkpointing",
    "stack": "stacks trees (used by the vmap tests)",
    "unstack": "splits stacked trees",
    "num_members": "reads a stacked tree",
    "init_members": "builds stacked modules",
    "tree_names": "names the leaves of a tree",
    "functional_model": "wraps a module as a function",
    # selection, diagnostics, analysis: no update
    "buffers_of": "selection",
    "params_of": "selection",
    "by_module": "a selector",
    "by_name": "a selector",
    "by_predicate": "a selector",
    "decay_mask": "a selection (create_transform uses it by default)",
    "metrics": "diagnostics",
    "norms": "diagnostics",
    "sparsity": "diagnostics",
    "probe": "probes a torch.optim optimizer",
    "prune": "model surgery",
    "prune_report": "model surgery",
    "low_rank": "model surgery",
    "lasso_path": "a linear model's exact path (tests/test_lasso_path.py), not a transform",
    "lasso_cv": "a linear model's cross-validated path (tests/test_lasso_path.py), not a transform",
    "regularization_path": "runs make_step steps",
    "kfold": "data splits",
    "hypergradient": "differentiates through pure steps (a donated step is not differentiable)",
    "implicit_hypergradient": "differentiates an objective",
    "tune_coefficient": "tunes a coefficient",
    # fr.distributed helpers that are not transforms
    "distributed.broadcast": "copies parameters across ranks",
    "distributed.gather_members": "a sweep's results",
    "distributed.sweep_members": "a sweep's member indices",
    "distributed.take_members": "slices a stacked tree",
}

# Known bugs: xfail(strict=True) cases with the reason (the schedule read one step late by a donated
# adam outside torch's kernels, and float32 factors from a traced step count, were found here and fixed).
EAGER_BUGS: dict[str, str] = {}  # known bugs of the eager donated step (none today)
COMPILE_BUGS: dict[tuple[str, torch.dtype], str] = {
    **{(n, d): r for n, r in EAGER_BUGS.items() for d in (F32, F64)},
}
# Documented refusals under vmap: (exception, message pattern); a collective cannot run per member
VMAP_REFUSED = {
    **{name: (TypeError, "wrapped by vmap or grad: a collective cannot run inside") for name in DISTRIBUTED},
    "compress_state": (TypeError, "compress_state runs eagerly only"),
    "compress_state/float8": (TypeError, "compress_state runs eagerly only"),
}
# Crashes under vmap, of the pure path as much as of the donated one (nothing to do with donation),
# undocumented: (name, dtype) -> reason. Minimal reproduction of each:
#   P = fr.stack([{"w": torch.randn(2, 3)}] * 3); tx = fr.radam(0.01)  # or fr.adafactor(0.01), ...
#   fr.vmap(tx.update)(P, fr.vmap(tx.init)(P), P)
SPECTRAL_VMAP = (
    "vmap: spectral_norm's prox finds its water level with bool(active.any()) and int(...) "
    "(spectral._water_level): RuntimeError (data-dependent control flow)"
)
VMAP_BUGS: dict[tuple[str, torch.dtype], str] = {
    **{("proximal/spectral_norm", d): SPECTRAL_VMAP for d in (F32, F64)},
}

# The torch.compile sweep (aot_eager). Dynamo traces funcreg's Python for every transform, 2-6 s each
# on a loaded 2-core machine (the whole table: ~10 minutes), so CI compiles a subset that exercises
# every kind of in-place write a donated step makes (momentum buffers, Adam moments and nu_max, per-
# parameter step counts, schedule counts, the parameters) through the combinators, a gradient-edit form
# and the proximal form, plus two cases of fixed bugs. FUNCREG_COMPILE_ALL=1 compiles every entry in both dtypes
# (run for this file's introduction: every entry passes but those of COMPILE_BUGS).
COMPILE_SWEEP = {  # name -> dtype (both dtypes are compiled)
    "sgd_nesterov_maximize": F64,  # trace: the momentum buffer in place
    "adamw_fused_amsgrad_maximize": F32,  # compiled, torch's kernels are skipped: the generic adam path
    "sgd_fused_nesterov_maximize_schedules": F32,  # likewise for torch._fused_sgd_: the generic sgd chain
    "adamax_wd_maximize_schedule": F32,  # per-parameter step counts and a schedule's count
    "partition_nested_callable": F32,  # partition, chain, clip, masked, adamw, lion; a None gradient
    "apply_if_finite": F64,  # donation switched off for the inner transform inside the graph
    "proximal/group_lasso": F64,  # the proximal form
    "decoupled/schedule": F32,  # a gradient-edit form, scheduled
    "adamw_schedule": F32,  # the schedule read at this step's count, before the moments count it
    "scale_by_adagrad": F64,  # factors from the traced count in float64
}
COMPILE_FROZEN = {"partition_nested_callable", "masked_callable_adam", "masked"}
INDUCTOR = ["sgd_momentum_dampening_wd", "adamw_amsgrad_mask", "proximal/l1"]


# --- helpers -----------------------------------------------------------------------------------------


def _clone(tree: Any) -> Any:
    return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def _leaves(tree: Any) -> tuple[list[Any], Any]:
    return pytree.tree_flatten(tree, is_leaf=lambda x: x is None)


def _paired(actual: Any, expected: Any, what: str) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    a, spec_a = _leaves(actual)
    e, spec_e = _leaves(expected)
    assert spec_a == spec_e, f"{what}: structure {spec_a} != {spec_e}"
    out = []
    for i, (x, y) in enumerate(zip(a, e)):
        assert (x is None) == (y is None), f"{what} leaf {i}: {x!r} vs {y!r}"
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, f"{what} leaf {i}: {x.dtype} {y.dtype}"
            out.append((i, x, y))
        elif x is not None:
            assert x == y, f"{what} leaf {i}: {x!r} != {y!r}"
    return out


def _assert_equal(actual: Any, expected: Any, what: str) -> None:
    """Bitwise: same structure, dtypes and values (NaN where NaN)."""
    for i, x, y in _paired(actual, expected, what):
        torch.testing.assert_close(
            x, y, atol=0, rtol=0, equal_nan=True, msg=lambda m, i=i: f"{what} leaf {i}: {m}"
        )


# atol + rtol (never rtol alone: a value that should be 0 must be close to 0 in absolute terms)
TOL = {F32: (1e-6, 1e-5), F64: (1e-12, 1e-10)}


def _assert_close(actual: Any, expected: Any, what: str) -> None:
    for i, x, y in _paired(actual, expected, what):
        if not x.is_floating_point():
            assert torch.equal(x, y), f"{what} leaf {i}: {x} != {y}"
            continue
        atol, rtol = TOL[x.dtype]
        torch.testing.assert_close(
            x, y, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m, i=i: f"{what} leaf {i}: {m}"
        )


def _pure_step(tx: fr.GradientTransformation, grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
    updates, state = tx.update(grads, state, params)
    return fr.apply_updates(params, updates), state


def _runs_torch_kernels(tx: fr.GradientTransformation) -> bool:
    """Whether a donated step may run torch.optim's arithmetic (funcreg/_src/kernels/fused.py): for adam/adamw
    torch's fused kernel (fused=True) or its foreach sequence, which order the operations as torch
    does (``addcdiv(p, m, sqrt(v)/c2 + eps, -lr/c1)``) where the pure update orders them as funcreg
    does (``c2*m / (sqrt(v) + eps*c2)``, then ``p + u``); likewise for sgd and for a chain of an
    alias and a penalty form folded into one kernel. The two then agree to rounding, not bit for
    bit. (A kernel that declines a step falls back to the pure arithmetic: bitwise, within the
    tolerance too.)"""
    return kernel_of(tx) is not None


def _cases(names: Any, bugs: dict[str, str]) -> list[Any]:
    out = []
    for name in names:
        marks = (
            [pytest.mark.xfail(strict=True, raises=AssertionError, reason=bugs[name])] if name in bugs else []
        )
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.fixture(scope="module")
def _process_group() -> Any:
    """A one-rank gloo group for the data-parallel transforms (a no-op reduction over one rank, but
    the transforms' whole path up to the collective runs); left alone if one exists already."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _needs(name: str, request: Any) -> None:
    if name in DISTRIBUTED:
        request.getfixturevalue("_process_group")


# --- the table is complete ---------------------------------------------------------------------------


def _public_functions() -> dict[str, Any]:
    out = {n: getattr(fr, n) for n in fr.__all__ if inspect.isfunction(getattr(fr, n))}
    out.update({f"distributed.{n}": getattr(fr.distributed, n) for n in fr.distributed.__all__})
    return out


def _called_by(names: Any, monkeypatch: Any) -> set[str]:
    """The public functions that building the entries ``names`` calls through ``fr.<name>``."""
    called: set[str] = set()
    for public, fn in _public_functions().items():
        module, attr = (fr.distributed, public.split(".")[1]) if "." in public else (fr, public)

        def recording(*args: Any, __fn: Any = fn, __name: str = public, **kwargs: Any) -> Any:
            called.add(__name)
            return __fn(*args, **kwargs)

        monkeypatch.setattr(module, attr, recording)
    for name in names:
        TABLE[name]()
    monkeypatch.undo()
    return called


def _returns(fn: Any, what: str) -> bool:
    annotation = inspect.signature(fn).return_annotation
    return annotation is not inspect.Signature.empty and str(annotation).split(".")[-1].strip("'\"") == what


def test_the_table_covers_every_public_factory(monkeypatch):
    public = _public_functions()
    called = _called_by(TABLE, monkeypatch)
    missing = sorted(set(public) - called - set(NOT_STEP_TRANSFORMS))
    assert not missing, f"public functions used by no TABLE entry (add entries, or exclude them): {missing}"
    stale = sorted(n for n in NOT_STEP_TRANSFORMS if n not in public)
    assert not stale, f"NOT_STEP_TRANSFORMS lists names that are not public functions: {stale}"
    wrongly_excluded = sorted(
        n
        for n in NOT_STEP_TRANSFORMS
        if _returns(public[n], "GradientTransformation") or _returns(public[n], "Penalty")
    )
    assert not wrongly_excluded, f"transform or penalty factories must be in TABLE: {wrongly_excluded}"
    # every name of create_transform's table has its entry
    assert {n for n in OPTIMIZERS} <= {k.split("/")[1] for k in TABLE if k.startswith("create_transform/")}


def test_every_public_penalty_is_used_in_every_form_it_has():
    penalties = {n for n, fn in _public_functions().items() if _returns(fn, "Penalty")}
    assert penalties <= set(PENALTIES), (
        f"penalties without form entries: {sorted(penalties - set(PENALTIES))}"
    )
    for name, make in PENALTIES.items():
        pen = make()
        forms = {"add_penalty_grad", "decoupled"} if pen.has_grad else set()
        forms |= {"proximal"} if pen.has_prox else set()
        assert forms, name
        for form in forms:
            assert f"{form}/{name}" in TABLE


# --- eager: donated == pure, by Hypothesis -----------------------------------------------------------


@st.composite
def _gradients(draw: Any, dtype: torch.dtype, nonfinite: bool) -> dict[str, Any]:
    grads: dict[str, Any] = {}
    for k, shape in SHAPES.items():
        if draw(st.integers(0, 3)) == 0:
            grads[k] = None  # a frozen parameter (or one without a gradient) at this step
            continue
        g = draw(tensors(shape, dtype=dtype, max_abs=2.0))
        if nonfinite and draw(st.integers(0, 3)) == 0:
            g = g.clone()
            g.view(-1)[draw(st.integers(0, g.numel() - 1))] = draw(
                st.sampled_from([float("nan"), float("inf")])
            )
        grads[k] = g
    return grads


def _check_eager(name: str, params: dict[str, torch.Tensor], grads_seq: list[Any]) -> None:
    tx = TABLE[name]()
    same = _assert_close if _runs_torch_kernels(tx) else _assert_equal
    pure_p, pure_s = params, tx.init(params)
    don_p, don_s = _clone(params), tx.init(params)
    for t, grads in enumerate(grads_seq, start=1):
        kept = _clone(grads)
        pure_p, pure_s = _pure_step(tx, grads, pure_s, pure_p)
        don_p, don_s = fr.donated_update(tx, grads, don_s, don_p)
        _assert_equal(grads, kept, f"step {t}: the gradients are only read")
        same(don_p, pure_p, f"step {t}: params")
        same(don_s, pure_s, f"step {t}: state")


EAGER = [n for n in TABLE if n not in EAGER_BUGS]


@pytest.mark.parametrize("name", EAGER)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
# 2 examples x 2 dtypes x every entry keeps the file within its CI budget; the dev profile draws new
# examples on every run
@settings(deadline=None, max_examples=2, suppress_health_check=SLOW_OK)
@given(data=st.data())
def test_donated_update_equals_the_pure_path(name, dtype, data, request):
    _needs(name, request)
    params = {k: data.draw(tensors(s, dtype=dtype, max_abs=3.0), label=k) for k, s in SHAPES.items()}
    steps = data.draw(st.integers(1, 4), label="steps")
    grads_seq = [
        data.draw(_gradients(dtype, name in SKIPS_NONFINITE), label=f"grads {t}") for t in range(steps)
    ]
    _check_eager(name, params, grads_seq)


def _fixed_problem(
    dtype: torch.dtype, steps: int = 3, members: int | None = None, seed: int = 0, frozen: bool = True
) -> tuple[Any, Any]:
    """Deterministic params and gradients (a seeded generator, outside any Hypothesis test); with
    ``frozen`` the second step's gradient of ``b`` is ``None``. ``members``: stacked along a leading
    axis."""
    g = torch.Generator().manual_seed(seed)
    lead = () if members is None else (members,)
    params = {k: torch.randn(lead + s, generator=g, dtype=dtype) for k, s in SHAPES.items()}
    grads_seq = []
    for t in range(steps):
        grads = {k: torch.randn(lead + s, generator=g, dtype=dtype) for k, s in SHAPES.items()}
        if frozen and t == 1:
            grads["b"] = None
        grads_seq.append(grads)
    return params, grads_seq


@pytest.mark.parametrize("name", _cases(sorted(EAGER_BUGS), EAGER_BUGS))
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_known_eager_donation_bugs(name, dtype):
    """The entries of EAGER_BUGS on a fixed problem (strict xfail: once fixed, they move to the
    Hypothesis test by leaving EAGER_BUGS)."""
    params, grads_seq = _fixed_problem(dtype)
    _check_eager(name, params, grads_seq)


# --- torch.compile -----------------------------------------------------------------------------------


def _check_compiled(names: list[str], dtypes: list[torch.dtype], backend: str) -> None:
    """One compiled function runs the donated steps of all ``names`` x ``dtypes`` (one graph per
    call for inductor's C++ compile); each is compared with the pure eager path, step by step.

    Compiled, the donated step's in-place writes into the state and params (graph inputs) go through
    functionalization (aot_eager runs it, and the eager kernels: no codegen), and the eager-only
    parts (torch's kernels, foreach) are not used: the pure eager path is equal to rounding.
    """
    torch._dynamo.reset()
    cases = [(n, d, TABLE[n]()) for n in names for d in dtypes]
    # None gradients are a matter of tree structure (eager and vmap tests cover them everywhere); each
    # None pattern is one more graph to compile, so only the COMPILE_FROZEN entries get one
    problems = [
        _fixed_problem(d, steps=2, seed=i, frozen=n in COMPILE_FROZEN) for i, (n, d, _) in enumerate(cases)
    ]
    pure = [(p, tx.init(p)) for (_, _, tx), (p, _) in zip(cases, problems)]
    donated = [(_clone(p), tx.init(p)) for (_, _, tx), (p, _) in zip(cases, problems)]
    txs = [tx for _, _, tx in cases]

    def steps(grads: list[Any], states: list[Any], params: list[Any]) -> list[Any]:
        return [fr.donated_update(tx, g, s, p) for tx, g, s, p in zip(txs, grads, states, params)]

    compiled = torch.compile(steps, backend=backend)
    for t in range(len(problems[0][1])):
        grads = [gs[t] for _, gs in problems]
        kept = _clone(grads)
        pure = [_pure_step(tx, g, s, p) for tx, g, (p, s) in zip(txs, grads, pure)]
        donated = compiled(grads, [s for _, s in donated], [p for p, _ in donated])
        for (name, dtype, _), (pp, ps), (dp, ds), g, k in zip(cases, pure, donated, grads, kept):
            what = f"{name} {dtype} step {t + 1}"
            _assert_equal(g, k, f"{what}: the gradients are only read")
            _assert_close(dp, pp, f"{what}: params")
            _assert_close(ds, ps, f"{what}: state")


def _compile_cases() -> list[Any]:
    """COMPILE_SWEEP, or with FUNCREG_COMPILE_ALL=1 every entry in both dtypes."""
    if os.environ.get("FUNCREG_COMPILE_ALL", "").strip() not in ("", "0"):
        pairs = [(n, d) for n in TABLE for d in (F32, F64)]
    else:
        pairs = list(COMPILE_SWEEP.items())
    out = []
    for name, dtype in pairs:
        bug = COMPILE_BUGS.get((name, dtype))
        # raises=AssertionError: a wrong result is the known bug, a crash is not
        marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=bug)] if bug else []
        out.append(pytest.param(name, dtype, marks=marks, id=f"{str(dtype)[6:]}-{name}"))
    return out


@pytest.mark.parametrize(("name", "dtype"), _compile_cases())
def test_compiled_donated_step_equals_the_pure_eager_path(name, dtype, request):
    """aot_eager: Dynamo and functionalization of the in-place writes into the graph's inputs, with
    eager kernels (no codegen, which inductor's test below covers on a few entries)."""
    _needs(name, request)
    _check_compiled([name], [dtype], backend="aot_eager")


def test_inductor_compiled_donated_steps_equal_the_pure_eager_path():
    """A few entries in one compiled function (one C++ build per graph: grouping them is cheaper)."""
    _check_compiled(INDUCTOR, [F32], backend="inductor")


# --- vmap --------------------------------------------------------------------------------------------


def _vmap_cases(dtypes: list[torch.dtype]) -> list[Any]:
    out = []
    for dtype in dtypes:
        for name in TABLE:
            bug = VMAP_BUGS.get((name, dtype))
            marks = [pytest.mark.xfail(strict=True, raises=RuntimeError, reason=bug)] if bug else []
            out.append(pytest.param(name, dtype, marks=marks, id=f"{str(dtype)[6:]}-{name}"))
    return out


@contextlib.contextmanager
def _refusal(name: str) -> Any:
    if name in VMAP_REFUSED:
        exc, match = VMAP_REFUSED[name]
        with pytest.raises(exc, match=match):
            yield
    else:
        yield


@pytest.mark.parametrize(("name", "dtype"), _vmap_cases([F32, F64]))
def test_vmapped_donated_update_equals_the_vmapped_pure_one(name, dtype, request):
    """``fr.vmap`` over 3 stacked members: inside vmap a donated step writes nothing in place (batched
    in-place writes are not safe to mix with unbatched operands), so the two agree bit for bit."""
    _needs(name, request)
    tx = TABLE[name]()
    params, grads_seq = _fixed_problem(dtype, members=3)
    pure = fr.vmap(lambda g, s, p: _pure_step(tx, g, s, p))
    donated = fr.vmap(lambda g, s, p: fr.donated_update(tx, g, s, p))
    pure_p, pure_s = params, fr.vmap(tx.init)(params)
    don_p, don_s = _clone(params), fr.vmap(tx.init)(params)
    with _refusal(name):
        for t, grads in enumerate(grads_seq, start=1):
            kept = _clone(grads)
            don_p, don_s = donated(grads, don_s, don_p)
            pure_p, pure_s = pure(grads, pure_s, pure_p)
            _assert_equal(grads, kept, f"step {t}: the gradients are only read")
            _assert_equal(don_p, pure_p, f"step {t}: params")
            _assert_equal(don_s, pure_s, f"step {t}: state")


def _loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x @ p["w"].T - y) ** 2).mean() + (p["b"] ** 2).sum() / 3


@pytest.mark.parametrize(("name", "dtype"), _vmap_cases([F64]))
def test_donated_ensemble_step_equals_the_pure_one(name, dtype, request):
    """``fr.ensemble_step`` of ``make_step(tx, donate=True)`` against ``donate=False``, 3 members,
    float64."""
    _needs(name, request)
    params, _ = _fixed_problem(dtype, members=3)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(4, 3, generator=g, dtype=dtype), torch.randn(4, 2, generator=g, dtype=dtype))
        for _ in range(3)
    ]
    out = []
    with _refusal(name):
        for donate in (False, True):
            ens = fr.ensemble_step(fr.make_step(_loss, TABLE[name](), donate=donate))
            state = ens.init(params)
            history = []
            for batch in batches:
                state, metrics = ens(state, *batch)
                history.append(metrics)
            out.append((state, history))
    if name in VMAP_REFUSED:
        return
    (pure, pure_m), (don, don_m) = out
    _assert_equal(don.params, pure.params, "params")
    _assert_equal(don.opt_state, pure.opt_state, "opt_state")
    _assert_equal(don_m, pure_m, "metrics")
