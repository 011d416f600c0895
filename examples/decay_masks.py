"""Story 4, "exclude some layers from weight decay": a printed rule instead of a grouping loop.

The user built ``torch.optim`` parameter groups with ``weight_decay=0`` for biases, 1-D parameters
(BatchNorm) and a skip list of names, and another value for the other layers. Their grouping function
had an ``if`` dedented out of the loop, so only the last parameter was ever sorted: silently wrong.
funcreg's selections are tables you can print, and they fail loudly: a skip-list name that matches no
parameter, or a rule that selects nothing, raises ``ValueError`` (with a "did you mean").

On a small CNN with BatchNorm (``stem``/``block``: conv without bias + BatchNorm; ``fc``; ``head``) the
script

1. prints ``fr.decay_mask(model, exclude=["head"])``: every parameter, its shape, the decision and
   the reason (normalization layer, bias, ``ndim < 2``, excluded by the skip list, or decayed);
2. shows the errors a typo in the skip list gets (``exclude=["haed"]``, ``exclude=["head.wieght"]``), and
   a rule that selects nothing;
3. gives different layers different coefficients with ``fr.partition`` (conv kernels one value, the
   fully connected weight another, everything else none), labels built from the printed selection;
4. trains it for a few epochs on digits (float64, SGD with momentum, BatchNorm in training mode with
   its running statistics carried in the train state) next to ``torch.optim.SGD`` with the
   corresponding parameter groups, built from the same selection, and prints the largest parameter and
   buffer difference (~1e-15: the same computation);
5. redoes the story's tiny check: ``x`` 3x4, ``W`` 4x5, ``loss = sum(x @ W)``, one SGD step with lr 0.1.
   The gradient is ``G = x^T 1`` whatever the decay, so weight decay ``wd`` gives
   ``W1 = W0 - lr*(G + wd*W0)``: with ``wd = 1`` the result is the ``wd = 0`` result minus
   ``lr*wd*W0 = 0.1*W0``, i.e. ``W0``'s contribution shrinks by the factor ``1 - lr*wd = 0.9``. The
   closed form is printed beside funcreg's and torch's results.

Why it matters (the convention): torch's ``weight_decay`` is applied to whatever the group holds, so
what is excluded is only as correct as the loop that built the groups. timm excludes ``ndim <= 1``,
HF-style rules match ``bias`` and ``norm`` by name; ``fr.decay_mask`` applies both and prints why.

The figure (``decay_masks.png``) shows, per parameter, its norm after training with the per-layer
decay relative to an identical run without any decay, coloured by the decision: only decayed tensors
shrink.

    python examples/decay_masks.py [--quick] [--out DIR] [--epochs N]
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import _common
import torch

import funcreg as fr

torch.set_num_threads(1)

LR, MOMENTUM, BATCH = 0.05, 0.9, 64
WD = {"conv": 1e-2, "fc": 5e-2}  # per-layer coefficients; "no_decay" gets 0


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        OrderedDict(
            stem=torch.nn.Sequential(
                OrderedDict(
                    conv=torch.nn.Conv2d(1, 8, 3, padding=1, bias=False),
                    bn=torch.nn.BatchNorm2d(8),
                    relu=torch.nn.ReLU(),
                )
            ),
            block=torch.nn.Sequential(
                OrderedDict(
                    conv=torch.nn.Conv2d(8, 16, 3, padding=1, bias=False),
                    bn=torch.nn.BatchNorm2d(16),
                    relu=torch.nn.ReLU(),
                    pool=torch.nn.MaxPool2d(2),
                )  # fmt: skip
            ),
            flatten=torch.nn.Flatten(),
            fc=torch.nn.Linear(16 * 4 * 4, 64),
            relu=torch.nn.ReLU(),
            head=torch.nn.Linear(64, 10),
        )
    )


def main() -> None:
    args = _common.parse_args(__doc__, lambda p: p.add_argument("--epochs", type=int, default=4))
    epochs, max_steps = (1, 5) if args.quick else (args.epochs, None)
    torch.manual_seed(0)
    model = make_model().to(torch.float64)

    # 1. The rule, printed.
    print('fr.decay_mask(model, exclude=["head"]):')
    selection = fr.decay_mask(model, exclude=["head"])
    print(selection)
    print(repr(selection))

    # 2. Loud failures.
    for typo in (["haed"], ["head.wieght"]):
        print(f"\nA typo in the skip list, exclude={typo}:")
        try:
            fr.decay_mask(model, exclude=typo)
        except ValueError as err:
            print(f"  ValueError: {err}")
    print("\nA rule that selects nothing, fr.by_predicate(lambda name, w: w.ndim == 3, '3-D tensor'):")
    try:
        fr.by_predicate(lambda name, w: w.ndim == 3, "3-D tensor")(model)
    except ValueError as err:
        print(f"  ValueError: {err}")

    # 3. Per-layer coefficients: a label per parameter, from the selection.
    params = fr.params_of(model)
    labels = {
        name: ("no_decay" if not selection[name] else "conv" if p.ndim == 4 else "fc")
        for name, p in params.items()
    }
    coefficient = {"conv": WD["conv"], "fc": WD["fc"], "no_decay": 0.0}
    _common.print_table(
        [
            {
                "name": n,
                "shape": "x".join(map(str, p.shape)),
                "label": labels[n],
                "weight_decay": coefficient[labels[n]],
                "reason": selection.reason(n),
            }
            for n, p in params.items()
        ],
        title="labels for fr.partition (and for the torch.optim parameter groups)",
    )
    tx = fr.partition(
        {
            "conv": fr.sgd(LR, momentum=MOMENTUM, weight_decay=WD["conv"]),
            "fc": fr.sgd(LR, momentum=MOMENTUM, weight_decay=WD["fc"]),
            "no_decay": fr.sgd(LR, momentum=MOMENTUM),
        },
        labels,
    )
    # The same, as torch.optim parameter groups built from the same labels.
    torch_model = copy.deepcopy(model)
    named = dict(torch_model.named_parameters())
    groups = [
        {"params": [named[n] for n in params if labels[n] == label], "weight_decay": coefficient[label]}
        for label in ("conv", "fc", "no_decay")
    ]
    optimizer = torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM)
    print(
        "torch.optim groups: "
        + ", ".join(f"weight_decay={g['weight_decay']:g}: {len(g['params'])} tensors" for g in groups)
    )

    # 4. Train both, and a no-decay run for the figure; BatchNorm statistics live in the train state.
    apply = fr.functional_model(model)

    def loss_fn(params, buffers, x, y):  # noqa: ANN001, ANN202
        logits, new_buffers = apply(params, buffers, x)
        return torch.nn.functional.cross_entropy(logits, y), new_buffers

    step = fr.make_step(loss_fn, tx, buffers=True)
    plain = fr.make_step(loss_fn, fr.sgd(LR, momentum=MOMENTUM), buffers=True)
    state = step.init(params, fr.buffers_of(model))
    plain_state = plain.init(params, fr.buffers_of(model))

    x_train, x_test, y_train, y_test = _common.load_digits_split(seed=0, images=True, dtype=torch.float64)
    batches = list(_common.member_batches(len(x_train), BATCH, [0], epochs))[:max_steps]
    torch_model.train()
    worst_params = worst_buffers = 0.0
    for idx in _common.progress(batches, desc="funcreg vs torch.optim"):
        xb, yb = x_train[idx[0]], y_train[idx[0]]
        state, metrics = step(state, xb, yb)
        plain_state, _ = plain(plain_state, xb, yb)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(torch_model(xb), yb).backward()
        optimizer.step()
        worst_params = max(
            worst_params,
            max((state.params[n] - p).abs().max().item() for n, p in torch_model.named_parameters()),
        )
        worst_buffers = max(
            worst_buffers,
            max(
                (state.buffers[n].double() - b.double()).abs().max().item()
                for n, b in torch_model.named_buffers()
            ),
        )

    def accuracy(params, buffers) -> float:  # noqa: ANN001
        model.eval()
        try:
            logits = torch.func.functional_call(model, (params, buffers), (x_test,))
        finally:
            model.train()
        return (logits.argmax(1) == y_test).double().mean().item()

    torch_model.eval()
    torch_acc = (torch_model(x_test).argmax(1) == y_test).double().mean().item()
    _common.print_table(
        [
            {
                "run": "fr.partition (per-layer weight decay)",
                "test acc": accuracy(state.params, state.buffers),
                "max |param diff| vs torch.optim": worst_params,
                "max |buffer diff|": worst_buffers,
            },
            {
                "run": "torch.optim.SGD parameter groups",
                "test acc": torch_acc,
                "max |param diff| vs torch.optim": 0.0,
                "max |buffer diff|": 0.0,
            },
            {
                "run": "fr.sgd, no decay (for the figure)",
                "test acc": accuracy(plain_state.params, plain_state.buffers),
                "max |param diff| vs torch.optim": "-",
                "max |buffer diff|": "-",
            },
        ],
        title=f"{len(batches)} steps on digits, float64, SGD lr {LR} momentum {MOMENTUM}",
        float_format=".3g",
    )
    if worst_params > 1e-9 or worst_buffers > 1e-9:
        raise SystemExit("fr.partition and the torch.optim parameter groups disagree")

    # 5. The tiny check from the story.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    w0 = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    g = x.T @ torch.ones(3, 5, dtype=torch.float64)  # d/dW sum(x @ W)
    rows, after = [], {}
    for wd in (0.0, 1.0):
        tiny = fr.make_step(lambda p, x: (x @ p["W"]).sum(), fr.sgd(0.1, weight_decay=wd))
        w_fr = tiny(tiny.init({"W": w0}), x)[0].params["W"]
        w_torch = torch.nn.Parameter(w0.clone())
        opt = torch.optim.SGD([w_torch], lr=0.1, weight_decay=wd)
        (x @ w_torch).sum().backward()
        opt.step()
        expected = w0 - 0.1 * (g + wd * w0)
        after[wd] = w_fr
        rows.append(
            {
                "weight_decay": wd,
                "||W1|| funcreg": w_fr.norm().item(),
                "||W1|| torch": w_torch.detach().norm().item(),
                "||W1|| closed form W0 - lr*(G + wd*W0)": expected.norm().item(),
                "max |funcreg - closed form|": (w_fr - expected).abs().max().item(),
                "max |torch - closed form|": (w_torch.detach() - expected).abs().max().item(),
            }
        )
    _common.print_table(
        rows,
        title="tiny check: x 3x4, W 4x5, loss = sum(x @ W), one SGD step, lr 0.1 (||W0|| = "
        f"{w0.norm().item():.4f}, ||G|| = {g.norm().item():.4f})",
        float_format=".6g",
    )
    shrink = after[1.0] - after[0.0]
    print(
        f"W1(wd=1) - W1(wd=0) = -lr*wd*W0 = -0.1*W0: max deviation {(shrink + 0.1 * w0).abs().max().item():.2e}; "
        f"W0's share of W1 is multiplied by 1 - lr*wd = 0.9"
    )

    # Figure: per parameter, norm with per-layer decay relative to no decay, coloured by the decision.
    plt = _common.pyplot()
    names = list(params)
    ratio = [fr.norms(state.params)[n] / fr.norms(plain_state.params)[n] for n in names]
    colors = {"conv": "tab:red", "fc": "tab:orange", "no_decay": "tab:blue"}
    fig, (ax, ax_init) = plt.subplots(
        1, 2, figsize=(13, 5), sharey=True, gridspec_kw={"width_ratios": [3, 2]}
    )
    ypos = list(range(len(names)))[::-1]
    ax.barh(ypos, ratio, color=[colors[labels[n]] for n in names])
    ax.axvline(1.0, color="k", linestyle="--", linewidth=1)
    for y, r, n in zip(ypos, ratio, names):
        ax.text(r, y, f" {r:.3f}  ({selection.reason(n)})", va="center", fontsize=8)
    ax.set_yticks(ypos)
    ax.set_yticklabels([f"{n} ({'x'.join(map(str, params[n].shape))})" for n in names], fontsize=9)
    ax.set_xlim(0, 1.6)
    ax.set_xlabel("||w|| with per-layer decay / ||w|| without decay (same init, same batches)")
    ax.set_title(f"after {len(batches)} steps: the decayed tensors shrink, the excluded ones do not")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(
        handles,
        [f"label {k}: weight_decay={coefficient[k]:g}" for k in colors],
        loc="lower center",
        ncol=3,
        fontsize=9,
        frameon=False,
    )
    ax_init.barh(ypos, [fr.norms(params)[n] for n in names], color="lightgray", label="at init")
    ax_init.barh(
        ypos,
        [fr.norms(state.params)[n] for n in names],
        color=[colors[labels[n]] for n in names],
        height=0.4,
        label="after, with decay",
    )
    ax_init.set_xlabel("||w||")
    ax_init.set_title("norms: at init (grey) and after training with decay")
    fig.suptitle(
        'Story 4: fr.decay_mask(model, exclude=["head"]) and per-layer coefficients with fr.partition'
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _common.save_figure(fig, args.out, "decay_masks.png")


if __name__ == "__main__":
    main()
