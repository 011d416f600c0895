"""A whole regularized chain compiled, against torch's fused AdamW alone.

The chain is ``fr.chain(fr.clip_by_global_norm(1.0), fr.adamw(lr, weight_decay=wd,
mask=fr.decay_mask(model)), fr.proximal(fr.l1(c), lr))``: gradient clipping, decoupled decay of the
weights only (not the biases), and a proximal L1 step. ``lr`` and ``c`` are 0-d tensors, changed in
place before every step (a schedule, a coefficient search), and the donated step is compiled once
(inductor): a compile counter checks that the changing values recompile nothing. The reference is
``torch.optim.AdamW(fused=True)`` stepping the same parameters with decay only, no clipping and no
L1: what the chain costs beyond the optimizer step itself.

The model is the MLP 1024-1024-1024-10 of ``adamw_step.py`` (2.11M float32 parameters in 6
tensors); the gradients are fixed random tensors, so only the optimizer step is timed, on 1 thread.

    python benchmarks/compiled_chain.py              # ~1 min, plus ~1 min of compilation
    python benchmarks/compiled_chain.py --quick      # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics

import torch
from _machine import cpu_model, report, run
from adamw_step import make_model
from torch._dynamo.testing import CompileCounterWithBackend

import funcreg as fr

LR, WD, L1 = 1e-3, 1e-2, 1e-5


class TorchFused:
    """``torch.optim.AdamW(fused=True)`` over the model's parameters, decay on all of them."""

    def __init__(self, model: torch.nn.Module, grads: dict[str, torch.Tensor]) -> None:
        self.params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        for p, g in zip(self.params, grads.values()):
            p.grad = g.clone()
        self.opt = torch.optim.AdamW(self.params, lr=LR, weight_decay=WD, fused=True)

    def step(self) -> None:
        self.opt.step()


class CompiledChain:
    """The regularized chain's donated step, compiled once; ``lr`` and ``c`` change at every step."""

    def __init__(self, model: torch.nn.Module, grads: dict[str, torch.Tensor], report: bool = True) -> None:
        self.lr, self.c = torch.tensor(LR), torch.tensor(L1)
        self.tx = fr.chain(
            fr.clip_by_global_norm(1.0),
            fr.adamw(self.lr, weight_decay=WD, mask=fr.decay_mask(model)),
            fr.proximal(fr.l1(self.c), self.lr, report=report),
        )
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.grads = grads
        self.state = self.tx.init(self.params)
        self.counter = CompileCounterWithBackend("inductor")
        tx = self.tx

        def step(g, s, p):
            return fr.donated_update(tx, g, s, p)

        self.compiled = torch.compile(step, backend=self.counter)
        self.k = 0

    def step(self) -> None:
        self.k += 1
        self.lr.fill_(LR * (1 + 0.01 * (self.k % 7)))  # a schedule's values, written in place
        self.c.fill_(L1 * (1 + 0.1 * (self.k % 3)))
        self.params, self.state = self.compiled(self.grads, self.state, self.params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="timed steps per variant (default 200)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5 rounds, 2 warm-up steps")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup = 5, 2
    torch.set_num_threads(1)
    model = make_model(0)
    gen = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(p.shape, generator=gen) * 1e-2 for n, p in model.named_parameters()}
    print(f"date:    {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {cpu_model()} ({platform.machine()}), torch {torch.__version__}, 1 thread")
    chain = CompiledChain(model, grads)
    variants = {
        "torch AdamW fused (decay only)": TorchFused(model, grads),
        "funcreg chain compiled donated": chain,
        "funcreg chain compiled donated, report=False": CompiledChain(model, grads, report=False),
    }
    times = run(variants, args.rounds, args.warmup)
    report("one step, 2.11M parameters", times, "torch AdamW fused (decay only)")
    ratio = statistics.median(times["funcreg chain compiled donated"]) / statistics.median(
        times["torch AdamW fused (decay only)"]
    )
    print(
        f"\nchain: {chain.counter.frame_count} compiled frame(s) over {chain.k} steps with lr and the L1 "
        f"coefficient changed at every step; median ratio {ratio:.2f}x (target <= 1.15x)"
    )


if __name__ == "__main__":
    main()
