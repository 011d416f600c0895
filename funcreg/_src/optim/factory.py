"""One line from a model to an optimizer: :func:`create_optimizer` and :func:`create_transform`.

In the spirit of timm's ``create_optimizer_v2``: a name, a learning rate, a weight decay, and the
decay selection (``fr.decay_mask(model)`` unless told otherwise) applied and printable. The names
are a table, ``OPTIMIZERS`` (:mod:`funcreg._src.optim.table`: adding an optimizer is adding an
entry there); :func:`build_transform` composes an entry with weight decay and a penalty.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import nn

from funcreg._src.combinators.combine import chain

# the names imported `as` themselves were defined here before factory_names was split off: they
# are re-exported, so that their old import path keeps working
from funcreg._src.core.base import GradientTransformation
from funcreg._src.core.tree import tree_names
from funcreg._src.core.typing import MaskLike, ScalarOrSchedule
from funcreg._src.core.validation import check_number
from funcreg._src.forms.forms import add_penalty_grad, decoupled, proximal
from funcreg._src.optim.table import FORMS as FORMS
from funcreg._src.optim.table import OPTIMIZERS as OPTIMIZERS
from funcreg._src.optim.table import OptimizerSpec as OptimizerSpec
from funcreg._src.optim.table import _check_hyperparameters as _check_hyperparameters
from funcreg._src.optim.table import _register as _register
from funcreg._src.optim.table import _torch_like as _torch_like
from funcreg._src.optim.table import optimizer_spec as optimizer_spec
from funcreg._src.penalties import Penalty, l2
from funcreg._src.selection.named_params import named_parameters
from funcreg._src.selection.resolve import Selection, decay_mask, resolve_mask
from funcreg._src.transforms.basic import add_decayed_weights, decoupled_weight_decay, scale


def build_transform(
    spec: OptimizerSpec,
    lr: ScalarOrSchedule,
    weight_decay: Any = 0.0,
    mask: MaskLike | None = None,
    penalty: Penalty | None = None,
    form: str | None = None,
    maximize: bool = False,
    **hyperparameters: Any,
) -> GradientTransformation:
    """The optimizer ``spec`` with weight decay (restricted to ``mask``) and a penalty in ``form``.

    ``form`` (default: the optimizer's own, ``spec.form``) places both: ``"coupled"`` first in the
    chain (torch's SGD/Adam ``weight_decay=``), ``"decoupled"`` after the learning-rate scaling,
    scaled by the learning rate (torch's AdamW), ``"proximal"`` last, as a proximal step of size
    ``lr``. Where the result is exactly a torch.optim optimizer, its fused funcreg alias is used.
    """
    form = spec.form if form is None else form
    if form == "loss":
        raise ValueError(
            "form='loss' adds the penalty to the loss, which an optimizer cannot do: use "
            "fr.make_step(loss_fn, tx, penalty=..., form='loss') or fr.penalized(loss_fn, penalty)"
        )
    if form not in FORMS:
        raise ValueError(f"Invalid form value: {form!r} (expected one of {', '.join(map(repr, FORMS))})")
    if penalty is not None and not isinstance(penalty, Penalty):
        raise TypeError(
            f"penalty must be a funcreg penalty (fr.l1(...), fr.l2(...), ...), got {type(penalty).__name__}"
        )
    check_number("weight_decay", weight_decay, low=0.0)
    hp = _check_hyperparameters(spec, hyperparameters)
    has_decay = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)
    if (
        spec.fused is not None
        and form == spec.form
        and penalty is None
        and (mask is None or not has_decay or spec.extra.get("fused_takes_mask", False))
    ):
        if spec.extra.get("fused_takes_mask", False):
            return spec.fused(lr, weight_decay, maximize, mask=mask, **hp)
        return spec.fused(lr, weight_decay, maximize, **hp)
    parts: list[GradientTransformation] = []
    if maximize:
        parts.append(scale(-1.0))
    if form == "coupled":
        if has_decay:
            parts.append(add_decayed_weights(weight_decay, mask=mask))
        if penalty is not None:
            parts.append(add_penalty_grad(penalty))
    parts.append(spec.base(lr, **hp))
    if form == "decoupled":
        if has_decay:
            parts.append(decoupled_weight_decay(weight_decay, lr, mask=mask, scale_by="learning_rate"))
        if penalty is not None:
            parts.append(decoupled(penalty, learning_rate=lr))
    elif form == "proximal":
        total = penalty
        if has_decay:
            decay_term = l2(weight_decay, mask=mask, name="weight_decay")
            total = decay_term if total is None else decay_term + total
        if total is not None:
            parts.append(proximal(total, lr))
    return parts[0] if len(parts) == 1 else chain(*parts)


def group_factory(name: str) -> tuple[Callable[..., GradientTransformation], dict[str, Any]]:
    """The factory of a group's options for ``TorchOptimizer(params, name)``, and its default options."""
    spec = optimizer_spec(name)

    def factory(
        lr: float,
        weight_decay: float = spec.weight_decay,
        penalty: Penalty | None = None,
        form: str | None = None,
        mask: MaskLike | None = None,
        maximize: bool = False,
        **options: Any,
    ) -> GradientTransformation:
        hyper = {k: v for k, v in options.items() if k in spec.hyperparameters}
        return build_transform(spec, lr, weight_decay, mask, penalty, form, maximize, **hyper)

    factory.__name__ = f"{spec.name}_group_factory"
    defaults = {"lr": spec.lr, "weight_decay": spec.weight_decay, **spec.hyperparameters, "maximize": False}
    return factory, defaults


def _names_and_tree(model_or_params: Any) -> tuple[Any, list[tuple[str, torch.Tensor]]]:
    if isinstance(model_or_params, nn.Module):
        return model_or_params, named_parameters(model_or_params)
    items = list(model_or_params.items()) if isinstance(model_or_params, Mapping) else list(model_or_params)
    if items and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items):
        return dict(items), items
    if items and all(isinstance(x, torch.Tensor) for x in items):
        named = [(str(i), p) for i, p in enumerate(items)]
        return dict(named), cast("list[tuple[str, torch.Tensor]]", named)  # all tensors, checked above
    raise TypeError(
        "create_optimizer expects a module, a dict {name: tensor}, (name, tensor) pairs or tensors; for "
        "param-group dicts use fr.TorchOptimizer(groups, name, lr=...)"
    )


def _selection(decay: Any, source: Any, names: list[str], weight_decay: Any) -> Selection | None:
    """The decay selection as a :class:`Selection` over ``names`` (``None``: no decay at all)."""
    if decay is None:
        try:
            return decay_mask(source)
        except ValueError:
            if isinstance(weight_decay, (int, float)) and weight_decay == 0:
                return None  # nothing to decay and no decay asked for: one group, as torch's default
            raise
    if decay is True:
        return Selection({n: True for n in names}, reasons={n: "decay=True" for n in names}, label="decay")
    if decay is False:
        return Selection({n: False for n in names}, reasons={n: "decay=False" for n in names}, label="decay")
    if isinstance(decay, Selection):
        decay.resolve({n: None for n in names})  # every name present, no extra: raises otherwise
        return decay
    tree = {
        n: p.detach()
        for n, p in (named_parameters(source) if isinstance(source, nn.Module) else source.items())
    }
    produced = decay(source) if callable(decay) else decay
    if isinstance(produced, Selection):
        produced.resolve(tree)
        return produced
    keep = resolve_mask(produced, tree, "decay")
    return Selection(
        dict(zip(tree_names(tree), keep)), reasons={n: "decay mask" for n in names}, label="decay"
    )


def create_optimizer(
    model_or_params: Any,
    name: str = "adamw",
    lr: float | None = None,
    weight_decay: float | None = None,
    *,
    decay: Any = None,
    penalty: Penalty | None = None,
    form: str | None = None,
    **hyperparameters: Any,
) -> Any:
    """A ready :class:`funcreg.TorchOptimizer` in one line: ``fr.create_optimizer(model, "adamw", lr=1e-3)``.

    The parameters are split into two param groups, ``"decay"`` (the decay selection, with
    ``weight_decay``) and ``"no_decay"`` (``weight_decay=0.0``), as the HF ``Trainer`` and timm build
    them, so schedulers and per-group weight-decay schedules work as with torch.optim. The selection
    is ``opt.selection`` (``print(opt.selection)`` shows the rule for each parameter).

    Decay sets differ by entry, on purpose: ``fr.TorchOptimizer(params, "adamw", weight_decay=wd)``
    keeps torch's rule (every parameter of a group with ``weight_decay > 0``, biases and norm
    parameters too), this function applies the selection; ``print(opt)`` says which. A group added
    later (``opt.add_param_group``, as Lightning's ``BackboneFinetuning`` does) follows torch's rule:
    its own ``weight_decay``, else this optimizer's default ``weight_decay`` for all its parameters
    (give it ``"weight_decay": 0.0``, or two groups, to keep biases and norms undecayed).

    Args:
        model_or_params: a module (recommended: names, types and ``model.no_weight_decay()`` inform
            the selection), a dict ``{name: tensor}``, ``(name, tensor)`` pairs or tensors.
        name: an optimizer of the table: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"adamax"``, ``"nadam"``,
            ``"radam"``, ``"rmsprop"``, ``"adagrad"``, ``"adadelta"``, ``"lion"`` (case-insensitive; a typo
            raises with a suggestion).
        lr: the learning rate (default: torch's, 1e-3).
        weight_decay: the decay coefficient with torch's meaning for ``name`` (coupled L2 for SGD and
            Adam, decoupled ``w <- w - lr * wd * w`` for AdamW); default torch's (0, 0, 1e-2).
        decay: which parameters to decay: default ``fr.decay_mask(model)``; a selection, a selector
            (``fr.by_module(nn.Linear)``), a bool tree, or ``True`` (all, as torch.optim does).
        penalty: another funcreg penalty (``fr.l1(1e-5)``, ...), applied as given (its own ``mask``),
            in ``form``.
        form: where weight decay and the penalty go: ``"coupled"`` (first, added to the gradient),
            ``"decoupled"`` (after the learning-rate scaling, times the lr) or ``"proximal"`` (a
            proximal step of size lr, last); default: what ``weight_decay`` means for ``name`` in torch.
        **hyperparameters: the optimizer's other arguments (``momentum``, ``nesterov``, ``dampening``
            for SGD; ``betas``, ``eps``, ``amsgrad`` for Adam/AdamW; ``maximize``).

    Returns:
        A :class:`funcreg.TorchOptimizer` whose groups carry every option (``lr``, ``weight_decay``,
        ``betas``/``momentum``, ...), so ``OneCycleLR(cycle_momentum=True)`` works.

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))
        >>> opt = fr.create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05)
        >>> [(g["name"], g["param_names"], g["weight_decay"]) for g in opt.param_groups]  # doctest: +NORMALIZE_WHITESPACE
        [('decay', ['0.weight', '2.weight'], 0.05),
         ('no_decay', ['0.bias', '1.weight', '1.bias', '2.bias'], 0.0)]
        >>> opt.selection.selected
        ['0.weight', '2.weight']
        >>> fr.create_optimizer(model, "adamm")
        Traceback (most recent call last):
            ...
        ValueError: unknown optimizer 'adamm' (did you mean 'adam', 'radam', 'nadam'? known: adadelta, adagrad, adam, adamax, adamw, lion, nadam, radam, rmsprop, sgd)
    """
    from funcreg._src.torch_optimizer.optimizer import TorchOptimizer

    spec = optimizer_spec(name)
    lr = spec.lr if lr is None else lr
    weight_decay = spec.weight_decay if weight_decay is None else weight_decay
    hp = _check_hyperparameters(spec, {k: v for k, v in hyperparameters.items() if k != "maximize"})
    maximize = hyperparameters.get("maximize", False)
    # build one transform now, so that a bad value raises here with the argument's name
    build_transform(spec, lr, weight_decay, None, penalty, form, maximize, **hp)
    source, named = _names_and_tree(model_or_params)
    names = [n for n, _ in named]
    selection = _selection(decay, source, names, weight_decay)
    factory, _ = group_factory(spec.name)
    options: dict[str, Any] = {"weight_decay": weight_decay, **hp, "maximize": maximize}
    if penalty is not None:
        options["penalty"] = penalty
    if form is not None:
        options["form"] = form
    if selection is None or all(selection.values()):
        groups: list[dict[str, Any]] = [
            {"params": named, "name": "decay" if selection is not None else "all"}
        ]
    else:
        groups = [
            {"params": [(n, p) for n, p in named if selection[n]], "name": "decay"},
            {
                "params": [(n, p) for n, p in named if not selection[n]],
                "name": "no_decay",
                "weight_decay": 0.0,
            },
        ]
        if not groups[0]["params"]:
            groups = groups[1:]
    opt = TorchOptimizer(groups, factory, lr=lr, **options)
    opt._fr_name = spec.name
    opt.selection = selection
    return opt


def create_transform(
    model_or_params: Any,
    name: str = "adamw",
    lr: ScalarOrSchedule | None = None,
    weight_decay: float | None = None,
    *,
    decay: Any = None,
    penalty: Penalty | None = None,
    form: str | None = None,
    **hyperparameters: Any,
) -> GradientTransformation:
    """The functional twin of :func:`create_optimizer`: the same optimizer as one transform.

    Arguments are those of :func:`create_optimizer`; ``lr`` may also be a funcreg schedule. The
    weight decay is restricted to the decay selection by a mask (``fr.decay_mask(model)`` by
    default; ``fr.decay_mask(model)`` prints it). The transform works on the tree
    ``fr.params_of(model)`` (or the dict given).

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))
        >>> tx = fr.create_transform(model, "sgd", lr=0.1, weight_decay=1e-2, momentum=0.9)
        >>> params = fr.params_of(model)
        >>> updates, state = tx.update({k: torch.zeros_like(v) for k, v in params.items()}, tx.init(params), params)
        >>> torch.equal(updates["1.weight"], torch.zeros(4))  # a LayerNorm weight: not decayed
        True
    """
    spec = optimizer_spec(name)
    lr = spec.lr if lr is None else lr
    weight_decay = spec.weight_decay if weight_decay is None else weight_decay
    maximize = hyperparameters.pop("maximize", False)
    source, named = _names_and_tree(model_or_params)
    selection = _selection(decay, source, [n for n, _ in named], weight_decay)
    mask: Selection | None = None if selection is None or all(selection.values()) else selection
    return build_transform(spec, lr, weight_decay, mask, penalty, form, maximize, **hyperparameters)
