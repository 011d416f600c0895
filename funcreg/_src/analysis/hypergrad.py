"""Hypergradients: the derivative of a validation loss with respect to a regularization coefficient.

Two ways, and a loop that uses either:

* :func:`hypergradient` (unrolled): train ``K`` steps of a :func:`funcreg.make_step` step with the
  coefficient in ``hparams[name]``, then ``torch.func.grad`` of the validation loss of the final
  parameters with respect to the coefficient, through every step (every transform and penalty form is
  differentiable: ``docs/guarantees.md``). Exact for the ``K`` steps actually taken; memory grows with
  ``K``.
* :func:`implicit_hypergradient` (at convergence): for a minimizer ``w*(c)`` of a training objective
  ``F(w, c)``, the implicit function theorem gives ``dw*/dc = -H^{-1} d/dc grad_w F`` with ``H`` the
  Hessian of ``F`` at ``w*``; the hypergradient ``-(grad V)^T H^{-1} d/dc grad_w F`` needs one linear
  solve, done by conjugate gradients with Hessian-vector products (``torch.func.vjp`` of
  ``torch.func.grad``: ``H`` is symmetric), never forming ``H``. Exact at an exact minimizer; memory
  independent of how it was found.
* :func:`tune_coefficient`: gradient descent on ``log(coefficient)`` driven by either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from funcreg._src.core.tree import flatten, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import check_int, check_number
from funcreg._src.training.hparams import float_dtype
from funcreg._src.training.step import Step

__all__ = ["Hypergradient", "TuneResult", "hypergradient", "implicit_hypergradient", "tune_coefficient"]


class Hypergradient(NamedTuple):
    """A validation loss and its derivative with respect to a coefficient.

    ``value``: the validation loss (0-d, detached); ``grad``: its derivative with respect to the
    coefficient (0-d); ``params``: the parameters it was evaluated at (the trained ones for
    :func:`hypergradient`, the given ones for :func:`implicit_hypergradient`), detached. For the
    implicit form also ``residual`` (``||H q - grad V|| / ||grad V||`` of the conjugate-gradient solve)
    and ``stationarity`` (``||grad_w F||`` at ``params``: 0 at a minimizer; the result assumes it is);
    ``None`` for the unrolled form.

    Examples:
        >>> import torch, funcreg as fr
        >>> F = lambda p, c: 0.5 * ((p["w"] - 1.0) ** 2).sum() + fr.l2(c)(p)  # minimizer w* = 1 / (1 + c)
        >>> w_star = {"w": torch.tensor([0.5], dtype=torch.float64)}  # c = 1
        >>> hg = fr.implicit_hypergradient(F, w_star, 1.0, lambda p: p["w"].sum())
        >>> hg.grad.item(), hg.stationarity  # d/dc 1/(1 + c) = -1/(1 + c)^2
        (-0.25, 0.0)
    """

    value: torch.Tensor
    grad: torch.Tensor
    params: PyTree
    residual: float | None = None
    stationarity: float | None = None


def _as_coefficient(coeff: Any, dtype: torch.dtype) -> torch.Tensor:
    check_number("coeff", coeff, low=0.0)
    return (
        torch.as_tensor(coeff, dtype=dtype).detach().clone()
        if isinstance(coeff, torch.Tensor)
        else torch.tensor(float(coeff), dtype=dtype)
    )


def _batches(batches: Any) -> list[tuple[Any, ...]]:
    """One batch (a tuple of tensors, used at every step) or a list of them (cycled)."""
    if isinstance(batches, tuple) and batches and all(isinstance(b, torch.Tensor) for b in batches):
        return [batches]
    if isinstance(batches, torch.Tensor) or not isinstance(batches, Sequence) or not batches:
        raise TypeError(
            "batches must be one batch, a tuple of tensors (x, y) used at every step, or a non-empty list of "
            f"such tuples (cycled), got {type(batches).__name__}"
        )
    out = []
    for i, b in enumerate(batches):
        if not isinstance(b, tuple):
            raise TypeError(
                f"batches[{i}] must be a tuple of step arguments (x, y, ...), got {type(b).__name__}"
            )
        out.append(b)
    return out


def _scalar(value: Any, who: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim != 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{who} must return a 0-d tensor (a mean loss), got {shape}")
    return value


def _depends(value: torch.Tensor, on: str) -> torch.Tensor:
    """``value``, which ``torch.func.grad`` is differentiating: refused where it does not depend on its
    input at all (a metric through ``.item()`` or NumPy, a constant), whose gradient would be a silent 0."""
    if not value.requires_grad:
        raise ValueError(
            f"val_loss does not depend on {on}, so its hypergradient would be a silent 0: compute it with "
            "torch operations on the parameters it is given (not through .item(), NumPy or a constant)"
        )
    return value


def hypergradient(
    step: Step,
    params: PyTree,
    coeff: float | torch.Tensor,
    batches: tuple[torch.Tensor, ...] | Sequence[tuple[Any, ...]],
    val_loss: Callable[[PyTree], torch.Tensor],
    *,
    steps: int,
    name: str = "coeff",
    hparams: Mapping[str, float] | None = None,
) -> Hypergradient:
    """``d val_loss(params_K) / d coeff`` through ``steps`` unrolled training steps.

    ``step`` is a :func:`funcreg.make_step` step whose ``tx`` and/or ``penalty`` are factories reading
    the coefficient as ``h[name]`` (e.g. ``penalty=lambda h: fr.l2(h["coeff"])`` or
    ``tx=lambda h: fr.sgd(0.1, weight_decay=h["coeff"])``), in any form. From ``params`` it takes
    ``steps`` steps (step ``t`` on ``batches[t % len(batches)]``), then differentiates
    ``val_loss(final_params)`` with respect to the coefficient with ``torch.func.grad``, through every
    step: the exact derivative of what those ``steps`` steps compute (for a penalty with kinks, as L1's
    prox, the one-sided derivative there).

    Args:
        step: the training step (``buffers=False``).
        params: the initial parameters (the same for every call, so the result is a function of
            ``coeff`` alone).
        coeff: the coefficient, ``>= 0``.
        batches: one batch (a tuple of tensors, e.g. ``(x, y)``, used at every step) or a list of them.
        val_loss: ``val_loss(params) -> 0-d tensor`` (a closure over the validation data).
        steps: how many steps to unroll (memory grows linearly with it).
        name: the hyperparameter the factories read.
        hparams: other hyperparameters, fixed.

    Returns:
        A :class:`Hypergradient` ``(value, grad, params)``.

    Examples:
        >>> import torch, funcreg as fr
        >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
        >>> y = torch.tensor([1.0, 3.0], dtype=torch.float64)
        >>> loss = lambda p, x, y: ((x @ p["w"] - y) ** 2).mean()
        >>> step = fr.make_step(loss, fr.sgd(0.1), penalty=lambda h: fr.l2(h["coeff"]))
        >>> val = lambda p: (p["w"] - 1.0).pow(2).sum()  # the validation loss prefers w = 1
        >>> w0 = {"w": torch.zeros(1, dtype=torch.float64)}
        >>> hg = fr.hypergradient(step, w0, 0.5, (x, y), val, steps=5)
        >>> f = lambda c: fr.hypergradient(step, w0, c, (x, y), val, steps=5).value
        >>> numeric = (f(0.5 + 1e-6) - f(0.5 - 1e-6)) / 2e-6
        >>> bool(abs(hg.grad - numeric) < 1e-7)
        True
    """
    if not isinstance(step, Step):
        raise TypeError(
            f"hypergradient expects a funcreg Step (from fr.make_step), got {type(step).__name__}"
        )
    if step.buffers:
        raise ValueError("hypergradient does not support steps with buffers=True (BatchNorm statistics)")
    if not callable(val_loss):
        raise TypeError(f"val_loss must be callable, got {val_loss!r}")
    check_int("steps", steps, low=1)
    extra = dict(hparams or {})
    if name in extra:
        raise ValueError(
            f"hparams[{name!r}] is the coefficient being differentiated; do not give it in hparams"
        )
    batch_list = _batches(batches)
    c0 = _as_coefficient(coeff, float_dtype(params))

    def run(c: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, PyTree]]:
        state = step.init(params, hparams={**extra, name: c})
        for t in range(steps):
            state, _ = step(state, *batch_list[t % len(batch_list)])
        value = _depends(
            _scalar(val_loss(state.params), "val_loss"),
            f"the coefficient (through the parameters: does the step use hparams[{name!r}]?)",
        )
        return value, (value, state.params)

    grad, (value, final) = torch.func.grad(run, has_aux=True)(c0)
    leaves, spec = flatten(final)
    final = unflatten([None if x is None else x.detach() for x in leaves], spec)
    return Hypergradient(value.detach(), grad.detach(), final)


# ----------------------------------------------------------------------------------------------------
# Implicit differentiation


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def _check_implicit_arguments(
    objective: Any, val_loss: Any, cg_steps: int, tol: float, damping: float
) -> None:
    """Refuses the arguments of :func:`implicit_hypergradient` before any differentiation starts, so
    a wrong one fails with its own message rather than deep inside ``torch.func``."""
    if not callable(objective):
        raise TypeError(
            f"implicit_hypergradient expects a callable objective(params, coeff), got {objective!r}"
        )
    if not callable(val_loss):
        raise TypeError(f"val_loss must be callable, got {val_loss!r}")
    check_int("cg_steps", cg_steps, low=1)
    check_number("tol", tol, low=0.0, allow_tensor=False)
    check_number("damping", damping, low=0.0, allow_tensor=False)


def _hessian_vector_product(
    grad_fn: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]],
    w: list[torch.Tensor],
    damping: float,
) -> tuple[tuple[torch.Tensor, ...], Callable[[list[torch.Tensor]], list[torch.Tensor]]]:
    """``grad_w F`` at ``w``, and ``v -> (H + damping I) v`` as the vjp of ``grad_w F`` (``H`` is
    symmetric): the graph of ``grad_w F`` is built once and reused by every product."""
    out = torch.func.vjp(grad_fn, tuple(w))
    g_train, hvp_fn = out[0], out[1]

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        (out,) = hvp_fn(tuple(v))
        return [o + damping * x for o, x in zip(out, v)]

    return g_train, hvp


def _conjugate_gradients(
    hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    rhs: list[torch.Tensor],
    like: list[torch.Tensor],
    steps: int,
    tol: float,
) -> tuple[list[torch.Tensor], float]:
    """Solves ``H q = rhs`` by conjugate gradients from ``q = 0`` (zeros like ``like``), using only
    products ``hvp(v) = H v``; returns ``q`` and the relative residual ``||H q - rhs|| / ||rhs||``.

    Stops after ``steps`` iterations or at a relative residual ``tol``; ``rhs = 0`` gives ``q = 0``
    with residual 0. A direction with ``p^T H p <= 0`` raises: ``H`` is not positive definite.
    """
    q = [torch.zeros_like(x) for x in like]
    r = [g.clone() for g in rhs]
    p = [x.clone() for x in r]
    rr = _dot(r, r)
    norm_rhs = math.sqrt(float(rr))
    if not norm_rhs > 0:  # also a nan norm: no solve, as for a zero right-hand side
        return q, 0.0
    for _ in range(steps):
        if math.sqrt(float(rr)) <= tol * norm_rhs:
            break
        hp = hvp(p)
        php = _dot(p, hp)
        if float(php) <= 0:
            raise ValueError(
                "implicit_hypergradient: the Hessian of the objective is not positive definite at params "
                f"(p^T H p = {float(php):.3g}); params must be a strict minimizer, or pass damping > 0"
            )
        alpha = rr / php
        q = [a + alpha * b for a, b in zip(q, p)]
        r = [a - alpha * b for a, b in zip(r, hp)]
        rr_new = _dot(r, r)
        p = [a + (rr_new / rr) * b for a, b in zip(r, p)]
        rr = rr_new
    residual_vec = [a - b for a, b in zip(hvp(q), rhs)]
    return q, math.sqrt(float(_dot(residual_vec, residual_vec))) / norm_rhs


def implicit_hypergradient(
    objective: Callable[[PyTree, torch.Tensor], torch.Tensor],
    params: PyTree,
    coeff: float | torch.Tensor,
    val_loss: Callable[[PyTree], torch.Tensor],
    *,
    cg_steps: int = 100,
    tol: float = 1e-10,
    damping: float = 0.0,
) -> Hypergradient:
    """``d val_loss(w*(c)) / dc`` at a minimizer ``w* = params`` of ``objective(w, c)``, implicitly.

    At a minimizer, ``grad_w F(w*(c), c) = 0`` for every ``c``; differentiating gives
    ``H dw*/dc = -d/dc grad_w F`` with ``H = hess_w F(w*, c)``, so

    ``dV/dc = -q^T d/dc grad_w F(w*, c)`` where ``H q = grad V(w*)``.

    ``q`` comes from conjugate gradients (``cg_steps`` iterations at most, stopping at a relative
    residual ``tol``) on Hessian-vector products computed by ``torch.func.vjp`` of ``torch.func.grad``
    (``H`` is symmetric and never formed); ``damping`` adds ``damping * I`` to ``H`` (for a Hessian
    that is only positive semi-definite). ``H`` must be positive definite at ``params`` (a strict local
    minimum).

    This is the derivative of the *converged* solution: ``params`` must be a minimizer of
    ``objective(., coeff)`` (trained to convergence); :attr:`Hypergradient.stationarity` reports
    ``||grad_w F||`` there, so you can check. It is the limit of :func:`hypergradient` as the number of
    steps grows, for an optimizer that converges to that minimizer.

    Args:
        objective: ``F(params, coeff) -> 0-d tensor``: the training objective whose minimizer
            ``params`` is, e.g. ``lambda p, c: data_loss(p) + fr.l2(c)(p)``; differentiable twice.
        params: the minimizer (e.g. trained parameters).
        coeff: the coefficient, ``>= 0``.
        val_loss: ``val_loss(params) -> 0-d tensor``.
        cg_steps: the most conjugate-gradient iterations.
        tol: the relative residual at which conjugate gradients stops.
        damping: ``>= 0``, added to the Hessian's diagonal.

    Returns:
        A :class:`Hypergradient` with ``residual`` and ``stationarity``.

    Examples:
        >>> import torch, funcreg as fr
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
        >>> y = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
        >>> F = lambda p, c: 0.5 * ((x @ p["w"] - y) ** 2).mean() + fr.l2(c)(p)  # ridge
        >>> val = lambda p: 0.5 * (p["w"] - 0.5).pow(2).sum()
        >>> a, b = x.T @ x / 3, x.T @ y / 3
        >>> solve = lambda c: torch.linalg.solve(a + c * torch.eye(2, dtype=torch.float64), b)  # minimizer
        >>> hg = fr.implicit_hypergradient(F, {"w": solve(0.1)}, 0.1, val)
        >>> numeric = (val({"w": solve(0.1 + 1e-6)}) - val({"w": solve(0.1 - 1e-6)})) / 2e-6
        >>> bool(abs(hg.grad - numeric) < 1e-8), hg.stationarity < 1e-12
        (True, True)
    """
    _check_implicit_arguments(objective, val_loss, cg_steps, tol, damping)
    leaves, spec = flatten(params)
    where = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    w = [leaves[i].detach() for i in where]
    c = _as_coefficient(coeff, w[0].dtype if w else torch.get_default_dtype())

    def tree(ws: Sequence[torch.Tensor]) -> PyTree:
        full = list(leaves)
        for i, x in zip(where, ws):
            full[i] = x
        return unflatten(full, spec)

    def grad_w(ws: tuple[torch.Tensor, ...], c_: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.func.grad(lambda v: _scalar(objective(tree(v), c_), "objective"))(ws)

    g_train, hvp = _hessian_vector_product(lambda ws: grad_w(ws, c), w, damping)
    stationarity = float(torch.sqrt(_dot(list(g_train), list(g_train))))

    def val_of(ws: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return _depends(_scalar(val_loss(tree(ws)), "val_loss"), "the parameters")

    g_val, value = torch.func.grad_and_value(val_of)(tuple(w))
    q, residual = _conjugate_gradients(hvp, list(g_val), w, cg_steps, tol)

    def mixed(c_: torch.Tensor) -> torch.Tensor:
        return _dot(q, list(grad_w(tuple(w), c_)))

    grad = -torch.func.grad(mixed)(c)
    return Hypergradient(value.detach(), grad.detach(), tree(w), residual, stationarity)


# ----------------------------------------------------------------------------------------------------
# Tuning


class TuneResult(NamedTuple):
    """The outcome of :func:`tune_coefficient`.

    ``coefficient``: the coefficient with the lowest validation loss evaluated; ``value``: that loss;
    ``history``: one dict per iteration, ``{"iteration", "coefficient", "value", "grad"}``.

    Examples:
        >>> import funcreg as fr
        >>> result = fr.tune_coefficient(lambda c: ((c - 2.0) ** 2, 2 * (c - 2.0)), 1.0, iterations=3, lr=0.2)
        >>> result.history[0]
        {'iteration': 0, 'coefficient': 1.0, 'value': 1.0, 'grad': -2.0}
        >>> [round(h["coefficient"], 4) for h in result.history], round(result.coefficient, 4)
        ([1.0, 1.4918, 2.0203], 2.0203)
    """

    coefficient: float
    value: float
    history: list[dict[str, float]]

    def to_dataframe(self) -> Any:
        """The history as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("TuneResult.to_dataframe needs pandas: pip install pandas") from err
        return pd.DataFrame(self.history)


def tune_coefficient(
    fn: Callable[[torch.Tensor], Any],
    coeff: float,
    *,
    iterations: int = 20,
    lr: float = 1.0,
    max_step: float = 1.0,
) -> TuneResult:
    """Tunes a coefficient by gradient descent on ``u = log(coefficient)``.

    ``fn(c)`` returns the validation loss and its derivative at ``c`` (a :class:`Hypergradient`, or a
    pair ``(value, grad)``), e.g. ``lambda c: fr.hypergradient(step, params, c, batches, val, steps=K)``.
    Each iteration evaluates ``fn`` at ``c = exp(u)`` and moves ``u <- u - lr * c * dV/dc`` (the chain
    rule: ``dV/du = c dV/dc``), the move clipped to ``[-max_step, max_step]`` (at most a factor
    ``exp(max_step)`` per iteration). Working on the log keeps the coefficient positive and makes steps
    relative, as coefficients are compared on a log scale. ``iterations`` evaluations in all; the result
    is the best coefficient evaluated.

    Args:
        fn: ``c -> (value, grad)`` or ``c -> Hypergradient``; ``c`` is a 0-d float64 tensor.
        coeff: the starting coefficient, ``> 0``.
        iterations: evaluations of ``fn``.
        lr: the step size on ``log(coefficient)``.
        max_step: the largest move of ``log(coefficient)`` per iteration.

    Returns:
        A :class:`TuneResult`.

    Examples:
        >>> import math, torch, funcreg as fr
        >>> fn = lambda c: ((torch.log(c) - math.log(0.01)) ** 2, 2 * (torch.log(c) - math.log(0.01)) / c)
        >>> result = fr.tune_coefficient(fn, 1.0, iterations=30, lr=0.3)
        >>> round(result.coefficient, 6)  # the minimum of (log c - log 0.01)^2
        0.01
    """
    if not callable(fn):
        raise TypeError(f"tune_coefficient expects a callable fn(c) -> (value, grad), got {fn!r}")
    check_number("coeff", coeff, low=0.0, low_open=True, allow_tensor=False)
    check_int("iterations", iterations, low=1)
    check_number("lr", lr, low=0.0, low_open=True, allow_tensor=False)
    check_number("max_step", max_step, low=0.0, low_open=True, allow_tensor=False)
    u = math.log(coeff)
    history: list[dict[str, float]] = []
    for it in range(iterations):
        c = math.exp(u)
        out = fn(torch.tensor(c, dtype=torch.float64))
        value, grad = (out.value, out.grad) if isinstance(out, Hypergradient) else out
        value, grad = float(value), float(grad)
        history.append({"iteration": it, "coefficient": c, "value": value, "grad": grad})
        if not (math.isfinite(value) and math.isfinite(grad)):
            raise ValueError(
                f"tune_coefficient: fn({c:.6g}) gave value {value} and grad {grad} (must be finite)"
            )
        move = max(-max_step, min(max_step, -lr * c * grad))
        u += move
    best = min(history, key=lambda h: h["value"])
    return TuneResult(best["coefficient"], best["value"], history)
