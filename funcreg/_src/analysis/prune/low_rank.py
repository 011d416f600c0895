"""Low-rank export: replace a layer whose weight has few nonzero singular values by two thin layers.

After training with :func:`funcreg.nuclear_norm` in the proximal form (its prox is singular value
thresholding), a ``Linear`` weight ``W`` (``out x in``) has exactly-zero singular values:
``W = U diag(s) V^T`` with only ``r`` of the ``s_i`` nonzero. :func:`low_rank` replaces each such layer
whose rank saves parameters, ``r * (in + out) < in * out``, by

    ``nn.Sequential(nn.Linear(in, r, bias=False), nn.Linear(r, out, bias=...))``

with weights ``B = diag(sqrt(s_r)) V_r^T`` (``r x in``) and ``A = U_r diag(sqrt(s_r))`` (``out x r``):
the singular values are split evenly between the two factors, so both have the same scale
(``||A|| = ||B||``) and the factored layer can be trained further with the same learning rate. The
bias, if any, stays on the second layer. ``A @ B`` is ``W`` with its singular values below the
tolerance set to zero: exact zeros up to rounding, so the outputs equal the original's up to
float rounding. A ``Conv2d`` with a 1x1 kernel (``groups=1``) is the same matrix at every position
and is factored the same way, into a 1x1 convolution with its stride, padding and dilation, then a
plain 1x1 convolution (a zero-padded position maps to 0 in the first, as in the original before its
bias).

The rank ``r`` counts the singular values above ``rtol * s_max``. The default tolerance,
``max(in, out) * eps`` of the weight's dtype, is the one of ``torch.linalg.matrix_rank`` and
``numpy.linalg.matrix_rank``: what SVD's own rounding leaves of an exact zero (about ``8e-6`` for a
64-wide float32 layer). The SVD is computed in float64, the factors stored in the weight's dtype.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from funcreg._src.analysis.prune.chain import _state
from funcreg._src.analysis.prune.prune import _set
from funcreg._src.selection.named_params import _matches, _suggest
from funcreg._src.selection.resolve import MaskLike, resolve_mask

__all__ = ["low_rank"]

# torch modules whose forward reads their child layers' weights directly (a fused path): a child
# replaced by a Sequential has no ``.weight`` to read
_READS_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _why_not(
    name: str, module: nn.Module, parent: nn.Module | None, state: Mapping[str, torch.Tensor]
) -> str | None:
    """Why ``module`` cannot be factored (``None`` when it can)."""
    if isinstance(module, nn.Conv2d):
        if tuple(module.kernel_size) != (1, 1) or module.groups != 1:
            return (
                f"a Conv2d with kernel {tuple(module.kernel_size)} and groups={module.groups}; only 1x1 "
                "convolutions with groups=1 are one matrix"
            )
        if type(module).forward is not nn.Conv2d.forward:
            return f"a {type(module).__name__} with its own forward"
    elif isinstance(module, nn.Linear):
        if type(module).forward is not nn.Linear.forward:
            return f"a {type(module).__name__} with its own forward"
    else:
        return f"a {type(module).__name__}, not a Linear or a 1x1 Conv2d"
    if parent is not None and isinstance(parent, _READS_WEIGHTS):
        return f"a layer of a {type(parent).__name__}, which reads its weight directly"
    if parametrize.is_parametrized(module):
        return "parametrized (torch.nn.utils.parametrize): remove the parametrization first"
    if f"{name}.weight" not in state or isinstance(module.weight, nn.parameter.UninitializedParameter):
        return "a layer without an initialized weight"
    return None


def _layers(
    model: nn.Module, state: Mapping[str, torch.Tensor]
) -> tuple[dict[str, nn.Module], dict[str, str], dict[int, list[str]]]:
    """The factorable layers by name, why each other Linear/Conv2d is not, and every name of each
    module object (a layer shared by two parents is replaced at both)."""
    parents: dict[str, nn.Module] = dict(model.named_modules(remove_duplicate=False))
    ok: dict[str, nn.Module] = {}
    refused: dict[str, str] = {}
    names: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or not name:
            continue
        names.setdefault(id(m), []).append(name)
        if len(names[id(m)]) > 1:
            continue
        parent = parents[name.rpartition(".")[0]]
        why = _why_not(name, m, parent, state)
        if why is None:
            ok[name] = m
        else:
            refused[name] = why
    return ok, refused, names


def _selected(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    modules: str | Sequence[str] | None,
    mask: MaskLike | None,
) -> tuple[dict[str, nn.Module], dict[int, list[str]]]:
    ok, refused, names = _layers(model, state)
    if modules is not None and mask is not None:
        raise ValueError("low_rank: pass modules= or mask=, not both")
    if isinstance(model, (nn.Linear, nn.Conv2d)):
        raise TypeError(
            f"low_rank: model is a {type(model).__name__} itself; wrap it (nn.Sequential(layer)) so that "
            "it can be replaced"
        )
    if modules is not None:
        patterns = [modules] if isinstance(modules, str) else list(modules)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"low_rank: modules must be a module name or a list of names, got {modules!r}")
        chosen: dict[str, nn.Module] = {}
        for pattern in patterns:
            hit = {n: m for n, m in ok.items() if _matches(pattern, n)}
            if not hit:
                why = [f"{n!r} is {w}" for n, w in refused.items() if _matches(pattern, n)]
                detail = f": {'; '.join(why)}" if why else _suggest(pattern, list(ok) + list(refused))
                raise ValueError(
                    f"low_rank: modules={pattern!r} selects no Linear or 1x1 Conv2d layer{detail}"
                )
            chosen.update(hit)
        return chosen, names
    if mask is not None:
        tree = {n: state[n] for n, _ in model.named_parameters()}
        flags = dict(zip(tree, resolve_mask(mask, tree, "low_rank mask")))
        chosen = {n: m for n, m in ok.items() if flags.get(f"{n}.weight", False)}
        if not chosen:
            why = [f"{n!r} is {w}" for n, w in refused.items() if flags.get(f"{n}.weight", False)]
            detail = f" ({'; '.join(why)})" if why else f" (selected: {[n for n, f in flags.items() if f]})"
            raise ValueError(
                f"low_rank: mask={mask!r} selects the weight of no Linear or 1x1 Conv2d layer{detail}"
            )
        return chosen, names
    if not ok:
        why = [f"{n!r} is {w}" for n, w in refused.items()]
        raise ValueError(
            f"low_rank: the model has no Linear or 1x1 Conv2d layer to factor{': ' + '; '.join(why) if why else ''}"
        )
    return ok, names


def _factor(
    module: nn.Linear | nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None, rtol: float | None
) -> nn.Sequential | None:
    """The two thin layers for ``module`` with ``weight`` (and ``bias``), or ``None`` when its rank
    saves no parameters."""
    out_f, in_f = weight.shape[0], weight.shape[1]
    w = weight.detach().reshape(out_f, in_f).to(torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    tol = (max(in_f, out_f) * torch.finfo(weight.dtype).eps if rtol is None else rtol) * s[0]
    rank = max(int((s > tol).sum()) if bool(s[0] > 0) else 0, 1)  # a zero weight keeps one (zero) unit
    if rank * (in_f + out_f) >= in_f * out_f:
        return None
    root = s[:rank].sqrt()
    first_w = (root[:, None] * vh[:rank]).to(weight.dtype)
    second_w = (u[:, :rank] * root).to(weight.dtype)
    kw = {"device": weight.device, "dtype": weight.dtype}
    first: nn.Linear | nn.Conv2d
    second: nn.Linear | nn.Conv2d
    if isinstance(module, nn.Conv2d):
        first = nn.utils.skip_init(
            nn.Conv2d, in_f, rank, 1, stride=module.stride, padding=module.padding, dilation=module.dilation,
            bias=False, padding_mode=module.padding_mode, **kw,
        )  # fmt: skip
        second = nn.utils.skip_init(nn.Conv2d, rank, out_f, 1, bias=bias is not None, **kw)
        first_w, second_w = first_w[:, :, None, None], second_w[:, :, None, None]
    else:
        first = nn.utils.skip_init(nn.Linear, in_f, rank, bias=False, **kw)
        second = nn.utils.skip_init(nn.Linear, rank, out_f, bias=bias is not None, **kw)
    grad = module.weight.requires_grad
    with torch.no_grad():
        first.weight.copy_(first_w)
        second.weight.copy_(second_w)
        if bias is not None and second.bias is not None and module.bias is not None:
            second.bias.copy_(bias)
            second.bias.requires_grad_(module.bias.requires_grad)
    first.weight.requires_grad_(grad)
    second.weight.requires_grad_(grad)
    return nn.Sequential(first, second)


def low_rank(
    model: nn.Module,
    params: Mapping[str, torch.Tensor] | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
    *,
    modules: str | Sequence[str] | None = None,
    mask: MaskLike | None = None,
    rtol: float | None = None,
) -> nn.Module:
    """A copy of ``model`` with each low-rank ``Linear`` (or 1x1 ``Conv2d``) replaced by two thin layers.

    A selected layer of weight ``W`` (``out x in``) and numerical rank ``r`` (singular values above
    ``rtol * s_max``) is replaced when ``r * (in + out) < in * out`` by
    ``nn.Sequential(nn.Linear(in, r, bias=False), nn.Linear(r, out, bias=...))``, the first holding
    ``diag(sqrt(s_r)) V_r^T``, the second ``U_r diag(sqrt(s_r))`` and the bias (see
    :mod:`funcreg._src.analysis.prune.low_rank`); a layer whose rank saves nothing is kept as it is.
    Train with :func:`funcreg.nuclear_norm` in the proximal form to get exactly-zero singular values.

    As :func:`funcreg.prune`: ``model`` and the given tensors are not modified, the copy comes back in
    eval mode, and :func:`funcreg.prune_report` compares the two (parameters, FLOPs, time, largest
    output difference; its per-layer rows show a factored layer under its old name, with its
    output units and both factors' parameters).

    Args:
        model: any module (its own weights are used for whatever ``params`` does not give).
        params: trained parameters by name (``fr.params_of(model)`` names, ``TrainState.params``).
        buffers: trained buffers by name.
        modules: which layers: a module name or a list of names (glob patterns, a prefix selects the
            layers under it); each must select at least one ``Linear``/1x1 ``Conv2d`` or ``ValueError``
            names it.
        mask: or which layers by their weights, as the penalty's ``mask=`` (``fr.by_name("0.weight")``,
            a bool tree): the layers whose ``weight`` it selects; selecting none raises ``ValueError``.
            With neither, every ``Linear`` and 1x1 ``Conv2d`` is considered, except those that torch's
            ``nn.MultiheadAttention`` and ``nn.Transformer*Layer`` read directly (and parametrized ones).
        rtol: singular values ``<= rtol * s_max`` count as zero; default ``max(in, out) * eps`` of the
            weight's dtype (``torch.linalg.matrix_rank``'s), a number in ``[0, 1)`` otherwise.

    Returns:
        A new module in eval mode whose outputs equal ``model``'s (with ``params`` and ``buffers``
        loaded) up to rounding, where the dropped singular values are zero (up to the tolerance).

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
        >>> w = torch.outer(torch.arange(1.0, 7.0), torch.ones(8))  # rank 1: 1 * (8 + 6) < 8 * 6
        >>> small = fr.low_rank(model, {"0.weight": w})
        >>> small
        Sequential(
          (0): Sequential(
            (0): Linear(in_features=8, out_features=1, bias=False)
            (1): Linear(in_features=1, out_features=6, bias=True)
          )
          (1): ReLU()
          (2): Linear(in_features=6, out_features=2, bias=True)
        )
        >>> x = torch.randn(5, 8)
        >>> full = torch.func.functional_call(model, {**fr.params_of(model), "0.weight": w}, (x,))
        >>> torch.testing.assert_close(small(x), full, atol=1e-5, rtol=1e-5)
        >>> fr.prune_report(model, small, x, {"0.weight": w}).params_after  # (8 + 6 + 6) + (12 + 2)
        34
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"low_rank: model must be a torch.nn.Module, got {type(model).__name__}")
    if rtol is not None and (
        isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 <= rtol < 1
    ):
        raise ValueError(f"Invalid rtol value: {rtol!r} (expected None or a number in [0, 1))")
    try:
        state = _state(model, params, buffers)
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("prune:", "low_rank:", 1)) from None
    chosen, names = _selected(model, state, modules, mask)
    out: nn.Module = copy.deepcopy(model)
    out.load_state_dict(state)
    for name, module in chosen.items():
        assert isinstance(module, (nn.Linear, nn.Conv2d))
        factored = _factor(module, state[f"{name}.weight"], state.get(f"{name}.bias"), rtol)
        if factored is None:
            continue
        for alias in names[id(module)]:
            _set(out, alias, factored)
    return out.eval()
