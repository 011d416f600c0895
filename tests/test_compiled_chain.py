"""A whole regularized chain compiled once: ``chain(clip_by_global_norm, adamw(mask=decay_mask),
proximal(l1))`` with its learning rate and L1 coefficient as 0-d tensors changed in place between
steps. The compiled donated step is one graph that never recompiles (a dynamo compile counter), writes
into the caller's parameters and moments (storage identity), and equals the pure eager step of the
same transform to rounding (float64, ``atol=1e-12, rtol=1e-10``)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounter

import funcreg as fr

TOL = {"atol": 1e-12, "rtol": 1e-10}


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)).double()


def _chain(model: torch.nn.Module, lr: torch.Tensor, c: torch.Tensor) -> fr.GradientTransformation:
    return fr.chain(
        fr.clip_by_global_norm(1.0),
        fr.adamw(lr, weight_decay=0.1, mask=fr.decay_mask(model)),
        fr.proximal(fr.l1(c), lr),
    )


@settings(deadline=None, max_examples=5)
@given(
    seed=st.integers(0, 2**31 - 1),
    lrs=st.lists(st.floats(1e-3, 0.5), min_size=4, max_size=4),
    cs=st.lists(st.floats(0.0, 0.05), min_size=4, max_size=4),
)
def test_the_compiled_donated_chain_is_one_graph_in_place_and_equals_the_pure_step(seed, lrs, cs):
    torch._dynamo.reset()
    model = _model()
    rng = np.random.default_rng(seed)
    start = {n: torch.from_numpy(rng.normal(size=tuple(p.shape))) for n, p in fr.params_of(model).items()}
    grads = [{n: torch.from_numpy(rng.normal(size=tuple(p.shape))) for n, p in start.items()} for _ in lrs]
    lr, c = torch.tensor(lrs[0], dtype=torch.float64), torch.tensor(cs[0], dtype=torch.float64)
    tx = _chain(model, lr, c)
    counter = CompileCounter()
    step = torch.compile(lambda g, s, p: fr.donated_update(tx, g, s, p), backend=counter)
    params = {n: w.clone() for n, w in start.items()}
    state = tx.init(params)
    pure_params = {n: w.clone() for n, w in start.items()}
    pure_state = tx.init(pure_params)
    moments = [state[1].mu["0.weight"], state[1].nu["0.weight"]]
    storages = {n: w.data_ptr() for n, w in params.items()}
    for g, lr_k, c_k in zip(grads, lrs, cs):
        lr.fill_(lr_k)
        c.fill_(c_k)
        params, state = step(g, state, params)
        u, pure_state = tx.update(g, pure_state, pure_params)
        pure_params = fr.apply_updates(pure_params, u)
    assert counter.frame_count == 1, f"{counter.frame_count} compiled frames: the changing values recompiled"
    assert {n: w.data_ptr() for n, w in params.items()} == storages
    assert state[1].mu["0.weight"] is moments[0] and state[1].nu["0.weight"] is moments[1]
    for n in start:
        torch.testing.assert_close(params[n], pure_params[n], **TOL)
    torch.testing.assert_close(state[2].value, pure_state[2].value, **TOL)
