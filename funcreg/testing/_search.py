"""Running a check as a Hypothesis search: its settings, its seed, the trees it draws, its failure notes.

The checks build their Hypothesis settings at call time on top of the loaded profile: they fix
``deadline=None`` and ``database=None``, drop the shrink phase when ``shrink=False``, and inherit
everything else (``derandomize``, ``print_blob``, the other phases, the profile's health check
suppressions), so a test suite's profile governs the checks it runs. Pass ``seed=`` to replay one
search; a failure notes the seed it ran with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from funcreg._src.core.typing import PyTree
from funcreg.testing.strategies import like, param_trees, tensors

ParamsLike = Union[None, PyTree, st.SearchStrategy]


def _note(err: BaseException, text: str) -> None:
    """``err.add_note(text)`` (Python 3.11+); on 3.10 the note is appended to the message."""
    if hasattr(err, "add_note"):
        err.add_note(text)
    elif err.args:
        err.args = (f"{err.args[0]}\n{text}", *err.args[1:])


@st.composite
def _generic_trees(draw: Any, dtype: torch.dtype) -> PyTree:
    """Small flat trees that always hold a matrix (penalties such as group_lasso select only those)."""
    tree = draw(param_trees(dtype=dtype, max_leaves=3, max_ndim=2, max_side=4, max_abs=5.0))
    if not any(x.ndim >= 2 for x in tree.values()):
        rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        tree["matrix"] = draw(tensors((rows, cols), dtype=dtype, max_abs=5.0))
    return tree


def _params_strategy(params: ParamsLike, dtype: torch.dtype) -> st.SearchStrategy:
    if params is None:
        return _generic_trees(dtype)
    if isinstance(params, st.SearchStrategy):
        return params
    return like(params)


_SUPPRESSED = (HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much)


def _settings(max_examples: int, shrink: bool) -> settings:
    """Settings for one check, on top of the loaded profile (``derandomize``, ``print_blob``, ... inherited).

    The phases are the profile's, less ``Phase.shrink`` when ``shrink`` is false: a profile without
    the shrink phase (a test suite's "no shrink" profile) is honoured.
    """
    base = settings.default
    assert base is not None  # Hypothesis always has a loaded profile
    phases = [p for p in base.phases if shrink or p != Phase.shrink]
    suppressed = list(dict.fromkeys([*base.suppress_health_check, *_SUPPRESSED]))
    return settings(
        deadline=None,
        max_examples=max_examples,
        database=None,
        phases=phases,
        report_multiple_bugs=False,  # one AssertionError, never an ExceptionGroup
        suppress_health_check=suppressed,
    )


def _run(run: Callable[[], None], seed: int | None, check: str) -> None:
    """Runs a ``@given`` function, seeded when ``seed`` is given; a failure notes how to replay it."""
    if seed is not None:
        run = hypothesis_seed(seed)(run)
    try:
        run()
    except AssertionError as err:
        used = seed if seed is not None else getattr(run, "_hypothesis_internal_use_generated_seed", None)
        if used is not None:
            _note(err, f"{check}: replay this search by passing seed={used} (with the same arguments).")
        raise


def _check_seed(seed: int | None) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"Invalid seed value: {seed!r} (expected an int or None)")
