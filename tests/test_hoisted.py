"""``leafwise.hoisted``: a traced scalar computed once per compiled step (its speed is in
``benchmarks/adamw_step.py``; here: it changes no value, no gradient, and nothing eager).

Oracle: the same expression without it, eager, to the bit; the gradient of ``x * s`` with respect to
``s``, which is ``sum(x)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SLOW_OK
from hypothesis import given, settings
from hypothesis import strategies as st

from funcreg._src.core.leafwise import hoisted, mul

torch.set_num_threads(1)


def test_eager_values_pass_through_untouched():
    t = torch.tensor(3.0)
    assert hoisted(t) is t
    assert hoisted(0.5) == 0.5
    v = torch.ones(3)
    assert hoisted(v) is v


def _scaled(x, step, beta, hoist):
    s = torch.sqrt(1 - beta ** step.to(torch.float64)).to(torch.float32)
    return x * (hoisted(s) if hoist else s)


def _grad_of_scale(x, s, hoist):
    s = s.clone().requires_grad_(True)
    (x * (hoisted(s) if hoist else s)).sum().backward()
    return s.grad


# compiled once: every example's inputs are tensors, so one graph serves them all
_SCALED = torch.compile(lambda x, step, beta: _scaled(x, step, beta, True), backend="aot_eager", dynamic=True)
_GRAD = torch.compile(lambda x, s: _grad_of_scale(x, s, True), backend="aot_eager", dynamic=True)


@settings(deadline=None, max_examples=15, suppress_health_check=SLOW_OK)
@given(
    t=st.integers(1, 10_000),
    beta=st.floats(0.5, 0.9999),
    xs=st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=9),
)
def test_traced_it_is_the_same_value_and_gradient_to_the_bit(t, beta, xs):
    x = torch.from_numpy(np.asarray(xs, dtype=np.float32))
    step, b = torch.tensor(t), torch.tensor(beta, dtype=torch.float64)
    assert torch.equal(_SCALED(x, step, b), _scaled(x, step, b, False))
    s = torch.tensor(float(beta))
    assert torch.equal(_GRAD(x, s), _grad_of_scale(x, s, False))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_under_vmap_and_inductor_a_per_member_scalar_stays_per_member(backend):
    """A batched scalar (one step count per member) is hoisted per member; inductor computes the same."""
    x = torch.linspace(-2, 2, 4 * 1000).reshape(4, 1000)
    steps = torch.tensor([1, 2, 30, 4000])

    def member(x, step):
        return mul([x], 1 - 0.999 ** step.to(torch.float64))[0]

    eager = torch.func.vmap(member)(x, steps)
    compiled = torch.compile(torch.func.vmap(member), backend=backend, fullgraph=True)(x, steps)
    want = x * torch.tensor([1 - 0.999**t for t in steps.tolist()], dtype=torch.float32)[:, None]
    torch.testing.assert_close(eager, want, atol=1e-7, rtol=1e-6)
    assert torch.equal(compiled, eager)
