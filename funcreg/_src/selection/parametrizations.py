"""What the name of a parametrized tensor stands for.

A parametrized weight is not stored as ``weight`` but as its originals
(``parametrizations.weight.original``, ``original0``/``original1``; the old hooks' ``weight_g``/
``weight_v`` and ``weight_orig``). The decay rules and :func:`funcreg.by_module` decide on the weight
such a tensor parametrizes, so they need to know whose tensor it is and which parametrization it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple, cast

from torch import nn

_PARAMETRIZED = re.compile(
    r"^(?P<owner>(?:.*\.)?)parametrizations\.(?P<tensor>[^.]+)\.(?P<orig>original\d*)$"
)


class _Parametrized(NamedTuple):
    owner: str  # module path of the module that owns the parametrized tensor
    tensor: str  # the parametrized tensor's name there ("weight")
    kind: str  # "weight_norm_magnitude", "weight_norm_direction", "orthogonal", "spectral_norm", "other"
    what: str  # the parametrization, for the reason


def _parametrization(name: str, modules: Mapping[str, nn.Module]) -> _Parametrized | None:
    """What a ``torch.nn.utils.parametrize`` original (or an old-style ``weight_g``/``weight_v``/``weight_orig``) is."""
    m = _PARAMETRIZED.match(name)
    if m is not None:
        owner = m["owner"][:-1]
        plist = modules.get(f"{m['owner']}parametrizations.{m['tensor']}")
        # a ParametrizationList (a ModuleList): iterable, which nn.Module's type doesn't say
        kinds = [type(x).__name__ for x in cast("Iterable[nn.Module]", plist)] if plist is not None else []
        orig = m["orig"]
        if kinds == ["_WeightNorm"]:
            kind = "weight_norm_magnitude" if orig == "original0" else "weight_norm_direction"
        elif kinds == ["_Orthogonal"]:
            kind = "orthogonal"
        elif kinds == ["_SpectralNorm"]:
            kind = "spectral_norm"
        else:
            kind = "other"
        return _Parametrized(
            owner, m["tensor"], kind, " + ".join(k.lstrip("_") for k in kinds) or "parametrization"
        )
    owner, _, attr = name.rpartition(".")
    module = modules.get(owner)
    if module is None:
        return None
    params = dict(module.named_parameters(recurse=False))
    if attr in ("weight_g", "weight_v") and "weight_g" in params and "weight_v" in params:
        kind = "weight_norm_magnitude" if attr == "weight_g" else "weight_norm_direction"
        return _Parametrized(owner, "weight", kind, "weight_norm (torch.nn.utils.weight_norm)")
    if attr == "weight_orig" and hasattr(module, "weight_u"):
        return _Parametrized(owner, "weight", "spectral_norm", "spectral_norm (torch.nn.utils.spectral_norm)")
    return None
