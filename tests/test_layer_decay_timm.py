"""``fr.layer_decay_groups`` against timm's own ``param_groups_layer_decay``, on a ViT and a ConvNeXt
built by timm from configs (no weights): the same groups (parameter names), ``lr_scale`` and
``weight_decay``, with the model's ``no_weight_decay()`` list as ``timm.optim.create_optimizer_v2``
passes it.

timm needs a torchvision that imports beside the torch it runs on; the CPU build of torch that the
rest of the suite uses has none, so CI runs this file in a second environment (torch 2.14.1 with
torchvision 0.29.1 and timm, see ``.ci/run``). Elsewhere it is skipped.
"""

from __future__ import annotations

import pytest

timm = pytest.importorskip("timm")
from timm.optim import param_groups_layer_decay  # noqa: E402

import funcreg as fr  # noqa: E402

MODELS = [
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 4, "num_classes": 10}),
    ("convnext_atto", {"num_classes": 10}),
    ("deit_tiny_distilled_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 3, "num_classes": 10}),
]


def _timm_groups(model, decay, wd):
    groups = param_groups_layer_decay(
        model,
        weight_decay=wd,
        layer_decay=decay,
        no_weight_decay_list=getattr(model, "no_weight_decay", lambda: set())(),
    )
    by_param = {id(p): n for n, p in model.named_parameters()}
    return {
        frozenset(by_param[id(p)] for p in g["params"]): (
            pytest.approx(g["lr_scale"], rel=1e-12),
            g["weight_decay"],
        )
        for g in groups
    }


@pytest.mark.parametrize(("name", "config"), MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("decay", [0.75, 0.5])
def test_the_groups_equal_timms_param_groups_layer_decay(name, config, decay):
    model = timm.create_model(name, pretrained=False, **config)
    ours = {
        frozenset(n for n, _ in g["params"]): (g["lr_scale"], g["weight_decay"])
        for g in fr.layer_decay_groups(model, decay, 0.05)
    }
    assert ours == _timm_groups(model, decay, 0.05)
    assert len(ours) > 4  # several layers, each with decayed and undecayed parameters
