"""A weight-decay probe: what does an optimizer's ``weight_decay`` actually do to a weight?

From known weights, step an optimizer and look at what happens to each weight. :func:`probe` does that for any ``torch.optim``-style optimizer and names the
convention it finds (coupled L2, decoupled with or without the learning rate, an L1-like sign step, a
constant shift, which is a bug, or a decay that depends on the weights' norm).

How the kinds are told apart (every run on one float64 parameter holding the probe weights; every
gradient a tensor, never ``None``, so that the optimizer does not skip the parameter):

1. *Zero-gradient runs*, ``steps`` steps at each of two learning rates, and *gradient runs*, one step
   with the data gradient ``0.5`` on every weight, from the weights and from twice the weights.
2. *Precision*: an optimizer that computes in float32 (``p.data.float()``) writes float32 numbers
   into the float64 parameter; every tolerance below then follows float32's rounding.
3. No movement at zero gradient: the gradient runs decide. Every weight moving by the same amount is
   ``"none"``; a part of the step proportional to ``w`` is a decay that acts only with a gradient
   (LARS skips a zero gradient), reported with ``needs_gradient``.
4. *Cancellation test*, the definition of coupled decay: a coupled L2 decay ``lam`` adds ``lam * w`` to
   the gradient before momentum or Adam's ``m / sqrt(v)`` sees it, so the data gradient ``a * w`` with
   ``a = -lam`` cancels it exactly at every step and at both learning rates (``a`` found by a secant
   step, else bisection). For plain SGD without momentum coupled and decoupled decay are the same map
   (listed in ``equivalent``).
5. Otherwise the shape of the zero-gradient steps decides: proportional to ``w`` with a constant
   factor (decoupled; multiplied by ``lr`` or not), the same size for every weight towards zero
   (L1-like), or the same shift for every weight (constant shift). A decoupled verdict is checked
   against the gradient runs: if the part of the step proportional to ``w`` changes with a gradient, or
   when the weights are scaled, the decay depends on the weights (trust ratios: LARS, LAMB, whose
   zero-gradient steps show coefficient 1.0 whatever ``weight_decay``; AdamP's projection), and the
   verdict is ``DecayKind.NORM_DEPENDENT``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from funcreg._src.analysis.probe import report
from funcreg._src.analysis.probe.measure import (
    RATE_RTOL,
    GradientRuns,
    Runner,
    Tolerance,
    cancels,
    compute_precision,
    find_cancelling,
    gradient_runs,
    is_geometric,
    lr_scaling,
    same,
    step_shape,
    trajectory_shape,
    zeros,
)
from funcreg._src.analysis.probe.report import DecayKind, ProbeResult
from funcreg._src.core.validation import check_int, check_number

__all__ = ["DEFAULT_WEIGHTS", "DecayKind", "ProbeResult", "probe"]

DEFAULT_WEIGHTS: tuple[float, ...] = (-3.0, -1.5, -0.5, 0.5, 1.0, 2.0, 4.0)


# ----------------------------------------------------------------------------------------------------
# Argument checks.


def _check_weights(weights: Sequence[float]) -> tuple[float, ...]:
    """The probe weights as floats, checked to tell the kinds apart: nonzero (a zero weight has no
    sign), both signs (shift vs decay) and at least two magnitudes (L1 vs L2)."""
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


def _check_arguments(
    make_optimizer: object, steps: object, learning_rates: object, weights: Sequence[float]
) -> tuple[float, float, tuple[float, ...]]:
    """The two learning rates and the weights of a probe, after checking every argument of
    :func:`probe` (the rates must differ enough for lr scaling to be told from independence)."""
    if isinstance(make_optimizer, torch.optim.Optimizer):
        raise TypeError(
            "probe expects a function params -> Optimizer (e.g. lambda ps: torch.optim.AdamW(ps)), "
            "not an optimizer instance"
        )
    if not callable(make_optimizer):
        raise TypeError(
            f"make_optimizer must be callable (params -> Optimizer), got {type(make_optimizer).__name__}"
        )
    check_int("steps", steps, low=3)
    if (
        isinstance(learning_rates, (str, bytes))
        or not isinstance(learning_rates, Sequence)
        or len(learning_rates) != 2
    ):
        raise ValueError(f"learning_rates must be a pair of floats, got {learning_rates!r}")
    for i, lr in enumerate(learning_rates):
        check_number(f"learning_rates[{i}]", lr, low=0.0, low_open=True, allow_tensor=False)
    lr_a, lr_b = float(learning_rates[0]), float(learning_rates[1])
    if not (max(lr_a, lr_b) >= (1.5 - 1e-9) * min(lr_a, lr_b)):
        raise ValueError(f"learning_rates must differ by a factor of at least 1.5, got {learning_rates!r}")
    return lr_a, lr_b, _check_weights(weights)


# ----------------------------------------------------------------------------------------------------
# Classification.


class _Verdict(NamedTuple):
    """A classification: the fields of :class:`ProbeResult` it decides, and which tables it rests on."""

    kind: DecayKind
    coefficient: float | None
    lr_scaled: bool | None
    explanation: str
    equivalent: tuple[DecayKind, ...] = ()
    needs_gradient: bool = False
    shows_gradient_runs: bool = False


class _Probe(NamedTuple):
    """The runs of one probe and the tolerances they are read with."""

    runner: Runner
    lrs: tuple[float, float]
    steps: int
    trajectories: tuple[torch.Tensor, torch.Tensor]
    gradients: GradientRuns
    tol: Tolerance

    @property
    def k_atol(self) -> float:
        """Tolerance of a fitted proportion ``k`` (a step's error ``atol`` over a weight of size max|w|)."""
        return 4 * self.tol.atol / float(self.runner.w0.abs().max())

    def gradient_decays(self) -> dict[tuple[float, float], float] | None:
        """The decay ``k`` of each gradient run, or ``None`` if one is not a common step plus ``-k w``."""
        out = {}
        for key in self.gradients.trajectories:
            k = self.gradients.decay(*key, self.tol.atol)
            if k is None:
                return None
            out[key] = k
        return out


def _gated(p: _Probe) -> _Verdict:
    """Nothing moved at zero gradient: is there a decay that acts only with a gradient?"""
    lr_a, lr_b = p.lrs
    decays = p.gradient_decays()
    if decays is None:
        return _Verdict(
            DecayKind.UNKNOWN, None, None, report.UNKNOWN_GATED, needs_gradient=True, shows_gradient_runs=True
        )
    if all(abs(k) <= p.k_atol for k in decays.values()):
        return _Verdict(DecayKind.NONE, 0.0, None, report.none(gradient_checked=True))
    rtol = p.tol.rtol
    scale_free = all(same(decays[(lr, 1.0)], decays[(lr, 2.0)], p.k_atol, rtol) for lr in p.lrs)
    scaled = lr_scaling(decays[(lr_a, 1.0)], decays[(lr_b, 1.0)], lr_a, lr_b, p.k_atol, rtol)
    if not scale_free:
        text = report.norm_dependent(None, needs_gradient=True, changes_with_scale=True)
        return _Verdict(
            DecayKind.NORM_DEPENDENT, None, scaled, text, needs_gradient=True, shows_gradient_runs=True
        )
    if scaled is None:
        return _Verdict(
            DecayKind.UNKNOWN, None, None, report.UNKNOWN_GATED, needs_gradient=True, shows_gradient_runs=True
        )
    k = decays[(lr_a, 1.0)]
    kind = DecayKind.DECOUPLED_LR if scaled else DecayKind.DECOUPLED_INDEPENDENT
    coef = k / lr_a if scaled else k
    return _Verdict(
        kind,
        coef,
        scaled,
        report.decoupled(coef, scaled, True),
        needs_gradient=True,
        shows_gradient_runs=True,
    )


def _coupled(p: _Probe, movement: list[float]) -> _Verdict | None:
    """Coupled L2 if the data gradient ``-lam * w`` cancels the decay at both learning rates."""
    w0, (traj_a, traj_b), atol = p.runner.w0, p.trajectories, p.tol.atol
    f0 = float(((traj_a[1] - w0) * torch.sign(w0)).sum())
    a = find_cancelling(p.runner, p.lrs[0], f0) if abs(f0) > atol else None
    if a is None or a == 0.0:
        return None
    if not all(cancels(p.runner, lr, p.steps, a, m, atol) for lr, m in zip(p.lrs, movement)):
        return None
    lam = -a
    geometric = all(is_geometric(t, 1.0 - lr * lam, atol) for t, lr in zip(p.trajectories, p.lrs))
    proportional = step_shape(w0, traj_a[1] - w0, atol)[0] == "proportional"
    first_a = float((traj_a[1] - w0).abs().mean())
    first_b = float((traj_b[1] - w0).abs().mean())
    scaled = lr_scaling(first_a, first_b, p.lrs[0], p.lrs[1], atol)
    equiv = (DecayKind.DECOUPLED_LR,) if geometric else ()
    return _Verdict(DecayKind.COUPLED_L2, lam, scaled, report.coupled(lam, geometric, proportional), equiv)


def _weight_dependence(p: _Probe, k0: float) -> bool | None:
    """For a decoupled verdict with first-step proportion ``k0`` at ``lrs[0]``: ``None`` if the gradient
    runs agree with it, else whether the disagreement is with scaled weights (``True``) or with the
    zero-gradient step (``False``). Runs whose step is not common-plus-proportional are not judged."""
    decays = p.gradient_decays()
    if decays is None:
        return None
    rtol = p.tol.rtol
    if not all(same(decays[(lr, 1.0)], decays[(lr, 2.0)], p.k_atol, rtol) for lr in p.lrs):
        return True
    if not same(decays[(p.lrs[0], 1.0)], k0, p.k_atol, rtol):
        return False
    return None


def _by_shape(p: _Probe) -> _Verdict:
    """The verdict from the shape of the zero-gradient steps, once coupled L2 is ruled out: sign,
    shift, or proportional (decoupled, unless the gradient runs show it depends on the weights)."""
    lr_a, lr_b = p.lrs
    atol = p.tol.atol
    (shape_a, amounts_a), (shape_b, amounts_b) = (trajectory_shape(t, atol) for t in p.trajectories)
    if shape_a is None or shape_a != shape_b:
        return _Verdict(DecayKind.UNKNOWN, None, None, report.UNKNOWN_ZERO_GRADIENT)
    rtol = max(RATE_RTOL, p.tol.rtol)
    k_a, k_b = amounts_a[0], amounts_b[0]
    scaled = lr_scaling(k_a, k_b, lr_a, lr_b, atol, rtol)
    coef = k_a / lr_a if scaled else k_a
    if shape_a == "sign":
        return _Verdict(DecayKind.L1_SIGN, coef, scaled, report.sign(coef, scaled))
    if shape_a == "shift":
        return _Verdict(DecayKind.CONSTANT_SHIFT, coef, scaled, report.shift(coef, scaled))
    geometric = all(same(k, amounts[0], atol, rtol) for amounts in (amounts_a, amounts_b) for k in amounts)
    if not geometric or scaled is None:
        return _Verdict(DecayKind.UNKNOWN, None, scaled, report.UNKNOWN_PROPORTIONAL)
    dependence = _weight_dependence(p, k_a)
    if dependence is not None:
        text = report.norm_dependent((coef, scaled), needs_gradient=False, changes_with_scale=dependence)
        return _Verdict(DecayKind.NORM_DEPENDENT, None, scaled, text, shows_gradient_runs=True)
    kind = DecayKind.DECOUPLED_LR if scaled else DecayKind.DECOUPLED_INDEPENDENT
    return _Verdict(kind, coef, scaled, report.decoupled(coef, scaled, False))


def _classify(p: _Probe) -> _Verdict:
    """The verdict of a probe: gated if nothing moved at zero gradient, else coupled L2 if the
    cancellation test passes, else by the shape of the steps."""
    movement = [float((t - t[0]).abs().max()) for t in p.trajectories]
    if max(movement) <= p.tol.atol:
        return _gated(p)
    coupled = _coupled(p, movement)
    return coupled if coupled is not None else _by_shape(p)


# ----------------------------------------------------------------------------------------------------
# The public entry point.


def probe(
    make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    *,
    steps: int = 8,
    learning_rates: tuple[float, float] = (0.1, 0.01),
    weights: Sequence[float] = DEFAULT_WEIGHTS,
) -> ProbeResult:
    """Finds out what an optimizer's weight decay does, by stepping it from known weights.

    ``make_optimizer(params)`` must build a ``torch.optim.Optimizer`` over the list of tensors it is
    given, e.g. ``lambda ps: torch.optim.AdamW(ps, weight_decay=0.1)`` or the class itself. The probe
    calls it many times, each time on a fresh float64 parameter holding ``weights``, and then
    **overwrites** ``param_groups[i]["lr"]`` with each of ``learning_rates`` (the lr given to the
    constructor is ignored; every ``torch.optim`` optimizer reads its lr from the param groups at each
    step). It steps with a zero data gradient (a zeros tensor, not ``None``) and, to see decays that
    act only with a gradient or depend on the weights, once with the gradient 0.5 on every weight.

    The kinds (``w`` a weight, ``lam`` the coefficient, one step):

    - coupled L2: the optimizer adds ``lam * w`` to the gradient (``torch.optim.SGD``/``Adam``
      ``weight_decay``), the gradient of ``lam/2 * ||w||^2``. Plain SGD: ``w <- w * (1 - lr*lam)``,
      the same map as decoupled-multiplied-by-lr (reported in ``equivalent``); with momentum the
      factor changes from step to step; with Adam the step is about ``lr * sign(w)`` whatever ``lam``.
      Told apart from decoupled decay by cancellation: the data gradient ``-lam * w`` stops it exactly.
    - decoupled, multiplied by lr: ``w <- w * (1 - lr*lam)`` outside the gradient path
      (``torch.optim.AdamW``); decoupled, independent of lr: ``w <- w * (1 - lam)``.
    - depends on the weight norm: the decay changes with the gradient or with the scale of the
      weights (trust ratios: LARS, LAMB; AdamP's projection); no single coefficient.
    - L1-like (sign): ``w <- w - lr*lam*sign(w)``, the same size for every weight.
    - constant shift: ``w <- w - lr*lam`` for every weight whatever its sign (an SGDW written as
      ``p.add_(-lr * wd)``): a bug, not a decay.
    - none: nothing moves; unrecognised: none of the above (look at ``result.table``).

    ``result.needs_gradient`` flags a decay that acts only with a nonzero gradient (nothing moves at
    zero gradient); ``result.precision`` the dtype the optimizer computes in (tolerances follow it).

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
    lr_a, lr_b, values = _check_arguments(make_optimizer, steps, learning_rates, weights)
    run = _run(make_optimizer, (lr_a, lr_b), steps, values)
    verdict = _classify(run)
    precision = run.tol.dtype
    return ProbeResult(
        verdict.kind,
        verdict.coefficient,
        verdict.lr_scaled,
        _tables(run, values, verdict.shows_gradient_runs),
        verdict.explanation + report.precision_note(precision),
        verdict.equivalent,
        run.runner.name,
        run.lrs,
        values,
        run.trajectories,
        precision,
        verdict.needs_gradient,
        dict(run.gradients.trajectories),
    )


def _run(
    make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    lrs: tuple[float, float],
    steps: int,
    values: tuple[float, ...],
) -> _Probe:
    """Every run a verdict may need: ``steps`` zero-gradient steps at each learning rate and the
    gradient runs, with the tolerances of the precision the optimizer turned out to compute in."""
    w0 = torch.tensor(values, dtype=torch.float64)
    runner = Runner(make_optimizer, w0)
    trajs = (runner.run(lrs[0], steps, zeros), runner.run(lrs[1], steps, zeros))
    grads = gradient_runs(runner, lrs)
    precision = compute_precision(list(trajs) + list(grads.trajectories.values()))
    return _Probe(runner, lrs, steps, trajs, grads, Tolerance.of(precision, w0))


def _tables(p: _Probe, values: tuple[float, ...], with_gradient_runs: bool) -> str:
    """The weight tables of the report: the zero-gradient runs, then the gradient runs from both
    scales of the weights when the verdict rests on them."""
    text = report.table(p.trajectories, p.lrs, values, "zero data gradient")
    if with_gradient_runs:
        for scale in (1.0, 2.0):
            rows = [p.gradients.trajectories[(lr, scale)] for lr in p.lrs]
            start = [scale * w for w in values]
            text += "\n\n" + report.table(
                rows, p.lrs, start, f"data gradient 0.5 on every weight, from {scale:g} * weights"
            )
    return text
