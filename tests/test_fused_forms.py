"""Donated steps on torch's own arithmetic: ``fr.sgd`` (``_multi_tensor_sgd``'s sequence, or with
``fused=True`` ``torch._fused_sgd_``) and the penalty forms folded into the adam/adamw/sgd kernels
(``funcreg/_src/kernels/fused_forms.py``).

Two oracles: torch.optim itself, bit for bit, where the chain *is* a torch.optim configuration
(coupled L2 = ``weight_decay``, a decoupled L2 at the learning rate = AdamW's decay), and the pure
path (``tx.update`` + ``apply_updates``) for every folded chain, to rounding: the fold reorders the
same operations (``w * (1 - lr * c)`` instead of ``w - lr * c * w``), so the comparison uses atol+rtol
sized for a few roundings per step.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import SLOW_OK, assert_trees_close, keep_buffers
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import funcreg as fr
from funcreg._src.kernels import fused as fused_module
from funcreg._src.kernels.fused_forms import FormKernel
from funcreg._src.kernels.update import kernel_of
from funcreg.testing import tensors

F32, F64 = torch.float32, torch.float64
SHAPES = {"w": (3, 2), "b": (2,), "k": (2, 2, 2)}
MASK = {"w": True, "b": False, "k": True}


def _clone(tree):
    return torch.utils._pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def _draw_grads(data, dtype, allow_none=True):
    grads = {k: data.draw(tensors(s, dtype=dtype, max_abs=2.0)) for k, s in SHAPES.items()}
    if allow_none and data.draw(st.booleans()):
        grads["b"] = None  # torch skips a parameter without a gradient; funcreg a None gradient
    return grads


@contextlib.contextmanager
def _fused_sgd_calls():
    """Counts the calls of ``torch._fused_sgd_`` (the kernel looks it up at every call)."""
    calls = []
    kernel = torch._fused_sgd_

    def counting(*args, **kwargs):
        calls.append(kwargs["is_first_step"])
        return kernel(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "_fused_sgd_", counting)
        yield calls


def _lockstep(tx, opt, leaves, params, data, dtype, fused=False):
    """``opt`` and ``tx``'s donated step side by side; ``fused``: the step must call ``torch._fused_sgd_``."""
    state, current = tx.init(params), _clone(params)
    for _ in range(data.draw(st.integers(1, 4))):
        grads = _draw_grads(data, dtype)
        for k, p in leaves.items():
            p.grad = None if grads[k] is None else grads[k].clone()
        opt.step()
        with _fused_sgd_calls() if fused else contextlib.nullcontext([True]) as calls:
            current, state = fr.donated_update(tx, grads, state, current)
        assert calls, "the fused kernel ran"
    for k, p in leaves.items():
        assert torch.equal(current[k], p.detach()), k
    return state


@pytest.mark.parametrize("buffers", ["allocated", "kept"])
@pytest.mark.parametrize("dtype", [F32, F64])
@settings(deadline=None, max_examples=8, suppress_health_check=SLOW_OK)
@given(data=st.data())
def test_donated_sgd_equals_torch_optim_bitwise(buffers, dtype, data):
    params = {k: data.draw(tensors(s, dtype=dtype, max_abs=2.0)) for k, s in SHAPES.items()}
    momentum = data.draw(st.sampled_from([0.0, 0.9]))
    nesterov = momentum > 0 and data.draw(st.booleans())
    dampening = 0.0 if nesterov or momentum == 0 else data.draw(st.sampled_from([0.0, 0.1]))
    wd, maximize = data.draw(st.sampled_from([0.0, 0.01])), data.draw(st.booleans())
    opts = dict(momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd, maximize=maximize)
    leaves = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.SGD(leaves.values(), lr=0.1, foreach=True, **opts)
    state = _lockstep(keep_buffers(fr.sgd(0.1, **opts), buffers == "kept"), opt, leaves, params, data, dtype)
    if momentum:
        trace = state[-2]
        for k, p in leaves.items():
            if p in opt.state and opt.state[p].get("momentum_buffer") is not None:
                assert torch.equal(trace.trace[k], opt.state[p]["momentum_buffer"]), k


def _sgd_options(data):
    momentum = data.draw(st.sampled_from([0.0, 0.9]), label="momentum")
    nesterov = momentum > 0 and data.draw(st.booleans(), label="nesterov")
    dampening = (
        0.0 if nesterov or momentum == 0 else data.draw(st.sampled_from([0.0, 0.1]), label="dampening")
    )
    wd = data.draw(st.sampled_from([0.0, 0.01, 0.3]), label="weight_decay")
    maximize = data.draw(st.booleans(), label="maximize")
    return dict(momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd, maximize=maximize)


@pytest.mark.parametrize("dtype", [F32, F64])
@settings(deadline=None, max_examples=12, suppress_health_check=SLOW_OK)
@given(data=st.data())
def test_donated_fused_sgd_equals_torch_optim_fused_bitwise(dtype, data):
    """``fr.sgd(fused=True)``'s donated step is ``torch.optim.SGD(fused=True)`` bit for bit (parameters
    and momentum buffers), with a float or a tensor learning rate. torch asks ``is_first_step`` once per
    param group, so where a parameter's first gradient comes late (``b`` None at the first step) the
    reference puts every parameter in a group of its own; funcreg splits the call the same way."""
    params = {k: data.draw(tensors(s, dtype=dtype, max_abs=2.0)) for k, s in SHAPES.items()}
    opts = _sgd_options(data)
    lr = torch.tensor(0.1) if data.draw(st.booleans(), label="tensor lr") else 0.1
    steps = data.draw(st.integers(1, 4), label="steps")
    present = [data.draw(st.booleans(), label="b present") for _ in range(steps)]
    late_first = not present[0] and any(present)
    leaves = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    groups = [{"params": [p]} for p in leaves.values()] if late_first else list(leaves.values())
    opt = torch.optim.SGD(groups, lr=lr, fused=True, **opts)
    tx = fr.sgd(lr, fused=True, **opts)
    state, current = tx.init(params), _clone(params)
    for b_present in present:
        grads = {k: data.draw(tensors(s, dtype=dtype, max_abs=2.0)) for k, s in SHAPES.items()}
        if not b_present:
            grads["b"] = None  # torch skips a parameter without a gradient; funcreg a None gradient
        for k, p in leaves.items():
            p.grad = None if grads[k] is None else grads[k].clone()
        opt.step()
        kept = _clone(grads)
        with _fused_sgd_calls() as calls:
            current, state = fr.donated_update(tx, grads, state, current)
        assert calls, "the fused kernel ran"
        _assert_close_trees(grads, kept, dtype, "the gradients are only read")
    for k, p in leaves.items():
        assert torch.equal(current[k], p.detach()), k
    if opts["momentum"]:
        trace = state[-2]
        for k, p in leaves.items():
            if p in opt.state and opt.state[p].get("momentum_buffer") is not None:
                assert torch.equal(trace.trace[k], opt.state[p]["momentum_buffer"]), k
                assert int(trace.steps[k]) == (sum(present) if k == "b" else steps), k


@pytest.mark.parametrize("dtype", [F32, F64])
@settings(deadline=None, max_examples=10, suppress_health_check=SLOW_OK)
@given(data=st.data())
def test_fused_changes_only_the_donated_step(dtype, data):
    """The pure ``tx.update`` of ``fr.sgd(fused=True)`` is that of ``fr.sgd`` bit for bit (updates and
    state); its donated step equals the pure path to rounding."""
    params = {k: data.draw(tensors(s, dtype=dtype, max_abs=3.0)) for k, s in SHAPES.items()}
    opts = _sgd_options(data)
    lr = data.draw(st.sampled_from([0.1, 0.0]), label="lr") if not opts["momentum"] else 0.1
    plain, fused = fr.sgd(lr, **opts), fr.sgd(lr, fused=True, **opts)
    assert kernel_of(fused).fused and not kernel_of(plain).fused
    p_plain, s_plain = params, plain.init(params)
    p_fused, s_fused = params, fused.init(params)
    don_p, don_s = _clone(params), fused.init(params)
    for t in range(data.draw(st.integers(1, 4))):
        grads = _draw_grads(data, dtype)
        u_plain, s_plain = plain.update(grads, s_plain, p_plain)
        u_fused, s_fused = fused.update(grads, s_fused, p_fused)
        for a, b in zip(
            torch.utils._pytree.tree_leaves((u_plain, s_plain)),
            torch.utils._pytree.tree_leaves((u_fused, s_fused)),
        ):
            assert (a is None and b is None) or torch.equal(a, b), t
        p_plain, p_fused = fr.apply_updates(p_plain, u_plain), fr.apply_updates(p_fused, u_fused)
        don_p, don_s = fr.donated_update(fused, grads, don_s, don_p)
        _assert_close_trees(don_p, p_fused, dtype, f"params after step {t + 1}")
        _assert_close_trees(don_s, s_fused, dtype, f"state after step {t + 1}")


def _pure_and_donated(tx, params, grads_at, steps=3):
    pure_p, pure_s = params, tx.init(params)
    don_p, don_s = _clone(params), tx.init(params)
    for t in range(steps):
        grads = grads_at(t)
        u, pure_s = tx.update(grads, pure_s, pure_p)
        pure_p = fr.apply_updates(pure_p, u)
        don_p, don_s = fr.donated_update(tx, grads, don_s, don_p)
    return pure_p, don_p


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fused_sgd_falls_back_where_torch_has_no_fused_kernel(momentum, monkeypatch):
    """Where ``torch._fused_sgd_`` does not apply the kernel declines (``None``) and the donated step
    runs the generic path, equal to the pure one bit for bit: complex parameters, a device torch has no
    fused SGD for (simulated: an empty list of devices), a tensor learning rate autograd tracks, a
    tensor weight decay, and under vmap."""
    real = {"w": torch.linspace(-1, 1, 6).reshape(3, 2), "b": torch.linspace(0.5, 1, 2)}
    grads_at = lambda t: {k: torch.full_like(v, 0.3 * (t + 1)) for k, v in real.items()}  # noqa: E731
    z = {"z": torch.tensor([1 + 1j, 2 - 1j])}
    cases = [
        (
            "complex",
            fr.sgd(0.1, momentum=momentum, fused=True),
            z,
            lambda t: {"z": torch.tensor([0.5 - 1j, 1 + 2j]) * (t + 1)},
        ),
        (
            "tensor weight decay",
            fr.sgd(0.1, momentum=momentum, weight_decay=torch.tensor(0.1), fused=True),
            real,
            grads_at,
        ),
        (
            "tracked lr",
            fr.sgd(torch.tensor(0.1, requires_grad=True), momentum=momentum, fused=True),
            real,
            grads_at,
        ),
    ]
    for what, tx, params, grads in cases:
        kernel = kernel_of(tx)
        with torch.no_grad():
            assert kernel(grads(0), tx.init(params), _clone(params)) is None, what
        pure_p, don_p = _pure_and_donated(tx, params, grads)
        for k in params:
            assert torch.equal(don_p[k], pure_p[k]), (what, k)
    tx = fr.sgd(0.1, momentum=momentum, weight_decay=0.01, fused=True)
    answers = []

    def probe(w):
        answers.append(kernel_of(tx)({"w": w.clone()}, tx.init({"w": w}), {"w": w.clone()}))
        return w

    torch.func.vmap(probe)(torch.ones(2, 3))
    assert answers == [None], "under vmap the kernel declines"
    monkeypatch.setattr(fused_module, "_get_fused_kernels_supported_devices", lambda: [])
    with _fused_sgd_calls() as calls:
        with torch.no_grad():
            assert kernel_of(tx)(grads_at(0), tx.init(real), _clone(real)) is None
        pure_p, don_p = _pure_and_donated(tx, real, grads_at)
    assert not calls
    for k in real:
        assert torch.equal(don_p[k], pure_p[k]), k


def _layout(x, how):
    """``x``'s values in another memory layout: transposed (dense), every other element (gaps), or as is."""
    if how == "transposed":
        return x.t().contiguous().t() if x.ndim == 2 else x.transpose(0, -1).contiguous().transpose(0, -1)
    if how == "strided":
        return torch.stack([x, torch.full_like(x, float("nan"))], dim=-1)[..., 0]
    return x


def _in_drawn_layouts(data, dtype):
    """A tree of SHAPES, each leaf in a drawn memory layout (see ``_layout``)."""
    layouts = ("contiguous", "transposed", "strided")
    return {
        k: _layout(data.draw(tensors(s, dtype=dtype, max_abs=2.0)), data.draw(st.sampled_from(layouts)))
        for k, s in SHAPES.items()
    }


@pytest.mark.parametrize("dtype", [F32, F64])
@settings(deadline=None, max_examples=10, suppress_health_check=SLOW_OK)
@given(data=st.data())
def test_fused_sgd_runs_the_foreach_sequence_where_the_layouts_differ(dtype, data):
    """torch's fused kernel walks the memory of a parameter, its gradient and its buffer in one order,
    so their layouts must agree (as autograd's ``.grad`` does; a gradient from ``torch.func.grad`` or a
    slice need not): those leaves take the foreach sequence, the others the kernel, and the step equals
    the pure path to rounding (the values of ``torch.optim.SGD(fused=True)`` on contiguous copies)."""
    params = _in_drawn_layouts(data, dtype)
    opts = _sgd_options(data)
    tx = fr.sgd(0.1, fused=True, **opts)
    pure_p, pure_s = params, tx.init(params)
    don_p, don_s = _clone(params), tx.init(params)
    contiguous = lambda x: x.clone(memory_format=torch.contiguous_format)  # noqa: E731
    leaves = {k: torch.nn.Parameter(contiguous(v)) for k, v in params.items()}
    opt = torch.optim.SGD(leaves.values(), lr=0.1, fused=True, **opts)
    for t in range(data.draw(st.integers(1, 3))):
        grads = _in_drawn_layouts(data, dtype)
        for k, p in leaves.items():
            p.grad = contiguous(grads[k])
        opt.step()
        u, pure_s = tx.update(grads, pure_s, pure_p)
        pure_p = fr.apply_updates(pure_p, u)
        with _fused_sgd_calls() as calls:
            don_p, don_s = fr.donated_update(tx, grads, don_s, don_p)
        # the contiguous leaves (k at least once drawn so, or all but one) take the kernel
        if all(g.is_contiguous() and don_p[k].is_contiguous() for k, g in grads.items()):
            assert calls
        _assert_close_trees(don_p, pure_p, dtype, f"params after step {t + 1}")
        _assert_close_trees(don_s, pure_s, dtype, f"state after step {t + 1}")
    for k, p in leaves.items():
        torch.testing.assert_close(don_p[k], p.detach(), **_close(dtype))


@pytest.mark.parametrize("dtype", [F32, F64])
@settings(deadline=None, max_examples=10, suppress_health_check=SLOW_OK)
@given(data=st.data())
def test_fused_adam_runs_the_foreach_sequence_where_the_layouts_differ(dtype, data):
    """The same for torch's fused Adam/AdamW kernel: a leaf whose gradient lies in memory unlike its
    parameter and moments (transposed, or with gaps) takes the foreach sequence, so the donated step
    equals the pure path to rounding and, after every step, ``torch.optim`` fed contiguous copies
    (the kernel used to walk a transposed gradient in the parameter's order: wrong values)."""
    params = _in_drawn_layouts(data, dtype)
    decoupled, amsgrad = data.draw(st.booleans()), data.draw(st.booleans())
    wd = data.draw(st.sampled_from([0.0, 0.1]))
    tx = (fr.adamw if decoupled else fr.adam)(0.1, weight_decay=wd, amsgrad=amsgrad, fused=True)
    pure_p, pure_s = params, tx.init(params)
    don_p, don_s = _clone(params), tx.init(params)
    contiguous = lambda x: x.clone(memory_format=torch.contiguous_format)  # noqa: E731
    leaves = {k: torch.nn.Parameter(contiguous(v)) for k, v in params.items()}
    torch_opt = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = torch_opt(leaves.values(), lr=0.1, weight_decay=wd, amsgrad=amsgrad, foreach=True)
    for t in range(data.draw(st.integers(1, 3))):
        grads = _in_drawn_layouts(data, dtype)
        for k, p in leaves.items():
            p.grad = contiguous(grads[k])
        opt.step()
        u, pure_s = tx.update(grads, pure_s, pure_p)
        pure_p = fr.apply_updates(pure_p, u)
        don_p, don_s = fr.donated_update(tx, grads, don_s, don_p)
        _assert_close_trees(don_p, pure_p, dtype, f"params after step {t + 1}")
        _assert_close_trees(don_s, pure_s, dtype, f"state after step {t + 1}")
        for k, p in leaves.items():
            torch.testing.assert_close(don_p[k], p.detach(), **_close(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_sgd_takes_half_precision_as_torch_does(dtype):
    """torch's fused SGD covers float16 and bfloat16 (on the CPU too): bit for bit with torch.optim."""
    g = torch.Generator().manual_seed(3)
    params = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    leaves = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opts = dict(momentum=0.9, nesterov=True, weight_decay=0.01)
    opt = torch.optim.SGD(leaves.values(), lr=0.1, fused=True, **opts)
    tx = fr.sgd(0.1, fused=True, **opts)
    state, current = tx.init(params), _clone(params)
    for _ in range(3):
        grads = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
        for k, p in leaves.items():
            p.grad = grads[k].clone()
        opt.step()
        with _fused_sgd_calls() as calls:
            current, state = fr.donated_update(tx, grads, state, current)
        assert calls
    for k, p in leaves.items():
        assert torch.equal(current[k], p.detach()), k


@pytest.mark.parametrize("buffers", ["allocated", "kept"])
@pytest.mark.parametrize(
    "case",
    [
        "coupled_adam",
        "decoupled_adamw",
        "coupled_sgd",
        "coupled_sgd_fused",
        "decoupled_sgd_fused_no_momentum",
    ],
)
@pytest.mark.parametrize("dtype", [F32, F64])
@settings(deadline=None, max_examples=6, suppress_health_check=SLOW_OK)
@given(data=st.data())
def test_a_folded_form_is_torch_optims_weight_decay_bitwise(buffers, case, dtype, data):
    """The chain is a torch.optim configuration: the donated step is that optimizer, bit for bit."""
    params = {k: data.draw(tensors(s, dtype=dtype, max_abs=2.0)) for k, s in SHAPES.items()}
    c, masked = data.draw(st.sampled_from([0.01, 0.3])), data.draw(st.booleans())
    if case == "decoupled_sgd_fused_no_momentum":
        c = data.draw(st.sampled_from([c, 0.7]))  # 0.1 * 0.7 / 0.1 != 0.7: the kernel takes c itself
    pen = fr.l2(c, mask=MASK if masked else None)
    leaves = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    decayed = [leaves[k] for k in SHAPES if not masked or MASK[k]]
    plain = [leaves[k] for k in SHAPES if masked and not MASK[k]]
    groups = [{"params": decayed, "weight_decay": c}] + (
        [{"params": plain, "weight_decay": 0.0}] if plain else []
    )
    if case == "coupled_adam":
        amsgrad = data.draw(st.booleans())
        tx = fr.chain(fr.add_penalty_grad(pen), fr.adam(0.01, amsgrad=amsgrad))
        opt = torch.optim.Adam(groups, lr=0.01, amsgrad=amsgrad, foreach=True)
    elif case == "decoupled_adamw":
        tx = fr.chain(fr.adamw(0.01, weight_decay=0.0), fr.decoupled(pen, learning_rate=0.01))
        opt = torch.optim.AdamW(groups, lr=0.01, foreach=True)
    elif case == "coupled_sgd":
        momentum = data.draw(st.sampled_from([0.0, 0.9]))
        tx = fr.chain(fr.add_penalty_grad(pen), fr.sgd(0.1, momentum=momentum))
        opt = torch.optim.SGD(groups, lr=0.1, momentum=momentum, foreach=True)
    else:
        # torch's fused SGD asks is_first_step once per group: one group per parameter, so that a
        # parameter whose first gradient comes late (b) starts its buffer as funcreg's does
        wd_of = {k: c if not masked or MASK[k] else 0.0 for k in SHAPES}
        groups = [{"params": [leaves[k]], "weight_decay": wd_of[k]} for k in SHAPES]
        if case == "coupled_sgd_fused":
            momentum = data.draw(st.sampled_from([0.0, 0.9]))
            nesterov = momentum > 0 and data.draw(st.booleans())
            opts = dict(momentum=momentum, nesterov=nesterov)
            tx = fr.chain(fr.add_penalty_grad(pen), fr.sgd(0.1, fused=True, **opts))
        else:
            # without momentum a decoupled L2 at the learning rate is torch's weight_decay, in one
            # kernel call: w - lr * (g + c * w)
            opts = dict(maximize=data.draw(st.booleans()))
            tx = fr.chain(fr.sgd(0.1, fused=True, **opts), fr.decoupled(pen, learning_rate=0.1))
        opt = torch.optim.SGD(groups, lr=0.1, fused=True, **opts)
    assert isinstance(kernel_of(tx), FormKernel)
    tx = keep_buffers(tx, buffers == "kept")
    _lockstep(tx, opt, leaves, params, data, dtype, fused="fused" in case)


def _lr(schedule):
    return fr.linear_schedule(0.05, 0.005, 4) if schedule else 0.05


FOLDED = {
    "coupled_l2_adam": lambda s, m: fr.chain(fr.add_penalty_grad(fr.l2(0.1, mask=m)), fr.adam(_lr(s))),
    "coupled_l2_adam_wd_fused": lambda s, m: fr.chain(
        fr.add_penalty_grad(fr.l2(0.1, mask=m)), fr.adam(_lr(s), weight_decay=0.02, fused=True)
    ),
    "coupled_l2_sgd_nesterov": lambda s, m: fr.chain(
        fr.add_penalty_grad(fr.l2(0.1, mask=m)), fr.sgd(_lr(s), momentum=0.9, nesterov=True)
    ),
    "adam_decoupled_l2": lambda s, m: fr.chain(
        fr.adam(_lr(s)), fr.decoupled(fr.l2(0.1, mask=m), learning_rate=_lr(s))
    ),
    "adamw_decoupled_l2_no_rate": lambda s, m: fr.chain(
        fr.adamw(_lr(s), weight_decay=0.01, amsgrad=True), fr.decoupled(fr.l2(0.1, mask=m))
    ),
    "sgd_decoupled_l2": lambda s, m: fr.chain(
        fr.sgd(_lr(s), momentum=0.5), fr.decoupled(fr.l2(0.1, mask=m), learning_rate=_lr(s))
    ),
    "adamw_proximal_l1": lambda s, m: fr.chain(
        fr.adamw(_lr(s), weight_decay=0.01), fr.proximal(fr.l1(0.5, mask=m), learning_rate=_lr(s))
    ),
    "adam_fused_proximal_l1": lambda s, m: fr.chain(
        fr.adam(_lr(s), fused=True, maximize=True), fr.proximal(fr.l1(0.5, mask=m), learning_rate=_lr(s))
    ),
    "sgd_proximal_l1": lambda s, m: fr.chain(
        fr.sgd(_lr(s)), fr.proximal(fr.l1(0.5, mask=m), learning_rate=_lr(s))
    ),
    # fr.sgd(fused=True): torch._fused_sgd_ with the coupled decay inside; a decoupled one inside too
    # without momentum (c at the learning rate, s * c / lr at another rate s), before it with momentum
    # (the weights scaled first), through the foreach sequence beside a coupled decay with momentum;
    # the prox after it
    "coupled_l2_sgd_fused_nesterov_wd": lambda s, m: fr.chain(
        fr.add_penalty_grad(fr.l2(0.1, mask=m)),
        fr.sgd(_lr(s), momentum=0.9, nesterov=True, weight_decay=0.02, fused=True),
    ),
    "coupled_l2_sgd_fused_plain": lambda s, m: fr.chain(
        fr.add_penalty_grad(fr.l2(0.1, mask=m)), fr.sgd(_lr(s), fused=True)
    ),
    "sgd_fused_decoupled_l2": lambda s, m: fr.chain(
        fr.sgd(_lr(s), fused=True, maximize=True), fr.decoupled(fr.l2(0.1, mask=m), learning_rate=_lr(s))
    ),
    "sgd_fused_wd_decoupled_l2_other_rate": lambda s, m: fr.chain(
        fr.sgd(_lr(s), weight_decay=0.02, fused=True), fr.decoupled(fr.l2(0.1, mask=m), learning_rate=0.07)
    ),
    "sgd_fused_zero_lr_decoupled_l2": lambda s, m: fr.chain(
        fr.sgd(0.0, fused=True), fr.decoupled(fr.l2(0.1, mask=m), learning_rate=_lr(s))
    ),
    "sgd_fused_momentum_decoupled_l2": lambda s, m: fr.chain(
        fr.sgd(_lr(s), momentum=0.5, dampening=0.1, fused=True),
        fr.decoupled(fr.l2(0.1, mask=m), learning_rate=_lr(s)),
    ),
    "sgd_fused_momentum_wd_decoupled_l2": lambda s, m: fr.chain(
        fr.sgd(_lr(s), momentum=0.5, weight_decay=0.02, fused=True),
        fr.decoupled(fr.l2(0.1, mask=m), learning_rate=_lr(s)),
    ),
    "sgd_fused_proximal_l1": lambda s, m: fr.chain(
        fr.sgd(_lr(s), momentum=0.9, maximize=True, fused=True),
        fr.proximal(fr.l1(0.5, mask=m), learning_rate=_lr(s)),
    ),
    "named_coupled_l2": lambda s, m: fr.named_chain(
        ("penalty", fr.add_penalty_grad(fr.l2(0.1, mask=m))), ("optimizer", fr.adam(_lr(s)))
    ),
}


def _close(dtype):
    # a few roundings per step, accumulated over up to 5 steps of moments near 1
    return dict(atol=1e-5, rtol=1e-4) if dtype == F32 else dict(atol=1e-12, rtol=1e-10)


def _assert_close_trees(a, b, dtype, what):
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    assert len(la) == len(lb), what
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, **_close(dtype), msg=lambda m: f"{what}: {m}")


# the coupled L2 coefficients of the Adam chains above: (the penalty's, the alias's own weight_decay)
COUPLED_ADAM = {
    "coupled_l2_adam": (0.1, 0.0),
    "coupled_l2_adam_wd_fused": (0.1, 0.02),
    "named_coupled_l2": (0.1, 0.0),
}


def _assume_no_cancellation(name, masked, grads, params):
    """Away from a gradient that cancels the coupled decay to rounding (``g = -c * w``, which the
    strategy's round numbers hit: 0.3 and -3 at c = 0.1): there Adam divides the rounding residue of
    ``g + c * w`` by itself and ``eps``, and the two paths, rounding ``c * w`` differently, may move
    by up to ``lr``, both right. Exact zeros (``g = w = 0``) are kept."""
    if name not in COUPLED_ADAM:
        return
    penalty_c, alias_wd = COUPLED_ADAM[name]
    for k, g in grads.items():
        if g is None:
            continue
        cw = (penalty_c * (MASK[k] if masked else 1.0) + alias_wd) * params[k]
        near = ((g + cw).abs() <= 1e-3 * (g.abs() + cw.abs())) & ((g != 0) | (cw != 0))
        assume(not bool(near.any()))


@pytest.mark.parametrize("buffers", ["allocated", "kept"])
@pytest.mark.parametrize("name", sorted(FOLDED))
@pytest.mark.parametrize("dtype", [F32, F64])
@settings(deadline=None, max_examples=6, suppress_health_check=SLOW_OK)
@given(data=st.data())
def test_a_folded_form_equals_the_pure_path(buffers, name, dtype, data):
    schedule, masked = data.draw(st.booleans()), data.draw(st.booleans())
    tx = keep_buffers(FOLDED[name](schedule, MASK if masked else None), buffers == "kept")
    kernel = kernel_of(tx)
    assert isinstance(kernel, FormKernel)
    params = {k: data.draw(tensors(s, dtype=dtype, max_abs=3.0)) for k, s in SHAPES.items()}
    pure_p, pure_s = params, tx.init(params)
    don_p, don_s = _clone(params), tx.init(params)
    for t in range(data.draw(st.integers(1, 5))):
        grads = _draw_grads(data, dtype)
        _assume_no_cancellation(name, masked, grads, pure_p)
        kept = _clone(grads)
        u, pure_s = tx.update(grads, pure_s, pure_p)
        pure_p = fr.apply_updates(pure_p, u)
        # the folded kernel itself runs (None would mean the generic path, tested elsewhere)
        with torch.no_grad():
            done = kernel(grads, don_s, don_p)
        assert done is not None
        don_p, don_s = done
        _assert_close_trees(grads, kept, dtype, "the gradients are only read")
        _assert_close_trees(don_p, pure_p, dtype, f"params after step {t + 1}")
        _assert_close_trees(don_s, pure_s, dtype, f"state after step {t + 1}")
    if "proximal" in name:
        # the zero patterns agree, except where one side is within rounding of zero but not zero (a
        # moved point on the threshold, where either side is right); exact zeros away from the
        # threshold are tested below
        atol = _close(dtype)["atol"]
        for k in SHAPES:
            near = lambda x: (x != 0) & (x.abs() <= atol)  # noqa: E731
            boundary = near(pure_p[k]) | near(don_p[k])
            assert torch.equal((don_p[k] == 0) | boundary, (pure_p[k] == 0) | boundary), k


@pytest.mark.parametrize(
    "make",
    [lambda: fr.sgd(0.1), lambda: fr.sgd(0.1, fused=True), lambda: fr.adamw(0.1, weight_decay=0.1)],
)
def test_the_folded_prox_lands_on_exact_zeros(make):
    """Every parameter whose moved point is well inside the threshold ends exactly at zero."""
    tx = fr.chain(make(), fr.proximal(fr.l1(10.0), learning_rate=0.1))  # threshold 1.0
    params = {"w": torch.linspace(-0.3, 0.3, 6).reshape(3, 2), "b": torch.tensor([0.25, -0.25])}
    grads = {k: torch.full_like(v, 0.05) for k, v in params.items()}
    done = kernel_of(tx)(grads, tx.init(params), _clone(params))
    assert done is not None
    for k in params:
        assert torch.equal(done[0][k], torch.zeros_like(params[k])), k


@pytest.mark.parametrize(
    "make",
    [
        # the chain negates the penalty's gradient with the loss's (maximize): torch's decay does not
        lambda: fr.chain(fr.add_penalty_grad(fr.l2(0.1)), fr.adam(0.01, maximize=True)),
        lambda: fr.chain(fr.add_penalty_grad(fr.l2(0.1)), fr.sgd(0.01, maximize=True, fused=True)),
        # a decoupled L1 and a coupled elastic net are no torch decay
        lambda: fr.chain(fr.adam(0.01), fr.decoupled(fr.l1(0.1), learning_rate=0.01)),
        lambda: fr.chain(fr.add_penalty_grad(fr.elastic_net(0.1, 0.1)), fr.sgd(0.1)),
        # a coupled penalty beside AdamW's own decoupled decay: one leaf would need both kernels
        lambda: fr.chain(fr.add_penalty_grad(fr.l2(0.1)), fr.adamw(0.01, weight_decay=0.1)),
        # a tensor coefficient (a swept hyperparameter)
        lambda: fr.chain(fr.add_penalty_grad(fr.l2(torch.tensor(0.1))), fr.adam(0.01)),
    ],
)
def test_what_cannot_fold_runs_the_generic_donated_path_bit_for_bit(make):
    tx = make()
    params = {"w": torch.linspace(-1, 1, 6).reshape(3, 2), "b": torch.linspace(0.5, 1, 2)}
    kernel = kernel_of(tx)
    pure_p, pure_s = params, tx.init(params)
    don_p, don_s = _clone(params), tx.init(params)
    for t in range(3):
        grads = {k: torch.full_like(v, 0.3 * (t + 1)) for k, v in params.items()}
        if kernel is not None:
            assert kernel(grads, don_s, don_p) is None
        u, pure_s = tx.update(grads, pure_s, pure_p)
        pure_p = fr.apply_updates(pure_p, u)
        don_p, don_s = fr.donated_update(tx, grads, don_s, don_p)
    for k in params:
        assert torch.equal(don_p[k], pure_p[k]), k


def test_make_step_with_a_foldable_form_uses_the_kernel_and_matches_the_pure_step():
    torch.manual_seed(0)
    X, y = torch.randn(16, 3), torch.randn(16, 2)
    model = torch.nn.Linear(3, 2)

    def loss(p, X, y):
        return ((torch.func.functional_call(model, p, (X,)) - y) ** 2).mean()

    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    for form in ("coupled", "decoupled"):
        steps = [
            fr.make_step(loss, fr.adam(0.05), penalty=fr.l2(0.1), form=form, donate=d, learning_rate=0.05)
            for d in (False, True)
        ]
        assert isinstance(kernel_of(steps[1].transform({})), FormKernel)
        states = [s.init(params) for s in steps]
        for _ in range(4):
            states = [s(st_, X, y)[0] for s, st_ in zip(steps, states)]
        assert_trees_close(states[1].params, states[0].params, f"{form} params")


REPORTED = {
    "coupled_adam": lambda r: fr.chain(fr.add_penalty_grad(fr.l2(0.1), report=r), fr.adam(0.05)),
    "decoupled_adam_fused": lambda r: fr.chain(
        fr.adam(0.05, fused=True), fr.decoupled(fr.l2(0.1), learning_rate=0.05, report=r)
    ),
    "proximal_sgd": lambda r: fr.chain(fr.sgd(0.1), fr.proximal(fr.l1(0.05), learning_rate=0.1, report=r)),
    "coupled_sgd_fused": lambda r: fr.chain(
        fr.add_penalty_grad(fr.l2(0.1), report=r), fr.sgd(0.1, momentum=0.9, fused=True)
    ),
    # not foldable (a sum of penalties): the generic paths
    "coupled_sum_sgd": lambda r: fr.chain(
        fr.add_penalty_grad(fr.l2(0.1) + fr.l1(0.01, name="l1"), report=r), fr.sgd(0.1)
    ),
}


@pytest.mark.parametrize("donated", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", sorted(REPORTED))
@settings(deadline=None, max_examples=5, suppress_health_check=SLOW_OK)
@given(data=st.data())
def test_report_false_changes_no_step_and_leaves_the_value_nan(name, donated, data):
    """``report=False`` skips computing the penalty: the steps are those of ``report=True`` to the bit,
    and the state's value and terms (same names) are NaN from init on, while the count advances."""
    params = {k: data.draw(tensors(s, dtype=F64, max_abs=3.0)) for k, s in SHAPES.items()}
    runs = {}
    for report in (True, False):
        tx = REPORTED[name](report)
        p, state = _clone(params), tx.init(params)
        steps = 3
        for t in range(steps):
            grads = {k: torch.full(s, 0.1 * (t + 1), dtype=F64) for k, s in SHAPES.items()}
            if donated:
                p, state = fr.donated_update(tx, grads, state, p)
            else:
                u, state = tx.update(grads, state, p)
                p = fr.apply_updates(p, u)
        runs[report] = (p, fr.penalty_states(state)[0])
    (p_on, s_on), (p_off, s_off) = runs[True], runs[False]
    for k in SHAPES:
        assert torch.equal(p_on[k], p_off[k]), k
    assert bool(torch.isfinite(s_on.value)) and bool(torch.isnan(s_off.value))
    assert s_off.value.dtype == s_on.value.dtype == F64
    assert set(s_off.terms) == set(s_on.terms) and all(bool(torch.isnan(v)) for v in s_off.terms.values())
    assert int(s_off.count) == int(s_on.count) == 3


def test_report_must_be_a_bool_and_is_printed_when_off():
    for make in (
        lambda r: fr.add_penalty_grad(fr.l2(0.1), report=r),
        lambda r: fr.decoupled(fr.l2(0.1), report=r),
        lambda r: fr.proximal(fr.l1(0.1), 0.1, report=r),
    ):
        with pytest.raises(TypeError, match="report"):
            make("no")
        assert "report=False" in repr(make(False)) and "report" not in repr(make(True))
