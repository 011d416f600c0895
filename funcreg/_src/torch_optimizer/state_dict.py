"""The state_dict of a :class:`funcreg.TorchOptimizer` in torch's format: what is kept of it.

``{"state": {index: {key: tensor}}, "param_groups": [...]}`` with plain tensors and numbers, so that
``torch.load(weights_only=True)`` and ``torch.distributed.checkpoint`` read it. ``_saved`` copies the
tensors and leaves out Python-object options; loading (``TorchOptimizer.load_state_dict``) checks
every key against the transform's state before anything is replaced.
"""

from __future__ import annotations

from typing import Any

import torch


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
