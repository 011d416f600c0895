"""Helpers shared by the integration examples (Lightning, HF Trainer, accelerate, DDP, FSDP2).

Nothing here is funcreg: the command line (``--quick`` for CI, ``--timeout SECONDS`` after which the
process prints every thread's stack and exits), ``check(claim, ok, detail)``, which prints one line per
claim and raises ``AssertionError`` on the first false one, the largest absolute difference between
two sets of tensors (``DTensor`` shards gathered first), and the re-launch of a script under
``torch.distributed.run`` (torchrun) on 127.0.0.1 when it was started as a plain ``python`` process.

The examples import it as ``import _shared`` (Python puts the script's folder on ``sys.path``). Run
directly, it checks itself:

    python examples/integrations/_shared.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import logging
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

torch.set_num_threads(1)  # small ops are much slower with several threads on small machines


def parse_args(doc: str | None, timeout: float = 120.0) -> argparse.Namespace:
    """``--quick`` and ``--timeout``; arms the timeout (``faulthandler.dump_traceback_later``)."""
    first = (doc or "").strip().splitlines()[0] if doc and doc.strip() else None
    parser = argparse.ArgumentParser(description=first)
    parser.add_argument("--quick", action="store_true", help="a short run, a few seconds (CI runs this)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        metavar="SECONDS",
        help=f"print the stacks and exit with status 1 after this long (default {timeout:.0f})",
    )
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.timeout, exit=True)
    return args


def quiet() -> None:
    """Silences the frameworks' setup chatter (Lightning's banners, deprecation warnings)."""
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _rank() -> int | None:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


def check(claim: str, ok: bool, detail: str = "") -> None:
    """Prints ``[ok] claim (detail)``; raises ``AssertionError`` when ``ok`` is false.

    In a process group every rank checks, rank 0 prints what holds and any rank what fails.
    """
    rank = _rank()
    line = (
        (f"rank {rank}: " if rank is not None and not ok else "") + claim + (f" ({detail})" if detail else "")
    )
    if ok and rank:
        return
    print(f"[{'ok' if ok else 'FAILED'}] {line}", flush=True)
    if not ok:
        raise AssertionError(line)


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.nn.Module):
        return [p.detach() for p in x.parameters()]
    if isinstance(x, torch.Tensor):
        return [x.detach()]
    if isinstance(x, Mapping):
        return [t.detach() for t in x.values()]
    return [t.detach() for t in x]


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a ``DTensor``'s shards gathered (a collective: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def max_abs_diff(a: Any, b: Any) -> float:
    """The largest ``|a_i - b_i|`` over two modules, dicts, tensors or sequences of tensors (in order)."""
    xs, ys = _tensors(a), _tensors(b)
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} tensors against {len(ys)}")
    worst = 0.0
    for x, y in zip(xs, ys):
        x, y = full(x), full(y)
        if x.shape != y.shape:
            raise ValueError(f"shapes differ: {tuple(x.shape)} and {tuple(y.shape)}")
        worst = max(worst, (x.double() - y.double()).abs().max().item() if x.numel() else 0.0)
    return worst


def all_equal(a: Any, b: Any) -> bool:
    """Whether two sets of tensors (as :func:`max_abs_diff` takes them) are equal bit for bit."""
    xs, ys = _tensors(a), _tensors(b)
    return len(xs) == len(ys) and all(torch.equal(full(x), full(y)) for x, y in zip(xs, ys))


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relaunch_under_torchrun(script: str, nproc: int, argv: Sequence[str], timeout: float) -> None:
    """Runs ``python -m torch.distributed.run --nproc_per_node N ... script argv`` and exits with its status.

    For ``python script.py`` without torchrun (no ``RANK`` in the environment): the script starts
    itself again as ``nproc`` ranks on 127.0.0.1, one thread each, and this process only waits for
    them (at most ``timeout`` seconds; then it stops them and exits with status 1).
    """
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    command += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", script, *argv]
    print("$ " + " ".join(["python"] + command[1:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    faulthandler.cancel_dump_traceback_later()  # the ranks have their own; this one waits on them
    with subprocess.Popen(command, env=env) as proc:
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun stops its ranks
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            print(f"torchrun did not finish in {timeout:.0f} s", file=sys.stderr)
            code = 1
    raise SystemExit(code)


def rank_print(*values: Any) -> None:
    """``print`` on rank 0 only (and in a process without a process group)."""
    if not _rank():
        print(*values, flush=True)


def main() -> None:  # a self-check, so that running every file of the folder with --quick works
    parse_args(__doc__, timeout=30)
    a = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    b = {"w": torch.ones(2, 2), "b": torch.tensor([0.0, 1e-3])}
    check("max_abs_diff finds the largest difference", abs(max_abs_diff(a, b) - 1e-3) < 1e-9)
    check("all_equal tells equal from unequal tensors", all_equal(a, a) and not all_equal(a, b))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            check("a false claim", False, "expected")
    except AssertionError as err:
        raised = str(err)
    else:
        raised = ""
    check("a false claim raises AssertionError", raised == "a false claim (expected)", repr(raised))
    check("and is printed as FAILED", printed.getvalue().startswith("[FAILED] a false claim"))
    print("helpers OK; this module only holds helpers for the integration examples")


if __name__ == "__main__":
    main()
