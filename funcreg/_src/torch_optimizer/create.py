"""One line from a model to a :class:`funcreg.TorchOptimizer`: :func:`create_optimizer`."""

from __future__ import annotations

from typing import Any

from funcreg._src.optim.factory import build_transform, decay_selection, names_and_tree
from funcreg._src.optim.table import _check_hyperparameters, optimizer_spec
from funcreg._src.penalties import Penalty
from funcreg._src.torch_optimizer.optimizer import TorchOptimizer

__all__ = ["create_optimizer"]


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
) -> TorchOptimizer:
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
    spec = optimizer_spec(name)
    lr = spec.lr if lr is None else lr
    weight_decay = spec.weight_decay if weight_decay is None else weight_decay
    hp = _check_hyperparameters(spec, {k: v for k, v in hyperparameters.items() if k != "maximize"})
    maximize = hyperparameters.get("maximize", False)
    # build one transform now, so that a bad value raises here with the argument's name
    build_transform(spec, lr, weight_decay, None, penalty, form, maximize, **hp)
    source, named = names_and_tree(model_or_params)
    names = [n for n, _ in named]
    selection = decay_selection(decay, source, names, weight_decay)
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
    opt = TorchOptimizer(groups, spec.name, lr=lr, **options)
    opt.selection = selection
    return opt
