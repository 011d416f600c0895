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

Attention heads (:mod:`funcreg._src.analysis.prune.heads`) and the first layer's inputs
(``inputs=True``) follow rules of the same kind: a head goes when it adds exactly 0 to its layer's
output, an input when the first layer's columns for it are zero.

This module rebuilds the pruned model; the checks on the chain are in :mod:`funcreg._src.analysis.prune.chain`,
the rule for one pair of layers in :mod:`funcreg._src.analysis.prune.units` and the report in
:mod:`funcreg._src.analysis.prune.report`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from funcreg._src.analysis.prune.chain import _NORMS, _PRODUCERS, _SUPPORTED, _leaves, _state
from funcreg._src.analysis.prune.heads import no_nested_tensors, prune_heads
from funcreg._src.analysis.prune.modules import SelectInputs
from funcreg._src.analysis.prune.units import _Layer, _prune_pair
from funcreg._src.core.validation import check_bool
from funcreg._src.penalties.heads import AttentionHeads, find_attention
from funcreg._src.selection.named_params import _suggest

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


_Plan = tuple[list[tuple[str, nn.Module]], "tuple[str, torch.Tensor, int] | None"]


def _input_columns(layer: _Layer) -> tuple[torch.Tensor, int] | None:
    """The input columns (``Linear``) or channels (``Conv2d``) of ``layer`` that are not all zero,
    sliced out of its weight, and the input dimension they index; ``None`` when every one is used."""
    w = layer.req("weight")
    zero = (w.movedim(1, 0).reshape(w.shape[1], -1) == 0).all(dim=1).cpu()
    if not bool(zero.any()):
        return None
    if bool(zero.all()):
        zero[0] = False  # keep one input: zero-size layers help nobody
        if zero.numel() == 1:
            return None
    keep = torch.nonzero(~zero).view(-1)
    layer.tensors["weight"] = w[:, keep.to(w.device)]
    return keep, -1 if isinstance(layer.module, nn.Linear) else -3


def _chain_plan(leaves: list[tuple[str, nn.Module]], state: dict[str, torch.Tensor], inputs: bool) -> _Plan:
    """The layers of one chain rebuilt after pruning (nothing is changed yet), and with ``inputs``
    the first producer's kept inputs ``(its name, index, dim)``. Raises for a chain prune refuses."""
    layers = [_Layer(name, m, state) for name, m in leaves]
    producers = [i for i, layer in enumerate(layers) if isinstance(layer.module, _PRODUCERS)]
    for i, layer in enumerate(layers):
        if isinstance(layer.module, SelectInputs) and producers and i > producers[0]:
            raise TypeError(
                f"prune: layer {layer.name!r} (SelectInputs) selects features after a Linear/Conv2d; it may "
                "only come before the first one"
            )
    for a, b in zip(producers, producers[1:]):
        _prune_pair(layers[a], layers[b], layers[a + 1 : b])
    selected = None
    if inputs and producers:
        first = layers[producers[0]]
        kept = _input_columns(first)
        if kept is not None:
            selected = (first.name, kept[0], kept[1])
    rebuilt = [
        (layer.name, _rebuild(layer)) for layer in layers if isinstance(layer.module, _PRODUCERS + _NORMS)
    ]
    return rebuilt, selected


def _apply(pruned: nn.Module, plan: _Plan) -> None:
    """Puts a chain's rebuilt layers into ``pruned``, and its input selection before the first."""
    rebuilt, selected = plan
    for name, module in rebuilt:
        _set(pruned, name, module)
    if selected is None:
        return
    qualname, keep, dim = selected
    *path, last = qualname.split(".")
    parent = pruned.get_submodule(".".join(path))
    items = list(parent._modules.items())
    pos = [k for k, _ in items].index(last)
    before = items[pos - 1][1] if pos else None
    if isinstance(before, SelectInputs) and before.dim == dim:
        before.index = before.index[keep.to(before.index.device)]
        return
    key = "select_inputs"
    while key in parent._modules:
        key = f"_{key}"
    items.insert(pos, (key, SelectInputs(keep, dim)))
    parent._modules.clear()
    for k, m in items:
        parent.add_module(k, m)


def _nested_plans(
    module: nn.Module,
    prefix: str,
    skip: set[str],
    state: dict[str, torch.Tensor],
    inputs: bool,
    seen: set[int],
) -> list[_Plan]:
    """The plans of the ``nn.Sequential`` chains inside ``module`` (outside the attention layers
    ``skip``); a Sequential prune refuses is searched for chains inside it instead."""
    plans: list[_Plan] = []
    for name, child in module.named_children():
        qual = f"{prefix}{name}"
        if qual in skip or id(child) in seen:
            continue
        seen.add(id(child))
        if isinstance(child, nn.Sequential):
            try:
                plans.append(_chain_plan(_leaves(child, f"{qual}."), state, inputs))
                continue
            except (TypeError, ValueError):
                pass
        plans += _nested_plans(child, f"{qual}.", skip, state, inputs, seen)
    return plans


def _heads_of(model: nn.Module, heads: Any) -> tuple[AttentionHeads, ...]:
    if heads is None:
        return find_attention(model)
    if heads is False:
        return ()
    if isinstance(heads, AttentionHeads):
        return (heads,)
    if isinstance(heads, (tuple, list)) and all(isinstance(h, AttentionHeads) for h in heads):
        return tuple(heads)
    raise TypeError(
        f"prune: heads must be None (find the attention layers), False (leave them), or what "
        f"fr.attention_heads(model, ...) returns, got {heads!r}"
    )


def prune(
    model: nn.Module,
    params: Mapping[str, torch.Tensor] | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
    *,
    heads: AttentionHeads | Sequence[AttentionHeads] | bool | None = None,
    inputs: bool = False,
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

    A model with attention layers (``nn.MultiheadAttention``, or separate ``Linear`` query, key, value
    and output projections: see :func:`funcreg.attention_heads`) may be any module: each attention
    layer loses the heads that add exactly 0 (their output-projection columns, or their value rows and
    biases, are zero, as :func:`funcreg.head_lasso`'s prox leaves them), an ``nn.MultiheadAttention``
    becoming a :class:`funcreg.PrunedMultiheadAttention` (see :mod:`funcreg._src.analysis.prune.heads`);
    and each ``nn.Sequential`` inside it made only of the layers above (a transformer block's MLP) is
    pruned as a chain, on its own (a Sequential with other layers is searched for such chains inside
    it, and otherwise left as it is). A model that is neither raises ``TypeError``.

    With ``inputs=True`` the first ``Linear``/``Conv2d`` of each chain also loses its zero input columns
    or channels (:func:`funcreg.group_lasso` with ``axis=1`` zeroes them), and a
    :class:`funcreg.SelectInputs` put before it picks the inputs it still reads: the pruned model takes
    the same inputs, and ``SelectInputs.index`` says which to feed a model without it.

    Args:
        model: the architecture (its own weights are used for whatever ``params`` does not give).
        params: trained parameters by name (``fr.params_of(model)`` names; ``TrainState.params`` of
            one member). Checked by name and shape.
        buffers: trained buffers by name (BatchNorm running statistics, ``TrainState.buffers``).
        heads: which attention layers to prune: ``None`` finds them with the defaults of
            :func:`funcreg.attention_heads`; pass what ``fr.attention_heads(model, ...)`` returns for other
            module names or head counts, or ``False`` to leave attention alone.
        inputs: also remove the first layer's unused inputs (see above).

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
        >>> w = params["0.weight"].clone(); w[:, 1] = 0.0  # the second input is unused
        >>> fr.prune(model, {**params, "0.weight": w}, inputs=True)
        Sequential(
          (select_inputs): SelectInputs(2 inputs, dim=-1)
          (0): Linear(in_features=2, out_features=4, bias=True)
          (1): ReLU()
          (2): Linear(in_features=4, out_features=2, bias=True)
        )
    """
    check_bool("inputs", inputs)
    specs = _heads_of(model, heads)
    if isinstance(model, nn.Sequential) and not specs:
        leaves = _leaves(model)
        state = _state(model, params, buffers)
        chain = copy.deepcopy(model)
        _apply(chain, _chain_plan(leaves, state, inputs))
        return chain.eval()
    if not specs:
        raise TypeError(
            f"prune expects an nn.Sequential (a chain of layers) or a model with attention layers, got a "
            f"{type(model).__name__}; supported layers: {_SUPPORTED}"
        )
    state = _state(model, params, buffers)
    for spec in specs:
        missing = [name for name, _, _ in spec.pieces if name not in state]
        if missing:
            raise ValueError(
                f"prune: heads names the tensor {missing[0]!r} of the attention layer {spec.name!r}, which "
                f"the model does not have{_suggest(missing[0], list(state))} (pass fr.attention_heads(model))"
            )
    pruned: nn.Module = copy.deepcopy(model)
    pruned.load_state_dict(state)
    skip = {spec.name for spec in specs}
    plans = [] if "" in skip else _nested_plans(model, "", skip, state, inputs, set())
    for spec in specs:
        pruned = prune_heads(model, pruned, spec, state)
    for plan in plans:
        _apply(pruned, plan)
    no_nested_tensors(pruned)
    return pruned.eval()
