"""Behaviour that only a property shows (issue 24: the five mutants no other test killed).

* the scratch pool never hands one buffer to two holders at once, and keeps at most its stated
  number of sets;
* ``tune_coefficient`` moves ``log(coefficient)`` by exactly ``-lr * c * dV/dc`` (clipped);
* FISTA's gradient restart resets the momentum as O'Donoghue & Candes (2015) do (a reference loop
  in NumPy here);
* ``TorchOptimizer`` starts a replaced parameter object afresh, as ``torch.optim`` does;
* a donated step writes in place: the same storages before and after, on the fused and the
  generic paths.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import funcreg as fr
from funcreg._src.kernels import scratch as scratch_module
from funcreg._src.kernels.scratch import Scratch

PROPERTY = settings(deadline=None, max_examples=30, database=None)


# --- the scratch pool --------------------------------------------------------------------------------


@PROPERTY
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 2)), min_size=1, max_size=25))
@example(ops=[(True, 0), (False, 0), (True, 0), (True, 0)])  # give back, then two takers of one set
def test_the_scratch_pool_never_hands_one_buffer_to_two_holders(ops):
    """Random takes and gives over three structures: every buffer held is held once."""
    scratch = Scratch(large=4)
    likes = [[torch.zeros(4 + k)] for k in range(3)]
    held: list[tuple[int, list]] = []
    for take, k in ops:
        if take or not held:
            held.append((k, scratch.take(likes[k])))
        else:
            kk, bufs = held.pop(0)
            scratch.give(likes[kk], bufs)
        ids = [id(b) for _, bufs in held for b in bufs if b is not None]
        assert len(ids) == len(set(ids)), "one buffer is held twice"


def test_the_scratch_pool_keeps_its_stated_number_of_sets():
    scratch = Scratch(large=1)
    likes = [[torch.zeros(k + 1)] for k in range(scratch_module._SETS + 1)]
    given_back = []
    for like in likes:
        bufs = scratch.take(like)
        scratch.give(like, bufs)
        given_back.append(bufs[0])
    # the oldest set was dropped, the newest _SETS are kept
    assert scratch.take(likes[0])[0] is not given_back[0]
    assert scratch.take(likes[1])[0] is given_back[1]
    assert scratch.take(likes[-1])[0] is given_back[-1]
    assert scratch_module._SETS == 8  # the number docs/guide/speed.md states


# --- tune_coefficient ---------------------------------------------------------------------------------


@PROPERTY
@given(
    lr=st.floats(0.01, 2.0, width=64),
    c0=st.floats(0.1, 10.0, width=64),
    g=st.floats(-0.05, 0.05, width=64),
)
def test_tune_coefficient_moves_the_log_by_lr_times_c_times_the_gradient(lr, c0, g):
    # a constant hypergradient: each move of log(c) is -lr * c * g, clipped to [-1, 1]
    result = fr.tune_coefficient(
        lambda c: (torch.zeros(()), torch.tensor(g, dtype=torch.float64)), c0, iterations=3, lr=lr
    )
    cs = [h["coefficient"] for h in result.history]
    for before, after in zip(cs, cs[1:]):
        expected = max(-1.0, min(1.0, -lr * before * g))
        assert math.isclose(math.log(after) - math.log(before), expected, rel_tol=1e-9, abs_tol=1e-12)


# --- FISTA's restart ----------------------------------------------------------------------------------


def _reference_fista(x, y, alpha, step, steps):
    """Lasso by FISTA with the gradient restart, written from the papers: x_{k+1} = prox(y_k - s g(y_k)),
    t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2, y_{k+1} = x_{k+1} + (t_k - 1)/t_{k+1} (x_{k+1} - x_k); when
    (y_k - x_{k+1}) . (x_{k+1} - x_k) > 0, t_{k+1} = 1 and y_{k+1} = x_{k+1}."""
    n = x.shape[0]
    w = np.zeros(x.shape[1])
    yk, t, restarts = w.copy(), 1.0, 0
    for _ in range(steps):
        v = yk - step * x.T @ (x @ yk - y) / n
        new = np.sign(v) * np.maximum(np.abs(v) - step * alpha, 0.0)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        if (yk - new) @ (new - w) > 0:
            t_next, beta = 1.0, 0.0
            restarts += 1
        else:
            beta = (t - 1) / t_next
        yk = new + beta * (new - w)
        w, t = new, t_next
    return w, restarts


def test_fista_restart_resets_the_momentum_as_the_reference_does():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 8))
    x[:, 1] = x[:, 0] + 0.01 * rng.normal(size=30)  # ill-conditioned: the momentum overshoots, restarts fire
    y = x @ rng.normal(size=8) + 0.1 * rng.normal(size=30)
    step = 1.0 / float(np.linalg.eigvalsh(x.T @ x / 30).max())
    alpha, steps = 0.05, 60
    expected, restarts = _reference_fista(x, y, alpha, step, steps)
    assert restarts > 0  # the case under test happens
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    tx = fr.fista(step, fr.l1(alpha))
    params = {"w": torch.zeros(8, dtype=torch.float64)}
    state = tx.init(params)
    for _ in range(steps):
        g = xt.T @ (xt @ params["w"] - yt) / 30
        u, state = tx.update({"w": g}, state, params)
        params = fr.apply_updates(params, u)
    assert int(state.restarts) == restarts
    torch.testing.assert_close(
        fr.fista_iterate(state)["w"], torch.from_numpy(expected), atol=1e-12, rtol=1e-10
    )


# --- TorchOptimizer: a replaced parameter object ---------------------------------------------------


def test_torch_optimizer_starts_a_replaced_parameter_afresh_as_torch_does():
    ours_w, theirs_w = (torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64)) for _ in range(2))
    ours = fr.TorchOptimizer([("w", ours_w)], "sgd", lr=0.1, momentum=0.9)
    theirs = torch.optim.SGD([theirs_w], lr=0.1, momentum=0.9)
    grads = [torch.tensor([0.5, 0.25], dtype=torch.float64) * (k + 1) for k in range(4)]
    for k, g in enumerate(grads):
        if k == 2:  # a new parameter object in the group (a re-initialized layer): no momentum yet
            ours_w = torch.nn.Parameter(ours_w.detach().clone())
            theirs_w = torch.nn.Parameter(theirs_w.detach().clone())
            ours.param_groups[0]["params"][0] = ours_w
            theirs.param_groups[0]["params"][0] = theirs_w
        ours_w.grad, theirs_w.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        torch.testing.assert_close(ours_w.detach(), theirs_w.detach(), atol=1e-15, rtol=0)


# --- a donated step writes in place -------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: fr.adamw(0.1, weight_decay=0.1),  # torch's fused/foreach kernel
        lambda: fr.sgd(0.1, momentum=0.9),
        lambda: fr.sgd(0.1, momentum=0.9, fused=True),  # torch._fused_sgd_
        lambda: fr.chain(fr.clip_by_global_norm(10.0), fr.adam(0.1)),  # the generic donated path
    ],
    ids=["adamw", "sgd_momentum", "sgd_momentum_fused", "clip_adam"],
)
def test_a_donated_step_writes_into_the_donated_storages(make):
    tx = make()
    params = {"w": torch.ones(5), "b": torch.zeros(3)}
    grads = {"w": torch.full((5,), 0.5), "b": torch.full((3,), -0.5)}
    params, state = fr.donated_update(tx, grads, tx.init(params), params)  # the state's buffers now exist

    def storages(tree):
        return {
            x.untyped_storage().data_ptr()
            for x in torch.utils._pytree.tree_leaves(tree)
            if isinstance(x, torch.Tensor) and x.numel() > 1
        }

    before_params, before_state = storages(params), storages(state)
    expected, _ = tx.update(grads, state, params)  # the pure path, for the values
    expected = fr.apply_updates(params, expected)
    new_params, new_state = fr.donated_update(tx, grads, state, params)
    assert storages(new_params) == before_params
    assert storages(new_state) == before_state and before_state  # moments written in place
    for k in params:
        torch.testing.assert_close(new_params[k], expected[k], atol=1e-7, rtol=1e-6)
