"""funcreg where torch.optim goes: PyTorch Lightning, the Hugging Face Trainer, timm.

Each test skips when its framework is not installed (``pip install -e ".[integrations]"`` installs
them; CI runs this file in a step of its own). Models are tiny and built from configs, nothing is
downloaded, and every run is a few steps on the CPU. References are the frameworks' own runs with
``torch.optim.AdamW`` and the frameworks' own weight-decay rules.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import funcreg as fr

pytestmark = pytest.mark.filterwarnings("ignore")  # the frameworks' own deprecation and setup warnings


def _assert_equal(a: nn.Module, b: nn.Module) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.detach(), q.detach()), n


def _assert_close(a: nn.Module, b: nn.Module, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(
            q.detach(), p.detach(), atol=atol, rtol=rtol, msg=lambda m, n=n: f"{n}: {m}"
        )


# --- PyTorch Lightning ----------------------------------------------------------------------------------


def _lightning():
    pl = pytest.importorskip("lightning.pytorch")
    return pl


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


def _module_class(pl, optimizer: str):
    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.backbone = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh())
            self.head = nn.Linear(8, 1)
            self.logged: list[dict[str, float]] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            metrics = fr.metrics(self.optimizers().optimizer) if optimizer == "funcreg" else {}
            self.log_dict(metrics, on_step=True)  # fr.metrics: a flat dict of floats, as log_dict wants
            self.logged.append(metrics)
            return loss

        def configure_optimizers(self):
            params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
            if optimizer == "funcreg":
                opt = fr.TorchOptimizer(
                    params, "adamw", lr=0.05, weight_decay=0.1, penalty=fr.l1(1e-3), form="decoupled"
                )
            elif optimizer == "funcreg-plain":
                opt = fr.TorchOptimizer(params, "adamw", lr=0.05, weight_decay=0.1)
            else:
                opt = torch.optim.AdamW([p for _, p in params], lr=0.05, weight_decay=0.1)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Regressor


def _trainer(pl, tmp_path, max_epochs, callbacks=()):
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=list(callbacks),
        default_root_dir=str(tmp_path),
        deterministic=True,
    )


def test_lightning_fit_and_resume_is_bit_identical(tmp_path):
    pl = _lightning()
    Regressor = _module_class(pl, "funcreg")
    straight = Regressor()
    _trainer(pl, tmp_path / "a", 2).fit(straight, _loader())

    first = Regressor()
    trainer = _trainer(pl, tmp_path / "b", 1)
    trainer.fit(first, _loader())
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = Regressor()
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)  # other weights: they must all come from the checkpoint
    _trainer(pl, tmp_path / "c", 2).fit(resumed, _loader(), ckpt_path=str(tmp_path / "epoch1.ckpt"))
    _assert_equal(straight, resumed)
    assert straight.logged[-1]["group0/lr"] == resumed.logged[-1]["group0/lr"] == 0.05 * 0.5**2
    assert straight.logged[-1]["penalty/l1"] == resumed.logged[-1]["penalty/l1"] > 0


def test_lightning_matches_torch_adamw(tmp_path):
    pl = _lightning()
    ours, reference = _module_class(pl, "funcreg-plain")(), _module_class(pl, "torch")()
    _trainer(pl, tmp_path / "a", 2).fit(ours, _loader())
    _trainer(pl, tmp_path / "b", 2).fit(reference, _loader())
    _assert_close(reference, ours)


@pytest.mark.parametrize("optimizer", ["funcreg-plain", "torch"])
def test_lightning_backbone_finetuning_uses_add_param_group(tmp_path, optimizer):
    """BackboneFinetuning freezes the backbone, then unfreezes it with optimizer.add_param_group."""
    pl = _lightning()
    from lightning.pytorch.callbacks import BackboneFinetuning

    Regressor = _module_class(pl, optimizer)
    model = Regressor()
    _trainer(pl, tmp_path, 3, [BackboneFinetuning(unfreeze_backbone_at_epoch=1, verbose=False)]).fit(
        model, _loader()
    )
    opt = model.trainer.optimizers[0]
    assert len(opt.param_groups) == 2  # the head, then the unfrozen backbone
    if optimizer == "torch":
        return
    assert opt.param_groups[1]["param_names"] == ["2", "3", "4", "5"]
    assert (
        int(opt.state[model.backbone[0].weight]["step"]) == 8
        and int(opt.state[model.head.weight]["step"]) == 12
    )
    reference = _module_class(pl, "torch")()
    _trainer(pl, tmp_path / "r", 3, [BackboneFinetuning(unfreeze_backbone_at_epoch=1, verbose=False)]).fit(
        reference, _loader()
    )
    _assert_close(reference, model)


def test_lightning_backbone_finetuning_resume_follows_torch(tmp_path):
    """On resuming, BackboneFinetuning assigns optimizer.param_groups directly, then the state is loaded.

    torch.optim.AdamW itself does not resume bit-identically here (the callback restores the groups as
    they were at the start of the epoch it stored them in, lr included); funcreg must resume as it does.
    """
    pl = _lightning()
    from lightning.pytorch.callbacks import BackboneFinetuning

    def resumed_run(kind, out):
        # "plain": the callback's own state stores the groups' options, and Lightning pickles it; a
        # penalty object there would have to be picklable
        Regressor = _module_class(pl, kind)
        first = Regressor()
        trainer = _trainer(
            pl, out / "first", 2, [BackboneFinetuning(unfreeze_backbone_at_epoch=1, verbose=False)]
        )
        trainer.fit(first, _loader())
        trainer.save_checkpoint(out / "epoch2.ckpt")
        resumed = Regressor()
        trainer = _trainer(
            pl, out / "resumed", 3, [BackboneFinetuning(unfreeze_backbone_at_epoch=1, verbose=False)]
        )
        trainer.fit(resumed, _loader(), ckpt_path=str(out / "epoch2.ckpt"))
        return resumed, trainer.optimizers[0]

    ours, opt = resumed_run("funcreg-plain", tmp_path / "funcreg")
    reference, ref_opt = resumed_run("torch", tmp_path / "torch")
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
    assert int(opt.state[ours.backbone[0].weight]["step"]) == int(
        ref_opt.state[reference.backbone[0].weight]["step"]
    )
    _assert_close(reference, ours)


# --- Hugging Face transformers ----------------------------------------------------------------------


def _transformers():
    return pytest.importorskip("transformers")


def _tiny_configs(tf):
    small = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16}
    return {
        "bert": (tf.BertModel, tf.BertConfig(vocab_size=30, max_position_embeddings=16, **small)),
        "gpt2": (
            tf.GPT2LMHeadModel,
            tf.GPT2Config(vocab_size=30, n_positions=16, n_embd=8, n_layer=1, n_head=2),
        ),
        "llama": (
            tf.LlamaForCausalLM,
            tf.LlamaConfig(vocab_size=30, max_position_embeddings=16, num_key_value_heads=2, **small),
        ),
        "t5": (tf.T5Model, tf.T5Config(vocab_size=30, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)),
        "vit": (tf.ViTModel, tf.ViTConfig(image_size=8, patch_size=4, **small)),
        "deit": (tf.DeiTModel, tf.DeiTConfig(image_size=8, patch_size=4, **small)),
        "swin": (
            tf.SwinModel,
            tf.SwinConfig(image_size=8, patch_size=2, embed_dim=8, depths=[1], num_heads=[2], window_size=2),
        ),
        "convnext": (
            tf.ConvNextModel,
            tf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2),
        ),
        "resnet": (tf.ResNetModel, tf.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])),
    }


# Where fr.decay_mask deliberately differs from the HF Trainer (which decays everything but biases and
# LayerNorm/RMSNorm parameters): tokens and position embeddings held as bare parameters, layer scale,
# BatchNorm scales. Name -> a word of funcreg's reason.
DELIBERATE = {
    "vit": {"embeddings.cls_token": "token", "embeddings.position_embeddings": "position"},
    "deit": {
        "embeddings.cls_token": "token",
        "embeddings.distillation_token": "token",
        "embeddings.position_embeddings": "position",
    },
    "convnext": {
        "encoder.stages.0.layers.0.layer_scale_parameter": "layer scale",
        "encoder.stages.1.layers.0.layer_scale_parameter": "layer scale",
    },
    "resnet": {
        "embedder.embedder.normalization.weight": "BatchNorm",
        "encoder.stages.0.layers.0.layer.0.normalization.weight": "BatchNorm",
        "encoder.stages.0.layers.0.layer.1.normalization.weight": "BatchNorm",
        "encoder.stages.0.layers.0.layer.2.normalization.weight": "BatchNorm",
    },
}


def test_decay_mask_against_the_hf_trainers_rule():
    tf = _transformers()
    from transformers import Trainer

    for name, (cls, config) in _tiny_configs(tf).items():
        model = cls(config)
        hf = set(Trainer.get_decay_parameter_names(None, model))  # the Trainer's own rule (self is unused)
        sel = fr.decay_mask(model)
        differ = {n: sel.reason(n) for n in sel if sel[n] != (n in hf)}
        expected = DELIBERATE.get(name, {})
        assert set(differ) == set(expected), (name, differ)
        for n, word in expected.items():
            assert n in hf and not sel[n] and word in differ[n], (name, n, differ[n])


def _hf_data(n: int = 24):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (n, 6), generator=g)
    labels = (ids.sum(dim=1) % 2).long()
    return [
        {"input_ids": i, "attention_mask": torch.ones(6, dtype=torch.long), "labels": y}
        for i, y in zip(ids, labels)
    ]


def _hf_model(tf):
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


def _hf_trainer(tf, tmp_path, model, max_steps=6, **kwargs):
    args = tf.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        weight_decay=0.1,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=3,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return tf.Trainer(model=model, args=args, train_dataset=_hf_data(), **kwargs)


def _cls_and_kwargs():
    return (fr.TorchOptimizer, {"tx": "adamw", "lr": 5e-3})


def test_hf_trainer_optimizer_cls_and_kwargs_matches_its_adamw(tmp_path):
    tf = _transformers()
    reference, ours = _hf_model(tf), _hf_model(tf)
    _hf_trainer(tf, tmp_path / "a", reference).train()  # the Trainer's default, torch.optim.AdamW
    trainer = _hf_trainer(tf, tmp_path / "b", ours, optimizer_cls_and_kwargs=_cls_and_kwargs())
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, fr.TorchOptimizer)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # the Trainer's decay groups
    _assert_close(reference, ours)


def test_hf_trainer_names_from_the_model_a_masked_penalty_by_parameter_name(tmp_path):
    """The Trainer hands TorchOptimizer plain tensors in its decay / no-decay groups; ``names_from=`` names
    them, so a penalty masked by name (decoupled L2 on the classifier, 0.2 beside the Trainer's 0.1)
    acts where it says: the reference is torch.optim.AdamW with the classifier in a group of its own
    at weight_decay 0.3, under the Trainer's linear schedule."""
    tf = _transformers()
    reference, ours = _hf_model(tf), _hf_model(tf)
    named = dict(reference.named_parameters())
    decayed = set(tf.Trainer.get_decay_parameter_names(None, reference))
    groups = [
        {"params": [named["classifier.weight"]], "weight_decay": 0.3},
        {
            "params": [p for n, p in named.items() if n in decayed and n != "classifier.weight"],
            "weight_decay": 0.1,
        },
        {"params": [p for n, p in named.items() if n not in decayed], "weight_decay": 0.0},
    ]
    torch_opt = torch.optim.AdamW(groups, lr=5e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda step: 1.0 - step / 6)
    _hf_trainer(tf, tmp_path / "a", reference, optimizers=(torch_opt, sched)).train()
    kwargs = {
        "tx": "adamw",
        "lr": 5e-3,
        "names_from": ours,
        "penalty": fr.l2(0.2, mask=fr.by_name("classifier.weight")),
        "form": "decoupled",
    }
    trainer = _hf_trainer(tf, tmp_path / "b", ours, optimizer_cls_and_kwargs=(fr.TorchOptimizer, kwargs))
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert "classifier.weight" in opt.param_groups[0]["param_names"]
    _assert_close(reference, ours)


@pytest.mark.parametrize("how", ["optimizers", "optimizer_cls_and_kwargs"])
def test_hf_trainer_resume_from_checkpoint_is_bit_identical(tmp_path, how):
    tf = _transformers()

    def make(model, out):
        if how == "optimizers":
            opt = fr.create_optimizer(model, "adamw", lr=5e-3, weight_decay=0.1)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / 6)
            return _hf_trainer(tf, out, model, optimizers=(opt, sched))
        return _hf_trainer(tf, out, model, optimizer_cls_and_kwargs=_cls_and_kwargs())

    straight = _hf_model(tf)
    make(straight, tmp_path / "a").train()
    first = _hf_model(tf)
    make(first, tmp_path / "b").train()  # saves checkpoint-3 and checkpoint-6
    resumed = _hf_model(tf)
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)
    make(resumed, tmp_path / "c").train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    _assert_equal(straight, resumed)


# --- timm ------------------------------------------------------------------------------------------


def test_timm_param_groups_through_torch_optimizer():
    """timm's param_groups_weight_decay feeds TorchOptimizer as it feeds torch.optim.AdamW."""
    timm = pytest.importorskip("timm")  # timm imports torchvision, which needs a build for this torch
    from timm.optim import param_groups_weight_decay

    def vit():
        torch.manual_seed(0)
        return timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=16,
            patch_size=8,
            depth=1,
            embed_dim=16,
            num_heads=2,
            num_classes=3,
        )

    m1, m2 = vit(), vit()
    ref = torch.optim.AdamW(param_groups_weight_decay(m1, 0.05, m1.no_weight_decay()), lr=1e-3)
    ours = fr.TorchOptimizer(param_groups_weight_decay(m2, 0.05, m2.no_weight_decay()), "adamw", lr=1e-3)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for model, opt in ((m1, ref), (m2, ours)):
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    _assert_close(m1, m2)
    # and fr.decay_mask reads the same rule from the model
    no_decay = {
        n for n, p in m1.named_parameters() if p.ndim <= 1 or n.endswith(".bias") or n in m1.no_weight_decay()
    }
    assert set(fr.decay_mask(m1).unselected) == no_decay
