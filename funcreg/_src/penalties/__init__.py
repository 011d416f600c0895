"""Penalties: one object per regularizer, from which every form of applying it is derived.

A penalty ``P`` is a pure function of a parameter tree with

* ``P(params)``: the value, a 0-d tensor that ``torch.func.grad`` can differentiate (the loss term);
* ``P.grad(params)``: its gradient (closed form where known, autodiff otherwise; zeros for parameters
  the penalty does not select), used by the coupled and decoupled forms;
* ``P.prox(params, step)``: the proximal map ``argmin_z 1/2 ||z - v||^2 + step * P(z)`` where a closed
  form exists (exact zeros for L1-type penalties), used by the proximal form;
* ``P.terms(params)``: the value of each named term, so a sum of penalties stays readable.

Modules: ``base`` (the protocol, :class:`FlatParams`, sums), ``proxes`` (the proximal operators as
plain tensor functions), ``leaf`` (leafwise penalties described by a :class:`LeafRule`),
``elementwise`` (L2, L1, elastic net, Lp, anchor), ``nonconvex`` (MCP, SCAD, L0, log-sum, bridge), ``targets`` (sparsity targets), ``structural`` (group lasso, orthogonality,
max-norm, non-negativity) and ``custom`` (:func:`penalty`).
"""

from funcreg._src.penalties.base import Coefficient
from funcreg._src.penalties.base import FlatParams
from funcreg._src.penalties.base import Penalty
from funcreg._src.penalties.base import SumPenalty
from funcreg._src.penalties.base import check_coefficient
from funcreg._src.penalties.base import records_call
from funcreg._src.penalties.base import selection
from funcreg._src.penalties.custom import CustomPenalty, penalty
from funcreg._src.penalties.elementwise import anchor, elastic_net, l1, l2, lp
from funcreg._src.penalties.leaf import LeafPenalty, LeafRule
from funcreg._src.penalties.nonconvex import bridge, l0, log_sum, mcp, scad
from funcreg._src.penalties.targets import n_m_sparsity, sparsity_target
from funcreg._src.penalties.structural import group_lasso, max_norm, non_negative, orthogonal

__all__ = [
    "Coefficient",
    "CustomPenalty",
    "FlatParams",
    "LeafPenalty",
    "LeafRule",
    "Penalty",
    "SumPenalty",
    "anchor",
    "bridge",
    "check_coefficient",
    "elastic_net",
    "group_lasso",
    "l0",
    "l1",
    "l2",
    "log_sum",
    "lp",
    "max_norm",
    "n_m_sparsity",
    "mcp",
    "non_negative",
    "orthogonal",
    "penalty",
    "records_call",
    "scad",
    "selection",
    "sparsity_target",
]
