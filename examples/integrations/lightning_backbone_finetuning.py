"""Lightning's ``BackboneFinetuning`` with ``fr.create_optimizer``: a frozen backbone, unfrozen later.

A tiny ``LightningModule`` (``backbone``: Linear-LayerNorm-Tanh, ``head``: Linear) fits generated
regression data. ``configure_optimizers`` returns ``fr.create_optimizer(trainable, "adamw", ...)``, a
``torch.optim.Optimizer``: its ``"decay"`` group holds ``head.weight``, its ``"no_decay"`` group
``head.bias``. ``lightning.pytorch.callbacks.BackboneFinetuning`` freezes the backbone before
``configure_optimizers`` (so only parameters that still require gradients go in), then at
``unfreeze_backbone_at_epoch`` unfreezes it and calls ``optimizer.add_param_group`` with a tenth of
the head's learning rate, which it doubles every epoch until it reaches the head's.

What it checks, each against an outside reference:

1. training works: the loss on the whole data set falls, the backbone is trained after it is
   unfrozen, and the optimizer ends with three groups (``decay``, ``no_decay``, the backbone);
2. funcreg without a penalty is ``torch.optim.AdamW`` with the same two groups, under the same
   callback: the weights agree to 1e-6;
3. a masked penalty, ``penalty=fr.l1(lam, mask=fr.by_name("head.weight")), form="proximal"``: the
   reference is ``torch.optim.AdamW`` followed, after every step, by the soft threshold
   ``w <- sign(w) * max(|w| - lr * lam, 0)`` written out by hand on ``head.weight`` only; the weights
   agree to 1e-6, the head has exact zeros where the reference has them, and the backbone (whose
   group ``BackboneFinetuning`` added) is left alone by the penalty.

    python examples/integrations/lightning_backbone_finetuning.py [--quick]
"""

from __future__ import annotations

import time

import _shared
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BackboneFinetuning
from torch import nn

import funcreg as fr

torch.set_num_threads(1)

LR, WD, LAM = 0.05, 0.1, 0.2


def data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = torch.tanh(x[:, :2] @ torch.tensor([[1.5], [-2.0]])) + 0.05 * torch.randn(64, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)


class FineTuner(pl.LightningModule):
    """kind: "funcreg", "torch" (AdamW), "funcreg-l1" or "torch-l1" (AdamW + a hand-written prox)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh())
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # BackboneFinetuning has frozen the backbone: only what still requires gradients goes in (the
        # callback skips, with a warning, parameters the optimizer already holds)
        trainable = {n: p for n, p in self.named_parameters() if p.requires_grad}
        if self.kind == "funcreg":
            return fr.create_optimizer(trainable, "adamw", lr=LR, weight_decay=WD)
        if self.kind == "funcreg-l1":
            penalty = fr.l1(LAM, mask=fr.by_name("head.weight"))
            return fr.create_optimizer(
                trainable, "adamw", lr=LR, weight_decay=0.0, penalty=penalty, form="proximal"
            )
        wd = WD if self.kind == "torch" else 0.0
        groups = [{"params": [self.head.weight]}, {"params": [self.head.bias], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=LR, weight_decay=wd)

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        if self.kind == "torch-l1":  # the reference: L1's proximal step by hand, after AdamW's step
            w, lr = self.head.weight, self.trainer.optimizers[0].param_groups[0]["lr"]
            with torch.no_grad():
                w.copy_(w.sign() * (w.abs() - lr * LAM).clamp_min(0.0))


def fit(kind: str, epochs: int, unfreeze_at: int) -> tuple[FineTuner, torch.optim.Optimizer]:
    model = FineTuner(kind)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=epochs,
        deterministic=True,
        callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=unfreeze_at, verbose=False)],
    )
    trainer.fit(model, data())
    return model, trainer.optimizers[0]


def dataset_loss(model: torch.nn.Module) -> float:
    x, y = data().dataset.tensors
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def main() -> None:
    args = _shared.parse_args(__doc__, timeout=120)
    _shared.quiet()

    epochs, unfreeze_at = (4, 1) if args.quick else (30, 5)
    start = time.perf_counter()
    initial = FineTuner("funcreg")
    ours, opt = fit("funcreg", epochs, unfreeze_at)
    print(f"{epochs} epochs of 4 batches, backbone unfrozen at epoch {unfreeze_at}; funcreg's groups:")
    for g in opt.param_groups:
        print(
            f"  {g.get('name', '(added)')!s:10} {g['param_names']}  lr {g['lr']:.4g}  weight_decay {g['weight_decay']}"
        )

    before, after = dataset_loss(initial), dataset_loss(ours)
    _shared.check("the loss falls", after < 0.5 * before, f"{before:.4f} -> {after:.4f}")
    moved = _shared.max_abs_diff(initial.backbone, ours.backbone)
    _shared.check("the backbone trains once unfrozen", moved > 1e-3, f"max |change| {moved:.3g}")
    _shared.check(
        "BackboneFinetuning added the backbone with add_param_group",
        len(opt.param_groups) == 3 and len(opt.param_groups[2]["params"]) == 4,
        f"{len(opt.param_groups)} groups",
    )

    reference, ref_opt = fit("torch", epochs, unfreeze_at)
    same_lr = [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
    _shared.check("the callback set the same learning rates as for torch.optim.AdamW", same_lr)
    diff = _shared.max_abs_diff(ours, reference)
    _shared.check(
        "funcreg == torch.optim.AdamW under BackboneFinetuning", diff <= 1e-6, f"max |diff| {diff:.2e}"
    )

    penalized, _ = fit("funcreg-l1", epochs, unfreeze_at)
    by_hand, _ = fit("torch-l1", epochs, unfreeze_at)
    diff = _shared.max_abs_diff(penalized, by_hand)
    _shared.check(
        "proximal L1 on head.weight == AdamW + a soft threshold by hand",
        diff <= 1e-6,
        f"max |diff| {diff:.2e}",
    )
    zeros, ref_zeros = penalized.head.weight == 0, by_hand.head.weight == 0
    _shared.check(
        "the head has exact zeros where the reference has them",
        bool(zeros.any()) and torch.equal(zeros, ref_zeros),
        f"{int(zeros.sum())} of {zeros.numel()} head weights are 0",
    )
    diff = _shared.max_abs_diff(penalized.backbone, by_hand.backbone)
    _shared.check(
        "the mask keeps the penalty off the backbone (the group BackboneFinetuning added)",
        diff <= 1e-6,
        f"backbone max |diff| {diff:.2e} against AdamW without a penalty there",
    )
    print(f"all checks passed (4 fits in {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
