"""Details of the leafwise helpers and of the steps built on them that results alone do not show.

* which path runs where the module documents it (``torch._foreach_*`` kernels for eager tensors
  autograd does not record, the per-tensor loop otherwise): seen by the aten ops dispatched;
* ``hoisted`` traced by torch.compile: a reduction over copies of the scalar, to the bit;
* ``addcmul_`` with a tensor ``value``, in place and out of place: ``x + value * y * z`` (numpy);
* ``fista`` without parameters, and a donated ``adam``/``adamw`` step on complex parameters (the
  fused kernels decline them: the generic donated step, equal to the pure one and to torch.optim).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SLOW_OK
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.utils._python_dispatch import TorchDispatchMode

import funcreg as fr
from funcreg._src.core import leafwise

torch.set_num_threads(1)


class _Ops(TorchDispatchMode):
    """Records the names of the aten ops dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _ops(fn) -> list[str]:  # noqa: ANN001
    with _Ops() as mode:
        fn()
    return mode.names


# ----------------------------------------------------------------------------------------------------
# which path runs


def test_without_grad_mode_the_foreach_kernels_run_even_for_tensors_that_require_grad():
    """Autograd records nothing under no_grad, so the foreach kernels apply (as in torch.optim's
    step, which runs under no_grad on leaves that require grad); with grad mode on they do not."""
    xs = [torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)]
    ys = [torch.full((3,), 2.0), torch.full((2,), 3.0)]
    plain = [x.detach().clone() for x in xs]
    with torch.no_grad():
        for group in (xs, plain):
            assert leafwise.can_foreach(group, ys)
            names = _ops(lambda group=group: leafwise.add(group, ys, alpha=0.5))
            assert names == ["_foreach_add"], names
            got = leafwise.add(group, ys, alpha=0.5)
            assert torch.equal(got[0], torch.full((3,), 2.0)) and torch.equal(got[1], torch.full((2,), 2.5))
    assert not leafwise.can_foreach(xs, ys)
    names = _ops(lambda: leafwise.add(xs, ys, alpha=0.5))
    assert "_foreach_add" not in names and names.count("add") == 2, names


# ----------------------------------------------------------------------------------------------------
# hoisted, traced


def test_traced_a_float_scalar_becomes_one_reduction_of_copies_with_the_same_value():
    graphs = []

    def capture(gm, example_inputs):  # noqa: ANN001
        graphs.append(gm)
        return gm.forward

    f = torch.compile(lambda x, s: x * leafwise.hoisted(s), backend=capture, fullgraph=True)
    x, s = torch.linspace(-1, 1, 5), torch.tensor(0.3)
    assert torch.equal(f(x, s), x * s)
    (gm,) = graphs
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.max) == 1, targets
    graphs.clear()  # an integer scalar is left as it is: no reduction
    g = torch.compile(lambda x, s: x * leafwise.hoisted(s), backend=capture, fullgraph=True)
    assert torch.equal(g(x, torch.tensor(3)), x * 3)
    assert torch.max not in [n.target for n in graphs[0].graph.nodes]


def test_where_tracing_its_value_and_gradient_are_the_scalars_to_the_bit(monkeypatch):
    """The same reduction run eagerly (the tracing query answered yes): a new 0-d tensor equal to
    ``s``, whose gradient with respect to ``s`` is exactly 1 (not split over the copies)."""
    monkeypatch.setattr(leafwise, "compiling", lambda: True)
    for value in (0.3, -2.5e-7, 1e30):
        s = torch.tensor(value, dtype=torch.float32, requires_grad=True)
        h = leafwise.hoisted(s)
        assert h is not s and h.ndim == 0 and torch.equal(h.detach(), s.detach())
        (grad,) = torch.autograd.grad(h, s)
        assert grad.item() == 1.0
    for t in (torch.tensor(3), torch.ones(2), 0.5):  # not a 0-d float tensor: itself
        assert leafwise.hoisted(t) is t


# ----------------------------------------------------------------------------------------------------
# addcmul_ with a tensor value

_arrays = hnp.arrays(np.float64, 4, elements=st.floats(-3, 3))


def _addcmul_case(xa, ya, za, value, requires_grad):
    xs = [torch.from_numpy(xa.copy()).requires_grad_(requires_grad)]
    ys, zs = [torch.from_numpy(ya.copy())], [torch.from_numpy(za.copy())]
    v = torch.tensor(value, dtype=torch.float64)
    before = xs[0]
    leafwise.addcmul_(xs, ys, zs, v)
    want = torch.from_numpy(xa + value * ya * za)
    torch.testing.assert_close(xs[0].detach(), want, atol=1e-12, rtol=1e-12)
    return before


@settings(deadline=None, max_examples=30, suppress_health_check=SLOW_OK)
@given(xa=_arrays, ya=_arrays, za=_arrays, value=st.floats(-2, 2))
def test_addcmul_with_a_tensor_value_is_x_plus_value_y_z(xa, ya, za, value):
    # grad mode off: written in place; on with a tensor that requires grad: a new tensor in its slot
    with torch.no_grad():
        before = _addcmul_case(xa, ya, za, value, requires_grad=False)
    assert _addcmul_case(xa, ya, za, value, requires_grad=True) is not before


@pytest.mark.parametrize("requires_grad", [False, True])
def test_addcmul_with_a_tensor_value_example(requires_grad):
    x, y, z = np.array([1.0, -2.0, 0.5]), np.array([2.0, 3.0, -4.0]), np.array([0.5, -3.0, 2.0])
    xs = [torch.from_numpy(x.copy()).requires_grad_(requires_grad)]
    original = xs[0]
    leafwise.addcmul_(
        xs, [torch.from_numpy(y)], [torch.from_numpy(z)], torch.tensor(0.25, dtype=torch.float64)
    )
    assert np.allclose(xs[0].detach().numpy(), x + 0.25 * y * z, rtol=0, atol=1e-15)
    assert (xs[0] is original) != requires_grad  # in place only where autograd records nothing


# ----------------------------------------------------------------------------------------------------
# steps


def test_fista_update_without_parameters_names_what_it_needs():
    tx = fr.fista(0.1, fr.l1(0.2))
    params = {"w": torch.ones(3)}
    with pytest.raises(
        ValueError, match=r"fista needs the parameters: call update\(updates, state, params\)"
    ):
        tx.update({"w": torch.ones(3)}, tx.init(params))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("decoupled", [False, True])
def test_donated_adam_on_complex_parameters_equals_the_pure_step_and_torch_optim(fused, decoupled):
    """Complex parameters are outside the kernels: the donated step is the generic one (the pure
    step's values to the bit), and both are torch.optim.Adam/AdamW's on the same parameters."""
    make = (
        (lambda: fr.adamw(0.1, weight_decay=0.1, fused=fused))
        if decoupled
        else (lambda: fr.adam(0.1, fused=fused))
    )
    z0 = torch.tensor([1 + 1j, 2 - 1j, -0.5 + 0.25j], dtype=torch.complex128)
    grads = [torch.tensor([0.5 - 1j, 1 + 2j, -0.3j], dtype=torch.complex128) * (t + 1) for t in range(3)]
    tx = make()
    pure_p, pure_s = {"z": z0.clone()}, tx.init({"z": z0})
    don_p, don_s = {"z": z0.clone()}, tx.init({"z": z0})
    w = z0.clone().requires_grad_()
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.1) if decoupled else torch.optim.Adam([w], lr=0.1)
    for g in grads:
        u, pure_s = tx.update({"z": g}, pure_s, pure_p)
        pure_p = fr.apply_updates(pure_p, u)
        don_p, don_s = fr.donated_update(tx, {"z": g}, don_s, don_p)
        w.grad = g.clone()
        opt.step()
    assert torch.equal(don_p["z"], pure_p["z"])
    torch.testing.assert_close(pure_p["z"], w.detach(), atol=1e-12, rtol=1e-12)
    assert not torch.equal(pure_p["z"], z0)
