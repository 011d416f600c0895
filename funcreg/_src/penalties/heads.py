"""Attention heads as joint groups: found in a model, penalized by :func:`head_lasso`.

Head ``h`` of an attention layer is its rows of the query, key and value projections (and of their
biases) together with its columns of the output projection: a joint group of
:mod:`funcreg._src.penalties.joint`. :func:`attention_heads` finds the layers
(``nn.MultiheadAttention``, or modules with separate q/k/v/o projections) and :func:`head_lasso` is
the joint group lasso over their heads, so the proximal form zeroes whole heads, which
:func:`funcreg.prune` then removes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from funcreg._src.core.describe import fmt
from funcreg._src.penalties.base import Coefficient, Penalty
from funcreg._src.penalties.joint import JointFamily, JointGroupLasso, Piece, check_scalar_coeff, joint_norms
from funcreg._src.selection.named_params import _suggest

QUERY_NAMES = ("q_proj", "query", "self.query")
KEY_NAMES = ("k_proj", "key", "self.key")
VALUE_NAMES = ("v_proj", "value", "self.value")
OUTPUT_NAMES = ("o_proj", "out_proj", "output.dense", "dense")
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
HEAD_WIDTH_ATTRS = ("head_dim", "attention_head_size", "head_size")


@dataclass(frozen=True)
class AttentionHeads:
    """The heads of one attention layer, as :func:`attention_heads` found them.

    Attributes:
        name: the layer's qualified name in the model (``""`` for the model itself).
        kind: ``"multihead_attention"`` (an ``nn.MultiheadAttention``) or ``"projections"`` (separate
            ``Linear`` query, key, value and output projections).
        num_heads: the number of heads.
        head_dim: features per head of the query and key projections.
        value_dim: features per head of the value projection (the output projection's input).
        pieces: ``(parameter name, axis, block)`` for each tensor a head owns a share of (a module's
            own ``bias_k``/``bias_v`` parameters, its extra key and value tokens, included; see
            :mod:`funcreg._src.penalties.heads`); the names are ``fr.params_of(model)``'s.
        q, k, v, o: for ``"projections"``, the qualified names of the four ``Linear`` modules;
            ``None`` for an ``nn.MultiheadAttention``.
        count_attrs: the qualified ``(module, attribute)`` names holding the head count, which
            :func:`funcreg.prune` updates.

    Examples:
        >>> import torch, funcreg as fr
        >>> (heads,) = fr.attention_heads(torch.nn.MultiheadAttention(8, num_heads=2))
        >>> heads.num_heads, heads.head_dim
        (2, 4)
        >>> [p[0] for p in heads.pieces]
        ['in_proj_weight', 'in_proj_bias', 'out_proj.weight']
    """

    name: str
    kind: Literal["multihead_attention", "projections"]
    num_heads: int
    head_dim: int
    value_dim: int
    pieces: tuple[Piece, ...]
    q: str | None = None
    k: str | None = None
    v: str | None = None
    o: str | None = None
    count_attrs: tuple[tuple[str, str], ...] = ()

    def norms(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The 2-norm of each head's group in ``params`` (a dict by name, ``fr.params_of(model)``).

        Examples:
            >>> import torch, funcreg as fr
            >>> mha = torch.nn.MultiheadAttention(4, num_heads=2, bias=False)
            >>> params = {k: torch.ones_like(v) for k, v in fr.params_of(mha).items()}
            >>> fr.attention_heads(mha)[0].norms(params)  # 3 x 2 rows of 4 and 4 x 2 columns: sqrt(32)
            tensor([5.6569, 5.6569])
        """
        missing = [p[0] for p in self.pieces if p[0] not in params]
        if missing:
            raise ValueError(
                f"the heads of {self.name!r} include {missing[0]!r}, which params does not have"
                f"{_suggest(missing[0], list(params))}"
            )
        return joint_norms([params[p[0]] for p in self.pieces], self._family())[0]

    def _family(self) -> JointFamily:
        return JointFamily(f"the heads of {self.name!r}", self.num_heads, self.pieces)


def _names(given: str | Sequence[str], what: str) -> tuple[str, ...]:
    names = (given,) if isinstance(given, str) else tuple(given)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"attention_heads: {what} must be a module name or a sequence of them, got {given!r}")
    return names


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _first_linear(module: nn.Module, candidates: tuple[str, ...]) -> str | None:
    for path in candidates:
        if isinstance(_submodule(module, path), nn.Linear):
            return path
    return None


def _qual(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _count_attrs(module: nn.Module, qual: str) -> list[tuple[str, str, int]]:
    found = []
    for attr in HEAD_COUNT_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            found.append((qual, attr, value))
    return found


def _heads_from_widths(holders: list[tuple[str, nn.Module]], width: int) -> int | None:
    """The head count from a head width attribute (``head_dim``, ...) dividing the query projection's
    outputs, else from ``config.num_attention_heads``; ``None`` when neither is there."""
    for _, mod in holders:
        for attr in HEAD_WIDTH_ATTRS:
            d = getattr(mod, attr, None)
            if isinstance(d, int) and not isinstance(d, bool) and d >= 1 and width % d == 0:
                return width // d
    for _, mod in holders:
        h = getattr(getattr(mod, "config", None), "num_attention_heads", None)
        if isinstance(h, int) and not isinstance(h, bool) and h >= 1:
            return h
    return None


def _mha(name: str, m: nn.MultiheadAttention) -> AttentionHeads:
    h, d = m.num_heads, m.head_dim
    pieces: list[Piece] = []
    if m._qkv_same_embed_dim:
        pieces.append((_qual(name, "in_proj_weight"), 0, d))
    else:
        for p in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            pieces.append((_qual(name, p), 0, d))
    if m.in_proj_bias is not None:
        pieces.append((_qual(name, "in_proj_bias"), 0, d))
    if m.bias_k is not None:
        pieces += [(_qual(name, "bias_k"), 2, d), (_qual(name, "bias_v"), 2, d)]
    pieces.append((_qual(name, "out_proj.weight"), 1, d))
    return AttentionHeads(
        name, "multihead_attention", h, d, d, tuple(pieces), count_attrs=((name, "num_heads"),)
    )


def _projections(
    name: str, m: nn.Module, paths: tuple[str, str, str, str], num_heads: int | None
) -> AttentionHeads:
    qp, kp, vp, op = paths
    lin = {p: m.get_submodule(p) for p in paths}
    q, k, v, o = (lin[p] for p in paths)
    assert isinstance(q, nn.Linear) and isinstance(k, nn.Linear)
    assert isinstance(v, nn.Linear) and isinstance(o, nn.Linear)
    holders = [(name, m)]
    if "." in qp:
        parent = qp.rsplit(".", 1)[0]
        holders.append((_qual(name, parent), m.get_submodule(parent)))
    counts = [c for qual, mod in holders for c in _count_attrs(mod, qual)]
    found = num_heads if num_heads is not None else counts[0][2] if counts else None
    if found is None:
        found = _heads_from_widths(holders, q.out_features)
        if found is None:
            raise ValueError(
                f"attention_heads: the attention module {name!r} ({type(m).__name__}) has no head count "
                f"({', '.join(HEAD_COUNT_ATTRS)}), head width ({', '.join(HEAD_WIDTH_ATTRS)}) or "
                f"config.num_attention_heads on it or on the module holding {qp!r}; pass num_heads="
            )
    h = found
    counts = [c for c in counts if c[2] == h]
    where = f"attention_heads: the attention module {name!r} ({type(m).__name__})"
    if q.out_features % h or v.out_features % h:
        raise ValueError(
            f"{where}: {qp!r} has {q.out_features} and {vp!r} {v.out_features} output features, "
            f"not multiples of its {h} heads"
        )
    if k.out_features != q.out_features:
        raise ValueError(
            f"{where}: {qp!r} has {q.out_features} output features and {kp!r} {k.out_features}; grouped- or "
            "multi-query attention (fewer key/value heads than query heads) is not supported"
        )
    if o.in_features != v.out_features:
        raise ValueError(
            f"{where}: the output projection {op!r} reads {o.in_features} features, "
            f"the value projection {vp!r} gives {v.out_features}"
        )
    d, dv = q.out_features // h, v.out_features // h
    pieces: list[Piece] = []
    for path, lin_, block in ((qp, q, d), (kp, k, d), (vp, v, dv)):
        pieces.append((f"{_qual(name, path)}.weight", 0, block))
        if lin_.bias is not None:
            pieces.append((f"{_qual(name, path)}.bias", 0, block))
    for extra, block in (("bias_k", d), ("bias_v", dv)):  # extra key/value tokens, per head (as in MHA)
        t = getattr(m, extra, None)
        if isinstance(t, nn.Parameter) and t.ndim >= 1 and t.shape[-1] == h * block:
            pieces.append((_qual(name, extra), t.ndim - 1, block))
    pieces.append((f"{_qual(name, op)}.weight", 1, dv))
    return AttentionHeads(
        name, "projections", h, d, dv, tuple(pieces),
        q=_qual(name, qp), k=_qual(name, kp), v=_qual(name, vp), o=_qual(name, op),
        count_attrs=tuple((qual, attr) for qual, attr, _ in counts),
    )  # fmt: skip


def find_attention(
    model: nn.Module,
    num_heads: int | None = None,
    names: tuple[str | Sequence[str], ...] = (QUERY_NAMES, KEY_NAMES, VALUE_NAMES, OUTPUT_NAMES),
) -> tuple[AttentionHeads, ...]:
    """:func:`attention_heads` without the error when nothing matches (an empty tuple then).

    ``names``: its ``(q, k, v, o)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attention_heads: model must be a torch.nn.Module, got {type(model).__name__}")
    if num_heads is not None and (
        isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1
    ):
        raise ValueError(f"Invalid num_heads value: {num_heads!r} (expected an int >= 1)")
    cands = tuple(_names(x, what) for x, what in zip(names, ("q", "k", "v", "o")))
    found: list[AttentionHeads] = []
    covered: list[str] = []
    for name, m in model.named_modules():
        if any(name == c or name.startswith(c + ".") or c == "" for c in covered):
            continue
        if isinstance(m, nn.MultiheadAttention):
            found.append(_mha(name, m))
            covered.append(name)
            continue
        own = getattr(m, "head_projections", None)
        paths = (
            tuple(own)
            if isinstance(own, tuple) and len(own) == 4
            else tuple(_first_linear(m, c) for c in cands)
        )
        if all(p is not None for p in paths):
            found.append(_projections(name, m, paths, num_heads))  # type: ignore[arg-type]
            covered.append(name)
        elif all(p is not None for p in paths[:3]):
            raise ValueError(
                f"attention_heads: module {name!r} ({type(m).__name__}) has query, key and value projections "
                f"{paths[0]!r}, {paths[1]!r}, {paths[2]!r} but no output projection among {cands[3]}; "
                "pass o= (a dotted path from the module that holds all four, e.g. 'output.dense')"
            )
    return tuple(found)


def attention_heads(
    model: nn.Module,
    *,
    num_heads: int | None = None,
    q: str | Sequence[str] = QUERY_NAMES,
    k: str | Sequence[str] = KEY_NAMES,
    v: str | Sequence[str] = VALUE_NAMES,
    o: str | Sequence[str] = OUTPUT_NAMES,
) -> tuple[AttentionHeads, ...]:
    """The attention layers of ``model`` and the tensors each head owns, in module order.

    Two kinds are found:

    * every ``nn.MultiheadAttention`` (its own ``num_heads``; packed ``in_proj_weight`` or separate
      ``q/k/v_proj_weight``, ``in_proj_bias``, ``bias_k``/``bias_v``, and the columns of ``out_proj``);
    * every other module with ``nn.Linear`` query, key, value and output projections at the paths
      ``q``, ``k``, ``v`` and ``o`` (relative dotted names, each the first of its candidates that
      exists: by default ``q_proj``/``query``/``self.query``, ``k_proj``/``key``/``self.key``,
      ``v_proj``/``value``/``self.value`` and ``o_proj``/``out_proj``/``output.dense``/``dense``, which
      covers the usual Hugging Face layouts). A module that declares ``head_projections = (q, k, v,
      o)`` is matched with its own names (``fr.PrunedMultiheadAttention`` does). The head count is
      ``num_heads`` when given, else the module's (or the query projection's parent's) ``num_heads``,
      ``num_attention_heads``, ``n_heads`` or ``n_head`` (which :func:`funcreg.prune` updates), else
      the query width over its ``head_dim``, ``attention_head_size`` or ``head_size``, else its
      ``config.num_attention_heads`` (a shared config, which prune leaves alone: the forward must then
      infer the head count from the widths, as Hugging Face's ``view(..., -1, head_dim)`` does).

    The modules inside a matched layer are not searched further. The query and key projections need
    ``num_heads * head_dim`` outputs each (grouped-query attention, with fewer key/value heads, is
    refused), the output projection as many inputs as the value projection has outputs.

    Raises:
        ValueError: nothing matches (the message names what was looked for), a module has query, key
            and value projections but no output projection, or a head count is missing or does not
            divide the projections.

    Examples:
        >>> import torch, funcreg as fr
        >>> class Attention(torch.nn.Module):  # Hugging Face style: separate projections
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.num_heads = 2
        ...         self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(8, 8) for _ in range(4))
        >>> (heads,) = fr.attention_heads(Attention())
        >>> heads.kind, heads.num_heads, heads.q, heads.o
        ('projections', 2, 'q_proj', 'o_proj')
        >>> try:
        ...     fr.attention_heads(torch.nn.Linear(2, 2))
        ... except ValueError as err:
        ...     print(str(err)[:92])
        attention_heads: no attention layer in Linear: expected an nn.MultiheadAttention or a module
    """
    found = find_attention(model, num_heads, (q, k, v, o))
    if not found:
        cands = tuple(_names(x, what) for x, what in ((q, "q"), (k, "k"), (v, "v"), (o, "o")))
        raise ValueError(
            f"attention_heads: no attention layer in {type(model).__name__}: expected an "
            f"nn.MultiheadAttention or a module with Linear projections q in {cands[0]}, k in {cands[1]}, "
            f"v in {cands[2]} and o in {cands[3]}"
        )
    return found


def head_lasso(
    coeff: Coefficient,
    heads: nn.Module | AttentionHeads | Sequence[AttentionHeads],
    name: str = "head_lasso",
) -> Penalty:
    """Group lasso over attention heads: ``coeff * sum_h sqrt(|g_h|) * ||g_h||_2``, one group per head.

    Head ``h``'s group ``g_h`` is its rows of the query, key and value projections (and of their
    biases; ``bias_k``/``bias_v`` of an ``nn.MultiheadAttention``) and its columns of the output
    projection; ``|g_h|`` is its number of elements. ``heads`` is a model (its layers found with the
    defaults of :func:`attention_heads`) or what :func:`attention_heads` returned (pass that for other
    module names, a head count, or a subset of the layers). A :func:`joint_group_lasso`: the prox
    zeroes whole heads (block soft thresholding over all of a head's tensors), after which
    :func:`funcreg.prune` removes them; the gradient is 0 on a zero head. Parameters are named as
    ``fr.params_of(model)`` names them.

    Examples:
        >>> import torch, funcreg as fr
        >>> _ = torch.manual_seed(0)
        >>> mha = torch.nn.MultiheadAttention(8, num_heads=4)
        >>> P = fr.head_lasso(0.1, mha)
        >>> P
        head_lasso(0.1, <4 heads of ''>)
        >>> params = fr.params_of(mha)
        >>> small = P.prox(params, step=100.0)  # a large step: every head goes
        >>> fr.attention_heads(mha)[0].norms(small)
        tensor([0., 0., 0., 0.])
    """
    check_scalar_coeff(coeff, "head_lasso")
    if isinstance(heads, nn.Module):
        specs = attention_heads(heads)
    elif isinstance(heads, AttentionHeads):
        specs = (heads,)
    else:
        specs = tuple(heads)
        if not specs or not all(isinstance(h, AttentionHeads) for h in specs):
            raise TypeError(
                "head_lasso: heads must be a model, an AttentionHeads or a non-empty sequence of them "
                f"(fr.attention_heads(model)), got {heads!r}"
            )
    out = JointGroupLasso(name, coeff, [h._family() for h in specs])
    shown = ", ".join(f"{h.num_heads} heads of {h.name!r}" for h in specs[:3])
    more = f", ... ({len(specs)} layers)" if len(specs) > 3 else ""
    extra = "" if name == "head_lasso" else f", name={name!r}"
    out.config = f"head_lasso({fmt(coeff)}, <{shown}{more}>{extra})"
    out.recipe = (head_lasso, (coeff, specs), {"name": name})
    return out


__all__ = [
    "AttentionHeads",
    "attention_heads",
    "head_lasso",
]
