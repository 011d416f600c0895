"""``fr.inject_hyperparams``: hyperparameters as tensors in the state, against torch.optim's param groups.

The reference: torch.optim.AdamW whose ``param_groups[0]["lr"]`` and ``["weight_decay"]`` are set
before each step, as a scheduler does. Under torch.compile, a compile counter checks that changing
the values recompiles nothing. float64, ``atol=1e-12, rtol=1e-10``.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import funcreg as fr

TOL = {"atol": 1e-12, "rtol": 1e-10}
LRS = [0.1, 0.05, 0.2, 0.01, 0.07]
WDS = [0.0, 0.1, 0.3, 0.1, 0.0]


def _grads(k):
    return torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64) * (k + 1)


def test_changing_values_follow_torch_optims_param_groups():
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    theirs = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([theirs], lr=LRS[0], weight_decay=WDS[0])
    tx = fr.inject_hyperparams(fr.adamw, learning_rate=LRS[0], weight_decay=WDS[0])
    params = {"w": w0.clone()}
    state = tx.init(params)
    for k, (lr, wd) in enumerate(zip(LRS, WDS)):
        opt.param_groups[0].update(lr=lr, weight_decay=wd)
        theirs.grad = _grads(k)
        opt.step()
        state = fr.set_hyperparams(state, learning_rate=lr, weight_decay=wd)
        u, state = tx.update({"w": _grads(k)}, state, params)
        params = fr.apply_updates(params, u)
    torch.testing.assert_close(params["w"], theirs.detach(), **TOL)


def test_a_compiled_update_compiles_once_while_the_values_change():
    tx = fr.chain(
        fr.clip_by_global_norm(10.0), fr.inject_hyperparams(fr.adamw, learning_rate=0.1, weight_decay=0.1)
    )
    counter = CompileCounter()
    update = torch.compile(tx.update, backend=counter)
    params = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
    state = eager_state = tx.init(params)
    eager = params
    for k, (lr, wd) in enumerate(zip(LRS, WDS)):
        state = fr.set_hyperparams(state, learning_rate=lr, weight_decay=wd)
        eager_state = fr.set_hyperparams(eager_state, learning_rate=lr, weight_decay=wd)
        u, state = update({"w": _grads(k)}, state, params)
        params = fr.apply_updates(params, u)
        ue, eager_state = tx.update({"w": _grads(k)}, eager_state, eager)
        eager = fr.apply_updates(eager, ue)
    assert counter.frame_count == 1
    torch.testing.assert_close(params["w"], eager["w"], **TOL)


def test_inject_hyperparams_validation():
    with pytest.raises(TypeError, match="factory"):
        fr.inject_hyperparams(0.1, learning_rate=0.1)
    with pytest.raises(ValueError, match="at least one"):
        fr.inject_hyperparams(fr.sgd)
    with pytest.raises(ValueError, match="learning_rate"):
        fr.inject_hyperparams(fr.sgd, learning_rate=-1.0)  # the factory's own check, at construction
    with pytest.raises(ValueError, match="0-d"):
        fr.inject_hyperparams(fr.sgd, learning_rate=torch.ones(2))
    for bad in (True, "0.1"):
        with pytest.raises(TypeError, match=r"learning_rate value: .* \(expected a number or a 0-d tensor\)"):
            fr.inject_hyperparams(fr.sgd, learning_rate=bad)
    state = fr.inject_hyperparams(fr.sgd, learning_rate=0.1).init({"w": torch.zeros(1)})
    for bad in (True, "0.1"):
        with pytest.raises(TypeError, match=r"learning_rate value: .* \(expected a number or a 0-d tensor\)"):
            fr.set_hyperparams(state, learning_rate=bad)
    with pytest.raises(KeyError, match="'momentum'"):
        fr.set_hyperparams(state, momentum=0.9)
    with pytest.raises(ValueError, match="found 0"):
        fr.set_hyperparams(fr.sgd(0.1).init({"w": torch.zeros(1)}), learning_rate=0.1)
