"""``TorchOptimizer``: a real ``torch.optim.Optimizer`` that drives funcreg transforms from ``.grad``.

For imperative training loops, and for frameworks that expect an ``Optimizer`` (Lightning, the
Hugging Face ``Trainer``, accelerate, ``torch.distributed.checkpoint``). It follows torch.optim's
protocol: parameter groups with their own options, ``add_param_group``, options read at every step
(so schedulers of ``lr``, ``weight_decay``, ``momentum`` and ``betas`` work), ``optimizer.state[p]``
per parameter, ``state_dict()`` in torch's format, and torch's hooks. Each group runs its own
transform, built from the group's options by a factory; together they are
``fr.partition({"0": tx_0, "1": tx_1, ...}, labels)`` with each parameter labelled by its group.

The class is whole here, in four parts: construction and the torch.optim protocol; the groups' names
and options (read from ``param_groups`` at every step); each group's transform and its state in
``self.state``; loading a state_dict. Plain helpers live beside it (``groups``, ``build``,
``state_dict``, ``torch_state``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from itertools import chain
from typing import Any, Union, cast

import torch

from funcreg._src.combinators.combine import PartitionState
from funcreg._src.core.aliasing import OverlapCheck
from funcreg._src.core.base import GradientTransformation
from funcreg._src.core.tree import compiling
from funcreg._src.core.validation import check_rate
from funcreg._src.kernels.update import donated_step
from funcreg._src.optim.factory import group_defaults, group_transform
from funcreg._src.optim.table import OptimizerSpec, optimizer_spec
from funcreg._src.selection.named_params import check_initialized
from funcreg._src.torch_optimizer import torch_state
from funcreg._src.torch_optimizer.build import (
    _Built,
    _factory_signature,
    _same,
    _snapshot,
    at,
    injected_slots,
)
from funcreg._src.torch_optimizer.groups import (
    _BOOKKEEPING,
    _FIXED_LR_MESSAGE,
    WATCHED,
    _as_groups,
    _param_items,
    _short,
    check_option_value,
)
from funcreg._src.torch_optimizer.state_dict import _saved, checked_entries, checked_groups, merged_groups
from funcreg._src.training.checkpoint import load_state_dict as _load_funcreg_state

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


def _unset(options: dict[str, Any], key: str) -> bool:
    """Whether ``options`` lacks ``key``, or holds a fixed transform's placeholder ``lr`` (nan)."""
    value = options.get(key)
    return key not in options or (key == "lr" and isinstance(value, float) and math.isnan(value))


class TorchOptimizer(torch.optim.Optimizer):
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
            with its hyperparameters built in (no options, one transform per group), whose
            hyperparameters held by :func:`funcreg.inject_hyperparams` are options of every group
            (see Injected hyperparameters); or the name of
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

    Injected hyperparameters. A transform that is or holds ``fr.inject_hyperparams(...)`` (in a
    chain too) shows each hyperparameter it injects as an option of every group, under torch's name
    where torch has one (``learning_rate`` is ``lr``) and its own otherwise (``weight_decay``,
    ``momentum``, ...); the defaults are the state's values, Python floats. Before each step every
    group's values are checked (a finite number or a 0-d tensor, else an error naming the group
    and key, before any parameter moves) and written into the state's tensors in place: a scheduler
    changes the step without a new transform, and a compiled ``opt.step`` is not recompiled (they
    are written by a small eager function, a graph break). Two injected hyperparameters under one
    option (``weight_decay`` injected twice in a chain) raise ``ValueError``, as does a factory whose
    transform injects (its injected values would stay at the first build's).

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

        Hyperparameters injected into a transform are group options:

        >>> tx = fr.inject_hyperparams(fr.adamw, learning_rate=0.01, weight_decay=0.1)
        >>> opt = fr.TorchOptimizer([{"params": [model.weight]}, {"params": [model.bias], "weight_decay": 0.0}], tx)
        >>> [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
        [(0.01, 0.1), (0.01, 0.0)]
        >>> opt.param_groups[0]["lr"] = 0.005  # as a scheduler does: the next step uses it
    """

    # the transform built into every group (no options), or the factory of a group's options
    _fr_fixed: GradientTransformation | None
    _fr_factory: Callable[..., GradientTransformation] | None
    # the keywords the factory accepts (None: any) and requires
    _fr_accepted: frozenset[str] | None
    _fr_required: frozenset[str]
    _fr_option_keys: list[tuple[str, ...]]
    # id -> name of the names_from= module's parameters, while the constructor adds its groups
    _fr_model_names: dict[int, str] | None
    # each group's transform, its state layout and what it was built from
    _fr_built: list[_Built | None]
    # what _write last wrote for each group, the fast path of _read: its _Built, state tree and tensors
    _fr_written: dict[int, Any]

    def __init__(
        self,
        params: Any,
        tx: TransformOrFactory,
        lr: Any | None = None,
        *,
        names_from: torch.nn.Module | None = None,
        **options: Any,
    ) -> None:
        if names_from is not None and not isinstance(names_from, torch.nn.Module):
            raise TypeError(f"names_from must be a torch.nn.Module, got a {type(names_from).__name__}")
        self._fr_model_names = (
            None if names_from is None else {id(p): n for n, p in names_from.named_parameters()}
        )
        self._fr_fixed = None
        self._fr_factory = None
        self._fr_spec: OptimizerSpec | None = None
        self._fr_name: str | None = None
        defaults: dict[str, Any]
        if isinstance(tx, str):
            # an entry of the optimizer table: each group's transform is group_transform(spec, **options)
            self._fr_spec = optimizer_spec(tx)
            self._fr_name = tx
            table_defaults = group_defaults(self._fr_spec)
            table_lr = table_defaults.pop("lr")
            lr = table_lr if lr is None else lr
            check_rate("lr", lr)
            defaults = {"lr": lr, **table_defaults, **options}
            self._fr_accepted, self._fr_required = None, frozenset({"lr"})
        elif isinstance(tx, GradientTransformation):
            if lr is not None:
                raise ValueError(
                    "lr is for a factory of options -> transform; this transform has its learning rate built "
                    "in (inject it, fr.inject_hyperparams(fr.adamw, learning_rate=...): the groups show it as "
                    "their lr, its value their default, and a group may set its own)"
                )
            if options:
                raise ValueError(
                    f"options {sorted(options)} are for a factory of options -> transform; this transform has "
                    "its hyperparameters built in (pass a factory to have them in the param groups, or inject "
                    "them: fr.inject_hyperparams(fr.adamw, learning_rate=..., weight_decay=...) shows them "
                    "as group options, its values their defaults)"
                )
            self._fr_fixed = tx
            # a fixed transform reports nan as its lr, so that a scheduler changing it is detected; the
            # hyperparameters it injects (fr.inject_hyperparams) join the defaults once it is built
            defaults = {"lr": float("nan")}
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
        self._fr_injected_keys: frozenset[str] = frozenset()  # the group options a fixed transform injects
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
                self._start(g)
        for g, group in enumerate(self.param_groups):
            if not group["params"]:
                self._check_options(g)

    # ------------------------------------------------------------------------------------------------
    # the groups' names and options, read from param_groups at every step

    def _group_names(self, g: int) -> list[str]:
        """The parameter names of group ``g``, naming by position a group added without names."""
        group = self.param_groups[g]
        names = group.get("param_names")
        if names is None or len(names) != len(group["params"]):
            # a group put into param_groups directly, without names: name its parameters by position
            start = sum(len(x["params"]) for x in self.param_groups[:g])
            names = [str(start + k) for k in range(len(group["params"]))]
            group["param_names"] = names
        return list(names)

    def _all_names(self) -> tuple[str, ...]:
        return tuple(chain.from_iterable(self._group_names(g) for g in range(len(self.param_groups))))

    def _option_keys(self, g: int) -> tuple[str, ...]:
        """The option keys of group ``g``: the defaults and the group's own, also for groups put into
        ``param_groups`` directly (torch allows it)."""
        while len(self._fr_option_keys) <= g:  # groups assigned to param_groups directly
            group = self.param_groups[len(self._fr_option_keys)]
            keys = [*self.defaults, *(k for k in group if k not in _BOOKKEEPING)]
            self._fr_option_keys.append(tuple(dict.fromkeys(keys)))
        while len(self._fr_built) < len(self.param_groups):
            self._fr_built.append(None)
        return self._fr_option_keys[g]

    def _passed_keys(self, g: int) -> tuple[str, ...]:
        """The option keys group ``g``'s factory receives (none for a fixed transform)."""
        if self._fr_fixed is not None:
            return ()
        keys = self._option_keys(g)
        return tuple(k for k in keys if self._fr_accepted is None or k in self._fr_accepted)

    def _check_options(self, g: int) -> None:
        """Refuses options of group ``g`` that would be ignored: any option on a fixed transform (or a
        changed lr), a missing required one, a watched option the factory never receives."""
        group = self.param_groups[g]
        keys = self._option_keys(g)
        if self._fr_fixed is not None:
            injected = self._fr_injected_keys
            if "lr" not in injected:
                lr = group.get("lr", float("nan"))
                if "initial_lr" in group or not (isinstance(lr, float) and math.isnan(lr)):
                    raise RuntimeError(f"{_FIXED_LR_MESSAGE} (param group {g})")
            allowed = injected | {"lr"}
            extra = [k for k in keys if k not in allowed] + [
                k for k in group if k in WATCHED and k not in allowed
            ]
            if extra:
                takes = (
                    f"only the hyperparameters it injects, {', '.join(sorted(injected))}"
                    if injected
                    else "no options"
                )
                raise ValueError(
                    f"param group {g} sets {extra[0]!r}, but this TorchOptimizer wraps a transform with its "
                    f"hyperparameters built in, which takes {takes}; inject it "
                    f"(fr.inject_hyperparams(..., {extra[0]}=...)) or pass a factory of the group's options "
                    f"(TorchOptimizer(params, lambda lr, {extra[0]}: ..., lr=...))"
                )
            return
        missing = [k for k in sorted(self._fr_required) if k not in group]
        if missing:
            raise ValueError(
                f"the factory needs {missing[0]!r}, which param group {g} does not have: pass "
                f"{missing[0]}=... to TorchOptimizer (the default of every group) or put it in the group"
            )
        passed = self._passed_keys(g)
        ignored = [k for k in group if k in WATCHED and k not in passed]
        if ignored:
            k = ignored[0]
            if k in keys:
                takes = (
                    "any keyword"
                    if self._fr_accepted is None
                    else ", ".join(sorted(self._fr_accepted)) or "nothing"
                )
                raise TypeError(
                    f"param group {g} sets {k!r}={_short(group[k])}, which the factory does not take (it takes: "
                    f"{takes}), so it would be ignored; add {k!r} (or **options) to the factory's parameters"
                )
            raise RuntimeError(
                f"param group {g} has {k!r}={_short(group[k])}, which is not an option of this TorchOptimizer: "
                f"its factory never receives it, so setting it (a {k} schedule?) would do nothing. Pass "
                f"{k}=... to TorchOptimizer(...) so that every group has it and the factory receives it"
            )

    def _named_params(self, group: dict[str, Any], g: int) -> list[tuple[str, torch.Tensor]]:
        """The parameters of new group ``g`` with their names, each checked to be new to the optimizer."""
        if "params" not in group:
            raise ValueError(f"param group {g} has no 'params' entry")
        items = _param_items(group["params"], g)
        given_names = group.get("param_names")
        if given_names is not None:
            if any(n is not None for n, _ in items) or len(given_names) != len(items):
                raise ValueError(
                    f"param group {g}: 'param_names' must name each of its {len(items)} unnamed parameters"
                )
            items = [(str(n), p) for n, (_, p) in zip(given_names, items)]
        by_model = self._fr_model_names
        if by_model is not None and all(n is None for n, _ in items):
            for k, (_, p) in enumerate(items):
                if id(p) not in by_model:
                    raise ValueError(
                        f"param group {g}: parameter {k} (shape {tuple(getattr(p, 'shape', ()))}) is not a "
                        "parameter of the module passed as names_from="
                    )
            items = [(by_model[id(p)], p) for _, p in items]
        named = [n is not None for n, _ in items]
        if any(named) and not all(named):
            raise ValueError(f"param group {g}: give every parameter a name or none")
        existing: dict[int, tuple[int, str]] = {}
        taken: set[str] = set()
        n: str | None  # a name here, then an item's (maybe None) in the loop below
        for gi in range(g):
            for n, p in zip(self._group_names(gi), self.param_groups[gi]["params"]):
                existing[id(p)] = (gi, n)
                taken.add(n)
        start = len(existing)
        names: list[str] = []
        seen: dict[int, str] = {}
        for k, (n, p) in enumerate(items):
            name = n if n is not None else str(start + k)
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"param group {g}: parameter {name!r} is a {type(p).__name__}, not a tensor")
            check_initialized(name, p)
            if id(p) in seen:
                raise ValueError(
                    f"param group {g} lists parameter {name!r} twice (also as {seen[id(p)]!r}); each parameter "
                    "may appear once (torch.optim would update it twice per step)"
                )
            if id(p) in existing:
                gi, other = existing[id(p)]
                raise ValueError(
                    f"parameter {name!r} of param group {g} is already in param group {gi} (as {other!r})"
                )
            if name in taken or name in names:
                raise ValueError(f"param group {g}: the parameter name {name!r} is used twice")
            seen[id(p)] = name
            names.append(name)
        return [(n, p) for n, (_, p) in zip(names, items)]

    # ------------------------------------------------------------------------------------------------
    # each group's transform and its state in self.state, kept in step with the options

    def _trees(
        self, g: int, names: tuple[str, ...], grads: bool = False
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Group ``g``'s parameters (detached) and, with ``grads``, their gradients, as trees over
        all the optimizer's ``names`` (``None`` for the other groups' parameters)."""
        group = self.param_groups[g]
        params: dict[str, Any] = dict.fromkeys(names)
        gs: dict[str, Any] = dict.fromkeys(names)
        for n, p in zip(self._group_names(g), group["params"]):
            params[n] = p.detach()
            if grads:
                gs[n] = None if p.grad is None else p.grad.detach()
        return params, gs

    def _make_tx(self, g: int, options: dict[str, Any]) -> GradientTransformation:
        """Group ``g``'s transform from its ``options``: the fixed one, the table's
        ``group_transform(spec, ...)``, or the user's factory; a failure names the group and the options."""
        if self._fr_fixed is not None:
            return self._fr_fixed
        if "lr" in options:
            try:
                check_rate("lr", options["lr"])
            except (TypeError, ValueError) as err:
                raise type(err)(f"param group {g}: {err}") from err
        try:
            if self._fr_spec is not None:
                tx = group_transform(self._fr_spec, **options)
            else:
                assert self._fr_factory is not None
                tx = self._fr_factory(**options)
        except (TypeError, ValueError) as err:
            shown = ", ".join(f"{k}={_short(v)}" for k, v in options.items())
            try:
                wrapped = type(err)(f"param group {g}: the factory failed with options ({shown}): {err}")
            except Exception:  # noqa: BLE001 - an exception type with another constructor: keep it as it is
                raise err from None
            raise wrapped from err
        if not isinstance(tx, GradientTransformation):
            raise TypeError(
                f"param group {g}: the factory returned a {type(tx).__name__}, not a GradientTransformation"
            )
        return tx

    def _meta_template(self, tx: GradientTransformation, g: int, names: tuple[str, ...]) -> Any:
        """The transform's state on meta tensors (its layout without allocating), or on the real
        parameters for an ``init`` that reads values."""
        params, _ = self._trees(g, names)
        try:
            return tx.init({n: torch_state.meta_like(p) for n, p in params.items()})
        except Exception:  # noqa: BLE001 - an init that reads values: run it on the real parameters
            return tx.init(params)

    def _prepare(self, g: int, check: bool = True) -> _Built:
        """The group's transform and state layout, rebuilt when its options or parameters changed
        (its options checked first, unless ``check`` is false: :meth:`_start` checks them itself)."""
        group = self.param_groups[g]
        if check:
            self._check_options(g)
        names = self._all_names()
        options = {k: group[k] for k in self._passed_keys(g) if k in group}
        ids = tuple(id(p) for p in group["params"])
        cached = self._fr_built[g]
        same_params = cached is not None and cached.ids == ids and cached.names == names
        same_options = (
            cached is not None
            and cached.options.keys() == options.keys()
            and all(_same(cached.options[k], v) for k, v in options.items())
        )
        if cached is not None and same_params and same_options:
            return cached
        tx = cached.tx if cached is not None and same_options else self._make_tx(g, options)
        template = self._meta_template(tx, g, names)
        layout = torch_state.build_layout(template, names, self._group_names(g))
        injected = injected_slots(template, g)
        if injected and self._fr_fixed is None:
            shown = ", ".join(f"{s.name} (as {s.key!r})" for s in injected)
            raise ValueError(
                f"param group {g}: the factory's transform injects hyperparameters with fr.inject_hyperparams "
                f"({shown}); a factory is called again when a group option changes, but injected values live "
                "in the state, which is kept, so they would not follow the group: pass the transform itself, "
                "TorchOptimizer(params, fr.inject_hyperparams(...)), whose injected hyperparameters are the "
                "groups' options"
            )
        if cached is not None and same_params and layout.signature != cached.layout.signature:
            changed = [
                k for k in options if k not in cached.options or not _same(cached.options[k], options[k])
            ]
            old_state = self._read(g, cached)
            params, _ = self._trees(g, names)
            new_state = torch_state.carry(
                old_state, tx.init(params), f"param group {g}: changing {', '.join(changed)}"
            )
            torch_state.write(layout, new_state, self._dict_of(g), self._group_names(g), clear=True)
        built = _Built(tx, layout, {k: _snapshot(v) for k, v in options.items()}, ids, names, injected)
        self._fr_built[g] = built
        return built

    def _start(self, g: int) -> None:
        """Builds new group ``g``'s transform and its state in ``self.state``. The hyperparameters a
        fixed transform injects become options of every group (and defaults), the state's values where
        a group has none, before its options are checked."""
        fixed = self._fr_fixed is not None
        built = self._prepare(g, check=not fixed)
        state = self._read(g, built)
        if built.injected:
            self._fr_injected_keys = frozenset(s.key for s in built.injected)
            group = self.param_groups[g]
            for s in built.injected:
                value = float(at(state, s.path).hyperparams[s.name])
                if _unset(self.defaults, s.key):
                    self.defaults[s.key] = value
                if _unset(group, s.key):
                    group[s.key] = value
        if fixed:
            self._check_options(g)
            for s in built.injected:  # a group's own value, refused now rather than at the first step
                check_option_value(self.param_groups[g][s.key], g, s.key)
        self._write(g, built, state)

    @torch.compiler.disable
    def _sync(self, g: int, built: _Built, state: Any) -> None:
        """Writes group ``g``'s values of the hyperparameters its transform injects into their tensors
        in ``state``, in place, each checked first (a finite number or a 0-d tensor): a scheduler's
        ``group["lr"]`` reaches the step without a new transform. Eager under ``torch.compile`` (call
        it only where ``built.injected``: each call is a graph break): traced, a group's number would
        be a constant guarded by its value, recompiling the step whenever it changes."""
        group = self.param_groups[g]
        with torch.no_grad():
            for s in built.injected:
                if s.key not in group:
                    raise ValueError(
                        f"param group {g} has no {s.key!r}, the value of the injected hyperparameter "
                        f"{s.name!r} (a group put into param_groups directly? add_param_group fills in "
                        "the defaults)"
                    )
                value = group[s.key]
                check_option_value(value, g, s.key)
                tensor = at(state, s.path).hyperparams[s.name]
                if isinstance(value, torch.Tensor):
                    tensor.copy_(value)
                else:
                    tensor.fill_(float(value))

    def _dict_of(self, g: int) -> Callable[[str], dict[str, Any]]:
        """``name -> self.state[parameter]`` for group ``g``."""
        by_name = dict(zip(self._group_names(g), self.param_groups[g]["params"]))
        return lambda n: self.state[by_name[n]]

    def _read(self, g: int, built: _Built) -> Any:
        """Group ``g``'s state tree, from what the last step wrote when ``self.state`` still holds it,
        else read from ``self.state`` (fresh where a parameter has none yet)."""
        last = self._fr_written.get(g)
        if last is not None and self._holds(g, built, last[1]):
            return last[1]  # optimizer.state holds what the last step wrote: its tree, unchanged
        by_name = dict(zip(self._group_names(g), self.param_groups[g]["params"]))

        def fresh() -> Any:
            params, _ = self._trees(g, built.names)
            return built.tx.init(params)

        return torch_state.read(
            built.layout, lambda n: self.state.get(by_name[n]), self._group_names(g), fresh
        )

    def _holds(self, g: int, built: _Built, state: Any) -> bool:
        """Whether ``optimizer.state`` holds exactly what the last step of group ``g`` wrote, from
        ``state`` (the same tree object) and ``built`` (the same transform)."""
        last = self._fr_written.get(g)
        return (
            last is not None
            and last[0] is built
            and last[1] is state
            and all(
                self.state.get(p) is d and cast("dict[str, Any]", d).get(k) is t for p, d, k, t in last[2]
            )
        )

    def _write(self, g: int, built: _Built, state: Any, clear: bool = False) -> None:
        """Writes group ``g``'s state tree into ``self.state`` under torch's keys, and remembers what
        it wrote (the fast path of :meth:`_read`); nothing to do after a donated step wrote in place."""
        if not clear and self._holds(g, built, state):
            return  # a donated step updated in place the very state the last step wrote: nothing moved
        names = self._group_names(g)
        leaves = torch_state.write(built.layout, state, self._dict_of(g), names, clear=clear)
        # remember what was written, for the fast path of _read: (parameter, its dict, key, tensor)
        by_name = dict(zip(names, self.param_groups[g]["params"]))
        slots = []
        for e, value in zip(built.layout.entries, leaves):
            if e.kind == "param" and value is not None:
                assert e.name is not None  # a "param" entry names its parameter
                p = by_name[e.name]
                slots.append((p, self.state[p], e.key, value))
            elif e.kind == "group" and value is not None and names:
                p = by_name[names[0]]
                assert e.keys is not None  # a "group" entry has its keys
                slots.append((p, self.state[p], e.keys[names[0]], value))
        self._fr_written[g] = (built, state, slots)

    # ------------------------------------------------------------------------------------------------
    # loading a torch-format (or funcreg 0.1) state_dict

    def _load(self, sd: dict[str, Any]) -> None:
        """Replaces the groups' options and ``self.state`` with a torch-format state_dict's, after
        checking all of it; on any error nothing is replaced."""
        names = [self._group_names(g) for g in range(len(self.param_groups))]
        saved_groups = checked_groups(sd, self.param_groups, names)
        new_groups = merged_groups(self.param_groups, saved_groups)
        old = (self.param_groups, self.state, self._fr_built)
        new_state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        self.param_groups = new_groups
        self._fr_built = [None] * len(new_groups)
        self._fr_written = {}
        try:
            for g, (group, saved) in enumerate(zip(new_groups, saved_groups)):
                if not group["params"]:
                    continue
                try:
                    built = self._prepare(g)
                except (RuntimeError, TypeError) as err:  # the loaded options do not fit this optimizer
                    raise ValueError(f"the state_dict's options do not fit this optimizer: {err}") from err
                loaded = checked_entries(
                    built.layout, names[g], saved["params"], group["params"], sd["state"], g
                )

                def fresh() -> Any:  # pragma: no cover - every entry was checked to be present
                    raise AssertionError("incomplete state_dict entry")

                state = torch_state.read(built.layout, loaded.get, names[g], fresh, where="state_dict entry")
                for s in built.injected:
                    # a state_dict without the option (or with a fixed transform's nan lr, from before
                    # the groups showed it): the value its state holds
                    if _unset(saved, s.key):
                        group[s.key] = float(at(state, s.path).hyperparams[s.name])
                    check_option_value(group[s.key], g, s.key)
                by_name = dict(zip(names[g], group["params"]))
                # cast: mypy cannot infer a lambda with a default argument against Callable[[str], dict]
                dict_of = cast("Callable[[str], dict]", lambda n, by_name=by_name: new_state[by_name[n]])
                torch_state.write(built.layout, state, dict_of, names[g])
            for group in new_groups:
                for p in group["params"]:
                    new_state[p]  # every parameter has a (possibly empty) entry, as after construction
        except BaseException:
            self.param_groups, self.state, self._fr_built = old
            raise
        self.state = new_state

    def _load_legacy(self, sd: dict[str, Any]) -> None:
        """A state_dict of funcreg 0.1 (``{"funcreg_state", "lr", "names"}``, one group)."""
        groups = [g for g, group in enumerate(self.param_groups) if group["params"]]
        if len(groups) != 1:
            raise ValueError(
                "a funcreg 0.1 TorchOptimizer state_dict has one param group; this optimizer has several"
            )
        g = groups[0]
        names = self._group_names(g)
        if list(sd.get("names", [])) != names:
            raise ValueError(f"state_dict is for parameters {sd.get('names')}, this optimizer has {names}")
        group = self.param_groups[g]
        previous_lr = group.get("lr")
        if self._fr_factory is not None or self._fr_spec is not None:
            group["lr"] = sd["lr"]
        try:
            built = self._prepare(g)
            params, _ = self._trees(g, built.names)
            state = _load_funcreg_state(built.tx.init(params), sd["funcreg_state"])
        except BaseException:
            group["lr"] = previous_lr
            raise
        torch_state.write(built.layout, state, self._dict_of(g), names, clear=True)
        for s in built.injected:  # the values the checkpoint's state holds
            group[s.key] = float(at(state, s.path).hyperparams[s.name])

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
                self._start(g)
            elif not self._fr_constructing:
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
        # every group's transform, state and injected values first: a group whose options are refused
        # stops the step before any parameter moved
        ready = []
        for g, group in enumerate(self.param_groups):
            if group["params"]:
                built = self._prepare(g)
                state = self._read(g, built)
                if built.injected:
                    self._sync(g, built, state)
                ready.append((g, group, built, state))
        for g, group, built, state in ready:
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
        states = {}
        for g, group in enumerate(self.param_groups):
            if group["params"]:
                built = self._prepare(g)
                states[str(g)] = state = self._read(g, built)
                if built.injected:
                    self._sync(g, built, state)
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
                state = self._read(g, built)
                if built.injected:  # the values the next step would use
                    self._sync(g, built, state)
                self._write(g, built, state)
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
            if self._fr_injected_keys:
                kind += f", its injected {', '.join(sorted(self._fr_injected_keys))} as group options"
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
