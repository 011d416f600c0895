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
from funcreg._src.combinators.low_memory import (
    dequantize_float8_blocks,
    quantize_float8_blocks,
    stochastic_round_to_bfloat16,
)

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


def _least_squares(n: int, transforms: list[fr.GradientTransformation]) -> tuple[list[float], list[int]]:
    """Each transform's final loss on a seeded least-squares problem in ``n`` unknowns (300 steps from
    zero), and the bytes of its state's tensors (0-d counters aside)."""
    gen = np.random.default_rng(0)
    x = torch.from_numpy(gen.normal(size=(256, n)).astype(np.float32))
    y = x @ torch.from_numpy(gen.normal(size=n).astype(np.float32))

    def loss(p):
        return ((x @ p["w"] - y) ** 2).mean()

    finals, state_bytes = [], []
    for tx in transforms:
        params = {"w": torch.zeros(n)}
        state = tx.init(params)
        for _ in range(300):
            u, state = tx.update(torch.func.grad(loss)(params), state, params)
            params = fr.apply_updates(params, u)
        finals.append(float(loss(params)))
        state_bytes.append(
            sum(t.nbytes for t in torch.utils._pytree.tree_leaves(state) if t is not None and t.ndim)
        )
    return finals, state_bytes


def test_compressed_adam_trains_as_the_float32_one_with_half_the_state():
    finals, state_bytes = _least_squares(16, [fr.adam(0.05), fr.compress_state(fr.adam(0.05))])
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


# --- format="float8": 8 bits per entry, one float32 scale per block -----------------------------------


def _e4m3_half_ulp(v: np.ndarray) -> np.ndarray:
    """Half the spacing of float8 e4m3 values around |v| (in code units): 2**(e - 3) / 2 for normal
    values of exponent e >= -6, 2**-10 for subnormals (derived from the format: 3 mantissa bits)."""
    a = np.abs(v)
    e = np.floor(np.log2(np.maximum(a, 2.0**-6)))
    return np.where(a >= 2.0**-6, 2.0 ** (e - 3) / 2, 2.0**-10)


@PROPERTY
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 700),
    block=st.sampled_from([1, 7, 64, 256]),
    spread=st.floats(0.0, 12.0),
)
def test_float8_blocks_round_each_entry_to_a_nearest_code_of_its_block(seed, n, block, spread):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=n) * 10.0 ** rng.uniform(-spread, 0, size=n)).astype(np.float32)
    q = quantize_float8_blocks(torch.from_numpy(x), block)
    assert q.codes.dtype == torch.float8_e4m3fn and q.codes.shape == (n,)
    assert q.scale.shape == (math.ceil(n / block),)
    back = dequantize_float8_blocks(q, block).double().numpy()
    padded = np.pad(x.astype(np.float64), (0, q.scale.numel() * block - n)).reshape(-1, block)
    absmax = np.abs(padded).max(axis=1)
    scale = np.where(absmax > 0, absmax / 448.0, 1.0).repeat(block)[:n]
    code_units = x / scale
    # nearest-code rounding: within half a code spacing, in the block's scale (float32 slack)
    err = np.abs(back - x)
    assert np.all(err <= _e4m3_half_ulp(code_units) * scale * (1 + 1e-6) + 1e-30)
    # each block's largest magnitude is exact (it is the code 448)
    for b in range(q.scale.numel()):
        seg = slice(b * block, min((b + 1) * block, n))
        if absmax[b] > 0:
            k = b * block + int(np.argmax(np.abs(x[seg])))
            assert back[k] == pytest.approx(float(x[k]), rel=1e-6, abs=0)


def test_float8_compressed_adam_trains_as_the_float32_one_in_a_quarter_of_the_state():
    finals, state_bytes = _least_squares(
        512, [fr.adam(0.05), fr.compress_state(fr.adam(0.05), format="float8")]
    )
    # the stated tolerance: within 5% of the float32 loss (plus a floor where both converge)
    assert finals[1] <= finals[0] * 1.05 + 1e-3, finals
    # mu and nu: 512 float32 each (4096 bytes) against 512 codes and 2 scales each (1040 bytes)
    assert state_bytes[0] == 2 * 512 * 4 and state_bytes[1] == 2 * (512 + 2 * 4)


def test_float8_format_validates_and_prints():
    tx = fr.compress_state(fr.adam(0.1), format="float8", block=64)
    assert repr(tx).startswith("compress_state(adam(") and "format='float8', block=64" in repr(tx)
    with pytest.raises(ValueError, match="format"):
        fr.compress_state(fr.adam(0.1), format="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block"):
        fr.compress_state(fr.adam(0.1), format="float8", block=0)
    with pytest.raises(TypeError, match="float32"):
        quantize_float8_blocks(torch.ones(3, dtype=torch.float64))
    q = quantize_float8_blocks(torch.ones(10), 4)
    with pytest.raises(ValueError, match="3 block scales for 10 entries in blocks of 5"):
        dequantize_float8_blocks(q, 5)
    zeros = quantize_float8_blocks(torch.zeros(5), 4)
    assert torch.equal(dequantize_float8_blocks(zeros, 4), torch.zeros(5))
    odd = dequantize_float8_blocks(quantize_float8_blocks(torch.tensor([1.0, float("inf"), 2.0]), 4), 4)
    assert odd[0] == 1.0 and odd[2] == 2.0 and torch.isnan(odd[1])


def test_compressed_states_train_the_digits_mlp_as_full_precision():
    """The stated tolerance on a real task: an MLP on scikit-learn's digits (1,437 training images),
    AdamW for 150 full-batch steps. The bfloat16 state (stochastic rounding) ends within 2% of the
    full-precision training loss, the float8 state within 15% (its moments carry 3 mantissa bits:
    the trajectory moves, here to a lower loss), both within 2 points of its test accuracy."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.2, random_state=0)
    x_train, x_test = (torch.from_numpy(a.astype(np.float32)) for a in (x_train, x_test))
    y_train, y_test = torch.from_numpy(y_train), torch.from_numpy(y_test)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    start = fr.params_of(model)

    def loss(p, xs, ys):
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, p, (xs,)), ys)

    results = {}
    for name, tx in (
        ("float32", fr.adamw(3e-3, weight_decay=1e-2)),
        ("bfloat16", fr.compress_state(fr.adamw(3e-3, weight_decay=1e-2))),
        ("float8", fr.compress_state(fr.adamw(3e-3, weight_decay=1e-2), format="float8")),
    ):
        params = {k: v.clone() for k, v in start.items()}
        state = tx.init(params)
        for _ in range(150):
            u, state = tx.update(torch.func.grad(loss)(params, x_train, y_train), state, params)
            params = fr.apply_updates(params, u)
        with torch.no_grad():
            logits = torch.func.functional_call(model, params, (x_test,))
            results[name] = (
                float(loss(params, x_train, y_train)),
                float((logits.argmax(1) == y_test).double().mean()),
            )
    full_loss, full_acc = results["float32"]
    assert full_acc > 0.9, results  # the reference itself learned the task
    for name, tolerance in (("bfloat16", 0.02), ("float8", 0.15)):
        compressed_loss, compressed_acc = results[name]
        assert abs(compressed_loss - full_loss) <= tolerance * full_loss, (name, results)
        assert compressed_acc >= full_acc - 0.02, (name, results)


@pytest.mark.parametrize("format", ["bfloat16", "float8"])
@pytest.mark.parametrize("inner", ["adam", "sgd_momentum"])
def test_a_pure_update_never_writes_into_the_given_state(format, inner):
    """The inner step runs donated on this step's own float32 copies (the memory peak), but the
    tensors it did not decode (counts, per-parameter steps) are copied first unless the caller
    donated the state: a pure update leaves the given state bit for bit as it was."""
    base = fr.adam(1e-2) if inner == "adam" else fr.sgd(0.1, momentum=0.9)
    tx = fr.compress_state(base, format=format, block=4)
    params = {"w": torch.linspace(-1, 1, 8).reshape(2, 4), "b": torch.ones(3)}
    grads = {"w": torch.full((2, 4), 0.5), "b": torch.full((3,), -0.25)}
    state = tx.init(params)
    for _ in range(2):  # a state with moments and counts that moved
        _, state = tx.update(grads, state, params)
    before = [x.clone() for x in torch.utils._pytree.tree_leaves(state) if isinstance(x, torch.Tensor)]
    _, after = tx.update(grads, state, params)
    now = [x for x in torch.utils._pytree.tree_leaves(state) if isinstance(x, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(before, now)), "the given state was written into"
    assert int(after.count) == int(state.count) + 1
    pure_updates, _ = tx.update(grads, state, params)
    pure = fr.apply_updates(params, pure_updates)
    donated, _ = fr.donated_update(tx, grads, state, {k: v.clone() for k, v in params.items()})
    for k in pure:  # donated equals pure, bit for bit
        assert torch.equal(donated[k], pure[k]), k


def test_float8_blocks_keep_zero_blocks_and_default_to_256():
    """An all-zero block (fresh moments) decodes to exact zeros, with scale 1 rather than 0/448; the
    default block is 256 entries (one scale each, the last block padded: 513 entries are 3 blocks);
    block=1 is exact per entry; compress_state's defaults are seed 0 and that block."""
    x = torch.cat([torch.zeros(300), torch.linspace(-3, 3, 213)])
    q = quantize_float8_blocks(x)
    assert q.scale.shape == (3,) and float(q.scale[0]) == 1.0
    decoded = dequantize_float8_blocks(q)
    assert torch.equal(decoded[:256], torch.zeros(256))
    assert torch.equal(decoded, dequantize_float8_blocks(q, 256))  # the same default on both sides
    q1 = quantize_float8_blocks(x, block=1)  # every entry its own scale: it is its block's largest
    torch.testing.assert_close(dequantize_float8_blocks(q1, block=1), x, atol=0, rtol=1e-6)
    tx = fr.compress_state(fr.adam(1e-3), format="float8")
    state = tx.init({"w": torch.zeros(513)})
    scales = [
        s
        for s in torch.utils._pytree.tree_leaves(state)
        if isinstance(s, torch.Tensor) and s.dtype == torch.float32
    ]
    assert [s.shape for s in scales] == [(3,), (3,)]
    one = fr.compress_state(fr.adam(1e-3), format="float8", block=1)  # the smallest block is allowed
    params = {"w": torch.linspace(-1, 1, 5)}
    one.update({"w": torch.ones(5)}, one.init(params), params)
    a, b = fr.compress_state(fr.sgd(0.1, momentum=0.9)), fr.compress_state(fr.sgd(0.1, momentum=0.9), seed=0)
    grads = {"w": torch.linspace(1e-3, 2e-3, 5)}
    sa, sb = a.init(params), b.init(params)
    for _ in range(2):
        _, sa = a.update(grads, sa, params)
        _, sb = b.update(grads, sb, params)
    assert all(
        torch.equal(u, v)
        for u, v in zip(torch.utils._pytree.tree_leaves(sa), torch.utils._pytree.tree_leaves(sb))
    )


def test_bfloat16_init_rounds_to_nearest_and_updates_round_stochastically():
    """The initial state is cast (no random draw: torch's global generator is untouched); updates
    draw from the seeded generator, so two seeds give different states and one seed the same."""
    params = {"w": torch.full((64,), 1.0)}
    grads = {"w": torch.linspace(1e-3, 2e-3, 64)}
    before = torch.random.get_rng_state()
    tx = fr.compress_state(fr.sgd(0.1, momentum=0.9), seed=1)
    state = tx.init(params)
    assert torch.equal(torch.random.get_rng_state(), before)
    runs = []
    for seed in (1, 1, 2):
        tx = fr.compress_state(fr.sgd(0.1, momentum=0.9), seed=seed)
        _, s = tx.update(grads, tx.init(params), params)
        _, s = tx.update(grads, s, params)
        runs.append(
            [
                x.clone()
                for x in torch.utils._pytree.tree_leaves(s)
                if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16
            ]
        )
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert any(not torch.equal(a, b) for a, b in zip(runs[0], runs[2]))
    assert torch.equal(torch.random.get_rng_state(), before)
    del state


def test_scalar_float32_state_is_kept_as_it_is():
    """0-d float32 tensors in the inner state (a running scalar) are not compressed."""

    def init(params):
        return {"scalar": torch.zeros((), dtype=torch.float32), "m": torch.zeros_like(params["w"])}

    def update(updates, state, params=None):
        return updates, {"scalar": state["scalar"] + 0.1, "m": state["m"] + updates["w"]}

    tx = fr.compress_state(fr.GradientTransformation(init, update))
    params = {"w": torch.ones(4)}
    _, state = tx.update({"w": torch.ones(4)}, tx.init(params), params)
    inner = state.inner_state
    assert inner["scalar"].dtype == torch.float32 and abs(float(inner["scalar"]) - 0.1) < 1e-7
    assert inner["m"].dtype == torch.bfloat16


@settings(deadline=None, max_examples=10, database=None)
@given(
    x=st.floats(-(2.0**100), 2.0**100, width=32, allow_subnormal=False).filter(lambda v: abs(v) > 2.0**-100),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_value_one_float32_ulp_below_a_bfloat16_step_rounds_down_at_rate_two_to_minus_16(x, seed):
    """Unbiased at the top of a bfloat16 interval: ``y``, the largest float32 whose top half is the
    bfloat16 ``lo`` (low 16 bits all ones, one float32 ulp below the next bfloat16 ``hi``), sits
    ``(2**16 - 1) / 2**16`` of the way from ``lo`` to ``hi``, so ``E[round(y)] = y`` needs it rounded
    down with probability exactly ``2**-16``. Over ``2**21`` draws that is Binomial(2**21, 2**-16):
    mean 32, sd about 5.7; the bounds 1 and 32 + 10 sd fail with probability below 1e-13."""
    lo_bits = np.array([x], dtype=np.float32).view(np.int32) & np.int32(-65536)
    y = float((lo_bits | np.int32(0xFFFF)).view(np.float32)[0])
    lo = float(lo_bits.view(np.float32)[0])
    n = 2**21
    r = stochastic_round_to_bfloat16(torch.full((n,), y), torch.Generator().manual_seed(seed)).double()
    down = int((r == lo).sum())
    assert set(r.unique().tolist()) <= {lo, float(np.nextafter(np.float32(y), np.float32(2 * y)))}
    mean, sd = n * 2.0**-16, math.sqrt(n * 2.0**-16 * (1 - 2.0**-16))
    assert 1 <= down <= mean + 10 * sd, (y, down)
