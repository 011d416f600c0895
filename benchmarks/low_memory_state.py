"""State memory and step time of ``fr.compress_state`` (bfloat16 moments with stochastic rounding,
and float8 block-quantized moments).

The model is the MLP of ``adamw_step.py`` (2.11M float32 parameters); gradients are fixed random
tensors. Side by side in one process, ``torch.set_num_threads(1)``: ``fr.adamw`` pure and
``fr.compress_state(fr.adamw)`` (pure: it computes in float32 copies and rounds back), and torch's
AdamW (foreach) for scale, and torchao's ``AdamW8bit`` / ``AdamWFp8`` where torchao is importable
(installed, or an unpacked wheel on ``PYTHONPATH``). Printed: the state's bytes (tensors of the
state, not counting the parameters) and the median step time of each, with the ratio to ``fr.adamw``.

Then the peak memory of a training step, each configuration in fresh subprocesses
(``--peak-child``, ``OMP_NUM_THREADS=1``) on a wider MLP (``--peak-width``, default 2048: 8.41M
parameters, so that the state differences stand above the RSS noise). A child first steps a small
MLP of the same configuration (so code loaded at the first step, torchao's compiler, is not
counted), builds the parameters and the fixed gradients, reads the RSS, then initialises the
optimizer, runs one untimed warm-up step (torch's lazy state, torchao's compilation for these
shapes) and ``--peak-steps`` timed steps. Columns, in MB above that RSS:

* ``live``: the peak of the bytes torch holds on the CPU over the timed steps (state, buffers a
  kernel keeps between steps, the step's temporaries and new tensors), from a second run of the
  same steps under ``torch.profiler.profile(profile_memory=True)`` (allocation events summed in
  time order, running maximum; see :func:`_alloc_peaks`): what the step needs whatever the
  allocator does;
* ``run``: the peak RSS over init, warm-up and timed steps (``VmHWM``, reset through
  ``/proc/self/clear_refs`` at the base; ``ru_maxrss`` where the reset is refused, see
  :func:`peak_child` for why not ``ru_maxrss`` first);
* ``step``: the peak RSS over the timed steps only (reset after the warm-up);
* ``mmap``: ``step`` in a second child run with ``MALLOC_MMAP_THRESHOLD_=1048576``: glibc then maps
  every block over 1 MiB on its own and unmaps it when freed, so the RSS follows the live tensors;
  with the default malloc, freed blocks stay in the heap and the RSS peaks depend on the order of
  allocations (they vary run to run by tens of MB).

The pure rows allocate new state, updates and parameters every step (the old ones are freed after);
the ``donated`` rows step with ``fr.donated_update`` (parameters written in place); torch and
torchao write in place. Ratios are to the pure ``fr.adamw`` row (``peak``: of ``mmap``); the step
time is the default-malloc child's.

    python benchmarks/low_memory_state.py              # 30 rounds, then the peak table (~3 min)
    python benchmarks/low_memory_state.py --quick      # a smoke run (no donated rows, no mmap run)
    python benchmarks/low_memory_state.py --no-peak    # the timing table only
    python benchmarks/low_memory_state.py --peak-only  # the peak table only
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
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


# Peak-memory configurations: key (the --peak-child argument) -> label in the table.
PEAK_CONFIGS = {
    "adamw": "fr.adamw",
    "bf16": "compress_state(adamw)",
    "float8": "compress_state(adamw, float8)",
    "adamw-donated": "fr.adamw donated",
    "bf16-donated": "compress_state(adamw) donated",
    "float8-donated": "compress_state(adamw, float8) donated",
    "torch-foreach": "torch AdamW foreach",
    "torchao-8bit": "torchao AdamW8bit",
    "torchao-fp8": "torchao AdamWFp8",
}
FR_CONFIGS = {
    "adamw": {},
    "bf16": {"format": "bfloat16"},
    "float8": {"format": "float8"},
}


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_hwm() -> bool:
    """Resets the RSS high-water mark (``VmHWM``) to the current RSS (Linux 4.0+), if allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _params_and_grads(width: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    params = _mlp_params(width)
    gen = torch.Generator().manual_seed(0)
    grads = {k: torch.randn(v.shape, generator=gen).mul_(1e-3) for k, v in params.items()}  # no temporary
    return params, grads


def _alloc_peaks(key: str, width: int, steps: int) -> dict[str, float]:
    """Peaks of the bytes torch holds on the CPU, above what it held once the parameters and
    gradients existed, from ``torch.profiler.profile(profile_memory=True)``: its ``[memory]``
    events (+bytes allocated, -bytes freed) summed in time order. The profile starts before the
    parameters are built, so every block freed later was seen allocated (the profiler reports no
    free of a block allocated before it started). Returns the peak over the timed steps (state,
    buffers a kernel keeps between steps, the step's temporaries and new tensors), and over one
    step relative to what was live when it began (the step's own allocations)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        params, grads = _params_and_grads(width)
        with torch.profiler.record_function("base"):
            pass
        run = _PeakRun(key, params, grads)
        del params
        run.step()
        with torch.profiler.record_function("steps"):
            for _ in range(steps - 1):
                run.step()
            with torch.profiler.record_function("last step"):
                run.step()
        del run, grads
    events = prof.profiler.kineto_results.events()
    spans = {
        e.name(): (e.start_ns(), e.end_ns()) for e in events if e.name() in ("base", "steps", "last step")
    }
    memory = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live, at_base, at_last, steps_peak, last_peak = 0, None, None, 0, 0
    for t, nbytes in memory:
        if at_base is None and t >= spans["base"][0]:
            at_base = live
        if at_last is None and t >= spans["last step"][0]:
            at_last = live
        live += nbytes
        if spans["steps"][0] <= t <= spans["steps"][1]:
            steps_peak = max(steps_peak, live)
        if spans["last step"][0] <= t <= spans["last step"][1]:
            last_peak = max(last_peak, live)
    assert at_base is not None and at_last is not None
    return {
        "live_peak_mb": (steps_peak - at_base) / 2**20,
        "step_alloc_mb": (last_peak - at_last) / 2**20,
    }


def _mlp_params(width: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 10),
    )
    # detach() shares the storage: no copy is made and none is freed (freed blocks would be reused
    # by the optimizer state and hide it from the RSS).
    return {k: v.detach() for k, v in model.named_parameters()}


class _PeakRun:
    """One configuration's parameters, state and step; it owns the only references to them (a pure
    step's old parameters and state are freed once the new ones exist)."""

    def __init__(self, key: str, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]):
        self.grads = grads
        if key.startswith("torch"):
            ps = [torch.nn.Parameter(v) for v in params.values()]  # shares the storage
            for p, g in zip(ps, grads.values()):
                p.grad = g
            if key == "torch-foreach":
                opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, foreach=True)
            else:
                from torchao.optim import AdamW8bit, AdamWFp8

                cls = AdamW8bit if key == "torchao-8bit" else AdamWFp8
                opt = cls(ps, lr=1e-3, weight_decay=1e-2)
            self.opt = opt
            self.step = opt.step
            self.state_bytes = lambda: state_bytes(list(opt.state.values()))
            return
        fmt = FR_CONFIGS[key.removesuffix("-donated")]
        tx = fr.adamw(1e-3, weight_decay=1e-2)
        self.tx = fr.compress_state(tx, **fmt) if fmt else tx
        self.params = params
        self.state = self.tx.init(params)
        self.step = self._donated if key.endswith("-donated") else self._pure
        self.state_bytes = lambda: state_bytes(self.state)

    def _pure(self) -> None:
        u, self.state = self.tx.update(self.grads, self.state, self.params)
        self.params = fr.apply_updates(self.params, u)

    def _donated(self) -> None:
        self.params, self.state = fr.donated_update(self.tx, self.grads, self.state, self.params)


def peak_child(key: str, width: int, steps: int, rss_only: bool = False) -> dict[str, float | None]:
    """The measurements of one configuration (run in a fresh process by :func:`peak_table`):
    timed steps with the RSS read around them, then (unless ``rss_only``) the same run again under
    the profiler for :func:`_alloc_peaks`."""
    torch.set_num_threads(1)
    # A small model's run first: code that loads at the first step (torchao's compiler, the
    # inductor runtime) is then in the base RSS, not counted as the optimizer's memory.
    small = _mlp_params(128)
    warm = _PeakRun(key, small, {k: torch.zeros_like(v) for k, v in small.items()})
    del small
    for _ in range(2):
        warm.step()
    del warm
    params, grads = _params_and_grads(width)
    n_params = sum(v.numel() for v in params.values())
    gc.collect()
    base = _status_kib("VmRSS")
    # The peaks are read from VmHWM, reset here to the current RSS. Not from ru_maxrss: a process
    # started by fork and exec keeps in it the high-water mark of the memory it was forked from
    # (the kernel records it at exec, in signal->maxrss, which clear_refs does not reset), so
    # every child of this ~300 MB parent read >= 300 MB. ru_maxrss is the fallback where the
    # reset is not allowed (then valid only if this process's own peak exceeds the parent's).
    can_reset = _reset_hwm()
    run = _PeakRun(key, params, grads)
    del params  # the run holds them now
    init = _status_kib("VmRSS")
    run.step()  # warm-up: torch's lazy state, torchao's compilation for these shapes
    warmup_peak = _status_kib("VmHWM") if can_reset else _maxrss_kib()
    can_reset = can_reset and _reset_hwm()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run.step()
        times.append(time.perf_counter() - start)
    step_peak = _status_kib("VmHWM") if can_reset else _maxrss_kib()
    run_peak = max(warmup_peak, step_peak)
    held = _status_kib("VmRSS")
    out: dict[str, float | None] = {
        "params": n_params,
        "state_mb": run.state_bytes() / 2**20,
        "run_peak_mb": (run_peak - base) / 1024,
        "step_peak_mb": (step_peak - base) / 1024 if can_reset else None,
        "init_mb": (init - base) / 1024,
        "held_mb": (held - base) / 1024,
        "step_ms": 1e3 * statistics.median(times),
    }
    del run, grads
    gc.collect()
    if not rss_only:
        out.update(_alloc_peaks(key, width, min(steps, 2)))
    return out


MMAP_THRESHOLD = 1 << 20  # MALLOC_MMAP_THRESHOLD_ of the second run of each configuration


def _run_child(
    key: str, width: int, steps: int, env: dict[str, str], rss_only: bool = False
) -> dict[str, float | None]:
    cmd = [sys.executable, os.path.abspath(__file__), "--peak-child", key]
    cmd += ["--peak-width", str(width), "--peak-steps", str(steps)] + ["--peak-rss-only"] * rss_only
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"--peak-child {key} failed (exit status {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_table(width: int, steps: int, quick: bool = False) -> None:
    """Runs every configuration in fresh processes and prints the peak-memory table.

    Each runs twice: with glibc's malloc as it comes (the RSS a user sees; freed blocks stay in the
    heap for reuse, so it depends on the order of allocations), and with ``MALLOC_MMAP_THRESHOLD_``
    set to 1 MiB (every block over it mapped on its own and unmapped when freed: the RSS follows
    the live tensors, run to run). The step time is the first run's. ``quick``: no donated rows, no
    ``mmap`` run."""
    keys = [k for k in PEAK_CONFIGS if not (quick and k.endswith("-donated"))]
    if importlib.util.find_spec("torchao") is None:
        keys = [k for k in keys if not k.startswith("torchao")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["OMP_NUM_THREADS"] = "1"
    mmap_env = {**env, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    rows = {
        key: (
            _run_child(key, width, steps, env),
            None if quick else _run_child(key, width, 2, mmap_env, rss_only=True),
        )
        for key in keys
    }

    def step_peak(r: dict[str, float | None] | None) -> float | None:
        if r is None:
            return None
        return r["step_peak_mb"] if r["step_peak_mb"] is not None else r["run_peak_mb"]

    def ratio(x: float | None, y: float | None) -> str:
        return f"{'-':>6s}" if x is None or y is None else f"{x / y:5.2f}x"

    def mb(x: float | None, w: int) -> str:
        return f"{'-':>{w}s}" if x is None else f"{x:{w}.1f}"

    base, base_mmap = rows["adamw"]
    print()
    print(
        f"Peak memory of a step, {base['params'] / 1e6:.2f}M float32 parameters (MLP width {width}), "
        f"1 thread, a fresh process each, {steps} timed steps; MB above the RSS before the optimizer"
    )
    print(
        "live: peak of torch's CPU allocations over the timed steps (profiler); run: peak RSS over init, warm-up "
        "and steps; step: over the timed steps; mmap: the same with MALLOC_MMAP_THRESHOLD_=1MiB; "
        "ratios to fr.adamw (peak: mmap)"
    )
    print(
        f"{'variant':38s} {'state MB':>9s} {'live':>7s} {'run':>7s} {'step':>7s} {'mmap':>7s} "
        f"{'step ms':>8s} {'state':>6s} {'peak':>6s} {'time':>6s}"
    )
    for key, (r, m) in rows.items():
        print(
            f"{PEAK_CONFIGS[key]:38s} {r['state_mb']:9.2f} {mb(r['live_peak_mb'], 7)} "
            f"{mb(r['run_peak_mb'], 7)} {mb(r['step_peak_mb'], 7)} {mb(step_peak(m), 7)} "
            f"{r['step_ms']:8.1f} {r['state_mb'] / base['state_mb']:5.2f}x "
            f"{ratio(step_peak(m), step_peak(base_mmap))} {r['step_ms'] / base['step_ms']:5.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory table")
    parser.add_argument("--peak-only", action="store_true", help="the peak-memory table only")
    parser.add_argument("--peak-width", type=int, default=None, help="MLP width (default 2048, --quick 256)")
    parser.add_argument("--peak-steps", type=int, default=None, help="timed steps (default 10, --quick 2)")
    parser.add_argument("--peak-child", choices=list(PEAK_CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--peak-rss-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    width = args.peak_width or (256 if args.quick else 2048)
    steps = args.peak_steps or (2 if args.quick else 10)
    if args.peak_child:
        print(json.dumps(peak_child(args.peak_child, width, steps, args.peak_rss_only)))
        return
    if args.peak_only:
        peak_table(width, steps, args.quick)
        return
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
    if not args.no_peak:
        peak_table(width, steps, args.quick)


if __name__ == "__main__":
    main()
