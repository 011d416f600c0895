"""Machine facts the benchmark scripts print beside their numbers, and their interleaved timing."""

from __future__ import annotations

import platform
import random
import statistics
import time
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(variants: dict[str, Any], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Times ``variant.step()``: ``warmup`` untimed steps each, then ``rounds`` rounds in a new random
    order every round, so machine noise hits every variant alike."""
    for v in variants.values():
        for _ in range(warmup):
            v.step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            variants[name].step()
            times[name].append(time.perf_counter() - t0)
    return times


def report(title: str, times: dict[str, list[float]], reference: str, width: int = 44) -> None:
    """Prints medians, 10th percentiles and their ratios to ``reference``."""

    def p10(ts: list[float]) -> float:
        return sorted(ts)[len(ts) // 10]

    ref, ref10 = statistics.median(times[reference]), p10(times[reference])
    print(f"\n{title} (ratios to {reference})")
    print(f"{'variant':<{width}} {'median ms':>10} {'p10 ms':>8} {'median ratio':>13} {'p10 ratio':>10}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name:<{width}} {med * 1e3:>10.2f} {p10(ts) * 1e3:>8.2f} {med / ref:>12.2f}x {p10(ts) / ref10:>9.2f}x"
        )
