"""State memory and step time of ``fr.compress_state`` (bfloat16 moments, stochastic rounding).

The model is the MLP of ``adamw_step.py`` (2.11M float32 parameters); gradients are fixed random
tensors. Side by side in one process, ``torch.set_num_threads(1)``: ``fr.adamw`` pure and
``fr.compress_state(fr.adamw)`` (pure: it computes in float32 copies and rounds back), and torch's
AdamW (foreach) for scale. Printed: the state's bytes (tensors of the state, not counting the
parameters) and the median step time of each, with the ratio to ``fr.adamw``.

    python benchmarks/low_memory_state.py            # 30 rounds
    python benchmarks/low_memory_state.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from adamw_step import make_model

import funcreg as fr


def state_bytes(state: object) -> int:
    return sum(
        t.nbytes for t in torch.utils._pytree.tree_leaves(state) if isinstance(t, torch.Tensor) and t.ndim
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = 3 if args.quick else args.rounds
    params = {k: v.detach().clone() for k, v in make_model(0).named_parameters()}
    gen = torch.Generator().manual_seed(0)
    grads = {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in params.items()}
    variants = {
        "fr.adamw": fr.adamw(1e-3, weight_decay=1e-2),
        "compress_state(adamw)": fr.compress_state(fr.adamw(1e-3, weight_decay=1e-2)),
    }
    runs = {name: [params, tx.init(params)] for name, tx in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    torch_params = [torch.nn.Parameter(v.clone()) for v in params.values()]
    for p, g in zip(torch_params, grads.values()):
        p.grad = g.clone()
    torch_opt = torch.optim.AdamW(torch_params, lr=1e-3, weight_decay=1e-2, foreach=True)
    torch_opt.step()
    times["torch AdamW foreach"] = []
    for _ in range(rounds):
        for name, tx in variants.items():
            p, s = runs[name]
            start = time.perf_counter()
            u, s = tx.update(grads, s, p)
            p = fr.apply_updates(p, u)
            times[name].append(time.perf_counter() - start)
            runs[name] = [p, s]
        start = time.perf_counter()
        torch_opt.step()
        times["torch AdamW foreach"].append(time.perf_counter() - start)
    base = statistics.median(times["fr.adamw"])
    print(
        f"AdamW step, {sum(v.numel() for v in params.values()) / 1e6:.2f}M float32 parameters, 1 thread, {rounds} rounds"
    )
    print(f"{'variant':28s} {'state MB':>9s} {'median ms':>10s} {'ratio':>7s}")
    for name, ts in times.items():
        mb = (
            state_bytes(runs[name][1]) / 2**20
            if name in runs
            else state_bytes(torch_opt.state_dict()["state"]) / 2**20
        )
        print(
            f"{name:28s} {mb:9.2f} {1e3 * statistics.median(ts):10.2f} {statistics.median(ts) / base:6.2f}x"
        )


if __name__ == "__main__":
    main()
