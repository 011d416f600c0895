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
"""

from __future__ import annotations

import os

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
