"""What pruning gained: :func:`prune_report` compares a model with its pruned copy.

Sizes and FLOPs are counted from the layers; time is measured on the example input, so the report
says what the smaller model saves on this machine, not only on paper.
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

from funcreg._src.analysis.prune.chain import _NORMS, _PRODUCERS, _state
from funcreg._src.analysis.prune.modules import PrunedMultiheadAttention
from funcreg._src.core.validation import check_int

_ATTENTION = (nn.MultiheadAttention, PrunedMultiheadAttention)


@dataclass(frozen=True)
class LayerSize:
    """One ``Linear``/``Conv2d``/BatchNorm layer before and after pruning: units (output features or
    channels; heads for an attention layer, whose parameters are all of its own) and parameters."""

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
    example, and of ``nn.MultiheadAttention``/``fr.PrunedMultiheadAttention`` layers (their projections
    and their score and weighted-value products; a module with its own ``Linear`` projections has those
    counted, not its products). Bias additions, normalization, activations and pooling are not
    counted. ``seconds_*`` are
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


def _attention_flops(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """2 x the multiply-accumulates of one attention layer's call that its ``Linear`` hooks do not
    see: all of an ``nn.MultiheadAttention`` (which reads its projections' weights directly), the
    score and weighted-value products of a ``PrunedMultiheadAttention`` (whose projections are
    ``Linear`` modules it calls)."""
    given = list(args) + [kwargs.get(k) for k in ("query", "key", "value")[len(args) :]]
    if len(given) < 3 or not all(isinstance(t, torch.Tensor) for t in given[:3]):
        return 0
    q, k, v = given[:3]
    batch_first = bool(getattr(module, "batch_first", False))
    n = (q.shape[0] if batch_first else q.shape[1]) if q.ndim == 3 else 1
    nl, ns = q.numel() // q.shape[-1], k.numel() // k.shape[-1]
    if isinstance(module, PrunedMultiheadAttention):
        inner = module.num_heads * module.head_dim
        return 4 * nl * (ns // max(n, 1)) * inner
    assert isinstance(module, nn.MultiheadAttention)
    e = inner = module.embed_dim
    projections = nl * e * inner + ns * k.shape[-1] * inner + ns * v.shape[-1] * inner + nl * inner * e
    return 2 * projections + 4 * nl * (ns // max(n, 1)) * inner


def _count_flops(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The output on ``x`` and 2 x the multiply-accumulates of Linear/Conv2d layers (and of attention
    layers, see :func:`_attention_flops`) per example."""
    total = [0]

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            total[0] += 2 * module.in_features * output.numel()
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * (module.in_channels // module.groups)
            total[0] += 2 * k * output.numel()

    def attention_hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        total[0] += _attention_flops(module, tuple(args), dict(kwargs))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _PRODUCERS)]
    handles += [
        m.register_forward_hook(attention_hook, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, _ATTENTION)
    ]
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


def _is_factored(m: nn.Module) -> bool:
    """Whether ``m`` is a layer :func:`funcreg.low_rank` factored: a Sequential of two layers of one
    kind (Linear, or 1x1 Conv2d), the first without a bias."""
    return (
        type(m) is nn.Sequential
        and len(m) == 2
        and type(m[0]) is type(m[1])
        and isinstance(m[0], _PRODUCERS)
        and m[0].bias is None
    )


def _sizes(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """Per Linear/Conv2d/BatchNorm layer by name: its kind, units and parameter count; per attention
    layer its heads and all its parameters."""
    out = {}
    for name, m in model.named_modules():
        if _is_factored(m):  # a layer fr.low_rank replaced: its output units, both factors' parameters
            out[name] = (
                f"{type(m[1]).__name__} (rank {m[0].weight.shape[0]})",
                m[1].weight.shape[0],
                sum(p.numel() for p in m.parameters()),
            )
        elif isinstance(m, _ATTENTION):
            out[name] = (type(m).__name__, int(m.num_heads), sum(p.numel() for p in m.parameters()))
        elif isinstance(m, _PRODUCERS + _NORMS):
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
