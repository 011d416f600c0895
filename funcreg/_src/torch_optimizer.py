"""``TorchOptimizer``: a real ``torch.optim.Optimizer`` that drives a funcreg transform from ``.grad``.

For imperative training loops, and for frameworks that expect an ``Optimizer``. The funcreg state
lives beside the parameters; ``step()`` reads ``p.grad``, runs ``tx.update`` and adds the updates to
the parameters in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional, Union

import torch

from funcreg._src.base import GradientTransformation
from funcreg._src.checkpoint import load_state_dict, state_dict
from funcreg._src.validation import check_rate

TransformOrFactory = Union[GradientTransformation, Callable[[float], GradientTransformation]]


def _named(params: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(params, torch.nn.Module):
        return list(params.named_parameters())
    items = list(params)
    if not items:
        raise ValueError("TorchOptimizer got an empty parameter list")
    if all(isinstance(p, torch.Tensor) for p in items):
        return [(str(i), p) for i, p in enumerate(items)]
    if all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], torch.Tensor) for p in items):
        names = [n for n, _ in items]
        if len(set(names)) != len(names):
            raise ValueError("TorchOptimizer: parameter names repeat")
        return items
    raise TypeError("TorchOptimizer expects a module, tensors, or (name, tensor) pairs such as model.named_parameters()")


class TorchOptimizer(torch.optim.Optimizer):
    """Wraps a funcreg transform as a ``torch.optim.Optimizer``.

    Args:
        params: ``model.named_parameters()`` (recommended: masks such as ``fr.decay_mask(model)`` match
            by name), a module, or plain tensors (named ``"0"``, ``"1"``, ...).
        tx: a transform with its learning rate built in, or a factory ``lr -> transform`` used with
            ``lr``. Only with a factory does the param group's ``"lr"`` drive the transform, so that
            ``torch.optim.lr_scheduler`` works; changing ``"lr"`` of a fixed transform raises.
        lr: the initial learning rate for a factory.

    The update is the same as the functional loop ``tx.update(grads, state, params)`` +
    ``apply_updates``; parameters whose ``.grad`` is ``None`` are skipped (their update is ``None``).
    ``state_dict()`` holds the funcreg state as plain tensors (``torch.load(weights_only=True)`` reads
    it); ``load_state_dict`` refuses a state of another structure.

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = fr.TorchOptimizer(model.named_parameters(), lambda lr: fr.adamw(lr, weight_decay=0.1), lr=0.01)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> opt.step(); sched.step()
        >>> opt.param_groups[0]["lr"]
        0.005
    """

    def __init__(self, params: Any, tx: TransformOrFactory, lr: Optional[float] = None) -> None:
        named = _named(params)
        if isinstance(tx, GradientTransformation):
            if lr is not None:
                raise ValueError("lr is for a factory lr -> transform; this transform has its learning rate built in")
            self._factory: Optional[Callable[[float], GradientTransformation]] = None
            self._fixed: Optional[GradientTransformation] = tx
        elif callable(tx):
            if lr is None:
                raise ValueError("a factory lr -> transform needs lr=")
            check_rate("lr", lr)
            self._factory, self._fixed = tx, None
        else:
            raise TypeError(f"tx must be a GradientTransformation or a factory lr -> transform, got {tx!r}")
        self._names = [n for n, _ in named]
        # a fixed transform reports nan as its lr, so that a scheduler changing it is detected
        defaults = {"lr": float(lr) if lr is not None else float("nan")}
        super().__init__([p for _, p in named], defaults)
        self._tx_state = self._transform(self._lr()).init(self._params_tree())

    def _lr(self) -> float:
        return self.param_groups[0]["lr"]

    def _transform(self, lr: float) -> GradientTransformation:
        if self._factory is None:
            # lr_scheduler sets "initial_lr" on the group it drives; a changed lr is a scheduler at work
            if "initial_lr" in self.param_groups[0] or not math.isnan(lr):
                raise RuntimeError(
                    "the param group's lr was changed (by a scheduler?), but this TorchOptimizer wraps a "
                    "transform with a fixed learning rate; pass a factory: TorchOptimizer(params, lambda lr: "
                    "fr.adamw(lr, ...), lr=...), or give the transform a funcreg schedule"
                )
            assert self._fixed is not None
            return self._fixed
        check_rate("lr", lr)
        return self._factory(lr)

    def _params_tree(self) -> dict[str, torch.Tensor]:
        params = [p for group in self.param_groups for p in group["params"]]
        return {n: p.detach() for n, p in zip(self._names, params)}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "param_groups", None):
            raise NotImplementedError("TorchOptimizer has one parameter group; use fr.partition for per-group settings")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """Runs ``closure`` (if given, with grad enabled), then one funcreg update from ``.grad``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"]]
        tree = {n: p.detach() for n, p in zip(self._names, params)}
        grads = {n: (None if p.grad is None else p.grad.detach()) for n, p in zip(self._names, params)}
        tx = self._transform(self._lr())
        updates, self._tx_state = tx.update(grads, self._tx_state, tree)
        for n, p in zip(self._names, params):
            u = updates[n]
            if u is not None:
                p.add_(u.to(p.dtype))
        return loss

    @property
    def funcreg_state(self) -> Any:
        """The wrapped transform's current state."""
        return self._tx_state

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"funcreg_state": state_dict(self._tx_state), "lr": self._lr(), "names": list(self._names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        if not isinstance(state, dict) or "funcreg_state" not in state:
            raise ValueError("not a TorchOptimizer state_dict (no 'funcreg_state' entry)")
        if list(state.get("names", [])) != self._names:
            raise ValueError(f"state_dict is for parameters {state.get('names')}, this optimizer has {self._names}")
        self._tx_state = load_state_dict(self._tx_state, state["funcreg_state"])
        self.param_groups[0]["lr"] = state["lr"]
