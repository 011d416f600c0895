"""fr.low_rank: a layer of numerical rank r becomes two thin layers with the same outputs.

Weights of a chosen rank are built with numpy from orthonormal factors and drawn singular values
(never torch's global RNG inside @given), so the rank and whether factoring saves parameters
(``r * (in + out) < in * out``) are known here, not read from the implementation.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from helpers import SLOW_OK
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import funcreg as fr


def make(cls, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
    """A module whose parameters are drawn from a fixed numpy generator (full rank; torch's global RNG
    untouched): ``skip_init`` alone leaves whatever the memory held, NaN included."""
    module = nn.utils.skip_init(cls, *args, **kwargs)
    rng = np.random.default_rng(99)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.from_numpy(rng.normal(scale=0.3, size=tuple(p.shape))))
    return module


def of_rank(rng: np.random.Generator, out_f: int, in_f: int, rank: int) -> np.ndarray:
    """``U diag(s) V^T`` with orthonormal ``U`` (out x rank), ``V`` (in x rank), ``s`` in [0.2, 5]."""
    u, _ = np.linalg.qr(rng.normal(size=(out_f, rank)))
    v, _ = np.linalg.qr(rng.normal(size=(in_f, rank)))
    s = rng.uniform(0.2, 5.0, size=rank)
    return (u * s) @ v.T


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if expected.dtype == torch.float64:
        torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-10)
    else:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def saves(rank: int, in_f: int, out_f: int) -> bool:
    return max(rank, 1) * (in_f + out_f) < in_f * out_f


@st.composite
def low_rank_layers(draw):  # noqa: ANN001, ANN201
    in_f = draw(st.integers(1, 24))
    out_f = draw(st.integers(1, 24))
    rank = draw(st.integers(0, min(in_f, out_f)))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return in_f, out_f, rank, dtype, bias, seed


@given(low_rank_layers())
@settings(deadline=None, max_examples=60, suppress_health_check=SLOW_OK)
def test_a_low_rank_linear_is_factored_exactly(case) -> None:  # noqa: ANN001
    in_f, out_f, rank, dtype, bias, seed = case
    rng = np.random.default_rng(seed)
    model = nn.Sequential(make(nn.Linear, in_f, out_f, bias=bias, dtype=dtype), nn.Tanh())
    w = of_rank(rng, out_f, in_f, rank) if rank else np.zeros((out_f, in_f))
    params = {"0.weight": torch.from_numpy(w).to(dtype)}
    if bias:
        params["0.bias"] = torch.from_numpy(rng.uniform(-1, 1, out_f)).to(dtype)
    before = {k: v.clone() for k, v in params.items()}
    small = fr.low_rank(model, params)
    x = torch.from_numpy(rng.normal(size=(7, in_f))).to(dtype)
    expected = functional_call(model, params, (x,))
    close(small(x), expected)
    for k, v in params.items():  # the given tensors are not modified
        assert torch.equal(v, before[k])
    if not saves(rank, in_f, out_f):
        assert isinstance(small[0], nn.Linear)
        close(small[0].weight, params["0.weight"])
        return
    first, second = small[0]
    assert (first.in_features, first.out_features, first.bias) == (in_f, max(rank, 1), None)
    assert (second.in_features, second.out_features, second.bias is not None) == (max(rank, 1), out_f, bias)
    assert first.weight.dtype == second.weight.dtype == dtype
    close(second.weight @ first.weight, params["0.weight"])
    if rank:  # the singular values are split evenly: both factors have singular values sqrt(s)
        s = torch.linalg.svdvals(params["0.weight"].double())[:rank]
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        for factor in (first.weight, second.weight):
            torch.testing.assert_close(torch.linalg.svdvals(factor.double()), s.sqrt(), atol=tol, rtol=tol)


@given(st.integers(1, 3), st.integers(0, 2), st.sampled_from(["zeros", "reflect"]), st.integers(0, 2**32 - 1))
@settings(deadline=None, max_examples=25, suppress_health_check=SLOW_OK)
def test_a_low_rank_1x1_convolution_keeps_its_stride_and_padding(stride, padding, mode, seed) -> None:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    conv = make(nn.Conv2d, 12, 10, 1, stride=stride, padding=padding, padding_mode=mode, dtype=torch.float64)
    model = nn.Sequential(conv, nn.ReLU())
    params = {
        "0.weight": torch.from_numpy(of_rank(rng, 10, 12, 2)).reshape(10, 12, 1, 1),
        "0.bias": torch.from_numpy(rng.uniform(-1, 1, 10)),
    }
    small = fr.low_rank(model, params)
    assert [m.out_channels for m in small[0]] == [2, 10]
    assert small[0][0].stride == conv.stride and small[0][1].stride == (1, 1)
    x = torch.from_numpy(rng.normal(size=(2, 12, 5, 6)))
    close(small(x), functional_call(model, params, (x,)))


def test_nuclear_norm_training_reaches_a_low_rank_that_low_rank_keeps() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 20, generator=gen)
    teacher = torch.randn(16, 3, generator=gen) @ torch.randn(3, 20, generator=gen) / 4  # rank 3
    y = x @ teacher.T + 0.01 * torch.randn(256, 16, generator=gen)
    model = nn.Sequential(make(nn.Linear, 20, 16), nn.Identity())
    init = {
        "0.weight": 0.1 * torch.randn(16, 20, generator=gen),
        "0.bias": torch.zeros(16),
    }

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(functional_call(model, p, (x,)), y)

    lr = 0.2
    penalty = fr.nuclear_norm(0.02, mask=fr.by_name("0.weight"))
    step = fr.make_step(loss_fn, fr.sgd(lr), penalty=penalty, form="proximal", learning_rate=lr)
    state = step.init(init)
    for _ in range(150):
        state, _ = step(state, x, y)
    rank = int(torch.linalg.matrix_rank(state.params["0.weight"]))
    assert rank == 3
    small = fr.low_rank(model, state.params)
    assert [m.out_features for m in small[0]] == [3, 16]
    close(small(x), functional_call(model, state.params, (x,)))
    report = fr.prune_report(model, small, x, state.params, repeats=1)
    assert (report.params_before, report.params_after) == (20 * 16 + 16, 3 * 20 + 3 * 16 + 16)
    assert report.max_abs_diff < 1e-5
    assert model[0].weight.shape == (16, 20)  # the model is not modified


def ranked_mlp(rng: np.random.Generator) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = nn.Sequential(
        make(nn.Linear, 16, 12, dtype=torch.float64), nn.ReLU(), make(nn.Linear, 12, 10, dtype=torch.float64)
    )
    params = {
        "0.weight": torch.from_numpy(of_rank(rng, 12, 16, 2)),
        "0.bias": torch.from_numpy(rng.uniform(-1, 1, 12)),
        "2.weight": torch.from_numpy(of_rank(rng, 10, 12, 1)),
        "2.bias": torch.from_numpy(rng.uniform(-1, 1, 10)),
    }
    return model, params


def test_selection_by_name_and_by_mask() -> None:
    model, params = ranked_mlp(np.random.default_rng(1))
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(4, 16)))
    expected = functional_call(model, params, (x,))
    every = fr.low_rank(model, params)
    assert isinstance(every[0], nn.Sequential) and isinstance(every[2], nn.Sequential)
    by_name = fr.low_rank(model, params, modules="2")
    assert isinstance(by_name[0], nn.Linear) and isinstance(by_name[2], nn.Sequential)
    by_mask = fr.low_rank(model, params, mask=fr.by_name("0.weight"))
    assert isinstance(by_mask[0], nn.Sequential) and isinstance(by_mask[2], nn.Linear)
    for small in (every, by_name, by_mask):
        assert not small.training
        close(small(x), expected)
    assert fr.low_rank(model, params, modules=["0", "2"])[2][0].out_features == 1


def test_tolerance_decides_the_rank() -> None:
    rng = np.random.default_rng(3)
    w = of_rank(rng, 12, 16, 4)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    s[2:4] = 1e-4 * s[0]  # two singular values that are small, not zero
    params = {"0.weight": torch.from_numpy((u * s) @ vt)}
    model = nn.Sequential(make(nn.Linear, 16, 12, dtype=torch.float64))
    assert fr.low_rank(model, params)[0][0].out_features == 4
    assert fr.low_rank(model, params, rtol=1e-3)[0][0].out_features == 2
    assert isinstance(fr.low_rank(model, params, rtol=0)[0], nn.Linear)  # rounding counts: full rank


def test_a_shared_layer_is_replaced_everywhere_and_requires_grad_follows() -> None:
    rng = np.random.default_rng(4)
    shared = make(nn.Linear, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        shared.weight.copy_(torch.from_numpy(of_rank(rng, 8, 8, 1)))
        shared.bias.copy_(torch.from_numpy(rng.uniform(-1, 1, 8)))
    shared.bias.requires_grad_(False)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    small = fr.low_rank(model)
    assert small[0] is small[2]
    assert small[0][0].weight.requires_grad and not small[0][1].bias.requires_grad
    x = torch.from_numpy(rng.normal(size=(3, 8)))
    close(small(x), model(x))
    assert isinstance(model[0], nn.Linear)  # the model is not modified


def test_attention_layers_are_left_and_their_mlp_is_factored() -> None:
    rng = np.random.default_rng(5)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=32, batch_first=True, dtype=torch.float64)
    block = nn.Sequential(
        make(nn.Linear, 8, 32, dtype=torch.float64), nn.GELU(), make(nn.Linear, 32, 8, dtype=torch.float64)
    )
    model = nn.ModuleDict({"enc": layer, "mlp": block})
    params = {k: v.detach().clone() for k, v in fr.params_of(model).items()}
    params["mlp.0.weight"] = torch.from_numpy(of_rank(rng, 32, 8, 1))
    params["enc.linear1.weight"] = torch.from_numpy(of_rank(rng, 32, 8, 1))
    small = fr.low_rank(model, params)
    assert isinstance(small["mlp"][0], nn.Sequential)
    assert isinstance(small["enc"].linear1, nn.Linear)  # torch's fast path reads its weight
    assert isinstance(small["enc"].self_attn.out_proj, nn.Linear)
    with pytest.raises(ValueError, match=r"'enc.linear1' is a layer of a TransformerEncoderLayer"):
        fr.low_rank(model, params, modules="enc.linear1")
    with pytest.raises(ValueError, match=r"'enc.self_attn.out_proj' is a layer of a MultiheadAttention"):
        fr.low_rank(model, params, mask=fr.by_name("enc.self_attn.out_proj.weight"))


def test_refusals() -> None:
    model, params = ranked_mlp(np.random.default_rng(6))
    with pytest.raises(ValueError, match="no Linear or 1x1 Conv2d layer to factor"):
        fr.low_rank(nn.Sequential(nn.ReLU(), nn.Tanh()))
    with pytest.raises(ValueError, match=r"modules='enc' selects no Linear .*names are: '0'"):
        fr.low_rank(nn.Sequential(nn.Linear(2, 2)), modules="enc")
    with pytest.raises(ValueError, match=r"modules='3' selects no Linear"):
        fr.low_rank(model, params, modules=["0", "3"])
    with pytest.raises(ValueError, match=r"'0' is a Conv2d with kernel \(3, 3\)"):
        fr.low_rank(nn.Sequential(nn.Conv2d(3, 4, 3)), modules="0")
    with pytest.raises(ValueError, match="selects the weight of no Linear"):
        fr.low_rank(model, params, mask=fr.by_name("0.bias"))
    with pytest.raises(ValueError, match="modules= or mask=, not both"):
        fr.low_rank(model, params, modules="0", mask=fr.by_name("0.weight"))
    with pytest.raises(TypeError, match="modules must be a module name"):
        fr.low_rank(model, params, modules=[0])  # type: ignore[list-item]
    for bad in (-1e-3, 1.0, math.nan, True, "1e-6"):
        with pytest.raises(ValueError, match="Invalid rtol value"):
            fr.low_rank(model, params, rtol=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"low_rank: params has a key '0.wieght'"):
        fr.low_rank(model, {"0.wieght": params["0.weight"]})
    with pytest.raises(TypeError, match="wrap it"):
        fr.low_rank(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        fr.low_rank(params)  # type: ignore[arg-type]
    before = copy.deepcopy(model.state_dict())
    fr.low_rank(model, params)
    for k, v in model.state_dict().items():  # bit for bit
        assert torch.equal(v, before[k]), k
