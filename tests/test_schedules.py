"""Schedules against their closed forms: every value at drawn counts, the eager (int) and the traced
(0-d tensor) count giving the same number, and joined schedules restarting each piece at its
boundary (the count each piece sees is written out here, not taken from the code)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcreg as fr

counts = st.integers(0, 60)


def _both(schedule, count: int) -> float:
    """The schedule at an int count, after checking the 0-d int64 tensor count gives the same."""
    eager = float(schedule(count))
    traced = schedule(torch.tensor(count, dtype=torch.int64))
    assert isinstance(traced, torch.Tensor) and traced.ndim == 0
    assert math.isclose(float(traced), eager, rel_tol=1e-12, abs_tol=1e-12), (count, float(traced), eager)
    return eager


@settings(deadline=None, max_examples=40)
@given(
    gaps=st.lists(st.integers(0, 8), min_size=1, max_size=4),
    count=counts,
    offset=st.integers(0, 3),
)
def test_joined_schedules_restart_each_piece_at_its_boundary(gaps, count, offset):
    boundaries = [offset + sum(gaps[: i + 1]) for i in range(len(gaps))]  # non-decreasing, repeats allowed
    pieces = [lambda c, j=j: 100.0 * j + c for j in range(len(boundaries) + 1)]
    joined = fr.join_schedules(pieces, boundaries)
    j = sum(count >= b for b in boundaries)  # the last piece whose boundary has passed
    start = boundaries[j - 1] if j else 0
    assert _both(joined, count) == 100.0 * j + (count - start)


def test_join_schedules_refuses_what_cannot_be_joined():
    with pytest.raises(ValueError, match=r"must be non-decreasing"):
        fr.join_schedules([fr.constant_schedule(1.0)] * 3, [5, 4])
    with pytest.raises(ValueError, match=r"one more schedule than boundaries, got 2 schedules and 2"):
        fr.join_schedules([fr.constant_schedule(1.0)] * 2, [1, 2])
    with pytest.raises(TypeError, match=r"schedules\[1\] is not callable"):
        fr.join_schedules([fr.constant_schedule(1.0), 0.5], [1])
    with pytest.raises(ValueError, match=r"boundaries\[0\]"):
        fr.join_schedules([fr.constant_schedule(1.0)] * 2, [-1])


@settings(deadline=None, max_examples=40)
@given(
    a=st.floats(-2.0, 2.0),
    b=st.floats(-2.0, 2.0),
    steps=st.integers(1, 30),
    alpha=st.floats(0.0, 1.0),
    count=counts,
)
def test_each_schedule_is_its_closed_form(a, b, steps, alpha, count):
    frac = min(count, steps) / steps
    assert math.isclose(_both(fr.linear_schedule(a, b, steps), count), a + (b - a) * frac, abs_tol=1e-12)
    assert math.isclose(_both(fr.linear_warmup(b, steps, a), count), a + (b - a) * frac, abs_tol=1e-12)
    cosine = a * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * frac)) + alpha)
    assert math.isclose(_both(fr.cosine_decay_schedule(a, steps, alpha), count), cosine, abs_tol=1e-12)
    assert _both(fr.constant_schedule(a), count) == a
    # warm-up for `steps`, then a cosine from the peak b to the end value a over 10 more steps
    sched = fr.warmup_cosine_decay_schedule(b, warmup_steps=steps, decay_steps=steps + 10, end_value=a)
    if count < steps:
        expected = b * count / steps
    else:
        f = min(count - steps, 10) / 10
        expected = a + (b - a) * (1 + math.cos(math.pi * f)) / 2
    assert math.isclose(_both(sched, count), expected, abs_tol=1e-12)


def test_schedule_arguments_are_checked():
    for make in (
        lambda: fr.constant_schedule(torch.tensor(1.0)),
        lambda: fr.linear_schedule(torch.tensor(1.0), 0.0, 3),
        lambda: fr.cosine_decay_schedule(torch.tensor(1.0), 3),
        lambda: fr.cosine_decay_schedule(1.0, 3, alpha=torch.tensor(0.5)),
    ):
        with pytest.raises((TypeError, ValueError)):
            make()
    with pytest.raises(ValueError, match="transition_steps"):
        fr.linear_schedule(0.0, 1.0, 0)
    with pytest.raises(ValueError, match="alpha"):
        fr.cosine_decay_schedule(1.0, 3, alpha=1.5)
    with pytest.raises(ValueError, match="decay_steps"):
        fr.warmup_cosine_decay_schedule(1.0, warmup_steps=4, decay_steps=4)
    with pytest.raises(ValueError, match="init_value"):
        fr.cosine_decay_schedule(float("nan"), 3)
