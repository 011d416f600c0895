"""A weight-decay probe: what does an optimizer's ``weight_decay`` actually do to a weight?

Story 2 of ``shared/user-stories.md``: from known weights, with the data gradient set to zero, step an
optimizer and look at what happens to each weight. :func:`probe` does that for any ``torch.optim``-style
optimizer and names the convention it finds (coupled L2, decoupled with or without the learning rate,
an L1-like sign step, or a constant shift, which is a bug).

How the kinds are told apart (all runs in float64, on one 1-D parameter holding the probe weights,
every gradient a zeros tensor rather than ``None`` so that the optimizer does not skip the parameter):

1. *Zero-gradient runs*, ``steps`` steps at each of two learning rates. No movement: ``"none"``.
2. *Cancellation test*, the definition of coupled decay: a coupled L2 decay ``lam`` adds ``lam * w`` to
   the gradient before momentum or Adam's ``m / sqrt(v)`` sees it, so feeding the data gradient
   ``a * w`` (recomputed from the current weights at every step) with ``a = -lam`` cancels it exactly:
   the weights do not move at any step, at either learning rate. ``a`` is found by a secant step (exact
   when the first step is linear in the gradient, as for SGD with or without momentum) and otherwise
   by bisection (Adam-type optimizers, whose step jumps from ``-lr`` to ``+lr`` across ``a = -lam``).
   A decoupled decay is not cancelled: with momentum the gradient term is amplified at later steps
   while the decay is not, and with Adam the gradient term is normalised to about ``lr`` while the
   decay stays ``lr * lam * w``. For plain SGD without momentum the two are the same map, so a
   coupled result whose zero-gradient trajectory is ``w0 * (1 - lr * lam) ** t`` lists
   ``DecayKind.DECOUPLED_LR`` in ``equivalent``.
3. Otherwise the shape of the zero-gradient steps decides: proportional to ``w`` with a constant factor
   per step (decoupled; multiplied by ``lr`` or not, from the two learning rates), the same size for
   every weight towards zero (L1-like), or the same shift for every weight whatever its sign
   (constant shift).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from funcreg._src.validation import check_int, check_number

__all__ = ["DEFAULT_WEIGHTS", "DecayKind", "ProbeResult", "probe"]

DEFAULT_WEIGHTS: tuple[float, ...] = (-3.0, -1.5, -0.5, 0.5, 1.0, 2.0, 4.0)

# Tolerances, relative to the size of what is compared (the runs are float64).
_SHAPE_RTOL = 1e-6  # a step "is proportional to w" / "is the same for every weight"
_RATE_RTOL = 1e-5  # a per-step amount "scales with lr" / "does not depend on lr"
_CANCEL_RTOL = 1e-4  # residual movement of the cancellation run, relative to the zero-gradient movement
_ULPS = 64 * torch.finfo(torch.float64).eps  # movement below this (times max|w|) is rounding


class DecayKind(str, enum.Enum):
    """What a weight decay does, as found by :func:`probe`. ``str(kind)`` is its description."""

    NONE = "none"
    COUPLED_L2 = "coupled L2"
    DECOUPLED_LR = "decoupled, multiplied by lr"
    DECOUPLED_INDEPENDENT = "decoupled, independent of lr"
    L1_SIGN = "L1-like (sign)"
    CONSTANT_SHIFT = "constant shift"
    UNKNOWN = "unrecognised"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, eq=False)
class ProbeResult:
    """What :func:`probe` found. ``str(result)`` is a readable report with the weight tables.

    Attributes:
        kind: the :class:`DecayKind`.
        coefficient: the effective coefficient ``lam``, in the convention of ``kind``:
            coupled L2: the gradient added is ``lam * w`` (torch's ``weight_decay``);
            decoupled, multiplied by lr: ``w <- w * (1 - lr * lam)`` per step (AdamW's ``weight_decay``);
            decoupled, independent of lr: ``w <- w * (1 - lam)`` per step;
            L1-like: ``w <- w - lr * lam * sign(w)`` per step (``- lam * sign(w)`` if not ``lr_scaled``);
            constant shift: ``w <- w - lr * lam`` (``- lam`` if not ``lr_scaled``);
            none: ``0.0``; unrecognised: ``None``.
        lr_scaled: whether the zero-gradient step is proportional to the learning rate (``None`` when
            it is neither proportional to it nor independent of it, or when nothing moved).
        table: the weights before and after each zero-gradient step, one block per learning rate.
        explanation: what the numbers mean, in words.
        equivalent: other kinds that produce exactly the same steps on this optimizer (coupled L2
            under plain SGD is also decoupled-multiplied-by-lr).
        optimizer: the class name of the optimizer probed.
        learning_rates: the two learning rates of the zero-gradient runs.
        weights: the starting weights.
        trajectories: one ``(steps + 1, len(weights))`` float64 tensor per learning rate, row ``t``
            holding the weights after ``t`` zero-gradient steps.
    """

    kind: DecayKind
    coefficient: float | None
    lr_scaled: bool | None
    table: str
    explanation: str
    equivalent: tuple[DecayKind, ...] = ()
    optimizer: str = ""
    learning_rates: tuple[float, ...] = ()
    weights: tuple[float, ...] = ()
    trajectories: tuple[torch.Tensor, ...] = ()

    def __str__(self) -> str:
        coef = "n/a" if self.coefficient is None else f"{self.coefficient:.6g}"
        lines = [
            f"weight decay probe of {self.optimizer or 'optimizer'}",
            f"kind:        {self.kind.value}",
            f"coefficient: {coef}",
            f"lr_scaled:   {self.lr_scaled}",
        ]
        if self.equivalent:
            lines.append(f"equivalent:  {', '.join(k.value for k in self.equivalent)}")
        lines += ["", self.explanation, "", self.table]
        return "\n".join(lines)


GradFn = Callable[[torch.Tensor], torch.Tensor]


class _Runner:
    """Builds a fresh optimizer over one float64 parameter and steps it with given gradients."""

    def __init__(self, make_optimizer: Callable[[list[torch.Tensor]], Any], weights: torch.Tensor) -> None:
        self._make = make_optimizer
        self.w0 = weights
        self.name = ""

    def _build(self, param: torch.Tensor, lr: float) -> torch.optim.Optimizer:
        opt = self._make([param])
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                "make_optimizer must return a torch.optim.Optimizer built over the parameters it is "
                f"given (e.g. lambda ps: torch.optim.AdamW(ps, weight_decay=0.1)), got {type(opt).__name__}"
            )
        if not any(q is param for group in opt.param_groups for q in group["params"]):
            raise ValueError("make_optimizer returned an optimizer that does not hold the parameters it was given")
        for group in opt.param_groups:
            if "lr" not in group:
                raise ValueError(
                    f"{type(opt).__name__} has no 'lr' in its param_groups; probe sets "
                    "param_groups[i]['lr'] to compare two learning rates"
                )
            old = group["lr"]
            group["lr"] = torch.tensor(lr, dtype=old.dtype, device=old.device) if isinstance(old, torch.Tensor) else lr
        self.name = type(opt).__name__
        return opt

    def run(self, lr: float, steps: int, grad_fn: GradFn) -> torch.Tensor:
        """The weights after 0, 1, ..., ``steps`` steps, as a ``(steps + 1, n)`` tensor."""
        param = torch.nn.Parameter(self.w0.clone())
        opt = self._build(param, lr)
        rows = [param.detach().clone()]
        for _ in range(steps):
            param.grad = grad_fn(param.detach())
            opt.step()
            rows.append(param.detach().clone())
        return torch.stack(rows)


def _zeros(w: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(w)


def _proportional_gradient(a: float, c: float = 0.0) -> GradFn:
    return lambda w: a * w.clone() + c


# ----------------------------------------------------------------------------------------------------
# Shapes of one step d = w_new - w_old.


def _fit(d: torch.Tensor, basis: torch.Tensor) -> tuple[float, float]:
    """Least-squares ``d ~ -k * basis``: returns ``k`` and the max residual."""
    denom = float((basis * basis).sum())
    if denom == 0.0:
        return 0.0, float(d.abs().max())
    k = -float((d * basis).sum()) / denom
    return k, float((d + k * basis).abs().max())


_SHAPES = ("proportional", "sign", "shift")


def _fits(w_old: torch.Tensor, d: torch.Tensor, shape: str, atol: float) -> tuple[bool, float]:
    """Whether the step ``d`` taken from ``w_old`` has ``shape`` (``d = -k * basis``), and ``k``."""
    basis = {
        "proportional": w_old,
        "sign": torch.sign(w_old),
        "shift": torch.ones_like(w_old),
    }[shape]
    k, residual = _fit(d, basis)
    return residual <= _SHAPE_RTOL * float(d.abs().max()) + atol, k


def _step_shape(w_old: torch.Tensor, d: torch.Tensor, atol: float) -> tuple[str | None, float]:
    """Which of proportional / sign / shift fits the step ``d`` taken from ``w_old``, and its amount.

    The probe weights have both signs and several magnitudes, so at most one shape fits a first step.
    """
    for shape in _SHAPES:
        ok, k = _fits(w_old, d, shape, atol)
        if ok:
            return shape, k
    return None, math.nan


def _trajectory_shape(traj: torch.Tensor, atol: float) -> tuple[str | None, list[float]]:
    """The shape every step of ``traj`` has (``None`` if they disagree), and each step's amount.

    For the sign shape, weights that reach or cross zero during the run are left out after the first
    step (an L1 step oscillates around zero there).
    """
    w0 = traj[0]
    first, k0 = _step_shape(w0, traj[1] - w0, atol)
    if first is None:
        return None, []
    amounts = [k0]
    keep = torch.ones_like(w0, dtype=torch.bool)
    if first == "sign":
        keep = (torch.sign(traj) == torch.sign(w0)).all(dim=0)
        keep &= (traj.abs() > atol).all(dim=0)
    for t in range(1, traj.shape[0] - 1):
        w_old, d = traj[t][keep], (traj[t + 1] - traj[t])[keep]
        if first == "proportional" and (w_old.numel() == 0 or float(w_old.abs().max()) <= atol):
            break  # everything decayed to zero
        if first == "sign" and int(keep.sum()) < 2:
            break
        # Later steps are checked against the first step's shape only: once every weight has one
        # sign (a shift can get there), a shift also fits the sign shape.
        ok, k = _fits(w_old, d, first, atol)
        if not ok:
            return None, []
        amounts.append(k)
    return first, amounts


def _same(x: float, y: float, atol: float) -> bool:
    return abs(x - y) <= _RATE_RTOL * max(abs(x), abs(y)) + atol


def _lr_scaling(k_a: float, k_b: float, lr_a: float, lr_b: float, atol: float) -> bool | None:
    """True if the amounts scale like the learning rates, False if they do not depend on them."""
    if _same(k_a * lr_b, k_b * lr_a, atol * max(lr_a, lr_b)):
        return True
    if _same(k_a, k_b, atol):
        return False
    return None


def _is_geometric(traj: torch.Tensor, factor: float, atol: float) -> bool:
    """``traj[t] == traj[0] * factor ** t`` for every step, up to rounding."""
    t = torch.arange(traj.shape[0], dtype=traj.dtype).unsqueeze(1)
    predicted = traj[0] * factor**t
    movement = float((traj - traj[0]).abs().max())
    return float((traj - predicted).abs().max()) <= _SHAPE_RTOL * movement + atol


# ----------------------------------------------------------------------------------------------------
# The cancellation test.


def _shrink(runner: _Runner, lr: float, a: float) -> float:
    """First-step movement towards zero, summed over the weights, with the data gradient ``a * w``."""
    traj = runner.run(lr, 1, _proportional_gradient(a))
    return float(((traj[1] - traj[0]) * torch.sign(traj[0])).sum())


def _find_cancelling(runner: _Runner, lr: float, f0: float) -> float | None:
    """The ``a`` at which the first step with data gradient ``a * w`` does not move the weights."""
    w0 = runner.w0
    direction = -1.0 if f0 < 0 else 1.0  # a decay (f0 < 0) is cancelled by a negative a
    guess = abs(f0) / (lr * float(w0.abs().sum()))  # exact for coupled L2 under plain SGD
    lo, f_lo = 0.0, f0
    hi = direction * guess
    f_hi = _shrink(runner, lr, hi)
    if f_hi != f_lo:  # secant: exact when the first step is linear in the gradient
        a = hi - f_hi * (hi - lo) / (f_hi - f_lo)
        if math.isfinite(a):
            f_a = _shrink(runner, lr, a)
            if abs(f_a) <= 1e-10 * abs(f0):
                return a
    for _ in range(40):  # expand until the sign of the first step flips
        if f_hi == 0.0:
            return hi
        if (f_hi > 0) != (f0 > 0):
            break
        lo, f_lo = hi, f_hi
        hi *= 4.0
        f_hi = _shrink(runner, lr, hi)
    else:
        return None
    for _ in range(200):  # bisection, down to adjacent floats
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        f_mid = _shrink(runner, lr, mid)
        if f_mid == 0.0:
            return mid
        if (f_mid > 0) == (f0 > 0):
            lo, f_lo = mid, f_mid
        else:
            hi, f_hi = mid, f_mid
    return lo if abs(f_lo) <= abs(f_hi) else hi


def _cancels(runner: _Runner, lr: float, steps: int, a: float, movement: float, atol: float) -> bool:
    """Whether the data gradient ``a * w`` cancels the decay, alone and under a common extra gradient.

    Alone, nothing may move. With the extra data gradient ``1`` on every weight, a coupled decay
    cancelled by ``a * w`` leaves the optimizer seeing the same gradient ``1`` on every weight, so
    every weight must move by the same amount. The second run rules out cancellations that only hold
    for tiny gradients (Adam's step ``lr * g / (|g| + eps)`` is linear in ``g`` when ``|g| << eps``).
    """
    traj = runner.run(lr, steps, _proportional_gradient(a))
    if float((traj - traj[0]).abs().max()) > _CANCEL_RTOL * movement + atol:
        return False
    shifted = runner.run(lr, steps, _proportional_gradient(a, 1.0))
    delta = shifted - shifted[0]
    spread = float((delta - delta.mean(dim=1, keepdim=True)).abs().max())
    return spread <= _CANCEL_RTOL * movement + atol + _ULPS * float(shifted.abs().max())


# ----------------------------------------------------------------------------------------------------
# Report.


def _table(trajectories: Sequence[torch.Tensor], lrs: Sequence[float], weights: Sequence[float]) -> str:
    blocks = []
    for lr, traj in zip(lrs, trajectories):
        header = ["step"] + [f"w={w:g}" for w in weights]
        rows = [header] + [[str(t)] + [f"{v:.8g}" for v in row.tolist()] for t, row in enumerate(traj)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [f"lr = {lr:g}, zero data gradient"]
        lines += ["  ".join(c.rjust(wd) for c, wd in zip(r, widths)) for r in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _check_weights(weights: Sequence[float]) -> tuple[float, ...]:
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"weights must be a sequence of floats, got {type(weights).__name__}")
    for i, w in enumerate(weights):
        check_number(f"weights[{i}]", w, low=None, allow_tensor=False)
    values = tuple(float(w) for w in weights)
    if len(values) < 3 or any(w == 0.0 for w in values):
        raise ValueError(f"weights must be at least 3 nonzero numbers, got {values!r}")
    if not (any(w > 0 for w in values) and any(w < 0 for w in values)):
        raise ValueError(f"weights need both signs (to tell a shift from a decay), got {values!r}")
    if len({abs(w) for w in values}) < 2:
        raise ValueError(f"weights need at least two magnitudes (to tell L1 from L2), got {values!r}")
    return values


def probe(
    make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    *,
    steps: int = 8,
    learning_rates: tuple[float, float] = (0.1, 0.01),
    weights: Sequence[float] = DEFAULT_WEIGHTS,
) -> ProbeResult:
    """Finds out what an optimizer's weight decay does, by stepping it with a zero data gradient.

    ``make_optimizer(params)`` must build a ``torch.optim.Optimizer`` over the list of tensors it is
    given, e.g. ``lambda ps: torch.optim.AdamW(ps, weight_decay=0.1)`` or the class itself. The probe
    calls it many times, each time on a fresh float64 parameter holding ``weights``, and then
    **overwrites** ``param_groups[i]["lr"]`` with each of ``learning_rates`` (the lr given to the
    constructor is ignored; every ``torch.optim`` optimizer reads its lr from the param groups at each
    step). The gradient given to the optimizer is a zeros tensor, not ``None``.

    The kinds (``w`` a weight, ``lam`` the coefficient, one step):

    - coupled L2: the optimizer adds ``lam * w`` to the gradient (``torch.optim.SGD``/``Adam``
      ``weight_decay``), the gradient of ``lam/2 * ||w||^2``. Plain SGD: ``w <- w * (1 - lr*lam)``,
      the same map as decoupled-multiplied-by-lr (reported in ``equivalent``); with momentum the
      factor changes from step to step; with Adam the step is about ``lr * sign(w)`` whatever ``lam``.
      Told apart from decoupled decay by cancellation: the data gradient ``-lam * w`` stops it exactly.
    - decoupled, multiplied by lr: ``w <- w * (1 - lr*lam)`` outside the gradient path
      (``torch.optim.AdamW``).
    - decoupled, independent of lr: ``w <- w * (1 - lam)``.
    - L1-like (sign): ``w <- w - lr*lam*sign(w)``, the same size for every weight.
    - constant shift: ``w <- w - lr*lam`` for every weight whatever its sign (an SGDW written as
      ``p.add_(-lr * wd)``): a bug, not a decay.
    - none: nothing moves; unrecognised: none of the above (look at ``result.table``).

    Args:
        make_optimizer: ``params -> torch.optim.Optimizer``.
        steps: zero-gradient steps per learning rate (at least 3; enough to see momentum).
        learning_rates: two different positive learning rates.
        weights: the starting weights: nonzero, both signs, at least two magnitudes.

    Returns:
        A :class:`ProbeResult`; ``print(result)`` shows the report and the weight tables.

    Raises:
        TypeError: ``make_optimizer`` is not callable or does not return an Optimizer.
        ValueError: invalid ``steps``, ``learning_rates`` or ``weights``, or an optimizer without
            ``lr`` in its param groups.

    Examples:
        >>> import torch, funcreg as fr
        >>> r = fr.probe(lambda ps: torch.optim.AdamW(ps, weight_decay=0.1))
        >>> print(r.kind, round(r.coefficient, 9), r.lr_scaled)
        decoupled, multiplied by lr 0.1 True
        >>> r = fr.probe(lambda ps: torch.optim.Adam(ps, weight_decay=0.1))
        >>> print(r.kind, round(r.coefficient, 9))
        coupled L2 0.1
        >>> r.trajectories[0][1, -1].item()  # w = 4 after one step at lr 0.1: about 4 - 0.1*sign(4)
        3.9000000025
    """
    if isinstance(make_optimizer, torch.optim.Optimizer):
        raise TypeError(
            "probe expects a function params -> Optimizer (e.g. lambda ps: torch.optim.AdamW(ps)), "
            "not an optimizer instance"
        )
    if not callable(make_optimizer):
        raise TypeError(f"make_optimizer must be callable (params -> Optimizer), got {type(make_optimizer).__name__}")
    check_int("steps", steps, low=3)
    if isinstance(learning_rates, (str, bytes)) or not isinstance(learning_rates, Sequence) or len(learning_rates) != 2:
        raise ValueError(f"learning_rates must be a pair of floats, got {learning_rates!r}")
    for i, lr in enumerate(learning_rates):
        check_number(f"learning_rates[{i}]", lr, low=0.0, low_open=True, allow_tensor=False)
    lr_a, lr_b = float(learning_rates[0]), float(learning_rates[1])
    if not (max(lr_a, lr_b) >= (1.5 - 1e-9) * min(lr_a, lr_b)):
        raise ValueError(f"learning_rates must differ by a factor of at least 1.5, got {learning_rates!r}")
    values = _check_weights(weights)

    w0 = torch.tensor(values, dtype=torch.float64)
    atol = _ULPS * float(w0.abs().max())
    runner = _Runner(make_optimizer, w0)
    trajs = (runner.run(lr_a, steps, _zeros), runner.run(lr_b, steps, _zeros))
    movement = [float((t - t[0]).abs().max()) for t in trajs]
    table = _table(trajs, (lr_a, lr_b), values)

    def result(
        kind: DecayKind,
        coef: float | None,
        scaled: bool | None,
        text: str,
        equiv: tuple[DecayKind, ...] = (),
    ) -> ProbeResult:
        return ProbeResult(
            kind,
            coef,
            scaled,
            table,
            text,
            tuple(equiv),
            runner.name,
            (lr_a, lr_b),
            values,
            trajs,
        )

    if max(movement) <= atol:
        return result(
            DecayKind.NONE,
            0.0,
            None,
            "With a zero data gradient no weight moved: no weight decay (or one below float64 rounding).",
        )

    first_a = float((trajs[0][1] - w0).abs().mean())
    first_b = float((trajs[1][1] - w0).abs().mean())
    scaled = _lr_scaling(first_a, first_b, lr_a, lr_b, atol)

    # Coupled L2: the data gradient -lam * w cancels the decay at every step, at both learning rates.
    f0 = float(((trajs[0][1] - w0) * torch.sign(w0)).sum())
    a = _find_cancelling(runner, lr_a, f0) if abs(f0) > atol else None
    if (
        a is not None
        and a != 0.0
        and _cancels(runner, lr_a, steps, a, movement[0], atol)
        and _cancels(runner, lr_b, steps, a, movement[1], atol)
    ):
        lam = -a
        text = (
            f"Coupled L2: the decay acts exactly as an extra gradient {lam:.6g} * w (the gradient of "
            f"{lam:.6g}/2 * ||w||^2 in the loss): feeding the data gradient {-lam:.6g} * w cancels it at "
            "every step and at both learning rates, so it goes through the optimizer's momentum and "
            "normalisation like any gradient."
        )
        equiv: tuple[DecayKind, ...] = ()
        if all(_is_geometric(t, 1.0 - lr * lam, atol) for t, lr in zip(trajs, (lr_a, lr_b))):
            equiv = (DecayKind.DECOUPLED_LR,)
            text += (
                f" With a zero data gradient each step is w <- w * (1 - lr * {lam:.6g}), which is also what "
                "a decoupled decay multiplied by lr does: for plain SGD without momentum coupled and "
                "decoupled decay are the same map."
            )
        elif _step_shape(w0, trajs[0][1] - w0, atol)[0] == "proportional":
            text += (
                " The zero-gradient steps are proportional to w but the factor changes from step to step: "
                "the decay is accumulated by momentum."
            )
        else:
            text += (
                " The zero-gradient steps are not proportional to w: the optimizer normalises the decay "
                "gradient (Adam-type m / sqrt(v)), so each step is about lr * sign(w) whatever the "
                "coefficient, small weights shrink as fast as large ones, and the coefficient only matters "
                "relative to the data gradient (and eps). Use a decoupled decay (AdamW) for a decay "
                "proportional to w."
            )
        return result(DecayKind.COUPLED_L2, lam, scaled, text, equiv)

    shapes = [_trajectory_shape(t, atol) for t in trajs]
    (shape_a, amounts_a), (shape_b, amounts_b) = shapes
    if shape_a is None or shape_a != shape_b:
        return result(
            DecayKind.UNKNOWN,
            None,
            scaled,
            "The zero-gradient steps are neither proportional to w with a gradient -lam * w cancelling them, "
            "nor a constant factor, nor the same size for every weight, nor the same shift: see the table.",
        )
    k_a, k_b = amounts_a[0], amounts_b[0]
    scaled = _lr_scaling(k_a, k_b, lr_a, lr_b, atol)
    coef = k_a / lr_a if scaled else k_a

    if shape_a == "proportional":
        geometric = all(_same(k, amounts[0], atol) for amounts in (amounts_a, amounts_b) for k in amounts)
        if not geometric or scaled is None:
            return result(
                DecayKind.UNKNOWN,
                None,
                scaled,
                "The zero-gradient steps are proportional to w, but the factor changes from step to step "
                "(or with lr in a way that is neither proportional nor constant), and the data gradient "
                "-lam * w does not cancel them: see the table.",
            )
        if scaled:
            return result(
                DecayKind.DECOUPLED_LR,
                coef,
                True,
                f"Decoupled weight decay multiplied by lr: w <- w * (1 - lr * {coef:.6g}) at every step, "
                "applied to the weights outside the gradient path (the data gradient -lam * w does not "
                "cancel it), like torch.optim.AdamW.",
            )
        return result(
            DecayKind.DECOUPLED_INDEPENDENT,
            coef,
            False,
            f"Decoupled weight decay independent of lr: w <- w * (1 - {coef:.6g}) at every step whatever "
            "the learning rate, so it does not follow an lr schedule or warmup. The AdamW coefficient "
            f"with the same effect at a given lr is {coef:.6g} / lr.",
        )
    scale_text = "lr * " if scaled else ""
    if shape_a == "sign":
        return result(
            DecayKind.L1_SIGN,
            coef,
            scaled,
            f"L1-like: every weight moves {scale_text}{coef:.6g} towards zero per step whatever its size, "
            f"w <- w - {scale_text}lam * sign(w), the (sub)gradient step of lam * |w|. It does not stop at zero: "
            "small weights oscillate around it instead of becoming exact zeros (a proximal step, "
            "soft-thresholding, would give them).",
        )
    return result(
        DecayKind.CONSTANT_SHIFT,
        coef,
        scaled,
        f"Constant shift: every weight moves by -{scale_text}{coef:.6g} per step whatever its sign, so "
        "positive weights shrink and negative ones grow away from zero. This is not a weight decay; it "
        "is what `p.add_(-lr * wd)` does where `p.mul_(1 - lr * wd)` or "
        "`p.add_(p, alpha=-lr * wd)` was meant.",
    )
