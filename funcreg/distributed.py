"""funcreg on ``torch.distributed``: data-parallel gradient averaging and sharded sweeps.

Sharded parameters (FSDP2's ``fully_shard``, tensor parallelism: ``DTensor`` leaves) need nothing from
this module: every transform, penalty form and diagnostic works on them as on plain tensors, with
global results (see the guide page "Beyond one machine"). What is here:

* data parallelism in the pure update: :func:`mean_gradients` (or :func:`sum_gradients`) first in a
  chain, and :func:`broadcast` to start every rank from the same parameters;
* sharded sweeps: :func:`sweep_members` (which members this rank trains), :func:`take_members` (its
  slice of a stacked tree) and :func:`gather_members` (the results, in member order, on one rank).

Examples:
    >>> import funcreg as fr
    >>> fr.distributed.sweep_members(6, rank=1, world_size=4)
    [1, 5]
"""

from funcreg._src.distributed.data_parallel import broadcast, mean_gradients, sum_gradients
from funcreg._src.distributed.sweep import gather_members, sweep_members, take_members

__all__ = [
    "broadcast",
    "gather_members",
    "mean_gradients",
    "sum_gradients",
    "sweep_members",
    "take_members",
]
