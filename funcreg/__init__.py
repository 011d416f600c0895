"""funcreg: functional, verified weight regularization for PyTorch.

Penalties, gradient transformations and optimizers as pure functions over parameter trees.
"""

from funcreg import (
    distributed,  # noqa: E402  (torch.distributed: fr.distributed.mean_gradients, sweeps)
    proxes,  # noqa: E402  (a module of plain functions: fr.proxes.soft_threshold)
)
from funcreg._src.adam_variants import (
    ScaleByAdamaxState,
    ScaleByNadamState,
    ScaleByRadamState,
    scale_by_adamax,
    scale_by_nadam,
    scale_by_radam,
)
from funcreg._src.adaptive import (
    ScaleByAdadeltaState,
    ScaleByAdagradState,
    ScaleByRmsState,
    scale_by_adadelta,
    scale_by_adagrad,
    scale_by_rms,
)
from funcreg._src.alias import adam, adamw, sgd
from funcreg._src.alias_recent import lion, muon
from funcreg._src.alias_torch import adadelta, adafactor, adagrad, adamax, nadam, radam, rmsprop, rprop
from funcreg._src.base import EmptyState, GradientTransformation, identity
from funcreg._src.checkpoint import load_state_dict, state_dict
from funcreg._src.combine import PartitionState, chain, named_chain, partition
from funcreg._src.diagnostics import NormReport, SparsityReport, norms, sparsity
from funcreg._src.ensemble import EnsembleStep, ensemble_step, init_members, num_members, stack, unstack, vmap
from funcreg._src.errors import ContractError, LeafTypeError, SelectionError, StructureError
from funcreg._src.factored import (
    ScaleByAdafactorState,
    ScaleByRelativeStepState,
    scale_by_adafactor,
    scale_by_relative_step,
)
from funcreg._src.factory import create_optimizer, create_transform
from funcreg._src.fista import FistaState, fista, fista_iterate
from funcreg._src.forms import (
    PenaltyState,
    add_penalty_grad,
    decoupled,
    penalized,
    penalty_metrics,
    penalty_states,
    proximal,
)
from funcreg._src.history import History
from funcreg._src.hypergrad import (
    Hypergradient,
    TuneResult,
    hypergradient,
    implicit_hypergradient,
    tune_coefficient,
)
from funcreg._src.metrics import metrics
from funcreg._src.orthogonalize import ScaleByMuonState, scale_by_muon
from funcreg._src.paths import RegularizationPath, kfold, regularization_path
from funcreg._src.penalties import (
    FlatParams,
    LeafRule,
    Penalty,
    anchor,
    elastic_net,
    group_lasso,
    l1,
    l2,
    lp,
    max_norm,
    non_negative,
    orthogonal,
    penalty,
)
from funcreg._src.preconditioned import proximal_adam
from funcreg._src.probe import DecayKind, ProbeResult, probe
from funcreg._src.prune import PruneReport, prune, prune_report
from funcreg._src.schedules import (
    constant_schedule,
    cosine_decay_schedule,
    join_schedules,
    linear_schedule,
    linear_warmup,
    warmup_cosine_decay_schedule,
)
from funcreg._src.selection import (
    Selection,
    Selector,
    buffers_of,
    by_module,
    by_name,
    by_predicate,
    decay_mask,
    params_of,
)
from funcreg._src.sign_methods import ScaleByLionState, ScaleByRpropState, scale_by_lion, scale_by_rprop
from funcreg._src.spectral import max_spectral_norm, nuclear_norm, orthogonal_cosine, spectral_norm
from funcreg._src.torch_optimizer import TorchOptimizer
from funcreg._src.training import Step, TrainState, functional_model, make_step
from funcreg._src.transform import (
    DecoupledWeightDecayState,
    ScaleByAdamState,
    ScaleByScheduleState,
    TraceState,
    add_decayed_weights,
    clip_by_global_norm,
    decoupled_weight_decay,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)
from funcreg._src.tree import leaf_names as tree_names
from funcreg._src.update import apply_updates, donated_update
from funcreg._src.wrappers import ApplyIfFiniteState, MaskedState, apply_if_finite, masked

__version__ = "0.1.0"

__all__ = [
    "ApplyIfFiniteState",
    "ContractError",
    "DecayKind",
    "DecoupledWeightDecayState",
    "EmptyState",
    "EnsembleStep",
    "FistaState",
    "FlatParams",
    "GradientTransformation",
    "History",
    "Hypergradient",
    "LeafRule",
    "LeafTypeError",
    "MaskedState",
    "NormReport",
    "PartitionState",
    "Penalty",
    "PenaltyState",
    "ProbeResult",
    "PruneReport",
    "RegularizationPath",
    "ScaleByAdadeltaState",
    "ScaleByAdafactorState",
    "ScaleByAdagradState",
    "ScaleByAdamState",
    "ScaleByAdamaxState",
    "ScaleByLionState",
    "ScaleByMuonState",
    "ScaleByNadamState",
    "ScaleByRadamState",
    "ScaleByRelativeStepState",
    "ScaleByRmsState",
    "ScaleByRpropState",
    "ScaleByScheduleState",
    "Selection",
    "SelectionError",
    "Selector",
    "SparsityReport",
    "Step",
    "StructureError",
    "TorchOptimizer",
    "TraceState",
    "TrainState",
    "TuneResult",
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "add_decayed_weights",
    "add_penalty_grad",
    "anchor",
    "apply_if_finite",
    "apply_updates",
    "buffers_of",
    "by_module",
    "by_name",
    "by_predicate",
    "chain",
    "clip_by_global_norm",
    "constant_schedule",
    "cosine_decay_schedule",
    "create_optimizer",
    "create_transform",
    "decay_mask",
    "decoupled",
    "decoupled_weight_decay",
    "donated_update",
    "elastic_net",
    "ensemble_step",
    "fista",
    "fista_iterate",
    "functional_model",
    "group_lasso",
    "hypergradient",
    "identity",
    "implicit_hypergradient",
    "init_members",
    "join_schedules",
    "kfold",
    "l1",
    "l2",
    "linear_schedule",
    "linear_warmup",
    "lion",
    "load_state_dict",
    "lp",
    "make_step",
    "masked",
    "max_norm",
    "max_spectral_norm",
    "metrics",
    "muon",
    "nadam",
    "named_chain",
    "non_negative",
    "norms",
    "nuclear_norm",
    "num_members",
    "orthogonal",
    "orthogonal_cosine",
    "params_of",
    "partition",
    "penalized",
    "penalty",
    "penalty_metrics",
    "penalty_states",
    "probe",
    "proxes",
    "proximal",
    "proximal_adam",
    "prune",
    "prune_report",
    "radam",
    "regularization_path",
    "rmsprop",
    "rprop",
    "scale",
    "scale_by_adadelta",
    "scale_by_adafactor",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_muon",
    "scale_by_nadam",
    "scale_by_radam",
    "scale_by_relative_step",
    "scale_by_rms",
    "scale_by_rprop",
    "sgd",
    "sparsity",
    "spectral_norm",
    "stack",
    "state_dict",
    "trace",
    "tree_names",
    "tune_coefficient",
    "unstack",
    "vmap",
    "warmup_cosine_decay_schedule",
]
