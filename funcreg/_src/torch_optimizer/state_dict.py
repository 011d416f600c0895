"""The state_dict of a :class:`funcreg.TorchOptimizer` in torch's format, saved and loaded.

``{"state": {index: {key: tensor}}, "param_groups": [...]}`` with plain tensors and numbers, so
that ``torch.load(weights_only=True)`` and ``torch.distributed.checkpoint`` read it; loading checks
every key against the transform's state before anything is replaced. Also reads funcreg 0.1's format.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable
from itertools import chain
from typing import Any, cast

import torch

from funcreg._src.torch_optimizer import torch_state
from funcreg._src.torch_optimizer.build import _GroupBuilds
from funcreg._src.training.checkpoint import load_state_dict as _load_funcreg_state


def _plain(value: Any) -> bool:
    """Whether ``torch.load(weights_only=True)`` reads the value back (and it means the same)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return False


def _saved(sd: dict[str, Any]) -> dict[str, Any]:
    """torch's ``state_dict()`` made safe to keep: its tensors copied, Python-object options left out."""
    if isinstance(sd, dict) and isinstance(sd.get("state"), dict):
        # copies: steps write into the state tensors in place
        sd["state"] = {
            k: {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in v.items()}
            if isinstance(v, dict)
            else v
            for k, v in sd["state"].items()
        }
    if isinstance(sd, dict) and isinstance(sd.get("param_groups"), list):
        sd["param_groups"] = [
            {k: v for k, v in group.items() if k in ("params", "param_names") or _plain(v)}
            for group in sd["param_groups"]
        ]
    return sd


class _StateDictLoading(_GroupBuilds):
    """Loading a torch-format (or funcreg 0.1) state_dict into the groups and ``self.state``.

    A base of :class:`funcreg.TorchOptimizer`, whose ``load_state_dict`` runs the hooks around these.
    """

    def _load(self, sd: dict[str, Any]) -> None:
        if "state" not in sd or "param_groups" not in sd:
            raise ValueError(
                f"not an optimizer state_dict: expected the keys 'state' and 'param_groups', got {sorted(map(str, sd))}"
            )
        groups = self.param_groups
        saved_groups = copy.deepcopy(sd["param_groups"])
        if len(saved_groups) != len(groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, this optimizer has {len(groups)}"
            )
        for g, (group, saved) in enumerate(zip(groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {g} has {len(saved['params'])} parameters in the state_dict, {len(group['params'])} here"
                )
            ours = self._group_names(g)
            theirs = saved.get("param_names")
            if theirs is not None and list(theirs) != ours:
                k = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
                raise ValueError(
                    f"state_dict is for other parameters: param group {g}'s parameter {k} is {theirs[k]!r} there, "
                    f"{ours[k]!r} here"
                )
        saved_state = sd["state"]
        known = set(chain.from_iterable(saved["params"] for saved in saved_groups))
        stray = [k for k in saved_state if k not in known]
        if stray:
            raise ValueError(
                f"state_dict has state for parameter id {stray[0]!r}, which is in no param group"
            )
        new_groups = []
        for group, saved in zip(groups, saved_groups):
            merged = dict(group)
            merged.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
            merged["params"] = group["params"]
            merged["param_names"] = group["param_names"]
            new_groups.append(merged)
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
                names = self._group_names(g)
                loaded: dict[str, dict[str, Any]] = {}
                for n, pid, p in zip(names, saved["params"], group["params"]):
                    entry = saved_state.get(pid, {})
                    expected = torch_state.keys_of(built.layout, n)
                    missing = [k for k in expected if k not in entry]
                    if missing:
                        raise ValueError(
                            f"state_dict has no {missing[0]!r} for parameter {n!r} (param group {g}); it was saved "
                            f"from another transform or with other options (it has: {sorted(map(str, entry))})"
                        )
                    extra = [k for k in entry if k not in expected]
                    if extra:
                        raise ValueError(
                            f"state_dict has {extra[0]!r} for parameter {n!r} (param group {g}), which this "
                            f"optimizer's transform does not keep (it keeps: {expected})"
                        )
                    loaded[n] = {
                        k: v.to(p.device) if isinstance(v, torch.Tensor) else v for k, v in entry.items()
                    }

                def fresh() -> Any:  # pragma: no cover - every entry was checked to be present
                    raise AssertionError("incomplete state_dict entry")

                state = torch_state.read(built.layout, loaded.get, names, fresh, where="state_dict entry")
                by_name = dict(zip(names, group["params"]))
                # cast: mypy cannot infer a lambda with a default argument against Callable[[str], dict]
                dict_of = cast("Callable[[str], dict]", lambda n, by_name=by_name: new_state[by_name[n]])
                torch_state.write(built.layout, state, dict_of, names)
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
        if self._fr_factory is not None:
            group["lr"] = sd["lr"]
        try:
            built = self._prepare(g)
            params, _ = self._trees(g, built.names)
            state = _load_funcreg_state(built.tx.init(params), sd["funcreg_state"])
        except BaseException:
            group["lr"] = previous_lr
            raise
        torch_state.write(built.layout, state, self._dict_of(g), names, clear=True)
