"""Combining transforms: ``chain``, ``named_chain`` and ``partition``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Union

from funcreg._src.core.base import GradientTransformation, configured, expect_state, flat
from funcreg._src.core.errors import LeafTypeError
from funcreg._src.core.record import TransformRecord
from funcreg._src.core.tree import broadcast_prefix, flatten, tree_names, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.selection.mask_cache import PerStructure


def _check_transform(tx: Any, where: str) -> None:
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"{where} is a {type(tx).__name__}, not a GradientTransformation")


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies transforms one after another; the state is the tuple of their states.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.chain(fr.add_decayed_weights(0.1), fr.sgd(0.5))  # == torch.optim.SGD(lr=0.5, weight_decay=0.1)
        >>> params = {"w": torch.tensor([2.0])}
        >>> u, _ = tx.update({"w": torch.tensor([1.0])}, tx.init(params), params)
        >>> u["w"]  # -0.5 * (1 + 0.1 * 2)
        tensor([-0.6000])
    """
    for i, tx in enumerate(transforms):
        _check_transform(tx, f"chain argument {i}")

    def init(params: PyTree) -> tuple[Any, ...]:
        return tuple(tx.init(params) for tx in transforms)

    def update(
        updates: PyTree, state: tuple[Any, ...], params: PyTree | None = None
    ) -> tuple[PyTree, tuple[Any, ...]]:
        if not isinstance(state, tuple) or hasattr(state, "_fields"):
            got = "None (call tx.init(params) first)" if state is None else f"a {type(state).__name__}"
            raise LeafTypeError(
                f"chain of {len(transforms)} transforms expects a tuple of their states, got {got}"
            )
        if len(state) != len(transforms):
            raise ValueError(f"chain of {len(transforms)} transforms got a state with {len(state)} entries")
        new_states = []
        for tx, s in zip(transforms, state):
            updates, s = tx.update(updates, s, params)
            new_states.append(s)
        return updates, tuple(new_states)

    # a donated step reads the parts to fold a penalty form into a torch kernel (kernels/fused_forms.py)
    record = TransformRecord(parts=(transforms, None))
    return configured(GradientTransformation(init, update, record), "chain", *transforms)


def named_chain(*named_transforms: tuple[str, GradientTransformation]) -> GradientTransformation:
    """Like :func:`chain`, with the state a dict keyed by the given names (readable checkpoints).

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.named_chain(("decay", fr.add_decayed_weights(0.1)), ("adam", fr.scale_by_adam()))
        >>> list(tx.init({"w": torch.zeros(1)}))
        ['decay', 'adam']
    """
    names = []
    for i, item in enumerate(named_transforms):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"named_chain argument {i} must be a (name, transform) pair, got {item!r}")
        _check_transform(item[1], f"named_chain entry {item[0]!r}")
        if item[0] in names:
            raise ValueError(f"named_chain: duplicate name {item[0]!r}")
        names.append(item[0])

    def init(params: PyTree) -> dict[str, Any]:
        return {name: tx.init(params) for name, tx in named_transforms}

    def update(
        updates: PyTree, state: dict[str, Any], params: PyTree | None = None
    ) -> tuple[PyTree, dict[str, Any]]:
        if not isinstance(state, dict):
            got = "None (call tx.init(params) first)" if state is None else f"a {type(state).__name__}"
            raise LeafTypeError(f"named_chain expects a dict of its transforms' states, got {got}")
        if list(state) != names:
            raise ValueError(f"named_chain expects state keys {names}, got {list(state)}")
        new_state = {}
        for name, tx in named_transforms:
            updates, new_state[name] = tx.update(updates, state[name], params)
        return updates, new_state

    record = TransformRecord(parts=(tuple(tx for _, tx in named_transforms), tuple(names)))
    return configured(GradientTransformation(init, update, record), "named_chain", *named_transforms)


class PartitionState(NamedTuple):
    """State of :func:`partition`: each label's transform state, over that label's leaves only."""

    inner_states: dict[str, Any]


Labels = Union[PyTree, Callable[[PyTree], PyTree]]


def partition(transforms: Mapping[str, GradientTransformation], labels: Labels) -> GradientTransformation:
    """Applies a different transform to each group of parameters.

    ``labels`` gives each parameter a label: a tree of strings with the structure of the parameters (or
    a prefix of it), or a callable ``params -> labels``. Each transform sees ``None`` for the
    parameters of other labels, so it holds no state for them. A label with no transform, and a
    transform whose label no parameter carries, raise ``ValueError``.

    This is how different layers get different coefficients, as torch.optim parameter groups do.

    Examples:
        >>> import torch, funcreg as fr
        >>> params = {"w": torch.ones(1), "b": torch.ones(1)}
        >>> tx = fr.partition({"decay": fr.sgd(0.1, weight_decay=0.5), "plain": fr.sgd(0.1)},
        ...                   {"w": "decay", "b": "plain"})
        >>> u, _ = tx.update({"w": torch.zeros(1), "b": torch.zeros(1)}, tx.init(params), params)
        >>> u
        {'w': tensor([-0.0500]), 'b': tensor([-0.])}
    """
    if not isinstance(transforms, Mapping) or not transforms:
        raise TypeError("partition expects a non-empty dict {label: transform}")
    for label, tx in transforms.items():
        _check_transform(tx, f"partition transform {label!r}")

    def resolve(tree: PyTree, check_unused: bool = True) -> list[Any]:
        given = labels(tree) if callable(labels) else labels
        values = broadcast_prefix(given, tree, what="labels")
        names = tree_names(tree)
        leaves, _ = flatten(tree)
        for name, value, leaf in zip(names, values, leaves):
            if leaf is not None and value not in transforms:
                raise ValueError(
                    f"parameter {name!r} has label {value!r}, which has no transform (labels with a "
                    f"transform: {sorted(map(str, transforms))})"
                )
        used = {v for v, leaf in zip(values, leaves) if leaf is not None}
        unused = [label for label in transforms if label not in used]
        if check_unused and unused:
            raise ValueError(f"partition transform {unused[0]!r} is given no parameter by labels")
        return values

    # labels depend on the structure only: resolved once per structure at update (init checks more)
    cached = PerStructure(labels, lambda _, tree: resolve(tree, check_unused=False))

    def restrict(leaves: list[Any], values: list[Any], label: str) -> list[Any]:
        return [x if v == label else None for x, v in zip(leaves, values)]

    def init(params: PyTree) -> PartitionState:
        values = resolve(params)
        leaves, spec = flatten(params)
        return PartitionState(
            {
                label: tx.init(unflatten(restrict(leaves, values, label), spec))
                for label, tx in transforms.items()
            }
        )

    def update(
        updates: PyTree, state: PartitionState, params: PyTree | None = None
    ) -> tuple[PyTree, PartitionState]:
        expect_state(state, PartitionState, "partition")
        f = flat(updates, params, "partition")
        out = list(f.updates)
        new_states = {}
        # a group whose gradients are all None at this step (frozen, unused) is fine here: the
        # "transform without parameters" check belongs to init
        values = cached(params if params is not None else updates)
        for label, tx in transforms.items():
            keep = [v == label for v in values]
            merged, new_states[label] = f.update_where(
                tx, state.inner_states[label], keep, f"partition transform {label!r}'s updates"
            )
            for i, n in enumerate(merged):
                if keep[i]:
                    out[i] = n
        return unflatten(out, f.spec), PartitionState(new_states)

    return configured(GradientTransformation(init, update), "partition", dict(transforms), labels)
