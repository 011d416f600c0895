"""Hyperparameters held in the state, as tensors: change them between steps without a new transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from funcreg._src.core.base import GradientTransformation, configured, expect_state, find_one_state
from funcreg._src.core.tree import flatten
from funcreg._src.core.typing import PyTree


class InjectState(NamedTuple):
    """State of :func:`inject_hyperparams`: ``hyperparams`` (name -> 0-d float64 tensor) and the
    inner transform's state."""

    hyperparams: dict[str, torch.Tensor]
    inner_state: Any


def inject_hyperparams(
    factory: Callable[..., GradientTransformation], **hyperparams: float | torch.Tensor
) -> GradientTransformation:
    """``factory(**hyperparams)``, its numeric hyperparameters kept as 0-d tensors in the state.

    Each ``update`` builds the inner transform from the state's current values, so they can change
    from step to step: set a new value with :func:`set_hyperparams`, or map a schedule over them
    yourself. Under ``torch.compile`` the values are graph inputs: changing one recompiles nothing.
    Only numbers are injected (anything else raises ``TypeError``); bind the others (a mask,
    ``betas``) to the factory first, ``inject_hyperparams(functools.partial(fr.adamw, mask=m),
    learning_rate=1e-3)``. As optax's ``inject_hyperparams``. In a :class:`funcreg.TorchOptimizer`
    the values are options of every param group (``learning_rate`` as ``lr``), so torch's LR
    schedulers and ``group["weight_decay"] = ...`` set them.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.inject_hyperparams(fr.sgd, learning_rate=0.1)
        >>> params = {"w": torch.ones(1)}
        >>> state = tx.init(params)
        >>> state = fr.set_hyperparams(state, learning_rate=0.5)
        >>> u, state = tx.update({"w": torch.ones(1)}, state, params)
        >>> u["w"], float(state.hyperparams["learning_rate"])
        (tensor([-0.5000]), 0.5)
    """
    if not callable(factory):
        raise TypeError(f"inject_hyperparams expects a factory of a transform, got {factory!r}")
    if not hyperparams:
        raise ValueError("inject_hyperparams needs at least one hyperparameter, e.g. learning_rate=0.1")
    for name, value in hyperparams.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
            raise TypeError(f"Invalid {name} value: {value!r} (expected a number or a 0-d tensor)")
        if isinstance(value, torch.Tensor) and value.ndim != 0:
            raise ValueError(f"Invalid {name} value: a tensor of shape {tuple(value.shape)} (expected 0-d)")
    probe = factory(**hyperparams)  # refuses bad values now, naming the argument, not at the first step
    if not isinstance(probe, GradientTransformation):
        raise TypeError(f"the factory returned a {type(probe).__name__}, not a GradientTransformation")
    # each update builds the transform from 0-d tensors: a factory that takes only a float for one of
    # them (sgd's momentum, a bool-like option) is refused now, naming it, rather than at the first step
    for name, value in hyperparams.items():
        as_tensor = dict(hyperparams, **{name: torch.as_tensor(value, dtype=torch.float64)})
        try:
            factory(**as_tensor)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"inject_hyperparams: {name} cannot be injected into this factory, which does not take it as "
                f"a tensor ({err}); pass it to the factory itself, functools.partial(factory, {name}=...)"
            ) from err

    def values(params: PyTree) -> dict[str, torch.Tensor]:
        leaves, _ = flatten(params)
        device = next((p.device for p in leaves if isinstance(p, torch.Tensor)), None)
        return {
            k: torch.as_tensor(v, dtype=torch.float64, device=device).clone() for k, v in hyperparams.items()
        }

    def init(params: PyTree) -> InjectState:
        return InjectState(values(params), probe.init(params))

    def update(
        updates: PyTree, state: InjectState, params: PyTree | None = None
    ) -> tuple[PyTree, InjectState]:
        expect_state(state, InjectState, "inject_hyperparams")
        inner = factory(**state.hyperparams)
        new_updates, inner_state = inner.update(updates, state.inner_state, params)
        return new_updates, InjectState(state.hyperparams, inner_state)

    name = getattr(factory, "__name__", "factory")
    return configured(GradientTransformation(init, update), "inject_hyperparams", name, **hyperparams)


def set_hyperparams(state: Any, **values: float | torch.Tensor) -> Any:
    """``state`` with new values for hyperparameters of the :class:`InjectState` inside it (a chain's
    too), each a number or a 0-d tensor; the rest of the state is the same objects.

    Examples:
        >>> import torch, funcreg as fr
        >>> state = fr.inject_hyperparams(fr.adamw, learning_rate=0.1).init({"w": torch.zeros(1)})
        >>> float(fr.set_hyperparams(state, learning_rate=0.01).hyperparams["learning_rate"])
        0.01
    """
    target = find_one_state(state, InjectState, "set_hyperparams")
    unknown = sorted(set(values) - set(target.hyperparams))
    if unknown:
        raise KeyError(
            f"set_hyperparams: no hyperparameter {unknown[0]!r} (the state holds {sorted(target.hyperparams)})"
        )
    new = dict(target.hyperparams)
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, torch.Tensor)):
            raise TypeError(f"Invalid {k} value: {v!r} (expected a number or a 0-d tensor)")
        new[k] = torch.as_tensor(v, dtype=new[k].dtype, device=new[k].device)
    replaced = InjectState(new, target.inner_state)
    return replaced if target is state else _replace_in(state, target, replaced)


def _replace_in(tree: Any, old: Any, new: Any) -> Any:
    if tree is old:
        return new
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_replace_in(x, old, new) for x in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_replace_in(x, old, new) for x in tree)
    if isinstance(tree, dict):
        return type(tree)({k: _replace_in(v, old, new) for k, v in tree.items()})
    return tree
