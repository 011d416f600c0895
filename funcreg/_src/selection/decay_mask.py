"""The usual weight-decay selection, :func:`decay_mask`, and the rules it reads off the model.

The rules are listed, in order, in :func:`decay_mask`'s docstring. The name tables follow timm and
the ViT/Swin/T5/ConvNeXt recipes, so that a model decays as its published recipe does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from funcreg._src.core.typing import PyTree
from funcreg._src.selection.named_params import _check_patterns, _matches, _named_leaves, _shape_text
from funcreg._src.selection.parametrizations import _parametrization
from funcreg._src.selection.table import Selection

_NORM_TYPES: tuple[type, ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
    )
    if t is not None
)
_NORM_NAME = re.compile(r"^(ln|bn|gn)(\d+|_\w*)?$|^norm|norm\d*$", re.IGNORECASE)


def _norm_reason(module_path: str, module: nn.Module | None) -> str | None:
    if not module_path:
        return None  # the model itself: its class name (NormalizingFlow) says nothing about its own weights
    if module is not None:
        if isinstance(module, _NORM_TYPES):
            return f"normalization layer ({type(module).__name__})"
        if "norm" in type(module).__name__.lower():
            return f"normalization layer by type name ({type(module).__name__})"
    for part in module_path.split(".") if module_path else ():
        if _NORM_NAME.search(part):
            return f"normalization layer by name ({part!r})"
    return None


# Bare parameters holding tokens or learned position embeddings (ViT-style): not decayed, as timm's
# ``no_weight_decay()`` and the DeiT/MAE/BEiT recipes have it. An ``nn.Embedding`` table (BERT's
# ``position_embeddings.weight``) is a weight, decayed as in the HF Trainer.
TOKEN_NAMES = frozenset(
    {
        "cls_token",
        "class_token",
        "dist_token",
        "distillation_token",
        "reg_token",
        "register_tokens",
        "mask_token",
        "pos_embed",
        "pos_embedding",
        "absolute_pos_embed",
        "position_embeddings",
        "positional_embedding",
    }
)
# Relative position biases: bare tables (Swin, BEiT, timm), SAM's rel_pos_h/w, and T5's Embedding module.
RELATIVE_POSITION_NAMES = frozenset({"relative_position_bias_table", "rel_pos_h", "rel_pos_w"})
RELATIVE_POSITION_MODULES = frozenset({"relative_attention_bias"})
# Layer scale (per-channel residual gains): timm's LayerScale and ConvNeXt (gamma), CaiT (gamma_1/2),
# HF ConvNeXt (layer_scale_parameter), HF DINOv2 and BEiT (lambda1, lambda_1, ...).
LAYER_SCALE_NAMES = frozenset(
    {
        "gamma",
        "gamma_1",
        "gamma_2",
        "layer_scale",
        "layer_scale_parameter",
        "lambda1",
        "lambda2",
        "lambda_1",
        "lambda_2",
    }
)


def _listed_by_model(model: nn.Module, names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Names excluded by ``no_weight_decay()``/``no_weight_decay_keywords()`` of the model or a submodule.

    ``no_weight_decay()`` gives names or globs relative to the module that defines it (timm);
    ``no_weight_decay_keywords()`` substrings of them (Swin). Entries that match no parameter are
    returned as notes: models list names they may not have (timm's ViT lists ``dist_token``).
    """
    excluded: dict[str, str] = {}
    notes: list[str] = []
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        for method in ("no_weight_decay", "no_weight_decay_keywords"):
            fn = getattr(module, method, None)
            if fn is None:
                continue
            who = f"{path or 'model'}.{method}()"
            try:
                listed = fn() if callable(fn) else fn
            except Exception as err:  # noqa: BLE001 - report which model method failed
                raise TypeError(f"decay_mask: {who} raised {type(err).__name__}: {err}") from err
            listed = [listed] if isinstance(listed, str) else list(listed or ())
            for entry in listed:
                if not isinstance(entry, str):
                    raise TypeError(
                        f"decay_mask: {who} returned {entry!r}; expected parameter names (strings)"
                    )
                if method == "no_weight_decay":
                    hits = [n for n in names if _matches(prefix + entry, n)]
                else:
                    hits = [n for n in names if n.startswith(prefix) and entry in n[len(prefix) :]]
                if not hits:
                    notes.append(f"{who} lists {entry!r}, which matches no parameter of this model (ignored)")
                for n in hits:
                    excluded.setdefault(n, f"{who} lists {entry!r}")
    return excluded, notes


def decay_mask(
    model: nn.Module | PyTree, exclude: Iterable[str] = (), *, model_rules: bool = True
) -> Selection:
    """The usual weight-decay selection: weight matrices, conv kernels and embeddings, nothing else.

    Rules, first match wins:

    1. a name matched by an ``exclude`` glob (``"head.*"``, ``"*.pos_embed"``, or a module prefix such
       as ``"embed"``) is not decayed; a pattern that matches no parameter raises ``ValueError``;
    2. names the model lists itself, timm's convention: ``no_weight_decay()`` (names or globs
       relative to the module defining it, on the model or any submodule) and
       ``no_weight_decay_keywords()`` (substrings); a listed name the model does not have is
       tolerated and reported in ``selection.notes`` (and under the printed table);
    3. every parameter of a normalization layer is not decayed: BatchNorm, InstanceNorm, LayerNorm,
       GroupNorm, RMSNorm by type; any submodule whose class name contains ``Norm``; any submodule
       whose name starts with ``norm``, ends with ``norm`` (optionally followed by digits:
       ``layernorm``, ``norm1``), or is ``bn``/``ln``/``gn`` optionally followed by digits or ``_...``
       (``bn1``, ``ln_f``). The model's own class name is not looked at;
    4. biases (names ending in ``bias``) are not decayed;
    5. tokens and learned position embeddings held as bare parameters (``cls_token``, ``pos_embed``,
       ``dist_token``, ``reg_token``, ``mask_token``, ``absolute_pos_embed``, HF ViT's
       ``position_embeddings``, ``class_token``, ``pos_embedding``, ...), relative position biases
       (``relative_position_bias_table``, SAM's ``rel_pos_h``/``rel_pos_w``, the parameters of T5's
       ``relative_attention_bias``) and layer scale (``gamma``, ``gamma_1``, ``layer_scale_parameter``,
       ``lambda1``, ...) are not decayed, as timm and the ViT/Swin/T5/ConvNeXt recipes have it. An
       ``nn.Embedding`` table, such as BERT's ``position_embeddings.weight``, is a weight (rule 7);
    6. parametrized tensors (``torch.nn.utils.parametrize``), by what decay does to the weight:
       ``weight_norm``'s magnitude ``original0`` (``g``) is decided as the weight would be, its
       direction ``original1`` (``v``) is not decayed (the weight does not depend on ``||v||``: decay
       would only change the step size); ``orthogonal``'s and ``spectral_norm``'s ``original`` are not
       decayed (the weight is orthogonal, or ``W / sigma(W)``, whatever the scale of ``original``).
       The originals of other parametrizations are decided as the tensor they parametrize. The old
       hooks ``torch.nn.utils.weight_norm`` (``weight_g``/``weight_v``) and ``spectral_norm``
       (``weight_orig``) are read the same way;
    7. tensors with ``ndim < 2`` are not decayed (timm's rule);
    8. everything else (ndim >= 2: weight matrices, conv kernels, embeddings) is decayed.

    Given a parameter tree instead of a module, the type-based parts of rules 2, 3 and 6 are
    skipped. A selection that decays nothing raises ``ValueError``. Where this differs from the HF
    ``Trainer`` (which decays everything but biases and LayerNorm/RMSNorm parameters): BatchNorm and
    GroupNorm parameters, 1-D parameters (layer scale), tokens and position embeddings are not decayed.

    Args:
        model: a module, or a parameter tree (names from its key paths).
        exclude: glob patterns of names not to decay.
        model_rules: honour the model's ``no_weight_decay()``/``no_weight_decay_keywords()`` (rule 2).

    Returns:
        A :class:`Selection` over the names of ``params_of(model)``.

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.Sequential(torch.nn.Embedding(5, 2), torch.nn.Linear(2, 2))
        >>> fr.decay_mask(model, exclude=["0"]).selected
        ['1.weight']
        >>> class ViT(torch.nn.Module):  # a timm-style model that lists its tokens
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
        ...         self.head = torch.nn.Linear(4, 2)
        ...     def no_weight_decay(self):
        ...         return {"cls_token", "dist_token"}
        >>> print(fr.decay_mask(ViT()))
        name         shape  decay  reason
        cls_token    1x1x4  no     model.no_weight_decay() lists 'cls_token'
        head.weight  2x4    yes    weight with ndim 2
        head.bias    2      no     bias
        note: model.no_weight_decay() lists 'dist_token', which matches no parameter of this model (ignored)
    """
    names, leaves = _named_leaves(model)
    patterns = _check_patterns(exclude, names, "exclude")
    is_module = isinstance(model, nn.Module)
    modules = dict(model.named_modules()) if is_module else {}
    listed, notes = _listed_by_model(model, names) if is_module and model_rules else ({}, [])
    decisions: dict[str, bool] = {}
    reasons: dict[str, str] = {}
    shapes: dict[str, str] = {}
    for name, leaf in zip(names, leaves):
        shapes[name] = _shape_text(leaf)
        decisions[name], reasons[name] = _decide(name, leaf, patterns, listed, modules)
    if not any(decisions.values()):
        raise ValueError(
            "decay_mask selects no parameter: every parameter is a bias, a norm parameter, 1-D or excluded"
        )
    return Selection(decisions, shapes, reasons, label="decay", notes=notes)


def _decide(
    name: str, leaf: Any, patterns: Sequence[str], listed: Mapping[str, str], modules: Mapping[str, nn.Module]
) -> tuple[bool, str]:
    """Whether ``decay_mask`` decays the parameter ``name`` and why, the first rule that applies
    deciding: an excluding pattern, the model's ``no_weight_decay()`` list, norm layers, biases,
    token/position embeddings, relative position biases, layer scales, parametrizations (a
    weight-norm direction or a spectral-norm original: scale-free), tensors of ndim < 2; else
    decayed."""
    module_path, _, attr = name.rpartition(".")
    ndim = leaf.ndim if isinstance(leaf, torch.Tensor) else 0
    param = _parametrization(name, modules) if modules else None
    path, tensor = (param.owner, param.tensor) if param is not None else (module_path, attr or name)
    hit = next((p for p in patterns if _matches(p, name)), None)
    if hit is not None:
        return False, f"excluded by {hit!r}"
    if name in listed:
        return False, listed[name]
    norm = _norm_reason(path, modules.get(path))
    if norm is not None:
        return False, norm
    if tensor.endswith("bias"):
        return False, "bias"
    if tensor in TOKEN_NAMES:
        return False, f"token or position embedding ({tensor!r})"
    if tensor in RELATIVE_POSITION_NAMES:
        return False, f"relative position bias ({tensor!r})"
    last = path.rpartition(".")[2]
    if last in RELATIVE_POSITION_MODULES:
        return False, f"relative position bias ({last!r})"
    if tensor in LAYER_SCALE_NAMES:
        return False, f"layer scale ({tensor!r})"
    owner = f"{path}.{tensor}" if path else tensor
    if param is not None and param.kind == "weight_norm_direction":
        return False, f"weight_norm direction v of {owner!r}: the weight does not depend on its norm"
    if param is not None and param.kind == "orthogonal":
        return (
            False,
            f"orthogonal parametrization of {owner!r}: the weight is orthogonal whatever its original is",
        )
    if param is not None and param.kind == "spectral_norm":
        return False, f"spectral_norm of {owner!r}: W / sigma(W) does not depend on the scale of W"
    if ndim < 2:
        return False, f"ndim {ndim} < 2"
    if param is not None and param.kind == "weight_norm_magnitude":
        return True, f"weight_norm magnitude g of {owner!r}, ndim {ndim}"
    if param is not None:
        return True, f"original of {owner!r} ({param.what}), ndim {ndim}"
    return True, f"weight with ndim {ndim}"
