"""Quickstart: an MLP on scikit-learn's digits with funcreg, checked against torch.optim step for step.

The same model (64-128-10, same initial weights) is trained twice on the same mini-batches:

* with funcreg: ``chain(add_decayed_weights(1e-3, mask=decay_mask(model)), sgd(0.1, momentum=0.9))``,
  pure functions over a dict of parameters, gradients from ``torch.func.grad`` + ``functional_call``;
* with ``torch.optim.SGD(lr=0.1, momentum=0.9)`` and two parameter groups built from the same
  selection: ``weight_decay=1e-3`` for the weights, ``0`` for the biases.

Both are coupled L2, the gradient of ``1e-3/2 * ||w||^2`` on the selected weights, so the two runs
compute the same thing. The script prints the selection table, the largest parameter difference
between the runs after every epoch, and the test accuracy. The digits data ships with scikit-learn
(no download).

It runs in float64 by default, where the runs agree to ~1e-15 over the whole training. In float32
(``--dtype float32``) each step differs by at most one rounding (funcreg forms the update
``-lr * buf`` and adds it; torch adds ``buf`` with ``alpha=-lr`` in one kernel), and hundreds of
steps of training amplify those roundings to ~1e-3 in the weights, with the same accuracy; there
the script checks the first step only.

    python examples/quickstart.py                   # 30 epochs, a few seconds
    python examples/quickstart.py --dtype float32   # the same in float32
    python examples/quickstart.py --quick           # a few steps, for CI
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.func import functional_call, grad

import funcreg as fr

torch.set_num_threads(1)

LR, MOMENTUM, WEIGHT_DECAY, BATCH = 0.1, 0.9, 1e-3, 64
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-6}  # see the module docstring


def load_data(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=dtype) / 16.0  # pixel values 0..16
    y = torch.tensor(digits.target, dtype=torch.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return x_train, x_test, y_train, y_test


def accuracy(model: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        logits = functional_call(model, params, (x,))
    return (logits.argmax(dim=1) == y).float().mean().item()


def max_abs_diff(params: dict[str, torch.Tensor], module: torch.nn.Module) -> float:
    return max((params[name] - p).abs().max().item() for name, p in module.named_parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="run a few steps only (for CI)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    args = parser.parse_args()
    epochs, max_steps = (1, 5) if args.quick else (args.epochs, None)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(args.seed)
    x_train, x_test, y_train, y_test = load_data(args.seed, dtype)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).to(dtype)
    reference = copy.deepcopy(model)  # same initial weights, trained by torch.optim

    # Which parameters get weight decay, and why: printed, not hidden in a grouping loop.
    selection = fr.decay_mask(model)
    print("Weight-decay selection (fr.decay_mask):")
    print(selection)
    print()

    # funcreg: parameters are a dict of tensors; the optimizer is a pair of pure functions.
    params = fr.params_of(model)
    tx = fr.chain(
        fr.add_decayed_weights(WEIGHT_DECAY, mask=selection),  # coupled L2 on the selected weights
        fr.sgd(LR, momentum=MOMENTUM),
    )
    state = tx.init(params)

    def loss_fn(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    grad_fn = grad(loss_fn)

    # torch.optim: the same rule as parameter groups, built from the same selection.
    named = dict(reference.named_parameters())
    optimizer = torch.optim.SGD(
        [
            {"params": [named[n] for n in selection.selected], "weight_decay": WEIGHT_DECAY},
            {"params": [named[n] for n in selection.unselected], "weight_decay": 0.0},
        ],
        lr=LR,
        momentum=MOMENTUM,
    )

    generator = torch.Generator().manual_seed(args.seed)
    steps, worst, first = 0, 0.0, None
    start = time.perf_counter()
    print(f"{'epoch':>5}  {'steps':>5}  {'train loss':>10}  {'test acc':>8}  {'max |funcreg - torch.optim|':>27}")
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order), BATCH):
            xb, yb = x_train[order[i : i + BATCH]], y_train[order[i : i + BATCH]]

            grads = grad_fn(params, xb, yb)
            updates, state = tx.update(grads, state, params)
            params = fr.apply_updates(params, updates)

            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(reference(xb), yb).backward()
            optimizer.step()

            steps += 1
            diff = max_abs_diff(params, reference)
            first = diff if first is None else first
            worst = max(worst, diff)
            if max_steps is not None and steps >= max_steps:
                break
        train_loss = loss_fn(params, x_train, y_train).item()
        test_acc = accuracy(model, params, x_test, y_test)
        print(f"{epoch:>5}  {steps:>5}  {train_loss:>10.4f}  {test_acc:>8.2%}  {max_abs_diff(params, reference):>27.2e}")
        if max_steps is not None and steps >= max_steps:
            break

    torch_acc = accuracy(reference, dict(reference.named_parameters()), x_test, y_test)
    print()
    print(f"{steps} steps in {time.perf_counter() - start:.1f} s")
    print(f"test accuracy: funcreg {accuracy(model, params, x_test, y_test):.2%}, torch.optim {torch_acc:.2%}")
    print(f"parameter difference ({args.dtype}): after the first step {first:.2e}, largest over all steps {worst:.2e}")
    checked, tolerance = (worst, "all steps") if dtype == torch.float64 else (first, "the first step")
    if not checked <= TOLERANCE[dtype]:
        raise SystemExit(f"funcreg and torch.optim disagree at {tolerance}: {checked:.2e} > {TOLERANCE[dtype]:g}")
    print(f"agreement checked over {tolerance}: {checked:.2e} <= {TOLERANCE[dtype]:g}")


if __name__ == "__main__":
    main()
