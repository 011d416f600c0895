"""torch.optim's own kernels behind a donated ``fr.adam``/``fr.adamw`` step.

A donated step may write into the parameters, so it can run exactly what ``torch.optim`` runs: with
``fused=True`` torch's fused kernels (``torch._fused_adam_`` / ``torch._fused_adamw_``: parameters,
moments and step counts in one pass), otherwise the sequence of ``torch._foreach_*`` calls of
``torch.optim.Adam(foreach=True)``, which updates the parameters in place instead of materialising
an update and adding it. Both equal their torch.optim namesake bit for bit, and the pure update to
rounding; the decay mask becomes two groups, as torch's param groups would be. Anything they do not
cover (complex parameters, mixed devices or dtypes, a tensor learning rate or weight decay, tracing)
falls back to the generic donated step, which equals the pure one bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from funcreg._src import leafwise
from funcreg._src.base import expect_state, flat
from funcreg._src.describe import compiling
from funcreg._src.mask_cache import CachedMask
from funcreg._src.typing import MaskLike, PyTree
from funcreg._src.validation import schedule_value

FUSED_ATTR = "__funcreg_fused__"


@dataclass(frozen=True)
class AdamKernel:
    """The hyperparameters of an ``adam``/``adamw`` alias, as the fused kernel takes them."""

    who: str
    learning_rate: Any
    b1: float
    b2: float
    eps: float
    weight_decay: Any
    decoupled: bool
    amsgrad: bool
    maximize: bool
    mask: MaskLike
    fused: bool
    _mask: CachedMask | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # resolved once per parameter structure, not at every step (see _src/mask_cache.py)
        object.__setattr__(self, "_mask", None if self.mask is None else CachedMask(self.mask))

    def __call__(self, grads: PyTree, state: Any, params: PyTree) -> tuple[PyTree, Any] | None:
        """One donated step in the fused kernel, or ``None`` where the kernel does not apply."""
        from funcreg._src.transform import ScaleByAdamState

        if (
            compiling()
            or torch._C._are_functorch_transforms_active()
            or isinstance(self.weight_decay, torch.Tensor)
        ):
            return None
        expect_state(state, ScaleByAdamState, self.who)
        f = flat(grads, params, self.who, needs_params=True)
        ps, gs = f.present_params(), f.present_updates()
        if not ps or any(p.is_complex() for p in ps):
            return None
        if len({(p.device, p.dtype) for p in ps}) != 1:
            return None
        lr = schedule_value(self.learning_rate, leafwise.concrete(state.count))
        if isinstance(lr, torch.Tensor):
            return None
        mu = f.present(f.state_leaves(state.mu, self.who, "mu"))
        nu = f.present(f.state_leaves(state.nu, self.who, "nu"))
        nu_max = f.present(f.state_leaves(state.nu_max, self.who, "nu_max")) if self.amsgrad else None
        steps = f.present(f.state_leaves(state.steps, self.who, "steps", per_element=False))
        wd = float(self.weight_decay)
        if self.mask is not None and self.decoupled:
            assert self._mask is not None  # built from mask in __post_init__
            keep = f.present(self._mask(params))
            groups = [
                ([i for i, k in enumerate(keep) if k], wd),
                ([i for i, k in enumerate(keep) if not k], 0.0),
            ]
        else:
            groups = [(list(range(len(ps))), wd)]
        for index, group_wd in groups:
            if not index:
                continue
            pick = lambda xs, index=index: [xs[i] for i in index]  # noqa: E731
            group = (
                pick(ps),
                pick(gs),
                pick(mu),
                pick(nu),
                pick(nu_max) if nu_max is not None else [],
                pick(steps),
            )
            (self._fused if self.fused else self._foreach)(*group, lr, group_wd)
        state.count.add_(1)
        return params, state

    def _fused(
        self, ps: list, gs: list, mu: list, nu: list, nu_max: list, steps: list, lr: float, wd: float
    ) -> None:
        torch._foreach_add_(steps, 1)
        kernel = torch._fused_adamw_ if self.decoupled else torch._fused_adam_
        kernel(
            ps,
            gs,
            mu,
            nu,
            nu_max,
            steps,
            lr=lr,
            beta1=self.b1,
            beta2=self.b2,
            weight_decay=wd,
            eps=self.eps,
            amsgrad=self.amsgrad,
            maximize=self.maximize,
            grad_scale=None,
            found_inf=None,
        )

    def _foreach(
        self, ps: list, gs: list, mu: list, nu: list, nu_max: list, steps: list, lr: float, wd: float
    ) -> None:
        """``torch.optim.adam._multi_tensor_adam``'s operations, in its order (eager, not capturable)."""
        if self.maximize:
            gs = list(torch._foreach_neg(gs))
        torch._foreach_add_(steps, 1)
        if wd != 0:
            if self.decoupled:
                torch._foreach_mul_(ps, 1 - lr * wd)
            elif self.maximize:
                torch._foreach_add_(gs, ps, alpha=wd)
            else:
                gs = list(torch._foreach_add(gs, ps, alpha=wd))
        torch._foreach_lerp_(mu, gs, 1 - self.b1)
        torch._foreach_mul_(nu, self.b2)
        torch._foreach_addcmul_(nu, gs, gs, 1 - self.b2)
        counts = [int(s) for s in steps]
        bias_correction1 = [1 - self.b1**t for t in counts]
        bias_correction2 = [1 - self.b2**t for t in counts]
        step_size = [(lr / bc) * -1 for bc in bias_correction1]
        bias_correction2_sqrt = [bc**0.5 for bc in bias_correction2]
        if self.amsgrad:
            torch._foreach_maximum_(nu_max, nu)
            denom = torch._foreach_sqrt(nu_max)
        else:
            denom = torch._foreach_sqrt(nu)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(ps, mu, denom, step_size)
