"""Which units of one ``Linear``/``Conv2d`` go, and how the layers around them are sliced and folded.

This is the rule of :mod:`funcreg._src.analysis.prune.prune` applied to one pair of producers ``P`` -> ``Q`` and
the per-channel layers between them; :func:`funcreg.prune` walks the pairs front to back.
"""

from __future__ import annotations

import torch
from torch import nn

from funcreg._src.analysis.prune.chain import _ELEMENTWISE, _NORMS, _OUTPUT_ONLY, _POOLS, _PRODUCERS


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
    """Whether ``conv`` pads with zeros, so that border outputs see a constant input only in part
    (a constant folded into its bias would then be wrong at the borders)."""
    if conv.padding_mode != "zeros":
        return False  # reflect/replicate/circular padding repeats the constant
    return any(p > 0 for p in conv._reversed_padding_repeated_twice)


class _Walk:
    """What is known of P's constant units on the way to Q, per feature (per unit until a Flatten).

    ``values``: the value a constant unit has there (float64); ``constant``: whether it is constant
    whatever the input; ``exact``: whether the value is the same at every position; ``group``: the
    features per unit (``None`` after a Flatten of a 4-d tensor, until a layer says how many);
    ``norms``: the BatchNorm layers passed, with the features per unit each one sees.
    """

    def __init__(self, p: _Layer, units: int, zero_rows: torch.Tensor) -> None:
        bias = p.get("bias")
        self.p, self.units = p, units
        self.values = torch.zeros(units, dtype=torch.float64) if bias is None else bias.double().cpu()
        self.exact = torch.ones(units, dtype=torch.bool)
        self.constant = zero_rows.clone()
        self.spatial = isinstance(p.module, nn.Conv2d)
        self.group: int | None = 1
        self.norms: list[tuple[_Layer, int]] = []

    def features(self, layer: _Layer, count: int) -> int:
        """The features per unit of a layer that reads ``count`` flat features, checked against the
        units; the first such layer after a Flatten fixes the group (the Flatten cannot know H*W)."""
        p, units = self.p, self.units
        if self.group is None:
            if count % units:
                raise ValueError(
                    f"prune: layer {layer.name!r} has {count} input features after the Flatten of the "
                    f"{units} channels of {p.name!r}; expected a multiple of {units}"
                )
            self.group = count // units
            self.values = self.values.repeat_interleave(self.group)
            self.exact = self.exact.repeat_interleave(self.group)
            self.constant = self.constant.repeat_interleave(self.group)
        if count != units * self.group:
            raise ValueError(
                f"prune: layer {layer.name!r} expects {count} input features, "
                f"{p.name!r} gives {units * self.group}"
            )
        return self.group

    def through(self, layer: _Layer, q: _Layer) -> None:
        """Follows the constants through one layer between P and Q, or raises for a layer that may
        not sit there (one that mixes channels, or one on the wrong kind of tensor)."""
        m = layer.module
        if isinstance(m, _PRODUCERS):  # pragma: no cover - the caller splits at producers
            raise AssertionError
        if isinstance(m, _OUTPUT_ONLY):
            raise TypeError(
                f"prune: layer {layer.name!r} ({type(m).__name__}) mixes channels; "
                "it may only follow the last "
                f"Linear/Conv2d, not sit between {self.p.name!r} and {q.name!r}"
            )
        if isinstance(m, _NORMS):
            self._norm(layer, m)
        elif isinstance(m, _ELEMENTWISE):
            if not isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)):  # eval: identity
                self.values = m(self.values.view(1, -1)).view(-1)
        elif isinstance(m, _POOLS):
            self._pool(layer, m)
        elif isinstance(m, nn.Flatten):
            if self.spatial:
                self.spatial, self.group = False, None
        else:  # pragma: no cover - _leaves rejects everything else
            raise AssertionError(type(m))

    def _norm(self, layer: _Layer, m: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
        """Maps the constants through a BatchNorm's running statistics and affine part; a zero
        weight makes its unit constant (network slimming)."""
        want_2d = isinstance(m, nn.BatchNorm2d)
        if want_2d != self.spatial:
            raise ValueError(
                f"prune: layer {layer.name!r} is a {type(m).__name__} on the "
                f"{'4-d output of a Conv2d' if self.spatial else 'features of a Linear (or a Flatten)'}"
            )
        g = 1 if self.spatial else self.features(layer, m.num_features)
        if self.spatial and m.num_features != self.units:
            raise ValueError(
                f"prune: layer {layer.name!r} has {m.num_features} channels, "
                f"{self.p.name!r} gives {self.units}"
            )
        mean, var = layer.req("running_mean").double().cpu(), layer.req("running_var").double().cpu()
        self.values = (self.values - mean) / torch.sqrt(var + m.eps)
        if m.affine:
            gamma = layer.req("weight").double().cpu()
            self.values = self.values * gamma + layer.req("bias").double().cpu()
            # a zero BatchNorm weight outputs its bias (slimming)
            self.constant = self.constant | (gamma == 0)
        self.norms.append((layer, g))

    def _pool(self, layer: _Layer, m: nn.Module) -> None:
        """Checks a pooling layer sits on a 4-d tensor; a padded average keeps only zeros exact."""
        if not self.spatial:
            raise ValueError(
                f"prune: layer {layer.name!r} ({type(m).__name__}) pools the features of a Linear"
            )
        if isinstance(m, nn.AvgPool2d):
            pad = m.padding if isinstance(m.padding, tuple) else (m.padding,)
            if (m.count_include_pad and any(v > 0 for v in pad)) or m.divisor_override is not None:
                # border windows average in zeros: only 0 stays uniform
                self.exact = self.exact & (self.values == 0)

    def into(self, q: _Layer) -> int:
        """Checks that Q reads what the walk delivers (flat features for a Linear, the channels for a
        Conv2d) and returns the features per unit Q sees."""
        p, units = self.p, self.units
        if isinstance(q.module, nn.Linear):
            if self.spatial:
                raise ValueError(
                    f"prune: Linear {q.name!r} receives the 4-d output of Conv2d {p.name!r}; "
                    "put an nn.Flatten() between them (a Linear on 4-d input mixes positions, not channels)"
                )
            self.features(q, q.module.in_features)
        else:
            if not self.spatial:
                raise ValueError(f"prune: Conv2d {q.name!r} receives the flat features of {p.name!r}")
            if q.module.in_channels != units:
                raise ValueError(
                    f"prune: Conv2d {q.name!r} has {q.module.in_channels} input channels, "
                    f"{p.name!r} gives {units}"
                )
        assert self.group is not None
        return self.group


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
    walk = _Walk(p, units, zero_rows)
    for layer in between:
        walk.through(layer, q)
    group = walk.into(q)
    return walk.values, walk.constant, walk.exact, group, walk.norms


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
