"""``fr.compress_state``: bfloat16 state with stochastic rounding.

* the rounding is one of the two bfloat16 neighbours of ``x``, and unbiased: over many draws with a
  fixed generator the mean is within 5 standard deviations of ``x`` (the variance ``(x - lo)(hi - x)``
  is derived here), so the check is deterministic and can fail;
* increments smaller than half a bfloat16 step survive on average, where round-to-nearest loses them;
* ``compress_state(adam)`` trains a least-squares problem to within 2% of the float32 loss and
  holds half the state memory.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcreg as fr
from funcreg._src.combinators.low_memory import stochastic_round_to_bfloat16

PROPERTY = settings(deadline=None, max_examples=30, database=None)


@PROPERTY
@given(x=st.floats(-1e6, 1e6, width=32, allow_subnormal=False).filter(lambda v: abs(v) > 1e-6))
def test_the_rounding_is_a_neighbour_and_unbiased(x):
    xs = torch.full((20_000,), x, dtype=torch.float32)
    r = stochastic_round_to_bfloat16(xs, torch.Generator().manual_seed(1)).double()
    values = set(r.tolist())
    exact = float(torch.tensor(x, dtype=torch.float32))
    if exact in values and len(values) == 1:
        return  # x is a bfloat16 itself
    lo, hi = min(values), max(values)
    assert len(values) <= 2 and lo <= exact <= hi
    sd = math.sqrt(max((exact - lo) * (hi - exact), 0.0) / xs.numel())
    assert abs(float(r.mean()) - exact) <= 5 * sd + 1e-12 * abs(exact)


def test_small_increments_survive_on_average():
    x_sr = torch.ones(4096, dtype=torch.bfloat16)
    x_rne = torch.ones(4096, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    for _ in range(1000):  # + 1e-3, a quarter of bfloat16's half-step at 1.0
        x_sr = stochastic_round_to_bfloat16(x_sr.float() + 1e-3, gen)
        x_rne = (x_rne.float() + 1e-3).to(torch.bfloat16)
    assert torch.all(x_rne == 1.0)  # round-to-nearest loses every increment
    assert abs(float(x_sr.float().mean()) - 2.0) < 0.02


def test_compressed_adam_trains_as_the_float32_one_with_half_the_state():
    gen = np.random.default_rng(0)
    x = torch.from_numpy(gen.normal(size=(256, 16)).astype(np.float32))
    y = x @ torch.from_numpy(gen.normal(size=16).astype(np.float32))

    def loss(p):
        return ((x @ p["w"] - y) ** 2).mean()

    finals, state_bytes = [], []
    for tx in (fr.adam(0.05), fr.compress_state(fr.adam(0.05))):
        params = {"w": torch.zeros(16)}
        state = tx.init(params)
        for _ in range(300):
            u, state = tx.update(torch.func.grad(loss)(params), state, params)
            params = fr.apply_updates(params, u)
        finals.append(float(loss(params)))
        state_bytes.append(
            sum(t.nbytes for t in torch.utils._pytree.tree_leaves(state) if t is not None and t.ndim)
        )
    assert finals[1] <= finals[0] * 1.02 + 1e-4, finals
    assert state_bytes[1] * 2 == state_bytes[0]


def test_compress_state_is_reproducible_and_validates():
    params = {"w": torch.ones(8)}
    runs = []
    for _ in range(2):
        tx = fr.compress_state(fr.adam(0.1), seed=3)
        p, s = params, tx.init(params)
        for k in range(5):
            u, s = tx.update({"w": torch.full((8,), 0.1 * (k + 1))}, s, p)
            p = fr.apply_updates(p, u)
        runs.append(p["w"])
    assert torch.equal(runs[0], runs[1])
    with pytest.raises(TypeError, match="GradientTransformation"):
        fr.compress_state("adam")
    with pytest.raises(TypeError, match="float32"):
        stochastic_round_to_bfloat16(torch.ones(2, dtype=torch.float64))


def test_representable_and_special_values_are_kept_and_vmap_is_refused():
    x = torch.tensor([1.0, -2.5, 0.0, float("inf"), -float("inf"), 3.0e38], dtype=torch.float32)
    r = stochastic_round_to_bfloat16(x, torch.Generator().manual_seed(0)).float()
    assert torch.equal(r[:5], x[:5])  # bfloat16 values already, infinities: unchanged
    assert torch.isnan(stochastic_round_to_bfloat16(torch.tensor([float("nan")]))).all()
    tx = fr.compress_state(fr.adam(0.1))
    stacked = fr.stack([{"w": torch.ones(2)}] * 2)
    with pytest.raises(TypeError, match="compress_state runs eagerly only"):
        fr.vmap(tx.update)(stacked, fr.vmap(tx.init)(stacked), stacked)
