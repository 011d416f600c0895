"""accelerate's ``save_state`` / ``load_state`` with ``fr.create_optimizer``: a resumed run is the same run.

``accelerate.Accelerator(cpu=True)`` prepares a small MLP, the optimizer
``fr.create_optimizer(model, "adamw", ..., penalty=fr.l1(..., mask=fr.by_name("encoder.0.weight")),
form="proximal")`` (AdamW's decay on the weights, ``fr.decay_mask``; an L1 proximal step on the first
layer) and a ``OneCycleLR`` schedule, which also cycles the betas. It trains ``k`` steps, saves the
accelerator's state (model, optimizer ``state_dict()``, scheduler, random states) into a temporary
directory, and trains on. A fresh model and optimizer, with other weights, are prepared by a fresh
``Accelerator``, ``load_state`` the directory and train the remaining steps.

What it checks: the resumed weights and the optimizer's state (``exp_avg``, ``exp_avg_sq``, step
counts) equal the uninterrupted run's bit for bit (``torch.equal``), the learning rate and betas are
where the uninterrupted schedule left them, and the first layer has exact zeros from the L1 prox.
The control: the saved weights alone, loaded into a fresh model with a fresh optimizer and schedule,
do not end there (the optimizer's state and the schedule's position matter, and came back).

    python examples/integrations/accelerate_save_load.py [--quick]
"""

from __future__ import annotations

import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import _shared
import accelerate
import safetensors.torch
import torch
from torch import nn

import funcreg as fr

torch.set_num_threads(1)

LR, WD, LAM = 0.02, 0.05, 0.2


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of a step: a pure function of the step, so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 10, generator=g)
    return x, x[:, :3].sum(dim=1, keepdim=True).tanh()


def setup(total: int, perturb: bool = False) -> tuple[accelerate.Accelerator, nn.Module, Any, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            encoder=nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32), nn.GELU()),
            head=nn.Linear(32, 1),
        )
    )
    if perturb:  # other weights: everything must come from the checkpoint
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    penalty = fr.l1(LAM, mask=fr.by_name("encoder.0.weight"))
    opt = fr.create_optimizer(model, "adamw", lr=LR, weight_decay=WD, penalty=penalty, form="proximal")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=total)
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    return accelerator, model, opt, sched


def train(accelerator: accelerate.Accelerator, model: nn.Module, opt: Any, sched: Any, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        opt.zero_grad()
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        opt.step()
        sched.step()


def optimizer_state(opt: Any) -> list[torch.Tensor]:
    inner = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps ours
    return [torch.as_tensor(v) for s in inner.state.values() for _, v in sorted(s.items())]


def main() -> None:
    args = _shared.parse_args(__doc__, timeout=120)
    _shared.quiet()
    k, total = (5, 12) if args.quick else (100, 300)
    start = time.perf_counter()

    accelerator, straight, straight_opt, straight_sched = setup(total)
    train(accelerator, straight, straight_opt, straight_sched, range(total))

    with tempfile.TemporaryDirectory() as ckpt:
        accelerator, first, opt, sched = setup(total)
        train(accelerator, first, opt, sched, range(k))
        accelerator.save_state(ckpt)
        saved = sorted(p.name for p in Path(ckpt).iterdir())
        train(accelerator, first, opt, sched, range(k, total))  # the first run goes on

        accelerator, resumed, resumed_opt, resumed_sched = setup(total, perturb=True)
        accelerator.load_state(ckpt)
        train(accelerator, resumed, resumed_opt, resumed_sched, range(k, total))

        # the control: the saved weights alone, with a fresh optimizer and schedule
        accelerator, cold, cold_opt, cold_sched = setup(total, perturb=True)
        cold.load_state_dict(safetensors.torch.load_file(Path(ckpt) / "model.safetensors"))
        train(accelerator, cold, cold_opt, cold_sched, range(k, total))

    print(f"accelerate {accelerate.__version__}: {total} steps; saved after {k}: {', '.join(saved)}")
    inner = getattr(resumed_opt, "optimizer", resumed_opt)
    _shared.check(
        "the prepared optimizer is funcreg's", isinstance(inner, fr.TorchOptimizer), type(inner).__name__
    )
    _shared.check(
        "the run that saved and went on is the uninterrupted run", _shared.all_equal(first, straight)
    )
    _shared.check(
        "resumed weights == uninterrupted weights, bit for bit",
        _shared.all_equal(resumed, straight),
        f"max |diff| {_shared.max_abs_diff(resumed, straight):.1e}",
    )
    ours, theirs = optimizer_state(resumed_opt), optimizer_state(straight_opt)
    _shared.check(
        "resumed optimizer state == uninterrupted, bit for bit",
        len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs)),
        f"{len(ours)} tensors: moments, steps, counts and penalty values",
    )
    same_options = [(g["lr"], g["betas"]) for g in inner.param_groups] == [
        (g["lr"], g["betas"]) for g in getattr(straight_opt, "optimizer", straight_opt).param_groups
    ]
    _shared.check(
        "the schedule resumed: the same lr and betas", same_options, f"lr {inner.param_groups[0]['lr']:.3g}"
    )
    zeros = int((resumed.encoder[0].weight == 0).sum())
    _shared.check("the L1 prox left exact zeros in encoder.0.weight", zeros > 0, f"{zeros} of 320")
    cold_diff = _shared.max_abs_diff(cold, straight)
    _shared.check(
        "the saved weights alone (a fresh optimizer and schedule) end elsewhere",
        cold_diff > 1e-3,
        f"max |diff| {cold_diff:.3g}",
    )
    print(f"all checks passed ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
