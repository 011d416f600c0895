"""Details of the penalties that their headline results do not show.

* list (``torch._foreach_*``) forms: the L1 value of a large float32 tensor keeps its digits, a float64
  leaf beside a float32 one keeps a float64 coefficient unrounded, and over DTensor leaves the L2 value
  is the global ``c/2 * sum w^2`` (a one-rank gloo group, in process);
* ``lp`` and ``orthogonal_cosine`` gradients (the latter by autodiff), a custom prox over only
  absent leaves;
* boundaries: the 1024-ulp slack of ``max_spectral_norm`` and the 16-ulp one of ``max_norm`` are
  inclusive, the spectral norm's gradient is 0 on a zero matrix, SCAD's at ``|w| = coeff`` is the L1 slope;
* argument checks: complex parameters for ``orthogonal``, a tensor ``sparsity``, empty ``pieces``, an
  axis one past the last, an empty module name, ``num_heads=1``;
* attention heads: a head width of 1, a query projection three levels down, per-head norms against
  the rows and columns they own, the shown layers of a ``head_lasso``;
* N:M sparsity of a vector, the global sparsity target's value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

import funcreg as fr

torch.set_num_threads(1)

F32_EPS = torch.finfo(torch.float32).eps


def _arrays(
    shape: tuple[int, ...], dtype: type = np.float64, lo: float = -4.0, hi: float = 4.0
) -> st.SearchStrategy:
    return hnp.arrays(dtype, shape, elements=st.floats(lo, hi, width=64 if dtype == np.float64 else 32))


# ---------------------------------------------------------------------------------------------------
# list forms


@pytest.mark.parametrize("fill", [0.1, 0.7, 3.0])
def test_l1_value_of_a_large_float32_tensor_keeps_its_digits(fill: float) -> None:
    """``sum |w|`` over 2**19 float32 entries (the list form, outside autograd) is within 1e-6 of the
    float64 sum: pairwise summation, not the norm kernel's running sum."""
    n = 1 << 19
    w = torch.full((n,), fill, dtype=torch.float32)
    w[1::2] *= -1
    want = n * float(torch.tensor(fill, dtype=torch.float32))  # every |entry| is the float32 fill
    with torch.no_grad():
        got = fr.l1(1.0)({"w": w})
    assert got.dtype == torch.float32
    assert abs(float(got) - want) <= 1e-6 * want, (float(got), want)


@settings(max_examples=25, deadline=None)
@given(a=_arrays((3,), np.float32), b=_arrays((2, 2)), c=st.floats(0.01, 10.0))
def test_l2_gradient_of_a_float64_leaf_beside_a_float32_one_uses_the_coefficient_unrounded(
    a: np.ndarray, b: np.ndarray, c: float
) -> None:
    """A float64 0-d coefficient over a float32 and a float64 leaf: the float64 gradient is ``c * w``
    in float64 (the coefficient is not rounded to float32 on the way), the float32 one ``c * w`` in
    float32."""
    coeff = torch.tensor(c, dtype=torch.float64)
    params = {"a": torch.from_numpy(a), "b": torch.from_numpy(b)}
    g = fr.l2(coeff).grad(params)
    assert g["a"].dtype == torch.float32 and g["b"].dtype == torch.float64
    torch.testing.assert_close(g["b"], c * params["b"], rtol=1e-13, atol=1e-300)
    torch.testing.assert_close(g["a"], (c * params["a"].double()).float(), rtol=2e-7, atol=1e-30)


@pytest.fixture(scope="module")
def one_rank_mesh():  # noqa: ANN201
    """A one-rank gloo process group and its CPU device mesh, torn down after this module."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    from torch.distributed.device_mesh import DeviceMesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield DeviceMesh("cpu", [0])
    finally:
        dist.destroy_process_group()


@settings(max_examples=10, deadline=None)
@given(w=_arrays((4, 3)), b=_arrays((3,)), c=st.floats(0.01, 10.0))
def test_l2_value_over_dtensor_leaves_is_the_sum_of_squares(one_rank_mesh, w, b, c) -> None:  # noqa: ANN001
    """Over sharded and replicated DTensor leaves (the list form, outside autograd) ``l2(c)`` and
    ``elastic_net`` are their closed forms ``c/2 * sum w^2`` (+ ``l1 * sum |w|``)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    plain = {"w": torch.from_numpy(w), "b": torch.from_numpy(b)}
    params = {
        "w": distribute_tensor(plain["w"], one_rank_mesh, [Shard(0)]),
        "b": distribute_tensor(plain["b"], one_rank_mesh, [Replicate()]),
    }
    squares = sum(float(np.sum(x * x)) for x in (w, b))
    absolute = sum(float(np.sum(np.abs(x))) for x in (w, b))
    with torch.no_grad():
        got = fr.l2(c)(params)
        net = fr.elastic_net(0.5, c)(params)
    for value, want in ((got, 0.5 * c * squares), (net, 0.5 * absolute + 0.5 * c * squares)):
        assert not isinstance(value, type(params["w"])), type(value)
        assert math.isclose(float(value), want, rel_tol=1e-12, abs_tol=1e-12), (float(value), want)


# ---------------------------------------------------------------------------------------------------
# autodiff gradient, custom prox


@settings(max_examples=25, deadline=None)
@given(w=_arrays((5,)), c=st.floats(0.01, 10.0), p=st.sampled_from([1.5, 3.0, 4.0]))
def test_lp_gradient_is_c_abs_w_to_p_minus_1_times_sign(w: np.ndarray, c: float, p: float) -> None:
    """``lp(c, p)`` for ``p`` other than 1 and 2 (no closed-form rule): ``c |w|^(p-1) sign(w)``."""
    params = {"w": torch.from_numpy(w)}
    want = c * np.abs(w) ** (p - 1) * np.sign(w)
    got = fr.lp(c, p).grad(params)["w"]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def _mean_abs_cosine_of_rows(m: np.ndarray) -> float:
    normed = m / np.linalg.norm(m, axis=1, keepdims=True)
    gram = normed @ normed.T
    n = m.shape[0]
    return float(np.sum(np.abs(gram - np.diag(np.diag(gram)))) / (n * (n - 1)))


@settings(max_examples=20, deadline=None)
@given(w=_arrays((3, 4), lo=0.1, hi=4.0), signs=hnp.arrays(np.bool_, (3, 4)), c=st.floats(0.1, 4.0))
def test_orthogonal_cosine_gradient_matches_finite_differences(w, signs, c) -> None:  # noqa: ANN001
    """``orthogonal_cosine`` has no closed-form gradient (autodiff of its value): central differences
    of ``c * mean |cos|`` over the row pairs, away from the kinks ``cos = 0``."""
    m = np.where(signs, w, -w)
    normed = m / np.linalg.norm(m, axis=1, keepdims=True)
    if np.min(np.abs(normed @ normed.T)) < 1e-2:
        return  # near a kink of |cos|
    h = 1e-6
    want = np.zeros_like(m)
    for idx in np.ndindex(*m.shape):
        up, down = m.copy(), m.copy()
        up[idx] += h
        down[idx] -= h
        want[idx] = c * (_mean_abs_cosine_of_rows(up) - _mean_abs_cosine_of_rows(down)) / (2 * h)
    got = fr.orthogonal_cosine(c).grad({"w": torch.from_numpy(m)})["w"]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)


def test_custom_prox_with_only_absent_leaves_selected_leaves_the_others_alone() -> None:
    """A custom penalty whose mask selects only an absent (``None``) leaf: its prox does not call the
    user's prox and returns the tree unchanged."""
    calls = []

    def prox(p, step):  # noqa: ANN001, ANN202
        calls.append(step)
        return {k: v / (1 + step) for k, v in p.items()}

    P = fr.penalty(lambda p: sum((v**2).sum() for v in p.values()), prox=prox, mask={"w": True, "b": False})
    b = torch.tensor([1.0, -2.0])
    out = P.prox({"w": None, "b": b}, step=0.5)
    assert out["w"] is None and torch.equal(out["b"], b) and not calls


# ---------------------------------------------------------------------------------------------------
# boundaries


def test_max_spectral_norm_slack_of_1024_ulps_is_inclusive() -> None:
    """A matrix whose largest singular value is exactly ``max_value * (1 + 1024 eps)`` is feasible;
    one ulp more is not."""
    at = torch.tensor([[1.0 + 1024 * F32_EPS, 0.0], [0.0, 0.25]])
    past = torch.tensor([[1.0 + 1025 * F32_EPS, 0.0], [0.0, 0.25]])
    assert float(torch.linalg.svdvals(at)[0]) == 1.0 + 1024 * F32_EPS  # the SVD of a diagonal is exact
    P = fr.max_spectral_norm(1.0)
    assert float(P({"w": at})) == 0.0
    assert float(P({"w": past})) == math.inf


def test_max_norm_slack_of_16_ulps_is_inclusive() -> None:
    """Rows whose norm is exactly ``max_value * (1 + 16 eps)`` are feasible; one ulp more is not."""
    at = torch.tensor([[1.0 + 16 * F32_EPS], [0.5]])
    past = torch.tensor([[1.0 + 17 * F32_EPS], [0.5]])
    P = fr.max_norm(1.0, axis=0)
    assert float(P({"w": at})) == 0.0
    assert float(P({"w": past})) == math.inf


@pytest.mark.parametrize("shape", [(2, 3), (3, 3), (4, 1)])
def test_spectral_norm_gradient_of_a_zero_matrix_is_zero(shape: tuple[int, int]) -> None:
    """The documented subgradient ``0`` at a zero matrix (not some ``u_1 v_1^T``)."""
    g = fr.spectral_norm(2.0).grad({"w": torch.zeros(shape)})["w"]
    assert torch.equal(g, torch.zeros(shape))


@settings(max_examples=25, deadline=None)
@given(w=_arrays((2, 3)), c=st.floats(0.1, 4.0))
def test_spectral_norm_gradient_is_c_times_top_singular_pair(w: np.ndarray, c: float) -> None:
    s = np.linalg.svd(w, compute_uv=False)
    if s[0] < 1e-3 or s[0] - s[1] < 1e-3:
        return  # the top pair is ill-defined
    u, _, vt = np.linalg.svd(w)
    want = c * np.outer(u[:, 0], vt[0])
    got = fr.spectral_norm(c).grad({"w": torch.from_numpy(w)})["w"]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-7, atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(c=st.floats(0.01, 10.0), a=st.sampled_from([2.5, 3.7, 5.0]))
def test_scad_gradient_at_abs_w_equal_to_coeff_is_the_l1_slope(c: float, a: float) -> None:
    """Fan & Li's derivative ``c * (I(|w| <= c) + ...)``: at ``|w| = c`` exactly ``c * sign(w)``,
    the L1 piece (the blend ``(a c - |w|) / (a - 1)`` equals it only up to rounding)."""
    w = torch.tensor([c, -c, 0.5 * c], dtype=torch.float64)
    got = fr.scad(c, a=a).grad({"w": w})["w"]
    assert torch.equal(got, torch.tensor([c, -c, c], dtype=torch.float64)), (got, c)


# ---------------------------------------------------------------------------------------------------
# argument checks


def test_orthogonal_refuses_complex_parameters() -> None:
    with pytest.raises(fr.LeafTypeError, match="not defined for complex parameters"):
        fr.orthogonal(1.0)({"w": torch.eye(2, dtype=torch.complex64)})


def test_sparsity_target_refuses_a_tensor_sparsity() -> None:
    with pytest.raises(TypeError, match="Invalid sparsity value.*expected a float"):
        fr.sparsity_target(torch.tensor(0.5))


@pytest.mark.parametrize("pieces", [{}, [("w", 0)]])
def test_joint_group_lasso_needs_a_non_empty_dict_of_pieces(pieces) -> None:  # noqa: ANN001
    with pytest.raises(TypeError, match="pieces must be a non-empty dict"):
        fr.joint_group_lasso(0.1, pieces, num_groups=2)


@pytest.mark.parametrize("axis", [2, -3])
def test_joint_group_lasso_names_an_axis_the_tensor_lacks(axis: int) -> None:
    P = fr.joint_group_lasso(0.1, {"w": axis}, num_groups=2)
    with pytest.raises(ValueError, match=rf"parameter 'w' of shape \(2, 2\) has no axis {axis}"):
        P({"w": torch.ones(2, 2)})


class _Projections(nn.Module):
    def __init__(self, width: int = 4, **attrs: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(width, width) for _ in range(4))
        for k, v in attrs.items():
            setattr(self, k, v)


@pytest.mark.parametrize("arg", ["q", "k", "v", "o"])
def test_attention_heads_refuses_an_empty_module_name(arg: str) -> None:
    with pytest.raises(TypeError, match=f"attention_heads: {arg} must be a module name"):
        fr.attention_heads(_Projections(num_heads=2), **{arg: ""})
    with pytest.raises(TypeError, match=f"attention_heads: {arg} must be a module name"):
        fr.attention_heads(_Projections(num_heads=2), **{arg: ("q_proj", "")})


def test_attention_heads_accepts_num_heads_1() -> None:
    (heads,) = fr.attention_heads(_Projections(width=6), num_heads=1)
    assert (heads.num_heads, heads.head_dim, heads.value_dim) == (1, 6, 6)
    for bad in (0, -1, True, 1.0):
        with pytest.raises(ValueError, match="Invalid num_heads value"):
            fr.attention_heads(_Projections(width=6), num_heads=bad)


# ---------------------------------------------------------------------------------------------------
# attention heads


def test_attention_heads_from_a_head_width_of_1() -> None:
    """``head_dim = 1`` and no head count: one head per query feature."""
    (heads,) = fr.attention_heads(_Projections(width=4, head_dim=1))
    assert (heads.num_heads, heads.head_dim) == (4, 1)


class _Deep(nn.Module):
    """q/k/v three levels down (``x.y.q``), the head count on ``x.y`` only."""

    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Module()
        self.x.y = nn.Module()
        self.x.y.num_heads = 2
        self.x.y.q, self.x.y.k, self.x.y.v = (nn.Linear(4, 4) for _ in range(3))
        self.o = nn.Linear(4, 4)


def test_attention_heads_reads_the_count_from_the_query_projections_parent() -> None:
    (heads,) = fr.attention_heads(_Deep(), q="x.y.q", k="x.y.k", v="x.y.v", o="o")
    assert heads.num_heads == 2 and heads.head_dim == 2
    assert heads.count_attrs == (("x.y", "num_heads"),)


@settings(max_examples=20, deadline=None)
@given(in_proj=_arrays((12, 4), np.float32), out=_arrays((4, 4), np.float32))
def test_head_norms_are_the_norms_of_the_rows_and_columns_each_head_owns(in_proj, out) -> None:  # noqa: ANN001
    """Head ``h`` of an ``nn.MultiheadAttention(4, 2)``: its query, key and value rows of
    ``in_proj_weight`` and its columns of ``out_proj.weight``."""
    (heads,) = fr.attention_heads(nn.MultiheadAttention(4, num_heads=2, bias=False))
    params = {"in_proj_weight": torch.from_numpy(in_proj), "out_proj.weight": torch.from_numpy(out)}
    x = in_proj.astype(np.float64)
    o = out.astype(np.float64)
    want = [
        math.sqrt(
            sum(np.sum(x[r * 4 + 2 * h : r * 4 + 2 * h + 2] ** 2) for r in range(3))
            + np.sum(o[:, 2 * h : 2 * h + 2] ** 2)
        )
        for h in range(2)
    ]
    np.testing.assert_allclose(heads.norms(params).double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_head_norms_name_a_missing_parameter() -> None:
    (heads,) = fr.attention_heads(nn.MultiheadAttention(4, num_heads=2, bias=False))
    with pytest.raises(ValueError, match="include 'out_proj.weight', which params does not have"):
        heads.norms({"in_proj_weight": torch.ones(12, 4)})


class _Layers(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.MultiheadAttention(4, num_heads=2) for _ in range(n))


@pytest.mark.parametrize("n", [1, 3, 4])
def test_head_lasso_shows_up_to_three_layers_and_counts_more(n: int) -> None:
    P = fr.head_lasso(0.1, _Layers(n))
    shown = ", ".join(f"2 heads of 'layers.{i}'" for i in range(min(n, 3)))
    more = f", ... ({n} layers)" if n > 3 else ""
    assert repr(P) == f"head_lasso(0.1, <{shown}{more}>)"


# ---------------------------------------------------------------------------------------------------
# sparsity targets


@settings(max_examples=25, deadline=None)
@given(v=_arrays((8,)), nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4)]))
def test_keep_n_of_m_of_a_vector_keeps_the_n_largest_of_each_block(
    v: np.ndarray, nm: tuple[int, int]
) -> None:
    n, m = nm
    got = fr.proxes.keep_n_of_m(torch.from_numpy(v), n, m).numpy()
    for block in range(len(v) // m):
        seg, kept = v[block * m : (block + 1) * m], got[block * m : (block + 1) * m]
        assert np.count_nonzero(kept) <= n
        assert np.all((kept == 0) | (kept == seg))  # kept entries unchanged
        np.testing.assert_allclose(np.sort(np.abs(kept))[-n:], np.sort(np.abs(seg))[-n:])


def test_keep_n_of_m_refuses_a_0d_tensor() -> None:
    with pytest.raises(ValueError, match=r"multiple of 4, got shape \(\)"):
        fr.proxes.keep_n_of_m(torch.tensor(1.0), 2, 4)


@settings(max_examples=25, deadline=None)
@given(
    a=hnp.arrays(np.float64, (3,), elements=st.sampled_from([0.0, -1.5, 2.0])),
    b=hnp.arrays(np.float64, (2, 2), elements=st.sampled_from([0.0, 0.5, -3.0])),
    s=st.sampled_from([0.0, 0.3, 0.5, 0.8]),
)
def test_global_sparsity_target_value_is_0_within_the_target_else_inf(a, b, s) -> None:  # noqa: ANN001
    """``0`` where at most ``floor((1 - s) * 7)`` of the 7 entries are nonzero, ``inf`` otherwise."""
    params = {"a": torch.from_numpy(a), "b": torch.from_numpy(b)}
    k = math.floor((1 - s) * 7 + 1e-9)
    nonzero = np.count_nonzero(a) + np.count_nonzero(b)
    got = float(fr.sparsity_target(s, per="global")(params))
    assert got == (0.0 if nonzero <= k else math.inf), (nonzero, k, got)
