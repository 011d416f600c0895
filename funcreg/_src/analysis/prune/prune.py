"""Structured pruning export: remove the units that group lasso zeroed, keeping the outputs equal.

After training with :func:`funcreg.group_lasso` (``axis=0``: rows of ``Linear`` weights, filters of
``Conv2d`` kernels) in the proximal form, whole groups are exact zeros. :func:`prune` takes the model
and its trained parameters and returns a smaller copy of the model, with fewer output units or
filters and the layers around them sliced to match; :func:`prune_report` measures what was gained.

The rule (exact, never approximate). In an ``nn.Sequential`` chain, call *producers* the ``Linear``
and ``Conv2d`` layers and look at each unit ``j`` of a producer ``P`` (an output feature or filter)
that is not the model's output. Between ``P`` and the next producer ``Q`` only per-channel layers may
sit (BatchNorm, elementwise activations, Dropout, pooling, Flatten). Unit ``j`` is removed when

1. ``Q`` ignores it: ``Q``'s input columns for ``j`` (``Q.weight[:, j]``, or the block of input
   features a ``Flatten`` maps channel ``j`` to) are all zero; or
2. it is constant: its own weights are zero (``P.weight[j]`` is an all-zero row or filter), so it
   outputs ``P.bias[j]`` (0 without a bias), or a BatchNorm between ``P`` and ``Q`` has weight 0 for
   it (network slimming: an L1 prox on BatchNorm weights), so it outputs that BatchNorm's bias; the
   layers up to ``Q`` map it to a constant ``c_j``; then ``c_j = 0`` is simply dropped, and
   ``c_j != 0`` is *folded* into ``Q``'s bias
   (``Q.bias += Q.weight[:, j] @ c_j``, summed over the kernel for a convolution). Folding is exact
   when every output of ``Q`` sees ``c_j`` in all its inputs: always for a ``Linear``, and for a
   ``Conv2d`` without zero padding; where it is not (a zero-padded ``Conv2d``, or an ``AvgPool2d``
   that counts its zero padding), a unit with ``c_j != 0`` is kept.

Removing unit ``j`` slices ``P``'s row and bias, the channels of the BatchNorm layers in between
(``weight``, ``bias``, ``running_mean``, ``running_var``) and ``Q``'s input columns. Producers are
processed front to back, so a layer whose columns were sliced and bias folded is then pruned itself.
The last producer's outputs (the model's outputs) and the first producer's inputs are never changed,
and a layer keeps at least one unit.

The pruned model is returned in eval mode: its outputs equal the original's in eval mode (BatchNorm
with running statistics, Dropout off) on every finite input, up to floating-point rounding (a removed
unit's contribution is added in another order).

This module rebuilds the pruned model; the checks on the chain are in :mod:`funcreg._src.analysis.prune.chain`,
the rule for one pair of layers in :mod:`funcreg._src.analysis.prune.units` and the report in
:mod:`funcreg._src.analysis.prune.report`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from funcreg._src.analysis.prune.chain import _NORMS, _PRODUCERS, _SUPPORTED, _leaves, _state
from funcreg._src.analysis.prune.units import _Layer, _prune_pair

__all__ = ["prune"]


def _rebuild(layer: _Layer) -> nn.Module:
    """A new module of the same kind and configuration holding the layer's (sliced) tensors."""
    m, t = layer.module, layer.tensors
    w = t["weight"] if "weight" in t else t["running_mean"]
    kw: dict[str, Any] = {"device": w.device, "dtype": w.dtype}
    if isinstance(m, nn.Linear):
        new = nn.utils.skip_init(
            nn.Linear, t["weight"].shape[1], t["weight"].shape[0], bias="bias" in t, **kw
        )
    elif isinstance(m, nn.Conv2d):
        new = nn.utils.skip_init(
            nn.Conv2d, t["weight"].shape[1], t["weight"].shape[0], m.kernel_size, stride=m.stride,
            padding=m.padding, dilation=m.dilation, groups=1, bias="bias" in t, padding_mode=m.padding_mode,
            **kw,
        )  # fmt: skip
    else:
        new = nn.utils.skip_init(
            type(m), t["running_mean"].shape[0], eps=m.eps, momentum=m.momentum, affine=m.affine,
            track_running_stats=True, **kw,
        )  # fmt: skip
    with torch.no_grad():
        for name, param in new.named_parameters():
            param.copy_(t[name])
            source = getattr(m, name, None)  # a bias added by folding follows the weight
            param.requires_grad_((source if source is not None else m.weight).requires_grad)
        for name, buf in new.named_buffers():
            buf.copy_(t[name])
    return new


def _set(root: nn.Module, qualname: str, module: nn.Module) -> None:
    """Replaces the submodule at the dotted ``qualname`` of ``root`` (nested Sequentials included)."""
    *path, last = qualname.split(".")
    parent = root
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, last, module)


def prune(
    model: nn.Module,
    params: Mapping[str, torch.Tensor] | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A smaller copy of ``model`` without the units its (group-lasso) zeros make removable.

    ``model`` is an ``nn.Sequential`` (nested ones are followed) of ``Linear``, ``Conv2d``
    (``groups=1``), ``BatchNorm1d``/``BatchNorm2d``, elementwise activations, Dropout, pooling and
    ``Flatten``; anything else (a residual block, a grouped convolution) raises, naming the layer.
    Which units go, and why the outputs do not change, is the rule of this module
    (:mod:`funcreg._src.analysis.prune.prune`): a unit goes when the next ``Linear``/``Conv2d`` ignores it (its input
    columns are zero), or when it is constant (its own row or filter is zero, or a BatchNorm weight
    after it is) and its constant output is 0 or can be folded exactly into the next layer's bias.
    The last layer's outputs are never removed.

    Args:
        model: the architecture (its own weights are used for whatever ``params`` does not give).
        params: trained parameters by name (``fr.params_of(model)`` names; ``TrainState.params`` of
            one member). Checked by name and shape.
        buffers: trained buffers by name (BatchNorm running statistics, ``TrainState.buffers``).

    Returns:
        A new module in eval mode, with the same layer names; its outputs equal ``model``'s (with
        ``params`` and ``buffers`` loaded, in eval mode) on every finite input, up to rounding.
        ``model`` and the given tensors are not modified.

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> params = fr.params_of(model)
        >>> w = params["0.weight"].clone(); w[1:3] = 0.0  # rows 1 and 2 zeroed (as a group-lasso prox does)
        >>> small = fr.prune(model, {**params, "0.weight": w})
        >>> small
        Sequential(
          (0): Linear(in_features=3, out_features=2, bias=True)
          (1): ReLU()
          (2): Linear(in_features=2, out_features=2, bias=True)
        )
        >>> x = torch.randn(5, 3)
        >>> full = torch.func.functional_call(model, {**params, "0.weight": w}, (x,))
        >>> torch.allclose(small(x), full, atol=1e-6)
        True
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"prune expects an nn.Sequential (a chain of layers), got a {type(model).__name__}; "
            f"supported layers: {_SUPPORTED}"
        )
    leaves = _leaves(model)
    state = _state(model, params, buffers)
    layers = [_Layer(name, m, state) for name, m in leaves]
    producers = [i for i, layer in enumerate(layers) if isinstance(layer.module, _PRODUCERS)]
    for a, b in zip(producers, producers[1:]):
        _prune_pair(layers[a], layers[b], layers[a + 1 : b])
    pruned = copy.deepcopy(model)
    for layer in layers:
        if isinstance(layer.module, _PRODUCERS + _NORMS):
            _set(pruned, layer.name, _rebuild(layer))
    return pruned.eval()
