"""Groups across tensors: fr.joint_group_lasso, fr.head_lasso / fr.attention_heads, and fr.prune on
attention heads and on a first layer's inputs.

The references here are written from the definitions, not from the implementation: a group's members
are found by explicit index arithmetic (block ``b`` of a piece belongs to group ``b % G``; head ``h``
of an ``nn.MultiheadAttention`` owns rows ``blk * E + h * d ...`` of ``in_proj_weight``), the prox is the
block soft threshold written out, and pruned models are compared with the original through
``torch.func.functional_call``. Every tensor is drawn with numpy (never torch's global RNG).
"""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from helpers import SLOW_OK
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import funcreg as fr

F64 = torch.float64


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if expected.dtype == F64:
        torch.testing.assert_close(actual, expected, atol=1e-11, rtol=1e-10)
    else:
        torch.testing.assert_close(actual, expected, atol=2e-6, rtol=1e-5)


def fill(model: nn.Module, rng: np.random.Generator, dtype: torch.dtype = F64) -> nn.Module:
    """Every parameter drawn with numpy: N(0, 1/fan_in), biases uniform in [-0.5, 0.5]."""
    model = model.to(dtype)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if t.ndim == 1 or "bias" in name.rsplit(".", 1)[-1]:
                t.copy_(torch.from_numpy(rng.uniform(-0.5, 0.5, t.shape)))
            else:
                t.copy_(torch.from_numpy(rng.normal(0.0, 1.0 / math.sqrt(t.shape[-1]), t.shape)))
    return model.eval()


def make(cls, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
    """A module without random initialisation (torch's global RNG untouched)."""
    return nn.utils.skip_init(cls, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------
# joint_group_lasso: value, gradient and prox against the definition


def group_ids(n: int, block: int, groups: int) -> np.ndarray:
    return (np.arange(n) // block) % groups


def reference_norms(arrays: dict, pieces: dict, groups: int) -> tuple[np.ndarray, int]:
    sq = np.zeros(groups)
    size = 0
    for name, (axis, block) in pieces.items():
        a = arrays[name]
        gid = group_ids(a.shape[axis], block, groups)
        for g in range(groups):
            sq[g] += (np.take(a, np.nonzero(gid == g)[0], axis=axis) ** 2).sum()
        size += a.size // groups
    return np.sqrt(sq), size


def broadcast(factor: np.ndarray, a: np.ndarray, axis: int, block: int, groups: int) -> np.ndarray:
    shape = [1] * a.ndim
    shape[axis] = a.shape[axis]
    return factor[group_ids(a.shape[axis], block, groups)].reshape(shape)


@st.composite
def joint_problems(draw):  # noqa: ANN001, ANN201
    groups = draw(st.integers(1, 4))
    pieces = {}
    shapes = {}
    for i in range(draw(st.integers(1, 3))):
        ndim = draw(st.integers(1, 3))
        axis = draw(st.integers(0, ndim - 1))
        block = draw(st.integers(1, 3))
        shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
        shape[axis] = draw(st.integers(1, 2)) * groups * block
        pieces[f"p{i}"] = (axis, block)
        shapes[f"p{i}"] = tuple(shape)
    zero = draw(st.lists(st.booleans(), min_size=groups, max_size=groups))
    seed = draw(st.integers(0, 2**32 - 1))
    coeff = draw(st.floats(0.0, 2.0))
    step = draw(st.floats(0.0, 2.0))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in shapes.items():
        a = rng.normal(0.0, scale, shape)
        axis, block = pieces[name]
        a = a * broadcast(1.0 - np.array(zero, dtype=float), a, axis, block, groups)
        arrays[name] = a
    return groups, pieces, arrays, coeff, step


@settings(deadline=None, max_examples=60, suppress_health_check=SLOW_OK)
@given(joint_problems())
def test_joint_group_lasso_value_and_prox_follow_the_closed_form(case) -> None:  # noqa: ANN001
    groups, pieces, arrays, coeff, step = case
    P = fr.joint_group_lasso(coeff, pieces, groups)
    params = {k: torch.from_numpy(v) for k, v in arrays.items()}
    norms, size = reference_norms(arrays, pieces, groups)
    close(P(params), torch.tensor(coeff * math.sqrt(size) * norms.sum(), dtype=F64))
    t = step * coeff * math.sqrt(size)
    safe = np.where(norms > 0, norms, 1.0)
    factor = np.where(norms > 0, np.maximum(0.0, 1.0 - t / safe), 0.0)
    z = P.prox(params, step)
    for name, (axis, block) in pieces.items():
        expected = arrays[name] * broadcast(factor, arrays[name], axis, block, groups)
        close(z[name], torch.from_numpy(expected))
    # optimality: v - z = t * z_g / ||z_g|| on a nonzero group, ||v_g|| <= t on a zero one
    znorms, _ = reference_norms({k: v.numpy() for k, v in z.items()}, pieces, groups)
    for g in range(groups):
        if znorms[g] == 0:
            assert norms[g] <= t * (1 + 1e-12) + 1e-300
    for name, (axis, block) in pieces.items():
        zs = z[name].numpy()
        unit = zs / broadcast(np.where(znorms > 0, znorms, 1.0), zs, axis, block, groups)
        nonzero = broadcast((znorms > 0).astype(float), zs, axis, block, groups)
        np.testing.assert_allclose((arrays[name] - zs) * nonzero, t * unit * nonzero, atol=1e-10, rtol=1e-9)


@settings(deadline=None, max_examples=40, suppress_health_check=SLOW_OK)
@given(joint_problems())
def test_joint_group_lasso_gradient_agrees_with_autograd_and_finite_differences(case) -> None:  # noqa: ANN001
    groups, pieces, arrays, coeff, _ = case
    P = fr.joint_group_lasso(coeff, pieces, groups)
    params = {k: torch.from_numpy(v) for k, v in arrays.items()}
    g = P.grad(params)
    auto = torch.func.grad(P)(params)
    for k in params:
        close(g[k], auto[k])
    norms, _ = reference_norms(arrays, pieces, groups)
    if not (norms > 1e-3).all():
        return  # a zero group is a kink: finite differences only away from them
    rng = np.random.default_rng(0)
    direction = {k: torch.from_numpy(rng.normal(size=v.shape)) for k, v in arrays.items()}
    eps = 1e-6
    plus = P({k: params[k] + eps * direction[k] for k in params})
    minus = P({k: params[k] - eps * direction[k] for k in params})
    fd = float((plus - minus) / (2 * eps))
    analytic = float(sum((g[k] * direction[k]).sum() for k in params))
    assert abs(fd - analytic) <= 1e-6 + 1e-6 * abs(analytic)


def test_joint_group_lasso_gradient_is_zero_on_a_zero_group() -> None:
    P = fr.joint_group_lasso(1.0, {"w": 0, "b": 0}, num_groups=2)
    params = {"w": torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=F64), "b": torch.zeros(2, dtype=F64)}
    g = P.grad(params)
    assert torch.equal(g["w"][0], torch.zeros(2, dtype=F64))
    close(g["w"][1], math.sqrt(3) * torch.tensor([0.6, 0.8], dtype=F64))
    assert torch.equal(g["b"], torch.zeros(2, dtype=F64))


def test_joint_group_lasso_prox_is_vmappable_over_members() -> None:
    rng = np.random.default_rng(1)
    stacked = {
        "w": torch.from_numpy(rng.normal(size=(3, 4, 2))),
        "b": torch.from_numpy(rng.normal(size=(3, 4))),
    }
    P = fr.joint_group_lasso(0.4, {"w": 0, "b": 0}, num_groups=4)
    out = torch.func.vmap(lambda p: P.prox(p, 1.0))(stacked)
    for i in range(3):
        one = P.prox({k: v[i] for k, v in stacked.items()}, 1.0)
        for k in one:
            close(out[k][i], one[k])


# ----------------------------------------------------------------------------------------------------
# attention_heads: the groups are each head's rows of q, k, v and columns of the output projection


def mha_head_norm(mha: nn.MultiheadAttention, params: dict, h: int) -> float:
    e, d = mha.embed_dim, mha.head_dim
    rows = slice(h * d, (h + 1) * d)
    sq = 0.0
    if mha._qkv_same_embed_dim:
        w = params["in_proj_weight"]
        sq += sum(float((w[blk * e : (blk + 1) * e][rows] ** 2).sum()) for blk in range(3))
    else:
        sq += sum(float((params[f"{n}_proj_weight"][rows] ** 2).sum()) for n in "qkv")
    if mha.in_proj_bias is not None:
        b = params["in_proj_bias"]
        sq += sum(float((b[blk * e : (blk + 1) * e][rows] ** 2).sum()) for blk in range(3))
    if mha.bias_k is not None:
        sq += float((params["bias_k"][..., rows] ** 2).sum()) + float(
            (params["bias_v"][..., rows] ** 2).sum()
        )
    sq += float((params["out_proj.weight"][:, rows] ** 2).sum())
    return math.sqrt(sq)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"bias": False}, {"add_bias_kv": True}, {"kdim": 3, "vdim": 5}, {"batch_first": True}],
)
def test_heads_of_multihead_attention_are_its_rows_and_columns(kwargs) -> None:  # noqa: ANN001
    mha = fill(make(nn.MultiheadAttention, 6, 3, **kwargs), np.random.default_rng(2))
    (spec,) = fr.attention_heads(mha)
    assert (spec.kind, spec.num_heads, spec.head_dim) == ("multihead_attention", 3, 2)
    params = fr.params_of(mha)
    expected = [mha_head_norm(mha, params, h) for h in range(3)]
    close(spec.norms(params), torch.tensor(expected, dtype=F64))
    P = fr.head_lasso(0.3, mha)
    size = sum(params[name].numel() for name, _, _ in spec.pieces) // 3
    close(P(params), torch.tensor(0.3 * math.sqrt(size) * sum(expected), dtype=F64))


class HFAttention(nn.Module):
    """Hugging Face style: separate q/k/v/o projections, heads split with ``self.num_heads``."""

    def __init__(self, embed: int, heads: int, bias: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, embed // heads
        self.q_proj = nn.Linear(embed, embed, bias=bias)
        self.k_proj = nn.Linear(embed, embed, bias=bias)
        self.v_proj = nn.Linear(embed, embed, bias=bias)
        self.o_proj = nn.Linear(embed, embed, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(n, length, self.num_heads * self.head_dim)
        return self.o_proj(out)


class BertLikeSelf(nn.Module):
    def __init__(self, embed: int, heads: int) -> None:
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, embed // heads
        self.all_head_size = embed
        self.query, self.key, self.value = (nn.Linear(embed, embed) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, -1, self.attention_head_size).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.attention_head_size), dim=-1)
        return (weights @ v).transpose(1, 2).reshape(n, length, self.all_head_size)


class BertLikeOutput(nn.Module):
    def __init__(self, embed: int) -> None:
        super().__init__()
        self.dense = nn.Linear(embed, embed)
        self.norm = nn.LayerNorm(embed)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dense(h) + x)


class BertLikeAttention(nn.Module):
    """BERT's layout: the projections in ``self``, the output projection in ``output.dense``."""

    def __init__(self, embed: int, heads: int) -> None:
        super().__init__()
        self.self = BertLikeSelf(embed, heads)
        self.output = BertLikeOutput(embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


def test_heads_of_separate_projections_are_found_by_their_names() -> None:
    model = fill(HFAttention(6, 3), np.random.default_rng(3))
    (spec,) = fr.attention_heads(model)
    assert (spec.kind, spec.q, spec.k, spec.v, spec.o) == (
        "projections",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    )
    assert spec.count_attrs == (("", "num_heads"),)
    params = fr.params_of(model)
    expected = []
    for h in range(3):
        rows = slice(2 * h, 2 * h + 2)
        sq = sum(
            float((params[f"{n}_proj.weight"][rows] ** 2).sum() + (params[f"{n}_proj.bias"][rows] ** 2).sum())
            for n in "qkv"
        )
        expected.append(math.sqrt(sq + float((params["o_proj.weight"][:, rows] ** 2).sum())))
    close(spec.norms(params), torch.tensor(expected, dtype=F64))
    (bert,) = fr.attention_heads(BertLikeAttention(8, 2))
    assert (bert.q, bert.o, bert.num_heads, bert.count_attrs) == (
        "self.query", "output.dense", 2, (("self", "num_attention_heads"),)
    )  # fmt: skip


def test_module_names_and_head_counts_can_be_given() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wq, self.wk, self.wv, self.wo = (nn.Linear(4, 4) for _ in range(4))

    with pytest.raises(
        ValueError, match=r"no attention layer in Custom: expected an nn.MultiheadAttention .*'q_proj'"
    ):
        fr.attention_heads(Custom())
    with pytest.raises(ValueError, match=r"no head count .* pass num_heads="):
        fr.attention_heads(Custom(), q="wq", k="wk", v="wv", o="wo")
    (spec,) = fr.attention_heads(Custom(), num_heads=2, q="wq", k="wk", v="wv", o="wo")
    assert (spec.num_heads, spec.head_dim, spec.q) == (2, 2, "wq")
    with pytest.raises(ValueError, match=r"no attention layer in Custom: .*q in \('nope',\)"):
        fr.attention_heads(Custom(), q="nope")


def test_attention_heads_refuses_what_it_cannot_split() -> None:
    class NoOutput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_heads = 2
            self.query, self.key, self.value = (nn.Linear(4, 4) for _ in range(3))

    with pytest.raises(ValueError, match=r"has query, key and value projections .* but no output projection"):
        fr.attention_heads(NoOutput())

    class GroupedQuery(HFAttention):
        def __init__(self) -> None:
            super().__init__(8, 4)
            self.k_proj = nn.Linear(8, 4)

    with pytest.raises(ValueError, match=r"grouped- or multi-query attention .* is not supported"):
        fr.attention_heads(GroupedQuery())
    with pytest.raises(ValueError, match=r"not multiples of its 3 heads"):
        fr.attention_heads(HFAttention(8, 4), num_heads=3)


# ----------------------------------------------------------------------------------------------------
# head_lasso in the four forms, in sums, pickled


def test_head_lasso_in_every_form() -> None:
    mha = fill(make(nn.MultiheadAttention, 4, 2), np.random.default_rng(4))
    P = fr.head_lasso(0.2, mha)
    params = fr.params_of(mha)
    grads = {k: torch.from_numpy(np.random.default_rng(5).normal(size=v.shape)) for k, v in params.items()}
    total, metrics = fr.penalized(lambda p: sum((v**2).sum() for v in p.values()), P)(params)
    close(metrics["penalty/head_lasso"], P(params))
    coupled = fr.add_penalty_grad(P)
    u, _ = coupled.update(grads, coupled.init(params), params)
    for k in params:
        close(u[k], grads[k] + P.grad(params)[k])
    dec = fr.decoupled(P, learning_rate=0.1)
    u, _ = dec.update(grads, dec.init(params), params)
    for k in params:
        close(u[k], grads[k] - 0.1 * P.grad(params)[k])
    prox = fr.proximal(P, learning_rate=0.5)
    u, _ = prox.update(grads, prox.init(params), params)
    expected = P.prox({k: params[k] + grads[k] for k in params}, 0.5)
    for k in params:
        close(params[k] + u[k], expected[k])


def test_a_quadratic_on_all_of_a_head_folds_into_the_prox_one_on_part_of_it_raises() -> None:
    mha = fill(make(nn.MultiheadAttention, 4, 2), np.random.default_rng(6))
    params = fr.params_of(mha)
    P = fr.head_lasso(0.2, mha)
    both = P + fr.l2(0.5)
    # prox of t(H + c/2 |w|^2) = prox_{t/(1+tc) H}(v / (1 + tc)); the out_proj bias only shrinks
    z = both.prox(params, 1.0)
    inner = P.prox({k: v / 1.5 for k, v in params.items()}, 1.0 / 1.5)
    for k in params:
        close(z[k], inner[k] if k != "out_proj.bias" else params[k] / 1.5)
    part = P + fr.l2(0.5, mask=fr.by_name("in_proj_weight"))
    with pytest.raises(ValueError, match=r"one group's norm needs all its tensors"):
        part.prox(params, 1.0)


def test_head_lasso_names_missing_parameters_and_refuses_per_leaf_coefficients() -> None:
    mha = make(nn.MultiheadAttention, 4, 2)
    P = fr.head_lasso(0.1, mha)
    params = fr.params_of(mha)
    renamed = {("attn." + k): v for k, v in params.items()}
    with pytest.raises(
        ValueError, match=r"include parameter 'in_proj_weight', which these parameters do not have"
    ):
        P(renamed)
    with pytest.raises(TypeError, match=r"one number or a 0-d tensor"):
        fr.head_lasso({"in_proj_weight": 0.1}, mha)
    with pytest.raises(TypeError, match=r"heads must be a model, an AttentionHeads"):
        fr.head_lasso(0.1, [])
    (spec,) = fr.attention_heads(mha)
    with pytest.raises(ValueError, match=r"the groups overlap on 'in_proj_bias'"):
        fr.head_lasso(0.1, [spec, spec])
    with pytest.raises(ValueError, match=r"'w' has 3 slices along axis 0, expected a multiple of 2 groups"):
        fr.joint_group_lasso(0.1, {"w": 0}, 2)({"w": torch.ones(3, 2)})


def test_head_lasso_prints_pickles_and_deepcopies() -> None:
    mha = fill(make(nn.MultiheadAttention, 4, 2), np.random.default_rng(7))
    P = fr.head_lasso(0.1, mha)
    assert repr(P) == "head_lasso(0.1, <2 heads of ''>)"
    assert repr(fr.joint_group_lasso(0.5, {"w": (1, 2)}, 3)) == "joint_group_lasso(0.5, {'w': (1, 2)}, 3)"
    params = fr.params_of(mha)
    for other in (pickle.loads(pickle.dumps(P)), copy.deepcopy(P)):
        assert repr(other) == repr(P)
        assert torch.equal(other(params), P(params))


def test_proximal_training_zeroes_whole_heads_that_prune_then_removes() -> None:
    """A teacher with 2 of 4 heads active; proximal Adam with head_lasso leaves 2 heads, exactly 0."""
    rng = np.random.default_rng(0)
    e, h, d = 8, 4, 2
    mha = make(nn.MultiheadAttention, e, h, batch_first=True)

    def draw(shape: torch.Size) -> torch.Tensor:
        return torch.from_numpy(rng.normal(0, 1 / np.sqrt(e), shape)).float()

    teacher = {k: draw(v.shape) for k, v in fr.params_of(mha).items()}
    for head in (2, 3):
        for blk in range(3):
            teacher["in_proj_weight"][blk * e + head * d : blk * e + (head + 1) * d] = 0
            teacher["in_proj_bias"][blk * e + head * d : blk * e + (head + 1) * d] = 0
        teacher["out_proj.weight"][:, head * d : (head + 1) * d] = 0
    x = torch.from_numpy(rng.normal(size=(64, 6, e))).float()
    with torch.no_grad():
        y = functional_call(mha, teacher, (x, x, x), {"need_weights": False})[0]

    def loss_fn(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(mha, p, (x, x, x), {"need_weights": False})[0]
        return torch.nn.functional.mse_loss(out, y)

    (spec,) = fr.attention_heads(mha)
    step = fr.make_step(
        loss_fn, fr.adam(0.02), penalty=fr.head_lasso(0.2, spec), form="proximal", learning_rate=0.02
    )
    state = step.init({k: draw(v.shape) for k, v in teacher.items()})
    for _ in range(200):
        state, _ = step(state, x, y)
    norms = spec.norms(state.params)
    assert int((norms == 0).sum()) == 2, norms
    assert float(loss_fn(state.params, x, y)) < 0.01
    small = fr.prune(mha, state.params)
    assert isinstance(small, fr.PrunedMultiheadAttention) and small.num_heads == 2
    full = functional_call(mha, state.params, (x, x, x), {"need_weights": False})[0]
    close(small(x, x, x, need_weights=False)[0], full)


# ----------------------------------------------------------------------------------------------------
# prune: heads go when they add exactly 0; outputs stay equal


PATTERNS = ("none", "all", "value", "output", "query_key")


def zero_head(params: dict, mha: nn.MultiheadAttention, h: int, pattern: str, prefix: str = "") -> None:
    """Zeroes the parts of head ``h`` that ``pattern`` names (``params`` keyed as ``prefix + name``)."""
    if prefix:
        view = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
        zero_head(view, mha, h, pattern)  # the views share the tensors: zeroed in place
        return
    e, d = mha.embed_dim, mha.head_dim
    rows = slice(h * d, (h + 1) * d)
    blocks = {"all": (0, 1, 2), "value": (2,), "query_key": (0, 1), "output": (), "none": ()}[pattern]
    for blk in blocks:
        if mha._qkv_same_embed_dim:
            params["in_proj_weight"][blk * e : (blk + 1) * e][rows] = 0
        else:
            params[f"{'qkv'[blk]}_proj_weight"][rows] = 0
        if mha.in_proj_bias is not None:
            params["in_proj_bias"][blk * e : (blk + 1) * e][rows] = 0
        if mha.bias_k is not None and blk in (1, 2):
            params["bias_k" if blk == 1 else "bias_v"][..., rows] = 0
    if pattern in ("all", "output"):
        params["out_proj.weight"][:, rows] = 0


@st.composite
def attention_cases(draw):  # noqa: ANN001, ANN201
    heads = draw(st.integers(1, 4))
    d = draw(st.integers(1, 3))
    options = {
        "bias": draw(st.booleans()),
        "add_bias_kv": draw(st.booleans()),
        "add_zero_attn": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
    }
    if draw(st.booleans()):
        options["kdim"], options["vdim"] = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    patterns = draw(st.lists(st.sampled_from(PATTERNS), min_size=heads, max_size=heads))
    mask = draw(st.sampled_from(["none", "padding", "float2d", "bool3d"]))
    dtype = draw(st.sampled_from([torch.float32, F64]))
    return heads, d, options, patterns, mask, dtype, draw(st.integers(0, 2**32 - 1))


def expected_kept(patterns: list[str]) -> int:
    removed = [p in ("all", "value", "output") for p in patterns]
    return max(1, removed.count(False))


@settings(deadline=None, max_examples=60, suppress_health_check=SLOW_OK)
@given(attention_cases())
def test_pruned_multihead_attention_equals_the_original(case) -> None:  # noqa: ANN001
    heads, d, options, patterns, mask, dtype, seed = case
    rng = np.random.default_rng(seed)
    e = heads * d
    mha = fill(make(nn.MultiheadAttention, e, heads, **options), rng, dtype)
    params = {k: v.clone() for k, v in fr.params_of(mha).items()}
    for h, pattern in enumerate(patterns):
        zero_head(params, mha, h, pattern)
    n, length, s = 2, 3, 4
    kdim, vdim = options.get("kdim", e), options.get("vdim", e)

    def seq(dim: int, size: int) -> torch.Tensor:
        shape = (n, size, dim) if options["batch_first"] else (size, n, dim)
        return torch.from_numpy(rng.normal(size=shape)).to(dtype)

    q, k, v = seq(e, length), seq(kdim, s), seq(vdim, s)
    kwargs: dict = {"need_weights": False}
    if mask == "padding":
        pad = torch.from_numpy(rng.random((n, s)) < 0.4)
        pad[:, 0] = False  # every query sees a key
        kwargs["key_padding_mask"] = pad
    elif mask == "float2d":
        kwargs["attn_mask"] = torch.from_numpy(rng.normal(size=(length, s))).to(dtype)
    elif mask == "bool3d":
        m3 = torch.from_numpy(rng.random((n * heads, length, s)) < 0.4)
        m3[..., 0] = False
        kwargs["attn_mask"] = m3
    small = fr.prune(mha, params)
    full = functional_call(mha, params, (q, k, v), kwargs)[0]
    kept = expected_kept(patterns)
    if kept == heads:
        assert isinstance(small, nn.MultiheadAttention)
    else:
        assert isinstance(small, fr.PrunedMultiheadAttention)
        assert small.num_heads == kept and small.q_proj.out_features == kept * d
    close(small(q, k, v, **kwargs)[0], full)


def test_pruned_attention_returns_the_kept_heads_weights_and_takes_unbatched_inputs() -> None:
    rng = np.random.default_rng(8)
    mha = fill(make(nn.MultiheadAttention, 6, 3), rng)
    params = {k: v.clone() for k, v in fr.params_of(mha).items()}
    zero_head(params, mha, 1, "all")
    small = fr.prune(mha, params)
    assert small.kept_heads == (0, 2)
    x = torch.from_numpy(rng.normal(size=(4, 2, 6)))
    out, w = functional_call(mha, params, (x, x, x), {"average_attn_weights": False})
    out_s, w_s = small(x, x, x, average_attn_weights=False)
    close(out_s, out)
    close(w_s, w[:, [0, 2]])
    close(small(x, x, x)[1], w[:, [0, 2]].mean(dim=1))
    one = x[:, 0]
    close(small(one, one, one)[0], functional_call(mha, params, (one, one, one))[0])


def test_a_pruned_attention_prunes_again() -> None:
    rng = np.random.default_rng(9)
    mha = fill(make(nn.MultiheadAttention, 8, 4, add_bias_kv=True), rng)
    params = {k: v.clone() for k, v in fr.params_of(mha).items()}
    zero_head(params, mha, 0, "all")
    small = fr.prune(mha, params)
    again = {k: v.clone() for k, v in fr.params_of(small).items()}
    again["out_proj.weight"][:, 2:4] = 0  # the second kept head: the original head 2
    again["v_proj.weight"][4:6] = 0  # the third: its values are zero but its bias_v token is not
    again["v_proj.bias"][4:6] = 0
    (spec,) = fr.attention_heads(small)
    assert {"bias_k", "bias_v"} <= {name for name, _, _ in spec.pieces}
    smaller = fr.prune(small, again)
    assert isinstance(smaller, fr.PrunedMultiheadAttention)
    assert smaller.kept_heads == (1, 3) and smaller.num_heads == 2 and smaller.bias_k.shape == (1, 1, 4)
    x = torch.from_numpy(rng.normal(size=(3, 2, 8)))
    m3 = torch.from_numpy(rng.random((2 * 4, 3, 3)) < 0.3)
    m3[..., 0] = False
    kwargs = {"attn_mask": m3, "need_weights": False}
    close(smaller(x, x, x, **kwargs)[0], functional_call(small, again, (x, x, x), kwargs)[0])
    # a per-head mask must hold one (L, S) plane per example and original head
    for wrong in (m3[:-1], m3[None]):
        with pytest.raises(RuntimeError, match=r"expected \(L, S\) or \(2 \* 4 original heads, L, S\)"):
            smaller(x, x, x, attn_mask=wrong, need_weights=False)


@pytest.mark.parametrize("pattern", ["all", "value", "output"])
def test_hf_style_attention_loses_its_zero_heads_and_its_head_count_follows(pattern) -> None:  # noqa: ANN001
    rng = np.random.default_rng(10)
    model = fill(HFAttention(8, 4), rng)
    params = {k: v.clone() for k, v in fr.params_of(model).items()}
    for head in (1, 2):
        rows = slice(2 * head, 2 * head + 2)
        if pattern in ("all", "value"):
            params["v_proj.weight"][rows] = 0
            params["v_proj.bias"][rows] = 0
        if pattern == "all":
            for n in "qk":
                params[f"{n}_proj.weight"][rows] = 0
                params[f"{n}_proj.bias"][rows] = 0
        if pattern in ("all", "output"):
            params["o_proj.weight"][:, rows] = 0
    small = fr.prune(model, params)
    assert small.num_heads == 2 and small.q_proj.out_features == 4 and small.o_proj.in_features == 4
    x = torch.from_numpy(rng.normal(size=(2, 5, 8)))
    close(small(x), functional_call(model, params, (x,)))
    assert model.num_heads == 4  # the original is not touched


def test_bert_style_attention_is_pruned_with_its_nested_head_count() -> None:
    rng = np.random.default_rng(11)
    model = fill(BertLikeAttention(8, 4), rng)
    params = {k: v.clone() for k, v in fr.params_of(model).items()}
    params["output.dense.weight"][:, 0:2] = 0
    small = fr.prune(model, params)
    assert small.self.num_attention_heads == 3 and small.self.all_head_size == 6
    x = torch.from_numpy(rng.normal(size=(2, 5, 8)))
    close(small(x), functional_call(model, params, (x,)))


class Block(nn.Module):
    """A pre-norm transformer block: attention, then an MLP that is an nn.Sequential chain."""

    def __init__(self, embed: int = 8, heads: int = 4, hidden: int = 12) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(embed), nn.LayerNorm(embed)
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(embed, hidden), nn.GELU(), nn.Linear(hidden, embed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def test_a_transformer_block_loses_heads_and_mlp_units_and_keeps_its_outputs() -> None:
    rng = np.random.default_rng(12)
    model = nn.Sequential(fill(Block(), rng), fill(Block(), rng))
    params = {k: v.clone() for k, v in fr.params_of(model).items()}
    zero_head(params, model[0].attn, 3, "all", prefix="0.attn.")
    params["1.attn.out_proj.weight"][:, 0:4] = 0  # heads 0 and 1 of the second block
    params["0.mlp.0.weight"][2:7] = 0
    params["1.mlp.2.weight"][:, 5:9] = 0
    small = fr.prune(model, params)
    assert small[0].attn.num_heads == 3 and small[1].attn.num_heads == 2
    assert small[0].mlp[0].out_features == 7 and small[1].mlp[0].out_features == 8
    x = torch.from_numpy(rng.normal(size=(3, 5, 8)))
    close(small(x), functional_call(model, params, (x,)))
    report = fr.prune_report(model, small, x, params, repeats=2)
    sizes = {s.name: (s.units_before, s.units_after) for s in report.layers}
    assert sizes["0.attn"] == (4, 3) and sizes["1.attn"] == (4, 2)
    assert report.flops_after < report.flops_before and report.max_abs_diff < 1e-10


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_torch_transformer_encoder_layers_prune_and_keep_their_outputs() -> None:
    rng = np.random.default_rng(13)
    layer = make(nn.TransformerEncoderLayer, 8, 4, dim_feedforward=16, dropout=0.0, batch_first=True)
    encoder = fill(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True), rng, torch.float32)
    params = {k: v.clone() for k, v in fr.params_of(encoder).items()}
    params["layers.0.self_attn.out_proj.weight"][:, 2:6] = 0
    params["layers.1.self_attn.in_proj_weight"][16:18] = 0
    params["layers.1.self_attn.in_proj_bias"][16:18] = 0
    small = fr.prune(encoder, params)
    assert [lay.self_attn.num_heads for lay in small.layers] == [2, 3]
    x = torch.from_numpy(rng.normal(size=(3, 5, 8))).float()
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 3:] = True
    with torch.no_grad():  # the inference path, where torch would take its fused kernels
        full = functional_call(encoder, params, (x,), {"src_key_padding_mask": pad})
        out = small(x, src_key_padding_mask=pad)
    keep = ~pad  # the nested-tensor path returns zeros at padded positions: compare the others
    close(out[keep], full[keep])


def test_heads_false_leaves_attention_and_a_model_without_either_raises() -> None:
    mha = fill(make(nn.MultiheadAttention, 4, 2), np.random.default_rng(14))
    params = {k: v.clone() for k, v in fr.params_of(mha).items()}
    zero_head(params, mha, 0, "all")
    with pytest.raises(
        TypeError, match=r"prune expects an nn.Sequential .* or a model with attention layers"
    ):
        fr.prune(mha, params, heads=False)
    with pytest.raises(TypeError, match=r"heads must be None"):
        fr.prune(mha, params, heads="attn")
    (other,) = fr.attention_heads(nn.ModuleDict({"attn": make(nn.MultiheadAttention, 4, 2)}))
    with pytest.raises(ValueError, match=r"names the tensor 'attn.in_proj_weight' .* does not have"):
        fr.prune(mha, params, heads=other)


# ----------------------------------------------------------------------------------------------------
# prune(inputs=True): a first layer's zero input columns go, a SelectInputs picks the rest


@settings(deadline=None, max_examples=40, suppress_health_check=SLOW_OK)
@given(
    st.integers(1, 6),
    st.lists(st.booleans(), min_size=6, max_size=6),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_zero_input_columns_of_the_first_linear_go(n_in, zero, conv, seed) -> None:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    zero = zero[:n_in]
    if conv:
        model = nn.Sequential(
            make(nn.Conv2d, n_in, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), make(nn.Linear, 3 * 16, 2)
        )
        x = torch.from_numpy(rng.normal(size=(2, n_in, 4, 4)))
    else:
        model = nn.Sequential(make(nn.Linear, n_in, 4), nn.Tanh(), make(nn.Linear, 4, 2))
        x = torch.from_numpy(rng.normal(size=(3, n_in)))
    fill(model, rng)
    params = {k: v.clone() for k, v in fr.params_of(model).items()}
    cols = [i for i, z in enumerate(zero) if z]
    params["0.weight"][:, cols] = 0
    small = fr.prune(model, params, inputs=True)
    kept = [i for i, z in enumerate(zero) if not z] or [0]
    if len(kept) < n_in:
        assert isinstance(small[0], fr.SelectInputs) and small[0].index.tolist() == kept
        first = small[1]
    else:
        first = small[0]
    assert first.weight.shape[1] == len(kept)
    close(small(x), functional_call(model, params, (x,)))


def test_group_lasso_on_columns_then_prune_removes_the_inputs_that_do_not_matter() -> None:
    rng = np.random.default_rng(15)
    x = torch.from_numpy(rng.normal(size=(128, 6))).float()
    y = x[:, :2] @ torch.tensor([[1.0], [-2.0]])
    model = fill(nn.Sequential(make(nn.Linear, 6, 8), nn.ReLU(), make(nn.Linear, 8, 1)), rng, torch.float32)

    def loss_fn(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(functional_call(model, p, (x,)), y)

    columns = fr.group_lasso(0.05, axis=1, mask=fr.by_name("0.weight"))  # one group per input
    step = fr.make_step(loss_fn, fr.sgd(0.1), penalty=columns, form="proximal", learning_rate=0.1)
    state = step.init(fr.params_of(model))
    for _ in range(150):
        state, _ = step(state, x, y)
    unused = (state.params["0.weight"] == 0).all(dim=0)
    assert unused[2:].all() and not unused[:2].any()
    small = fr.prune(model, state.params, inputs=True)
    assert small[0].index.tolist() == [0, 1] and small[1].in_features == 2
    close(small(x), functional_call(model, state.params, (x,)))


def test_inputs_are_selected_in_the_chains_of_a_model_with_attention_and_selections_compose() -> None:
    rng = np.random.default_rng(16)
    model = fill(Block(), rng)
    params = {k: v.clone() for k, v in fr.params_of(model).items()}
    params["mlp.0.weight"][:, [1, 4]] = 0
    params["attn.out_proj.weight"][:, 0:2] = 0
    small = fr.prune(model, params, inputs=True)
    assert small.mlp[0].index.tolist() == [0, 2, 3, 5, 6, 7] and small.mlp[1].in_features == 6
    x = torch.from_numpy(rng.normal(size=(2, 4, 8)))
    close(small(x), functional_call(model, params, (x,)))
    again = {k: v.clone() for k, v in fr.params_of(small).items()}
    again["mlp.0.weight"][:, 0] = 0  # the pruned layer's first column: the original input 0
    smaller = fr.prune(small, again, inputs=True)
    assert smaller.mlp[0].index.tolist() == [2, 3, 5, 6, 7] and len(smaller.mlp) == 4
    close(smaller(x), functional_call(small, again, (x,)))


def test_select_inputs_after_a_layer_is_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 4), fr.SelectInputs([0, 1]), nn.Linear(2, 1))
    with pytest.raises(TypeError, match=r"SelectInputs\) selects features after a Linear/Conv2d"):
        fr.prune(model)


# ----------------------------------------------------------------------------------------------------
# real Hugging Face modules, where transformers is installed


def test_hugging_face_bert_and_llama_attention_prune_exactly() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert.modeling_bert import BertAttention
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    rng = np.random.default_rng(17)
    cfg = transformers.BertConfig(
        hidden_size=16, num_attention_heads=4, intermediate_size=32, attn_implementation="eager",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    bert = fill(BertAttention(cfg), rng, torch.float32)
    params = {k: v.clone() for k, v in fr.params_of(bert).items()}
    params["self.value.weight"][4:8] = 0
    params["self.value.bias"][4:8] = 0
    small = fr.prune(bert, params)
    assert small.self.num_attention_heads == 3
    x = torch.from_numpy(rng.normal(size=(2, 5, 16))).float()
    close(small(x)[0], functional_call(bert, params, (x,))[0])

    lcfg = transformers.LlamaConfig(
        hidden_size=16, num_attention_heads=4, num_key_value_heads=4, intermediate_size=32,
        attn_implementation="eager",
    )  # fmt: skip
    llama = fill(LlamaAttention(lcfg, layer_idx=0), rng, torch.float32)
    (spec,) = fr.attention_heads(llama)  # no head count attribute: the width over head_dim
    assert spec.num_heads == 4
    params = {k: v.clone() for k, v in fr.params_of(llama).items()}
    params["o_proj.weight"][:, 8:12] = 0
    small = fr.prune(llama, params)
    assert small.q_proj.out_features == 12
    position = LlamaRotaryEmbedding(lcfg)(x, torch.arange(5)[None].expand(2, 5))
    close(small(x, position, None)[0], functional_call(llama, params, (x, position, None))[0])


# ----------------------------------------------------------------------------------------------------
# funcreg.testing's own checks


def test_funcreg_testing_checks_pass_for_head_lasso_and_joint_group_lasso() -> None:
    from funcreg.testing import check_forms_agree, check_penalty

    mha = make(nn.MultiheadAttention, 6, 3, add_bias_kv=True).double()
    check_penalty(fr.head_lasso(0.3, mha), fr.params_of(mha), max_examples=20, seed=0)
    tree = {"w": torch.ones(2, 3, dtype=F64), "b": torch.ones(3, dtype=F64)}
    P = fr.joint_group_lasso(0.2, {"w": 1, "b": 0}, 3)
    check_penalty(P, tree, max_examples=20, seed=0)
    check_forms_agree(P, fr.sgd(0.1), tree, learning_rate=0.1, max_examples=10, seed=0)
    check_forms_agree(P, fr.adam(0.05), tree, max_examples=10, seed=0)
