"""Details of the donated-step kernels: which refusals a donated step makes before it writes, which
states a folded penalty form takes, a prox with a zero threshold inside torch's kernel, and the
traced foreach sequence under ``torch.compile`` (``funcreg/_src/kernels/``)."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from helpers import SLOW_OK
from hypothesis import given, settings
from hypothesis import strategies as st

import funcreg as fr
from funcreg._src.kernels.update import kernel_of
from funcreg.testing import tensors

F32, F64 = torch.float32, torch.float64
SHAPES = {"w": (3, 2), "b": (2,)}


def _error(fn):
    try:
        fn()
    except (TypeError, ValueError) as e:  # LeafTypeError is a TypeError
        return type(e), str(e)
    return None


# --- check_donatable ---------------------------------------------------------------------------------


def test_donating_a_state_tensor_autograd_needs_is_refused_naming_it():
    tx = fr.adam(0.1)
    params = {"w": torch.ones(2)}
    state = tx.init(params)
    state.mu["w"].requires_grad_(True)
    with pytest.raises(ValueError, match=r"cannot donate state 'mu\.w': autograd needs its value"):
        fr.donated_update(tx, {"w": torch.ones(2)}, state, params)
    with torch.no_grad():  # no history recorded: writing into it is fine
        _, out = fr.donated_update(tx, {"w": torch.ones(2)}, state, params)
    assert out.mu["w"] is state.mu["w"]


def test_donating_one_parameter_twice_is_refused_under_no_grad_too():
    w = torch.ones(2)
    tx = fr.sgd(0.1)
    with torch.no_grad(), pytest.raises(ValueError, match="'a' and 'b' are the same tensor"):
        fr.donated_update(tx, {"a": torch.ones(2), "b": torch.ones(2)}, tx.init(None), {"a": w, "b": w})
    assert torch.equal(w, torch.ones(2))  # refused before anything was written


def test_donating_a_state_torch_func_grad_traces_is_refused_under_no_grad():
    tx = fr.adam(0.1)
    params, grads = {"w": torch.ones(2)}, {"w": torch.ones(2)}
    start = tx.init(params)
    refused = []

    def f(m):
        state = start._replace(mu={"w": m})
        with torch.no_grad():
            refused.append(_error(lambda: fr.donated_update(tx, grads, state, params)))
        return m.sum()

    torch.func.grad(f)(torch.zeros(2))
    assert refused[0] is not None and refused[0][0] is ValueError
    assert "cannot donate state 'mu.w': autograd needs its value" in refused[0][1]
    assert torch.equal(params["w"], torch.ones(2))


# --- folded penalty forms ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: fr.chain(fr.add_penalty_grad(fr.l2(0.1)), fr.adam(0.1)),
        lambda: fr.chain(fr.sgd(0.1, momentum=0.9), fr.decoupled(fr.l2(0.1), learning_rate=0.1)),
    ],
    ids=["coupled_adam", "decoupled_sgd"],
)
def test_a_malformed_chain_state_is_refused_by_the_donated_step_as_by_the_pure_one(make):
    """A folded chain's donated step takes only the chain's own state (a plain tuple of two): a list,
    a namedtuple or a tuple of another length is refused with the pure step's error, nothing written."""
    tx = make()
    assert kernel_of(tx) is not None  # the folded kernel is what would run
    params = {"w": torch.ones(2)}
    good = tx.init(params)
    pair = namedtuple("Pair", "a b")
    for bad in (list(good), pair(*good), (*good, good[1]), (good[0],)):
        expected = _error(lambda bad=bad: tx.update({"w": torch.ones(2)}, bad, params))
        assert expected is not None, type(bad)
        donated = {"w": torch.ones(2)}
        got = _error(
            lambda bad=bad, donated=donated: fr.donated_update(tx, {"w": torch.ones(2)}, bad, donated)
        )
        assert got == expected, (type(bad).__name__, len(bad))
        assert torch.equal(donated["w"], torch.ones(2))


ZERO_THRESHOLD = {
    "coefficient_zero": (0.0, 0.1),
    "rate_zero": (0.3, 0.0),
    "warmup_rate": (0.3, lambda t: 0.0 if t == 0 else 0.1),  # zero at the first step only
}


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("case", sorted(ZERO_THRESHOLD))
@pytest.mark.parametrize("dtype", [F32, F64])
@settings(deadline=None, max_examples=5, suppress_health_check=SLOW_OK)
@given(data=st.data())
def test_a_prox_with_a_zero_threshold_runs_inside_torchs_adamw_kernel(fused, case, dtype, data):
    """``adamw, proximal(l1(c), learning_rate=s)`` with ``s * c == 0`` at a step: the prox is the identity
    there, and the folded kernel still runs (torch.optim.AdamW bit for bit, then ``softshrink(w, s*c)``)."""
    c, rate = ZERO_THRESHOLD[case]
    tx = fr.chain(fr.adamw(0.01, weight_decay=0.1, fused=fused), fr.proximal(fr.l1(c), learning_rate=rate))
    kernel = kernel_of(tx)
    params = {k: data.draw(tensors(s, dtype=dtype, max_abs=2.0)) for k, s in SHAPES.items()}
    leaves = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.AdamW(leaves.values(), lr=0.01, weight_decay=0.1, fused=fused, foreach=not fused)
    current = {k: v.clone() for k, v in params.items()}
    state = tx.init(current)
    for t in range(data.draw(st.integers(1, 3))):
        grads = {k: data.draw(tensors(s, dtype=dtype, max_abs=2.0)) for k, s in SHAPES.items()}
        for k, p in leaves.items():
            p.grad = grads[k].clone()
        opt.step()
        threshold = (rate(t) if callable(rate) else rate) * c
        with torch.no_grad():
            for p in leaves.values():
                p.copy_(torch.nn.functional.softshrink(p, threshold))
            done = kernel(grads, state, current)
        assert done is not None, f"the folded kernel refused step {t + 1}"
        current, state = done
    for k, p in leaves.items():
        assert torch.equal(current[k], p.detach()), k


# --- torch.compile -----------------------------------------------------------------------------------


def test_a_compiled_donated_adam_traces_torchs_foreach_sequence():
    """Under torch.compile (no autograd recording) the donated adam step is the traced foreach
    sequence of torch.optim's capturable branch: the bias corrections as ``_foreach_pow`` of the step
    counters and the parameters moved by one ``_foreach_addcdiv_``, written into the donated tensors."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    tx = fr.adam(0.05)
    params = {"w": torch.ones(3, 2, dtype=F64), "b": torch.zeros(2, dtype=F64)}
    state = tx.init(params)
    held = params["w"]
    step = torch.compile(lambda g, s, p: fr.donated_update(tx, g, s, p), backend=backend)
    grads = {k: torch.full_like(v, 0.5) for k, v in params.items()}
    params, state = step(grads, state, params)
    targets = {n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert torch._foreach_pow in targets and torch._foreach_addcdiv_ in targets, targets
    assert params["w"] is held
    # one Adam step from zero moments moves every coordinate by lr * g / (|g| + eps) in closed form
    expected = 1.0 - 0.05 * 0.5 / (0.5 + 1e-8)
    torch.testing.assert_close(params["w"], torch.full((3, 2), expected, dtype=F64), atol=1e-12, rtol=1e-12)


def test_a_scheduled_sgd_refuses_a_constant_rate_sgds_state_as_the_pure_step_does():
    """``fr.sgd(schedule)`` stepped with the state of ``fr.sgd(0.1)`` (no schedule counter): the donated
    step raises the pure step's error instead of stepping with ``schedule(0)``, and writes nothing."""
    params = {"w": torch.tensor([1.0, -2.0, 3.0])}
    grads = {"w": torch.tensor([0.5, 0.5, -0.5])}
    scheduled = fr.sgd(lambda count: 0.1 / (1 + count))
    foreign = fr.sgd(0.1).init(params)
    with pytest.raises(Exception) as pure:
        scheduled.update(grads, foreign, params)
    before = params["w"].clone()
    with pytest.raises(type(pure.value), match="ScaleByScheduleState"):
        fr.donated_update(scheduled, grads, foreign, params)
    assert torch.equal(params["w"], before)
