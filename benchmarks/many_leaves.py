"""Per-leaf overhead: one optimizer step on a tree of many small tensors (default 2,000), funcreg
against torch.optim, and the overhead of each penalty form over the bare step.

Small leaves make the arithmetic nearly free, so what is measured is the Python work per leaf
(flattening, checks, masks, groups) and per kernel launch. Variants run round-robin in a new random
order each round, in one process with ``torch.set_num_threads(1)``; the table gives medians, p10 and
the ratio to each group's reference.

    python benchmarks/many_leaves.py             # 2,000 leaves, 40 rounds
    python benchmarks/many_leaves.py --quick     # a smoke run
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
from _machine import cpu_model, report, run

import funcreg as fr

LR, WD = 1e-3, 1e-2


def make_tree(n: int) -> dict[str, torch.Tensor]:
    """``n`` leaves alternating matrices (decayed) and vectors (not decayed), named like a module's."""
    gen = torch.Generator().manual_seed(0)
    tree = {}
    for i in range(n):
        shape = (4, 4) if i % 2 == 0 else (4,)
        tree[f"layer{i // 2}.{'weight' if i % 2 == 0 else 'bias'}"] = torch.randn(shape, generator=gen)
    return tree


class Torch:
    def __init__(self, tree, grads, make: Callable) -> None:
        self.params = {k: v.clone().requires_grad_(True) for k, v in tree.items()}
        for k, p in self.params.items():
            p.grad = grads[k].clone()
        self.opt = make(self.params)

    def step(self) -> None:
        self.opt.step()


class Funcreg:
    def __init__(self, tree, grads, tx: fr.GradientTransformation, donate: bool) -> None:
        self.params = {k: v.clone() for k, v in tree.items()}
        self.grads, self.tx, self.donate = grads, tx, donate
        self.state = tx.init(self.params)

    def step(self) -> None:
        if self.donate:
            self.params, self.state = fr.donated_update(self.tx, self.grads, self.state, self.params)
        else:
            u, self.state = self.tx.update(self.grads, self.state, self.params)
            self.params = fr.apply_updates(self.params, u)


def groups(params: dict[str, torch.Tensor]) -> list[dict]:
    decay = [p for k, p in params.items() if k.endswith("weight")]
    other = [p for k, p in params.items() if not k.endswith("weight")]
    return [{"params": decay, "weight_decay": WD}, {"params": other, "weight_decay": 0.0}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 leaves, 3 rounds")
    args = parser.parse_args()
    if args.quick:
        args.leaves, args.rounds, args.warmup = 200, 3, 1
    torch.set_num_threads(1)
    tree = make_tree(args.leaves)
    gen = torch.Generator().manual_seed(1)
    grads = {k: torch.randn(v.shape, generator=gen) * 1e-2 for k, v in tree.items()}
    mask = {k: k.endswith("weight") for k in tree}
    print(
        f"machine: {cpu_model()}, torch {torch.__version__}, 1 thread, load average {os.getloadavg()[0]:.2f}"
    )
    print(f"tree:    {len(tree)} leaves of 4x4 and 4 float32 entries; {args.rounds} interleaved rounds")

    adamw = {
        "torch AdamW foreach, 1 group": Torch(
            tree, grads, lambda p: torch.optim.AdamW(p.values(), lr=LR, weight_decay=WD, foreach=True)
        ),
        "torch AdamW foreach, 2 groups (decay/no decay)": Torch(
            tree, grads, lambda p: torch.optim.AdamW(groups(p), lr=LR, foreach=True)
        ),
        "fr.adamw pure": Funcreg(tree, grads, fr.adamw(LR, weight_decay=WD), donate=False),
        "fr.adamw donated": Funcreg(tree, grads, fr.adamw(LR, weight_decay=WD), donate=True),
        "fr.adamw(mask=...) pure": Funcreg(
            tree, grads, fr.adamw(LR, weight_decay=WD, mask=mask), donate=False
        ),
        "fr.adamw(mask=...) donated": Funcreg(
            tree, grads, fr.adamw(LR, weight_decay=WD, mask=mask), donate=True
        ),
        "partition(adamw, adam) donated": Funcreg(
            tree,
            grads,
            fr.partition(
                {"d": fr.adamw(LR, weight_decay=WD), "n": fr.adam(LR)},
                {k: "d" if v else "n" for k, v in mask.items()},
            ),
            donate=True,
        ),
        "apply_if_finite(adamw) donated": Funcreg(
            tree, grads, fr.apply_if_finite(fr.adamw(LR, weight_decay=WD), 3), donate=True
        ),
    }
    report(
        f"AdamW step, {len(tree)} leaves",
        run(adamw, args.rounds, args.warmup),
        "torch AdamW foreach, 2 groups (decay/no decay)",
    )

    sgd = {
        "torch SGD foreach": Torch(tree, grads, lambda p: torch.optim.SGD(p.values(), lr=LR, foreach=True)),
        "fr.sgd donated": Funcreg(tree, grads, fr.sgd(LR), donate=True),
        "fr.sgd + proximal(l1) donated": Funcreg(
            tree, grads, fr.chain(fr.sgd(LR), fr.proximal(fr.l1(1e-4), learning_rate=LR)), donate=True
        ),
        "fr.sgd + coupled l2 donated": Funcreg(
            tree, grads, fr.chain(fr.add_penalty_grad(fr.l2(WD)), fr.sgd(LR)), donate=True
        ),
        "fr.sgd + decoupled l2 donated": Funcreg(
            tree, grads, fr.chain(fr.sgd(LR), fr.decoupled(fr.l2(WD), learning_rate=LR)), donate=True
        ),
    }
    report(
        f"SGD step and penalty forms, {len(tree)} leaves",
        run(sgd, args.rounds, args.warmup),
        "fr.sgd donated",
    )


if __name__ == "__main__":
    main()
