"""Kept buffers for a donated kernel's temporaries (``funcreg/_src/kernels/scratch.py``).

The oracle is the foreach op each helper replaces (bit for bit), and torch.optim for whole steps on
tensors large enough to get kept buffers without any test setting. The kernels' property tests in
``test_donation.py`` and ``test_fused_forms.py`` run both with fresh and with kept buffers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SLOW_OK
from hypothesis import given, settings
from hypothesis import strategies as st

import funcreg as fr
from funcreg._src.kernels import scratch as scratch_module
from funcreg._src.kernels.fused_forms import FormKernel
from funcreg._src.kernels.scratch import Scratch, add_into, unary_into
from funcreg._src.kernels.update import kernel_of


def _tensors(data, n, dtype):
    sizes = data.draw(st.lists(st.integers(1, 6), min_size=n, max_size=n))
    return [
        torch.from_numpy(
            np.asarray(data.draw(st.lists(st.floats(-3, 3), min_size=s, max_size=s)), dtype=dtype)
        )
        for s in sizes
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(deadline=None, max_examples=20, suppress_health_check=SLOW_OK)
@given(data=st.data())
def test_the_helpers_equal_their_foreach_op_and_write_into_the_buffers(dtype, data):
    n = data.draw(st.integers(1, 5))
    xs = _tensors(data, n, dtype)
    ys = [
        torch.from_numpy(
            np.asarray(
                data.draw(st.lists(st.floats(-3, 3), min_size=x.numel(), max_size=x.numel())), dtype=dtype
            )
        )
        for x in xs
    ]
    kept = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    alpha = data.draw(st.floats(-2, 2))
    for got, want in [
        (
            lambda b: unary_into(torch.sqrt, torch._foreach_sqrt, [x.abs() for x in xs], b),
            torch._foreach_sqrt([x.abs() for x in xs]),
        ),
        (lambda b: unary_into(torch.neg, torch._foreach_neg, xs, b), torch._foreach_neg(xs)),
        (lambda b: add_into(xs, ys, alpha, b), torch._foreach_add(xs, ys, alpha=alpha)),
    ]:
        bufs = [torch.full_like(x, float("nan")) if k else None for x, k in zip(xs, kept)]
        out = got(bufs)
        for i, (o, w) in enumerate(zip(out, want)):
            assert torch.equal(o, w), i
            if kept[i]:
                assert o is bufs[i]
            else:
                assert all(o is not x for x in xs + ys)


def test_a_set_is_handed_out_once_and_comes_back_after_give():
    scratch = Scratch(large=4)
    like = [torch.zeros(8), torch.zeros(2), torch.zeros(2, 2)]
    first = scratch.take(like)
    assert [b is None for b in first] == [False, True, False]
    # while taken (another thread stepping the same transform), a second take gets its own buffers
    second = scratch.take(like)
    assert all(a is not b for a, b in zip(first, second) if a is not None)
    scratch.give(like, first)
    again = scratch.take(like)
    assert all(a is b for a, b in zip(first, again))
    # another structure (shape or dtype) gets another set
    other = scratch.take([torch.zeros(8, dtype=torch.float64)])
    assert other[0].dtype == torch.float64 and other[0] is not first[0]


def test_the_kept_sets_are_bounded():
    scratch = Scratch(large=1)
    for n in range(1, 2 * scratch_module._SETS + 1):
        like = [torch.zeros(n)]
        scratch.give(like, scratch.take(like))
    assert len(scratch._sets) == scratch_module._SETS
    # the newest are kept
    newest = [torch.zeros(2 * scratch_module._SETS)]
    assert scratch._key(newest) in scratch._sets


def _storages(tree):
    return {
        x.untyped_storage().data_ptr()
        for x in torch.utils._pytree.tree_leaves(tree)
        if isinstance(x, torch.Tensor) and x.numel() > 0
    }


CASES = {
    "adam_coupled_maximize": (
        lambda: fr.adam(1e-2, weight_decay=0.1, maximize=True),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, maximize=True, foreach=True),
    ),
    "adam_amsgrad": (
        lambda: fr.adam(1e-2, amsgrad=True),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, foreach=True),
    ),
    "adamw": (
        lambda: fr.adamw(1e-2, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    ),
    "coupled_l2_adam_form": (
        lambda: fr.chain(fr.add_penalty_grad(fr.l2(0.1)), fr.adam(1e-2)),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    ),
    "sgd_nesterov_coupled": (
        lambda: fr.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1, foreach=True),
    ),
    "sgd_maximize_coupled": (
        lambda: fr.sgd(0.1, weight_decay=0.1, maximize=True),
        lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.1, maximize=True, foreach=True),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_steps_on_large_tensors_equal_torch_optim_and_keep_their_buffers_apart(case):
    """With tensors past ``LARGE`` (no test setting) the kernel keeps buffers: the steps equal
    torch.optim bit for bit, reuse one set, never share storage with the params, state or gradients,
    and never write into the gradients."""
    make_tx, make_opt = CASES[case]
    gen = np.random.default_rng(0)
    shapes = {"w": (256, 256), "b": (256,)}  # 65,536 elements: one large, one small
    assert 256 * 256 >= scratch_module.LARGE
    params = {k: torch.from_numpy(gen.standard_normal(s, dtype=np.float32)) for k, s in shapes.items()}
    leaves = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    tx, opt = make_tx(), make_opt(list(leaves.values()))
    kernel = kernel_of(tx)
    kernel = kernel.kernel if isinstance(kernel, FormKernel) else kernel
    state, current = tx.init(params), {k: v.clone() for k, v in params.items()}
    kept = None
    for _ in range(3):
        grads = {k: torch.from_numpy(gen.standard_normal(s, dtype=np.float32)) for k, s in shapes.items()}
        copies = {k: g.clone() for k, g in grads.items()}
        for k, p in leaves.items():
            p.grad = grads[k].clone()
        opt.step()
        current, state = fr.donated_update(tx, grads, state, current)
        for k in shapes:
            assert torch.equal(current[k], leaves[k].detach()), k
            assert torch.equal(grads[k], copies[k]), f"gradient {k} written"
        (sets,) = kernel._scratch._sets.values()
        assert sets[0] is not None and sets[1] is None  # only the large tensor
        kept = sets if kept is None else kept
        assert sets[0] is kept[0], "the set is reused across steps"
        assert sets[0].untyped_storage().data_ptr() not in _storages((current, state, grads))


@pytest.mark.parametrize(
    "make", [lambda: fr.sgd(0.1), lambda: fr.sgd(0.1, momentum=0.9)], ids=["plain", "momentum"]
)
def test_sgd_without_temporaries_keeps_no_buffers(make):
    tx = make()
    params = {"w": torch.zeros(256, 256)}
    state = tx.init(params)
    for _ in range(2):
        params, state = fr.donated_update(tx, {"w": torch.ones(256, 256)}, state, params)
    assert not kernel_of(tx)._scratch._sets


def test_kept_buffers_take_the_layout_of_their_tensors():
    """A transposed parameter (and its moments, created like it) gets a buffer of its own strides,
    so the temporaries are written without a strided copy; the step still equals torch.optim."""
    w = torch.from_numpy(np.random.default_rng(1).standard_normal((256, 512), dtype=np.float32)).t()
    assert not w.is_contiguous() and w.numel() >= scratch_module.LARGE
    leaf = torch.nn.Parameter(w.clone())
    assert leaf.stride() == w.stride()
    tx, opt = fr.adam(1e-2), torch.optim.Adam([leaf], lr=1e-2, foreach=True)
    params = {"w": w.clone()}
    state = tx.init(params)
    for t in range(2):
        g = torch.full_like(w, 0.1 * (t + 1))
        leaf.grad = g.clone()
        opt.step()
        params, state = fr.donated_update(tx, {"w": g}, state, params)
    assert torch.equal(params["w"], leaf.detach())
    (kept,) = kernel_of(tx)._scratch._sets.values()
    assert kept[0].stride() == w.stride()
