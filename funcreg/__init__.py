"""funcreg: functional, verified weight regularization for PyTorch.

Penalties, gradient transformations and optimizers as pure functions over parameter trees. The
names below are grouped in the sections of the API reference (docs/api.md), one per line.
"""

from funcreg import distributed  # a namespace: fr.distributed.mean_gradients, sweeps
from funcreg import proxes  # a namespace of plain functions: fr.proxes.soft_threshold

# Errors
from funcreg._src.core.errors import StructureError
from funcreg._src.core.errors import ContractError
from funcreg._src.core.errors import LeafTypeError
from funcreg._src.core.errors import SelectionError

# The protocol
from funcreg._src.core.base import GradientTransformation
from funcreg._src.core.base import identity
from funcreg._src.core.base import EmptyState

# Optimizers
from funcreg._src.optim.alias import sgd
from funcreg._src.optim.alias import adam
from funcreg._src.optim.alias import adamw
from funcreg._src.optim.alias_torch import adamax
from funcreg._src.optim.alias_torch import nadam
from funcreg._src.optim.alias_torch import radam
from funcreg._src.optim.alias_torch import rmsprop
from funcreg._src.optim.alias_torch import adagrad
from funcreg._src.optim.alias_torch import adadelta
from funcreg._src.optim.alias_torch import rprop
from funcreg._src.optim.alias_torch import adafactor
from funcreg._src.optim.alias_recent import muon
from funcreg._src.optim.alias_recent import lion

# Accelerated and preconditioned proximal methods
from funcreg._src.forms.fista import fista
from funcreg._src.forms.fista import FistaState
from funcreg._src.forms.fista import fista_iterate
from funcreg._src.forms.preconditioned import proximal_adam

# Transforms
from funcreg._src.transforms.basic import scale
from funcreg._src.transforms.basic import scale_by_learning_rate
from funcreg._src.transforms.basic import ScaleByScheduleState
from funcreg._src.transforms.basic import trace
from funcreg._src.transforms.basic import TraceState
from funcreg._src.transforms.basic import scale_by_adam
from funcreg._src.transforms.basic import ScaleByAdamState
from funcreg._src.transforms.basic import add_decayed_weights
from funcreg._src.transforms.basic import AddDecayedWeightsState
from funcreg._src.transforms.basic import decoupled_weight_decay
from funcreg._src.transforms.basic import DecoupledWeightDecayState
from funcreg._src.transforms.basic import clip_by_global_norm

# The rules of the other optimizers
from funcreg._src.transforms.adam_variants import scale_by_adamax
from funcreg._src.transforms.adam_variants import ScaleByAdamaxState
from funcreg._src.transforms.adam_variants import scale_by_nadam
from funcreg._src.transforms.adam_variants import ScaleByNadamState
from funcreg._src.transforms.adam_variants import scale_by_radam
from funcreg._src.transforms.adam_variants import ScaleByRadamState
from funcreg._src.transforms.adaptive import scale_by_rms
from funcreg._src.transforms.adaptive import ScaleByRmsState
from funcreg._src.transforms.adaptive import scale_by_adagrad
from funcreg._src.transforms.adaptive import ScaleByAdagradState
from funcreg._src.transforms.adaptive import scale_by_adadelta
from funcreg._src.transforms.adaptive import ScaleByAdadeltaState
from funcreg._src.transforms.sign_methods import scale_by_rprop
from funcreg._src.transforms.sign_methods import ScaleByRpropState
from funcreg._src.transforms.sign_methods import scale_by_lion
from funcreg._src.transforms.sign_methods import ScaleByLionState
from funcreg._src.transforms.factored import scale_by_adafactor
from funcreg._src.transforms.factored import ScaleByAdafactorState
from funcreg._src.transforms.factored import scale_by_relative_step
from funcreg._src.transforms.factored import ScaleByRelativeStepState
from funcreg._src.transforms.orthogonalize import scale_by_muon
from funcreg._src.transforms.orthogonalize import ScaleByMuonState

# Penalties
from funcreg._src.penalties import Penalty
from funcreg._src.penalties import penalty
from funcreg._src.penalties import l2
from funcreg._src.penalties import l1
from funcreg._src.penalties import lp
from funcreg._src.penalties import elastic_net
from funcreg._src.penalties import mcp
from funcreg._src.penalties import scad
from funcreg._src.penalties import l0
from funcreg._src.penalties import log_sum
from funcreg._src.penalties import bridge
from funcreg._src.penalties import sparsity_target
from funcreg._src.penalties import n_m_sparsity
from funcreg._src.penalties import group_lasso
from funcreg._src.penalties.joint import joint_group_lasso
from funcreg._src.penalties.heads import head_lasso
from funcreg._src.penalties.heads import attention_heads
from funcreg._src.penalties.heads import AttentionHeads
from funcreg._src.penalties import max_norm
from funcreg._src.penalties import non_negative
from funcreg._src.penalties import orthogonal
from funcreg._src.penalties import anchor

# Low-rank and spectral penalties
from funcreg._src.penalties.spectral import nuclear_norm
from funcreg._src.penalties.spectral import spectral_norm
from funcreg._src.penalties.spectral import max_spectral_norm
from funcreg._src.penalties.spectral import orthogonal_cosine

# Writing a penalty: the protocol
from funcreg._src.penalties import FlatParams
from funcreg._src.penalties import LeafRule

# Penalty forms
from funcreg._src.forms.forms import penalized
from funcreg._src.forms.forms import add_penalty_grad
from funcreg._src.forms.forms import decoupled
from funcreg._src.forms.forms import proximal
from funcreg._src.forms.forms import PenaltyState
from funcreg._src.forms.forms import penalty_metrics
from funcreg._src.forms.forms import penalty_states

# Combinators
from funcreg._src.combinators.combine import chain
from funcreg._src.combinators.combine import named_chain
from funcreg._src.combinators.combine import partition
from funcreg._src.combinators.combine import PartitionState

# Wrappers
from funcreg._src.combinators.wrappers import masked
from funcreg._src.combinators.wrappers import MaskedState
from funcreg._src.combinators.wrappers import apply_if_finite
from funcreg._src.combinators.wrappers import ApplyIfFiniteState
from funcreg._src.combinators.accumulate import accumulate
from funcreg._src.combinators.accumulate import AccumulateState
from funcreg._src.combinators.cautious import cautious
from funcreg._src.combinators.averaging import average_weights
from funcreg._src.combinators.averaging import averaged_params
from funcreg._src.combinators.averaging import average_buffers
from funcreg._src.combinators.averaging import AverageState
from funcreg._src.combinators.low_memory import compress_state
from funcreg._src.combinators.low_memory import CompressedState
from funcreg._src.combinators.inject import inject_hyperparams
from funcreg._src.combinators.inject import set_hyperparams
from funcreg._src.combinators.inject import InjectState
from funcreg._src.optim.schedule_free import schedule_free_sgd
from funcreg._src.optim.schedule_free import schedule_free_adamw
from funcreg._src.optim.schedule_free import schedule_free_eval_params
from funcreg._src.optim.schedule_free import ScheduleFreeState

# Selections
from funcreg._src.selection.named_params import params_of
from funcreg._src.selection.named_params import buffers_of
from funcreg._src.selection.decay_mask import decay_mask
from funcreg._src.selection.selectors import by_module
from funcreg._src.selection.selectors import by_name
from funcreg._src.selection.selectors import by_predicate
from funcreg._src.selection.table import Selection
from funcreg._src.selection.selectors import Selector

# Layer-wise learning-rate decay
from funcreg._src.selection.layer_decay import layer_decay
from funcreg._src.selection.layer_decay import layer_decay_groups
from funcreg._src.selection.layer_decay import LayerScales
from funcreg._src.transforms.per_param import scale_by_layer

# Schedules
from funcreg._src.core.schedules import constant_schedule
from funcreg._src.core.schedules import linear_schedule
from funcreg._src.core.schedules import linear_warmup
from funcreg._src.core.schedules import cosine_decay_schedule
from funcreg._src.core.schedules import join_schedules
from funcreg._src.core.schedules import warmup_cosine_decay_schedule

# Training steps
from funcreg._src.training.step import make_step
from funcreg._src.training.step import Step
from funcreg._src.training.step import TrainState
from funcreg._src.training.step import functional_model
from funcreg._src.training.history import History

# Ensembles
from funcreg._src.training.ensemble import ensemble_step
from funcreg._src.training.ensemble import EnsembleStep
from funcreg._src.training.members import init_members
from funcreg._src.training.members import stack
from funcreg._src.training.members import unstack
from funcreg._src.training.members import num_members
from funcreg._src.training.members import vmap

# Regularization paths
from funcreg._src.analysis.paths.path import regularization_path
from funcreg._src.analysis.paths.result import RegularizationPath
from funcreg._src.analysis.paths.cv import kfold
from funcreg._src.analysis.paths.lasso import lasso_path
from funcreg._src.analysis.paths.lasso import lasso_cv
from funcreg._src.analysis.paths.lasso import LassoPath

# Hypergradients
from funcreg._src.analysis.hypergrad import hypergradient
from funcreg._src.analysis.hypergrad import implicit_hypergradient
from funcreg._src.analysis.hypergrad import Hypergradient
from funcreg._src.analysis.hypergrad import tune_coefficient
from funcreg._src.analysis.hypergrad import TuneResult

# Structured pruning
from funcreg._src.analysis.prune.prune import prune
from funcreg._src.analysis.prune.report import prune_report
from funcreg._src.analysis.prune.report import PruneReport
from funcreg._src.analysis.prune.modules import PrunedMultiheadAttention
from funcreg._src.analysis.prune.modules import SelectInputs
from funcreg._src.analysis.prune.semi_structured import semi_structured
from funcreg._src.analysis.prune.semi_structured import SemiStructured
from funcreg._src.analysis.prune.low_rank import low_rank

# torch.optim adapter and checkpoints
from funcreg._src.torch_optimizer.optimizer import TorchOptimizer
from funcreg._src.torch_optimizer.create import create_optimizer
from funcreg._src.optim.factory import create_transform
from funcreg._src.training.checkpoint import state_dict
from funcreg._src.training.checkpoint import load_state_dict

# Diagnostics
from funcreg._src.analysis.probe.probe import probe
from funcreg._src.analysis.probe.probe import ProbeResult
from funcreg._src.analysis.probe.probe import DecayKind
from funcreg._src.analysis.diagnostics import sparsity
from funcreg._src.analysis.diagnostics import SparsityReport
from funcreg._src.analysis.diagnostics import norms
from funcreg._src.analysis.diagnostics import NormReport
from funcreg._src.training.metrics import metrics

# Trees and updates
from funcreg._src.kernels.update import apply_updates
from funcreg._src.kernels.update import donated_update
from funcreg._src.core.tree import tree_names

__version__ = "0.1.0"

__all__ = [
    "AccumulateState",
    "AddDecayedWeightsState",
    "ApplyIfFiniteState",
    "AttentionHeads",
    "AverageState",
    "CompressedState",
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
    "InjectState",
    "LassoPath",
    "LeafRule",
    "LeafTypeError",
    "MaskedState",
    "NormReport",
    "PartitionState",
    "Penalty",
    "PenaltyState",
    "ProbeResult",
    "PruneReport",
    "PrunedMultiheadAttention",
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
    "ScheduleFreeState",
    "SelectInputs",
    "Selection",
    "SelectionError",
    "Selector",
    "SemiStructured",
    "SparsityReport",
    "Step",
    "StructureError",
    "TorchOptimizer",
    "TraceState",
    "TrainState",
    "TuneResult",
    "accumulate",
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
    "attention_heads",
    "average_buffers",
    "average_weights",
    "averaged_params",
    "bridge",
    "buffers_of",
    "by_module",
    "by_name",
    "by_predicate",
    "cautious",
    "chain",
    "clip_by_global_norm",
    "compress_state",
    "constant_schedule",
    "cosine_decay_schedule",
    "create_optimizer",
    "create_transform",
    "decay_mask",
    "layer_decay",
    "layer_decay_groups",
    "LayerScales",
    "scale_by_layer",
    "decoupled",
    "decoupled_weight_decay",
    "distributed",
    "donated_update",
    "elastic_net",
    "ensemble_step",
    "fista",
    "fista_iterate",
    "functional_model",
    "group_lasso",
    "head_lasso",
    "hypergradient",
    "identity",
    "implicit_hypergradient",
    "init_members",
    "joint_group_lasso",
    "inject_hyperparams",
    "join_schedules",
    "kfold",
    "l0",
    "l1",
    "l2",
    "lasso_cv",
    "lasso_path",
    "linear_schedule",
    "linear_warmup",
    "lion",
    "load_state_dict",
    "log_sum",
    "low_rank",
    "lp",
    "make_step",
    "masked",
    "max_norm",
    "max_spectral_norm",
    "mcp",
    "metrics",
    "muon",
    "n_m_sparsity",
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
    "scad",
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
    "semi_structured",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "schedule_free_sgd",
    "set_hyperparams",
    "sgd",
    "sparsity",
    "sparsity_target",
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
