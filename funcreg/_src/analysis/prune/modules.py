"""The modules a pruned model may hold that torch has no equal for.

``nn.MultiheadAttention`` ties the width of its heads to the embedding (``head_dim = embed_dim /
num_heads``, and its projections are ``embed_dim`` wide), so an attention layer with heads removed,
``kept * head_dim`` wide inside and ``embed_dim`` outside, cannot be one. :class:`PrunedMultiheadAttention`
is that layer: the same forward signature and the same computation, over the kept heads.
:class:`SelectInputs` reads the inputs a pruned first layer still uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class SelectInputs(nn.Module):
    """Keeps the entries ``index`` of its input along ``dim`` (``x.index_select(dim, index)``).

    :func:`funcreg.prune` with ``inputs=True`` puts it before a first ``Linear`` (``dim=-1``) or
    ``Conv2d`` (``dim=-3``) whose zero input columns it removed, so the pruned model takes the same
    inputs as the original. To feed the pruned layer directly, slice the data with ``index`` and drop
    this module.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.SelectInputs([0, 2])(torch.tensor([[1.0, 2.0, 3.0]]))
        tensor([[1., 3.]])
    """

    index: torch.Tensor

    def __init__(self, index: Sequence[int] | torch.Tensor, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long).reshape(-1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(self.dim, self.index.to(x.device))

    def extra_repr(self) -> str:
        return f"{self.index.numel()} inputs, dim={self.dim}"


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (``True``: not allowed) as the additive ``-inf`` mask; a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    return mask.to(dtype)


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` over a subset of its heads: what :func:`funcreg.prune` puts in the
    place of one whose zero heads it removed.

    The projections are ``Linear`` modules ``q_proj``, ``k_proj``, ``v_proj`` (``num_heads * head_dim``
    outputs, from ``embed_dim``, ``kdim`` and ``vdim`` inputs) and ``out_proj`` (back to ``embed_dim``);
    ``bias_k``/``bias_v``, ``add_zero_attn``, ``dropout`` and ``batch_first`` mean what they mean for
    ``nn.MultiheadAttention``, and ``forward`` takes the same arguments and computes the same output.
    The scores are scaled by ``head_dim ** -0.5``, the original layer's head width. ``kept_heads`` are
    the original indices of the heads kept, out of ``source_num_heads``: a 3-d ``attn_mask`` given
    per original head (``batch * source_num_heads`` first) has its kept heads' rows selected. The
    attention weights returned (``need_weights=True``) are those of the kept heads (their average, by
    default), which differs from the original average over all heads; the output does not.

    Inside an ``nn.TransformerEncoderLayer`` it makes torch take the general path, not the fused one
    (``_qkv_same_embed_dim`` is ``False``); :func:`funcreg.prune` turns off the nested-tensor path of
    an ``nn.TransformerEncoder`` holding one.

    Examples:
        >>> import torch, funcreg as fr
        >>> _ = torch.manual_seed(0)
        >>> mha = torch.nn.MultiheadAttention(8, num_heads=4, batch_first=True).eval()
        >>> w = mha.in_proj_weight.detach().clone()
        >>> w[2 * 8 + 2 : 2 * 8 + 4] = 0.0  # head 1's value rows
        >>> b = mha.in_proj_bias.detach().clone(); b[2 * 8 + 2 : 2 * 8 + 4] = 0.0
        >>> params = {**fr.params_of(mha), "in_proj_weight": w, "in_proj_bias": b}
        >>> small = fr.prune(mha, params)
        >>> small
        PrunedMultiheadAttention(
          3 of 4 heads of 2, embed_dim=8, batch_first=True
          (q_proj): Linear(in_features=8, out_features=6, bias=True)
          (k_proj): Linear(in_features=8, out_features=6, bias=True)
          (v_proj): Linear(in_features=8, out_features=6, bias=True)
          (out_proj): Linear(in_features=6, out_features=8, bias=True)
        )
        >>> x = torch.randn(2, 5, 8)
        >>> full = torch.func.functional_call(mha, params, (x, x, x), {"need_weights": False})[0]
        >>> torch.testing.assert_close(small(x, x, x, need_weights=False)[0], full, atol=1e-6, rtol=1e-5)
    """

    head_projections = ("q_proj", "k_proj", "v_proj", "out_proj")
    # torch's fused Transformer paths read a packed in_proj_weight; this flag sends them the general way
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        dropout: float = 0.0,
        batch_first: bool = False,
        kept_heads: Sequence[int] | None = None,
        source_num_heads: int | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self.kept_heads = tuple(range(num_heads)) if kept_heads is None else tuple(int(h) for h in kept_heads)
        self.source_num_heads = num_heads if source_num_heads is None else source_num_heads
        if len(self.kept_heads) != num_heads:
            raise ValueError(f"kept_heads names {len(self.kept_heads)} heads, num_heads is {num_heads}")
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias, **kw)
        self.k_proj = nn.Linear(self.kdim, inner, bias=bias, **kw)
        self.v_proj = nn.Linear(self.vdim, inner, bias=bias, **kw)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **kw)
        self.bias_k: nn.Parameter | None
        self.bias_v: nn.Parameter | None
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, inner, **kw))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, inner, **kw))
        else:
            self.bias_k = self.bias_v = None

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        """The query, key and value biases stacked (``None`` without biases), as torch's checks read it."""
        if self.q_proj.bias is None:
            return None
        return torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])

    def extra_repr(self) -> str:
        return (
            f"{self.num_heads} of {self.source_num_heads} heads of {self.head_dim}, embed_dim={self.embed_dim}"
            + (f", kdim={self.kdim}" if self.kdim != self.embed_dim else "")
            + (f", vdim={self.vdim}" if self.vdim != self.embed_dim else "")
            + (f", dropout={self.dropout}" if self.dropout else "")
            + (", add_zero_attn=True" if self.add_zero_attn else "")
            + (", batch_first=True" if self.batch_first else "")
        )

    def _heads_mask(self, attn_mask: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor | None:
        mask = _float_mask(attn_mask, dtype)
        if mask is None or mask.dim() == 2:
            return mask
        if mask.dim() != 3 or mask.shape[0] != n * self.source_num_heads:
            raise RuntimeError(
                f"attn_mask of shape {tuple(mask.shape)}: expected (L, S) or "
                f"({n} * {self.source_num_heads} original heads, L, S)"
            )
        kept = torch.tensor(self.kept_heads, device=mask.device, dtype=torch.long)
        per_head = mask.view(n, self.source_num_heads, *mask.shape[1:]).index_select(1, kept)
        return per_head.reshape(n * self.num_heads, *mask.shape[1:])

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: ``(attn_output, attn_weights or None)``."""
        if is_causal and attn_mask is None:
            raise RuntimeError("need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        batched = query.dim() == 3
        if batched and self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if not batched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        length, n, _ = query.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        mask = self._heads_mask(attn_mask, n, q.dtype)
        padding = _float_mask(key_padding_mask, q.dtype)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, n, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, n, 1)])
            mask = None if mask is None else F.pad(mask, (0, 1))
            padding = None if padding is None else F.pad(padding, (0, 1))
        q = q.reshape(length, n * h, d).transpose(0, 1)
        k = k.reshape(k.shape[0], n * h, d).transpose(0, 1)
        v = v.reshape(v.shape[0], n * h, d).transpose(0, 1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n * h, 1, d)], dim=1)
            v = torch.cat([v, v.new_zeros(n * h, 1, d)], dim=1)
            mask = None if mask is None else F.pad(mask, (0, 1))
            padding = None if padding is None else F.pad(padding, (0, 1))
        s = k.shape[1]
        if padding is not None:
            padding = padding.view(n, 1, 1, s).expand(n, h, 1, s).reshape(n * h, 1, s)
            mask = padding if mask is None else mask + padding
        scores = torch.bmm(q * math.sqrt(1.0 / d), k.transpose(1, 2))
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(length * n, h * d)
        out = self.out_proj(out).view(length, n, self.embed_dim)
        if batched and self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        w = weights.view(n, h, length, s)
        if average_attn_weights:
            w = w.mean(dim=1)
        return out, (w if batched else w.squeeze(0))
