"""``TorchOptimizer``: a real ``torch.optim.Optimizer`` that drives funcreg transforms from ``.grad``.

For imperative training loops, and for frameworks that expect an ``Optimizer`` (Lightning, the
Hugging Face ``Trainer``, accelerate, ``torch.distributed.checkpoint``). It follows torch.optim's
protocol: parameter groups with their own options, ``add_param_group``, options read at every step
(so schedulers of ``lr``, ``weight_decay``, ``momentum`` and ``betas`` work), ``optimizer.state[p]``
per parameter, ``state_dict()`` in torch's format, and torch's hooks. Each group runs its own
transform, built from the group's options by a factory; together they are
``fr.partition({"0": tx_0, "1": tx_1, ...}, labels)`` with each parameter labelled by its group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch

from funcreg._src.combinators.combine import PartitionState

# the names imported `as` themselves were defined here before the torch_optimizer_* modules split
# this one: they are re-exported, so that their old import path keeps working
from funcreg._src.core.aliasing import OverlapCheck
from funcreg._src.core.base import GradientTransformation
from funcreg._src.core.describe import compiling
from funcreg._src.core.validation import check_rate
from funcreg._src.kernels.update import donated_step
from funcreg._src.torch_optimizer.build import _Built as _Built
from funcreg._src.torch_optimizer.build import _factory_signature
from funcreg._src.torch_optimizer.build import _same as _same
from funcreg._src.torch_optimizer.build import _snapshot as _snapshot
from funcreg._src.torch_optimizer.groups import _BOOKKEEPING as _BOOKKEEPING
from funcreg._src.torch_optimizer.groups import _FIXED_LR_MESSAGE as _FIXED_LR_MESSAGE
from funcreg._src.torch_optimizer.groups import WATCHED as WATCHED
from funcreg._src.torch_optimizer.groups import _as_groups, _short
from funcreg._src.torch_optimizer.groups import _param_items as _param_items
from funcreg._src.torch_optimizer.state_dict import _plain as _plain
from funcreg._src.torch_optimizer.state_dict import _saved, _StateDictLoading

TransformOrFactory = Union[GradientTransformation, Callable[..., GradientTransformation], str]


def _lr_as_learning_rate(
    factory: Callable[..., GradientTransformation],
) -> Callable[..., GradientTransformation]:
    def with_lr(**options: Any) -> GradientTransformation:
        if "lr" in options:
            options["learning_rate"] = options.pop("lr")
        return factory(**options)

    with_lr.__name__ = getattr(factory, "__name__", "factory")
    return with_lr


class TorchOptimizer(_StateDictLoading):
    """A ``torch.optim.Optimizer`` that runs a funcreg transform per parameter group.

    Args:
        params: ``model.named_parameters()`` (recommended: masks such as ``fr.decay_mask(model)`` match
            by name), a module, plain tensors (named ``"0"``, ``"1"``, ... by position), or a list of
            param-group dicts ``[{"params": [...], "weight_decay": 0.0}, ...]`` as torch.optim takes them
            (HF ``Trainer``, timm's ``param_groups_weight_decay``).
        tx: a factory of a group's options, e.g.
            ``lambda lr, weight_decay=0.0, **rest: fr.adamw(lr, weight_decay=weight_decay)``, or a funcreg
            factory itself (``fr.adamw``: its ``learning_rate`` is the groups' ``lr``, the name torch's
            schedulers drive, and ``learning_rate=`` here is taken as ``lr=``); a transform
            with its hyperparameters built in (no options, one transform per group); or the name of
            a :func:`funcreg.create_optimizer` optimizer (``"adamw"``), whose factory takes ``lr``,
            ``weight_decay``, ``betas``/``momentum``, ``eps``, ``penalty``, ``form`` and ``mask``. By
            name, decay follows torch's rule (every parameter of a group with ``weight_decay > 0``);
            :func:`funcreg.create_optimizer` applies ``fr.decay_mask`` instead (``print(opt)`` says which).
        lr: the default learning rate of every group (an option like the others below).
        names_from: the module the parameters come from, to name unnamed parameters by their
            ``named_parameters()`` names (HF ``Trainer`` and timm hand plain tensors): masks by name
            then match. An unnamed parameter the module does not hold raises ``ValueError``. (Not
            ``model=``: the HF Trainer takes a ``"model"`` entry of its optimizer kwargs as the
            parameters themselves, and its decay groups would be lost.)
            It names the constructor's groups; ``add_param_group`` takes ``(name, tensor)`` pairs.
        **options: the default options of every group (``weight_decay=0.1``, ``betas=(0.9, 0.999)``, ...).

    Options. Each group's options are the constructor's (its defaults) plus the keys given in its
    dict. The factory is called with them as keyword arguments (those it accepts, or all with
    ``**kwargs``) to build the group's transform, and rebuilt at the next step when a group's option
    changes (``group["lr"] = ...`` by a scheduler, ``group["weight_decay"] = ...`` by a weight-decay
    schedule, ``betas``/``momentum`` by ``OneCycleLR``). The state is kept when its structure is
    unchanged, as torch does; when an option changes the structure (``weight_decay`` from 0 to 0.1
    adds a link to ``fr.sgd``'s chain), each sub-state that still fits is carried over, new ones start
    fresh, and one whose own structure changed (``amsgrad``) raises. Options that change what an
    optimizer does (``lr``, ``weight_decay``, ``momentum``, ``betas``, ``eps``, ``penalty``, ``form``,
    ``mask``, ...) raise rather than being ignored where the factory does not receive them.

    Semantics. Each group's transform sees the whole parameter tree with ``None`` for the
    parameters of other groups (exactly ``fr.partition``), so a mask over the whole model works in
    any group, and a whole-tree transform such as ``fr.clip_by_global_norm`` acts per group.
    Parameters whose ``.grad`` is ``None`` are skipped. A parameter may appear once only
    (``ValueError``; torch.optim would step it twice).

    State. ``optimizer.state[p]`` holds each parameter's state under torch.optim's names where they
    exist (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``, ``step``) and the
    field names of funcreg's states otherwise; a group's own entries (the transform's update
    ``count``, a penalty's ``value``) are stored in the dict of each of its parameters. It is the
    source of truth: a state moved or replaced there is the one used at the next step.
    ``state_dict()`` is torch's format (``{"state": {index: {...}}, "param_groups": [...]}``, plain
    tensors and numbers, ``torch.load(weights_only=True)`` reads it; options that are Python objects,
    such as a mask or a penalty, are left out and kept from the optimizer on loading);
    ``load_state_dict`` refuses a state of another transform, shape or dtype, naming the key.

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.Linear(2, 1)
        >>> groups = [{"params": [model.weight], "weight_decay": 0.1}, {"params": [model.bias], "weight_decay": 0.0}]
        >>> opt = fr.TorchOptimizer(groups, lambda lr, weight_decay: fr.adamw(lr, weight_decay=weight_decay), lr=0.01)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> opt.step(); sched.step()
        >>> opt.param_groups[0]["lr"], sorted(opt.state[model.weight])
        (0.005, ['count', 'exp_avg', 'exp_avg_sq', 'step'])
    """

    def __init__(
        self,
        params: Any,
        tx: TransformOrFactory,
        lr: Any | None = None,
        *,
        names_from: torch.nn.Module | None = None,
        **options: Any,
    ) -> None:
        # the types of the _fr_ attributes are declared on the bases (_GroupOptions, _GroupBuilds)
        if names_from is not None and not isinstance(names_from, torch.nn.Module):
            raise TypeError(f"names_from must be a torch.nn.Module, got a {type(names_from).__name__}")
        self._fr_model_names = (
            None if names_from is None else {id(p): n for n, p in names_from.named_parameters()}
        )
        self._fr_fixed = None
        self._fr_factory = None
        self._fr_name: str | None = None
        if isinstance(tx, str):
            from funcreg._src.optim.factory import group_factory

            self._fr_name = tx
            tx, table_defaults = group_factory(tx)
            table_lr = table_defaults.pop("lr")
            lr = table_lr if lr is None else lr
            options = {**table_defaults, **options}
        if isinstance(tx, GradientTransformation):
            if lr is not None:
                raise ValueError(
                    "lr is for a factory of options -> transform; this transform has its learning rate built in"
                )
            if options:
                raise ValueError(
                    f"options {sorted(options)} are for a factory of options -> transform; this transform has "
                    "its hyperparameters built in (pass a factory to have them in the param groups)"
                )
            self._fr_fixed = tx
            # a fixed transform reports nan as its lr, so that a scheduler changing it is detected
            defaults: dict[str, Any] = {"lr": float("nan")}
            self._fr_accepted = frozenset()
            self._fr_required = frozenset()
        elif callable(tx):
            self._fr_factory = tx
            self._fr_accepted, self._fr_required = _factory_signature(tx)
            if (
                self._fr_accepted is not None
                and "learning_rate" in self._fr_accepted
                and "lr" not in self._fr_accepted
            ):
                # funcreg's own factories (fr.adamw, fr.sgd, ...) say learning_rate: the groups say lr, as
                # torch's schedulers expect, and the factory receives it under its own name
                self._fr_factory = _lr_as_learning_rate(tx)
                self._fr_accepted = (self._fr_accepted - {"learning_rate"}) | {"lr"}
                self._fr_required = frozenset("lr" if k == "learning_rate" else k for k in self._fr_required)
                if "learning_rate" in options:
                    if lr is not None:
                        raise TypeError("give the learning rate once: lr= or learning_rate=, not both")
                    lr = options.pop("learning_rate")
            defaults = {}
            if lr is not None:
                check_rate("lr", lr)
                defaults["lr"] = lr
            defaults.update(options)
        else:
            raise TypeError(
                f"tx must be a GradientTransformation, a factory of a group's options -> transform, or an "
                f"optimizer name such as 'adamw'; got {tx!r}"
            )
        self._fr_option_keys = []
        self._fr_built = []
        self._fr_written = {}
        # donated steps write into the parameters and the state: none may share memory with another
        self._fr_overlap_all = OverlapCheck()
        self._fr_apart: Any = None  # the parameters (ids, addresses) last found apart
        self._fr_overlaps: dict[int, OverlapCheck] = {}
        self.selection: Any = None
        """The decay selection this optimizer applies, when :func:`funcreg.create_optimizer` made it."""
        # the groups' transforms are built once every group is in: a mask over the whole model (a
        # Selection) fits the whole tree only
        self._fr_constructing = True
        super().__init__(_as_groups(params), defaults)
        self._fr_constructing = False
        self._fr_model_names = None  # ids go stale once the optimizer is copied: later groups come named
        for g, group in enumerate(self.param_groups):
            if group["params"]:
                built = self._prepare(g)
                self._write(g, built, self._read(g, built))

    # ------------------------------------------------------------------------------------------------
    # adding a group

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a parameter group (torch.optim's ``add_param_group``), with its options and fresh state.

        ``param_group["params"]`` takes what the constructor takes: tensors, ``(name, tensor)`` pairs or
        a module. Unnamed parameters are named by their position in the optimizer. A parameter that is
        already in the optimizer, or twice in the group, raises ``ValueError``.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got a {type(param_group).__name__}")
        g = len(self.param_groups)
        group = dict(param_group)
        named = self._named_params(group, g)
        user_keys = [k for k in group if k not in ("params", "param_names")]
        group.pop("param_names", None)
        group["params"] = named  # torch stores the names as param_names
        super().add_param_group(group)
        self._fr_option_keys.append(tuple(dict.fromkeys([*self.defaults, *user_keys])))
        self._fr_built.append(None)
        try:
            if self.param_groups[g]["params"] and not self._fr_constructing:
                built = self._prepare(g)
                self._write(g, built, self._read(g, built))
            else:
                self._check_options(g)
        except BaseException:
            self.param_groups.pop()
            self._fr_option_keys.pop()
            self._fr_built.pop()
            raise

    # ------------------------------------------------------------------------------------------------
    # the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Runs ``closure`` (if given, with grad enabled), then one update of each group from ``.grad``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        eager = (
            not compiling()
        )  # under torch.compile the memory checks ran when it traced eagerly, or not at all
        if eager:
            self._check_parameters_apart()
        for g, group in enumerate(self.param_groups):
            if not group["params"]:
                continue
            built = self._prepare(g)
            state = self._read(g, built)
            params, grads = self._trees(g, built.names, grads=True)
            if eager:
                overlap = self._fr_overlaps.setdefault(g, OverlapCheck())
                overlap.check(dict(zip(self._group_names(g), group["params"])), state, grads)
            # the optimizer owns its parameters and state, as torch.optim does: a donated step writes
            # into them (torch.optim's own kernels for adam/adamw), with no update tensors in between
            new, state = donated_step(built.tx, grads, state, params)
            for n, p in zip(self._group_names(g), group["params"]):
                if new[n] is not params[n]:  # a transform that could not write in place
                    p.copy_(new[n])
            self._write(g, built, state)
        return loss

    def _check_parameters_apart(self) -> None:
        """No two parameters of any groups share memory (a step of one group would write into
        another's); looked at again only when the parameters or their addresses change."""
        params = [p for group in self.param_groups for p in group["params"]]
        key = (tuple(map(id, params)), tuple(p.data_ptr() for p in params))
        if key == self._fr_apart:
            return
        everything = {
            n: p
            for g in range(len(self.param_groups))
            for n, p in zip(self._group_names(g), self.param_groups[g]["params"])
        }
        self._fr_overlap_all.check(everything, {})
        self._fr_apart = key

    @property
    def funcreg_state(self) -> Any:
        """The transforms' current state: a group's state, or with several groups a
        :class:`funcreg.PartitionState` keyed by group index (the state of the equivalent ``fr.partition``)."""
        states = {
            str(g): self._read(g, self._prepare(g))
            for g, group in enumerate(self.param_groups)
            if group["params"]
        }
        if len(states) == 1:
            return next(iter(states.values()))
        return PartitionState(states)

    def transform(self, g: int = 0) -> GradientTransformation:
        """The transform of param group ``g`` as built from its current options."""
        return self._prepare(g).tx

    # ------------------------------------------------------------------------------------------------
    # state dicts

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's ``state_dict()``: ``{"state": {index: {key: tensor}}, "param_groups": [...]}``.

        Hooks registered with ``register_state_dict_pre_hook``/``register_state_dict_post_hook`` run
        as in torch. Each parameter's dict and its tensors are copies (steps write into the state in
        place), so a later step does not change a state_dict already taken. Group options that are Python objects (a mask, a penalty) are left out.
        """
        for g, group in enumerate(self.param_groups):
            if group["params"]:  # a group changed or added since the last step: its state in place
                built = self._prepare(g)
                self._write(g, built, self._read(g, built))
        return _saved(super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a ``state_dict()`` of an optimizer with the same groups, transforms and parameters.

        Parameters are matched by position, as in torch (the ids may be indices or, from
        ``torch.distributed.checkpoint``, names). Loaded group options replace the current ones; those
        the state_dict leaves out are kept. Raises ``ValueError`` for another number of groups or
        parameters, other parameter names, and for a state of another transform (a missing or extra
        key, another shape or dtype), naming the group, parameter and key; the optimizer is then left
        as it was. Load hooks run as in torch.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"load_state_dict expects a dict, got a {type(state_dict).__name__}")
        sd = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, sd)
            if result is not None:
                sd = result
        if "funcreg_state" in sd:
            self._load_legacy(sd)
        else:
            self._load(sd)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ------------------------------------------------------------------------------------------------
    # copying and printing

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: v for k, v in self.__dict__.items() if k.startswith("_fr_") or k == "selection"})
        state["_fr_built"] = [None] * len(self.param_groups)  # caches: rebuilt from the groups' options
        state["_fr_written"] = {}
        return state

    def __repr__(self) -> str:
        if self._fr_fixed is not None:
            kind = "a fixed transform"
        elif self._fr_name is not None:
            kind = f"{self._fr_name!r}"
        else:
            kind = "a factory of group options"
        lines = [f"TorchOptimizer ({kind})"]
        for g, group in enumerate(self.param_groups):
            names = self._group_names(g)
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            lines.append(f"Parameter Group {g}: {len(names)} parameters ({shown})")
            for k in sorted(group):
                if k not in ("params", "param_names"):
                    lines.append(f"    {k}: {_short(group[k])}")
        if self.selection is not None:
            selected = getattr(self.selection, "selected", [])
            lines.append(
                f"decay: {len(selected)} of {len(self.selection)} parameters (print(opt.selection) for the rule)"
            )
        elif self._fr_name is not None:
            lines.append(
                "decay: torch's rule, every parameter of a group with weight_decay > 0 (fr.create_optimizer "
                "selects with fr.decay_mask instead)"
            )
        return "\n".join(lines)
