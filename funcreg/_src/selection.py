"""Parameter trees from modules, and selections: which parameters a transform or penalty touches.

A selection is a named yes/no per parameter that prints as a table, so the rule behind weight decay
is visible. Rules that select nothing, and patterns that match no parameter, raise instead of
silently doing nothing (a hand-written grouping loop with one misplaced ``if`` decays nothing, and
nothing says so).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from funcreg._src.tree import broadcast_prefix, flatten, tree_names
from funcreg._src.typing import MaskLike, PyTree


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of ``module`` as a flat dict ``{name: tensor}`` in ``named_parameters`` order.

    The tensors are detached and share memory with the module; funcreg never writes into them, so the
    module keeps its weights until you load new ones (``module.load_state_dict(params, strict=False)``).
    The dict is what ``torch.func.functional_call(module, params, args)`` expects.

    Examples:
        >>> import torch, funcreg as fr
        >>> params = fr.params_of(torch.nn.Linear(3, 2))
        >>> {k: tuple(v.shape) for k, v in params.items()}
        {'weight': (2, 3), 'bias': (2,)}
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"params_of expects a torch.nn.Module, got {type(module).__name__}")
    return {name: p.detach() for name, p in module.named_parameters()}


def buffers_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers of ``module`` (BatchNorm running statistics, ...) as a flat dict of detached tensors.

    Examples:
        >>> import torch, funcreg as fr
        >>> sorted(fr.buffers_of(torch.nn.BatchNorm1d(3)))
        ['num_batches_tracked', 'running_mean', 'running_var']
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"buffers_of expects a torch.nn.Module, got {type(module).__name__}")
    return {name: b.detach() for name, b in module.named_buffers()}


def _shape_text(x: Any) -> str:
    return "x".join(str(d) for d in x.shape) if isinstance(x, torch.Tensor) and x.ndim else "scalar"


class Selection(Mapping[str, bool]):
    """A yes/no decision per named parameter, with the reason for each; usable wherever a mask is.

    A selection is matched to a parameter tree by leaf name (see :func:`funcreg.tree_names`), so it
    works for the flat dicts of :func:`funcreg.params_of` and for nested trees alike. ``str()`` of a
    selection is a table of names, shapes, decisions and reasons. Selections combine with ``~``, ``&``
    and ``|``.

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3))
        >>> sel = fr.decay_mask(model)
        >>> sel.selected
        ['0.weight']
        >>> print(sel)
        name         shape  decay  reason
        0.weight     3x2    yes    weight with ndim 2
        0.bias       3      no     bias
        1.weight     3      no     normalization layer (LayerNorm)
        1.bias       3      no     normalization layer (LayerNorm)
    """

    def __init__(
        self,
        decisions: Mapping[str, bool],
        shapes: Mapping[str, str] | None = None,
        reasons: Mapping[str, str] | None = None,
        label: str = "selected",
        notes: Sequence[str] = (),
    ) -> None:
        self._decisions = {str(k): bool(v) for k, v in decisions.items()}
        self._shapes = dict(shapes or {})
        self._reasons = dict(reasons or {})
        self.label = label
        self.notes: tuple[str, ...] = tuple(notes)
        """Remarks printed under the table, e.g. names ``model.no_weight_decay()`` lists that the model lacks."""

    def __getitem__(self, name: str) -> bool:
        return self._decisions[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decisions)

    def __len__(self) -> int:
        return len(self._decisions)

    @property
    def selected(self) -> list[str]:
        """Names of the selected parameters, in order."""
        return [k for k, v in self._decisions.items() if v]

    @property
    def unselected(self) -> list[str]:
        """Names of the parameters left out, in order."""
        return [k for k, v in self._decisions.items() if not v]

    def reason(self, name: str) -> str:
        """Why ``name`` was selected or not."""
        return self._reasons.get(name, "")

    def table(self) -> str:
        """The selection as a text table: name, shape, decision, reason."""
        rows = [("name", "shape", self.label, "reason")]
        for name, keep in self._decisions.items():
            rows.append(
                (name, self._shapes.get(name, ""), "yes" if keep else "no", self._reasons.get(name, ""))
            )
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [
            f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows
        ]
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    __str__ = table

    def to_dataframe(self) -> Any:
        """A pandas DataFrame, one row per parameter: ``name``, ``shape``, the decision (a bool column
        named by the selection's label, ``decay`` for :func:`decay_mask`) and ``reason``.

        Examples:
            >>> import torch, funcreg as fr
            >>> df = fr.decay_mask(torch.nn.Linear(2, 3)).to_dataframe()  # needs pandas
            >>> df.to_dict("records")[0]
            {'name': 'weight', 'shape': '3x2', 'decay': True, 'reason': 'weight with ndim 2'}
        """
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("Selection.to_dataframe needs pandas: pip install pandas") from err
        return pd.DataFrame.from_records(
            [
                {
                    "name": n,
                    "shape": self._shapes.get(n, ""),
                    self.label: keep,
                    "reason": self._reasons.get(n, ""),
                }
                for n, keep in self._decisions.items()
            ],
            columns=["name", "shape", self.label, "reason"],
        )

    def __repr__(self) -> str:
        return f"Selection({len(self.selected)} of {len(self)} {self.label}: {self.selected!r})"

    def _combine(self, other: Selection, op: Callable[[bool, bool], bool], sym: str) -> Selection:
        if not isinstance(other, Selection):
            return NotImplemented
        if list(self) != list(other):
            raise ValueError(f"cannot combine selections over different names with {sym!r}")
        decisions = {k: op(self[k], other[k]) for k in self}
        reasons = {k: f"({self.reason(k)}) {sym} ({other.reason(k)})" for k in self}
        return Selection(decisions, self._shapes, reasons, self.label, self.notes + other.notes)

    def __and__(self, other: Selection) -> Selection:
        return self._combine(other, lambda a, b: a and b, "&")

    def __or__(self, other: Selection) -> Selection:
        return self._combine(other, lambda a, b: a or b, "|")

    def __invert__(self) -> Selection:
        return Selection(
            {k: not v for k, v in self._decisions.items()},
            self._shapes,
            {k: f"not ({self.reason(k)})" for k in self},
            self.label,
            self.notes,
        )

    def resolve(self, tree: PyTree) -> list[bool]:
        """One bool per leaf of ``tree``, matched by leaf name; every name must be present in both."""
        names = tree_names(tree)
        missing = [n for n in names if n not in self._decisions]
        if missing:
            raise ValueError(
                f"selection has no entry for parameter {missing[0]!r}{_suggest(missing[0], list(self))}"
            )
        extra = [n for n in self._decisions if n not in set(names)]
        if extra:
            raise ValueError(
                f"selection names {extra[0]!r}, which is not a parameter of this tree{_suggest(extra[0], names)}"
            )
        return [self._decisions[n] for n in names]


def _suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    if close:
        return f" (did you mean {', '.join(repr(c) for c in close)}?)"
    shown = ", ".join(repr(c) for c in list(candidates)[:8])
    more = ", ..." if len(candidates) > 8 else ""
    return f" (names are: {shown}{more})"


def _matches(pattern: str, name: str) -> bool:
    """Glob over the full name, or over a module prefix (``"encoder"`` matches ``"encoder.0.weight"``)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def _check_patterns(patterns: Iterable[str], names: Sequence[str], what: str) -> list[str]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    patterns = list(patterns)
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f"{what} patterns must be strings, got {pat!r}")
        if not any(_matches(pat, n) for n in names):
            # suggest module prefixes too: a typo'd "haed" should point at "head", not only at "head.weight"
            prefixes = sorted({".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)})
            raise ValueError(
                f"{what} pattern {pat!r} matches no parameter{_suggest(pat, prefixes + list(names))}"
            )
    return patterns


def _named_leaves(tree_or_module: Any) -> tuple[list[str], list[Any]]:
    if isinstance(tree_or_module, nn.Module):
        params = params_of(tree_or_module)
        return list(params), list(params.values())
    leaves, _ = flatten(tree_or_module)
    return tree_names(tree_or_module), leaves


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

_PARAMETRIZED = re.compile(
    r"^(?P<owner>(?:.*\.)?)parametrizations\.(?P<tensor>[^.]+)\.(?P<orig>original\d*)$"
)


class _Parametrized(NamedTuple):
    owner: str  # module path of the module that owns the parametrized tensor
    tensor: str  # the parametrized tensor's name there ("weight")
    kind: str  # "weight_norm_magnitude", "weight_norm_direction", "orthogonal", "spectral_norm", "other"
    what: str  # the parametrization, for the reason


def _parametrization(name: str, modules: Mapping[str, nn.Module]) -> _Parametrized | None:
    """What a ``torch.nn.utils.parametrize`` original (or an old-style ``weight_g``/``weight_v``/``weight_orig``) is."""
    m = _PARAMETRIZED.match(name)
    if m is not None:
        owner = m["owner"][:-1]
        plist = modules.get(f"{m['owner']}parametrizations.{m['tensor']}")
        # a ParametrizationList (a ModuleList): iterable, which nn.Module's type doesn't say
        kinds = [type(x).__name__ for x in cast("Iterable[nn.Module]", plist)] if plist is not None else []
        orig = m["orig"]
        if kinds == ["_WeightNorm"]:
            kind = "weight_norm_magnitude" if orig == "original0" else "weight_norm_direction"
        elif kinds == ["_Orthogonal"]:
            kind = "orthogonal"
        elif kinds == ["_SpectralNorm"]:
            kind = "spectral_norm"
        else:
            kind = "other"
        return _Parametrized(
            owner, m["tensor"], kind, " + ".join(k.lstrip("_") for k in kinds) or "parametrization"
        )
    owner, _, attr = name.rpartition(".")
    module = modules.get(owner)
    if module is None:
        return None
    params = dict(module.named_parameters(recurse=False))
    if attr in ("weight_g", "weight_v") and "weight_g" in params and "weight_v" in params:
        kind = "weight_norm_magnitude" if attr == "weight_g" else "weight_norm_direction"
        return _Parametrized(owner, "weight", kind, "weight_norm (torch.nn.utils.weight_norm)")
    if attr == "weight_orig" and hasattr(module, "weight_u"):
        return _Parametrized(owner, "weight", "spectral_norm", "spectral_norm (torch.nn.utils.spectral_norm)")
    return None


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


def by_module(*types: type, params: str | Sequence[str] = "weight") -> Selector:
    """Selects parameters by the type of the module that holds them: Keras' "kernels only".

    ``fr.by_module(nn.Linear, nn.Conv2d)`` selects the ``weight`` of every ``nn.Linear`` and
    ``nn.Conv2d`` (subclasses included), what Keras' ``kernel_regularizer`` penalizes, and nothing of
    LayerNorm, BatchNorm or embeddings. ``params="all"`` selects every parameter held directly by
    such modules (their biases too); a tuple of names selects those (``params=("weight", "bias")``).
    A parametrized ``weight`` counts as the weight: its ``original`` tensors are selected.

    Module types are not in a parameter tree, so the rule needs the module: pass
    ``fr.by_module(...)(model)``, a :class:`Selection`, as the mask. A rule that selects nothing, and
    a type no module of the model has, raise ``ValueError``.

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 1))
        >>> fr.by_module(torch.nn.Linear)(model).selected
        ['0.weight', '2.weight']
        >>> fr.by_module(torch.nn.Linear, params="all")(model).selected
        ['0.weight', '0.bias', '2.weight', '2.bias']
    """
    if not types:
        raise ValueError("by_module needs at least one module type (nn.Linear, nn.Conv2d, ...)")
    for t in types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"by_module expects torch.nn.Module subclasses such as nn.Linear, got {t!r}")
    if isinstance(params, str) and params != "all":
        wanted: tuple[str, ...] | None = (params,)
    elif isinstance(params, str):
        wanted = None
    else:
        wanted = tuple(params)
        if not wanted or not all(isinstance(w, str) for w in wanted):
            raise TypeError(f"by_module params must be 'all', a name or a tuple of names, got {params!r}")
    type_text = ", ".join(t.__name__ for t in types)
    what = "every parameter" if wanted is None else " or ".join(repr(w) for w in wanted)
    description = f"by_module({type_text}, params={params!r})"

    def module_rule(model: nn.Module) -> Selection:
        modules = dict(model.named_modules())
        owners = {path for path, m in modules.items() if isinstance(m, types)}
        missing = [t.__name__ for t in types if not any(isinstance(modules[p], t) for p in owners)]
        if missing:
            raise ValueError(f"{description}: the model has no module of type {missing[0]}")
        names, leaves = _named_leaves(model)
        decisions, reasons = {}, {}
        for n in names:
            param = _parametrization(n, modules)
            path, _, attr = n.rpartition(".")
            if param is not None:
                path, attr = param.owner, param.tensor
            chosen = path in owners and (wanted is None or attr in wanted)
            decisions[n] = chosen
            if chosen:
                reasons[n] = f"{attr} of {type(modules[path]).__name__}"
            elif path in owners:
                reasons[n] = f"{attr} of {type(modules[path]).__name__}, not {what}"
            else:
                reasons[n] = f"not in a {type_text} module"
        if not any(decisions.values()):
            raise ValueError(f"{description} selects no parameter (the {type_text} modules have no {what})")
        return Selection(decisions, {n: _shape_text(x) for n, x in zip(names, leaves)}, reasons)

    return Selector(None, description, module_rule=module_rule)


class Selector:
    """A rule that builds a :class:`Selection` from a module or a parameter tree when called.

    Pass it wherever a mask is accepted; it is evaluated on the parameter tree the transform sees.
    """

    def __init__(
        self,
        rule: Callable[[list[str], list[Any]], Selection] | None,
        description: str,
        module_rule: Callable[[nn.Module], Selection] | None = None,
    ) -> None:
        if rule is None and module_rule is None:
            raise ValueError("a Selector needs a rule over names and tensors, or one over a module")
        self._rule = rule
        self._module_rule = module_rule
        self._description = description

    def __call__(self, tree_or_module: Any) -> Selection:
        if self._module_rule is not None and isinstance(tree_or_module, nn.Module):
            return self._module_rule(tree_or_module)
        if self._rule is None:
            raise TypeError(
                f"{self._description} needs the module, not a parameter tree (module types are not in a tree): "
                f"pass {self._description}(model), a Selection, as the mask"
            )
        names, leaves = _named_leaves(tree_or_module)
        return self._rule(names, leaves)

    def __repr__(self) -> str:
        return self._description


def by_name(*patterns: str, exclude: Iterable[str] = ()) -> Selector:
    """Selects the parameters whose name matches one of the glob ``patterns`` and no ``exclude`` glob.

    A pattern also matches every parameter under a module prefix (``"encoder"`` selects
    ``"encoder.0.weight"``). Any pattern that matches no parameter raises ``ValueError`` when the rule
    is applied, as does a rule that selects nothing.

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> fr.by_name("*.weight", exclude=["1.*"])(model).selected
        ['0.weight']
    """
    if not patterns:
        raise ValueError("by_name needs at least one pattern")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)

    def rule(names: list[str], leaves: list[Any]) -> Selection:
        include = _check_patterns(patterns, names, "by_name")
        drop = _check_patterns(exclude, names, "exclude")
        decisions, reasons = {}, {}
        for n in names:
            inc = next((p for p in include if _matches(p, n)), None)
            exc = next((p for p in drop if _matches(p, n)), None)
            decisions[n] = inc is not None and exc is None
            reasons[n] = (
                f"excluded by {exc!r}" if exc else (f"matches {inc!r}" if inc else "matches no pattern")
            )
        if not any(decisions.values()):
            raise ValueError(f"by_name{patterns!r} with exclude={list(exclude)!r} selects no parameter")
        return Selection(decisions, {n: _shape_text(x) for n, x in zip(names, leaves)}, reasons)

    return Selector(rule, f"by_name({', '.join(map(repr, patterns))}, exclude={list(exclude)!r})")


def by_predicate(predicate: Callable[[str, torch.Tensor], bool], description: str = "") -> Selector:
    """Selects the parameters for which ``predicate(name, tensor)`` is true.

    A predicate that selects nothing raises ``ValueError`` when applied.

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> fr.by_predicate(lambda name, w: w.ndim >= 2)(model).selected
        ['0.weight', '1.weight']
    """
    if not callable(predicate):
        raise TypeError(f"by_predicate expects a callable (name, tensor) -> bool, got {predicate!r}")
    text = description or getattr(predicate, "__name__", "predicate")

    def rule(names: list[str], leaves: list[Any]) -> Selection:
        decisions = {n: bool(predicate(n, x)) if x is not None else False for n, x in zip(names, leaves)}
        if not any(decisions.values()):
            raise ValueError(f"by_predicate({text}) selects no parameter")
        reasons = {n: f"{text} is {v}" for n, v in decisions.items()}
        return Selection(decisions, {n: _shape_text(x) for n, x in zip(names, leaves)}, reasons)

    return Selector(rule, f"by_predicate({text})")


def _as_bool(value: Any, name: str, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.numel() == 1:
        return bool(value)
    raise TypeError(f"{what} value at {name!r} must be a bool, got {value!r}")


def resolve_mask(mask: MaskLike, tree: PyTree, what: str = "mask") -> list[bool]:
    """One bool per leaf of ``tree`` from anything funcreg accepts as a mask.

    Accepted: a :class:`Selection` (matched by name), a callable ``tree -> mask`` (a :class:`Selector`
    or your own function), a bool, or a bool tree with the structure of ``tree`` or of a prefix of it.
    """
    if isinstance(mask, nn.Module):
        raise TypeError(f"{what} is a module; pass fr.decay_mask(model) or a bool tree instead")
    if isinstance(mask, Selection):
        return mask.resolve(tree)
    if callable(mask) and not isinstance(mask, torch.Tensor):
        produced = mask(tree)
        if callable(produced) and not isinstance(produced, (Selection, torch.Tensor)):
            raise TypeError(f"{what} callable returned another callable ({produced!r}), not a mask")
        return resolve_mask(produced, tree, what)
    values = broadcast_prefix(mask, tree, what=what)
    names = tree_names(tree)
    return [_as_bool(v, n, what) for v, n in zip(values, names)]
