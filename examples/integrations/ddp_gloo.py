"""``DistributedDataParallel`` on CPU (gloo) with ``fr.create_optimizer`` and a masked penalty.

Two processes on 127.0.0.1, one thread each. Each builds the model from its own seed (rank 0's
weights are the ones DDP broadcasts when it wraps the module), wraps it in
``torch.nn.parallel.DistributedDataParallel``, and trains with

    fr.create_optimizer(ddp.module, "adamw", lr=LR, weight_decay=WD,
                        penalty=fr.group_lasso(LAM, axis=1, mask=fr.by_name("encoder.0.weight")),
                        form="proximal")

(AdamW's decay on the weights, and a group-lasso proximal step on the columns of the first layer,
one group per input feature), each rank on its half of every batch. DDP averages the gradients in
``backward()``; the optimizer, a ``torch.optim.Optimizer``, needs nothing else.

What it checks: after training, both ranks hold the same parameters bit for bit, and they equal a
single process (no process group) that trains the same optimizer on the full batches, to 1e-6: the
mean of the per-rank mean-loss gradients is the full batch's mean-loss gradient. It also checks that
the group lasso switched off whole input features (columns of exact zeros).

Everything runs in float64. In float32 the two runs agree to 2.4e-7 for the first 60 steps, then
their rounding differences (two half-batch means averaged against one full-batch mean) grow by about
10x every 20 steps, as Adam's normalised steps switch noise features on and off: 8e-2 after 200
steps. In float64 the same growth ends near 2e-11, and the comparison checks the arithmetic, not
the luck of the rounding.

Run it as it is, and it starts itself under torchrun
(``python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 ...``):

    python examples/integrations/ddp_gloo.py [--quick]
    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 examples/integrations/ddp_gloo.py [--quick]
"""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict
from datetime import timedelta

import _shared
import torch
import torch.distributed as dist
from torch import nn

import funcreg as fr

torch.set_num_threads(1)

LR, WD, LAM, BATCH = 0.02, 0.1, 0.3, 32


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            encoder=nn.Sequential(nn.Linear(12, 32), nn.LayerNorm(32), nn.Tanh()), head=nn.Linear(32, 1)
        )
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full batch of a step (only the first 4 of the 12 features matter)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 12, generator=g)
    return x, (x[:, :4] @ torch.tensor([[1.0], [-1.0], [0.5], [2.0]])).tanh()


def make_optimizer(model: nn.Module) -> fr.TorchOptimizer:
    penalty = fr.group_lasso(LAM, axis=1, mask=fr.by_name("encoder.0.weight"))
    return fr.create_optimizer(model, "adamw", lr=LR, weight_decay=WD, penalty=penalty, form="proximal")


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, rank: int, world: int) -> None:
    for step in range(steps):
        x, y = batch(step)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]  # this rank's equal share
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def main() -> None:
    args = _shared.parse_args(__doc__, timeout=90)
    if "RANK" not in os.environ:  # plain `python ddp_gloo.py`: start 2 ranks under torchrun
        _shared.relaunch_under_torchrun(os.path.abspath(__file__), 2, sys.argv[1:], timeout=args.timeout)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    torch.set_default_dtype(torch.float64)  # see the docstring: float32 drifts apart after a few dozen steps
    rank, world = dist.get_rank(), dist.get_world_size()
    steps = 40 if args.quick else 200
    start = time.perf_counter()

    ddp = nn.parallel.DistributedDataParallel(make_model(seed=rank))  # rank 0's weights, everywhere
    opt = make_optimizer(ddp.module)
    train(ddp, opt, steps, rank, world)
    mine = torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()])
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)  # the last collective: the checks below are local
    elapsed = time.perf_counter() - start

    reference = make_model(seed=0)  # one process, the full batches
    train(reference, make_optimizer(reference), steps, rank=0, world=1)

    _shared.rank_print(
        f"{world} gloo ranks, DDP, {steps} AdamW steps of {BATCH // world} examples per rank "
        f"({elapsed:.1f} s); groups: {[g['name'] for g in opt.param_groups]}"
    )
    _shared.check(
        "every rank holds the same parameters, bit for bit",
        all(torch.equal(every[0], other) for other in every),
    )
    diff = _shared.max_abs_diff(ddp.module, reference)
    _shared.check("DDP == one process on the full batch (float64)", diff <= 1e-6, f"max |diff| {diff:.2e}")
    columns = ddp.module.encoder[0].weight.detach().abs().sum(dim=0)
    off = [i for i, c in enumerate(columns.tolist()) if c == 0.0]
    _shared.check(
        "the group lasso switched off whole input features",
        0 < len(off) and all(i >= 4 for i in off),
        f"zero columns {off}; features 0-3 carry the signal",
    )
    dist.barrier()
    _shared.rank_print(f"all checks passed on every rank ({time.perf_counter() - start:.1f} s)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
