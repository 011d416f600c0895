"""The state_dict of a :class:`funcreg.TorchOptimizer` in torch's format: what is kept of it.

``{"state": {index: {key: tensor}}, "param_groups": [...]}`` with plain tensors and numbers, so that
``torch.load(weights_only=True)`` and ``torch.distributed.checkpoint`` read it. ``_saved`` copies the
tensors and leaves out Python-object options; loading (``TorchOptimizer.load_state_dict``) checks
every key against the transform's state before anything is replaced.
"""

from __future__ import annotations

import copy
from itertools import chain
from typing import Any

import torch

from funcreg._src.core.tree import key_differences
from funcreg._src.torch_optimizer import torch_state


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


def checked_groups(
    sd: dict[str, Any], groups: list[dict[str, Any]], names: list[list[str]]
) -> list[dict[str, Any]]:
    """A copy of the state_dict's param groups, checked against this optimizer's ``groups`` (and
    their parameter ``names``): as many groups, as many parameters in each, the same names where the
    state_dict has them, and no state for a parameter that is in no group."""
    if "state" not in sd or "param_groups" not in sd:
        raise ValueError(
            f"not an optimizer state_dict: expected the keys 'state' and 'param_groups', got {sorted(map(str, sd))}"
        )
    saved_groups = copy.deepcopy(sd["param_groups"])
    if len(saved_groups) != len(groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer has {len(groups)}")
    for g, (group, saved) in enumerate(zip(groups, saved_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {g} has {len(saved['params'])} parameters in the state_dict, {len(group['params'])} here"
            )
        ours = names[g]
        theirs = saved.get("param_names")
        if theirs is not None and list(theirs) != ours:
            k = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
            raise ValueError(
                f"state_dict is for other parameters: param group {g}'s parameter {k} is {theirs[k]!r} there, "
                f"{ours[k]!r} here"
            )
    known = set(chain.from_iterable(saved["params"] for saved in saved_groups))
    stray = [k for k in sd["state"] if k not in known]
    if stray:
        raise ValueError(f"state_dict has state for parameter id {stray[0]!r}, which is in no param group")
    return saved_groups


def merged_groups(groups: list[dict[str, Any]], saved_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The param groups after loading: each group's options replaced by the saved ones, its own
    parameters and names kept (torch's ``load_state_dict`` does the same)."""
    merged = []
    for group, saved in zip(groups, saved_groups):
        new = dict(group)
        new.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
        new["params"] = group["params"]
        new["param_names"] = group["param_names"]
        merged.append(new)
    return merged


def checked_entries(
    layout: torch_state.Layout,
    names: list[str],
    saved_ids: list[Any],
    params: list[torch.Tensor],
    saved_state: dict[Any, dict[str, Any]],
    g: int,
) -> dict[str, dict[str, Any]]:
    """The saved state of group ``g``'s parameters by name, moved to each parameter's device, each
    entry holding exactly the keys the group's transform keeps (``layout``): a missing or an extra key
    means the state_dict came from another transform or other options, and raises naming it."""
    loaded: dict[str, dict[str, Any]] = {}
    for n, pid, p in zip(names, saved_ids, params):
        entry = saved_state.get(pid, {})
        expected = torch_state.keys_of(layout, n)
        missing, extra = key_differences(expected, entry)
        if missing:
            raise ValueError(
                f"state_dict has no {missing[0]!r} for parameter {n!r} (param group {g}); it was saved "
                f"from another transform or with other options (it has: {sorted(map(str, entry))})"
            )
        if extra:
            raise ValueError(
                f"state_dict has {extra[0]!r} for parameter {n!r} (param group {g}), which this "
                f"optimizer's transform does not keep (it keeps: {expected})"
            )
        loaded[n] = {k: v.to(p.device) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
    return loaded
