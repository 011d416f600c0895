"""Parameter trees from modules, and selections: which parameters a transform or penalty touches.

A selection is a named yes/no per parameter that prints as a table, so the rule behind weight decay
is visible. Rules that select nothing, and patterns that match no parameter, raise instead of
silently doing nothing (the failure of story 4 in ``shared/user-stories.md``).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

from funcreg._src.tree import PyTree, broadcast_prefix, flatten, leaf_names


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
    ) -> None:
        self._decisions = {str(k): bool(v) for k, v in decisions.items()}
        self._shapes = dict(shapes or {})
        self._reasons = dict(reasons or {})
        self.label = label

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
            rows.append((name, self._shapes.get(name, ""), "yes" if keep else "no", self._reasons.get(name, "")))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join(
            f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows
        )

    __str__ = table

    def __repr__(self) -> str:
        return f"Selection({len(self.selected)} of {len(self)} {self.label}: {self.selected!r})"

    def _combine(self, other: Selection, op: Callable[[bool, bool], bool], sym: str) -> Selection:
        if not isinstance(other, Selection):
            return NotImplemented
        if list(self) != list(other):
            raise ValueError(f"cannot combine selections over different names with {sym!r}")
        decisions = {k: op(self[k], other[k]) for k in self}
        reasons = {k: f"({self.reason(k)}) {sym} ({other.reason(k)})" for k in self}
        return Selection(decisions, self._shapes, reasons, self.label)

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
        )

    def resolve(self, tree: PyTree) -> list[bool]:
        """One bool per leaf of ``tree``, matched by leaf name; every name must be present in both."""
        names = leaf_names(tree)
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
            raise ValueError(f"{what} pattern {pat!r} matches no parameter{_suggest(pat, prefixes + list(names))}")
    return patterns


def _named_leaves(tree_or_module: Any) -> tuple[list[str], list[Any]]:
    if isinstance(tree_or_module, nn.Module):
        params = params_of(tree_or_module)
        return list(params), list(params.values())
    leaves, _ = flatten(tree_or_module)
    return leaf_names(tree_or_module), leaves


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


def decay_mask(model: nn.Module | PyTree, exclude: Iterable[str] = ()) -> Selection:
    """The usual weight-decay selection: weight matrices, conv kernels and embeddings, nothing else.

    Rules, first match wins:

    1. a name matched by an ``exclude`` glob (``"head.*"``, ``"*.pos_embed"``, or a module prefix such
       as ``"embed"``) is not decayed; a pattern that matches no parameter raises ``ValueError``;
    2. every parameter of a normalization layer is not decayed: BatchNorm, InstanceNorm, LayerNorm,
       GroupNorm, RMSNorm by type; any submodule whose class name contains ``Norm``; any submodule
       whose name starts with ``norm``, ends with ``norm`` (optionally followed by digits:
       ``layernorm``, ``norm1``), or is ``bn``/``ln``/``gn`` optionally followed by digits or ``_...``
       (``bn1``, ``ln_f``). The model's own class name is not looked at;
    3. biases (names ending in ``bias``) are not decayed;
    4. tensors with ``ndim < 2`` are not decayed (timm's rule);
    5. everything else (ndim >= 2: weight matrices, conv kernels, embeddings) is decayed.

    Given a parameter tree instead of a module, the type-based part of rule 2 is skipped.
    A selection that decays nothing raises ``ValueError``.

    Args:
        model: a module, or a parameter tree (names from its key paths).
        exclude: glob patterns of names not to decay.

    Returns:
        A :class:`Selection` over the names of ``params_of(model)``.

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.Sequential(torch.nn.Embedding(5, 2), torch.nn.Linear(2, 2))
        >>> fr.decay_mask(model, exclude=["0"]).selected
        ['1.weight']
    """
    names, leaves = _named_leaves(model)
    patterns = _check_patterns(exclude, names, "exclude")
    modules = dict(model.named_modules()) if isinstance(model, nn.Module) else {}
    decisions: dict[str, bool] = {}
    reasons: dict[str, str] = {}
    shapes: dict[str, str] = {}
    for name, leaf in zip(names, leaves):
        shapes[name] = _shape_text(leaf)
        module_path, _, attr = name.rpartition(".")
        hit = next((p for p in patterns if _matches(p, name)), None)
        norm = _norm_reason(module_path, modules.get(module_path))
        ndim = leaf.ndim if isinstance(leaf, torch.Tensor) else 0
        if hit is not None:
            decisions[name], reasons[name] = False, f"excluded by {hit!r}"
        elif norm is not None:
            decisions[name], reasons[name] = False, norm
        elif (attr or name).endswith("bias"):
            decisions[name], reasons[name] = False, "bias"
        elif ndim < 2:
            decisions[name], reasons[name] = False, f"ndim {ndim} < 2"
        else:
            decisions[name], reasons[name] = True, f"weight with ndim {ndim}"
    if not any(decisions.values()):
        raise ValueError("decay_mask selects no parameter: every parameter is a bias, a norm parameter, 1-D or excluded")
    return Selection(decisions, shapes, reasons, label="decay")


class Selector:
    """A rule that builds a :class:`Selection` from a module or a parameter tree when called.

    Pass it wherever a mask is accepted; it is evaluated on the parameter tree the transform sees.
    """

    def __init__(self, rule: Callable[[list[str], list[Any]], Selection], description: str) -> None:
        self._rule = rule
        self._description = description

    def __call__(self, tree_or_module: Any) -> Selection:
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
            reasons[n] = f"excluded by {exc!r}" if exc else (f"matches {inc!r}" if inc else "matches no pattern")
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


MaskLike = Union[bool, PyTree, Selection, Selector, Callable[[PyTree], Any]]


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
    names = leaf_names(tree)
    return [_as_bool(v, n, what) for v, n in zip(values, names)]
