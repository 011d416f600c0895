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
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from funcreg._src.selection import _suggest
from funcreg._src.validation import check_int

__all__ = ["LayerSize", "PruneReport", "prune", "prune_report"]

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
        elif not isinstance(child, _PRODUCERS + _ELEMENTWISE + _POOLS + _OUTPUT_ONLY):
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


class _Layer:
    """A working copy of one layer's tensors, sliced and folded as pruning goes."""

    def __init__(self, name: str, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.name, self.module = name, module
        self.tensors = {k: state[f"{name}.{k}"].clone() for k, _ in module.state_dict().items()}

    def get(self, key: str) -> torch.Tensor | None:
        """The tensor ``key``, or ``None`` (a layer without bias)."""
        return self.tensors.get(key)

    def req(self, key: str) -> torch.Tensor:
        """The tensor ``key``, which the layer has."""
        return self.tensors[key]


def _has_zero_padding(conv: nn.Conv2d) -> bool:
    if conv.padding_mode != "zeros":
        return False  # reflect/replicate/circular padding repeats the constant
    return any(p > 0 for p in conv._reversed_padding_repeated_twice)


def _walk_between(
    p: _Layer, q: _Layer, between: list[_Layer], units: int, zero_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, list[tuple[_Layer, int]]]:
    """Follows P's constant outputs (its biases) through the layers up to Q.

    Returns ``(values, constant, exact, group, norms)`` per input feature of Q (``units * group`` of
    them): the value a constant unit contributes (float64), whether the feature is constant whatever
    the input (its unit's row is zero, or a BatchNorm in between has weight 0 there), whether the value
    is exact at every position, how many input features of Q each unit feeds (``group``: 1, or H*W
    after a Flatten), and the BatchNorm layers in between with the features per unit each one sees.
    """
    bias = p.get("bias")
    values = torch.zeros(units, dtype=torch.float64) if bias is None else bias.double().cpu()
    exact = torch.ones(units, dtype=torch.bool)
    constant = zero_rows.clone()
    spatial = isinstance(p.module, nn.Conv2d)
    group: int | None = 1  # features per unit; None after a Flatten of a 4-d tensor, until a layer says
    norms: list[tuple[_Layer, int]] = []

    def features(layer: _Layer, count: int) -> int:
        nonlocal group, values, exact, constant
        if group is None:
            if count % units:
                raise ValueError(
                    f"prune: layer {layer.name!r} has {count} input features after the Flatten of the "
                    f"{units} channels of {p.name!r}; expected a multiple of {units}"
                )
            group = count // units
            values, exact = values.repeat_interleave(group), exact.repeat_interleave(group)
            constant = constant.repeat_interleave(group)
        if count != units * group:
            raise ValueError(
                f"prune: layer {layer.name!r} expects {count} input features, "
                f"{p.name!r} gives {units * group}"
            )
        return group

    for layer in between:
        m = layer.module
        if isinstance(m, _PRODUCERS):  # pragma: no cover - the caller splits at producers
            raise AssertionError
        if isinstance(m, _OUTPUT_ONLY):
            raise TypeError(
                f"prune: layer {layer.name!r} ({type(m).__name__}) mixes channels; "
                "it may only follow the last "
                f"Linear/Conv2d, not sit between {p.name!r} and {q.name!r}"
            )
        if isinstance(m, _NORMS):
            want_2d = isinstance(m, nn.BatchNorm2d)
            if want_2d != spatial:
                raise ValueError(
                    f"prune: layer {layer.name!r} is a {type(m).__name__} on the "
                    f"{'4-d output of a Conv2d' if spatial else 'features of a Linear (or a Flatten)'}"
                )
            g = 1 if spatial else features(layer, m.num_features)
            if spatial and m.num_features != units:
                raise ValueError(
                    f"prune: layer {layer.name!r} has {m.num_features} channels, {p.name!r} gives {units}"
                )
            mean, var = layer.req("running_mean").double().cpu(), layer.req("running_var").double().cpu()
            values = (values - mean) / torch.sqrt(var + m.eps)
            if m.affine:
                gamma = layer.req("weight").double().cpu()
                values = values * gamma + layer.req("bias").double().cpu()
                constant = constant | (gamma == 0)  # a zero BatchNorm weight outputs its bias (slimming)
            norms.append((layer, g))
        elif isinstance(m, _ELEMENTWISE):
            if not isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)):  # eval: identity
                values = m(values.view(1, -1)).view(-1)
        elif isinstance(m, _POOLS):
            if not spatial:
                raise ValueError(
                    f"prune: layer {layer.name!r} ({type(m).__name__}) pools the features of a Linear"
                )
            if isinstance(m, nn.AvgPool2d):
                pad = m.padding if isinstance(m.padding, tuple) else (m.padding,)
                if (m.count_include_pad and any(v > 0 for v in pad)) or m.divisor_override is not None:
                    exact = exact & (values == 0)  # border windows average in zeros: only 0 stays uniform
        elif isinstance(m, nn.Flatten):
            if spatial:
                spatial, group = False, None
        else:  # pragma: no cover - _leaves rejects everything else
            raise AssertionError(type(m))
    if isinstance(q.module, nn.Linear):
        if spatial:
            raise ValueError(
                f"prune: Linear {q.name!r} receives the 4-d output of Conv2d {p.name!r}; put an nn.Flatten() "
                "between them (a Linear on 4-d input mixes positions, not channels)"
            )
        features(q, q.module.in_features)
    else:
        if not spatial:
            raise ValueError(f"prune: Conv2d {q.name!r} receives the flat features of {p.name!r}")
        if q.module.in_channels != units:
            raise ValueError(
                f"prune: Conv2d {q.name!r} has {q.module.in_channels} input channels, "
                f"{p.name!r} gives {units}"
            )
    assert group is not None
    return values, constant, exact, group, norms


def _prune_pair(p: _Layer, q: _Layer, between: list[_Layer]) -> None:
    """Removes the units of ``p`` that ``q`` ignores or that can be folded into ``q``'s bias (in place)."""
    w_p, w_q = p.req("weight"), q.req("weight")
    units = w_p.shape[0]
    zero_rows = (w_p.reshape(units, -1) == 0).all(dim=1).cpu()
    values, constant, exact, group, norms = _walk_between(p, q, between, units, zero_rows)
    if isinstance(q.module, nn.Linear):
        columns = w_q.reshape(w_q.shape[0], units, group)  # (out, unit, feature of the unit's block)
        foldable = True
    else:
        columns = w_q.reshape(w_q.shape[0], units, -1)  # (out, in channel, kernel position)
        foldable = not _has_zero_padding(q.module)  # type: ignore[arg-type]
    ignored = (columns == 0).all(dim=2).all(dim=0).cpu()
    block_values, block_exact = values.view(units, group), exact.view(units, group)
    block_constant = constant.view(units, group).all(dim=1)
    constant_ok = block_constant & block_exact.all(dim=1) & torch.isfinite(block_values).all(dim=1)
    zero_constant = (block_values == 0).all(dim=1)
    remove = ignored | (constant_ok & (zero_constant | foldable))
    if bool(remove.all()):
        remove[0] = False  # keep one unit: zero-size layers help nobody
    keep = torch.nonzero(~remove).view(-1)
    folded = remove & ~ignored & ~zero_constant
    if bool(folded.any()):
        idx = torch.nonzero(folded).view(-1)
        cols = columns[:, idx.to(columns.device)].double()  # (out, n_folded, group or kernel)
        if isinstance(q.module, nn.Linear):
            delta = torch.einsum("ojg,jg->o", cols, block_values[idx].to(cols.device))
        else:
            delta = torch.einsum("ojk,j->o", cols, block_values[idx, 0].to(cols.device))
        bias = q.get("bias")
        base = torch.zeros_like(delta) if bias is None else bias.double()
        q.tensors["bias"] = (base + delta).to(w_q.dtype)
    # slice P's units, the norms' channels (or feature blocks), Q's input columns
    k = keep.to(w_p.device)
    p.tensors["weight"] = w_p[k]
    if p.get("bias") is not None:
        p.tensors["bias"] = p.req("bias")[k]
    for norm, g in norms:
        feat = (keep.view(-1, 1) * g + torch.arange(g).view(1, -1)).view(-1)
        for key in ("weight", "bias", "running_mean", "running_var"):
            if norm.get(key) is not None:
                norm.tensors[key] = norm.tensors[key][feat.to(norm.tensors[key].device)]
    if isinstance(q.module, nn.Linear):
        feat = (keep.view(-1, 1) * group + torch.arange(group).view(1, -1)).view(-1)
        q.tensors["weight"] = w_q[:, feat.to(w_q.device)]
    else:
        q.tensors["weight"] = w_q[:, k]


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
    (:mod:`funcreg._src.prune`): a unit goes when the next ``Linear``/``Conv2d`` ignores it (its input
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


# ----------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class LayerSize:
    """One ``Linear``/``Conv2d``/BatchNorm layer before and after pruning: units (output features or
    channels) and parameters."""

    name: str
    kind: str
    units_before: int
    units_after: int
    params_before: int
    params_after: int


@dataclass(frozen=True)
class PruneReport:
    """Sizes, FLOPs and measured inference time of a model before and after :func:`prune`.

    ``flops_*`` count ``2 x`` the multiply-accumulates of the ``Linear`` and ``Conv2d`` layers per
    example (bias additions, normalization, activations and pooling are not counted); ``seconds_*`` are
    the median wall time of one forward pass on the example input, measured here, in eval mode under
    ``torch.inference_mode``; ``max_abs_diff`` is the largest difference between the two models'
    outputs on that input. ``str(report)`` is a table; ``report.layers`` lists each layer's
    :class:`LayerSize` (units and parameters before and after).

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
        >>> w = model[2].weight.detach().clone(); w[:, :3] = 0.0  # the last layer ignores 3 hidden units
        >>> params = {**fr.params_of(model), "2.weight": w}
        >>> report = fr.prune_report(model, fr.prune(model, params), torch.randn(5, 4), params, repeats=2)
        >>> [(s.name, s.units_before, s.units_after) for s in report.layers]
        [('0', 6, 3), ('2', 1, 1)]
        >>> report.params_before, report.params_after  # (4*6 + 6) + (6 + 1), then (4*3 + 3) + (3 + 1)
        (37, 19)
    """

    layers: tuple[LayerSize, ...]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    seconds_before: float
    seconds_after: float
    max_abs_diff: float

    @property
    def param_ratio(self) -> float:
        """``params_after / params_before``."""
        return self.params_after / self.params_before

    @property
    def flop_ratio(self) -> float:
        """``flops_after / flops_before``."""
        return self.flops_after / self.flops_before if self.flops_before else float("nan")

    @property
    def speedup(self) -> float:
        """``seconds_before / seconds_after`` (as measured; noisy for tiny models)."""
        return self.seconds_before / self.seconds_after

    def table(self) -> str:
        """Per-layer units and parameters, then the totals, FLOPs and times."""
        rows = [("layer", "kind", "units", "params")]
        for s in self.layers:
            rows.append(
                (
                    s.name,
                    s.kind,
                    f"{s.units_before} -> {s.units_after}",
                    f"{s.params_before} -> {s.params_after}",
                )
            )
        rows.append(
            ("total", "", "", f"{self.params_before} -> {self.params_after} ({self.param_ratio:.1%})")
        )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append(f"FLOPs per example: {self.flops_before} -> {self.flops_after} ({self.flop_ratio:.1%})")
        lines.append(
            f"forward pass: {self.seconds_before * 1e3:.3f} ms -> {self.seconds_after * 1e3:.3f} ms "
            f"(x{self.speedup:.2f}, measured); max |output difference| {self.max_abs_diff:.2e}"
        )
        return "\n".join(lines)

    __str__ = table


def _count_flops(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The output on ``x`` and 2 x the multiply-accumulates of Linear/Conv2d layers per example."""
    total = [0]

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            total[0] += 2 * module.in_features * output.numel()
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * (module.in_channels // module.groups)
            total[0] += 2 * k * output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _PRODUCERS)]
    try:
        with torch.inference_mode():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    n = x.shape[0] if x.ndim > 0 else 1
    return out, total[0] // max(n, 1)


def _time(models: tuple[nn.Module, nn.Module], x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median wall time of a forward pass of each model, measured alternately (so that a slower
    moment of the machine slows both), after two warm-up passes each."""
    times: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for model in models:
            for _ in range(2):
                model(x)
        for _ in range(repeats):
            for model, store in zip(models, times):
                start = time.perf_counter()
                model(x)
                store.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _sizes(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, _PRODUCERS + _NORMS):
            units = m.weight.shape[0] if isinstance(m, _PRODUCERS) else m.num_features
            out[name] = (type(m).__name__, units, sum(p.numel() for p in m.parameters()))
    return out


def prune_report(
    model: nn.Module,
    pruned: nn.Module,
    example_input: torch.Tensor,
    params: Mapping[str, torch.Tensor] | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
    repeats: int = 20,
) -> PruneReport:
    """Compares ``model`` (with ``params``/``buffers`` loaded) and its pruned copy on ``example_input``.

    Counts parameters (all of each model), FLOPs per example (``2 x`` multiply-accumulates of
    ``Linear``/``Conv2d``, from the shapes of one forward pass), times ``repeats`` forward passes of
    each (the median, after two warm-up passes; both in eval mode) and the largest difference of their
    outputs. Neither model is modified (``model`` is copied to load ``params``). The two models are
    timed alternately, pass by pass, so that the machine's load affects both alike.

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> w = model[0].weight.detach().clone(); w[1:3] = 0.0
        >>> params = {**fr.params_of(model), "0.weight": w}
        >>> report = fr.prune_report(model, fr.prune(model, params), torch.randn(8, 3), params)
        >>> report.params_before, report.params_after  # (12 + 4) + (8 + 2), then (6 + 2) + (4 + 2)
        (26, 14)
        >>> report.flops_before, report.flops_after  # 2 * (3*4 + 4*2), 2 * (3*2 + 2*2)
        (40, 20)
        >>> report.max_abs_diff < 1e-6
        True
    """
    for what, m in (("model", model), ("pruned", pruned)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"prune_report: {what} must be a torch.nn.Module, got {type(m).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"prune_report: example_input must be a tensor, got {type(example_input).__name__}")
    check_int("repeats", repeats, low=1)
    original = copy.deepcopy(model)
    state = _state(original, params, buffers)
    original.load_state_dict(state)
    original.eval()
    was_training = pruned.training
    pruned.eval()
    try:
        out_before, flops_before = _count_flops(original, example_input)
        out_after, flops_after = _count_flops(pruned, example_input)
        seconds_before, seconds_after = _time((original, pruned), example_input, repeats)
    finally:
        pruned.train(was_training)
    if out_before.shape != out_after.shape:
        raise ValueError(
            f"prune_report: the models' outputs have shapes {tuple(out_before.shape)} "
            f"and {tuple(out_after.shape)}"
        )
    diff = float((out_before.double() - out_after.double()).abs().max()) if out_before.numel() else 0.0
    before, after = _sizes(original), _sizes(pruned)
    layers = tuple(
        LayerSize(name, kind, units, after.get(name, (kind, 0, 0))[1], n, after.get(name, (kind, 0, 0))[2])
        for name, (kind, units, n) in before.items()
    )
    return PruneReport(
        layers=layers,
        params_before=sum(p.numel() for p in original.parameters()),
        params_after=sum(p.numel() for p in pruned.parameters()),
        flops_before=flops_before,
        flops_after=flops_after,
        seconds_before=seconds_before,
        seconds_after=seconds_after,
        max_abs_diff=diff,
    )
