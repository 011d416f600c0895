"""The proximal operators of ``funcreg.proxes``, each checked against its optimality condition.

``z = prox_{tP}(v)`` minimises ``1/2 ||z - v||^2 + t P(z)``: the tests check the first-order condition
``v - z in t * dP(z)`` written out by hand for each P (with the subdifferential at kinks), and for
projections feasibility plus "unchanged when already feasible".
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import funcreg as fr
from funcreg.testing import tensors

F64 = torch.float64
ATOL = 1e-12
SETTINGS = settings(deadline=None, max_examples=40)
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)
steps = st.floats(1e-3, 3.0)


def vectors(shape=None):
    return (shapes if shape is None else st.just(shape)).flatmap(lambda s: tensors(s, dtype=F64, max_abs=5.0))


@SETTINGS
@given(v=vectors(), t=steps)
def test_soft_threshold_satisfies_the_l1_optimality_condition(v, t):
    z = fr.proxes.soft_threshold(v, t)
    nonzero = z != 0
    # where z != 0: v - z = t * sign(z); where z == 0: |v| <= t (the subdifferential of |.| at 0 is [-1, 1])
    assert torch.allclose((v - z)[nonzero], t * torch.sign(z[nonzero]), atol=ATOL, rtol=0)
    assert bool((v[~nonzero].abs() <= t + ATOL).all())


@SETTINGS
@given(v=vectors(), t=steps)
def test_shrink_satisfies_the_l2_optimality_condition(v, t):
    z = fr.proxes.shrink(v, t)
    torch.testing.assert_close(v - z, t * z, atol=ATOL, rtol=0)


@SETTINGS
@given(v=vectors(), t1=steps, t2=steps)
def test_elastic_net_prox_satisfies_its_optimality_condition(v, t1, t2):
    z = fr.proxes.elastic_net_prox(v, t1, t2)
    nonzero = z != 0
    residual = v - z - t2 * z
    assert torch.allclose(residual[nonzero], t1 * torch.sign(z[nonzero]), atol=1e-11, rtol=0)
    assert bool((v[~nonzero].abs() <= t1 + ATOL).all())


def _groups(x, axis):
    """Each slice along ``axis`` flattened to a row, in numpy float64."""
    a = np.moveaxis(x.numpy(), axis, 0)
    return a.reshape(a.shape[0], -1)


@SETTINGS
@given(v=st.integers(1, 3).flatmap(lambda r: vectors((r, 3, 2))), t=steps, axis=st.sampled_from([0, 1, -1]))
def test_group_soft_threshold_satisfies_the_group_optimality_condition(v, t, axis):
    z = fr.proxes.group_soft_threshold(v, t, axis)
    for vg, zg in zip(_groups(v, axis), _groups(z, axis)):
        nz = np.linalg.norm(zg)
        if nz > 0:  # v_g - z_g = t * z_g / ||z_g||
            np.testing.assert_allclose(vg - zg, t * zg / nz, atol=1e-11, rtol=0)
        else:  # a zeroed group lies within the threshold
            assert np.linalg.norm(vg) <= t + 1e-12


@SETTINGS
@given(
    v=st.integers(1, 3).flatmap(lambda r: vectors((r, 4))),
    limit=st.floats(0.1, 5.0),
    axis=st.sampled_from([0, 1]),
)
def test_project_group_norm_is_the_projection(v, limit, axis):
    z = fr.proxes.project_group_norm(v, limit, axis)
    for vg, zg in zip(_groups(v, axis), _groups(z, axis)):
        norm = np.linalg.norm(vg)
        expected = vg if norm <= limit else vg * limit / norm
        np.testing.assert_allclose(zg, expected, atol=1e-12, rtol=0)
        assert np.linalg.norm(zg) <= limit * (1 + 1e-12)


@SETTINGS
@given(v=vectors())
def test_project_non_negative(v):
    np.testing.assert_array_equal(fr.proxes.project_non_negative(v).numpy(), np.maximum(v.numpy(), 0.0))


@SETTINGS
@given(data=st.data(), t=steps)
def test_anchor_prox_satisfies_its_optimality_condition(data, t):
    shape = data.draw(shapes)
    v, ref = data.draw(vectors(shape)), data.draw(vectors(shape))
    precision = data.draw(tensors(shape, dtype=F64, max_abs=3.0)).abs()
    for F in (None, precision):
        z = fr.proxes.anchor_prox(v, t, ref, F)
        weight = 1.0 if F is None else F
        torch.testing.assert_close(z - v + t * weight * (z - ref), torch.zeros_like(v), atol=1e-11, rtol=0)


@SETTINGS
@given(
    v=st.integers(1, 3).flatmap(lambda r: tensors((r, 3), dtype=torch.float32, max_abs=5.0)),
    exponent=st.integers(-100, 100),
)
def test_group_norms_match_numpy_at_any_scale(v, exponent):
    """float32 groups scaled by 2^k (exact) far past where squaring overflows (k > 64) or underflows
    (k < -64): the norms match float64 numpy on the same values to float32 rounding. (Rows whose
    largest entry is tiny would leave float32's normal range once scaled down: not drawn.)"""
    assume(bool((v.abs().amax(dim=1) > 1e-3).all()))
    scale = 2.0**exponent
    x = v * scale
    expected = np.linalg.norm(v.double().numpy(), axis=1) * scale
    got = fr.proxes.group_norms(x, axis=0).double().flatten().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "penalty, prox",
    [
        (lambda: fr.l1(0.3), lambda v, s: fr.proxes.soft_threshold(v, s * 0.3)),
        (lambda: fr.l2(0.3), lambda v, s: fr.proxes.shrink(v, s * 0.3)),
        (lambda: fr.elastic_net(0.3, 0.2), lambda v, s: fr.proxes.elastic_net_prox(v, s * 0.3, s * 0.2)),
        (lambda: fr.non_negative(), lambda v, s: fr.proxes.project_non_negative(v)),
    ],
)
def test_penalties_use_their_plain_prox(penalty, prox):
    v = torch.linspace(-2, 2, 9, dtype=F64)
    torch.testing.assert_close(penalty().prox({"w": v}, 0.7)["w"], prox(v, 0.7), atol=0, rtol=0)


@pytest.mark.parametrize(
    "make",
    [lambda c: fr.l2(c), lambda c: fr.l1(c), lambda c: fr.elastic_net(c, c)],
    ids=["l2", "l1", "elastic_net"],
)
@settings(deadline=None, max_examples=20)
@given(data=st.data(), step=steps)
def test_list_rules_equal_the_per_tensor_rules(make, data, step):
    """A scalar coefficient takes the foreach list rules (LeafRule.*_many); the same coefficient given
    per leaf takes the per-tensor rules: gradients and proxes agree bit for bit, values to rounding."""
    names = ["a", "b", "c"]
    tree = {n: data.draw(vectors()) for n in names}
    c = data.draw(st.floats(0.01, 2.0))
    shared, per_leaf = make(c), make({n: c for n in names})
    for a, b in zip(shared.grad(tree).values(), per_leaf.grad(tree).values()):
        assert torch.equal(a, b)
    for a, b in zip(shared.prox(tree, step).values(), per_leaf.prox(tree, step).values()):
        assert torch.equal(a, b)
    with torch.no_grad():  # the report path
        fast = shared(tree)
    torch.testing.assert_close(fast, per_leaf(tree), atol=1e-12, rtol=1e-12)
