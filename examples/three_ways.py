"""Story 1, "three ways to regularize weights": one L2 penalty, applied three ways, gives one trajectory.

The XOR data (four points), ``Linear(2,2) -> Sigmoid -> Linear(2,1) -> Sigmoid`` seeded with
``torch.manual_seed(1)``, MSE, plain SGD with lr = 2, weight decay 0.1, 5 full-batch epochs, trained

1. with ``torch.optim.SGD(lr=2, weight_decay=0.1)``;
2. with the **loss-term** form ``fr.penalized(loss, fr.l2(0.1))`` and ``fr.sgd(2.0)``, logging per epoch
   the data loss, the squared norm, the penalty term and the total;
3. with the **coupled gradient edit** ``fr.chain(fr.add_penalty_grad(fr.l2(0.1)), fr.sgd(2.0))``, and
   the same through ``fr.make_step(..., penalty=fr.l2(0.1), form="coupled")``;
4. imperatively, adding ``0.1 * w`` to every ``.grad`` by hand before ``SGD(lr=2).step()``.

What it prints and why:

* the per-epoch table of the loss-term run: ``penalty = 0.1/2 * ||w||^2``. funcreg's ``l2(c)`` is
  ``c/2 * ||w||^2`` (with the 1/2) because its gradient ``c * w`` is exactly what torch's
  ``weight_decay=c`` adds to the gradient; so all four runs compute the same gradient
  ``g + 0.1 * w`` and the same weights;
* the data-loss histories of the four runs and their largest differences (identical losses; final weights
  within float32 rounding, ~1e-8:
  the loss term is differentiated by autograd, the gradient edit adds ``c * w`` in closed form);
* that the coupled form still *reports* the penalty, though no autograd ever sees it: it is kept in
  the transform's state (``fr.penalty_states``) and in ``make_step``'s metrics. That removes the
  story's verdict that the built-in/gradient-edit forms are "unobservable": every form is
  observable, selective (``mask=``) and works for any penalty with a gradient;
* the trap the user hit: building the penalty as ``torch.tensor([p.square().sum() for p in params]).sum()``
  creates a new leaf tensor from Python numbers, so the penalty is a constant and its gradient is zero;
  ``torch.func.grad`` shows it next to the correct gradient ``0.1 * w`` (torch only warns about converting
  a tensor that requires grad to a number, easy to miss in a training log).

The figure (``three_ways.png``) plots the four data-loss histories on top of each other (they
coincide), and the loss-term run's penalty and total.

    python examples/three_ways.py [--quick] [--out DIR] [--epochs N]
"""

from __future__ import annotations

import copy
import warnings

import _common
import torch
from torch.func import functional_call, grad, grad_and_value

import funcreg as fr

torch.set_num_threads(1)

LR, WD = 2.0, 0.1
X = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
Y = torch.tensor([[0.0], [1.0], [1.0], [0.0]])


def make_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Linear(2, 2), torch.nn.Sigmoid(), torch.nn.Linear(2, 1), torch.nn.Sigmoid()
    )


def main() -> None:
    args = _common.parse_args(__doc__, lambda p: p.add_argument("--epochs", type=int, default=5))
    epochs = args.epochs  # the whole story takes milliseconds: --quick changes nothing
    model = make_model()

    def data_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(functional_call(model, params, (x,)), y)

    histories: dict[str, list[float]] = {}
    finals: dict[str, dict[str, torch.Tensor]] = {}

    # 1. torch.optim.SGD(weight_decay=0.1): coupled L2 on every parameter, biases included.
    torch_model = copy.deepcopy(model)
    opt = torch.optim.SGD(torch_model.parameters(), lr=LR, weight_decay=WD)
    hist = []
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(torch_model(X), Y)
        loss.backward()
        opt.step()
        hist.append(loss.item())
    histories["1. SGD(weight_decay)"], finals["1. SGD(weight_decay)"] = hist, fr.params_of(torch_model)

    # 2. Loss term: total = data_loss + 0.1/2 * ||w||^2, differentiated by autograd (torch.func).
    penalty = fr.l2(WD)
    total_fn = fr.penalized(data_loss, penalty)  # (params, x, y) -> (total, metrics)
    tx = fr.sgd(LR)
    params = fr.params_of(model)
    state = tx.init(params)
    rows, hist = [], []
    for epoch in range(1, epochs + 1):
        grads, (_, metrics) = grad_and_value(total_fn, has_aux=True)(params, X, Y)
        squared_norm = fr.norms(params).total ** 2  # ||w||^2 over all parameters
        rows.append(
            {
                "epoch": epoch,
                "data loss": metrics["data_loss"].item(),
                "||w||^2": squared_norm,
                "penalty 0.1/2*||w||^2": metrics["penalty/l2"].item(),
                "total": metrics["total"].item(),
            }
        )
        hist.append(metrics["data_loss"].item())
        updates, state = tx.update(grads, state, params)
        params = fr.apply_updates(params, updates)
    histories["2. loss term"], finals["2. loss term"] = hist, params
    _common.print_table(
        rows,
        title="2. loss term, fr.penalized(loss, fr.l2(0.1)) with fr.sgd(2.0): per epoch",
        float_format=".6f",
    )

    # 3. Coupled gradient edit: g <- g + grad P(w) = g + 0.1 * w, in closed form, before the SGD step.
    tx = fr.chain(fr.add_penalty_grad(fr.l2(WD)), fr.sgd(LR))
    params = fr.params_of(model)
    state = tx.init(params)
    coupled_rows, hist = [], []
    for epoch in range(1, epochs + 1):
        grads, loss = grad_and_value(data_loss)(params, X, Y)
        updates, state = tx.update(grads, state, params)
        params = fr.apply_updates(params, updates)
        (report,) = fr.penalty_states(state)  # the penalty at the params this step started from
        coupled_rows.append(
            {"epoch": epoch, "data loss": loss.item(), "penalty (from the state)": report.value.item()}
        )
        hist.append(loss.item())
    histories["3. coupled edit"], finals["3. coupled edit"] = hist, params

    # 3b. The same as a pure training step: make_step wires the form in and reports the penalty.
    step = fr.make_step(data_loss, fr.sgd(LR), penalty=fr.l2(WD), form="coupled")
    train_state = step.init(fr.params_of(model))
    history = fr.History()
    for _ in range(epochs):
        train_state, metrics = step(train_state, X, Y)
        history.append(metrics)
    histories["3b. make_step(form='coupled')"] = history["data_loss"].tolist()
    finals["3b. make_step(form='coupled')"] = train_state.params
    for row, value in zip(coupled_rows, history["penalty"].tolist()):
        row["penalty (make_step metrics)"] = value
    _common.print_table(
        coupled_rows,
        title="3. coupled edit, fr.chain(fr.add_penalty_grad(fr.l2(0.1)), fr.sgd(2.0)): "
        "no autograd on the penalty, still reported",
        float_format=".6f",
    )

    # 4. The imperative gradient edit: add 0.1 * w to every .grad by hand, then plain SGD.
    hand_model = copy.deepcopy(model)
    opt = torch.optim.SGD(hand_model.parameters(), lr=LR)
    hist = []
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(hand_model(X), Y)
        loss.backward()
        with torch.no_grad():
            for p in hand_model.parameters():
                p.grad.add_(p, alpha=WD)
        opt.step()
        hist.append(loss.item())
    histories["4. 0.1*w added to .grad"], finals["4. 0.1*w added to .grad"] = hist, fr.params_of(hand_model)

    # The four (five) runs side by side.
    names = list(histories)
    reference = names[0]
    table = [{"epoch": e + 1, **{n: histories[n][e] for n in names}} for e in range(epochs)]
    _common.print_table(table, title="data loss per epoch (before each step)", float_format=".8f")
    diffs = []
    for n in names[1:]:
        loss_diff = max(abs(a - b) for a, b in zip(histories[n], histories[reference]))
        param_diff = max((finals[n][k] - finals[reference][k]).abs().max().item() for k in finals[reference])
        diffs.append(
            {"run": n, "max |loss diff| vs 1.": loss_diff, "max |param diff| after training": param_diff}
        )
    _common.print_table(
        diffs, title="agreement with torch.optim.SGD(weight_decay=0.1) (float32)", float_format=".2e"
    )

    # Selective decay, which the built-in weight_decay= cannot do: a mask on the penalty.
    mask = fr.decay_mask(model)
    p0 = fr.params_of(model)
    print(
        f"\nselective: fr.l2(0.1, mask=fr.decay_mask(model)) penalizes {mask.selected} only: "
        f"{fr.l2(WD, mask=mask)(p0).item():.6f} at the initial weights, vs {fr.l2(WD)(p0).item():.6f} for all parameters"
    )

    # The trap: a penalty rebuilt from Python numbers is a constant; torch.func.grad shows its zero gradient.
    def detached_penalty(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return WD / 2 * torch.tensor([p.square().sum() for p in params.values()]).sum()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bad = grad(detached_penalty)(p0)
    good = grad(fr.l2(WD))(p0)

    def show(t: torch.Tensor) -> str:
        return "[" + ", ".join(f"{v:+.5f}" for v in t.flatten().tolist()) + "]"

    print("\nthe detached-penalty trap: torch.func.grad of 0.1/2 * ||w||^2 with respect to '0.weight'")
    print(
        f"  torch.tensor([p.square().sum() for p in params]).sum()  {show(bad['0.weight'])}  value {detached_penalty(p0).item():.6f}"
    )
    print(
        f"  fr.l2(0.1)                                              {show(good['0.weight'])}  value {fr.l2(WD)(p0).item():.6f}"
    )
    print(f"  expected: 0.1 * w                                       {show(WD * p0['0.weight'])}")
    print(
        "  Same value, zero gradient: torch.tensor(...) builds a new leaf tensor from Python numbers, cut off"
    )
    print("  from the graph; training with it is training without the penalty. The only sign is a warning:")
    for w in caught:
        print(f"    {w.category.__name__}: {str(w.message).splitlines()[0]}")
    if not caught:
        print("    (none in this torch version)")

    # Figure.
    plt = _common.pyplot()
    fig, (ax_loss, ax_pen) = plt.subplots(1, 2, figsize=(11, 4))
    x_epochs = list(range(1, epochs + 1))
    styles = ["-", "--", ":", "-.", (0, (1, 3))]
    markers = ["o", "s", "^", "x", "+"]
    for i, n in enumerate(names):
        ax_loss.plot(
            x_epochs, histories[n], linestyle=styles[i % 5], marker=markers[i % 5], markersize=9 - i, label=n
        )
    ax_loss.set(title="data loss: all runs coincide", xlabel="epoch", ylabel="MSE (before the step)")
    ax_loss.set_xticks(x_epochs)
    ax_loss.legend(fontsize=8)
    ax_pen.plot(x_epochs, [r["data loss"] for r in rows], marker="o", label="data loss")
    ax_pen.plot(
        x_epochs,
        [r["penalty 0.1/2*||w||^2"] for r in rows],
        marker="s",
        label="penalty 0.1/2 * ||w||^2 (loss term)",
    )
    ax_pen.plot(
        x_epochs,
        [r["penalty (from the state)"] for r in coupled_rows],
        linestyle="none",
        marker="x",
        markersize=10,
        color="k",
        label="penalty from fr.penalty_states (coupled)",
    )
    ax_pen.plot(x_epochs, [r["total"] for r in rows], marker="^", label="total")
    ax_pen.set(title="2. loss term: what the table logs", xlabel="epoch", ylabel="value")
    ax_pen.set_xticks(x_epochs)
    ax_pen.legend(fontsize=8)
    fig.suptitle("Story 1: XOR, SGD lr=2, L2 coefficient 0.1 applied three ways")
    fig.tight_layout()
    _common.save_figure(fig, args.out, "three_ways.png")


if __name__ == "__main__":
    main()
