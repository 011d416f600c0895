"""Stress ``funcreg.testing.check_forms_agree`` on the non-smooth built-ins: how often does it fail?

Runs the checks of ``tests/test_testing_checks.py::test_check_forms_agree_passes`` for L1,
elastic net and group lasso, each with ``fr.sgd(0.05)`` (and ``learning_rate=0.05``, so the
decoupled form is checked too) and with ``fr.adam(0.01)``, on the tests' template tree and at the
tests' ``max_examples=8``, once per Hypothesis seed ``0 .. N-1``. The penalties are correct, so
every failure is a false failure of the check. Before the check compared forms from a common point
each step, about 1 run in 150 of L1 with SGD failed (a rounding residue on the other side of the
kink at 0 turned ``sign(w)`` into a difference of ``lr * coeff``).

Seeds: each run passes ``seed=k`` to the check, which seeds that Hypothesis search alone
(``hypothesis.seed``); the example database is off in the checks, so no run replays another's
examples. Seeds ``k`` give independent pseudo-random streams, and a failure is replayed by its seed.
Failing runs are not shrunk (``shrink=False``): a failure is counted and its first line printed.

    python benchmarks/stress_forms_checks.py                  # 300 seeds x 6 checks, ~20 min on 1 core
    python benchmarks/stress_forms_checks.py --seeds 20       # a smoke run
    python benchmarks/stress_forms_checks.py --workers 8      # on a machine with cores to spare
    python benchmarks/stress_forms_checks.py --max-abs 0.05   # start next to the kinks (harder)

Exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from _machine import cpu_model

import funcreg as fr
import funcreg.testing

F64 = torch.float64
# the template of tests/test_testing_checks.py: shapes and names (values are drawn)
TEMPLATE = {
    "w": torch.zeros(3, 2, dtype=F64),
    "k": torch.zeros(2, 2, 3, dtype=F64),
    "b": torch.zeros(3, dtype=F64),
    "s": torch.zeros((), dtype=F64),
}
MAX_EXAMPLES = 8  # as in the tests
PENALTIES: dict[str, Callable[[], fr.Penalty]] = {
    "l1": lambda: fr.l1(0.3),
    "elastic_net": lambda: fr.elastic_net(0.2, 0.5),
    "group_lasso": lambda: fr.group_lasso(0.2),
}
OPTIMIZERS: dict[str, tuple[Callable[[], Any], float | None]] = {
    "sgd+lr": (lambda: fr.sgd(0.05), 0.05),
    "adam": (lambda: fr.adam(0.01), None),
}


def run_one(job: tuple[str, str, int, int, float | None]) -> tuple[str, str, int, str | None, float]:
    """One check under one seed: ``(penalty, optimizer, seed, first line of the failure or None, seconds)``."""
    penalty, optimizer, seed, max_examples, max_abs = job
    torch.set_num_threads(1)
    make_optimizer, lr = OPTIMIZERS[optimizer]
    params = TEMPLATE if max_abs is None else funcreg.testing.like(TEMPLATE, max_abs=max_abs)
    start = time.perf_counter()
    failure = None
    try:
        funcreg.testing.check_forms_agree(
            PENALTIES[penalty](),
            make_optimizer(),
            params,
            learning_rate=lr,
            max_examples=max_examples,
            shrink=False,
            seed=seed,
        )
    except AssertionError as err:
        failure = str(err).splitlines()[0]
    return penalty, optimizer, seed, failure, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=300, help="seeds 0 .. N-1 per check (default 300)")
    parser.add_argument("--first-seed", type=int, default=0, help="start of the seed range (default 0)")
    parser.add_argument(
        "--max-examples",
        type=int,
        default=MAX_EXAMPLES,
        help=f"per run (default {MAX_EXAMPLES}, as in the tests)",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument(
        "--max-abs",
        type=float,
        default=None,
        help="draw the initial parameters within [-X, X] (default: the tests' template, |w| <= 10); "
        "a small X such as 0.05 keeps the trajectories near the kinks",
    )
    parser.add_argument("--penalties", nargs="+", default=list(PENALTIES), choices=list(PENALTIES))
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    configs = [(p, o) for p in args.penalties for o in args.optimizers]
    jobs = [(p, o, k, args.max_examples, args.max_abs) for p, o in configs for k in seeds]
    print(
        f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {cpu_model()}  python {platform.python_version()}"
    )
    print(
        f"# torch {torch.__version__}  hypothesis {__import__('hypothesis').__version__}  workers {args.workers}"
    )
    drawn = (
        "the tests' template"
        if args.max_abs is None
        else f"the tests' template shapes, |w| <= {args.max_abs:g}"
    )
    print(
        f"# check_forms_agree on {drawn}, max_examples={args.max_examples}, seeds {seeds.start}..{seeds.stop - 1}"
    )
    sys.stdout.flush()

    failures: dict[tuple[str, str], list[tuple[int, str]]] = {c: [] for c in configs}
    seconds: dict[tuple[str, str], float] = {c: 0.0 for c in configs}
    start = time.perf_counter()
    if args.workers > 1:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            results = list(pool.imap_unordered(run_one, jobs, chunksize=4))
    else:
        results = []
        for job in jobs:
            results.append(run_one(job))
            if job[2] == seeds.stop - 1:
                done = [r for r in results if (r[0], r[1]) == job[:2]]
                bad = sum(r[3] is not None for r in done)
                print(
                    f"  {job[0]:<12} {job[1]:<7} {bad}/{len(done)} failed, {sum(r[4] for r in done):.0f} s",
                    flush=True,
                )
    wall = time.perf_counter() - start
    for penalty, optimizer, seed, failure, took in results:
        seconds[(penalty, optimizer)] += took
        if failure is not None:
            failures[(penalty, optimizer)].append((seed, failure))

    print()
    print(f"{'penalty':<12} {'optimizer':<9} {'failed':>9} {'seconds':>8}  {'s/run':>6}")
    for config in configs:
        n = len(seeds)
        print(
            f"{config[0]:<12} {config[1]:<9} {len(failures[config]):>4}/{n:<4} {seconds[config]:>8.1f}  {seconds[config] / n:>6.2f}"
        )
    print(f"wall time {wall:.1f} s")
    total = sum(len(f) for f in failures.values())
    for config, found in failures.items():
        for seed, line in found:
            print(f"FAILED {config[0]} {config[1]} seed={seed}: {line}")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
