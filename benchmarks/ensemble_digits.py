"""Train N MLPs on scikit-learn's digits at once: funcreg's vmapped ensemble against the alternatives.

Every variant trains the same N members (an MLP 64-128-128-10, ReLU, cross-entropy; member i
initialised by ``torch.manual_seed(i)``) for the same steps on the same mini-batches (128 rows drawn
with a fixed generator from the standardized 1797x64 digits, one batch per step shared by all
members), with AdamW(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2) on every parameter:

* ``torch sequential``: the N models one after another, each an ``nn.Module`` with its own
  ``torch.optim.AdamW(foreach=True)`` and ordinary ``loss.backward()`` (what you would write today);
* ``funcreg eager``: ``fr.ensemble_step(fr.make_step(loss, fr.adamw(...)))``, one vmapped step for
  all members (the gradients under vmap, then AdamW's torch kernel once over the stacked tensors);
* ``funcreg eager donated``: the same with ``make_step(..., donate=True)``: the kernel writes into the
  state's tensors instead of copies;
* ``funcreg compiled``: ``torch.compile`` of that ensemble step call (compiled once before timing; the
  compile time is printed, not counted);
* ``funcreg compiled donated``: the same with ``make_step(..., donate=True)``: the compiled step
  writes the new parameters and AdamW state into its inputs (as ``donate_argnums`` does for JAX);
* ``jax``: the same MLP in JAX, ``jax.jit(jax.vmap(step))`` with ``optax.adamw``, started from the
  same initial weights; timed after a warm-up call, ending each timed run with
  ``.block_until_ready()``. Skipped when ``jax``/``optax`` cannot be imported.

Threads. torch runs with ``torch.set_num_threads(1)``. For JAX the script sets
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` before importing jax
(the usual recipe for single-threaded XLA on CPU), but jax 0.10's XLA:CPU runtime still spreads work
over several threads with it. So the process also pins itself to one CPU (``os.sched_setaffinity``)
before importing torch or jax, unless ``--no-pin``: then every variant has exactly one core. The
``cpu/wall`` column (process CPU time over wall time during the timed runs) shows it: above 1 means
more than one core was used.

Timing. All variants live in one process and their timed runs are interleaved: each round runs
every variant once, in a new random order, for ``--steps`` steps from the same initial state (reset
untimed before each run), so machine noise hits them all alike. The table gives the best and the
median run, model-steps per second (N * steps / best seconds) and throughput ratios to
``torch sequential`` and to ``jax``.

Memory. Peak RSS cannot be split between variants of one process, so each variant is also run once
more, alone, in a child process (``--child``) that reports its peak resident set (``VmHWM`` from
/proc/self/status; not ``ru_maxrss``, which Linux inherits from the parent across fork+exec) twice:
after importing and loading the data (the baseline) and after building, compiling and running the
variant. ``peak`` is the child's peak; ``per member`` is (peak - baseline) / N: parameters, optimizer
state, activations and, for the compiled variants (torch.compile, jax.jit), the compiler's own
working memory, which inflates their figure at small N.

    python benchmarks/ensemble_digits.py            # N = 16 and 64, 200 steps, 3 rounds (minutes)
    python benchmarks/ensemble_digits.py --quick    # smoke run: N = 4, 20 steps
    python benchmarks/ensemble_digits.py --no-compile --no-jax --no-memory   # eager variants only

Needs scikit-learn (the data) and optionally jax and optax: ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import os
import sys


def _early_setup() -> None:
    """Pin the process to one CPU and set XLA's flags: both must precede importing torch and jax."""
    if "--no-pin" not in sys.argv and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if "--cpu" in sys.argv:
            cpus = [int(sys.argv[sys.argv.index("--cpu") + 1])]
        os.sched_setaffinity(0, {cpus[0]})  # inherited by every thread created later, and by children
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = (
            flags + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ).strip()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # compile in this process, on this core


_early_setup()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _machine import cpu_model  # noqa: E402

import funcreg as fr  # noqa: E402

LR, WD, BETAS, EPS = 1e-3, 1e-2, (0.9, 0.999), 1e-8
BATCH = 128
SIZES = (64, 128, 128, 10)
REFERENCE, JAX = "torch sequential", "jax"
VARIANTS = (
    "torch sequential",
    "funcreg eager",
    "funcreg eager donated",
    "funcreg compiled",
    "funcreg compiled donated",
    "jax",
)


# --- machine and data ---------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process's own memory map.
    Not ``ru_maxrss``: the kernel folds the memory map a child had *before* ``exec`` (a copy of the
    parent's) into the child's ``ru_maxrss``, so a child of a big parent reports the parent's size.
    Elsewhere ``ru_maxrss`` (macOS reports bytes), which is only right for children of small parents.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def jax_or_reason() -> tuple[Any | None, str]:
    try:
        import jax
        import optax  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]
    return jax, f"jax {jax.__version__}, optax {optax.__version__}"


class Data:
    """Standardized digits and ``steps`` batches of row indices from a fixed generator."""

    def __init__(self, steps: int) -> None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = x.astype(np.float32)
        std = x.std(axis=0)
        x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)  # some border pixels are always 0
        self.x, self.y = x.astype(np.float32), y.astype(np.int64)
        gen = torch.Generator().manual_seed(0)
        self.index = torch.randint(0, len(x), (steps, BATCH), generator=gen).numpy()
        xt, yt = torch.from_numpy(self.x), torch.from_numpy(self.y)
        self.batches = [(xt[i].contiguous(), yt[i].contiguous()) for i in self.index]
        self.x_all, self.y_all = xt, yt


def make_model() -> torch.nn.Module:
    a, b, c, d = SIZES
    return torch.nn.Sequential(
        torch.nn.Linear(a, b), torch.nn.ReLU(), torch.nn.Linear(b, c), torch.nn.ReLU(), torch.nn.Linear(c, d)
    )


# --- variants -------------------------------------------------------------------------------------------
# Each has prepare() (untimed: warm-up, compilation), reset() (untimed: back to the initial weights),
# run() (timed: all steps for all members) and final_loss() (mean full-data loss over members).


class TorchSequential:
    def __init__(self, init: dict[str, torch.Tensor], data: Data) -> None:
        self.init, self.data = init, data
        self.n = fr.num_members(init)

    def reset(self) -> None:
        self.models, self.opts = [], []
        for i in range(self.n):
            model = make_model()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(self.init[name][i])
            self.models.append(model)
            self.opts.append(
                torch.optim.AdamW(
                    model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=True
                )
            )

    def run(self, steps: int | None = None) -> None:
        batches = self.data.batches[:steps]
        for model, opt in zip(self.models, self.opts):
            for x, y in batches:
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

    def prepare(self) -> None:
        self.reset()
        self.run(steps=3)

    def final_loss(self) -> float:
        with torch.no_grad():
            losses = [
                torch.nn.functional.cross_entropy(m(self.data.x_all), self.data.y_all) for m in self.models
            ]
        return float(torch.stack(losses).mean())


class FuncregEnsemble:
    def __init__(
        self, init: dict[str, torch.Tensor], data: Data, compiled: bool, donate: bool = False
    ) -> None:
        self.init, self.data = init, data
        self.model = make_model()

        def loss(params, x, y):
            return torch.nn.functional.cross_entropy(torch.func.functional_call(self.model, params, (x,)), y)

        self.loss = loss
        step = fr.make_step(loss, fr.adamw(LR, betas=BETAS, eps=EPS, weight_decay=WD), donate=donate)
        self.ens = fr.ensemble_step(step)
        self.call = torch.compile(self.ens) if compiled else self.ens
        self.compiled = compiled
        self.compile_seconds = 0.0
        self.graphs = ""

    def reset(self) -> None:
        self.state = self.ens.init({k: v.clone() for k, v in self.init.items()})

    def run(self, steps: int | None = None) -> None:
        state = self.state
        for x, y in self.data.batches[:steps]:
            state, _ = self.call(state, x, y)
        self.state = state

    def prepare(self) -> None:
        if self.compiled:
            from torch._dynamo.utils import counters

            counters.clear()
        self.reset()
        start = time.perf_counter()
        self.run(steps=3)  # compiles on the first call; 1 graph expected (more: recompilations)
        self.compile_seconds = time.perf_counter() - start
        if self.compiled:
            self.graphs = f"{counters['stats']['unique_graphs']} graph(s), {sum(counters['graph_break'].values())} graph break(s)"

    def final_loss(self) -> float:
        with torch.no_grad():
            losses = torch.func.vmap(self.loss, in_dims=(0, None, None))(
                self.state.params, self.data.x_all, self.data.y_all
            )
        return float(losses.mean())


class JaxEnsemble:
    def __init__(self, init: dict[str, torch.Tensor], data: Data) -> None:
        import jax
        import jax.numpy as jnp
        import optax

        self.jax, self.jnp = jax, jnp
        self.init = {k: v.numpy() for k, v in init.items()}  # torch layout: weight (out, in)
        self.data = data
        self.batches = [(jnp.asarray(data.x[i]), jnp.asarray(data.y[i])) for i in data.index]
        self.x_all, self.y_all = jnp.asarray(data.x), jnp.asarray(data.y)
        names = [f"{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")]

        def forward(p, x):
            h = jax.nn.relu(x @ p[names[0]].T + p[names[1]])
            h = jax.nn.relu(h @ p[names[2]].T + p[names[3]])
            return h @ p[names[4]].T + p[names[5]]

        def loss(p, x, y):
            return optax.softmax_cross_entropy_with_integer_labels(forward(p, x), y).mean()

        opt = optax.adamw(
            LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD
        )  # decays every leaf, as torch

        def step(p, s, x, y):
            value, grads = jax.value_and_grad(loss)(p, x, y)
            updates, s = opt.update(grads, s, p)
            return optax.apply_updates(p, updates), s, value

        self.step = jax.jit(jax.vmap(step, in_axes=(0, 0, None, None)))
        self.opt_init = jax.jit(jax.vmap(opt.init))
        self.losses = jax.jit(jax.vmap(loss, in_axes=(0, None, None)))
        self.compile_seconds = 0.0

    def reset(self) -> None:
        self.params = {k: self.jnp.asarray(v) for k, v in self.init.items()}
        self.opt_state = self.opt_init(self.params)
        self.jax.block_until_ready((self.params, self.opt_state))

    def run(self, steps: int | None = None) -> None:
        p, s = self.params, self.opt_state
        for x, y in self.batches[:steps]:
            p, s, _ = self.step(p, s, x, y)
        self.params, self.opt_state = self.jax.block_until_ready((p, s))

    def prepare(self) -> None:
        self.reset()
        start = time.perf_counter()
        self.run(steps=3)  # traces and compiles on the first call
        self.compile_seconds = time.perf_counter() - start

    def final_loss(self) -> float:
        return float(self.losses(self.params, self.x_all, self.y_all).mean())


def build(name: str, init: dict[str, torch.Tensor], data: Data) -> Any:
    if name == "torch sequential":
        return TorchSequential(init, data)
    if name == "funcreg eager":
        return FuncregEnsemble(init, data, compiled=False)
    if name == "funcreg eager donated":
        return FuncregEnsemble(init, data, compiled=False, donate=True)
    if name == "funcreg compiled":
        return FuncregEnsemble(init, data, compiled=True)
    if name == "funcreg compiled donated":
        return FuncregEnsemble(init, data, compiled=True, donate=True)
    if name == "jax":
        return JaxEnsemble(init, data)
    raise ValueError(f"unknown variant {name!r}")


def members(n: int) -> dict[str, torch.Tensor]:
    params, _, _ = fr.init_members(make_model, seeds=range(n))
    return params


# --- memory: one child process per variant ---------------------------------------------------------------


def child(name: str, n: int, steps: int) -> None:
    """Run one variant alone and print its peak RSS as one JSON line."""
    torch.set_num_threads(1)
    data = Data(steps)
    if name == "jax":
        import jax  # noqa: F401  (in the baseline, like torch)
    init = members(n)
    baseline = peak_rss_mb()
    variant = build(name, init, data)
    variant.prepare()
    variant.reset()
    variant.run()
    print(
        "RESULT "
        + json.dumps({"baseline_mb": baseline, "peak_mb": peak_rss_mb(), "loss": variant.final_loss()})
    )


def measure_memory(name: str, n: int, steps: int) -> dict[str, float] | None:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        name,
        "--members",
        str(n),
        "--steps",
        str(steps),
        "--no-pin",
    ]
    # --no-pin: the child inherits this process's CPU affinity already
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    print(f"  memory child for {name!r} (N={n}) failed (exit {proc.returncode}): {' | '.join(tail)}")
    return None


# --- main ----------------------------------------------------------------------------------------------


def time_variants(variants: dict[str, Any], rounds: int, rng: random.Random) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            v = variants[name]
            v.reset()
            t0, c0 = time.perf_counter(), time.process_time()
            v.run()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {
        name: {
            "best": min(ts),
            "median": statistics.median(ts),
            "cpu_wall": sum(cpu[name]) / sum(ts),
            "loss": variants[name].final_loss(),
        }
        for name, ts in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--members", type=int, nargs="+", default=[16, 64], help="ensemble sizes N (default 16 64)"
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps per timed run (default 200)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="timed runs per variant, interleaved (default 3)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: N = 4, 20 steps, 2 rounds")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--no-jax", action="store_true", help="skip the JAX variant")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the process to one CPU")
    parser.add_argument(
        "--cpu", type=int, default=None, help="the CPU to pin to (default: the first allowed)"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.members, args.steps, args.rounds = [4], 20, 2
    torch.set_num_threads(1)
    if args.child is not None:
        child(args.child, args.members[0], args.steps)
        return

    jax, jax_info = (None, "skipped (--no-jax)") if args.no_jax else jax_or_reason()
    names = [
        n for n in VARIANTS if not ("compiled" in n and args.no_compile) and not (n == "jax" and jax is None)
    ]
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "n/a"
    print(f"date:     {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"machine:  {cpu_model()} ({os.cpu_count()} CPUs; {platform.machine()}, {platform.system()} {platform.release()})"
    )
    print(
        f"python:   {platform.python_version()}, torch {torch.__version__}, funcreg {fr.__version__}, {jax_info}"
    )
    print(
        f"threads:  torch.get_num_threads() = {torch.get_num_threads()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    print(f"pinned:   CPU affinity {affinity}" + (" (--no-pin)" if args.no_pin else ""))
    n_params = sum(p.numel() for p in make_model().parameters())
    print(
        f"model:    MLP {'-'.join(map(str, SIZES))} ({n_params:,} float32 parameters per member), AdamW lr={LR} wd={WD}"
    )
    print(
        f"data:     sklearn digits, standardized, batch {BATCH}, {args.steps} steps (the same batches for every variant)"
    )
    print(f"timing:   {args.rounds} interleaved runs of {args.steps} steps per variant; best and median")
    print(f"command:  python {' '.join(sys.argv)}")
    warnings.filterwarnings("ignore", message="Dynamo does not know how to trace")

    data = Data(args.steps)
    rng = random.Random(0)
    extra_mb: dict[str, dict[int, float]] = {}  # variant -> N -> peak - baseline
    for n in args.members:
        print(f"\n=== N = {n} members ===")
        init = members(n)
        variants: dict[str, Any] = {}
        for name in names:
            try:
                v = build(name, init, data)
                v.prepare()
                variants[name] = v
            except Exception as exc:  # report why and go on with the others
                print(
                    f"{name}: failed to build/compile, skipped: {type(exc).__name__}: {exc}".splitlines()[0]
                )
                traceback.print_exc(limit=3)
                continue
            if name.startswith("funcreg compiled"):
                print(
                    f"torch.compile ({name}): first 3 steps (compilation) took {v.compile_seconds:.1f} s; {v.graphs}"
                )
            if name == "jax":
                print(f"jax.jit: first 3 steps (compilation) took {v.compile_seconds:.1f} s")
        results = time_variants(variants, args.rounds, rng)
        memory = {}
        if not args.no_memory:
            for name in variants:
                memory[name] = measure_memory(name, n, args.steps)

        ref = results.get(REFERENCE)
        jx = results.get(JAX)
        print(
            f"{'variant':<18} {'best s':>8} {'median s':>9} {'model-steps/s':>14} {'vs torch seq':>13} {'vs jax':>7}"
            f" {'cpu/wall':>9} {'final loss':>11} {'peak MB':>8} {'MB/member':>10}"
        )
        for name, r in results.items():
            rate = n * args.steps / r["best"]
            vs_ref = f"{ref['best'] / r['best']:.2f}x" if ref else "-"
            vs_jax = f"{jx['best'] / r['best']:.2f}x" if jx else "-"
            mem = memory.get(name)
            peak = f"{mem['peak_mb']:.0f}" if mem else "-"
            per = f"{(mem['peak_mb'] - mem['baseline_mb']) / n:.2f}" if mem else "-"
            if mem:
                extra_mb.setdefault(name, {})[n] = mem["peak_mb"] - mem["baseline_mb"]
            print(
                f"{name:<18} {r['best']:>8.3f} {r['median']:>9.3f} {rate:>14,.0f} {vs_ref:>13} {vs_jax:>7}"
                f" {r['cpu_wall']:>9.2f} {r['loss']:>11.5f} {peak:>8} {per:>10}"
            )
    print(
        "\nvs torch seq / vs jax: throughput relative to that variant (above 1: faster). final loss: mean"
        " full-data cross-entropy over the members after the last timed run (same start, same batches:"
        " the torch and funcreg variants agree to float32 rounding; JAX to its own rounding). cpu/wall:"
        " CPU time over wall time while timed (above 1: more than one core; well below 1: the machine"
        " was busy, so the timings are noisy). peak MB: peak RSS (VmHWM) of a child process that ran"
        " only that variant; MB/member: (peak - the child's baseline after imports and data) / N,"
        " one-time costs and compiler working memory included (so large at small N; with two or more"
        " N the marginal cost per member is printed below)."
    )
    marginal = {name: by_n for name, by_n in extra_mb.items() if len(by_n) >= 2}
    if marginal:
        # MB/member above includes one-time costs (allocator pools, library workspaces, compilers);
        # the slope between the smallest and the largest N is what one more member costs.
        print("\nmarginal memory per member, (extra(N_max) - extra(N_min)) / (N_max - N_min):")
        for name, by_n in marginal.items():
            lo, hi = min(by_n), max(by_n)
            print(f"  {name:<18} {(by_n[hi] - by_n[lo]) / (hi - lo):8.3f} MB  (N = {lo} -> {hi})")
    if jax is None and not args.no_jax:
        print(f"jax: skipped ({jax_info}); pip install jax optax")


if __name__ == "__main__":
    main()
