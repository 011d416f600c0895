"""State memory and step time of ``fr.compress_state`` (bfloat16 moments with stochastic rounding,
and float8 block-quantized moments).

The model is the MLP of ``adamw_step.py`` (2.11M float32 parameters); gradients are fixed random
tensors. Side by side in one process, ``torch.set_num_threads(1)``: ``fr.adamw`` pure and
``fr.compress_state(fr.adamw)`` (pure: it computes in float32 copies and rounds back), and torch's
AdamW (foreach) for scale, and torchao's ``AdamW8bit`` / ``AdamWFp8`` where torchao is installed. Printed: the state's bytes (tensors of the state, not counting the
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


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a state tensor holds; a tensor subclass (torchao's quantized states) by its inner tensors."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.nbytes


def state_bytes(state: object) -> int:
    return sum(
        tensor_bytes(t)
        for t in torch.utils._pytree.tree_leaves(state)
        if isinstance(t, torch.Tensor) and t.ndim
    )


def torchao_optimizers(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> dict[str, object]:
    """torchao's low-bit AdamW (8-bit and float8 states) where torchao is installed, else none."""
    try:
        from torchao.optim import AdamW8bit, AdamWFp8
    except ImportError:
        print("torchao is not installed: its low-bit AdamW is not compared (pip install torchao)")
        return {}
    out = {}
    for name, cls in (("torchao AdamW8bit", AdamW8bit), ("torchao AdamWFp8", AdamWFp8)):
        ps = [torch.nn.Parameter(v.clone()) for v in params.values()]
        for q, g in zip(ps, grads.values()):
            q.grad = g.clone()
        opt = cls(ps, lr=1e-3, weight_decay=1e-2)
        opt.step()  # torchao compiles its step function at the first call
        out[name] = opt
    return out


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
        "compress_state(adamw, float8)": fr.compress_state(
            fr.adamw(1e-3, weight_decay=1e-2), format="float8"
        ),
    }
    runs = {name: [params, tx.init(params)] for name, tx in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    torch_params = [torch.nn.Parameter(v.clone()) for v in params.values()]
    for p, g in zip(torch_params, grads.values()):
        p.grad = g.clone()
    torch_opt = torch.optim.AdamW(torch_params, lr=1e-3, weight_decay=1e-2, foreach=True)
    torch_opt.step()
    times["torch AdamW foreach"] = []
    others = torchao_optimizers(params, grads)
    times.update({name: [] for name in others})
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
        for name, opt in others.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["fr.adamw"])
    print(
        f"AdamW step, {sum(v.numel() for v in params.values()) / 1e6:.2f}M float32 parameters, 1 thread, {rounds} rounds"
    )
    print(f"{'variant':32s} {'state MB':>9s} {'median ms':>10s} {'ratio':>7s}")
    for name, ts in times.items():
        if name in runs:
            mb = state_bytes(runs[name][1]) / 2**20
        elif name in others:
            mb = state_bytes(list(others[name].state.values())) / 2**20
        else:
            mb = state_bytes(torch_opt.state_dict()["state"]) / 2**20
        print(
            f"{name:32s} {mb:9.2f} {1e3 * statistics.median(ts):10.2f} {statistics.median(ts) / base:6.2f}x"
        )


if __name__ == "__main__":
    main()
