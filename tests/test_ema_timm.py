"""``fr.average_weights`` + ``fr.average_buffers`` against timm's own ``ModelEmaV3``.

timm's EMA keeps a copy of the whole ``state_dict`` (parameters and buffers): ``ema.update(model,
step=num_updates)`` after each optimizer step lerps every floating entry with the decay of
``get_decay(step)`` (its warm-up, ``min_decay`` and ``update_after_step``) and copies the others. The
funcreg side trains the same model with ``fr.make_step(..., buffers=True)`` and averages its weights
and BatchNorm statistics; both must agree entry by entry. Like ``tests/test_layer_decay_timm.py`` this
runs in CI's second environment, where timm imports (see ``.ci/run``); elsewhere it is skipped.
"""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")
from timm.utils import ModelEmaV3  # noqa: E402

import funcreg as fr  # noqa: E402

CASES = [
    dict(
        decay=0.9, use_warmup=False, warmup_gamma=1.0, warmup_power=2 / 3, min_decay=0.0, update_after_step=0
    ),
    dict(
        decay=0.999, use_warmup=True, warmup_gamma=1.0, warmup_power=2 / 3, min_decay=0.0, update_after_step=0
    ),
    dict(
        decay=0.99, use_warmup=True, warmup_gamma=2.0, warmup_power=0.75, min_decay=0.3, update_after_step=2
    ),
]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 3),
    ).double()


@pytest.mark.parametrize("case", CASES, ids=["plain", "warmup", "warmup_min_after"])
def test_average_weights_and_buffers_equal_timm_model_ema_v3(case):
    reference = _model()
    ema = ModelEmaV3(reference, **case)
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    model = _model()
    apply = fr.functional_model(model)

    def loss(p, b, x, y):
        out, new = apply(p, b, x)
        return torch.nn.functional.cross_entropy(out, y), new

    tx = fr.average_weights(
        fr.sgd(0.05, momentum=0.9),
        decay=case["decay"],
        warmup=case["use_warmup"],
        warmup_gamma=case["warmup_gamma"],
        warmup_power=case["warmup_power"],
        min_decay=case["min_decay"],
        update_after_step=case["update_after_step"],
    )
    step = fr.make_step(loss, tx, buffers=True)
    state = step.init(fr.params_of(model), fr.buffers_of(model))
    averaged_buffers = {k: v.clone() for k, v in state.buffers.items()}
    gen = torch.Generator().manual_seed(1)
    for num_updates in range(1, 9):
        x = torch.randn(6, 1, 5, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (6,), generator=gen)
        state, _ = step(state, x, y)
        averaged_buffers = fr.average_buffers(averaged_buffers, state.buffers, state.opt_state)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        opt.step()
        ema.update(reference, step=num_updates)
    ours = {**fr.averaged_params(state.opt_state), **averaged_buffers}
    theirs = ema.module.state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        torch.testing.assert_close(
            ours[name], value, atol=1e-12, rtol=1e-10, msg=lambda s, n=name: f"{n}: {s}"
        )
