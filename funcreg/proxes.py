"""Proximal operators and projections as plain tensor functions (the closed forms behind the penalties).

Examples:
    >>> import torch, funcreg as fr
    >>> fr.proxes.soft_threshold(torch.tensor([-2.0, 0.3]), 0.5)
    tensor([-1.5000,  0.0000])
"""

from funcreg._src.penalties.nonconvex import bridge_prox
from funcreg._src.penalties.nonconvex import hard_threshold
from funcreg._src.penalties.targets import keep_largest
from funcreg._src.penalties.targets import keep_n_of_m
from funcreg._src.penalties.nonconvex import log_sum_prox
from funcreg._src.penalties.nonconvex import mcp_prox
from funcreg._src.penalties.nonconvex import scad_prox
from funcreg._src.penalties.proxes import anchor_prox
from funcreg._src.penalties.proxes import elastic_net_prox
from funcreg._src.penalties.proxes import group_norms
from funcreg._src.penalties.proxes import group_soft_threshold
from funcreg._src.penalties.proxes import project_group_norm
from funcreg._src.penalties.proxes import project_non_negative
from funcreg._src.penalties.proxes import shrink
from funcreg._src.penalties.proxes import soft_threshold
from funcreg._src.forms.preconditioned import diagonal_elastic_net_prox
from funcreg._src.penalties.spectral import clip_singular_values, singular_value_thresholding, spectral_prox

__all__ = [
    "anchor_prox",
    "bridge_prox",
    "clip_singular_values",
    "diagonal_elastic_net_prox",
    "elastic_net_prox",
    "group_norms",
    "group_soft_threshold",
    "hard_threshold",
    "keep_largest",
    "keep_n_of_m",
    "log_sum_prox",
    "mcp_prox",
    "project_group_norm",
    "project_non_negative",
    "scad_prox",
    "shrink",
    "singular_value_thresholding",
    "soft_threshold",
    "spectral_prox",
]
