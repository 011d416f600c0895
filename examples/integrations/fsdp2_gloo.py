"""FSDP2 (``fully_shard``) on CPU with gloo and ``fr.TorchOptimizer``: sharded parameters, global penalties.

Two processes on 127.0.0.1, one thread each. The model (``layers``: two Linear layers, then a
LayerNorm and a Linear ``head``) is sharded as the snippet of docs/guide/distributed.md does it,

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)

on the default device mesh, a ``DeviceMesh`` of type ``"cpu"`` over the gloo group. Every parameter
becomes a ``DTensor`` sharded along dimension 0 (``head.weight`` has one row: rank 1's shard is
empty); ``fully_shard`` keeps the parameter names (``layers.0.weight``, ...), so the masks of the
snippet's optimizer name them as in the unsharded model:

    fr.TorchOptimizer(model.named_parameters(), fr.chain(
        fr.clip_by_global_norm(1.0),
        fr.adamw(lr, weight_decay=0.1, mask=fr.decay_mask(model)),
        fr.proximal(fr.group_lasso(lam, axis=1, mask=fr.by_name("layers.0.weight")), lr)))

(the clip needs the global gradient norm, and the group lasso on the columns of ``layers.0.weight``
the norms of whole columns, which span both shards). Each rank trains on its half of every batch.

What it checks, against one process that trains the unsharded model on the full batches: the
parameters agree to 1e-5 after training, first with the snippet's own coefficients (lr and group
lasso 1e-3), then with coefficients large enough for the group lasso to zero whole input features,
where the zero columns are the reference's; the optimizer state (``exp_avg``) holds ``DTensor``s and
the penalty value is a plain tensor with the global value; and ``fr.sparsity`` / ``fr.norms`` of the
sharded model give the whole model's figures. Finally, the snippet's former mask,
``fr.by_name("0.weight")``, which names no parameter of this model, is refused at construction
(``ValueError``, with the names it might have meant).

Everything runs in float64. In float32 the sharded and the single-process runs agree to about
1e-7 for a few dozen steps, then their rounding differences (reduce-scattered half-batch gradients
against full-batch ones) grow step by step along this chaotic trajectory (Adam's normalised steps
switch noise features on and off): 1e-1 after 400 steps of the strong group lasso. In float64 they
grow from 1e-16 too, but stay far below the tolerance for the lengths run here (3e-13 after 120).

Run it as it is, and it starts itself under torchrun:

    python examples/integrations/fsdp2_gloo.py [--quick]
    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 examples/integrations/fsdp2_gloo.py [--quick]
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import _shared
import torch
import torch.distributed as dist
from torch import nn

import funcreg as fr

torch.set_num_threads(1)

BATCH = 16


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(10, 16), nn.Linear(16, 16)])
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(self.norm(x))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full batch of a step (features 0-2 carry the signal, 3-9 are noise)."""
    g = torch.Generator().manual_seed(2000 + step)
    x = torch.randn(BATCH, 10, generator=g)
    return x, (x[:, :3] @ torch.tensor([[1.0], [-2.0], [1.5]])).tanh()


def sharded() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = Net()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def optimizer(model: nn.Module, lr: float = 1e-3, lam: float = 1e-3) -> fr.TorchOptimizer:
    """The snippet of docs/guide/distributed.md (its coefficients are the defaults)."""
    return fr.TorchOptimizer(
        model.named_parameters(),
        fr.chain(
            fr.clip_by_global_norm(1.0),
            fr.adamw(lr, weight_decay=0.1, mask=fr.decay_mask(model)),
            fr.proximal(fr.group_lasso(lam, axis=1, mask=fr.by_name("layers.0.weight")), lr),
        ),
    )


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, rank: int, world: int) -> None:
    for step in range(steps):
        x, y = batch(step)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()  # FSDP2 averages the gradients over the ranks
        opt.step()


def zero_columns(w: torch.Tensor) -> list[int]:
    return [i for i, c in enumerate(_shared.full(w).abs().sum(dim=0).tolist()) if c == 0.0]


def main() -> None:
    args = _shared.parse_args(__doc__, timeout=120)
    if "RANK" not in os.environ:  # plain `python fsdp2_gloo.py`: start 2 ranks under torchrun
        _shared.relaunch_under_torchrun(os.path.abspath(__file__), 2, sys.argv[1:], timeout=args.timeout)
    _shared.quiet()
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    torch.set_default_dtype(torch.float64)  # see the docstring: float32 drifts apart after a few dozen steps
    rank, world = dist.get_rank(), dist.get_world_size()
    steps, strong_steps = (10, 40) if args.quick else (100, 120)
    start = time.perf_counter()
    say = _shared.rank_print

    model = sharded()
    w = model.layers[0].weight
    say(f"{world} gloo ranks; after fully_shard, on the mesh {w.device_mesh}:")
    for n, p in model.named_parameters():
        say(
            f"  {n:16} {type(p).__name__} {tuple(p.shape)} {p.placements}, rank 0 holds {tuple(p.to_local().shape)}"
        )
    local = torch.tensor([p.to_local().numel() for p in model.parameters()])
    dist.all_reduce(local)  # the sizes of the shards, summed over the ranks
    _shared.check(
        "the shards partition every parameter",
        local.tolist() == [p.numel() for p in model.parameters()],
        f"head.weight: {tuple(model.head.weight.to_local().shape)} on rank {rank}",
    )
    opt = optimizer(model)  # the docs' snippet, its coefficients
    train(model, opt, steps, rank, world)
    reference = Net()
    ref_opt = optimizer(reference)
    train(reference, ref_opt, steps, 0, 1)
    diff = _shared.max_abs_diff(model, reference)  # gathers the shards: every rank calls it
    _shared.check(
        f"the docs' snippet, sharded == one process, {steps} steps (float64)",
        diff <= 1e-5,
        f"max |diff| {diff:.2e}",
    )
    state = opt.state[w]
    _shared.check(
        "exp_avg is a sharded DTensor, the penalty value a plain tensor",
        isinstance(state["exp_avg"], DTensor) and not isinstance(state["value"], DTensor),
    )
    gap = abs(state["value"].item() - ref_opt.state[reference.layers[0].weight]["value"].item())
    _shared.check("the penalty value is the global one", gap <= 1e-6, f"|diff| {gap:.1e}")

    model, reference = sharded(), Net()  # strong enough to switch off input features
    opt, ref_opt = optimizer(model, lr=0.03, lam=0.2), optimizer(reference, lr=0.03, lam=0.2)
    train(model, opt, strong_steps, rank, world)
    train(reference, ref_opt, strong_steps, 0, 1)
    diff = _shared.max_abs_diff(model, reference)
    _shared.check(
        f"a strong group lasso, sharded == one process, {strong_steps} steps (float64)",
        diff <= 1e-5,
        f"max |diff| {diff:.2e}",
    )
    cols, ref_cols = zero_columns(model.layers[0].weight), zero_columns(reference.layers[0].weight)
    _shared.check(
        "the same input features switched off",
        cols == ref_cols and len(cols) > 0 and min(cols) >= 3,
        f"zero columns {cols}; features 0-2 carry the signal",
    )
    nz, ref_nz = fr.sparsity(model).overall, fr.sparsity(reference).overall
    norm, ref_norm = fr.norms(model).total, fr.norms(reference).total
    _shared.check(
        "fr.sparsity and fr.norms are the whole model's",
        abs(nz - ref_nz) <= 1e-12 and abs(norm - ref_norm) <= 1e-5,
        f"sparsity {nz:.4f} vs {ref_nz:.4f}, norm {norm:.5f} vs {ref_norm:.5f}",
    )

    try:  # the docs' former mask: "0.weight" is no parameter of this model, sharded or not
        fr.TorchOptimizer(
            model.named_parameters(),
            fr.proximal(fr.group_lasso(1e-3, axis=1, mask=fr.by_name("0.weight")), 1e-3),
        )
        refused = ""
    except ValueError as err:
        refused = str(err)
    _shared.check(
        "the former mask by_name('0.weight') is refused at construction",
        "matches no parameter" in refused,
        refused[:60] + "...",
    )
    dist.barrier()
    say(f"all checks passed on every rank ({time.perf_counter() - start:.1f} s)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
