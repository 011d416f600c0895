"""The measurements behind :func:`funcreg.probe`: runs of an optimizer, their precision, and step shapes.

Everything here is about reading numbers off an optimizer; the verdicts and their wording live in
:mod:`funcreg._src.analysis.probe.probe`. All runs use one float64 parameter; tolerances follow the precision the
optimizer actually computes in (:func:`compute_precision`), so an optimizer that does its arithmetic
in float32 (``p.data.float()``) is judged at float32's rounding, not float64's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

GradFn = Callable[[torch.Tensor], torch.Tensor]

SHAPE_RTOL = 1e-6  # a step "is proportional to w" / "is the same for every weight", relative to its size
RATE_RTOL = 1e-5  # a per-step amount "scales with lr" / "does not depend on lr"
CANCEL_RTOL = 1e-4  # residual movement of the cancellation run, relative to the zero-gradient movement
ULPS = 64  # movement below ULPS * eps * max|w| is rounding

# Candidate compute precisions, lowest first: a run is read in the first one that represents every value.
_PRECISIONS = (torch.bfloat16, torch.float16, torch.float32)


class Runner:
    """Builds a fresh optimizer over one float64 parameter and steps it with given gradients."""

    def __init__(self, make_optimizer: Callable[[list[torch.Tensor]], Any], weights: torch.Tensor) -> None:
        self._make = make_optimizer
        self.w0 = weights
        self.name = ""

    def _build(self, param: torch.Tensor, lr: float) -> torch.optim.Optimizer:
        """A fresh optimizer over ``param`` with every group's lr overwritten by ``lr`` (as a tensor
        where the optimizer holds one), checked to be an Optimizer that steps ``param``."""
        opt = self._make([param])
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                "make_optimizer must return a torch.optim.Optimizer built over the parameters it is "
                f"given (e.g. lambda ps: torch.optim.AdamW(ps, weight_decay=0.1)), got {type(opt).__name__}"
            )
        if not any(q is param for group in opt.param_groups for q in group["params"]):
            raise ValueError(
                "make_optimizer returned an optimizer that does not hold the parameters it was given"
            )
        for group in opt.param_groups:
            if "lr" not in group:
                raise ValueError(
                    f"{type(opt).__name__} has no 'lr' in its param_groups; probe sets "
                    "param_groups[i]['lr'] to compare two learning rates"
                )
            old = group["lr"]
            group["lr"] = (
                torch.tensor(lr, dtype=old.dtype, device=old.device) if isinstance(old, torch.Tensor) else lr
            )
        self.name = type(opt).__name__
        return opt

    def run(
        self, lr: float, steps: int, grad_fn: GradFn, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The weights after 0, 1, ..., ``steps`` steps (from ``weights``, default the probe weights)."""
        param = torch.nn.Parameter((self.w0 if weights is None else weights).clone())
        opt = self._build(param, lr)
        rows = [param.detach().clone()]
        for _ in range(steps):
            param.grad = grad_fn(param.detach())
            opt.step()
            rows.append(param.detach().clone())
        return torch.stack(rows)


def zeros(w: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(w)


def proportional_gradient(a: float, c: float = 0.0) -> GradFn:
    """The data gradient ``a * w + c``, recomputed from the current weights at every step."""
    return lambda w: a * w.clone() + c


def compute_precision(trajectories: list[torch.Tensor]) -> torch.dtype:
    """The precision the optimizer computes in, read off its results.

    A float64 parameter that an optimizer updates in float32 (``p.copy_(p.float() * ...)``) only ever
    holds float32 numbers; one updated in float64 almost never does. The answer is the lowest of
    bfloat16, float16, float32 that represents every value after the first row, else float64.
    """
    moved = [t[1:] for t in trajectories if t.shape[0] > 1 and bool((t[1:] != t[0]).any())]
    if not moved:
        return torch.float64
    values = torch.cat([m.flatten() for m in moved])
    for dtype in _PRECISIONS:
        if torch.equal(values.to(dtype).to(torch.float64), values):
            return dtype
    return torch.float64


@dataclass(frozen=True)
class Tolerance:
    """Absolute tolerances of one probe, from the compute precision and the size of the weights."""

    dtype: torch.dtype
    atol: float

    @classmethod
    def of(cls, dtype: torch.dtype, weights: torch.Tensor) -> Tolerance:
        return cls(dtype, ULPS * torch.finfo(dtype).eps * float(weights.abs().max()))

    @property
    def rtol(self) -> float:
        """A relative tolerance for amounts computed from rounded values (1e-6 in float64)."""
        return max(SHAPE_RTOL, 1e4 * torch.finfo(self.dtype).eps)


# ----------------------------------------------------------------------------------------------------
# Shapes of one step d = w_new - w_old.


def fit(d: torch.Tensor, basis: torch.Tensor) -> tuple[float, float]:
    """Least-squares ``d ~ -k * basis``: returns ``k`` and the max residual."""
    denom = float((basis * basis).sum())
    if denom == 0.0:
        return 0.0, float(d.abs().max())
    k = -float((d * basis).sum()) / denom
    return k, float((d + k * basis).abs().max())


SHAPES = ("proportional", "sign", "shift")


def fits(w_old: torch.Tensor, d: torch.Tensor, shape: str, atol: float) -> tuple[bool, float]:
    """Whether the step ``d`` taken from ``w_old`` has ``shape`` (``d = -k * basis``), and ``k``."""
    basis = {"proportional": w_old, "sign": torch.sign(w_old), "shift": torch.ones_like(w_old)}[shape]
    k, residual = fit(d, basis)
    return residual <= SHAPE_RTOL * float(d.abs().max()) + atol, k


def step_shape(w_old: torch.Tensor, d: torch.Tensor, atol: float) -> tuple[str | None, float]:
    """Which of proportional / sign / shift fits the step ``d`` (at most one can, for the probe weights)."""
    for shape in SHAPES:
        ok, k = fits(w_old, d, shape, atol)
        if ok:
            return shape, k
    return None, math.nan


def trajectory_shape(traj: torch.Tensor, atol: float) -> tuple[str | None, list[float]]:
    """The shape every step of ``traj`` has (``None`` if they disagree), and each step's amount.

    For the sign shape, weights that reach or cross zero are left out after the first step (an L1
    step oscillates around zero there).
    """
    w0 = traj[0]
    first, k0 = step_shape(w0, traj[1] - w0, atol)
    if first is None:
        return None, []
    amounts = [k0]
    keep = torch.ones_like(w0, dtype=torch.bool)
    if first == "sign":
        keep = (torch.sign(traj) == torch.sign(w0)).all(dim=0) & (traj.abs() > atol).all(dim=0)
    for t in range(1, traj.shape[0] - 1):
        w_old, d = traj[t][keep], (traj[t + 1] - traj[t])[keep]
        if first == "proportional" and (w_old.numel() == 0 or float(w_old.abs().max()) <= atol):
            break  # everything decayed to zero
        if first == "sign" and int(keep.sum()) < 2:
            break
        # later steps are checked against the first step's shape only (once every weight has one
        # sign, a shift also fits the sign shape)
        ok, k = fits(w_old, d, first, atol)
        if not ok:
            return None, []
        amounts.append(k)
    return first, amounts


def affine_decay(w_old: torch.Tensor, d: torch.Tensor, atol: float) -> float | None:
    """``k`` if the step is ``d = -c - k * w`` (a common part plus a part proportional to w), else ``None``.

    Under a data gradient that is the same for every weight, an elementwise optimizer without decay
    moves every weight by the same amount; ``k`` is what a decay adds on top.
    """
    basis = torch.stack([torch.ones_like(w_old), w_old], dim=1)
    coef = torch.linalg.lstsq(basis, -d.unsqueeze(1)).solution.squeeze(1)
    residual = float((d + basis @ coef).abs().max())
    if residual > SHAPE_RTOL * float(d.abs().max()) + atol:
        return None
    return float(coef[1])


def same(x: float, y: float, atol: float, rtol: float = RATE_RTOL) -> bool:
    return abs(x - y) <= rtol * max(abs(x), abs(y)) + atol


def lr_scaling(
    k_a: float, k_b: float, lr_a: float, lr_b: float, atol: float, rtol: float = RATE_RTOL
) -> bool | None:
    """True if the amounts scale like the learning rates, False if they do not depend on them."""
    if same(k_a * lr_b, k_b * lr_a, atol * max(lr_a, lr_b), rtol):
        return True
    if same(k_a, k_b, atol, rtol):
        return False
    return None


def is_geometric(traj: torch.Tensor, factor: float, atol: float) -> bool:
    """``traj[t] == traj[0] * factor ** t`` for every step, up to rounding."""
    t = torch.arange(traj.shape[0], dtype=traj.dtype).unsqueeze(1)
    movement = float((traj - traj[0]).abs().max())
    return float((traj - traj[0] * factor**t).abs().max()) <= SHAPE_RTOL * movement + atol


# ----------------------------------------------------------------------------------------------------
# The cancellation test (coupled L2: a data gradient -lam * w cancels the decay).


def shrink(runner: Runner, lr: float, a: float) -> float:
    """First-step movement towards zero, summed over the weights, with the data gradient ``a * w``."""
    traj = runner.run(lr, 1, proportional_gradient(a))
    return float(((traj[1] - traj[0]) * torch.sign(traj[0])).sum())


def find_cancelling(runner: Runner, lr: float, f0: float) -> float | None:
    """The ``a`` at which the first step with data gradient ``a * w`` does not move the weights."""
    w0 = runner.w0
    direction = -1.0 if f0 < 0 else 1.0  # a decay (f0 < 0) is cancelled by a negative a
    guess = abs(f0) / (lr * float(w0.abs().sum()))  # exact for coupled L2 under plain SGD
    lo, f_lo = 0.0, f0
    hi = direction * guess
    f_hi = shrink(runner, lr, hi)
    if f_hi != f_lo:  # secant: exact when the first step is linear in the gradient
        a = hi - f_hi * (hi - lo) / (f_hi - f_lo)
        if math.isfinite(a):
            f_a = shrink(runner, lr, a)
            if abs(f_a) <= 1e-10 * abs(f0):
                return a
    for _ in range(40):  # expand until the sign of the first step flips
        if f_hi == 0.0:
            return hi
        if (f_hi > 0) != (f0 > 0):
            break
        lo, f_lo = hi, f_hi
        hi *= 4.0
        f_hi = shrink(runner, lr, hi)
    else:
        return None
    for _ in range(200):  # bisection, down to adjacent floats
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        f_mid = shrink(runner, lr, mid)
        if f_mid == 0.0:
            return mid
        if (f_mid > 0) == (f0 > 0):
            lo, f_lo = mid, f_mid
        else:
            hi, f_hi = mid, f_mid
    return lo if abs(f_lo) <= abs(f_hi) else hi


def cancels(runner: Runner, lr: float, steps: int, a: float, movement: float, atol: float) -> bool:
    """Whether the data gradient ``a * w`` cancels the decay, alone and under a common extra gradient.

    Alone, nothing may move. With the extra data gradient ``1`` on every weight, a coupled decay
    cancelled by ``a * w`` leaves the optimizer seeing the same gradient on every weight, so every
    weight must move by the same amount (this rules out cancellations that only hold for tiny
    gradients: Adam's step ``lr * g / (|g| + eps)`` is linear in ``g`` when ``|g| << eps``).
    """
    traj = runner.run(lr, steps, proportional_gradient(a))
    if float((traj - traj[0]).abs().max()) > CANCEL_RTOL * movement + atol:
        return False
    shifted = runner.run(lr, steps, proportional_gradient(a, 1.0))
    delta = shifted - shifted[0]
    spread = float((delta - delta.mean(dim=1, keepdim=True)).abs().max())
    return spread <= CANCEL_RTOL * movement + atol + ULPS * torch.finfo(torch.float64).eps * float(
        shifted.abs().max()
    )


# ----------------------------------------------------------------------------------------------------
# Runs with a data gradient: decay that only acts with a gradient, or that depends on the weights.

PROBE_GRADIENT = 0.5  # the common data gradient of the gradient runs


@dataclass(frozen=True)
class GradientRuns:
    """First steps with the data gradient ``PROBE_GRADIENT`` on every weight.

    ``trajectories[(lr, scale)]``: the two rows (before, after) from ``scale * weights``;
    ``decay[(lr, scale)]``: the ``k`` of :func:`affine_decay` (``None`` when the step is not of that form).
    """

    trajectories: dict[tuple[float, float], torch.Tensor]

    def decay(self, lr: float, scale: float, atol: float) -> float | None:
        traj = self.trajectories[(lr, scale)]
        return affine_decay(traj[0], traj[1] - traj[0], atol * scale)


def gradient_runs(
    runner: Runner, lrs: tuple[float, float], scales: tuple[float, float] = (1.0, 2.0)
) -> GradientRuns:
    """One step with the common data gradient at each learning rate, from each scale of the weights."""
    grad = proportional_gradient(0.0, PROBE_GRADIENT)
    return GradientRuns({(lr, s): runner.run(lr, 1, grad, runner.w0 * s) for lr in lrs for s in scales})
