"""The cost of a penalty form over the bare donated step, beside what torch.optim pays for its decay.

The model is the MLP of ``adamw_step.py`` (1024-1024-1024-10, 2.11M float32 parameters); gradients
are fixed random tensors, so only the optimizer step is timed. Every funcreg variant runs
``params, state = fr.donated_update(tx, grads, state, params)``; the variants run round-robin in a
new random order each round, in one process with ``torch.set_num_threads(1)``. Each group's ratios
are to its bare step:

* ``adam``: ``fr.adam(lr)`` bare; with ``add_penalty_grad(l2)`` first (coupled), with
  ``decoupled(l2, lr)`` after (decoupled), with ``proximal(l1, lr)`` after; torch's Adam without and
  with ``weight_decay`` (what torch pays for a coupled decay), and AdamW (a decoupled one);
* ``report=False``: a form that does not compute the penalty's value for its state (one read of
  the parameters less per step);
* ``fused``: the same with ``fr.adam(lr, fused=True)`` (torch's fused kernel, which takes the
  coupled and the decoupled decay inside its one pass), beside torch's fused Adam and AdamW;
* ``sgd``: ``fr.sgd(lr)`` and the same three forms, beside torch's SGD without and with
  ``weight_decay``; in the same table (ratios to the same bare step, side by side) ``fr.sgd(lr,
  fused=True)`` (torch's fused SGD kernel, which takes the coupled decay inside its one pass, and a
  decoupled one without momentum) with its forms, beside torch's fused SGD without and with
  ``weight_decay``.

    python benchmarks/penalty_forms.py            # 100 rounds
    python benchmarks/penalty_forms.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import os

import torch
from _machine import cpu_model, report, run
from adamw_step import make_model

import funcreg as fr

LR, WD, L1 = 1e-3, 1e-2, 1e-5


class Funcreg:
    def __init__(self, params: dict, grads: dict, tx: fr.GradientTransformation) -> None:
        self.params = {k: v.detach().clone() for k, v in params.items()}
        self.grads, self.tx = grads, tx
        self.state = tx.init(self.params)

    def step(self) -> None:
        self.params, self.state = fr.donated_update(self.tx, self.grads, self.state, self.params)


class Torch:
    def __init__(self, params: dict, grads: dict, make) -> None:
        self.params = [v.detach().clone().requires_grad_(True) for v in params.values()]
        for p, g in zip(self.params, grads.values()):
            p.grad = g.clone()
        self.opt = make(self.params)

    def step(self) -> None:
        self.opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 rounds, 1 warm-up step")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup = 3, 1
    torch.set_num_threads(1)
    model = make_model(0)
    params = {k: v.detach() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    grads = {k: torch.randn(v.shape, generator=gen) * 1e-2 for k, v in params.items()}
    print(f"machine: {cpu_model()}, torch {torch.__version__}, 1 thread, load {os.getloadavg()[0]:.2f}")
    print(f"model:   MLP 1024-1024-1024-10, {sum(p.numel() for p in params.values()):,} parameters")

    adam = {
        "fr.adam bare": Funcreg(params, grads, fr.adam(LR)),
        "fr.adam + coupled l2": Funcreg(params, grads, fr.chain(fr.add_penalty_grad(fr.l2(WD)), fr.adam(LR))),
        "fr.adam + decoupled l2": Funcreg(
            params, grads, fr.chain(fr.adam(LR), fr.decoupled(fr.l2(WD), learning_rate=LR))
        ),
        "fr.adam + decoupled l2, report=False": Funcreg(
            params, grads, fr.chain(fr.adam(LR), fr.decoupled(fr.l2(WD), learning_rate=LR, report=False))
        ),
        "fr.adam + proximal l1": Funcreg(
            params, grads, fr.chain(fr.adam(LR), fr.proximal(fr.l1(L1), learning_rate=LR))
        ),
        "torch Adam foreach": Torch(params, grads, lambda p: torch.optim.Adam(p, lr=LR, foreach=True)),
        "torch Adam foreach, weight_decay": Torch(
            params, grads, lambda p: torch.optim.Adam(p, lr=LR, weight_decay=WD, foreach=True)
        ),
        "torch AdamW foreach": Torch(
            params, grads, lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=WD, foreach=True)
        ),
    }
    report("Adam and its penalty forms", run(adam, args.rounds, args.warmup), "fr.adam bare", width=44)

    fused = {
        "fr.adam fused bare": Funcreg(params, grads, fr.adam(LR, fused=True)),
        "fr.adam fused + coupled l2": Funcreg(
            params, grads, fr.chain(fr.add_penalty_grad(fr.l2(WD)), fr.adam(LR, fused=True))
        ),
        "fr.adam fused + decoupled l2": Funcreg(
            params, grads, fr.chain(fr.adam(LR, fused=True), fr.decoupled(fr.l2(WD), learning_rate=LR))
        ),
        "fr.adam fused + coupled l2, report=False": Funcreg(
            params, grads, fr.chain(fr.add_penalty_grad(fr.l2(WD), report=False), fr.adam(LR, fused=True))
        ),
        "fr.adam fused + decoupled l2, report=False": Funcreg(
            params,
            grads,
            fr.chain(fr.adam(LR, fused=True), fr.decoupled(fr.l2(WD), learning_rate=LR, report=False)),
        ),
        "fr.adam fused + proximal l1, report=False": Funcreg(
            params,
            grads,
            fr.chain(fr.adam(LR, fused=True), fr.proximal(fr.l1(L1), learning_rate=LR, report=False)),
        ),
        "fr.adam fused + proximal l1": Funcreg(
            params, grads, fr.chain(fr.adam(LR, fused=True), fr.proximal(fr.l1(L1), learning_rate=LR))
        ),
        "torch Adam fused": Torch(params, grads, lambda p: torch.optim.Adam(p, lr=LR, fused=True)),
        "torch Adam fused, weight_decay": Torch(
            params, grads, lambda p: torch.optim.Adam(p, lr=LR, weight_decay=WD, fused=True)
        ),
        "torch AdamW fused": Torch(
            params, grads, lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=WD, fused=True)
        ),
    }
    report(
        "Fused Adam and its penalty forms",
        run(fused, args.rounds, args.warmup),
        "fr.adam fused bare",
        width=44,
    )

    sgd = {
        "fr.sgd bare": Funcreg(params, grads, fr.sgd(LR)),
        "fr.sgd + coupled l2": Funcreg(params, grads, fr.chain(fr.add_penalty_grad(fr.l2(WD)), fr.sgd(LR))),
        "fr.sgd + decoupled l2": Funcreg(
            params, grads, fr.chain(fr.sgd(LR), fr.decoupled(fr.l2(WD), learning_rate=LR))
        ),
        "fr.sgd + decoupled l2, report=False": Funcreg(
            params, grads, fr.chain(fr.sgd(LR), fr.decoupled(fr.l2(WD), learning_rate=LR, report=False))
        ),
        "fr.sgd + proximal l1": Funcreg(
            params, grads, fr.chain(fr.sgd(LR), fr.proximal(fr.l1(L1), learning_rate=LR))
        ),
        "torch SGD foreach": Torch(params, grads, lambda p: torch.optim.SGD(p, lr=LR, foreach=True)),
        "torch SGD foreach, weight_decay": Torch(
            params, grads, lambda p: torch.optim.SGD(p, lr=LR, weight_decay=WD, foreach=True)
        ),
        "fr.sgd fused bare": Funcreg(params, grads, fr.sgd(LR, fused=True)),
        "fr.sgd fused + coupled l2": Funcreg(
            params, grads, fr.chain(fr.add_penalty_grad(fr.l2(WD)), fr.sgd(LR, fused=True))
        ),
        "fr.sgd fused + coupled l2, report=False": Funcreg(
            params, grads, fr.chain(fr.add_penalty_grad(fr.l2(WD), report=False), fr.sgd(LR, fused=True))
        ),
        "fr.sgd fused + decoupled l2, report=False": Funcreg(
            params,
            grads,
            fr.chain(fr.sgd(LR, fused=True), fr.decoupled(fr.l2(WD), learning_rate=LR, report=False)),
        ),
        "fr.sgd fused + proximal l1, report=False": Funcreg(
            params,
            grads,
            fr.chain(fr.sgd(LR, fused=True), fr.proximal(fr.l1(L1), learning_rate=LR, report=False)),
        ),
        "torch SGD fused": Torch(params, grads, lambda p: torch.optim.SGD(p, lr=LR, fused=True)),
        "torch SGD fused, weight_decay": Torch(
            params, grads, lambda p: torch.optim.SGD(p, lr=LR, weight_decay=WD, fused=True)
        ),
    }
    report("SGD and its penalty forms", run(sgd, args.rounds, args.warmup), "fr.sgd bare", width=44)


if __name__ == "__main__":
    main()
