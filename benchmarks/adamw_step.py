"""Time one AdamW step: funcreg against torch.optim.AdamW (for-loop, foreach, fused).

The model is an MLP 1024-1024-1024-10 (2.11M float32 parameters in 6 tensors); the gradients are
fixed random tensors, so only the optimizer step is timed. Every variant keeps its own parameters
and state. The variants run round-robin, in a new random order every round, so machine noise hits
them all alike; the table gives the median time of one step and the ratio to torch's foreach AdamW.

Variants:

* ``torch for-loop``: ``torch.optim.AdamW(foreach=False)``;
* ``torch foreach``: ``torch.optim.AdamW(foreach=True)`` (the default on GPU; the reference here);
* ``torch fused``: ``torch.optim.AdamW(fused=True)``;
* ``funcreg``: ``u, state = tx.update(grads, state, params); params = fr.apply_updates(params, u)``
  with ``tx = fr.adamw(lr, weight_decay=wd)``;
* ``funcreg update only``: the same without ``apply_updates`` (where the time goes);
* ``funcreg donated``: ``params, state = fr.donated_update(tx, grads, state, params)``, which writes
  into the state and parameters as torch does;
* ``funcreg donated fused``: the same with ``fr.adamw(..., fused=True)``, whose donated step runs
  torch's fused AdamW kernel;
* ``fr.TorchOptimizer`` / ``fr.TorchOptimizer fused``: ``fr.TorchOptimizer`` over a factory
  ``lr -> fr.adamw(lr, ...)`` (``fused=True``), stepped from ``.grad`` like torch.optim;
* ``funcreg compiled`` / ``funcreg donated compiled``: the whole funcreg step (pure / donated) under
  ``torch.compile``, compiled once before timing.

    python benchmarks/adamw_step.py                    # ~1 min, plus the compilation
    python benchmarks/adamw_step.py --quick --no-compile   # a smoke run (CI)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable

import torch
from _machine import cpu_model

import funcreg as fr

LR, WD, BETAS, EPS = 1e-3, 1e-2, (0.9, 0.999), 1e-8
REFERENCE = "torch foreach"


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    )


class TorchVariant:
    def __init__(self, model: torch.nn.Module, grads: dict[str, torch.Tensor], **flags: bool) -> None:
        self.params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
        for n, p in self.params.items():
            p.grad = grads[n].clone()
        self.opt = torch.optim.AdamW(
            list(self.params.values()), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **flags
        )

    def step(self) -> None:
        self.opt.step()

    def current(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.params.items()}


class FuncregVariant:
    def __init__(self, model: torch.nn.Module, grads: dict[str, torch.Tensor], apply: bool = True) -> None:
        self.tx = fr.adamw(LR, betas=BETAS, eps=EPS, weight_decay=WD)
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.grads = grads
        self.state = self.tx.init(self.params)
        self.apply = apply

    def step(self) -> None:
        updates, self.state = self.tx.update(self.grads, self.state, self.params)
        if self.apply:
            self.params = fr.apply_updates(self.params, updates)

    def current(self) -> dict[str, torch.Tensor]:
        return self.params


class TorchOptimizerVariant(TorchVariant):
    """``fr.TorchOptimizer(params, lambda lr: fr.adamw(lr, ...), lr=LR)``, stepped like torch.optim."""

    def __init__(self, model: torch.nn.Module, grads: dict[str, torch.Tensor], fused: bool = False) -> None:
        self.params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
        for n, p in self.params.items():
            p.grad = grads[n].clone()
        factory = lambda lr: fr.adamw(lr, betas=BETAS, eps=EPS, weight_decay=WD, fused=fused)  # noqa: E731
        self.opt = fr.TorchOptimizer(list(self.params.items()), factory, lr=LR)


class DonatedFuncregVariant(FuncregVariant):
    """``fr.donated_update``: the same step writing into its state and parameters, as torch does."""

    def __init__(self, model: torch.nn.Module, grads: dict[str, torch.Tensor], fused: bool = False) -> None:
        super().__init__(model, grads)
        if fused:
            self.tx = fr.adamw(LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)

    def step(self) -> None:
        self.params, self.state = fr.donated_update(self.tx, self.grads, self.state, self.params)


class CompiledFuncregVariant(FuncregVariant):
    def __init__(
        self, model: torch.nn.Module, grads: dict[str, torch.Tensor], warmup: int, donate: bool = False
    ) -> None:
        super().__init__(model, grads)
        tx = self.tx

        # two functions, not one with a flag: Dynamo caches compiled code per code object, and two
        # variants sharing one would evict and re-guard each other's graphs at every call
        if donate:

            def step(g, s, p):
                return fr.donated_update(tx, g, s, p)

        else:

            def step(g, s, p):
                u, s = tx.update(g, s, p)
                return fr.apply_updates(p, u), s

        # explain runs the step: on copies, so that a donated step does not advance this variant
        copies = torch.utils._pytree.tree_map(
            lambda x: x.clone() if isinstance(x, torch.Tensor) else x, (self.state, self.params)
        )
        self.graph_summary = graph_breaks(step, grads, *copies)
        self.compiled = torch.compile(step)
        start = time.perf_counter()
        for _ in range(max(warmup, 1)):  # compiles on the first call; the count is a tensor, so no recompiles
            self.step()
        self.compile_seconds = time.perf_counter() - start

    def step(self) -> None:
        self.params, self.state = self.compiled(self.grads, self.state, self.params)


def graph_breaks(fn: Callable, *args: object) -> str:
    """How many graphs Dynamo cuts ``fn`` into, and the distinct reasons (a fast compiled step has one graph)."""
    try:
        explained = torch._dynamo.explain(fn)(*args)
    except Exception as exc:  # explain is a diagnostic only
        return f"torch._dynamo.explain failed: {type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        torch._dynamo.reset()
    reasons = []
    for br in explained.break_reasons:
        first = str(br.reason).splitlines()[0][:120]
        where = br.user_stack[-1] if br.user_stack else None
        text = (
            f"{first} (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno} {where.line.strip()})"
            if where
            else first
        )
        if text not in reasons:
            reasons.append(text)
    lines = [f"{explained.graph_count} graph(s), {explained.graph_break_count} graph break(s)"]
    lines += [f"  break: {r}" for r in reasons[:5]]
    return "\n".join(lines)


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="timed steps per variant (default 300)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5 rounds, 2 warm-up steps")
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="VARIANT",
        help="time only these variants beside torch foreach (e.g. --only 'funcreg donated compiled'): "
        "the pure variants allocate 8 MB buffers at every step, and that churn slows the others",
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup = 5, 2
    torch.set_num_threads(args.threads)

    model = make_model(0)
    gen = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(p.shape, generator=gen) * 1e-2 for n, p in model.named_parameters()}
    n_params = sum(p.numel() for p in model.parameters())

    print(f"date:    {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {cpu_model()} ({platform.machine()}, {platform.system()} {platform.release()})")
    print(f"python:  {platform.python_version()}, torch {torch.__version__}, funcreg {fr.__version__}")
    print(
        f"threads: torch.get_num_threads() = {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
        f"load average {load_average()} at the start"
    )
    print(f"model:   MLP 1024-1024-1024-10, {n_params:,} float32 parameters in {len(grads)} tensors")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"rounds:  {args.rounds} timed steps per variant after {args.warmup} warm-up steps, interleaved")
    print()

    variants: dict[str, object] = {
        "torch for-loop": TorchVariant(model, grads, foreach=False),
        "torch foreach": TorchVariant(model, grads, foreach=True),
        "torch fused": TorchVariant(model, grads, fused=True),
        "funcreg": FuncregVariant(model, grads),
        "funcreg update only": FuncregVariant(model, grads, apply=False),
        "funcreg donated": DonatedFuncregVariant(model, grads),
        "funcreg donated fused": DonatedFuncregVariant(model, grads, fused=True),
        "fr.TorchOptimizer": TorchOptimizerVariant(model, grads),
        "fr.TorchOptimizer fused": TorchOptimizerVariant(model, grads, fused=True),
    }
    if args.only is not None:
        variants = {k: v for k, v in variants.items() if k == REFERENCE or k in args.only}
    for v in variants.values():
        for _ in range(args.warmup):
            v.step()
    compiled_labels = [
        (label, donate)
        for label, donate in (("funcreg compiled", False), ("funcreg donated compiled", True))
        if args.only is None or label in args.only
    ]
    if not args.no_compile and compiled_labels:
        warnings.filterwarnings("ignore", message="Dynamo does not know how to trace")
        try:
            for label, donate in compiled_labels:
                compiled = CompiledFuncregVariant(model, grads, warmup=args.warmup, donate=donate)
                variants[label] = compiled
                print(f"torch.compile: {label} compiled and warmed up in {compiled.compile_seconds:.1f} s")
                print(f"torch.compile: the {label} step is {compiled.graph_summary}")
        except Exception as exc:  # report why and go on with the eager variants
            print(f"torch.compile failed, skipping that variant: {type(exc).__name__}: {exc}".splitlines()[0])
            traceback.print_exc(limit=3)
        print()

    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    rng = random.Random(0)
    for _ in range(args.rounds):
        rng.shuffle(order)
        for name in order:
            step: Callable[[], None] = variants[name].step
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)

    def p10(ts: list[float]) -> float:
        return sorted(ts)[len(ts) // 10]

    ref, ref_p10 = statistics.median(times[REFERENCE]), p10(times[REFERENCE])
    print(f"load average {load_average()} at the end (1/5/15 min; more than the thread count means noise)")
    print()
    print(
        f"{'variant':<25} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8} {'median ratio':>13} {'p10 ratio':>10}"
    )
    for name, ts in times.items():
        ts = sorted(ts)
        med, p90 = statistics.median(ts), ts[(len(ts) * 9) // 10]
        print(
            f"{name:<25} {med * 1e3:>10.3f} {p10(ts) * 1e3:>8.3f} {p90 * 1e3:>8.3f} "
            f"{med / ref:>12.2f}x {p10(ts) / ref_p10:>9.2f}x"
        )
    print(f"(ratios are to {REFERENCE}: torch.optim.AdamW(foreach=True))")
    pairs = [
        ("funcreg donated fused", "torch fused"),
        ("funcreg donated", "torch foreach"),
        ("funcreg donated compiled", "torch foreach"),
        ("fr.TorchOptimizer", "torch foreach"),
        ("fr.TorchOptimizer fused", "torch fused"),
    ]
    for a, b in pairs:
        if a in times and b in times:
            print(
                f"{a} / {b}: median {statistics.median(times[a]) / statistics.median(times[b]):.2f}x, "
                f"p10 {p10(times[a]) / p10(times[b]):.2f}x"
            )

    # All full-step variants took the same number of steps from the same start: they must agree.
    reference_params = variants[REFERENCE].current()
    print()
    for name, v in variants.items():
        if name in (REFERENCE, "funcreg update only"):
            continue
        print(
            f"max |{name} - {REFERENCE}| after {args.warmup + args.rounds} steps: "
            f"{max_diff(v.current(), reference_params):.2e}"
        )


if __name__ == "__main__":
    main()
