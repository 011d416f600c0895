"""Functional training steps: ``step(train_state, *batch) -> (train_state, metrics)``.

A step is a pure function of a :class:`TrainState` (parameters, optimizer state, buffers and
hyperparameters), built once from a loss function, a transform and optionally a penalty applied in
one of the four forms. Because it is pure, ``torch.func.vmap`` turns it into a step for an ensemble
(:mod:`funcreg._src.training.ensemble`) and ``torch.compile`` compiles it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple, Union, get_args

import torch
from torch import nn

from funcreg._src.combinators.combine import named_chain
from funcreg._src.core.aliasing import OverlapCheck
from funcreg._src.core.base import GradientTransformation
from funcreg._src.core.donation import DonationTracker
from funcreg._src.core.tree import compiling, flatten, unflatten
from funcreg._src.core.typing import PyTree, ScalarOrSchedule
from funcreg._src.core.validation import check_bool, check_rate
from funcreg._src.forms.forms import (
    PenaltyState,
    add_penalty_grad,
    decoupled,
    penalized,
    penalty_metrics,
    proximal,
)
from funcreg._src.kernels.update import apply_updates, check_donatable, donated_step
from funcreg._src.penalties import Penalty
from funcreg._src.penalties.base import FlatParams
from funcreg._src.training.hparams import Hyperparams, as_hparams, float_dtype

Form = Literal["loss", "coupled", "decoupled", "proximal"]
FORMS: tuple[str, ...] = get_args(Form)

TransformLike = Union[GradientTransformation, Callable[[Hyperparams], GradientTransformation]]
PenaltyLike = Union[None, Penalty, Callable[[Hyperparams], Penalty]]


class _TrainStateFields(NamedTuple):
    params: PyTree
    opt_state: Any
    buffers: PyTree
    hparams: dict[str, torch.Tensor]


class TrainState(_TrainStateFields):
    """Everything a training step carries: a NamedTuple of trees of tensors (vmap-, save- and compile-able).

    ``params``: the parameter tree; ``opt_state``: the transform's state; ``buffers``: module buffers
    such as BatchNorm running statistics (``{}`` when unused); ``hparams``: hyperparameters handed to
    transform/penalty factories, as tensors (``{}`` when unused; one value per member in a sweep).

    A donated step marks each state it consumes (in the instance's ``__dict__``, which pickling and
    ``_replace`` leave out), so stepping any earlier state again raises instead of reading
    overwritten tensors.
    """

    _fr_generations = True  # see funcreg._src.core.donation.DonationTracker

    def __reduce__(self) -> Any:
        return (type(self), tuple(self))


_MODULE_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_MODULE_LOCKS_GUARD = threading.Lock()


def _module_lock(model: nn.Module) -> threading.RLock:
    """One lock per module: ``functional_call`` swaps the module's attributes for the duration of a
    call, so two threads calling it on one module at once would run with each other's parameters
    and leave the module holding the wrong tensors."""
    with _MODULE_LOCKS_GUARD:
        lock = _MODULE_LOCKS.get(model)
        if lock is None:
            lock = _MODULE_LOCKS[model] = threading.RLock()
        return lock


def functional_model(model: nn.Module) -> Callable[..., tuple[Any, dict[str, torch.Tensor]]]:
    """A pure function ``apply(params, buffers, *args, **kwargs) -> (output, new_buffers)`` of ``model``.

    ``torch.func.functional_call`` writes updated buffers (BatchNorm running statistics in training
    mode) *into the tensors of the dict you pass*; ``apply`` passes copies and returns them, so the
    caller's buffers never change. Works under ``torch.func.grad`` and ``vmap`` (one set of running
    statistics per member when the buffers are batched).

    Thread-safe: ``functional_call`` swaps the module's attributes while it runs, so calls on one
    module from several threads are serialized by a per-module lock, and the module always ends up
    holding its own parameters. (Under ``torch.compile`` the graph is traced once; no lock is taken.)

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.BatchNorm1d(2)
        >>> apply = fr.functional_model(model)
        >>> buffers = fr.buffers_of(model)
        >>> _, new = apply(fr.params_of(model), buffers, torch.tensor([[0.0, 2.0], [2.0, 4.0]]))
        >>> buffers["running_mean"], new["running_mean"]  # the caller's dict is untouched
        (tensor([0., 0.]), tensor([0.1000, 0.3000]))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"functional_model expects a torch.nn.Module, got {type(model).__name__}")

    def apply(
        params: PyTree, buffers: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        own = {name: b.clone() for name, b in buffers.items()}
        if compiling():
            return torch.func.functional_call(model, (params, own), args, kwargs), own
        with _module_lock(model):
            out = torch.func.functional_call(model, (params, own), args, kwargs)
        return out, own

    return apply


def _resolve(thing: Any, hparams: Hyperparams) -> Any:
    if isinstance(thing, (GradientTransformation, Penalty)) or thing is None:
        return thing
    return thing(hparams)


class Step:
    """A pure training step; see :func:`make_step`."""

    def __init__(
        self,
        loss_fn: Callable[..., Any],
        tx: TransformLike,
        penalty: PenaltyLike,
        form: Form,
        learning_rate: None | str | ScalarOrSchedule,
        has_aux: bool,
        buffers: bool,
        donate: bool = False,
        report_sparsity: bool = False,
    ) -> None:
        self.loss_fn = loss_fn
        self.tx = tx
        self.penalty = penalty
        self.form = form
        self.learning_rate = learning_rate
        self.has_aux = has_aux
        self.buffers = buffers
        self.donate = donate
        self.report_sparsity = report_sparsity
        self._donations = DonationTracker()
        self._overlap = OverlapCheck()

    def transform(self, hparams: Hyperparams) -> GradientTransformation:
        """The full transform for these hyperparameters: ``tx`` with the penalty's form wired in.

        With a gradient-edit or proximal form this is a :func:`funcreg.named_chain` whose entries are
        ``"penalty"`` (the form, first for ``"coupled"``, last otherwise) and ``"optimizer"`` (``tx``),
        so the state reads ``opt_state["penalty"]`` and ``opt_state["optimizer"]``.
        """
        tx = _resolve(self.tx, hparams)
        if not isinstance(tx, GradientTransformation):
            raise TypeError(f"tx (or tx(hparams)) must be a GradientTransformation, got {type(tx).__name__}")
        penalty = _resolve(self.penalty, hparams)
        if penalty is not None and not isinstance(penalty, Penalty):
            raise TypeError(
                f"penalty (or penalty(hparams)) must be a funcreg penalty, got {type(penalty).__name__}"
            )
        if penalty is None or self.form == "loss":
            return tx
        if self.form == "coupled":
            return named_chain(("penalty", add_penalty_grad(penalty)), ("optimizer", tx))
        form = decoupled if self.form == "decoupled" else proximal
        return named_chain(("optimizer", tx), ("penalty", form(penalty, self._rate(hparams))))

    def _rate(self, hparams: Hyperparams) -> Any:
        """``learning_rate``, or the hyperparameter it names (one value per member in a sweep)."""
        if not isinstance(self.learning_rate, str):
            return self.learning_rate
        if self.learning_rate not in hparams:
            raise ValueError(
                f"learning_rate names hparams[{self.learning_rate!r}], which is not given "
                f"(hparams: {sorted(hparams)})"
            )
        return hparams[self.learning_rate]

    def init(
        self, params: PyTree, buffers: PyTree | None = None, hparams: Hyperparams | None = None
    ) -> TrainState:
        """The initial :class:`TrainState` for ``params`` (and ``buffers``, ``hparams``)."""
        if self.buffers and buffers is None:
            raise ValueError("this step was built with buffers=True: pass init(params, buffers)")
        if not self.buffers and buffers:
            raise ValueError("buffers given, but the step was built with buffers=False")
        hp = as_hparams(hparams, float_dtype(params))
        if self.donate:
            # a donated step writes into the state's tensors: the state owns copies, never the caller's
            # tensors (fr.params_of(model) shares storage with the module)
            params = _copy_tree(params)
            buffers = None if buffers is None else {k: v.clone() for k, v in buffers.items()}
        return TrainState(
            params, self.transform(hp).init(params), {} if buffers is None else dict(buffers), hp
        )

    def _data_loss(
        self, params: PyTree, buffers: PyTree, batch: tuple[Any, ...]
    ) -> tuple[torch.Tensor, tuple[Any, Any]]:
        """``loss_fn`` in one shape: ``(loss, (new_buffers, aux))``."""
        if self.buffers:
            out = self.loss_fn(params, buffers, *batch)
            n = 3 if self.has_aux else 2
            if not (isinstance(out, tuple) and len(out) == n):
                want = "(loss, new_buffers, aux)" if self.has_aux else "(loss, new_buffers)"
                raise TypeError(f"with buffers=True, loss_fn must return {want}")
            loss, new_buffers, aux = out if self.has_aux else (*out, None)
        else:
            out = self.loss_fn(params, *batch)
            if self.has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError("with has_aux=True, loss_fn must return (loss, aux)")
                loss, aux = out
            else:
                loss, aux = out, None
            new_buffers = buffers
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise TypeError(f"loss_fn must return a 0-d tensor loss, got {loss!r}")
        return loss, (new_buffers, aux)

    def _objective(
        self, params: PyTree, buffers: PyTree, hparams: Hyperparams, batch: tuple[Any, ...]
    ) -> tuple[torch.Tensor, Any]:
        """The training objective at ``params`` and its aux: the data loss, plus the penalty where
        the form is the loss term (then the penalty's gradient comes from autograd)."""
        penalty = _resolve(self.penalty, hparams)
        if penalty is not None and self.form == "loss":
            # the loss-term form is fr.penalized itself
            total, metrics = penalized(lambda p: self._data_loss(p, buffers, batch), penalty, has_aux=True)(
                params
            )
            new_buffers, aux = metrics.pop("aux")
            del metrics["total"]  # recomputed in __call__ for every form alike
        else:
            total, (new_buffers, aux) = self._data_loss(params, buffers, batch)
            metrics = {"data_loss": total.detach()}
        # torch.func.grad's aux may hold only tensors: aux is left out when there is none
        return total, ((metrics, new_buffers, aux) if self.has_aux else (metrics, new_buffers))

    def gradients(
        self, params: PyTree, buffers: PyTree, hparams: Hyperparams, batch: tuple[Any, ...]
    ) -> tuple[PyTree, tuple[dict[str, Any], PyTree, Any]]:
        """``grads, (metrics, new_buffers, aux)`` of the objective at ``params`` (``aux`` is ``None``
        without ``has_aux``): the first half of a step, before the transform."""
        grads, extra = torch.func.grad(self._objective, has_aux=True)(params, buffers, hparams, batch)
        return grads, (extra[0], extra[1], extra[2] if self.has_aux else None)

    def finish_metrics(self, metrics: dict[str, Any], new_opt_state: Any, aux: Any) -> dict[str, Any]:
        """The step's metrics: the penalty's report from its form's state, ``"total"``, ``"aux"``."""
        if self.penalty is not None and self.form != "loss":
            report = new_opt_state["penalty"]  # the step's own form (tx itself may hold other forms)
            assert isinstance(report, PenaltyState)
            metrics.update(penalty_metrics(report.terms))
        if "penalty" in metrics:
            metrics["total"] = metrics["data_loss"] + metrics["penalty"]
        if self.has_aux:
            metrics["aux"] = aux
        return metrics

    def __call__(self, train_state: TrainState, *batch: Any) -> tuple[TrainState, dict[str, Any]]:
        """One step: gradients by ``torch.func.grad``, the transform, ``apply_updates``."""
        if not isinstance(train_state, TrainState):
            raise TypeError(f"step expects a TrainState (from step.init), got {type(train_state).__name__}")
        params, opt_state, buffers, hparams = train_state
        grads, (metrics, new_buffers, aux) = self.gradients(params, buffers, hparams, batch)
        tx = self.transform(hparams)
        tracked = self.donate and not compiling() and not _is_vmapped(params)
        if self.donate:
            if tracked:
                check_donatable("params", params, unique=True)
                check_donatable("opt_state", opt_state)
                # the gradients are this step's own (torch.func.grad): only params and state can alias
                if not self._donations.is_latest(train_state):
                    self._overlap.check(params, opt_state, names=("params", "opt_state"))
                self._donations.consume(train_state)  # last: a step refused above consumed nothing
            # not differentiable (it overwrites what autograd would need): see donated_update
            new_params, new_opt_state = donated_step(tx, grads, opt_state, params)
        else:
            updates, new_opt_state = tx.update(grads, opt_state, params)
            new_params = apply_updates(params, updates)
        metrics = self.finish_metrics(metrics, new_opt_state, aux)
        if self.report_sparsity:
            metrics.update(sparsity_metrics(new_params, _resolve(self.penalty, hparams)))
        out = TrainState(new_params, new_opt_state, new_buffers, hparams)
        if tracked:
            self._donations.produce(out)
        return out, metrics


def sparsity_metrics(params: PyTree, penalty: Penalty | None) -> dict[str, torch.Tensor]:
    """The fraction of exact zeros reached, as 0-d float64 tensors: ``"sparsity"`` over the
    parameters ``penalty`` selects (every parameter without one), weighted by size, and
    ``"sparsity/<name>"`` per selected parameter. Tensor ops only: it runs under vmap and compile."""
    fp = FlatParams.of(params)
    chosen = penalty.selected_flat(fp) if penalty is not None else [True] * len(fp.names)
    out: dict[str, torch.Tensor] = {}
    zeros: list[torch.Tensor] = []
    total = 0
    for name, w, picked in zip(fp.names, fp.leaves, chosen):
        if w is None or not picked or w.numel() == 0:
            continue
        z = (w == 0).sum(dtype=torch.float64)
        out[f"sparsity/{name}"] = z / w.numel()
        zeros.append(z)
        total += w.numel()
    if not zeros:
        raise ValueError("report_sparsity: the penalty selects no parameter (nothing to report)")
    return {"sparsity": torch.stack(zeros).sum() / total, **out}


def _is_vmapped(params: PyTree) -> bool:
    """Inside fr.ensemble_step's vmap each call sees a new state object: the ensemble tracks it."""
    leaves, _ = flatten(params)
    return any(
        isinstance(x, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x) for x in leaves
    )


def _copy_tree(tree: PyTree) -> PyTree:
    leaves, spec = flatten(tree)
    return unflatten([x.detach().clone() if isinstance(x, torch.Tensor) else x for x in leaves], spec)


def make_step(
    loss_fn: Callable[..., Any],
    tx: TransformLike,
    penalty: PenaltyLike = None,
    form: Form = "loss",
    learning_rate: None | str | ScalarOrSchedule = None,
    has_aux: bool = False,
    buffers: bool = False,
    donate: bool = False,
    report_sparsity: bool = False,
) -> Step:
    """Builds a pure training step ``step(train_state, *batch) -> (train_state, metrics)``.

    Args:
        loss_fn: ``loss_fn(params, *batch) -> loss`` (``(loss, aux)`` with ``has_aux``); with
            ``buffers=True``, ``loss_fn(params, buffers, *batch) -> (loss, new_buffers)`` (see
            :func:`functional_model`).
        tx: a transform, or a factory ``hparams -> transform`` (for sweeps: hyperparameters then live
            in the :class:`TrainState`, one value per ensemble member).
        penalty: ``None``, a penalty, or a factory ``hparams -> penalty``.
        form: how the penalty is applied: ``"loss"`` (added to the loss, differentiated by
            autograd), ``"coupled"`` (``add_penalty_grad`` before ``tx``), ``"decoupled"``
            (``decoupled(P, learning_rate)`` after ``tx``) or ``"proximal"``
            (``proximal(P, learning_rate)`` after ``tx``).
        learning_rate: ``s_t`` for the decoupled and proximal forms (required for ``"proximal"``): a
            float, a schedule, or the name of a hyperparameter (``"lr"`` for ``hparams["lr"]``, so a
            learning-rate sweep also scales each member's penalty step). The loss and coupled forms
            do not use it, so one call can loop over all four forms.
        has_aux: ``loss_fn`` also returns auxiliary output, reported as ``metrics["aux"]``.
        buffers: the model has buffers carried in the state.
        donate: each step writes the new parameters and optimizer state into the tensors of the state
            it is given (as ``torch.optim`` does) instead of allocating new ones; results are those of
            the pure step. ``init`` then copies the parameters (the state owns its tensors), and a
            state that a step consumed must not be stepped again (``ValueError``): use the returned
            one. Refused where autograd needs the old values (differentiating through the step).
        report_sparsity: add the sparsity reached after each step to the metrics: ``"sparsity"``,
            the fraction of exact zeros over the parameters the penalty selects (all of them without
            a penalty), and ``"sparsity/<name>"`` per selected parameter (for a sparsity target:
            what a proximal step reached, step by step). One pass over the selected parameters.

    ``metrics`` always holds ``"data_loss"`` and, with a penalty in any form, ``"penalty"``,
    ``"penalty/<term>"`` and ``"total"`` (for the gradient-edit forms computed without autograd, at the
    parameters the step starts from).

    Examples:
        >>> import torch, funcreg as fr
        >>> loss = lambda p, x: ((p["w"] * x).sum() - 1.0) ** 2
        >>> step = fr.make_step(loss, fr.sgd(0.1), penalty=fr.l1(0.01), form="proximal", learning_rate=0.1)
        >>> state = step.init({"w": torch.ones(2)})
        >>> state, metrics = step(state, torch.tensor([0.5, 0.5]))
        >>> sorted(metrics)
        ['data_loss', 'penalty', 'penalty/l1', 'total']
    """
    if not callable(loss_fn):
        raise TypeError(f"make_step expects a callable loss_fn, got {loss_fn!r}")
    if not (isinstance(tx, GradientTransformation) or callable(tx)):
        raise TypeError(f"tx must be a GradientTransformation or a factory hparams -> transform, got {tx!r}")
    if penalty is not None and not (isinstance(penalty, Penalty) or callable(penalty)):
        raise TypeError(f"penalty must be a funcreg penalty or a factory hparams -> penalty, got {penalty!r}")
    if form not in FORMS:
        raise ValueError(f"Invalid form value: {form!r} (expected one of {FORMS})")
    if form == "proximal" and learning_rate is None:
        raise ValueError("form='proximal' needs learning_rate (the step size s_t of the prox)")
    if penalty is None and form != "loss":
        raise ValueError(f"form={form!r} needs a penalty")
    if learning_rate is not None and not isinstance(learning_rate, str):
        check_rate("learning_rate", learning_rate)
    check_bool("has_aux", has_aux)
    check_bool("buffers", buffers)
    check_bool("donate", donate)
    check_bool("report_sparsity", report_sparsity)
    return Step(loss_fn, tx, penalty, form, learning_rate, has_aux, buffers, donate, report_sparsity)
