"""One line from a model to a transform: :func:`create_transform`, and the pieces
:func:`funcreg._src.torch_optimizer.create.create_optimizer` shares with it.

In the spirit of timm's ``create_optimizer_v2``: a name, a learning rate, a weight decay, and the
decay selection (``fr.decay_mask(model)`` unless told otherwise) applied and printable. The names
are a table, ``OPTIMIZERS`` (:mod:`funcreg._src.optim.table`: adding an optimizer is adding an
entry there); :func:`build_transform` composes an entry with weight decay and a penalty.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

from funcreg._src.combinators.combine import chain
from funcreg._src.core.base import GradientTransformation
from funcreg._src.core.tree import tree_names
from funcreg._src.core.typing import ScalarOrSchedule
from funcreg._src.core.validation import check_rate, is_schedule
from funcreg._src.forms.forms import add_penalty_grad, decoupled, proximal
from funcreg._src.optim.table import FORMS, OptimizerSpec, _check_hyperparameters, optimizer_spec
from funcreg._src.penalties import Penalty, l2
from funcreg._src.selection.decay_mask import decay_mask
from funcreg._src.selection.named_params import named_parameters
from funcreg._src.selection.resolve import MaskLike, resolve_mask
from funcreg._src.selection.table import Selection
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
    check_rate("weight_decay", weight_decay)
    if form == "proximal" and is_schedule(weight_decay):
        raise ValueError(
            "Invalid weight_decay value: a schedule with form='proximal' (the decay becomes the coefficient of "
            "an l2 penalty, a number): use form='coupled' or 'decoupled', or fr.inject_hyperparams to change it"
        )
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


def group_transform(
    spec: OptimizerSpec,
    lr: float,
    weight_decay: float | None = None,
    penalty: Penalty | None = None,
    form: str | None = None,
    mask: MaskLike | None = None,
    maximize: bool = False,
    **options: Any,
) -> GradientTransformation:
    """The transform of a ``TorchOptimizer(params, name)`` param group from its options: the table's
    entry ``spec`` with the group's ``lr``, ``weight_decay``, penalty and hyperparameters (other keys
    a scheduler or torch put into the group are not the optimizer's and are left out)."""
    weight_decay = spec.weight_decay if weight_decay is None else weight_decay
    hyper = {k: v for k, v in options.items() if k in spec.hyperparameters}
    return build_transform(spec, lr, weight_decay, mask, penalty, form, maximize, **hyper)


def group_defaults(spec: OptimizerSpec) -> dict[str, Any]:
    """The options every group of a ``TorchOptimizer(params, name)`` starts from: torch's defaults."""
    return {"lr": spec.lr, "weight_decay": spec.weight_decay, **spec.hyperparameters, "maximize": False}


def names_and_tree(model_or_params: Any) -> tuple[Any, list[tuple[str, torch.Tensor]]]:
    """The source the decay selection reads (the module, or a dict of the tensors) and the named parameters."""
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


def decay_selection(decay: Any, source: Any, names: list[str], weight_decay: Any) -> Selection | None:
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


def create_transform(
    model_or_params: Any,
    name: str = "adamw",
    lr: ScalarOrSchedule | None = None,
    weight_decay: ScalarOrSchedule | None = None,
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
    source, named = names_and_tree(model_or_params)
    selection = decay_selection(decay, source, [n for n, _ in named], weight_decay)
    mask: Selection | None = None if selection is None or all(selection.values()) else selection
    return build_transform(spec, lr, weight_decay, mask, penalty, form, maximize, **hyperparameters)
