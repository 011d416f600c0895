"""Story 2, "a sandbox for weight decay semantics": what does one step of each regularizer do to a weight?

A 1x1 convolution with one weight (1.0) and a linear layer with two weights (both -1.5), zero biases,
and a data loss multiplied by 0, so that only the regularizer moves the weights. One step, lr = 0.1,
coefficient ``wd = 0.1``. The script prints the weights after the step for every variant side by side,
next to the closed form it should follow (and checks it):

=========================================  =====================================  ================
variant                                    rule, one step                          conv 1.0 ->
=========================================  =====================================  ================
coupled L2 (``fr.sgd(weight_decay=)``,     ``w - lr*wd*w``                         0.99
torch ``SGD(weight_decay=)``)
decoupled, lr-scaled                       ``w - lr*wd*w`` (same map, plain SGD)   0.99
decoupled, lr-independent (their SGDW)     ``w - wd*w``                            0.9
loss term ``wd * sum w^2``                 ``w - lr*2*wd*w``                       0.98
loss term ``wd * sum |w|``                 ``w - lr*wd*sign(w)``                   0.99
decoupled L1 (``learning_rate=None``)      ``w - wd*sign(w)``                      0.9
proximal L1 after ``fr.sgd(0.1)``          ``sign(w)*max(|w| - lr*wd, 0)``         0.99
buggy SGDW (constant shift)                ``w - lr*wd``                           0.99, but -1.5 -> -1.51
=========================================  =====================================  ================

Why the factor 2 for the loss term: the user's "external regularizer" adds ``wd * sum |w|^p``. funcreg's
convention is ``fr.lp(c, p) = c/p * sum |w|^p`` (so that ``fr.l2(c) = c/2 ||w||^2`` has gradient ``c*w``,
torch's ``weight_decay=c``, and ``fr.lp(c, 1) = fr.l1(c)``). The user's penalty is therefore
``fr.lp(p*wd, p)``: ``fr.l2(2*wd)`` for p = 2 (its gradient ``2*wd*w`` decays twice as fast as
``weight_decay=wd``) and ``fr.l1(wd)`` for p = 1.

With one step from ``|w| > lr*wd`` the proximal and the subgradient L1 steps coincide; they differ
when a weight would cross zero (the prox stops at an exact 0, see ``digits_sparsity.py``). Adam and
AdamW are in the table too: Adam's *coupled* decay is normalised by ``sqrt(v)``, so with a zero data
gradient every weight moves by ``lr`` whatever ``wd``; AdamW decays ``lr*wd*w``.

Then ``fr.probe`` steps each ``torch.optim``-style optimizer from known weights with a zero data
gradient at two learning rates and names what its ``weight_decay`` really is: SGD, SGD with
momentum, Adam, AdamW, the user's lr-independent SGDW, a buggy SGDW that subtracts the constant
``lr*wd`` (a third-party SGDW did this), and any third-party optimizer package that is installed
(``torch_optimizer``; skipped when absent).

The figure (``sandbox.png``) shows, per variant, where each weight lands after the one step.

    python examples/sandbox.py [--quick] [--out DIR]
"""

from __future__ import annotations

import importlib
import textwrap
from collections.abc import Callable

import _common
import torch
from torch.func import functional_call

import funcreg as fr

torch.set_num_threads(1)

LR, WD = 0.1, 0.1
NAMES = ("conv.weight", "fc.weight[0]", "fc.weight[1]", "conv.bias", "fc.bias")


class Sandbox(torch.nn.Module):
    """A 1x1 conv (weight 1.0) feeding a linear layer with two weights (-1.5, -1.5); zero biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, kernel_size=1)
        self.fc = torch.nn.Linear(2, 1)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.fc.weight.fill_(-1.5)
            self.conv.bias.zero_()
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (n, 1, 1, 2)
        return self.fc(self.conv(x).flatten(1))


def flat_weights(params: dict[str, torch.Tensor]) -> list[float]:
    """The five numbers of the sandbox in NAMES order."""
    return [
        params["conv.weight"].item(),
        params["fc.weight"][0, 0].item(),
        params["fc.weight"][0, 1].item(),
        params["conv.bias"].item(),
        params["fc.bias"].item(),
    ]


# ------------------------------------------------------------------------------------------------
# Hand-written optimizers, as users write them.


class IndependentSGDW(torch.optim.Optimizer):
    """The user's own SGDW: ``w <- w - wd*w`` (decay not multiplied by lr), then ``w <- w - lr*g``."""

    def __init__(self, params, lr: float = LR, weight_decay: float = WD) -> None:  # noqa: ANN001
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["weight_decay"])
                    p.add_(p.grad, alpha=-group["lr"])


class BuggySGDW(torch.optim.Optimizer):
    """An SGDW with the bug of a widely installed third-party one: it subtracts the constant ``lr*wd``."""

    def __init__(self, params, lr: float = LR, weight_decay: float = WD) -> None:  # noqa: ANN001
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(-group["lr"] * group["weight_decay"])  # meant: p.mul_(1 - lr * wd)
                    p.add_(p.grad, alpha=-group["lr"])


def torch_step(make_optimizer: Callable, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """One step of a torch.optim-style optimizer on a fresh sandbox; the data loss is multiplied by 0."""
    model = Sandbox()
    opt = make_optimizer(model.parameters())
    opt.zero_grad()
    (0.0 * torch.nn.functional.mse_loss(model(x), y)).backward()  # zero gradients, not None
    opt.step()
    return fr.params_of(model)


def main() -> None:
    args = _common.parse_args(__doc__)  # one step of a 5-weight model: --quick changes nothing
    model = Sandbox()
    x = torch.randn(8, 1, 1, 2, generator=torch.Generator().manual_seed(0))
    y = torch.randn(8, 1, generator=torch.Generator().manual_seed(1))

    def data_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.0 * torch.nn.functional.mse_loss(functional_call(model, params, (x,)), y)

    def funcreg_step(tx: fr.GradientTransformation, **step_kwargs) -> dict[str, torch.Tensor]:  # noqa: ANN003
        step = fr.make_step(data_loss, tx, **step_kwargs)
        state, _ = step(step.init(fr.params_of(model)), x, y)
        return state.params

    sign = torch.sign
    w0 = torch.tensor(flat_weights(fr.params_of(model)))
    # (variant, rule, params after one step, the rule as a function of the starting weights)
    variants = [
        (
            "coupled L2: fr.sgd(0.1, weight_decay=0.1)",
            "w - lr*wd*w",
            funcreg_step(fr.sgd(LR, weight_decay=WD)),
            w0 - LR * WD * w0,
        ),
        (
            "coupled L2: torch.optim.SGD(weight_decay=0.1)",
            "w - lr*wd*w",
            torch_step(lambda ps: torch.optim.SGD(ps, lr=LR, weight_decay=WD), x, y),
            w0 - LR * WD * w0,
        ),
        (
            "decoupled, lr-scaled: fr.decoupled_weight_decay(0.1, 0.1, scale_by='learning_rate')",
            "w - lr*wd*w",
            funcreg_step(
                fr.chain(
                    fr.sgd(LR), fr.decoupled_weight_decay(WD, learning_rate=LR, scale_by="learning_rate")
                )
            ),
            w0 - LR * WD * w0,
        ),
        (
            "decoupled, lr-independent: fr.decoupled_weight_decay(0.1, scale_by='none')",
            "w - wd*w",
            funcreg_step(fr.chain(fr.sgd(LR), fr.decoupled_weight_decay(WD, scale_by="none"))),
            w0 - WD * w0,
        ),
        (
            "their SGDW (hand-written torch optimizer)",
            "w - wd*w",
            torch_step(lambda ps: IndependentSGDW(ps), x, y),
            w0 - WD * w0,
        ),
        (
            "loss term wd*sum w^2 = fr.lp(2*wd, 2) = fr.l2(0.2)",
            "w - lr*2*wd*w",
            funcreg_step(fr.sgd(LR), penalty=fr.lp(2 * WD, 2), form="loss"),
            w0 - LR * 2 * WD * w0,
        ),
        (
            "loss term wd*sum |w| = fr.lp(1*wd, 1) = fr.l1(0.1)",
            "w - lr*wd*sign(w)",
            funcreg_step(fr.sgd(LR), penalty=fr.lp(1 * WD, 1), form="loss"),
            w0 - LR * WD * sign(w0),
        ),
        (
            "decoupled L1: fr.decoupled(fr.l1(0.1)), learning_rate=None",
            "w - wd*sign(w)",
            funcreg_step(fr.sgd(LR), penalty=fr.l1(WD), form="decoupled", learning_rate=None),
            w0 - WD * sign(w0),
        ),
        (
            "proximal L1: fr.sgd(0.1) then fr.proximal(fr.l1(0.1), 0.1)",
            "sign(w)*max(|w|-lr*wd, 0)",
            funcreg_step(fr.chain(fr.sgd(LR), fr.proximal(fr.l1(WD), LR))),
            sign(w0) * torch.clamp(w0.abs() - LR * WD, min=0),
        ),
        (
            "torch.optim.Adam(weight_decay=0.1)",
            "w - lr*sign(w)  (coupled, normalised)",
            torch_step(lambda ps: torch.optim.Adam(ps, lr=LR, weight_decay=WD), x, y),
            w0 - LR * sign(w0),
        ),
        (
            "torch.optim.AdamW(weight_decay=0.1)",
            "w - lr*wd*w",
            torch_step(lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD), x, y),
            w0 - LR * WD * w0,
        ),
        (
            "buggy SGDW (constant shift, hand-written)",
            "w - lr*wd  (a bug)",
            torch_step(lambda ps: BuggySGDW(ps), x, y),
            w0 - LR * WD,
        ),
    ]

    rows, worst = [], 0.0
    start = dict(zip(NAMES, w0.tolist()))
    rows.append({"variant": "(start)", "rule": "", **start})
    for name, rule, params, expected in variants:
        got = torch.tensor(flat_weights(params))
        worst = max(worst, (got - expected).abs().max().item())
        rows.append({"variant": name, "rule": rule, **dict(zip(NAMES, got.tolist()))})
    _common.print_table(
        rows, title=f"weights after one step, lr={LR}, coefficient wd={WD}, data loss * 0", float_format=".6f"
    )
    print(f"\nlargest difference from the closed-form rule: {worst:.2e} (float32)")
    if worst > 1e-6:
        raise SystemExit("a variant does not follow its rule")
    print(
        "Note the factor 2: the story's wd*sum w^2 has gradient 2*wd*w, twice torch's weight_decay=wd.\n"
        "The buggy SGDW moves the negative weights away from zero (-1.5 -> -1.51) and the zero biases to -0.01."
    )

    # ------------------------------------------------------------------------------------------
    # fr.probe: the same question, asked of any torch.optim-style optimizer, answered by name.
    optimizers: list[tuple[str, Callable]] = [
        ("torch.optim.SGD(weight_decay=0.1)", lambda ps: torch.optim.SGD(ps, lr=LR, weight_decay=WD)),
        (
            "torch.optim.SGD(momentum=0.9, weight_decay=0.1)",
            lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9, weight_decay=WD),
        ),
        ("torch.optim.Adam(weight_decay=0.1)", lambda ps: torch.optim.Adam(ps, lr=LR, weight_decay=WD)),
        ("torch.optim.AdamW(weight_decay=0.1)", lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD)),
        ("their SGDW (hand-written)", lambda ps: IndependentSGDW(ps)),
        ("buggy SGDW (hand-written)", lambda ps: BuggySGDW(ps)),
    ]
    skipped = []
    for module_name, class_name in (("torch_optimizer", "SGDW"), ("torch_optimizer", "AdamW")):
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as err:
            skipped.append(f"{module_name}.{class_name} ({type(err).__name__})")
            continue
        optimizers.append(
            (
                f"{module_name}.{class_name}(weight_decay=0.1)",
                lambda ps, cls=cls: cls(ps, lr=LR, weight_decay=WD),
            )
        )
    results = []
    for label, make in optimizers:
        results.append((label, fr.probe(make)))
    probe_rows = [
        {
            "optimizer": label,
            "what weight_decay=0.1 really is": str(r.kind),
            "coefficient": r.coefficient,
            "lr_scaled": r.lr_scaled,
            "also equivalent to": ", ".join(str(k) for k in r.equivalent) or "-",
        }
        for label, r in results
    ]
    _common.print_table(
        probe_rows,
        title="fr.probe: zero data gradient, weights (-3, -1.5, -0.5, 0.5, 1, 2, 4), lr 0.1 and 0.01",
        float_format=".6g",
    )
    for label, r in results:
        print(f"\n{label}:")
        print(textwrap.indent(textwrap.fill(r.explanation, width=110), "  "))
    if skipped:
        print("\nthird-party optimizers not installed, skipped: " + "; ".join(skipped))
    buggy = results[[label for label, _ in results].index("buggy SGDW (hand-written)")][1]
    print("\nthe probe's weight table for the buggy SGDW (first block: lr = 0.1):")
    print(textwrap.indent(buggy.table.split("\n\n")[0], "  "))

    # ------------------------------------------------------------------------------------------
    # Figure: where each weight lands after one step, per variant (bars start at the initial value).
    plt = _common.pyplot()
    short = [
        "coupled L2, fr.sgd",
        "coupled L2, torch SGD",
        "decoupled, x lr",
        "decoupled, no lr",
        "their SGDW (no lr)",
        "loss term wd*sum w^2",
        "loss term wd*sum |w|",
        "decoupled L1, no lr",
        "proximal L1",
        "torch Adam (coupled)",
        "torch AdamW",
        "buggy SGDW (shift)",
    ]
    assert len(short) == len(variants)
    panels = [
        ("conv.weight", "conv weight (starts at 1.0)"),
        ("fc.weight[0]", "each linear weight (starts at -1.5)"),
        ("fc.bias", "each bias (starts at 0)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(14, 5.5), sharey=True)
    ypos = list(range(len(variants)))[::-1]
    colors = plt.get_cmap("tab20")(range(len(variants)))
    for ax, (key, title) in zip(axes, panels):
        s0 = start[key]
        values = [r[key] for r in rows[1:]]
        ax.barh(ypos, [v - s0 for v in values], left=s0, color=colors, height=0.7)
        ax.axvline(s0, color="k", linewidth=1, linestyle="--")
        for y, v in zip(ypos, values):
            ax.text(v, y, f" {v:.3f} ", va="center", ha="left" if v >= s0 else "right", fontsize=8)
        spread = max(abs(v - s0) for v in values)
        ax.set_xlim(s0 - 1.6 * spread, s0 + 1.6 * spread)
        ax.set_title(title)
        ax.set_xlabel("value after one step (dashed: start)")
    axes[0].set_yticks(ypos)
    axes[0].set_yticklabels(short, fontsize=9)
    fig.suptitle(f"Story 2: one step, lr={LR}, coefficient {WD}, zero data gradient")
    fig.tight_layout()
    _common.save_figure(fig, args.out, "sandbox.png")


if __name__ == "__main__":
    main()
