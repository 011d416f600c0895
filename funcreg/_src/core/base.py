"""The gradient-transformation protocol, and the flatten/gather/scatter step every transform shares."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, cast

import torch

from funcreg._src.core.describe import call_text
from funcreg._src.core.dtensor import dtensor_type, match_layout
from funcreg._src.core.errors import ContractError, LeafTypeError
from funcreg._src.core.record import NO_RECORD, TransformRecord
from funcreg._src.core.tree import TreeSpec, check_same_spec, compiling, flatten, tree_names, unflatten
from funcreg._src.core.typing import PyTree


class TransformInitFn(Protocol):
    """``init(params) -> state``."""

    def __call__(self, params: PyTree) -> Any: ...


class TransformUpdateFn(Protocol):
    """``update(updates, state, params=None) -> (updates, state)``."""

    def __call__(self, updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, Any]: ...


class _TransformFields(NamedTuple):
    init: TransformInitFn
    update: TransformUpdateFn


class GradientTransformation(_TransformFields):
    """A pair of pure functions ``(init, update)`` over parameter trees, as in optax.

    ``init(params)`` returns the transform's state, a NamedTuple of tensors, with ``None`` for
    parameters that have no state (masked out, frozen). Map it over ensemble members with
    :func:`funcreg.vmap` (``torch.func.vmap`` itself refuses ``None`` leaves) and save it with
    :func:`funcreg.state_dict` (``torch.save`` works too, but ``torch.load(weights_only=True)``
    refuses NamedTuples). ``update(updates, state, params=None)`` returns the transformed updates and the new state;
    it never writes into its arguments. Updates are *added* to the parameters
    (:func:`funcreg.apply_updates`), so a descent step has updates ``-lr * g``.

    Leaves that are ``None`` in ``updates`` (frozen or unused parameters) pass through as ``None`` and
    their state is left as it was.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.chain(fr.scale(2.0), fr.scale_by_learning_rate(0.1))
        >>> params = {"w": torch.ones(2)}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.ones(2)}, state, params)
        >>> updates["w"]
        tensor([-0.2000, -0.2000])
    """

    # no __slots__: the record lives in the instance's __dict__, beside the two fields

    def __new__(
        cls, init: TransformInitFn, update: TransformUpdateFn, record: TransformRecord = NO_RECORD
    ) -> GradientTransformation:
        """Every transform's ``init`` refuses a parameter that is not a tensor (or ``None``) with
        :class:`funcreg.LeafTypeError` naming its key, before the transform's own code sees it.
        ``record`` holds what funcreg knows about the transform beyond its functions (how it
        prints, the torch kernel behind its donated step, ...): see :attr:`record`."""
        if not isinstance(record, TransformRecord):
            raise TypeError(f"record must be a TransformRecord, got {type(record).__name__}")
        self = super().__new__(cls, _checked_init(init), update)
        self.__dict__["_record"] = record
        return self

    @property
    def record(self) -> TransformRecord:
        """The transform's facts beyond ``(init, update)``: ``config`` (what ``repr`` prints),
        ``kernel`` (the torch kernel a donated step runs), ``form`` (the penalty form it applies) and
        ``parts`` (a chain's transforms). Empty for a transform built by hand."""
        return self.__dict__.get("_record", NO_RECORD)

    def with_record(self, **facts: Any) -> GradientTransformation:
        """The same transform with some facts of its :attr:`record` replaced."""
        return GradientTransformation(self.init, self.update, dataclasses.replace(self.record, **facts))

    def __repr__(self) -> str:
        """The factory call that built this transform, e.g. ``chain(clip_by_global_norm(1.0), adamw(0.001))``."""
        if self.record.config is not None:
            return self.record.config
        return f"GradientTransformation({getattr(self.update, '__qualname__', 'update')})"


def configured(
    __tx: GradientTransformation, __name: str, *args: Any, **kwargs: Any
) -> GradientTransformation:
    """``__tx`` recording ``name(args...)``, what its ``repr`` prints.

    Skipped under ``torch.compile`` (a step that builds its transform inside the compiled region
    must not trace string formatting; nobody prints a transform there).
    """
    if compiling():
        return __tx
    return __tx.with_record(config=call_text(__name, *args, **kwargs))


def _checked_init(init: TransformInitFn) -> TransformInitFn:
    """``init`` wrapped to refuse a parameter leaf that is neither a tensor nor ``None``, naming
    its key (marked, so wrapping twice is once)."""
    if getattr(init, "_fr_checked", False):
        return init

    def checked(params: PyTree) -> Any:
        leaves, _ = flatten(params)
        for i, leaf in enumerate(leaves):
            if leaf is not None and not isinstance(leaf, torch.Tensor):
                raise LeafTypeError(
                    f"parameter {tree_names(params)[i]!r} is {leaf!r:.40} (of type {type(leaf).__name__}), "
                    "expected a tensor (or None for a parameter without state)"
                )
        return init(params)

    checked._fr_checked = True  # type: ignore[attr-defined]
    checked.__wrapped__ = init  # type: ignore[attr-defined]
    return checked


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


def identity() -> GradientTransformation:
    """The transform that returns its updates unchanged and holds no state.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.identity()
        >>> tx.update({"w": torch.ones(1)}, tx.init({"w": torch.ones(1)}))[0]
        {'w': tensor([1.])}
    """

    def init(params: PyTree) -> EmptyState:
        del params
        return EmptyState()

    def update(updates: PyTree, state: EmptyState, params: PyTree | None = None) -> tuple[PyTree, EmptyState]:
        del params
        return updates, state

    return configured(GradientTransformation(init, update), "identity")


def _name_at(spec: TreeSpec, n: int, i: int) -> str:
    """The name of leaf ``i`` of a tree with ``spec`` (computed only for error messages)."""
    return tree_names(unflatten([None] * n, spec))[i]


def _kind(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


class Flat(NamedTuple):
    """A tree of updates flattened together with its params: the leaves a transform works on.

    ``index`` lists the positions whose update is not ``None``; ``updates`` and ``params`` hold the full
    leaf lists (``params`` is ``None`` when the caller passed none). Built by :func:`flat`, which
    enforces the per-parameter contract on the way in.
    """

    updates: list[Any]
    params: list[Any] | None
    spec: TreeSpec
    index: list[int]  # type: ignore[assignment]  # a field named like tuple.index, on purpose

    def name(self, i: int) -> str:
        """The name of leaf ``i`` (its key path)."""
        return _name_at(self.spec, len(self.updates), i)

    def present(self, leaves: list[Any]) -> list[Any]:
        """The entries of a full leaf list at the present positions."""
        return [leaves[i] for i in self.index]

    def present_updates(self) -> list[torch.Tensor]:
        return self.present(self.updates)

    def present_params(self) -> list[torch.Tensor]:
        assert self.params is not None
        return self.present(self.params)

    def replace(self, leaves: list[Any], values: list[Any]) -> list[Any]:
        """A copy of a full leaf list with the present positions replaced by ``values``."""
        out = list(leaves)
        for i, v in zip(self.index, values):
            out[i] = v
        return out

    def tree(self, values: list[Any], base: list[Any] | None = None) -> PyTree:
        """A tree with ``values`` at the present positions and ``base`` (default: the updates) elsewhere."""
        return unflatten(self.replace(self.updates if base is None else base, values), self.spec)

    def restrict(self, leaves: list[Any] | None, keep: list[bool]) -> PyTree:
        """The tree of ``leaves`` with ``None`` wherever ``keep`` is false (``None`` for no leaves)."""
        if leaves is None:
            return None
        return unflatten([x if k else None for x, k in zip(leaves, keep)], self.spec)

    def merge(self, inner: PyTree, keep: list[bool], who: str) -> list[Any]:
        """The full update leaves: ``inner``'s where ``keep``, this tree's own elsewhere."""
        leaves, spec = flatten(inner)
        check_same_spec(self.spec, spec, "updates", who)
        return [n if k else u for n, u, k in zip(leaves, self.updates, keep)]

    def update_where(
        self, tx: GradientTransformation, state: Any, keep: list[bool], who: str
    ) -> tuple[list[Any], Any]:
        """``tx`` run on the leaves where ``keep`` only: the full update leaves (see ``merge``) and its new state."""
        inner, new_state = tx.update(
            self.restrict(self.updates, keep), state, self.restrict(self.params, keep)
        )
        return self.merge(inner, keep, who), new_state

    def state_leaves(self, tree: PyTree, who: str, field: str, per_element: bool = True) -> list[Any]:
        """Flattens a per-parameter state tree and checks it against the present updates.

        ``per_element`` state (moments, momentum buffers) has exactly the update's shape, dtype and
        device; counters (``per_element=False``) are 0-d. Anything else raises, naming the key.
        """
        leaves, spec = flatten(tree)
        check_same_spec(self.spec, spec, "updates", f"{who} state {field!r}")
        for i in self.index:
            s = leaves[i]
            if s is None:
                raise ContractError(
                    f"{who}: no state for {self.name(i)!r} (its parameter was None or masked out at init, "
                    "but it now has an update)"
                )
            if not isinstance(s, torch.Tensor):
                raise LeafTypeError(
                    f"{who} state {field!r} for {self.name(i)!r} is {_kind(s)}, expected a tensor"
                )
            if not per_element:
                if s.ndim != 0:
                    raise ContractError(
                        f"{who} state {field!r} for {self.name(i)!r} has shape {tuple(s.shape)}, expected a 0-d counter"
                    )
                continue
            u = self.updates[i]
            # inline, not a helper call: this runs for every state tensor of every step
            if s.shape != u.shape or s.dtype != u.dtype or s.device != u.device:
                raise _unlike(
                    s,
                    u,
                    f"{who} state {field!r} for {self.name(i)!r}",
                    "expected {} (the parameter's shape)",
                    "its update {} on {}: state keeps its parameter's dtype and device",
                )
        return leaves


def _unlike(x: torch.Tensor, ref: torch.Tensor, subject: str, shape_tail: str, dtype_tail: str) -> Exception:
    """The error for ``x`` unlike ``ref`` (shape first): ``subject``, then a tail whose ``{}`` are ``ref``'s."""
    if x.shape != ref.shape:
        return ContractError(f"{subject} has shape {tuple(x.shape)}, " + shape_tail.format(tuple(ref.shape)))
    return LeafTypeError(f"{subject} is {x.dtype} on {x.device}, " + dtype_tail.format(ref.dtype, ref.device))


def _check_update(u: Any, spec: TreeSpec, n: int, i: int, who: str) -> None:
    """Refuses an update that is not a dense floating-point (or complex) tensor, naming its key."""
    if not isinstance(u, torch.Tensor):
        raise LeafTypeError(
            f"{who}: the update for {_name_at(spec, n, i)!r} is {_kind(u)}, expected a tensor or None"
        )
    if u.layout is not torch.strided:
        raise LeafTypeError(
            f"{who}: the update for {_name_at(spec, n, i)!r} is a {u.layout} tensor; funcreg's transforms take "
            "dense (strided) gradients: pass grad.to_dense() (torch.optim's Adam and AdamW refuse sparse "
            "gradients too)"
        )
    if not (u.is_floating_point() or u.is_complex()):
        raise LeafTypeError(
            f"{who}: the update for {_name_at(spec, n, i)!r} has dtype {u.dtype}, expected a floating-point "
            "(or complex) tensor"
        )


def _check_param(p: Any, u: torch.Tensor, spec: TreeSpec, n: int, i: int, who: str) -> None:
    """Refuses a parameter that does not match its update: missing, not a tensor, not
    floating-point, or of another shape, dtype or device, naming its key."""
    if p is None:
        raise ContractError(f"{who}: parameter {_name_at(spec, n, i)!r} is None but its update is not")
    if not isinstance(p, torch.Tensor):
        raise LeafTypeError(f"{who}: parameter {_name_at(spec, n, i)!r} is {_kind(p)}, expected a tensor")
    if not (p.is_floating_point() or p.is_complex()):
        raise LeafTypeError(
            f"{who}: parameter {_name_at(spec, n, i)!r} has dtype {p.dtype}; only floating-point (or complex) "
            "parameters are optimized: pass None as its gradient to leave it alone"
        )
    if u.shape != p.shape or u.dtype != p.dtype or u.device != p.device:
        raise _unlike(
            u,
            p,
            f"{who}: the update for {_name_at(spec, n, i)!r}",
            "its parameter {}: gradients and updates have exactly their parameter's shape",
            "its parameter {} on {}: cast the gradient to the parameter's dtype and device first",
        )


def flat(updates: PyTree, params: PyTree | None, who: str, needs_params: bool = False) -> Flat:
    """Flattens ``updates`` (and ``params``) and enforces the per-parameter contract.

    The one piece of tree plumbing every transform, combinator, form and :func:`funcreg.apply_updates`
    goes through. The trees have one structure (``StructureError`` naming the first differing key);
    every present (non-``None``) update is a floating-point tensor; with ``params``, its parameter is a
    floating-point tensor of the same shape (``ContractError``), dtype and device (``LeafTypeError``).
    The checks read only tensor metadata, so they cost no device work and are static under tracing.
    """
    u_leaves, spec = flatten(updates)
    n = len(u_leaves)
    index = []
    for i, u in enumerate(u_leaves):
        if u is not None:
            _check_update(u, spec, n, i, who)
            index.append(i)
    p_leaves = None
    if params is not None:
        p_leaves, p_spec = flatten(params)
        check_same_spec(p_spec, spec, "params", "updates")
        for i in index:
            _check_param(p_leaves[i], u_leaves[i], spec, n, i, who)
        # DTensor leaves (FSDP2, tensor parallel): updates take their parameter's layout
        dtensor = dtensor_type()
        if dtensor is not None:
            for i in index:
                if not (isinstance(u_leaves[i], dtensor) or isinstance(p_leaves[i], dtensor)):
                    continue
                # cast: mypy cannot infer a lambda with a default argument against Callable[[], str]
                u_leaves[i] = match_layout(
                    u_leaves[i],
                    p_leaves[i],
                    dtensor,
                    cast("Callable[[], str]", lambda i=i: _name_at(spec, n, i)),
                    who,
                )
    elif needs_params:
        raise ValueError(f"{who} needs the parameters: call update(updates, state, params)")
    return Flat(u_leaves, p_leaves, spec, index)


def begin(
    updates: PyTree, state: Any, params: PyTree | None, cls: type, who: str, needs_params: bool = False
) -> Flat:
    """The first lines of a stateful ``update``: the state is the ``cls`` its ``init`` returns, and the
    trees keep the per-parameter contract (:func:`flat`)."""
    expect_state(state, cls, who)
    return flat(updates, params, who, needs_params=needs_params)


def expect_state(state: Any, cls: type, who: str) -> None:
    """Raises ``LeafTypeError`` unless ``state`` is the ``cls`` that ``who``'s ``init`` returns."""
    if isinstance(state, cls):
        return
    if state is None:
        got = "None (call tx.init(params) first and pass its result)"
    elif isinstance(state, tuple) and not hasattr(state, "_fields"):
        got = f"a tuple of {len(state)} entries (the state of a chain?)"
    else:
        got = f"a {type(state).__name__}"
    raise LeafTypeError(f"{who} expects its state to be a {cls.__name__} (from its init), got {got}")


def find_states(state: Any, cls: type) -> list[Any]:
    """Every ``cls`` instance inside a (chained, named, masked, partitioned) transform state, in order."""
    found: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, cls):
            found.append(node)
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (tuple, list)):
            for v in node:
                walk(v)

    walk(state)
    return found


def find_one_state(state: Any, cls: type, who: str) -> Any:
    """The one ``cls`` inside ``state`` (``state`` itself, or inside a chain's); ``ValueError`` naming
    ``who`` when there is none or several."""
    if isinstance(state, cls):
        return state
    found = find_states(state, cls)
    if len(found) != 1:
        raise ValueError(f"{who}: expected one {cls.__name__} in the state, found {len(found)}")
    return found[0]


def per_param_zeros(params: PyTree) -> PyTree:
    """A state tree of zeros shaped like each parameter (``None`` stays ``None``)."""
    leaves, spec = flatten(params)
    return unflatten(
        [None if p is None else torch.zeros_like(p, memory_format=torch.preserve_format) for p in leaves],
        spec,
    )
