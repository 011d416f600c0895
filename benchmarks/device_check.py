"""The device check: funcreg's fused / foreach paths on an accelerator, against torch.optim there.

Run it on a machine with a CUDA device (it exits 0 with a note where there is none, so CI may call
it anywhere). Two parts, in one process:

1. **Parity**: ten donated steps of ``fr.adam`` / ``fr.adamw`` (foreach and ``fused=True``) and
   ``fr.sgd`` (momentum, weight decay) on the device equal ``torch.optim.Adam`` / ``AdamW`` / ``SGD``
   with the same ``foreach`` / ``fused`` setting, to ``atol=1e-6, rtol=1e-5`` (float32; the kernels
   are torch's own, so most leaves agree to the bit). The chains with a penalty form folded in are
   checked against torch's step followed by the form written out (``softshrink`` for the proximal
   L1, a coupled / decoupled L2 through torch's ``weight_decay``).
2. **Timing**: the donated step of AdamW and of AdamW with each penalty form, beside
   ``torch.optim.AdamW(fused=True)``, on the MLP of ``adamw_step.py`` (2.11M parameters), each
   timed over ``--steps`` steps between two ``torch.cuda.synchronize()`` calls, round-robin over
   ``--rounds`` rounds; printed as ratios to torch's fused AdamW.

    python benchmarks/device_check.py            # 30 rounds of 20 steps
    python benchmarks/device_check.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import sys

import torch
from _machine import report, run
from adamw_step import make_model

import funcreg as fr

LR, WD, L1 = 1e-3, 1e-2, 1e-5


def _params(device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(device) for k, v in make_model(0).named_parameters()}


def _grads(params: dict[str, torch.Tensor], steps: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        {k: (torch.randn(v.shape, generator=gen) * 1e-2).to(v.device) for k, v in params.items()}
        for _ in range(steps)
    ]


def _funcreg_run(tx: fr.GradientTransformation, params: dict, grads: list[dict]) -> dict[str, torch.Tensor]:
    p = {k: v.clone() for k, v in params.items()}
    state = tx.init(p)
    for g in grads:
        p, state = fr.donated_update(tx, {k: v.clone() for k, v in g.items()}, state, p)
    return p


def _torch_run(make, params: dict, grads: list[dict], after=None) -> dict[str, torch.Tensor]:
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = make(list(p.values()))
    for g in grads:
        for k, v in p.items():
            v.grad = g[k].clone()
        opt.step()
        if after is not None:
            with torch.no_grad():
                for v in p.values():
                    after(v)
    return {k: v.detach() for k, v in p.items()}


def parity(device: torch.device) -> bool:
    """Each funcreg path against torch.optim on ``device``; prints one line per case."""
    params, grads = _params(device), _grads(_params(device), 10)
    shrink = lambda w: w.copy_(torch.nn.functional.softshrink(w, LR * L1))  # noqa: E731
    cases = []
    for fused in (False, True):
        kw = dict(fused=True) if fused else dict(foreach=True)
        tag = "fused" if fused else "foreach"
        cases += [
            (
                f"adam {tag}",
                fr.adam(LR, fused=fused),
                lambda ps, kw=kw: torch.optim.Adam(ps, lr=LR, **kw),
                None,
            ),
            (
                f"adamw {tag}",
                fr.adamw(LR, weight_decay=WD, fused=fused),
                lambda ps, kw=kw: torch.optim.AdamW(ps, lr=LR, weight_decay=WD, **kw),
                None,
            ),
            (
                f"adam {tag} + coupled l2",
                fr.chain(fr.add_penalty_grad(fr.l2(WD)), fr.adam(LR, fused=fused)),
                lambda ps, kw=kw: torch.optim.Adam(ps, lr=LR, weight_decay=WD, **kw),
                None,
            ),
            (
                f"adam {tag} + decoupled l2",
                fr.chain(fr.adam(LR, fused=fused), fr.decoupled(fr.l2(WD), learning_rate=LR)),
                lambda ps, kw=kw: torch.optim.AdamW(ps, lr=LR, weight_decay=WD, **kw),
                None,
            ),
            (
                f"adamw {tag} + proximal l1",
                fr.chain(
                    fr.adamw(LR, weight_decay=WD, fused=fused), fr.proximal(fr.l1(L1), learning_rate=LR)
                ),
                lambda ps, kw=kw: torch.optim.AdamW(ps, lr=LR, weight_decay=WD, **kw),
                shrink,
            ),
        ]
    cases.append(
        (
            "sgd momentum + weight decay",
            fr.sgd(0.1, momentum=0.9, weight_decay=WD),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=WD, foreach=True),
            None,
        )
    )
    ok = True
    for name, tx, make, after in cases:
        got, want = _funcreg_run(tx, params, grads), _torch_run(make, params, grads, after)
        worst = max(float((got[k] - want[k]).abs().max()) for k in want)
        bitwise = sum(torch.equal(got[k], want[k]) for k in want)
        close = all(torch.allclose(got[k], want[k], atol=1e-6, rtol=1e-5) for k in want)
        ok &= close
        print(
            f"  {'ok  ' if close else 'FAIL'} {name:<34} max |diff| {worst:.2e}, {bitwise}/{len(want)} leaves bitwise"
        )
    return ok


class _Steps:
    """``steps`` optimizer steps between two synchronizations: one timed sample."""

    def __init__(self, step, steps: int) -> None:
        self._step, self._steps = step, steps

    def step(self) -> None:
        torch.cuda.synchronize()
        for _ in range(self._steps):
            self._step()
        torch.cuda.synchronize()


def _funcreg_variant(tx: fr.GradientTransformation, params: dict, grads: dict, steps: int) -> _Steps:
    box = {"p": {k: v.clone() for k, v in params.items()}}
    box["s"] = tx.init(box["p"])

    def step() -> None:
        box["p"], box["s"] = fr.donated_update(tx, grads, box["s"], box["p"])

    return _Steps(step, steps)


def _torch_variant(make, params: dict, grads: dict, steps: int) -> _Steps:
    ps = [v.clone().requires_grad_(True) for v in params.values()]
    for p, g in zip(ps, grads.values()):
        p.grad = g.clone()
    opt = make(ps)
    return _Steps(opt.step, steps)


def timing(device: torch.device, rounds: int, steps: int) -> None:
    params = _params(device)
    grads = _grads(params, 1)[0]
    variants = {
        "torch AdamW fused": _torch_variant(
            lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD, fused=True), params, grads, steps
        ),
        "torch AdamW foreach": _torch_variant(
            lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD, foreach=True), params, grads, steps
        ),
    }
    for tag, fused in (("foreach", False), ("fused", True)):
        variants |= {
            f"fr.adamw {tag}": _funcreg_variant(
                fr.adamw(LR, weight_decay=WD, fused=fused), params, grads, steps
            ),
            f"fr.adam {tag} + coupled l2": _funcreg_variant(
                fr.chain(fr.add_penalty_grad(fr.l2(WD)), fr.adam(LR, fused=fused)), params, grads, steps
            ),
            f"fr.adam {tag} + decoupled l2": _funcreg_variant(
                fr.chain(fr.adam(LR, fused=fused), fr.decoupled(fr.l2(WD), learning_rate=LR)),
                params,
                grads,
                steps,
            ),
            f"fr.adamw {tag} + proximal l1": _funcreg_variant(
                fr.chain(
                    fr.adamw(LR, weight_decay=WD, fused=fused), fr.proximal(fr.l1(L1), learning_rate=LR)
                ),
                params,
                grads,
                steps,
            ),
        }
    times = run(variants, rounds, warmup=2)
    report(f"donated step x{steps} on {torch.cuda.get_device_name(device)}", times, "torch AdamW fused")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per timed sample")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 rounds of 2 steps")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 3, 2
    if not torch.cuda.is_available():
        print("device check: no CUDA device here, nothing to check (run it where one is lent)")
        return 0
    device = torch.device("cuda")
    print(
        f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, model: MLP 1024-1024-1024-10"
    )
    print("parity with torch.optim on the device (10 donated steps, float32):")
    ok = parity(device)
    timing(device, args.rounds, args.steps)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
