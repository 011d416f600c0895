"""torch.optim's own kernels behind a donated ``fr.adam``/``fr.adamw``/``fr.sgd`` step.

A donated step may write into the parameters, so it can run exactly what ``torch.optim`` runs: with
``fused=True`` torch's fused kernels (``torch._fused_adam_`` / ``torch._fused_adamw_``: parameters,
moments and step counts in one pass; ``torch._fused_sgd_``: parameters and momentum buffers),
otherwise the sequence of ``torch._foreach_*`` calls of ``torch.optim.Adam(foreach=True)`` /
``SGD(foreach=True)``, which updates the parameters in place instead of materialising an update and
adding it. Both equal their torch.optim namesake bit for bit, and the pure update to rounding; the
decay mask becomes two groups, as torch's param groups would be. Anything they do not cover (complex
parameters, mixed devices or dtypes, a tensor learning rate (but in fused SGD, which takes one as
torch does) or weight decay, tracing; for fused SGD a device or dtype torch has no fused kernel for)
falls back to the generic donated step, which equals the pure one bit for bit; fused SGD runs the
foreach sequence for a leaf whose gradient or buffer is laid out in memory unlike the parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from funcreg._src.core import leafwise
from funcreg._src.core.base import expect_state, flat
from funcreg._src.core.tree import compiling
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import is_schedule, schedule_value
from funcreg._src.kernels.scratch import Scratch, add_into, unary_into
from funcreg._src.selection.mask_cache import CachedMask
from funcreg._src.selection.resolve import MaskLike
from funcreg._src.transforms.basic import (
    AddDecayedWeightsState,
    ScaleByAdamState,
    ScaleByScheduleState,
    TraceState,
)


@dataclass(frozen=True)
class ExtraDecay:
    """Weight decay a penalty form adds to a kernel's own, one coefficient per leaf (0 where the
    penalty selects nothing): ``coupled`` is added to the gradient, ``decoupled`` decays the weights
    by ``rate * coefficient``."""

    coupled: list[float] | None = None
    decoupled: list[float] | None = None
    rate: float = 1.0


class _AdamGroup(NamedTuple):
    """One group's tensor lists, in the order torch's fused and foreach Adam kernels take them."""

    ps: list
    gs: list
    mu: list
    nu: list
    nu_max: list
    steps: list


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
    _scratch: Scratch = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # resolved once per parameter structure, not at every step (see selection/mask_cache.py)
        object.__setattr__(self, "_mask", None if self.mask is None else CachedMask(self.mask))
        object.__setattr__(self, "_scratch", Scratch())  # kept temporaries (see kernels/scratch.py)

    def __call__(
        self, grads: PyTree, state: Any, params: PyTree, extra: ExtraDecay | None = None
    ) -> tuple[PyTree, Any] | None:
        """One donated step in the fused kernel, or ``None`` where the kernel does not apply.

        ``extra``: weight decay folded in from a penalty form around the alias (see
        :mod:`funcreg._src.kernels.fused_forms`), one coefficient per leaf of the tree.
        """
        # under vmap or grad the foreach kernels do not apply (the query also traces under compile);
        # compiled, the foreach sequence is traced and the fused kernel left to eager steps
        if (
            isinstance(self.weight_decay, torch.Tensor)
            or (compiling() and self.fused)
            or torch._C._are_functorch_transforms_active()
        ):
            return None
        expect_state(state, ScaleByAdamState, self.who)
        f = flat(grads, params, self.who, needs_params=True)
        ps, gs = f.present_params(), f.present_updates()
        if not ps or any(p.is_complex() for p in ps):
            return None
        if len({(p.device, p.dtype) for p in ps}) != 1:
            return None
        count = leafwise.concrete(state.count)
        lr = schedule_value(self.learning_rate, count)
        wd = schedule_value(self.weight_decay, count, "weight_decay")
        if isinstance(lr, torch.Tensor) or isinstance(wd, torch.Tensor):
            return None
        groups = self._groups(f, params, lr, float(wd), extra)
        if groups is None:
            return None
        mu = f.present(f.state_leaves(state.mu, self.who, "mu"))
        nu = f.present(f.state_leaves(state.nu, self.who, "nu"))
        nu_max = f.present(f.state_leaves(state.nu_max, self.who, "nu_max")) if self.amsgrad else None
        steps = f.present(f.state_leaves(state.steps, self.who, "steps", per_element=False))
        # torch's fused kernel walks each tensor's memory in order: a leaf whose gradient or moments lie
        # in memory unlike its parameter (a transposed gradient from torch.func.grad) runs the foreach one
        layout = [
            not self.fused or _same_dense_layout(p, g, m, v, *([nu_max[i]] if nu_max is not None else []))
            for i, (p, g, m, v) in enumerate(zip(ps, gs, mu, nu))
        ]
        for (group_wd, decoupled), members in groups.items():
            for same in (True, False):
                index = [i for i in members if layout[i] == same]
                if not index:
                    continue
                pick = lambda xs, index=index: [xs[i] for i in index]  # noqa: E731
                group = _AdamGroup(
                    pick(ps),
                    pick(gs),
                    pick(mu),
                    pick(nu),
                    pick(nu_max) if nu_max is not None else [],
                    pick(steps),
                )
                (self._fused if self.fused and same else self._foreach)(group, lr, group_wd, decoupled)
        state.count.add_(1)
        return params, state

    def _groups(
        self, f: Any, params: PyTree, lr: float, wd: float, extra: ExtraDecay | None
    ) -> dict[tuple[float, bool], list[int]] | None:
        """The present leaves grouped by ``(weight_decay, decoupled)``, as torch's param groups would be
        (``None`` where one leaf would need both a coupled and a decoupled decay: the kernels take one).
        ``wd``: the alias's decay at this step (its schedule's value)."""
        n = len(f.index)
        if self.decoupled:
            keep = [True] * n if self._mask is None else f.present(self._mask(params))
            coupled, decoupled = [0.0] * n, [wd if k else 0.0 for k in keep]
        else:
            coupled, decoupled = [wd] * n, [0.0] * n
        if extra is not None:
            if extra.coupled is not None:
                coupled = [c + x for c, x in zip(coupled, f.present(extra.coupled))]
            if extra.decoupled is not None:
                if lr == 0:
                    return None
                decoupled = [
                    d + _per_lr(extra.rate, x, lr) for d, x in zip(decoupled, f.present(extra.decoupled))
                ]
        groups: dict[tuple[float, bool], list[int]] = {}
        for i, (c, d) in enumerate(zip(coupled, decoupled)):
            if c and d:
                return None
            key = (c, False) if c else (d, True) if d else (0.0, self.decoupled)
            groups.setdefault(key, []).append(i)
        return groups

    def _fused(self, group: _AdamGroup, lr: float, wd: float, decoupled: bool) -> None:
        """torch's fused Adam/AdamW kernel (``torch._fused_adam_`` / ``_fused_adamw_``) over one group
        of same-device, same-dtype tensors, the step counters advanced first as torch.optim does."""
        torch._foreach_add_(group.steps, 1)
        kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
        kernel(
            *group,
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

    def _foreach(self, group: _AdamGroup, lr: float, wd: float, decoupled: bool) -> None:
        """``torch.optim.adam._multi_tensor_adam``'s operations, in its order (eager, not capturable),
        with its temporaries (a negated or decayed gradient, the denominator) written into kept
        buffers instead of fresh ones (see :mod:`funcreg._src.kernels.scratch`)."""
        ps, gs, mu, nu, nu_max, steps = group
        traced = compiling()  # traced: no kept buffers, and the counts stay tensors
        scratch: list[torch.Tensor | None] = [None] * len(ps) if traced else self._scratch.take(ps)
        owned = False  # whether gs holds this step's temporaries (then it may be written into)
        if self.maximize:
            gs, owned = unary_into(torch.neg, torch._foreach_neg, gs, scratch), True
        torch._foreach_add_(steps, 1)
        if wd != 0:
            if decoupled:
                torch._foreach_mul_(ps, 1 - lr * wd)
            elif owned:
                torch._foreach_add_(gs, ps, alpha=wd)
            else:
                gs = add_into(gs, ps, wd, scratch)
        torch._foreach_lerp_(mu, gs, 1 - self.b1)
        torch._foreach_mul_(nu, self.b2)
        torch._foreach_addcmul_(nu, gs, gs, 1 - self.b2)
        if traced:  # as in torch.optim's compiled step
            self._foreach_traced(ps, mu, nu, nu_max, steps, lr)
            return
        counts = [int(s) for s in steps]
        bias_correction1 = [1 - self.b1**t for t in counts]
        bias_correction2 = [1 - self.b2**t for t in counts]
        step_size = [(lr / bc) * -1 for bc in bias_correction1]
        bias_correction2_sqrt = [bc**0.5 for bc in bias_correction2]
        if self.amsgrad:
            torch._foreach_maximum_(nu_max, nu)
        # the gradient temporaries are dead: the denominator takes their buffers
        denom = unary_into(torch.sqrt, torch._foreach_sqrt, nu_max if self.amsgrad else nu, scratch)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(ps, mu, denom, step_size)
        self._scratch.give(ps, scratch)

    def _foreach_traced(self, ps: list, mu: list, nu: list, nu_max: list, steps: list, lr: float) -> None:
        """The rest of ``_multi_tensor_adam`` as torch.compile traces it, with its capturable branch's
        shape: bias corrections as tensor ops on the step counters (no host sync). They are computed in
        float64 and then cast, as the eager step's Python floats are (``1 - b2^t`` in float32 would
        lose digits to cancellation at small ``t``)."""
        counts = [t.to(torch.float64) for t in steps]
        bias_correction1 = torch._foreach_pow(self.b1, counts)
        bias_correction2 = torch._foreach_pow(self.b2, counts)
        torch._foreach_sub_(bias_correction1, 1)
        torch._foreach_sub_(bias_correction2, 1)
        torch._foreach_neg_(bias_correction2)
        torch._foreach_div_(bias_correction1, lr)
        torch._foreach_reciprocal_(bias_correction1)  # -1 / step size: -(1 - b1^t) / lr
        torch._foreach_sqrt_(bias_correction2)
        dtype = mu[0].dtype
        # computed once per step, not in the loops that read them (see leafwise.hoisted)
        step_size = [_hoisted(x.to(dtype)) for x in bias_correction1]
        bias_correction2_sqrt = [_hoisted(x.to(dtype)) for x in bias_correction2]
        if self.amsgrad:
            torch._foreach_maximum_(nu_max, nu)
            denom = torch._foreach_sqrt(nu_max)
        else:
            denom = torch._foreach_sqrt(nu)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_div_(denom, step_size)
        # denom = -(1 - b1^t) * (sqrt(nu / (1 - b2^t)) + eps) / lr
        torch._foreach_addcdiv_(ps, mu, denom)


@dataclass(frozen=True)
class SgdKernel:
    """The hyperparameters of an ``sgd`` alias, for ``torch.optim.sgd._multi_tensor_sgd``'s sequence,
    or with ``fused=True`` for ``torch.optim.sgd._fused_sgd``'s call of ``torch._fused_sgd_``.

    The alias is the chain ``[scale(-1)] -> [add_decayed_weights] -> [trace] -> scale_by_learning_rate``;
    its state is the tuple of their states, updated here in place (the trace's buffers, counters and
    per-parameter steps; the schedule's count).
    """

    learning_rate: Any
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: Any
    maximize: bool
    parts: int  # the number of transforms in the alias's chain (the length of its state)
    fused: bool = False
    _scratch: Scratch = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_scratch", Scratch())  # kept temporaries (see kernels/scratch.py)

    def __call__(
        self, grads: PyTree, state: Any, params: PyTree, extra: ExtraDecay | None = None
    ) -> tuple[PyTree, Any] | None:
        """One donated step, or ``None`` where the kernel does not apply."""
        if (
            compiling()
            or torch._C._are_functorch_transforms_active()
            or isinstance(self.weight_decay, torch.Tensor)
            or not isinstance(state, tuple)
            or hasattr(state, "_fields")
            or len(state) != self.parts
        ):
            return None
        trace = state[-2] if self.momentum != 0 and len(state) >= 2 else None
        if self.momentum != 0 and not isinstance(trace, TraceState):
            return None
        f = flat(grads, params, "sgd", needs_params=True)
        ps, gs = f.present_params(), f.present_updates()
        if not ps or any(p.is_complex() for p in ps) or len({(p.device, p.dtype) for p in ps}) != 1:
            return None
        if self.fused and not _fused_sgd_applies(ps[0]):
            return None
        schedule = state[-1] if isinstance(state[-1], ScaleByScheduleState) else None
        if schedule is None and is_schedule(self.learning_rate):
            return None  # another alias's state: the generic path refuses it as the pure step does
        lr = schedule_value(self.learning_rate, 0 if schedule is None else leafwise.concrete(schedule.count))
        # a decay schedule counts in add_decayed_weights' state, the link after the optional negation
        decay_state = state[int(self.maximize)] if is_schedule(self.weight_decay) else None
        if decay_state is not None and not isinstance(decay_state, AddDecayedWeightsState):
            return None
        wd = schedule_value(
            self.weight_decay,
            0 if decay_state is None else leafwise.concrete(decay_state.count),
            "weight_decay",
        )
        if isinstance(wd, torch.Tensor):
            return None
        # a tensor learning rate is torch's fused kernel's (its tensor_lr overload), not the foreach one's
        if isinstance(lr, torch.Tensor) and not (self.fused and _fused_lr_applies(lr, ps[0])):
            return None
        n = len(ps)
        coupled = [float(wd)] * n
        if extra is not None and extra.coupled is not None:
            coupled = [c + x for c, x in zip(coupled, f.present(extra.coupled))]
        decay = [0.0] * n
        # the decoupled decay as a coupled one where there is no momentum (fused; inf: lr is 0)
        folded = [0.0] * n
        if extra is not None and extra.decoupled is not None:
            decay = [extra.rate * x for x in f.present(extra.decoupled)]
            if self.fused and trace is None:
                lr_value = float(lr)  # a tensor learning rate: read once
                folded = [
                    _per_lr(extra.rate, x, lr_value) if lr_value != 0 else math.inf
                    for x in f.present(extra.decoupled)
                ]
        bufs = steps = None
        if trace is not None:
            bufs = f.present(f.state_leaves(trace.trace, "trace", "trace"))
            steps = f.present(f.state_leaves(trace.steps, "trace", "steps", per_element=False))
        # torch's fused kernel walks the parameter's, gradient's and buffer's memory in one order: where
        # their layouts differ (a transposed gradient from torch.func.grad, say), the foreach sequence
        layout = [True] * n
        if self.fused:
            layout = [
                _same_dense_layout(p, g) if bufs is None else _same_dense_layout(p, g, bufs[i])
                for i, (p, g) in enumerate(zip(ps, gs))
            ]
        for index in _groups_by(list(zip(coupled, decay, folded, layout))):
            pick = lambda xs, index=index: [xs[i] for i in index]  # noqa: E731
            group = (
                pick(ps),
                pick(gs),
                pick(bufs) if bufs is not None else None,
                pick(steps) if steps is not None else None,
            )
            i = index[0]
            fused = self.fused and layout[i]
            if not (fused and self._fused_step(*group, lr, coupled[i], decay[i], folded[i])):
                # the foreach sequence (fused: the group the kernel cannot take, at torch's lr.item())
                self._step(*group, float(lr), coupled[i], decay[i])
        if trace is not None:
            trace.count.add_(1)
        if schedule is not None:
            schedule.count.add_(1)
        if decay_state is not None:
            decay_state.count.add_(1)
        return params, state

    def _fused_step(
        self,
        ps: list,
        gs: list,
        bufs: list | None,
        steps: list | None,
        lr: float | torch.Tensor,
        wd: float,
        decay: float,
        folded: float,
    ) -> bool:
        """``torch.optim.sgd._fused_sgd``'s call of ``torch._fused_sgd_`` over one group of same-device,
        same-dtype tensors (``False``, having written nothing, where the group needs the foreach
        sequence: a decoupled decay beside a coupled one with momentum, which the kernel would apply
        to the decayed weights).

        A decoupled decay ``w <- w - decay * w`` is, without momentum, the coupled decay ``folded =
        decay / lr`` inside the kernel (one pass; ``w - lr * (g + c * w)`` with ``c`` itself where the
        form's rate is the learning rate, torch's ``weight_decay`` to the bit); with momentum the weights
        are scaled by ``1 - decay`` first, as the foreach sequence scales them before its step. torch's
        kernel starts the momentum buffers as the gradients where ``is_first_step``, asked once per
        call: the parameters at their first step (per parameter, as ``trace`` counts) go in one call,
        the others in a second one.
        """
        if bufs is None or steps is None:  # no momentum: one call, no buffers
            if decay != 0:
                if math.isfinite(folded) and abs(wd + folded) < _FOLD_LIMIT:
                    wd = wd + folded
                else:  # a zero (or tiny) learning rate: the decay cannot go through it
                    torch._foreach_mul_(ps, 1 - decay)
            self._fused_call(ps, gs, [], lr, wd, is_first_step=False)
            return True
        if decay != 0:
            if wd != 0:
                return False
            torch._foreach_mul_(ps, 1 - decay)
        first = [int(s) == 0 for s in steps]
        torch._foreach_add_(steps, 1)
        for is_first in (True, False):
            index = [i for i, f in enumerate(first) if f == is_first]
            if index:
                pick = lambda xs, index=index: [xs[i] for i in index]  # noqa: E731
                self._fused_call(pick(ps), pick(gs), pick(bufs), lr, wd, is_first_step=is_first)
        return True

    def _fused_call(
        self, ps: list, gs: list, bufs: list, lr: float | torch.Tensor, wd: float, *, is_first_step: bool
    ) -> None:
        """``torch._fused_sgd_`` as ``_fused_sgd`` calls it, without a gradient scaler (the gradients
        are only read)."""
        torch._fused_sgd_(
            ps,
            gs,
            bufs,
            weight_decay=wd,
            momentum=self.momentum,
            lr=lr,
            dampening=self.dampening,
            nesterov=self.nesterov,
            maximize=self.maximize,
            is_first_step=is_first_step,
            grad_scale=None,
            found_inf=None,
        )

    def _step(
        self,
        ps: list,
        gs: list,
        bufs: list | None,
        steps: list | None,
        lr: float,
        wd: float,
        decay: float,
    ) -> None:
        """``_multi_tensor_sgd``'s operations in its order, never writing into the caller's gradients;
        its temporaries (a negated or decayed gradient, Nesterov's step) go into kept buffers."""
        # plain SGD and heavy-ball momentum have no temporaries: nothing to keep for them
        keeps = self.maximize or wd != 0 or (bufs is not None and self.nesterov)
        scratch: list[torch.Tensor | None] = self._scratch.take(ps) if keeps else [None] * len(ps)
        owned = False  # whether gs holds this step's temporaries (then it may be written into)
        if self.maximize:
            gs, owned = unary_into(torch.neg, torch._foreach_neg, gs, scratch), True
        if wd != 0:
            if owned:
                torch._foreach_add_(gs, ps, alpha=wd)
            else:
                gs, owned = add_into(gs, ps, wd, scratch), True
        if bufs is not None and steps is not None:
            first = [int(s) == 0 for s in steps]
            torch._foreach_add_(steps, 1)
            if not any(first):
                torch._foreach_mul_(bufs, self.momentum)
                torch._foreach_add_(bufs, gs, alpha=1 - self.dampening)
            else:  # a parameter's first step: its buffer starts as the gradient, as torch's does
                for b, g, is_first in zip(bufs, gs, first):
                    if is_first:
                        b.copy_(g)
                    else:
                        b.mul_(self.momentum).add_(g, alpha=1 - self.dampening)
            if self.nesterov:
                if owned:
                    torch._foreach_add_(gs, bufs, alpha=self.momentum)
                else:
                    gs = add_into(gs, bufs, self.momentum, scratch)
            else:
                gs = bufs
        if decay != 0:
            torch._foreach_mul_(ps, 1 - decay)
        torch._foreach_add_(ps, gs, alpha=-lr)
        if keeps:
            self._scratch.give(ps, scratch)


def _per_lr(rate: float, c: float, lr: float) -> float:
    """A decoupled decay ``w <- w - rate * c * w`` as the coefficient a kernel multiplies by ``lr``:
    ``rate * c / lr``, and ``c`` itself where ``rate == lr`` (then bit for bit torch's own decay)."""
    return c if rate == lr else rate * c / lr


# the largest folded decay taken into torch's kernel as a coupled one (the kernel computes it in
# float32 for float32/16 parameters): beyond, the learning rate is too small for ``decay / lr``
_FOLD_LIMIT = 1e30
_FUSED_SGD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fused_sgd_applies(p: torch.Tensor) -> bool:
    """Whether torch has a fused SGD kernel for ``p``'s device and dtype (the check of
    ``torch.optim.SGD(fused=True)``, which raises where this returns ``False``)."""
    return (
        hasattr(torch, "_fused_sgd_")
        and p.dtype in _FUSED_SGD_DTYPES
        and p.device.type in _get_fused_kernels_supported_devices()
    )


def _same_dense_layout(p: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether ``others`` lie in memory as ``p`` does and ``p`` fills its memory exactly (no gaps, no
    overlaps), so that a kernel walking their memory in order meets the same elements in each."""
    if p.is_contiguous() and all(o.is_contiguous() for o in others):
        return True
    if any(o.shape != p.shape or o.stride() != p.stride() for o in others):
        return False
    expected = 1  # dense: sorted by stride, each stride is the product of the sizes below it
    for size, stride in sorted(((n, s) for n, s in zip(p.shape, p.stride()) if n != 1), key=lambda x: x[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _fused_lr_applies(lr: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether a tensor learning rate goes into ``torch._fused_sgd_`` as ``torch.optim.SGD`` passes it:
    one real element, not differentiated through, on the parameters' device or the CPU."""
    return (
        lr.numel() == 1
        and lr.is_floating_point()
        and not lr.requires_grad
        and (lr.device == p.device or lr.device.type == "cpu")
    )


def _hoisted(x: torch.Tensor) -> torch.Tensor:
    out = leafwise.hoisted(x)
    assert isinstance(out, torch.Tensor)  # a tensor in, a tensor out
    return out


def _groups_by(keys: list[Any]) -> list[list[int]]:
    """The positions of ``keys``, grouped by value (first appearance first)."""
    groups: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return list(groups.values())
