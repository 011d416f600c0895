"""Low-rank and spectral penalties: nuclear norm, spectral norm, the spectral-norm constraint, and
Keras' OrthogonalRegularizer (``fr.orthogonal_cosine``).

Expected values come from numpy's SVD of the drawn matrix (singular values, ranks), from the
formulas written out here (Keras 3's documented mean absolute cosine, the water level of the
spectral prox found by bisection), from finite differences, and from ``funcreg.testing.check_penalty``
(gradient vs autodiff, prox optimality by perturbation).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import SLOW_OK
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import funcreg as fr
from funcreg._src.penalties.spectral import clip_singular_values, singular_value_thresholding, spectral_prox
from funcreg.testing import check_penalty

SETTINGS = settings(deadline=None, max_examples=20, suppress_health_check=SLOW_OK)


def matrices(min_side: int = 1, max_side: int = 5, dtype=np.float64):
    shapes = st.tuples(st.integers(min_side, max_side), st.integers(min_side, max_side))
    return shapes.flatmap(
        lambda s: hnp.arrays(
            dtype,
            s,
            elements=st.floats(-5, 5, allow_subnormal=False, width=64 if dtype == np.float64 else 32),
        )
    )


def well_separated(a: np.ndarray, gap: float = 1e-2) -> bool:
    """Distinct singular values bounded away from 0: where sum(s) and max(s) are differentiable."""
    s = np.linalg.svd(a, compute_uv=False)
    return bool(s.min() > gap and (len(s) < 2 or np.diff(s).__abs__().min() > gap))


def separated_trees(dtype=torch.float64):
    """Trees {"w": matrix} away from the kinks of the spectral penalties (see ``well_separated``)."""
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    return matrices(dtype=np_dtype).filter(well_separated).map(lambda a: {"w": torch.from_numpy(a.copy())})


def rotation(n: int, seed: int) -> np.ndarray:
    """An orthogonal matrix from a fixed QR (only the test's own construction, not the code under test)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return q


# --- check_penalty: gradient vs autodiff, prox optimality --------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "make",
    [lambda: fr.nuclear_norm(0.3), lambda: fr.spectral_norm(0.7), lambda: fr.max_spectral_norm(2.0)],
    ids=["nuclear_norm", "spectral_norm", "max_spectral_norm"],
)
def test_check_penalty(make, dtype):
    check_penalty(
        make(),
        separated_trees(dtype),
        max_examples=15,
        atol=1e-6 if dtype == torch.float64 else 1e-4,
        rtol=1e-4,
    )


@pytest.mark.parametrize("mode", ["rows", "columns"])
def test_check_penalty_orthogonal_cosine(mode):
    check_penalty(fr.orthogonal_cosine(0.5, mode=mode), max_examples=15)


# --- nuclear norm: SVT, exact low rank --------------------------------------------------------------


def test_singular_value_thresholding_of_a_known_matrix():
    u, v = rotation(3, 0), rotation(3, 1)
    w = u @ np.diag([5.0, 2.0, 0.5]) @ v.T
    got = singular_value_thresholding(torch.from_numpy(w), 1.0).numpy()
    np.testing.assert_allclose(got, u @ np.diag([4.0, 1.0, 0.0]) @ v.T, atol=1e-12, rtol=0)
    assert np.linalg.matrix_rank(got, tol=1e-9) == 2


@SETTINGS
@given(a=matrices(), t=st.floats(0.0, 6.0))
def test_svt_shrinks_singular_values_and_sets_the_rank(a, t):
    s = np.linalg.svd(a, compute_uv=False)
    assume(np.all(np.abs(s - t) > 1e-6))  # the rank is ill-defined at s == t
    got = singular_value_thresholding(torch.from_numpy(a), t).numpy()
    np.testing.assert_allclose(np.linalg.svd(got, compute_uv=False), np.maximum(s - t, 0), atol=1e-9, rtol=0)
    assert np.linalg.matrix_rank(got, tol=1e-7) == int((s > t).sum())


@SETTINGS
@given(a=matrices(min_side=2), lam=st.floats(0.1, 3.0))
def test_proximal_gradient_with_nuclear_norm_solves_matrix_denoising(a, lam):
    """min 1/2 ||W - Y||^2 + lam ||W||_*: one proximal gradient step with lr 1 lands on SVT(Y, lam)
    (numpy's SVD here), from any start, and its rank is the number of singular values above lam."""
    y = torch.from_numpy(a)
    params = {"w": torch.zeros_like(y)}
    tx = fr.chain(fr.sgd(1.0), fr.proximal(fr.nuclear_norm(lam), learning_rate=1.0))
    u, _ = tx.update({"w": params["w"] - y}, tx.init(params), params)
    got = fr.apply_updates(params, u)["w"].numpy()
    uu, s, vh = np.linalg.svd(a, full_matrices=False)
    np.testing.assert_allclose(got, (uu * np.maximum(s - lam, 0)) @ vh, atol=1e-9, rtol=0)
    assume(np.all(np.abs(s - lam) > 1e-6))
    assert np.linalg.matrix_rank(got, tol=1e-7) == int((s > lam).sum())


@SETTINGS
@given(a=matrices(), c=st.floats(0.01, 2.0))
def test_nuclear_norm_value_is_the_sum_of_singular_values(a, c):
    got = float(fr.nuclear_norm(c)({"w": torch.from_numpy(a)}))
    assert abs(got - c * np.linalg.svd(a, compute_uv=False).sum()) <= 1e-10 + 1e-10 * abs(got)


@SETTINGS
@given(tree=separated_trees(), which=st.sampled_from(["nuclear", "spectral"]))
def test_gradient_matches_finite_differences(tree, which):
    P = fr.nuclear_norm(1.0) if which == "nuclear" else fr.spectral_norm(1.0)
    w = tree["w"]
    g = P.grad(tree)["w"]
    h = 1e-6
    for idx in np.ndindex(*w.shape):
        e = torch.zeros_like(w)
        e[idx] = h
        fd = (float(P({"w": w + e})) - float(P({"w": w - e}))) / (2 * h)
        assert abs(fd - float(g[idx])) <= 1e-5 + 1e-5 * abs(fd)


def test_nuclear_norm_subgradient_of_a_rank_deficient_matrix_has_zero_on_the_null_part():
    u, v = rotation(3, 2), rotation(3, 3)
    w = torch.from_numpy(u @ np.diag([2.0, 1.0, 0.0]) @ v.T)
    g = fr.nuclear_norm(1.0).grad({"w": w})["w"].numpy()
    # the singular value that is 0 up to rounding counts as nonzero or not; both U_r V_r^T agree on
    # the range of w: g @ v[:, :2] == u[:, :2]
    np.testing.assert_allclose(g @ v[:, :2], u[:, :2], atol=1e-9)


# --- spectral norm and its constraint -------------------------------------------------------------


def _water_level_by_bisection(s: np.ndarray, t: float) -> float:
    if s.sum() <= t:
        return 0.0
    lo, hi = 0.0, float(s.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(s - mid, 0).sum() > t:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@SETTINGS
@given(a=matrices(), t=st.one_of(st.just(0.0), st.floats(1e-3, 10.0)))  # (W - prox) / t: t not tiny
def test_spectral_prox_clips_at_the_water_level(a, t):
    s = np.linalg.svd(a, compute_uv=False)
    tau = _water_level_by_bisection(s, t)
    got = spectral_prox(torch.from_numpy(a), t).numpy()
    np.testing.assert_allclose(
        np.linalg.svd(got, compute_uv=False), np.sort(np.minimum(s, tau))[::-1], atol=1e-9, rtol=0
    )
    # Moreau: what is removed, (W - prox) / t, has nuclear norm 1 (the dual ball) unless all is removed
    if t > 0 and s.sum() > t:
        removed = np.linalg.svd((a - got) / t, compute_uv=False).sum()
        assert abs(removed - 1.0) <= 1e-8


def test_spectral_prox_of_a_known_matrix():
    u, v = rotation(3, 4), rotation(3, 5)
    w = u @ np.diag([3.0, 2.0, 0.5]) @ v.T
    # sum(max(s - tau, 0)) = 1.5 at tau = 1.75: (3 - 1.75) + (2 - 1.75) = 1.5
    got = spectral_prox(torch.from_numpy(w), 1.5).numpy()
    np.testing.assert_allclose(got, u @ np.diag([1.75, 1.75, 0.5]) @ v.T, atol=1e-12, rtol=0)


@SETTINGS
@given(a=matrices(), bound=st.floats(0.1, 5.0))
def test_max_spectral_norm_projection(a, bound):
    P = fr.max_spectral_norm(bound)
    s = np.linalg.svd(a, compute_uv=False)
    z = P.prox({"w": torch.from_numpy(a)}, step=0.3)["w"]
    np.testing.assert_allclose(
        np.linalg.svd(z.numpy(), compute_uv=False), np.minimum(s, bound), atol=1e-9, rtol=0
    )
    assert float(P({"w": z})) == 0.0  # feasible
    torch.testing.assert_close(
        clip_singular_values(z, bound), z, atol=1e-10, rtol=0
    )  # a projection is idempotent
    if s.max() > bound * (1 + 1e-6):
        assert float(P({"w": torch.from_numpy(a)})) == math.inf
    with pytest.raises(NotImplementedError, match="constraint"):
        P.grad({"w": torch.from_numpy(a)})


@SETTINGS
@given(a=matrices(dtype=np.float32), bound=st.floats(0.1, 5.0))
def test_max_spectral_norm_projection_float32(a, bound):
    P = fr.max_spectral_norm(bound)
    z = P.prox({"w": torch.from_numpy(a)}, step=1.0)["w"]
    assert z.dtype == torch.float32 and float(P({"w": z})) == 0.0
    s = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(
        np.linalg.svd(z.double().numpy(), compute_uv=False), np.minimum(s, bound), atol=1e-5, rtol=1e-5
    )


@SETTINGS
@given(a=matrices(), c=st.floats(0.01, 2.0))
def test_spectral_norm_value_is_the_largest_singular_value(a, c):
    got = float(fr.spectral_norm(c)({"w": torch.from_numpy(a)}))
    assert abs(got - c * np.linalg.svd(a, compute_uv=False).max()) <= 1e-10 + 1e-10 * abs(got)


# --- Keras' OrthogonalRegularizer ------------------------------------------------------------------


def keras_orthogonal(w: np.ndarray, factor: float, mode: str) -> float:
    """Keras 3 ``OrthogonalRegularizer.__call__``, from its documentation and source: normalize the rows
    (mode="rows", axis=1) or columns (axis=0) with ``x / max(||x||, epsilon)``, epsilon = 1e-7; the
    Gram matrix of the normalized vectors; ``factor * 0.5 * sum(|offdiagonal|) / num_pairs`` with
    ``num_pairs = size * (size - 1) / 2``."""
    axis = 1 if mode == "rows" else 0
    n = w / np.maximum(np.linalg.norm(w, axis=axis, keepdims=True), 1e-7)
    product = n @ n.T if mode == "rows" else n.T @ n
    size = product.shape[0]
    num_pairs = size * (size - 1.0) / 2.0
    return factor * 0.5 * np.abs(product * (1.0 - np.eye(size))).sum() / num_pairs


@SETTINGS
@given(a=matrices(), factor=st.floats(0.0, 2.0), mode=st.sampled_from(["rows", "columns"]))
def test_orthogonal_cosine_is_keras_orthogonal_regularizer(a, factor, mode):
    size = a.shape[0] if mode == "rows" else a.shape[1]
    got = float(fr.orthogonal_cosine(factor, mode=mode)({"w": torch.from_numpy(a)}))
    if size < 2:
        assert got == 0.0  # no pairs (Keras divides 0 by 0 here)
        return
    expected = keras_orthogonal(a, factor, mode)
    assert abs(got - expected) <= 1e-12 + 1e-10 * abs(expected)


def test_orthogonal_cosine_examples():
    P = fr.orthogonal_cosine(1.0)
    assert float(P({"w": torch.eye(3, dtype=torch.float64)})) == 0.0
    # two equal rows and an orthogonal one: pairs |cos| = 1, 0, 0 -> mean 1/3
    w = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    assert abs(float(P({"w": w})) - 1 / 3) <= 1e-15
    # columns mode on W is rows mode on W^T; and only angles count, not norms
    cols = fr.orthogonal_cosine(1.0, mode="columns")
    assert abs(float(cols({"w": w.T})) - 1 / 3) <= 1e-15
    assert abs(float(P({"w": w * torch.tensor([[3.0], [0.1], [7.0]], dtype=torch.float64)})) - 1 / 3) <= 1e-15


@SETTINGS
@given(a=matrices(min_side=2), mode=st.sampled_from(["rows", "columns"]))
def test_orthogonal_cosine_gradient_matches_finite_differences(a, mode):
    axis = 1 if mode == "rows" else 0
    norms = np.linalg.norm(a, axis=axis, keepdims=True)
    assume(norms.min() > 1e-2)  # away from the kink of max(||x||, eps)
    n = a / norms
    gram = n @ n.T if mode == "rows" else n.T @ n
    assume(np.abs(gram[~np.eye(len(gram), dtype=bool)]).min() > 1e-3)  # and from |cos| = 0
    P = fr.orthogonal_cosine(1.0, mode=mode)
    w = torch.from_numpy(a)
    g = P.grad({"w": w})["w"]
    h = 1e-7
    for idx in np.ndindex(*a.shape):
        e = np.zeros_like(a)
        e[idx] = h
        fd = (keras_orthogonal(a + e, 1.0, mode) - keras_orthogonal(a - e, 1.0, mode)) / (2 * h)
        assert abs(fd - float(g[idx])) <= 1e-5 + 1e-4 * abs(fd)


# --- selection and validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [fr.nuclear_norm, fr.spectral_norm, fr.max_spectral_norm, fr.orthogonal_cosine],
    ids=lambda f: f.__name__,
)
def test_matrices_only(make):
    P = make(1.0)
    params = {
        "w": torch.randn(3, 2, generator=torch.Generator().manual_seed(0)),
        "b": torch.ones(3),
        "k": torch.ones(2, 3, 2),
    }
    assert P.selection(params) == {"w": True, "b": False, "k": True}
    with pytest.raises(ValueError, match=r"needs matrices; parameter 'b' has shape \(3,\)"):
        make(1.0, mask={"w": True, "b": True, "k": False})(params)


def test_conv_kernels_are_seen_as_out_by_rest():
    k = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(k.reshape(4, -1))
    assert abs(float(fr.nuclear_norm(1.0)({"k": k})) - float(s.sum())) <= 1e-12
    z = fr.nuclear_norm(1.0).prox({"k": k}, step=float(s[1]))["k"]
    assert z.shape == k.shape and int(torch.linalg.matrix_rank(z.reshape(4, -1))) == 1


def test_validation_and_repr():
    with pytest.raises(ValueError, match=r"coeff value: -1\.0"):
        fr.nuclear_norm(-1.0)
    with pytest.raises(ValueError, match=r"max_value value: 0\.0"):
        fr.max_spectral_norm(0.0)
    with pytest.raises(ValueError, match=r"mode value: 'diag'"):
        fr.orthogonal_cosine(1.0, mode="diag")
    with pytest.raises(ValueError, match=r"eps value: 0\.0"):
        fr.orthogonal_cosine(1.0, eps=0.0)
    assert "nuclear_norm(0.5)" in repr(fr.nuclear_norm(0.5))
