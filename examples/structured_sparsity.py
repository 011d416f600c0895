"""Structured sparsity on digits: attention heads, a sparsity target, 2:4 blocks and low rank.

Four short runs on scikit-learn's digits (8x8 images, 10 classes), each a proximal penalty whose prox
leaves exact structure, then the export that turns that structure into a smaller or faster model:

(a) heads: a tiny ViT-like classifier (2x2 patches embedded by a ``Linear``, one transformer block
    with ``nn.MultiheadAttention`` and an MLP, mean pooling, a ``Linear`` head) trained with
    ``fr.head_lasso`` (one group per head: its query/key/value rows and output-projection columns) in
    the proximal form; ``fr.prune`` removes the zeroed heads (the layer becomes a
    ``fr.PrunedMultiheadAttention``). Heads before and after, accuracy before and after: equal,
    prediction for prediction.
(b) a sparsity target: an MLP trained with ``fr.sparsity_target`` (a projection onto "at most
    ``(1 - s) n`` nonzeros" per weight) whose target ``s`` rises epoch by epoch to the requested one
    (a step hyperparameter read by the penalty factory); the reached sparsity, from the step's
    metrics (``make_step(..., report_sparsity=True)``), and the constraint's metric (``penalty/sparsity_target``: 0 where it holds) per epoch.
(c) 2:4: the same MLP with ``fr.n_m_sparsity(2, 4)``; every block of 4 weights holds at most 2
    nonzeros, and ``fr.semi_structured`` stores the hidden layer in torch's compressed layout (half
    the columns, and the CUTLASS metadata torch's own converter computes, on the CPU).
(d) low rank: the MLP's first layer trained with ``fr.nuclear_norm`` (its prox, singular value
    thresholding, zeroes singular values exactly); ``fr.low_rank`` replaces it by two thin layers of
    the rank reached. Parameters and accuracy before and after.

    python examples/structured_sparsity.py [--quick] [--epochs N] [--sparsity S]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import _common
import torch
from torch import nn
from torch.func import functional_call

import funcreg as fr

torch.set_num_threads(1)

BATCH = 64
HEAD_COEFF, QUICK_HEAD_COEFF = 0.3, 0.5  # --quick: fewer steps, so larger coefficients to reach zeros in them
NUCLEAR_COEFF, QUICK_NUCLEAR_COEFF = 0.1, 0.3
Params = dict[str, torch.Tensor]


def batches(n: int, epochs: int, seed: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(epoch, index batch)``: a fresh seeded shuffle per epoch, the incomplete last batch dropped."""
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(n // BATCH):
            yield epoch, order[i * BATCH : (i + 1) * BATCH]


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == y).float().mean().item()


def classifier_loss(model: nn.Module) -> Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss_fn(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    return loss_fn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


# ------------------------------------------------------------------------------------------------
# (a) attention heads


class TinyViT(nn.Module):
    """2x2 patches of an 8x8 image (16 tokens of 4 pixels), one pre-norm transformer block."""

    def __init__(self, dim: int = 32, heads: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(16, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        patches = images.reshape(n, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(n, 16, 4)
        tokens = self.embed(patches) + self.pos
        h = self.norm1(tokens)
        tokens = tokens + self.attn(h, h, h, need_weights=False)[0]
        tokens = tokens + self.mlp(self.norm2(tokens))
        return self.head(tokens.mean(dim=1))


def part_heads(quick: bool, epochs: int, coeff: float) -> None:
    x_train, x_test, y_train, y_test = _common.load_digits_split(seed=0, images=True)
    torch.manual_seed(0)
    model = TinyViT()
    (heads,) = fr.attention_heads(model)
    lr = 3e-3
    step = fr.make_step(
        classifier_loss(model), fr.adam(lr), penalty=fr.head_lasso(coeff, heads), form="proximal",
        learning_rate=lr,
    )  # fmt: skip
    state = step.init(fr.params_of(model))
    for _, idx in batches(len(x_train), epochs, seed=1):
        state, _ = step(state, x_train[idx], y_train[idx])
    norms = heads.norms(state.params)
    with torch.no_grad():
        logits = functional_call(model, state.params, (x_test,))
    small = fr.prune(model, state.params)
    with torch.no_grad():
        small_logits = small(x_test)
    report = fr.prune_report(model, small, x_test, state.params, repeats=3 if quick else 20)
    kept = int((norms > 0).sum())
    print(f"head norms after training: {[round(v, 3) for v in norms.tolist()]}")
    _common.print_table(
        [
            {
                "model": "trained",
                "heads": heads.num_heads,
                "params": report.params_before,
                "test acc": accuracy(logits, y_test),
            },
            {
                "model": "fr.prune",
                "heads": int(small.attn.num_heads),
                "params": report.params_after,
                "test acc": accuracy(small_logits, y_test),
            },
        ],
        title=f"(a) TinyViT, fr.head_lasso({coeff:g}) proximal, {epochs} epochs of Adam",
    )
    same = bool((logits.argmax(1) == small_logits.argmax(1)).all())
    print(f"{kept} of {heads.num_heads} heads kept; same predictions on every test image: {same}; "
          f"max |logit diff| {report.max_abs_diff:.1e}")  # fmt: skip
    assert max(kept, 1) == small.attn.num_heads and same  # a layer keeps at least one head


# ------------------------------------------------------------------------------------------------
# (b) a sparsity target, (c) 2:4, (d) low rank: the MLP


def weights(model: nn.Module) -> dict[str, bool]:
    return {k: k.endswith("weight") for k in fr.params_of(model)}


def part_target(epochs: int, target: float) -> None:
    x_train, x_test, y_train, y_test = _common.load_digits_split(seed=0)
    torch.manual_seed(0)
    model = mlp()
    mask = weights(model)
    lr = 0.05
    step = fr.make_step(
        classifier_loss(model), fr.sgd(lr, momentum=0.9),
        penalty=lambda h: fr.sparsity_target(float(h["s"]), per="global", mask=mask), form="proximal",
        learning_rate=lr, report_sparsity=True,
    )  # fmt: skip
    ramp = max(1, epochs // 2)  # the target rises over the first half, then holds
    state = step.init(fr.params_of(model), hparams={"s": 0.0})
    rows, epoch_now, metrics = [], 0, {}

    def record(epoch: int) -> None:
        reached = metrics["sparsity"].item()  # report_sparsity: over the penalty's selection
        assert abs(reached - fr.sparsity({k: v for k, v in state.params.items() if mask[k]}).overall) < 1e-9
        rows.append(
            {
                "epoch": epoch + 1,
                "target": state.hparams["s"].item(),
                "reached": reached,
                "penalty/sparsity_target": metrics["penalty/sparsity_target"].item(),
                "train loss": metrics["data_loss"].item(),
            }
        )

    for epoch, idx in batches(len(x_train), epochs, seed=2):
        if epoch != epoch_now:
            record(epoch_now)
            epoch_now = epoch
        s = target * min(1.0, (epoch + 1) / ramp)
        state = state._replace(hparams={"s": torch.tensor(s, dtype=torch.float32)})
        state, metrics = step(state, x_train[idx], y_train[idx])
    record(epoch_now)
    _common.print_table(
        rows, title=f"(b) MLP, fr.sparsity_target over all weights, rising to {target:g}", float_format=".4f"
    )
    with torch.no_grad():
        acc = accuracy(functional_call(model, state.params, (x_test,)), y_test)
    print(f"test accuracy at sparsity {rows[-1]['reached']:.3f}: {acc:.4f}")
    assert rows[-1]["reached"] >= target - 1e-3


def part_n_m(epochs: int) -> None:
    x_train, x_test, y_train, y_test = _common.load_digits_split(seed=0)
    torch.manual_seed(0)
    model = mlp()
    lr = 0.05
    step = fr.make_step(
        classifier_loss(model), fr.sgd(lr, momentum=0.9), penalty=fr.n_m_sparsity(2, 4, mask=weights(model)),
        form="proximal", learning_rate=lr,
    )  # fmt: skip
    state = step.init(fr.params_of(model))
    for _, idx in batches(len(x_train), epochs, seed=3):
        state, _ = step(state, x_train[idx], y_train[idx])
    worst = {
        k: int((v.reshape(v.shape[0], -1, 4) != 0).sum(dim=-1).max())
        for k, v in state.params.items()
        if k.endswith("weight") and v.shape[1] % 4 == 0
    }
    w = state.params["2.weight"].half()
    packed = fr.semi_structured(w)
    values, meta = packed.cutlass()
    layout_ok = (
        torch.equal(packed.to_dense(), w)
        and tuple(packed.values.shape) == (64, 32)
        and bool(packed.mask().sum(dim=1).eq(32).all())
        and torch.equal(values, packed.values)
    )
    with torch.no_grad():
        acc = accuracy(functional_call(model, state.params, (x_test,)), y_test)
    print("\n(c) fr.n_m_sparsity(2, 4) proximal, most nonzeros in a block of 4 per weight:", worst)
    print(
        f"2.weight as fr.semi_structured (float16): values {tuple(packed.values.shape)}, positions "
        f"{packed.indices.dtype}, CUTLASS meta {tuple(meta.shape)} {meta.dtype}; layout checks: {layout_ok}; "
        f"test accuracy {acc:.4f}"
    )
    assert all(n <= 2 for n in worst.values()) and layout_ok


def part_low_rank(quick: bool, epochs: int, coeff: float) -> None:
    x_train, x_test, y_train, y_test = _common.load_digits_split(seed=0)
    torch.manual_seed(0)
    model = mlp()
    lr = 0.05
    penalty = fr.nuclear_norm(coeff, mask=fr.by_name("0.weight", "2.weight"))
    step = fr.make_step(
        classifier_loss(model), fr.sgd(lr, momentum=0.9), penalty=penalty, form="proximal", learning_rate=lr
    )
    state = step.init(fr.params_of(model))
    for _, idx in batches(len(x_train), epochs, seed=4):
        state, _ = step(state, x_train[idx], y_train[idx])
    ranks = {k: int(torch.linalg.matrix_rank(state.params[k])) for k in ("0.weight", "2.weight")}
    small = fr.low_rank(model, state.params, mask=fr.by_name("0.weight", "2.weight"))
    with torch.no_grad():
        logits = functional_call(model, state.params, (x_test,))
        small_logits = small(x_test)
    report = fr.prune_report(model, small, x_test, state.params, repeats=3 if quick else 20)
    print(f"\n(d) fr.nuclear_norm({coeff:g}) proximal on both hidden layers, {epochs} epochs: ranks {ranks}")
    print(small)
    _common.print_table(
        [
            {"model": "trained", "params": report.params_before, "test acc": accuracy(logits, y_test)},
            {
                "model": "fr.low_rank",
                "params": report.params_after,
                "test acc": accuracy(small_logits, y_test),
            },
        ],
        float_format=".4f",
    )
    same = bool((logits.argmax(1) == small_logits.argmax(1)).all())
    print(f"same predictions on every test image: {same}; max |logit diff| {report.max_abs_diff:.1e}")
    assert same


def main() -> None:
    def options(parser):  # noqa: ANN001, ANN202
        parser.add_argument("--epochs", type=int, default=20)
        parser.add_argument("--sparsity", type=float, default=0.9, help="the target of part (b)")

    args = _common.parse_args(__doc__, options)
    epochs = 4 if args.quick else args.epochs
    times: dict[str, float] = {}
    with _common.timed("(a) heads", times):
        part_heads(args.quick, 2 * epochs, QUICK_HEAD_COEFF if args.quick else HEAD_COEFF)
    with _common.timed("(b) sparsity target", times):
        part_target(epochs, args.sparsity)
    with _common.timed("(c) 2:4", times):
        part_n_m(epochs)
    with _common.timed("(d) low rank", times):
        part_low_rank(args.quick, epochs, QUICK_NUCLEAR_COEFF if args.quick else NUCLEAR_COEFF)
    print(f"\ntotal {sum(times.values()):.1f} s")


if __name__ == "__main__":
    main()
