"""The chains :func:`funcreg.prune` accepts, and the tensors it reads from them.

The pruning rule is exact only for layers whose effect on a constant unit is known, so the model is
checked layer by layer up front: an unsupported layer raises here, naming it, instead of producing a
pruned model whose outputs differ.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from funcreg._src.analysis.prune.modules import SelectInputs
from funcreg._src.selection.named_params import _suggest

_PRODUCERS = (nn.Linear, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# elementwise: a constant in, the same constant out at every position
_ELEMENTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LogSigmoid, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Threshold,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
)  # fmt: skip
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_OUTPUT_ONLY = (nn.Softmax, nn.LogSoftmax, nn.Softmin)  # mix channels: only after the last producer
_SUPPORTED = (
    "Linear, Conv2d (groups=1), BatchNorm1d/2d, elementwise activations, Dropout, MaxPool2d, AvgPool2d, "
    "AdaptiveAvg/MaxPool2d, Flatten"
)


def _leaves(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The layers of a (nested) ``nn.Sequential``, by qualified name, checked against what prune supports."""
    out = []
    for name, child in model.named_children():
        qual = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            out.extend(_leaves(child, f"{qual}."))
            continue
        if isinstance(child, nn.Conv2d):
            if child.groups != 1:
                raise ValueError(
                    f"prune: layer {qual!r} is a grouped Conv2d (groups={child.groups}); only groups=1 is "
                    "supported (a filter of a grouped convolution sees only its group's channels)"
                )
            if child.padding_mode != "zeros" and isinstance(child.padding, str):
                raise ValueError(
                    f"prune: layer {qual!r} combines padding={child.padding!r} "
                    f"with padding_mode={child.padding_mode!r}"
                )
        elif isinstance(child, _NORMS):
            if not child.track_running_stats:
                raise ValueError(
                    f"prune: layer {qual!r} is a {type(child).__name__} with track_running_stats=False: "
                    "in eval mode it normalizes with batch statistics, so a unit's constant output is not "
                    "a constant after it"
                )
        elif isinstance(child, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)) and child.return_indices:
            raise ValueError(
                f"prune: layer {qual!r} returns indices (return_indices=True); the chain needs tensors"
            )
        elif isinstance(child, nn.Flatten):
            if child.start_dim != 1 or child.end_dim != -1:
                raise ValueError(
                    f"prune: layer {qual!r} is "
                    f"Flatten(start_dim={child.start_dim}, end_dim={child.end_dim}); "
                    "only Flatten(1, -1) (one sample's channels, then positions) is supported"
                )
        elif not isinstance(child, _PRODUCERS + _ELEMENTWISE + _POOLS + _OUTPUT_ONLY + (SelectInputs,)):
            kind = type(child).__name__
            what = (
                "a module with children that is not an nn.Sequential (a residual block, say: its output is "
                "not the chain of its layers)"
                if any(True for _ in child.children())
                else "a layer prune does not know how to slice"
            )
            raise TypeError(
                f"prune: layer {qual!r} is a {kind}, {what}; "
                f"prune supports nn.Sequential chains of {_SUPPORTED}"
            )
        if isinstance(child, _PRODUCERS + _NORMS) and any(p.is_meta for p in child.parameters()):
            raise ValueError(f"prune: layer {qual!r} has uninitialized (meta) parameters")
        out.append((qual, child))
    return out


def _state(
    model: nn.Module, params: Mapping[str, torch.Tensor] | None, buffers: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """The model's own tensors, overridden by ``params`` and ``buffers`` (checked by name and shape)."""
    own = {k: v.detach() for k, v in model.state_dict().items()}
    state = dict(own)
    for what, given in (("params", params), ("buffers", buffers)):
        if given is None:
            continue
        if not isinstance(given, Mapping):
            raise TypeError(
                f"prune: {what} must be a dict {{name: tensor}} (fr.params_of(model), "
                f"TrainState.{what}), got {type(given).__name__}"
            )
        for key, value in given.items():
            if key not in own:
                raise ValueError(
                    f"prune: {what} has a key {key!r} the model does not have{_suggest(key, list(own))}"
                )
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"prune: {what}[{key!r}] is a {type(value).__name__}, not a tensor")
            if value.shape != own[key].shape:
                hint = (
                    " (a stacked ensemble? pass one member: fr.unstack(params)[i])"
                    if value.ndim == own[key].ndim + 1
                    else ""
                )
                raise ValueError(
                    f"prune: {what}[{key!r}] has shape {tuple(value.shape)}, "
                    f"the model's is {tuple(own[key].shape)}{hint}"
                )
            state[key] = value.detach()
    return state
