"""A sharded sweep: the same seeds x coefficients sweep in 1 process and split across 2, timed.

The sweep: ``--seeds`` seeds x ``--coefficients`` weight decays (log-spaced, 0 first) of an MLP
64-256-256-10 (ReLU, cross-entropy) on a fixed synthetic classification set (2048 rows, 10 classes),
``fr.make_step(loss, lambda h: fr.adamw(1e-3, weight_decay=h["wd"]))`` with per-member batches of 128
(each seed its own order), ``--steps`` steps. (With a much smaller model a step is dominated by its
fixed Python cost, which every process pays in full: splitting the members then buys little.) Every member is one entry of a vmapped ensemble
(:func:`funcreg.ensemble_step`).

* ``1 process``: all members as one vmapped ensemble;
* ``2 processes``: two gloo ranks on 127.0.0.1 (started by this script with
  ``torch.multiprocessing``), each training its members ``fr.distributed.sweep_members(n)`` as one
  ensemble, then ``fr.distributed.gather_members`` bringing every member's final weights to rank 0.

Every process runs one intra-op thread (``torch.set_num_threads(1)``), so 2 processes use 2 cores
where 1 uses 1: the ratio is what splitting a sweep across processes buys on this machine. Every
process first runs a 2-step warm-up (untimed; process start, imports and warm-up are printed apart).
A round is timed from a barrier to the end of the gather; the two variants never run at the same
time, each round alternates which goes first, and the table gives the best and the median round. The gathered weights are compared with the single-process ones (they are the
same arithmetic, so the difference is printed, and should be 0). ``cpu/wall`` shows how much of a
core each process actually got (another job on the machine takes its share).

    python benchmarks/sharded_sweep.py              # 4 seeds x 4 coefficients, 150 steps, 3 rounds
    python benchmarks/sharded_sweep.py --quick      # a smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_model  # noqa: E402

import funcreg as fr  # noqa: E402

BATCH = 128


def _sweep(args: argparse.Namespace) -> tuple[Any, Any, torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """The whole sweep, built the same in every process: stacked initial params, per-member weight
    decays, batch orders, the data, and the model."""
    seeds = list(range(args.seeds))
    wds = [0.0] + [float(w) for w in torch.logspace(-3, 0, args.coefficients - 1)]

    def make_model() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(64, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        )

    per_seed, _, model = fr.init_members(make_model, seeds)
    seed_members = fr.unstack(per_seed)
    params0 = fr.stack([seed_members[s] for _ in wds for s in range(len(seeds))])
    wd = torch.tensor([w for w in wds for _ in seeds])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 64, generator=g)
    y = (x @ torch.randn(64, 10, generator=g)).argmax(-1)
    orders = torch.stack(
        [torch.randperm(2048, generator=torch.Generator().manual_seed(1000 + s)) for _ in wds for s in seeds]
    )
    return params0, wd, orders, x, y, model


def train(args: argparse.Namespace, members: list[int]) -> dict[str, torch.Tensor]:
    """Trains ``members`` of the sweep as one vmapped ensemble; returns their final parameters."""
    from torch.func import functional_call

    params0, wd, orders, x, y, model = _sweep(args)

    def loss_fn(p: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    ens = fr.ensemble_step(
        fr.make_step(loss_fn, lambda h: fr.adamw(1e-3, weight_decay=h["wd"])), batch="per_member"
    )
    state = ens.init(fr.distributed.take_members(params0, members), hparams={"wd": wd[members]})
    order = orders[members]
    per_epoch = x.shape[0] // BATCH
    for t in range(args.steps):
        i = t % per_epoch
        idx = order[:, BATCH * i : BATCH * (i + 1)]
        state, _ = ens(state, x[idx], y[idx])
    return state.params


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=300),
    )
    try:
        n = args.seeds * args.coefficients
        train(argparse.Namespace(**{**vars(args), "steps": 2}), fr.distributed.sweep_members(n))  # warm-up
        open(os.path.join(out, f"ready{rank}"), "w").close()
        for r in range(args.rounds):
            while rank == 0 and not os.path.exists(os.path.join(out, f"go{r}")):
                time.sleep(0.02)  # the parent's single-process run is not timed alongside this one
            dist.barrier()
            start, cpu = time.perf_counter(), time.process_time()
            params = train(args, fr.distributed.sweep_members(n))
            gathered = fr.distributed.gather_members(params, n)
            seconds = time.perf_counter() - start
            # the CPU time each rank got while timed, on rank 0
            cpus = fr.distributed.gather_members([time.process_time() - cpu], world)
            if rank == 0:
                result = {"seconds": seconds, "params": gathered, "cpu": cpus}
                torch.save(result, os.path.join(out, f"part{r}.pt"))
                os.replace(os.path.join(out, f"part{r}.pt"), os.path.join(out, f"round{r}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--coefficients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 seeds x 2 coefficients, 20 steps, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.coefficients, args.steps, args.rounds = 2, 2, 20, 1
    torch.set_num_threads(1)
    import torch.multiprocessing as mp

    n = args.seeds * args.coefficients
    print(f"machine:  {cpu_model()} ({os.cpu_count()} CPUs; {platform.machine()}, {platform.system()})")
    print(f"software: Python {platform.python_version()}, torch {torch.__version__}, one thread per process")
    print(
        f"sweep:    {args.seeds} seeds x {args.coefficients} weight decays = {n} members, MLP 64-256-256-10, "
        f"AdamW, batch {BATCH} per member, {args.steps} steps; {args.rounds} rounds\n"
    )
    single: list[float] = []
    split: list[float] = []
    single_share: list[float] = []
    split_share: list[float] = []
    single_cpu: list[float] = []
    split_cpu: list[float] = []
    worst = 0.0

    def timed_single() -> dict[str, torch.Tensor]:
        start, cpu = time.perf_counter(), time.process_time()
        params = train(args, list(range(n)))
        single.append(time.perf_counter() - start)
        single_cpu.append(time.process_time() - cpu)
        single_share.append(single_cpu[-1] / single[-1])
        return params

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        ctx = mp.start_processes(
            _worker, args=(2, _free_port(), args, out), nprocs=2, join=False, start_method="spawn"
        )
        train(argparse.Namespace(**{**vars(args), "steps": 2}), list(range(n)))  # warm-up, untimed
        while not all(os.path.exists(os.path.join(out, f"ready{r}")) for r in range(2)):
            ctx.join(timeout=0.1)  # raises if a worker failed
        print(
            f"(2 processes started, imported torch, met and warmed up in {time.perf_counter() - start:.1f} s)"
        )
        for r in range(args.rounds):
            path = os.path.join(out, f"round{r}.pt")
            if r % 2 == 0:  # alternate which variant runs first; one runs at a time
                reference = timed_single()
            open(os.path.join(out, f"go{r}"), "w").close()
            while not os.path.exists(path):
                ctx.join(timeout=0.1)  # raises if a worker failed
            result = torch.load(path, weights_only=True)
            split.append(result["seconds"])
            split_share.append(min(result["cpu"]) / result["seconds"])
            split_cpu.append(sum(result["cpu"]))
            if r % 2 == 1:
                reference = timed_single()
            worst = max(
                worst, max((result["params"][k] - reference[k]).abs().max().item() for k in reference)
            )
        ctx.join(timeout=120)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{'variant':14s} {'best s':>8s} {'median s':>9s} {'member-steps/s':>15s} {'cpu/wall':>9s}")
    for name, times, shares in (("1 process", single, single_share), ("2 processes", split, split_share)):
        best = min(times)
        share = statistics.median(shares)
        print(
            f"{name:14s} {best:8.2f} {statistics.median(times):9.2f} {n * args.steps / best:15.0f} {share:9.2f}"
        )
    print(
        f"\nspeed-up of 2 processes over 1: {min(single) / min(split):.2f}x (best), "
        f"{statistics.median(single) / statistics.median(split):.2f}x (median)"
    )
    work = statistics.median(split_cpu) / statistics.median(single_cpu)
    print(
        f"CPU seconds per round (median): 1 process {statistics.median(single_cpu):.2f}, 2 processes "
        f"{statistics.median(split_cpu):.2f} together ({work:.2f}x the work); with a core for each process "
        f"that is a {2 / work:.2f}x speed-up"
    )
    print(f"largest weight difference, gathered vs single process: {worst:.1e}")
    print(f"load average (1 min) at the end: {load:.2f}")
    print(
        "cpu/wall: the CPU time a process got over the wall time of a round (for 2 processes, the smaller "
        "rank's); below 1, other jobs took part of its core, and the speed-up falls short of the 2x that "
        "halving each process's members allows"
    )


if __name__ == "__main__":
    main()
