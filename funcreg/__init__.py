"""funcreg: functional, verified weight regularization for PyTorch.

Penalties, gradient transformations and optimizers as pure functions over parameter trees.
"""

from funcreg._src.alias import adam
from funcreg._src.alias import adamw
from funcreg._src.alias import sgd
from funcreg._src.base import EmptyState
from funcreg._src.base import GradientTransformation
from funcreg._src.base import identity
from funcreg._src.combine import PartitionState
from funcreg._src.combine import chain
from funcreg._src.combine import named_chain
from funcreg._src.combine import partition
from funcreg._src.schedules import constant_schedule
from funcreg._src.schedules import cosine_decay_schedule
from funcreg._src.schedules import join_schedules
from funcreg._src.schedules import linear_schedule
from funcreg._src.schedules import linear_warmup
from funcreg._src.schedules import warmup_cosine_decay_schedule
from funcreg._src.selection import Selection
from funcreg._src.selection import Selector
from funcreg._src.selection import buffers_of
from funcreg._src.selection import by_name
from funcreg._src.selection import by_predicate
from funcreg._src.selection import decay_mask
from funcreg._src.selection import params_of
from funcreg._src.transform import DecoupledWeightDecayState
from funcreg._src.transform import ScaleByAdamState
from funcreg._src.transform import ScaleByScheduleState
from funcreg._src.transform import TraceState
from funcreg._src.transform import add_decayed_weights
from funcreg._src.transform import clip_by_global_norm
from funcreg._src.transform import decoupled_weight_decay
from funcreg._src.transform import scale
from funcreg._src.transform import scale_by_adam
from funcreg._src.transform import scale_by_learning_rate
from funcreg._src.transform import trace
from funcreg._src.tree import leaf_names as tree_names
from funcreg._src.update import apply_updates
from funcreg._src.wrappers import ApplyIfFiniteState
from funcreg._src.wrappers import MaskedState
from funcreg._src.wrappers import apply_if_finite
from funcreg._src.wrappers import masked

__version__ = "0.1.0"

__all__ = [
    "ApplyIfFiniteState",
    "DecoupledWeightDecayState",
    "EmptyState",
    "GradientTransformation",
    "MaskedState",
    "PartitionState",
    "ScaleByAdamState",
    "ScaleByScheduleState",
    "Selection",
    "Selector",
    "TraceState",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_if_finite",
    "apply_updates",
    "buffers_of",
    "by_name",
    "by_predicate",
    "chain",
    "clip_by_global_norm",
    "constant_schedule",
    "cosine_decay_schedule",
    "decay_mask",
    "decoupled_weight_decay",
    "identity",
    "join_schedules",
    "linear_schedule",
    "linear_warmup",
    "masked",
    "named_chain",
    "params_of",
    "partition",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "sgd",
    "trace",
    "tree_names",
    "warmup_cosine_decay_schedule",
]
