"""The Hugging Face ``Trainer`` builds ``fr.TorchOptimizer``, and a penalty masked by name finds its target.

A tiny ``BertForSequenceClassification`` built from a ``BertConfig`` (vocabulary 30, hidden size 8,
one layer, two heads, no dropout: nothing is downloaded) learns the parity of generated token ids with
``transformers.Trainer`` and

    optimizer_cls_and_kwargs=(fr.TorchOptimizer, {"tx": "adamw", "lr": LR, "names_from": model,
                               "penalty": fr.l2(0.2, mask=fr.by_name("classifier.weight")),
                               "form": "decoupled"})

The Trainer builds the optimizer from its own two groups (``weight_decay=args.weight_decay`` on
``Trainer.get_decay_parameter_names``, 0 on the rest) and hands it plain tensors; ``names_from=model``
names them as ``model.named_parameters()`` does, so the mask finds ``classifier.weight``. (The key is
not ``"model"``: the Trainer takes a ``"model"`` entry of these kwargs, for LOMO, as the parameters
themselves, and its groups would be lost.) The Trainer's linear learning-rate schedule drives the
groups' ``lr``.

What it checks: the result equals the same Trainer given ``optimizers=(torch.optim.AdamW(groups),
LambdaLR(1 - step / max_steps))``, where ``classifier.weight`` has a group of its own at weight decay
0.1 + 0.2 (a decoupled L2 of 0.2 is AdamW's decay of 0.2), the Trainer's other decayed parameters 0.1,
the rest 0; to 1e-6. It also checks that the optimizer the Trainer built is a ``fr.TorchOptimizer``
with the Trainer's two groups and ``classifier.weight`` named in the first, and that the penalty made
a difference (the run without it ends elsewhere).

    python examples/integrations/hf_trainer_masked_penalty.py [--quick]
"""

from __future__ import annotations

import tempfile
import time

import _shared
import torch
import transformers as tf

import funcreg as fr

torch.set_num_threads(1)

LR, WD, EXTRA = 5e-3, 0.1, 0.2


def dataset(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (n, 6), generator=g)
    labels = (ids.sum(dim=1) % 2).long()
    mask = torch.ones(6, dtype=torch.long)
    return [{"input_ids": i, "attention_mask": mask, "labels": y} for i, y in zip(ids, labels)]


def bert() -> tf.BertForSequenceClassification:
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return tf.BertForSequenceClassification(config)


def train(model: torch.nn.Module, out: str, steps: int, **optimizer: object) -> torch.optim.Optimizer:
    args = tf.TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=LR,
        weight_decay=WD,
        lr_scheduler_type="linear",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    trainer = tf.Trainer(model=model, args=args, train_dataset=dataset(4 * steps), **optimizer)
    trainer.remove_callback(tf.PrinterCallback)  # its end-of-training line of speeds
    trainer.train()
    opt = trainer.optimizer
    return getattr(opt, "optimizer", opt)  # accelerate wraps it


def main() -> None:
    args = _shared.parse_args(__doc__, timeout=120)
    _shared.quiet()
    steps = 6 if args.quick else 30
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:  # the Trainer's output_dir; nothing is saved there
        ours = bert()
        penalty = fr.l2(EXTRA, mask=fr.by_name("classifier.weight"))
        kwargs = {"tx": "adamw", "lr": LR, "names_from": ours, "penalty": penalty, "form": "decoupled"}
        opt = train(ours, out, steps, optimizer_cls_and_kwargs=(fr.TorchOptimizer, kwargs))

        reference = bert()
        named = dict(reference.named_parameters())
        decayed = set(tf.Trainer.get_decay_parameter_names(None, reference))
        groups = [
            {"params": [named["classifier.weight"]], "weight_decay": WD + EXTRA},
            {"params": [p for n, p in named.items() if n in decayed and n != "classifier.weight"]},
            {"params": [p for n, p in named.items() if n not in decayed], "weight_decay": 0.0},
        ]
        torch_opt = torch.optim.AdamW(groups, lr=LR, weight_decay=WD)
        sched = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda step: 1.0 - step / steps)
        train(reference, out, steps, optimizers=(torch_opt, sched))

        plain = bert()
        train(plain, out, steps, optimizer_cls_and_kwargs=(fr.TorchOptimizer, {"tx": "adamw", "lr": LR}))

    print(f"{steps} Trainer steps, batch 4; funcreg's groups as the Trainer built them:")
    for i, g in enumerate(opt.param_groups):
        names = g["param_names"]
        print(
            f"  group {i}: weight_decay {g['weight_decay']}, {len(names)} parameters: {', '.join(names[:3])}, ..."
        )
    _shared.check(
        "the Trainer built a fr.TorchOptimizer", isinstance(opt, fr.TorchOptimizer), type(opt).__name__
    )
    _shared.check(
        "the Trainer's two groups, at weight decay 0.1 and 0",
        [g["weight_decay"] for g in opt.param_groups] == [WD, 0.0],
        f"{[len(g['params']) for g in opt.param_groups]} parameters",
    )
    _shared.check(
        "names_from= named the Trainer's tensors: classifier.weight is in the decay group",
        "classifier.weight" in opt.param_groups[0]["param_names"],
    )
    _shared.check(
        "the lr schedule ran to its end", opt.param_groups[0]["lr"] == 0.0, f"lr {opt.param_groups[0]['lr']}"
    )
    diff = _shared.max_abs_diff(ours, reference)
    _shared.check(
        "funcreg + masked decoupled L2 == torch.optim.AdamW with classifier.weight at weight decay 0.3",
        diff <= 1e-6,
        f"max |diff| {diff:.2e}",
    )
    effect = abs(
        ours.classifier.weight.detach().norm().item() - plain.classifier.weight.detach().norm().item()
    )
    _shared.check(
        "the penalty changed the classifier's weights", effect > 1e-6, f"|norm change| {effect:.2e}"
    )
    print(f"all checks passed (3 Trainer runs in {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
