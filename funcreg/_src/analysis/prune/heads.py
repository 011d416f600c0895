"""Removing attention heads: which heads go, and the smaller layer that replaces the attention.

Head ``h`` of an attention layer adds ``O[:, h] @ softmax(q_h k_h^T / sqrt(d)) v_h`` to the output
(``O[:, h]`` its columns of the output projection). It adds exactly 0 for every finite input, and is
removed, when

1. ``O[:, h]`` is zero (the output ignores the head), or
2. ``v_h`` is zero whatever the input: the head's value rows and value bias (and ``bias_v``) are
   zero, so it averages zeros.

(Group lasso over heads zeroes all of a head's tensors at once, so both hold.) Zero query and key
rows alone do not make a head removable: it then averages its values uniformly. The output
projection's bias is not a head's and is kept; so is at least one head.

An ``nn.MultiheadAttention`` with heads removed becomes a :class:`PrunedMultiheadAttention`; in a
module with separate ``Linear`` projections the four ``Linear`` modules are replaced by narrower ones
and the head count attributes found by :func:`funcreg.attention_heads` (``num_heads``,
``num_attention_heads``, ...; with ``num_key_value_heads`` and ``all_head_size`` where they equal the
old values) are set to the new count, so a forward that reshapes by them keeps working.
"""

from __future__ import annotations

import torch
from torch import nn

from funcreg._src.analysis.prune.modules import PrunedMultiheadAttention
from funcreg._src.penalties.heads import AttentionHeads

_DERIVED = ("num_key_value_heads",)
_WIDTHS = ("all_head_size", "inner_dim")


def _by_head(t: torch.Tensor, axis: int, heads: int) -> torch.Tensor:
    """``t`` with ``axis`` split into ``(heads, rest)``: the head index at ``axis``."""
    return t.reshape(*t.shape[:axis], heads, t.shape[axis] // heads, *t.shape[axis + 1 :])


def _zero_heads(t: torch.Tensor, axis: int, heads: int) -> torch.Tensor:
    """Per head: whether its share of ``t`` along ``axis`` is all zero."""
    split = _by_head(t, axis, heads).movedim(axis, 0)
    return (split.reshape(heads, -1) == 0).all(dim=1).cpu()


def _keep(t: torch.Tensor, axis: int, heads: int, keep: torch.Tensor) -> torch.Tensor:
    """``t`` with only the kept heads' share along ``axis``."""
    split = _by_head(t, axis, heads).index_select(axis, keep.to(t.device))
    return split.reshape(*t.shape[:axis], -1, *t.shape[axis + 1 :])


def _value_parts(
    spec: AttentionHeads, m: nn.Module, state: dict[str, torch.Tensor]
) -> list[tuple[torch.Tensor, int]]:
    """The value rows, value bias and ``bias_v`` of every head, each with the axis of its heads."""
    p = f"{spec.name}." if spec.name else ""
    if spec.kind == "projections":
        assert spec.v is not None
        token = f"{p}bias_v"  # a module's own extra value token (PrunedMultiheadAttention's)
        return [(state[n], axis) for n, axis, _ in spec.pieces if n.startswith(f"{spec.v}.") or n == token]
    assert isinstance(m, nn.MultiheadAttention)
    e = m.embed_dim
    if m._qkv_same_embed_dim:
        parts = [(state[f"{p}in_proj_weight"][2 * e :], 0)]
    else:
        parts = [(state[f"{p}v_proj_weight"], 0)]
    if m.in_proj_bias is not None:
        parts.append((state[f"{p}in_proj_bias"][2 * e :], 0))
    if m.bias_v is not None:
        parts.append((state[f"{p}bias_v"], 2))
    return parts


def removable_heads(spec: AttentionHeads, model: nn.Module, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per head of ``spec``, whether it adds exactly 0 to the layer's output (the rule above)."""
    h = spec.num_heads
    m = model.get_submodule(spec.name)
    o_name = spec.o if spec.o is not None else (f"{spec.name}.out_proj" if spec.name else "out_proj")
    o = state[f"{o_name}.weight"]
    ignored = _zero_heads(o, 1, h)
    silent = torch.ones(h, dtype=torch.bool)
    for t, axis in _value_parts(spec, m, state):
        silent &= _zero_heads(t, axis, h)
    return ignored | silent


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, source: nn.Linear) -> nn.Linear:
    new = nn.utils.skip_init(
        nn.Linear,
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        new.weight.requires_grad_(source.weight.requires_grad)
        if bias is not None:
            new.bias.copy_(bias)
            new.bias.requires_grad_(
                source.weight.requires_grad if source.bias is None else source.bias.requires_grad
            )
    return new


def _set(root: nn.Module, qualname: str, module: nn.Module) -> None:
    *path, last = qualname.split(".")
    parent = root.get_submodule(".".join(path)) if path else root
    setattr(parent, last, module)


def _prune_projections(
    pruned: nn.Module, spec: AttentionHeads, state: dict[str, torch.Tensor], keep: torch.Tensor
) -> None:
    h, kept = spec.num_heads, int(keep.numel())
    for qual, axis in ((spec.q, 0), (spec.k, 0), (spec.v, 0), (spec.o, 1)):
        assert qual is not None
        source = pruned.get_submodule(qual)
        assert isinstance(source, nn.Linear)
        w = _keep(state[f"{qual}.weight"], axis, h, keep)
        bias = state.get(f"{qual}.bias")
        if bias is not None and axis == 0:
            bias = _keep(bias, 0, h, keep)
        _set(pruned, qual, _linear(w, bias, source))
    for qual, attr in spec.count_attrs:
        holder = pruned.get_submodule(qual)
        setattr(holder, attr, kept)
        for name in _DERIVED:
            if getattr(holder, name, None) == h:
                setattr(holder, name, kept)
        for name in _WIDTHS:
            if getattr(holder, name, None) == h * spec.value_dim:
                setattr(holder, name, kept * spec.value_dim)
    layer = pruned.get_submodule(spec.name)
    p = f"{spec.name}." if spec.name else ""
    for name, axis, _ in spec.pieces:
        if name in (f"{p}bias_k", f"{p}bias_v"):
            source_param = getattr(layer, name[len(p) :])
            t = _keep(state[name], axis, h, keep).clone()
            setattr(layer, name[len(p) :], nn.Parameter(t, requires_grad=source_param.requires_grad))
    if isinstance(layer, PrunedMultiheadAttention):
        layer.kept_heads = tuple(layer.kept_heads[i] for i in keep.tolist())


def _pruned_mha(
    spec: AttentionHeads, m: nn.MultiheadAttention, state: dict[str, torch.Tensor], keep: torch.Tensor
) -> PrunedMultiheadAttention:
    """The :class:`PrunedMultiheadAttention` holding the kept heads of ``m``."""
    p = f"{spec.name}." if spec.name else ""
    h, e = m.num_heads, m.embed_dim
    if m._qkv_same_embed_dim:
        packed = state[f"{p}in_proj_weight"]
        weights = [packed[:e], packed[e : 2 * e], packed[2 * e :]]
        source = m.in_proj_weight
    else:
        weights = [state[f"{p}{n}_proj_weight"] for n in "qkv"]
        source = m.q_proj_weight
    biases: list[torch.Tensor | None] = [None, None, None]
    if m.in_proj_bias is not None:
        packed_b = state[f"{p}in_proj_bias"]
        biases = [packed_b[:e], packed_b[e : 2 * e], packed_b[2 * e :]]
    new = PrunedMultiheadAttention(
        e, int(keep.numel()), m.head_dim, kdim=m.kdim, vdim=m.vdim, bias=m.in_proj_bias is not None,
        add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn, dropout=m.dropout,
        batch_first=m.batch_first, kept_heads=keep.tolist(), source_num_heads=h,
        device=weights[0].device, dtype=weights[0].dtype,
    )  # fmt: skip
    with torch.no_grad():
        for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
            proj.weight.copy_(_keep(w, 0, h, keep))
            if b is not None:
                proj.bias.copy_(_keep(b, 0, h, keep))
        new.out_proj.weight.copy_(_keep(state[f"{p}out_proj.weight"], 1, h, keep))
        if new.out_proj.bias is not None:
            new.out_proj.bias.copy_(state[f"{p}out_proj.bias"])
        for name in ("bias_k", "bias_v"):
            target = getattr(new, name)
            if target is not None:
                target.copy_(_keep(state[f"{p}{name}"], 2, h, keep))
    for param in new.parameters():
        param.requires_grad_(source.requires_grad)
    return new.train(m.training)


def prune_heads(
    model: nn.Module, pruned: nn.Module, spec: AttentionHeads, state: dict[str, torch.Tensor]
) -> nn.Module:
    """Removes the heads of ``spec`` that add 0 (in ``pruned``, a copy of ``model`` holding ``state``);
    returns ``pruned``, or the new layer where the attention layer is the model itself."""
    remove = removable_heads(spec, model, state)
    if bool(remove.all()):
        remove[0] = False  # keep one head: a zero-width attention helps nobody
    if not bool(remove.any()):
        return pruned
    keep = torch.nonzero(~remove).view(-1)
    if spec.kind == "projections":
        _prune_projections(pruned, spec, state, keep)
        return pruned
    m = model.get_submodule(spec.name)
    assert isinstance(m, nn.MultiheadAttention)
    new = _pruned_mha(spec, m, state, keep)
    if not spec.name:
        return new
    _set(pruned, spec.name, new)
    return pruned


def no_nested_tensors(pruned: nn.Module) -> None:
    """Turns off the nested-tensor path of every ``nn.TransformerEncoder`` holding a pruned attention
    layer (that path reads the packed projections of ``nn.MultiheadAttention``)."""
    for m in pruned.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
            isinstance(x, PrunedMultiheadAttention) for x in m.modules()
        ):
            m.use_nested_tensor = False
