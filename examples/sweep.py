"""A weight-decay sweep as ONE vmapped run: coefficients x seeds trained together.

An MLP (64-128-10) on scikit-learn's digits, trained with AdamW on a small training set (400 images,
where regularization matters), for a grid of weight-decay coefficients (0 and five log-spaced values)
times several seeds. Every (coefficient, seed) pair is one member of a single ensemble:

* ``step = fr.make_step(loss, lambda h: fr.adamw(lr, weight_decay=h["wd"]))``: the transform is a
  factory of hyperparameters, which live in the train state, one value per member;
* ``fr.ensemble_step(step, batch="per_member")`` vmaps the step over members (each seed its own data
  order, the same for every coefficient);
* ``fr.init_members`` builds one initialisation per seed, and the grid reuses it for every
  coefficient, so the coefficients are compared from the same starting weights (paired seeds).

What it prints and why: test accuracy (mean +- std over seeds) and the final weight norm per
coefficient. ``fr.adamw``'s ``weight_decay`` is torch's AdamW convention, decoupled and multiplied by
the learning rate, ``w <- w * (1 - lr*wd)`` per step, so the useful range of ``wd`` depends on ``lr``
and on the number of steps (``lr*wd*steps`` is the total log-shrinkage without data): coefficients read
from another library (optax's default is 1e-4, torch's 1e-2) or from a paper with an lr-independent
decay are not interchangeable. Too little decay leaves the small-data model with large weights, too
much shrinks it into underfitting.

It then times a few steps of the vmapped run against the same members stepped one by one in a Python
loop, and checks they compute the same weights. The wall times are printed as measured on this machine,
nothing more.

The figure (``sweep.png``): test accuracy against the coefficient (error bars: std over seeds) and
the final weight norm.

With ``--distributed``, under ``torchrun``, the members are split across the processes: each rank
trains the members ``fr.distributed.sweep_members(n)`` gives it (round robin, a pure function of the
member index and the number of ranks) as one vmapped ensemble, and ``fr.distributed.gather_members``
brings the per-member results and the ``fr.History`` of the training metrics to rank 0, which prints
the same table as the single-process run (the vmapped-vs-sequential timing is left out there):

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 examples/sweep.py --distributed

    python examples/sweep.py [--quick] [--out DIR] [--epochs N] [--seeds N] [--distributed]
"""

from __future__ import annotations

import time

import _common
import torch
from torch.func import functional_call

import funcreg as fr

torch.set_num_threads(1)

LR, BATCH, TRAIN_SIZE = 3e-3, 50, 400
WDS = [0.0, 0.01, 0.0562, 0.316, 1.78, 10.0]  # 0 and logspace(-2, 1, 5)


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def _leave_group() -> None:
    """Every rank leaves the gloo group together: a rank that tears its group down while a peer
    still holds the connection can abort in gloo's destructor ("terminate called without an active
    exception"), so all ranks meet at a barrier first."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    def options(parser):  # noqa: ANN001, ANN202
        parser.add_argument("--epochs", type=int, default=150)
        parser.add_argument("--seeds", type=int, default=3)
        parser.add_argument(
            "--timing-steps", type=int, default=30, help="steps for the vmapped vs sequential timing"
        )
        parser.add_argument(
            "--distributed",
            action="store_true",
            help="split the members across torchrun's processes (torchrun --nproc_per_node 2 examples/sweep.py --distributed)",
        )

    args = _common.parse_args(__doc__, options)
    rank, world = 0, 1
    if args.distributed:
        import os

        import torch.distributed as dist

        if "RANK" not in os.environ:
            raise SystemExit(
                "--distributed runs under torchrun, which sets up the processes: "
                "torchrun --nproc_per_node 2 --master_addr 127.0.0.1 examples/sweep.py --distributed"
            )
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    wds, seeds, epochs, timing_steps = WDS, list(range(args.seeds)), args.epochs, args.timing_steps
    if args.quick:
        wds, seeds, epochs, timing_steps = [0.0, 1.0], [0, 1], 3, 3
    x_train, x_test, y_train, y_test = _common.load_digits_split(seed=0, train_size=TRAIN_SIZE)

    # Members: every coefficient x every seed; seed s has the same initial weights for all coefficients.
    per_seed, _, model = fr.init_members(make_model, seeds)
    seed_members = fr.unstack(per_seed)
    params0 = fr.stack([seed_members[i] for _ in wds for i in range(len(seeds))])
    member_wd = torch.tensor([wd for wd in wds for _ in seeds])
    member_seed = [s for _ in wds for s in seeds]

    def loss_fn(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    step = fr.make_step(loss_fn, lambda h: fr.adamw(LR, weight_decay=h["wd"]))
    ens = fr.ensemble_step(step, batch="per_member")
    n = len(member_seed)
    # this process's members: all of them, or with --distributed its round-robin share
    mine = fr.distributed.sweep_members(n)
    state = ens.init(fr.distributed.take_members(params0, mine), hparams={"wd": member_wd[mine]})
    batches = list(_common.member_batches(len(x_train), BATCH, member_seed, epochs))
    if rank == 0:
        where = (
            f" per process, split across {world} processes ({len(mine)} on rank 0)"
            if args.distributed
            else ""
        )
        print(
            f"{len(wds)} coefficients x {len(seeds)} seeds = {n} members in one vmapped run{where}; "
            f"{len(batches)} AdamW steps (lr {LR}, batch {BATCH}, {len(x_train)} training images)"
        )
    history = fr.History()
    start = time.perf_counter()
    for idx in _common.progress(batches, desc="sweep"):
        idx = idx[mine]
        state, metrics = ens(state, x_train[idx], y_train[idx])
        history.append(metrics)
    sweep_time = time.perf_counter() - start

    with torch.no_grad():
        logits = torch.func.vmap(lambda p: functional_call(model, p, (x_test,)))(state.params)
        train_logits = torch.func.vmap(lambda p: functional_call(model, p, (x_train,)))(state.params)
    results = {
        "test_acc": (logits.argmax(-1) == y_test).double().mean(dim=1),
        "train_acc": (train_logits.argmax(-1) == y_train).double().mean(dim=1),
        "norm": torch.tensor([fr.norms(m).total for m in fr.unstack(state.params)], dtype=torch.float64),
    }
    if args.distributed:  # every member's results, in member order, on rank 0
        results = fr.distributed.gather_members(results, n)
        history = fr.distributed.gather_members(history, n)
        if rank != 0:
            _leave_group()
            return
    test_acc = results["test_acc"].view(len(wds), len(seeds))
    train_acc = results["train_acc"].view(len(wds), len(seeds))
    norms = results["norm"].view(len(wds), len(seeds))
    final_loss = history["data_loss"][-1]
    rows = []
    for i, wd in enumerate(wds):
        std = test_acc[i].std().item() if len(seeds) > 1 else 0.0
        rows.append(
            {
                "weight_decay": wd,
                "lr*wd*steps": LR * wd * len(batches),
                "test acc": f"{test_acc[i].mean().item():.4f} +- {std:.4f}",
                "train acc": train_acc[i].mean().item(),
                "final ||w||": norms[i].mean().item(),
                "final data loss": final_loss.view(len(wds), len(seeds))[i].mean().item(),
            }
        )
    _common.print_table(
        rows,
        title=f"test accuracy vs weight decay (fr.adamw, mean +- std over {len(seeds)} seeds)",
        float_format=".4g",
    )
    best = max(range(len(wds)), key=lambda i: test_acc[i].mean().item())
    print(f"\nbest mean test accuracy at weight_decay={wds[best]:g}; the whole sweep took {sweep_time:.1f} s")

    # Timing: the vmapped run against the same members stepped one by one (a few steps only).
    if args.distributed:
        print("(--distributed: the vmapped-vs-sequential timing is left to the single-process run)")
        _leave_group()
    else:
        few = batches[:timing_steps]
        start = time.perf_counter()
        vstate = ens.init(params0, hparams={"wd": member_wd})
        for idx in few:
            vstate, _ = ens(vstate, x_train[idx], y_train[idx])
        vmapped_time = time.perf_counter() - start
        start = time.perf_counter()
        worst = 0.0
        for m, member_params in enumerate(
            _common.progress(fr.unstack(params0), desc="sequential", total=len(member_seed))
        ):
            s = step.init(member_params, hparams={"wd": member_wd[m].item()})
            for idx in few:
                s, _ = step(s, x_train[idx[m]], y_train[idx[m]])
            worst = max(worst, max((s.params[k] - vstate.params[k][m]).abs().max().item() for k in s.params))
        sequential_time = time.perf_counter() - start
        _common.print_table(
            [
                {
                    "run": f"one vmapped ensemble ({len(member_seed)} members)",
                    "steps": len(few),
                    "wall time (s)": vmapped_time,
                },
                {
                    "run": f"{len(member_seed)} members one after another",
                    "steps": len(few),
                    "wall time (s)": sequential_time,
                },
            ],
            title="wall time on this machine (1 thread)",
            float_format=".3f",
        )
        print(
            f"largest weight difference between the two: {worst:.2e} (float32; vmap batches the same arithmetic)"
        )

    # Figure.
    plt = _common.pyplot()
    fig, (ax, ax_norm) = plt.subplots(1, 2, figsize=(12, 4.5))
    # log axis: show wd = 0 at a position one decade left of the smallest positive value
    positive = [w for w in wds if w > 0]
    zero_at = min(positive) / 10 if positive else 1e-3
    xs = [w if w > 0 else zero_at for w in wds]
    mean, std = test_acc.mean(dim=1), (test_acc.std(dim=1) if len(seeds) > 1 else torch.zeros(len(wds)))
    ax.errorbar(xs, mean, yerr=std, marker="o", capsize=4, label="test")
    ax.plot(xs, train_acc.mean(dim=1), marker="s", linestyle="--", alpha=0.7, label="train")
    ax_norm.errorbar(
        xs,
        norms.mean(dim=1),
        yerr=norms.std(dim=1) if len(seeds) > 1 else None,
        marker="o",
        capsize=4,
        color="tab:green",
    )
    for a in (ax, ax_norm):
        a.set_xscale("log")
        a.set_xticks(xs)
        a.set_xticklabels(["0"] + [f"{w:g}" for w in positive] if wds[0] == 0 else [f"{w:g}" for w in wds])
        a.set_xlabel("weight_decay (fr.adamw: w <- w*(1 - lr*wd) per step)")
        a.grid(alpha=0.3)
    ax.set_ylabel(f"accuracy (mean ± std over {len(seeds)} seeds)")
    ax.set_title("accuracy vs weight decay")
    ax.legend()
    ax_norm.set_ylabel("||w|| after training (all parameters)")
    ax_norm.set_title("final weight norm")
    fig.suptitle(
        f"Sweep in one vmapped run: {len(wds)} coefficients x {len(seeds)} seeds, "
        f"AdamW lr {LR}, {len(batches)} steps, {len(x_train)} training digits"
    )
    fig.tight_layout()
    _common.save_figure(fig, args.out, "sweep.png")


if __name__ == "__main__":
    main()
