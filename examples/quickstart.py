"""Quickstart: one penalty in all four forms, on an MLP for scikit-learn's digits.

One penalty object, ``P = fr.l1(C_L1, mask=<first layer>) + fr.l2(C_L2, mask=<output layer>)`` (L1 on
the first layer's weights, squared L2 on the output layer's weights, biases left alone), applied in the
four places funcreg names, each a ``form=`` of ``fr.make_step``:

========== ================================================ ==========================================
form       what the step does                               funcreg
========== ================================================ ==========================================
loss       autograd of ``data_loss + P(w)``                 ``fr.penalized(loss_fn, P)``
coupled    ``g <- g + grad P(w)``, then the optimizer       ``fr.chain(fr.add_penalty_grad(P), tx)``
decoupled  the optimizer, then ``u <- u - lr * grad P(w)``  ``fr.chain(tx, fr.decoupled(P, lr))``
proximal   the optimizer, then ``w <- prox_{lr P}(w + u)``  ``fr.chain(tx, fr.proximal(P, lr))``
========== ================================================ ==========================================

The same MLP (64-64-10, the same initial weights) is trained in each form with SGD with momentum, on
the same mini-batches, in float64. The script prints:

1. which parameters the penalty's terms touch, and the usual weight-decay selection
   (``fr.decay_mask``) for comparison;
2. the forms that must agree, agreeing: the loss term and the coupled edit give the optimizer the same
   gradient (max parameter difference after training ~1e-15 or exactly 0); with plain SGD (no momentum)
   the decoupled update equals them too, while with momentum it does not: the momentum buffer
   accumulates the coupled penalty gradient (up to 10x with momentum 0.9), the decoupled update is
   applied once per step, so the same coefficient regularizes less in the decoupled form;
3. the metrics of every form, per epoch: ``data_loss``, ``penalty/l1``, ``penalty/l2`` and ``total``
   (the gradient-edit forms report the penalty too, computed without autograd);
4. test accuracy and exact-zero sparsity (``fr.sparsity``) per form: only the proximal form
   (soft-thresholding) gives exact zeros; the L1 subgradient ``c * sign(w)`` of the other forms makes
   weights hover around zero without reaching it. Border pixels of the digits are constant, so the
   data never needs their weights: the proximal form cuts them off entirely.

The figure (``quickstart.png``): total loss per epoch, exact zeros per layer and form, and which input
pixels the proximal form disconnected.

    python examples/quickstart.py            # 20 epochs, well under a minute
    python examples/quickstart.py --quick    # 2 epochs, a few seconds (CI)
"""

from __future__ import annotations

from collections import OrderedDict

import _common
import torch
from torch.func import functional_call

import funcreg as fr

torch.set_num_threads(1)

LR, MOMENTUM, BATCH = 0.05, 0.9, 64
C_L1, C_L2 = 1e-2, 1e-2  # L1 on the first layer's weights, squared L2 (c/2 ||w||^2) on the output layer's
FORMS = ("loss", "coupled", "decoupled", "proximal")
TOLERANCE = 1e-12  # float64: the forms that must agree differ by rounding at most


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        OrderedDict(hidden=torch.nn.Linear(64, 64), relu=torch.nn.ReLU(), out=torch.nn.Linear(64, 10))
    ).double()


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def main() -> None:
    def options(parser):  # noqa: ANN001, ANN202
        parser.add_argument("--epochs", type=int, default=20)
        parser.add_argument("--seed", type=int, default=0)

    args = _common.parse_args(__doc__, options)
    epochs = 2 if args.quick else args.epochs
    x_train, x_test, y_train, y_test = _common.load_digits_split(seed=args.seed, dtype=torch.float64)
    torch.manual_seed(args.seed)
    model = make_model()
    params0 = fr.params_of(model)

    # One penalty, two named terms on different parameters (so it has a proximal map: each term's own).
    P = fr.l1(C_L1, mask=fr.by_name("hidden.weight")) + fr.l2(C_L2, mask=fr.by_name("out.weight"))
    print(f"penalty: {P.name} = {C_L1:g} * sum|w| on hidden.weight + {C_L2:g}/2 * ||w||^2 on out.weight")
    print("\nWhat each term touches, next to the usual weight-decay rule (fr.decay_mask):")
    mask = fr.decay_mask(model)
    l1_terms, l2_terms = fr.by_name("hidden.weight")(model), fr.by_name("out.weight")(model)
    _common.print_table(
        [
            {
                "name": name,
                "shape": "x".join(map(str, w.shape)),
                "l1 term": "yes" if l1_terms[name] else "no",
                "l2 term": "yes" if l2_terms[name] else "no",
                "decay_mask": f"{'yes' if mask[name] else 'no'} ({mask.reason(name)})",
            }
            for name, w in params0.items()
        ]
    )

    def loss_fn(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    def accuracy(params: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            return (functional_call(model, params, (x_test,)).argmax(1) == y_test).double().mean().item()

    # The same batches for every run: each epoch a fixed permutation.
    generator = torch.Generator().manual_seed(args.seed)
    batches = [
        order[i : i + BATCH]
        for _ in range(epochs)
        for order in [torch.randperm(len(x_train), generator=generator)]
        for i in range(0, len(x_train), BATCH)
    ]
    per_epoch = len(batches) // epochs

    def train(
        tx: fr.GradientTransformation, form: str, desc: str
    ) -> tuple[dict[str, torch.Tensor], fr.History]:
        step = fr.make_step(loss_fn, tx, penalty=P, form=form, learning_rate=LR)
        state, history = step.init(params0), fr.History()
        for idx in _common.progress(batches, desc=desc):
            state, metrics = step(state, x_train[idx], y_train[idx])
            history.append(metrics)
        return state.params, history

    print(
        f"\nTraining {len(FORMS)} forms with SGD(lr={LR}, momentum={MOMENTUM}), {epochs} epochs of "
        f"{per_epoch} batches of {BATCH}, float64, same initial weights and batches"
    )
    sgd_momentum = fr.sgd(LR, momentum=MOMENTUM)
    results = {form: train(sgd_momentum, form, form) for form in FORMS}
    params = {form: p for form, (p, _) in results.items()}

    # The forms that must agree, and the one that need not.
    print("\nThe forms that must agree, and one that need not (max |parameter difference| after training):")
    loss_vs_coupled = max_abs_diff(params["loss"], params["coupled"])
    momentum_gap = max_abs_diff(params["coupled"], params["decoupled"])
    print(f"  loss term vs coupled edit, SGD with momentum:            {loss_vs_coupled:.2e}   (must be ~0)")
    print(
        f"  coupled vs decoupled (s_t = lr), SGD with momentum:      {momentum_gap:.2e}   (differ: momentum)"
    )
    sgd_plain = fr.sgd(LR)
    coupled_plain, _ = train(sgd_plain, "coupled", "plain SGD, coupled")
    decoupled_plain, _ = train(sgd_plain, "decoupled", "plain SGD, decoupled")
    plain_gap = max_abs_diff(coupled_plain, decoupled_plain)
    print(f"  coupled vs decoupled (s_t = lr), plain SGD, no momentum: {plain_gap:.2e}   (must be ~0)")
    print(
        f"  With momentum the buffer accumulates the coupled penalty gradient (up to 1/(1 - {MOMENTUM}) = "
        f"{1 / (1 - MOMENTUM):.0f}x in steady state); the decoupled and proximal forms apply it once per step."
    )

    # Per-term metrics over epochs: every form reports them (means over each epoch's steps).
    rows = []
    stride = max(1, epochs // 4)
    shown = sorted({0, *range(stride - 1, epochs, stride), epochs - 1})  # a few epochs, first and last
    for form, (_, history) in results.items():
        for epoch in shown:
            rows.append(
                {
                    "form": form,
                    "epoch": epoch + 1,
                    **{
                        key: history[key][epoch * per_epoch : (epoch + 1) * per_epoch].mean().item()
                        for key in ("data_loss", "penalty/l1", "penalty/l2", "total")
                    },
                }
            )
    _common.print_table(
        rows, title="Per-term metrics, mean over each epoch's steps (fr.History)", float_format=".4f"
    )

    # Accuracy and sparsity per form.
    reports = {form: fr.sparsity(p) for form, p in params.items()}
    dead_pixels = {form: int((p["hidden.weight"] == 0).all(dim=0).sum()) for form, p in params.items()}
    _common.print_table(
        [
            {
                "form": form,
                "test acc": accuracy(params[form]),
                "zeros in hidden.weight (l1)": reports[form]["hidden.weight"],
                "zeros in out.weight (l2)": reports[form]["out.weight"],
                "zeros overall": reports[form].overall,
                "pixels cut off (of 64)": dead_pixels[form],
            }
            for form in FORMS
        ],
        title="Test accuracy and exact zeros (fraction of entries == 0, fr.sparsity)",
        float_format=".4f",
    )
    print("\nfr.sparsity of the proximal form's parameters:")
    print(reports["proximal"])
    print(
        "\nOnly the proximal step (soft-thresholding, sign(v) * max(|v| - lr*c, 0)) lands on exact zeros; the "
        "subgradient c*sign(w) of the other forms makes small weights hover around 0. The L2 term never "
        "zeroes anything."
    )

    # Figure.
    plt = _common.pyplot()
    fig, (ax_loss, ax_bar, ax_img) = plt.subplots(
        1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.2, 1.2, 0.8]}
    )
    for form, (_, history) in results.items():
        totals = history["total"].view(epochs, per_epoch).mean(dim=1)
        ax_loss.plot(range(1, epochs + 1), totals, marker="o", markersize=3, label=form)
    ax_loss.set_xlabel("epoch")
    ax_loss.xaxis.get_major_locator().set_params(integer=True)
    ax_loss.set_ylabel("total = data_loss + P (epoch mean)")
    ax_loss.set_title("total loss per form (loss and coupled coincide)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    layers = ("hidden.weight", "out.weight")
    width = 0.8 / len(FORMS)
    for i, form in enumerate(FORMS):
        xs = [j + (i - (len(FORMS) - 1) / 2) * width for j in range(len(layers))]
        bars = ax_bar.bar(xs, [reports[form][layer] for layer in layers], width=width, label=form)
        ax_bar.bar_label(bars, fmt="%.2f", fontsize=8)
    ax_bar.set_xticks(range(len(layers)))
    ax_bar.set_xticklabels(["hidden.weight (L1)", "out.weight (L2)"])
    ax_bar.set_ylabel("fraction of exact zeros")
    ax_bar.set_title("exact zeros per layer and form")
    ax_bar.legend()
    ax_bar.grid(axis="y", alpha=0.3)
    zero_fraction = (params["proximal"]["hidden.weight"] == 0).double().mean(dim=0).view(8, 8)
    image = ax_img.imshow(zero_fraction, cmap="viridis", vmin=0, vmax=1)
    ax_img.set_title("proximal: share of zero weights\nleaving each input pixel")
    ax_img.set_xticks([])
    ax_img.set_yticks([])
    fig.colorbar(image, ax=ax_img, fraction=0.046)
    fig.suptitle(f"{P.name} in four forms, SGD(lr={LR}, momentum={MOMENTUM}), {epochs} epochs on digits")
    fig.tight_layout()
    _common.save_figure(fig, args.out, "quickstart.png")

    failures = []
    if not loss_vs_coupled <= TOLERANCE:
        failures.append(f"loss term vs coupled edit differ by {loss_vs_coupled:.2e}")
    if not plain_gap <= TOLERANCE:
        failures.append(f"coupled vs decoupled under plain SGD differ by {plain_gap:.2e}")
    if reports["proximal"].zeros == 0:
        failures.append("the proximal form produced no exact zeros")
    if failures:
        raise SystemExit("; ".join(failures))
    print(
        f"checks passed: the forms that must agree agree to {TOLERANCE:g}, and the proximal form has exact zeros"
    )


if __name__ == "__main__":
    main()
