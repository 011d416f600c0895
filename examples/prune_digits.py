"""Group lasso, then structured pruning: a smaller CNN with the same predictions on digits.

A small CNN on scikit-learn's digits (8x8 images, 10 classes),
``Conv(16)-ReLU-Conv(32)-ReLU-MaxPool-Flatten-Linear(64)-ReLU-Linear(10)``, trained with SGD and
momentum, twice from the same initial weights as one vmapped run of two members (``fr.ensemble_step``):

* ``coeff = 0``: no penalty;
* ``coeff = C``: group lasso in the proximal form on the filters of both convolutions and the rows of
  the hidden Linear layer, ``fr.group_lasso(h["coeff"], axis=0, mask=...)``: one group per output unit,
  whose prox zeroes whole filters and rows exactly.

Then ``fr.prune(model, params)`` removes what the zeros make removable and ``fr.prune_report``
measures the result. The rule is exact: a unit goes when its filter or row is zero (it then outputs
``relu(bias)``, a constant, folded into the next layer's bias) or when the next layer ignores it; the
convolutions here have no padding, so a constant channel folds into the next convolution's bias
exactly (with zero padding the border outputs would see fewer copies of it, and such a unit is kept).
The block of ``Flatten`` features of each removed channel goes with it.

With BatchNorm after a convolution, the filter's scale does not reach the output (BatchNorm divides it
out), so group lasso on the filter fights no data loss and shrinks it with a growing gradient instead
of zeroing it cleanly; penalize the BatchNorm weights instead (``fr.l1`` on them, proximal: "network
slimming"), which ``fr.prune`` understands too: a zero BatchNorm weight makes its channel a constant.

What it prints and why:

* per member: test accuracy of the trained model and of its pruned copy (the same: their predictions
  agree on every test image, and their logits differ by float32 rounding), the parameter count,
  FLOPs per image (2 x multiply-accumulates of the Conv/Linear layers) and the measured forward time
  on the test set before and after. Without the penalty nothing is removable: no group is exactly zero;
* the per-layer table of units (filters, features) before and after, from ``fr.prune_report``.

The figure (``prune_digits.png``): units per layer before and after pruning, and the number of all-zero
groups per layer during training with group lasso.

    python examples/prune_digits.py [--quick] [--out DIR] [--epochs N] [--coeff C]
"""

from __future__ import annotations

from collections import OrderedDict

import _common
import torch
from torch.func import functional_call

import funcreg as fr

torch.set_num_threads(1)

LR, MOMENTUM, BATCH = 0.03, 0.9, 64
COEFF = 6e-3  # group lasso: coeff * sqrt(group size) * ||w_g|| per filter or row
QUICK_EPOCHS, QUICK_COEFF = 6, 2e-2  # --quick: fewer steps, so a larger coefficient to reach zeros in them
GROUPED = ("conv1.weight", "conv2.weight", "fc1.weight")


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        OrderedDict(
            conv1=torch.nn.Conv2d(1, 16, 3),  # 8x8 -> 6x6 (no padding: constants fold exactly)
            relu1=torch.nn.ReLU(),
            conv2=torch.nn.Conv2d(16, 32, 3),  # 6x6 -> 4x4
            relu2=torch.nn.ReLU(),
            pool=torch.nn.MaxPool2d(2),  # 4x4 -> 2x2
            flatten=torch.nn.Flatten(),  # channel c -> features 4c .. 4c+3
            fc1=torch.nn.Linear(32 * 2 * 2, 64),
            relu3=torch.nn.ReLU(),
            fc2=torch.nn.Linear(64, 10),
        )  # fmt: skip
    )


def zero_groups(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All-zero groups (filters, rows) per grouped layer, one count per member."""
    return {k: (params[k].flatten(2).abs().amax(dim=2) == 0).sum(dim=1) for k in GROUPED}


def main() -> None:
    def options(parser):  # noqa: ANN001, ANN202
        parser.add_argument("--epochs", type=int, default=30)
        parser.add_argument(
            "--coeff", type=float, default=None, help=f"default {COEFF:g} ({QUICK_COEFF:g} with --quick)"
        )
        parser.add_argument("--seed", type=int, default=0)

    args = _common.parse_args(__doc__, options)
    epochs = QUICK_EPOCHS if args.quick else args.epochs
    coeffs = [0.0, args.coeff if args.coeff is not None else (QUICK_COEFF if args.quick else COEFF)]
    x_train, x_test, y_train, y_test = _common.load_digits_split(seed=0, images=True)
    seed_params, _, model = fr.init_members(make_model, [args.seed])
    params0 = fr.stack(fr.unstack(seed_params) * 2)  # both members start from the same weights

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    mask = {k: k in GROUPED for k in fr.params_of(model)}
    group_lasso = lambda h: fr.group_lasso(h["coeff"], axis=0, mask=mask)  # noqa: E731
    step = fr.make_step(
        loss_fn, fr.sgd(LR, momentum=MOMENTUM), penalty=group_lasso, form="proximal", learning_rate=LR,
    )  # fmt: skip
    ens = fr.ensemble_step(step, batch="per_member")
    state = ens.init(params0, hparams={"coeff": torch.tensor(coeffs)})
    batches = list(_common.member_batches(len(x_train), BATCH, [args.seed, args.seed], epochs))
    print(
        f"CNN with {sum(v[0].numel() for v in seed_params.values())} parameters; "
        f"2 members (coeff {coeffs}) in one "
        f"vmapped run, {len(batches)} proximal SGD steps (lr {LR}, momentum {MOMENTUM}, batch {BATCH})"
    )
    history = []
    for t, idx in enumerate(_common.progress(batches, desc="training")):
        state, _ = ens(state, x_train[idx], y_train[idx])
        if t % 10 == 0 or t == len(batches) - 1:
            history.append((t, {k: v[1].item() for k, v in zero_groups(state.params).items()}))

    rows, reports = [], []
    for m, params in enumerate(fr.unstack(state.params)):
        with torch.no_grad():
            logits = functional_call(model, params, (x_test,))
        pruned = fr.prune(model, params)
        with torch.no_grad():
            pruned_logits = pruned(x_test)
        report = fr.prune_report(model, pruned, x_test, params, repeats=5 if args.quick else 30)
        reports.append(report)
        agree = (logits.argmax(1) == pruned_logits.argmax(1)).float().mean().item()
        rows.append(
            {
                "member": f"coeff={coeffs[m]:g}",
                "test acc": (logits.argmax(1) == y_test).float().mean().item(),
                "pruned test acc": (pruned_logits.argmax(1) == y_test).float().mean().item(),
                "same predictions": agree,
                "max |logit diff|": f"{report.max_abs_diff:.1e}",
                "params": f"{report.params_before} -> {report.params_after}",
                "FLOPs/image": f"{report.flops_before} -> {report.flops_after}",
                "forward (ms, test set)": f"{1e3 * report.seconds_before:.2f} -> "
                f"{1e3 * report.seconds_after:.2f}",
            }
        )
    _common.print_table(rows, title="trained vs pruned (float32)", float_format=".4f")
    print(f"\nper-layer sizes with group lasso (coeff={coeffs[1]:g}), from fr.prune_report:\n{reports[1]}")
    print(
        "\nThe pruned CNN is an ordinary nn.Sequential: torch.save(pruned, ...) "
        "or export it as any other model."
    )

    # Figure: units per layer before/after, and zero groups during training.
    plt = _common.pyplot()
    fig, (ax, ax_hist) = plt.subplots(1, 2, figsize=(12, 4.5))
    layers = [s for s in reports[1].layers if s.kind in ("Conv2d", "Linear")]
    xs = range(len(layers))
    ax.bar([i - 0.2 for i in xs], [s.units_before for s in layers], width=0.4, label="before")
    ax.bar([i + 0.2 for i in xs], [s.units_after for s in layers], width=0.4, label="after fr.prune")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{s.name}\n({s.kind})" for s in layers])
    ax.set_ylabel("output units / filters")
    ax.set_title(
        f"group lasso (coeff={coeffs[1]:g}), then fr.prune: "
        f"params {reports[1].param_ratio:.0%}, FLOPs {reports[1].flop_ratio:.0%}"
    )
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    for k in GROUPED:
        ax_hist.plot([t for t, _ in history], [h[k] for _, h in history], label=k)
    ax_hist.set_xlabel("step")
    ax_hist.set_ylabel("all-zero groups (filters / rows)")
    ax_hist.set_title("exact zeros during proximal training")
    ax_hist.legend()
    ax_hist.grid(alpha=0.3)
    fig.tight_layout()
    _common.save_figure(fig, args.out, "prune_digits.png")


if __name__ == "__main__":
    main()
