"""Donation cannot corrupt memory: shared storage, stale states and saved views.

The oracle is the pure path (``tx.update`` + ``apply_updates`` on private copies), and for which
trees must be refused, index arithmetic done here: two views of one storage overlap when their
address ranges (first to last element) meet.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcreg as fr

PROPERTY = settings(deadline=None, max_examples=40, database=None)


def _clone(tree):
    return torch.utils._pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def _pure(tx, grads, state, params):
    updates, state = tx.update(grads, state, params)
    return fr.apply_updates(params, updates), state


@st.composite
def views_of_storages(draw):
    """A tree of 1-D views ``base[start : start + step * length : step]`` into one or two bases, with
    each view's element range ``(base, first, last)`` for the test's own overlap arithmetic."""
    n_bases = draw(st.integers(1, 2))
    sizes = [draw(st.integers(4, 12)) for _ in range(n_bases)]
    values = [draw(st.lists(st.floats(-2, 2, width=32), min_size=s, max_size=s)) for s in sizes]
    bases = [torch.from_numpy(np.asarray(v, dtype=np.float32)) for v in values]
    tree, ranges = {}, {}
    for i in range(draw(st.integers(2, 4))):
        b = draw(st.integers(0, n_bases - 1))
        step = draw(st.integers(1, 2))
        start = draw(st.integers(0, sizes[b] - 1))
        length = draw(st.integers(1, max(1, (sizes[b] - 1 - start) // step + 1)))
        tree[f"p{i}"] = bases[b][start : start + step * length : step]
        ranges[f"p{i}"] = (b, start, start + step * (length - 1))
    return tree, ranges


def _overlapping(ranges) -> bool:
    items = list(ranges.values())
    return any(
        a[0] == b[0] and a[1] <= b[2] and b[1] <= a[2] for i, a in enumerate(items) for b in items[i + 1 :]
    )


@PROPERTY
@given(case=views_of_storages(), momentum=st.sampled_from([0.0, 0.9]))
def test_views_of_one_storage_are_refused_exactly_when_they_overlap(case, momentum):
    params, ranges = case
    tx = fr.sgd(0.1, momentum=momentum)
    grads = {k: torch.full_like(v, 0.5) for k, v in params.items()}
    private = _clone(params)
    expected, _ = _pure(tx, grads, tx.init(private), private)
    if _overlapping(ranges):
        before = _clone(params)
        with pytest.raises(ValueError, match="share memory"):
            fr.donated_update(tx, grads, tx.init(params), params)
        for k in params:  # refused before writing anything
            assert torch.equal(params[k], before[k])
    else:
        done, _ = fr.donated_update(tx, grads, tx.init(params), params)
        for k in params:
            torch.testing.assert_close(done[k], expected[k], atol=0, rtol=0)


def test_interleaved_views_are_refused_conservatively():
    flat = torch.zeros(6)
    params = {"even": flat[0::2], "odd": flat[1::2]}
    with pytest.raises(ValueError, match=r"params 'even' and params 'odd' share memory"):
        fr.donated_update(
            fr.sgd(0.1), {"even": torch.ones(3), "odd": torch.ones(3)}, fr.sgd(0.1).init(params), params
        )


@pytest.mark.parametrize(
    "make", [lambda: fr.sgd(0.1, momentum=0.9), lambda: fr.adam(0.1)], ids=["sgd", "adam"]
)
def test_a_gradient_that_is_a_state_buffer_or_a_parameter_is_refused(make):
    tx = make()
    params = {"w": torch.ones(3)}
    params, state = fr.donated_update(tx, {"w": torch.ones(3)}, tx.init(params), params)
    buffers = [
        x for x in torch.utils._pytree.tree_leaves(state) if isinstance(x, torch.Tensor) and x.shape == (3,)
    ]
    for buffer in buffers:
        with pytest.raises(ValueError, match=r"gradient 'w' shares memory with state"):
            fr.donated_update(tx, {"w": buffer}, state, params)
        with pytest.raises(ValueError, match=r"gradient 'w' shares memory with state"):
            fr.donated_update(tx, {"w": buffer[:]}, state, params)  # a view of it, another tensor object
    with pytest.raises(ValueError, match=r"gradient 'w' shares memory with params 'w'"):
        fr.donated_update(tx, {"w": params["w"].view(3)}, state, params)
    # the refused calls consumed nothing: the state is still the one to step, and it steps as the pure path
    expected, _ = _pure(tx, {"w": torch.ones(3)}, _clone(state), _clone(params))
    done, _ = fr.donated_update(tx, {"w": torch.ones(3)}, state, params)
    torch.testing.assert_close(done["w"], expected["w"], atol=0, rtol=0)


def test_a_parameter_that_is_a_moment_is_refused():
    tx = fr.adam(0.1)
    params = {"w": torch.ones(3)}
    state = tx.init(params)
    moment = next(
        x for x in torch.utils._pytree.tree_leaves(state) if isinstance(x, torch.Tensor) and x.shape == (3,)
    )
    with pytest.raises(ValueError, match=r"share memory"):
        fr.donated_update(tx, {"w": torch.ones(3)}, state, {"w": moment})


def _step_and_problem(**kwargs):
    x = torch.linspace(-1, 1, 8).reshape(4, 2)
    y = x.sum(dim=1)

    def loss(p, x, y):
        return ((x @ p["w"] - y) ** 2).mean()

    step = fr.make_step(loss, fr.sgd(0.1, momentum=0.9), donate=True, **kwargs)
    return step, step.init({"w": torch.zeros(2)}), x, y


def test_make_step_refuses_a_state_consumed_by_any_earlier_step():
    step, s0, x, y = _step_and_problem()
    s1, _ = step(s0, x, y)
    s2, _ = step(s1, x, y)
    s3, _ = step(s2, x, y)
    for stale in (s0, s1, s2):
        with pytest.raises(ValueError, match="donated to an earlier step"):
            step(stale, x, y)
    # a copy of the latest state (new hyperparameters, say) is a new state; so is an unpickled one
    s4, _ = step(s3._replace(hparams={}), x, y)
    restored = pickle.loads(pickle.dumps(s4))
    step(restored, x, y)


def test_make_step_refuses_a_parameter_sharing_memory_with_its_momentum():
    step, state, x, y = _step_and_problem()
    flat = torch.zeros(3)
    opt_state = torch.utils._pytree.tree_map(
        lambda v: flat[1:] if isinstance(v, torch.Tensor) and v.shape == (2,) else v, state.opt_state
    )
    shared = state._replace(params={"w": flat[:2]}, opt_state=opt_state)
    with pytest.raises(ValueError, match=r"share memory"):
        step(shared, x, y)


def test_torch_optimizer_refuses_parameters_that_overlap():
    flat = torch.zeros(6)
    a, b = flat[:4], flat[2:]
    opt = fr.TorchOptimizer([("a", a), ("b", b)], "sgd", lr=0.1)
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    with pytest.raises(ValueError, match=r"params 'a' and params 'b' share memory"):
        opt.step()
    assert torch.equal(flat, torch.zeros(6))  # refused before any write


def test_torch_optimizer_refuses_a_gradient_that_is_its_momentum_buffer():
    w = torch.nn.Parameter(torch.ones(3))
    opt = fr.TorchOptimizer([("w", w)], "sgd", lr=0.1, momentum=0.9)
    w.grad = torch.ones(3)
    opt.step()
    w.grad = opt.state[w]["momentum_buffer"]
    with pytest.raises(ValueError, match=r"gradient 'w' shares memory with state"):
        opt.step()


@pytest.mark.parametrize(
    "make", [lambda: fr.sgd(0.1, momentum=0.9), lambda: fr.adam(0.1)], ids=["sgd", "adam"]
)
def test_a_detached_view_whose_base_autograd_saved_fails_loudly_at_backward(make):
    """``w.detach()`` shares ``w``'s version counter: the donated write bumps it, and autograd refuses
    the backward that needs the old value instead of returning a wrong gradient."""
    w = torch.ones(3, requires_grad=True)
    y = (w * w).sum()  # saves w for the backward
    tx = make()
    params = {"w": w.detach()}
    fr.donated_update(tx, {"w": torch.ones(3)}, tx.init(params), params)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_memory_the_optimizer_no_longer_holds_is_not_refused():
    """A step that replaces state tensors (a penalty's reported value) frees their memory; a new
    gradient there shares memory with nothing the step writes, and must not be refused."""
    w = torch.nn.Parameter(torch.tensor(1.0))
    opt = fr.TorchOptimizer([w], "adamw", lr=0.1, penalty=fr.l1(0.1), form="proximal")
    initial_value = opt.state[w]["value"]
    for _ in range(2):
        w.grad = torch.tensor(0.5)
        opt.step()
    assert initial_value.data_ptr() not in [v.data_ptr() for v in opt.state[w].values()]
    w.grad = initial_value.fill_(0.5)  # memory the optimizer held at first, and no longer does
    opt.step()


@PROPERTY
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    data=st.data(),
)
def test_memory_span_is_the_first_to_one_past_the_last_element(shape, data):
    """Against the address arithmetic of a strided view, written here: the first element at
    base + offset * itemsize, the last at base + (offset + sum((n_i - 1) * stride_i)) * itemsize."""
    from funcreg._src.core.aliasing import memory_span

    strides = [data.draw(st.integers(1, 5)) for _ in shape]
    offset = data.draw(st.integers(0, 6))
    needed = offset + sum((n - 1) * s for n, s in zip(shape, strides)) + 1
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    base = torch.zeros(needed, dtype=dtype)
    view = base.as_strided(shape, strides, offset)
    size = base.element_size()
    expected = (base.data_ptr() + offset * size, base.data_ptr() + needed * size)
    assert memory_span(view) == expected
    assert memory_span(base[:0]) is None  # no elements, nothing to overlap


def test_a_gradient_overlapping_a_parameter_from_either_side_is_refused_and_a_neighbour_is_not():
    flat = torch.zeros(10)
    params = {"w": flat[3:6]}  # elements 3, 4, 5
    tx = fr.sgd(0.1)
    state = tx.init(params)
    for grad in (flat[1:4], flat[5:8], flat[2:9:3]):  # ends in it, starts in it, straddles it by stride
        with pytest.raises(ValueError, match=r"gradient 'w' shares memory with params 'w'"):
            fr.donated_update(tx, {"w": grad}, state, params)
    for grad in (flat[0:3], flat[6:9]):  # just before, just after: no shared element
        fr.donated_update(tx, {"w": grad.clone().copy_(grad)}, state, params)
        fr.donated_update(tx, {"w": grad}, state, params)


def test_donated_update_refuses_a_state_of_any_earlier_generation():
    from funcreg._src.kernels.update import _CHECKS

    tx = fr.chain(fr.clip_by_global_norm(1.0), fr.adamw(0.1))  # a transform that returns new containers
    params = {"w": torch.ones(3)}
    states = [tx.init(params)]
    for _ in range(3):
        params, new = fr.donated_update(tx, {"w": torch.ones(3)}, states[-1], params)
        states.append(new)
    for stale in states[:-1]:
        with pytest.raises(ValueError, match="donated to an earlier step"):
            fr.donated_update(tx, {"w": torch.ones(3)}, stale, params)
    params, state = fr.donated_update(tx, {"w": torch.ones(3)}, states[-1], params)
    del states, stale
    for _ in range(20):  # states nobody else holds are let go: the tracker does not grow
        params, state = fr.donated_update(tx, {"w": torch.ones(3)}, state, params)
    assert len(_CHECKS.donations._held) <= 2
    # a fused alias writes into the very container it was given: that object is the latest state
    tx = fr.adam(0.1)
    s0 = tx.init({"w": torch.ones(3)})
    p, s1 = fr.donated_update(tx, {"w": torch.ones(3)}, s0, {"w": torch.ones(3)})
    assert s1 is s0
    fr.donated_update(tx, {"w": torch.ones(3)}, s0, p)


def test_optimizers_stepping_in_turn_keep_their_layouts_and_their_refusals(monkeypatch):
    """Two donated optimizers stepped in turn in one thread (a GAN's two): each pair's memory layout
    is computed once, not at every step (measured: 2x on 2,000 small leaves), and a layout that
    changes is still checked."""
    from funcreg._src.core import aliasing

    calls = []
    rebuild = aliasing._rebuild
    monkeypatch.setattr(aliasing, "_rebuild", lambda *a: calls.append(1) or rebuild(*a))
    runs = []
    for seed in range(2):
        gen = torch.Generator().manual_seed(seed)
        params = {"w": torch.randn(3, 2, generator=gen), "b": torch.randn(2, generator=gen)}
        tx = fr.adamw(0.01, weight_decay=0.1)
        runs.append([tx, tx.init(params), params])
    for _ in range(4):
        for run in runs:
            tx, state, params = run
            grads = {k: torch.ones_like(v) for k, v in params.items()}
            run[2], run[1] = fr.donated_update(tx, grads, state, params)
    assert len(calls) == 2
    tx, state, params = runs[0]
    base = torch.zeros(8)
    shared = {"w": base[:6].view(3, 2), "b": base[5:7]}  # overlapping views: refused, named
    with pytest.raises(ValueError, match="share memory"):
        fr.donated_update(tx, {k: torch.ones_like(v) for k, v in shared.items()}, tx.init(shared), shared)
