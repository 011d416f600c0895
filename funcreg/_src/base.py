"""The gradient-transformation protocol, and the flatten/gather/scatter step every transform shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Protocol

import torch

from funcreg._src.tree import PyTree, TreeSpec, check_same_spec, flatten, leaf_names, unflatten


class TransformInitFn(Protocol):
    """``init(params) -> state``."""

    def __call__(self, params: PyTree) -> Any: ...


class TransformUpdateFn(Protocol):
    """``update(updates, state, params=None) -> (updates, state)``."""

    def __call__(self, updates: PyTree, state: Any, params: Optional[PyTree] = None) -> tuple[PyTree, Any]: ...


class GradientTransformation(NamedTuple):
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

    init: TransformInitFn
    update: TransformUpdateFn


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

    def update(updates: PyTree, state: EmptyState, params: Optional[PyTree] = None) -> tuple[PyTree, EmptyState]:
        del params
        return updates, state

    return GradientTransformation(init, update)


class Flat(NamedTuple):
    """A tree of updates flattened together with its params: the leaves a transform works on.

    ``index`` lists the positions whose update is not ``None``; ``updates`` and ``params`` hold the full
    leaf lists (``params`` is ``None`` when the caller passed none).
    """

    updates: list[Any]
    params: Optional[list[Any]]
    spec: TreeSpec
    index: list[int]

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

    def tree(self, values: list[Any], base: Optional[list[Any]] = None) -> PyTree:
        """A tree with ``values`` at the present positions and ``base`` (default: the updates) elsewhere."""
        return unflatten(self.replace(self.updates if base is None else base, values), self.spec)

    def state_leaves(self, tree: PyTree, who: str, field: str) -> list[Any]:
        """Flattens a per-parameter state tree, checking it matches and has state where updates are present."""
        leaves, spec = flatten(tree)
        check_same_spec(self.spec, spec, "updates", f"{who} state {field!r}")
        for i in self.index:
            if leaves[i] is None:
                name = leaf_names(unflatten(self.updates, self.spec))[i]
                raise ValueError(
                    f"{who}: no state for {name!r} (its parameter was None or masked out at init, "
                    "but it now has an update)"
                )
        return leaves


def flat(updates: PyTree, params: Optional[PyTree], who: str, needs_params: bool = False) -> Flat:
    """Flattens ``updates`` (and ``params``), checks they match, and finds the non-``None`` updates."""
    u_leaves, spec = flatten(updates)
    p_leaves = None
    if params is not None:
        p_leaves, p_spec = flatten(params)
        check_same_spec(p_spec, spec, "params", "updates")
    elif needs_params:
        raise ValueError(f"{who} needs the parameters: call update(updates, state, params)")
    index = [i for i, u in enumerate(u_leaves) if u is not None]
    if needs_params:
        assert p_leaves is not None
        for i in index:
            if p_leaves[i] is None:
                name = leaf_names(updates)[i]
                raise ValueError(f"{who}: parameter {name!r} is None but its update is not")
    return Flat(u_leaves, p_leaves, spec, index)


def per_param_zeros(params: PyTree) -> PyTree:
    """A state tree of zeros shaped like each parameter (``None`` stays ``None``)."""
    leaves, spec = flatten(params)
    return unflatten([None if p is None else torch.zeros_like(p, memory_format=torch.preserve_format) for p in leaves], spec)


def per_param_counts(params: PyTree) -> PyTree:
    """A tree of 0-d int64 step counters, one per parameter (``None`` stays ``None``).

    ``torch.optim`` counts steps per parameter: a parameter whose gradient is ``None`` at a step is
    not stepped, so its Adam bias corrections and its first momentum step come later than others'.
    """
    leaves, spec = flatten(params)
    return unflatten([None if p is None else torch.zeros((), dtype=torch.int64, device=p.device) for p in leaves], spec)


def advance_steps(f: Flat, steps: PyTree, who: str) -> tuple[list[Any], list[torch.Tensor], Any]:
    """Steps the per-parameter counters of the present leaves.

    Returns the full leaf list of counters (for :meth:`Flat.tree`), the new counters of the present
    leaves, and their values: one Python int when they all agree (the usual case, eager), else a list
    with one value per present leaf (ints eager, tensors under vmap or torch.compile).
    """
    from funcreg._src import leafwise

    leaves = f.state_leaves(steps, who, "steps")
    new = [s + 1 for s in f.present(leaves)]
    values = [leafwise.concrete(s) for s in new]
    if values and all(isinstance(v, int) for v in values) and len(set(values)) == 1:
        return leaves, new, values[0]
    return leaves, new, values


def init_count(params: PyTree) -> torch.Tensor:
    """A 0-d int64 step counter on the device of the parameters."""
    leaves, _ = flatten(params)
    device = next((p.device for p in leaves if isinstance(p, torch.Tensor)), None)
    return torch.zeros((), dtype=torch.int64, device=device)


Schedule = Callable[[Any], Any]
