"""Test configuration: one intra-op thread, and the Hypothesis profiles.

One intra-op thread: small ops are ~50x slower with 2 threads on CI machines.

Hypothesis profiles (``settings`` decorators in the tests still fix their own ``max_examples``):

* ``dev``: the local default; random (a new seed every run, ``--hypothesis-seed=N`` to pin one),
  with Hypothesis' example database, so a failure found locally is replayed first next time;
* ``ci``: loaded when the environment variable ``CI`` is set (CI runs with ``CI=true``; empty,
  ``0``, ``false`` and ``no`` count as unset):
  derandomized (the seed is derived from each test, so every run draws the same examples),
  no database, ``print_blob`` (a failure prints its ``@reproduce_failure`` line), and the
  timing-based ``too_slow`` health check off, as timing is the one thing that differs between runs;
* ``thorough``: random, 1000 examples for the tests that do not fix their own number.

``HYPOTHESIS_PROFILE=<name>`` overrides the choice (as does pytest's ``--hypothesis-profile``).
``funcreg.testing``'s checks build their settings at call time on top of the loaded profile, so they
inherit ``derandomize``, ``print_blob`` and the phases from it.

Dynamo and doctests: ``torch.compile`` installs helper globals (``__builtins_dict___0``, ...) into
the globals of the code it compiles, and deletes them again from a weakref callback when the compiled
code is freed. doctest clears an example's globals when the docstring is done, so that callback later
(at interpreter exit) found its name gone and printed ``Exception ignored in: <function
ExactWeakKeyDictionary.__setitem__.<locals>.<lambda>`` ... ``KeyError: '__builtins_dict___0'``.
The ``_DoctestGlobals`` plugin below (registered for the whole run: the doctests of funcreg/ and
docs/ are outside this folder) lets a doctest that installed such globals drop Dynamo's caches while
its globals still exist, then clears them itself; ``pytest_sessionfinish`` does the same for code
compiled in test modules, before interpreter shutdown clears the modules' dicts.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
from collections.abc import Generator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)

# Parent: Hypothesis' own defaults, not whichever profile is loaded now (Hypothesis loads its
# built-in "ci" profile by itself when it sees CI in the environment).
_BASE = settings.get_profile("default")

settings.register_profile("dev", parent=_BASE, deadline=None, print_blob=True)
settings.register_profile(
    "ci",
    parent=_BASE,
    derandomize=True,
    database=None,
    print_blob=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", parent=_BASE, deadline=None, print_blob=True, max_examples=1000)


def _profile_name() -> str:
    """``HYPOTHESIS_PROFILE`` if set, else ``ci`` when ``CI`` is set (and not ``0``/``false``/``no``), else ``dev``."""
    explicit = os.environ.get("HYPOTHESIS_PROFILE", "").strip()
    if explicit:
        return explicit
    ci = os.environ.get("CI", "").strip().lower()
    return "ci" if ci not in ("", "0", "false", "no") else "dev"


settings.load_profile(_profile_name())


def _reset_dynamo() -> None:
    """Frees Dynamo's compiled code (its cleanup callbacks delete the globals it installed)."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()
        gc.collect()


class _DoctestGlobals:
    """A plugin for every doctest of the run (funcreg/ and docs/ too, which this folder's hooks miss)."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, Any, Any]:
        from _pytest.doctest import DoctestItem

        dtest = getattr(item, "dtest", None) if isinstance(item, DoctestItem) else None
        if dtest is None:
            return (yield)
        before = set(dtest.globs)
        # doctest would clear the globals inside runtest, before anything here could run
        item.runner.run = functools.partial(type(item.runner).run, item.runner, clear_globs=False)
        try:
            return (yield)
        finally:
            del item.runner.run
            if any(k.startswith("__") and k not in before for k in dtest.globs):  # Dynamo's globals
                _reset_dynamo()
            dtest.globs.clear()


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_DoctestGlobals(), "funcreg-doctest-globals")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _reset_dynamo()
