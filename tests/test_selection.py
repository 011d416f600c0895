"""params_of, decay_mask, by_name, by_predicate, Selection algebra, and selections used as masks."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import (
    SLOW_OK,
    assert_lists_close,
    assert_tensors_close,
    detached,
    leaves,
    run_funcreg,
    run_torch,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import funcreg as fr
from funcreg.testing import gradient_sequences


class Scale(nn.Module):
    """A custom module with a 2-D weight: only its name says it is a norm layer."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, n))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.gn = nn.GroupNorm(2, 4)
        self.rms = nn.RMSNorm(4)
        self.ln_f = Scale(4)
        self.bn1 = Scale(2)
        self.head = nn.Linear(4, 2, bias=False)


# name -> (decayed, a word the reason must contain), written out by hand from the rules
EXPECTED = {
    "embed.weight": (True, "ndim 2"),
    "conv.weight": (True, "ndim 4"),
    "conv.bias": (False, "bias"),
    "bn.weight": (False, "BatchNorm2d"),
    "bn.bias": (False, "BatchNorm2d"),
    "fc.weight": (True, "ndim 2"),
    "fc.bias": (False, "bias"),
    "ln.weight": (False, "LayerNorm"),
    "ln.bias": (False, "LayerNorm"),
    "gn.weight": (False, "GroupNorm"),
    "gn.bias": (False, "GroupNorm"),
    "rms.weight": (False, "RMSNorm"),
    "ln_f.weight": (False, "'ln_f'"),
    "bn1.weight": (False, "'bn1'"),
    "head.weight": (True, "ndim 2"),
}


def shape_text(t: torch.Tensor) -> str:
    return "x".join(str(d) for d in t.shape)


# --- params_of ----------------------------------------------------------------------------------------


def test_params_of_is_named_parameters_detached_and_shared():
    model = Net()
    params = fr.params_of(model)
    assert list(params) == [n for n, _ in model.named_parameters()] == list(EXPECTED)
    for name, p in model.named_parameters():
        assert not params[name].requires_grad
        assert params[name].data_ptr() == p.data_ptr() and params[name].shape == p.shape


def test_params_of_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fr.params_of({"w": torch.zeros(1)})


# --- decay_mask ---------------------------------------------------------------------------------------


def test_decay_mask_decides_by_type_name_bias_and_ndim():
    sel = fr.decay_mask(Net())
    assert dict(sel) == {k: v for k, (v, _) in EXPECTED.items()}
    assert sel.selected == [k for k, (v, _) in EXPECTED.items() if v]
    assert sel.unselected == [k for k, (v, _) in EXPECTED.items() if not v]
    for name, (_, word) in EXPECTED.items():
        assert word in sel.reason(name), (name, sel.reason(name))


def test_decay_mask_table_lists_names_shapes_decisions_reasons():
    model = Net()
    sel = fr.decay_mask(model)
    lines = str(sel).splitlines()
    assert lines[0].split() == ["name", "shape", "decay", "reason"]
    assert len(lines) == 1 + len(EXPECTED)
    for line, (name, p) in zip(lines[1:], model.named_parameters()):
        decided, word = EXPECTED[name]
        cells = line.split(maxsplit=3)
        assert cells[:3] == [name, shape_text(p), "yes" if decided else "no"], line
        assert word in cells[3], line


def test_decay_mask_exclude_globs_and_module_prefixes():
    sel = fr.decay_mask(Net(), exclude=["embed", "head.*"])
    assert sel.selected == ["conv.weight", "fc.weight"]
    assert sel.reason("embed.weight") == "excluded by 'embed'"
    assert sel.reason("head.weight") == "excluded by 'head.*'"
    with pytest.raises(ValueError, match="selects no parameter"):
        fr.decay_mask(Net(), exclude="*.weight")


def test_decay_mask_exclude_matching_nothing_raises_with_a_suggestion():
    with pytest.raises(
        ValueError, match=r"exclude pattern 'embd' matches no parameter \(did you mean [^)]*'embed'"
    ):
        fr.decay_mask(Net(), exclude=["embd"])
    with pytest.raises(
        ValueError, match=r"exclude pattern 'zzz' matches no parameter \(names are: [^)]*'embed"
    ):
        fr.decay_mask(Net(), exclude=["zzz"])
    # a module prefix is a whole dotted component: "emb" is not "embed"
    with pytest.raises(ValueError, match="'emb'"):
        fr.decay_mask(Net(), exclude=["emb"])


def test_decay_mask_that_selects_nothing_raises():
    with pytest.raises(ValueError, match="selects no parameter"):
        fr.decay_mask(nn.Sequential(nn.LayerNorm(3), nn.BatchNorm1d(3)))


# regression test: the library once failed this
def test_decay_mask_root_model_class_name_does_not_make_its_weights_norm_parameters():
    class NormalizingFlow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W = nn.Parameter(torch.ones(3, 3))
            self.fc = nn.Linear(3, 3)

    assert fr.decay_mask(NormalizingFlow()).selected == ["W", "fc.weight"]


def test_decay_mask_on_a_parameter_tree_uses_names_and_ndim():
    params = {
        "encoder": {
            "linear": {"weight": torch.zeros(3, 3), "bias": torch.zeros(3)},
            "norm": {"weight": torch.zeros(3, 3)},
        },
        "scale": torch.zeros(3),
        "blocks": [{"ln_1": {"weight": torch.zeros(2, 2)}, "mlp": {"weight": torch.zeros(2, 3)}}],
    }
    sel = fr.decay_mask(params)
    assert dict(sel) == {
        "encoder.linear.weight": True,
        "encoder.linear.bias": False,
        "encoder.norm.weight": False,  # by name
        "scale": False,  # ndim 1
        "blocks.0.ln_1.weight": False,  # by name
        "blocks.0.mlp.weight": True,
    }
    assert fr.decay_mask(fr.params_of(Net())).selected == fr.decay_mask(Net()).selected


# --- by_name, by_predicate ----------------------------------------------------------------------------


def test_by_name_globs_prefixes_and_exclude():
    model = Net()
    assert fr.by_name("*.weight", exclude=["bn*", "ln*", "gn", "rms"])(model).selected == [
        "embed.weight",
        "conv.weight",
        "fc.weight",
        "head.weight",
    ]
    assert fr.by_name("fc")(model).selected == ["fc.weight", "fc.bias"]
    sel = fr.by_name("conv.*")(model)
    assert sel.reason("conv.bias") == "matches 'conv.*'" and sel.reason("fc.bias") == "matches no pattern"


def test_by_name_errors():
    model = Net()
    with pytest.raises(
        ValueError, match=re.escape("by_name pattern 'hed.*' matches no parameter (did you mean")
    ):
        fr.by_name("hed.*")(model)
    with pytest.raises(ValueError, match="exclude pattern 'nothing' matches no parameter"):
        fr.by_name("*", exclude=["nothing"])(model)
    with pytest.raises(ValueError, match="selects no parameter"):
        fr.by_name("fc", exclude=["fc.*"])(model)
    with pytest.raises(ValueError, match="at least one pattern"):
        fr.by_name()


def test_by_predicate():
    model = Net()
    sel = fr.by_predicate(lambda name, w: w.ndim >= 3, "ndim >= 3")(model)
    assert sel.selected == ["conv.weight"]
    assert sel.reason("conv.weight") == "ndim >= 3 is True"
    with pytest.raises(ValueError, match="selects no parameter"):
        fr.by_predicate(lambda name, w: w.ndim > 4)(model)
    with pytest.raises(TypeError, match="callable"):
        fr.by_predicate("ndim >= 2")


# --- Selection algebra --------------------------------------------------------------------------------


@settings(deadline=None, max_examples=50, suppress_health_check=SLOW_OK)
@given(data=st.data())
def test_selection_not_and_or(data):
    names = data.draw(
        st.lists(
            st.from_regex(r"[a-z]{1,4}(\.[a-z]{1,3})?", fullmatch=True), min_size=1, max_size=6, unique=True
        )
    )
    a = fr.Selection(
        dict(zip(names, data.draw(st.lists(st.booleans(), min_size=len(names), max_size=len(names)))))
    )
    b = fr.Selection(
        dict(zip(names, data.draw(st.lists(st.booleans(), min_size=len(names), max_size=len(names)))))
    )
    assert dict(~a) == {n: not a[n] for n in names}
    assert dict(a & b) == {n: a[n] and b[n] for n in names}
    assert dict(a | b) == {n: a[n] or b[n] for n in names}
    assert dict(~(a & b)) == dict(~a | ~b)  # De Morgan
    assert list(a & b) == names  # order kept


def test_selection_combination_keeps_reasons_and_rejects_other_names():
    model = Net()
    both = fr.decay_mask(model) & ~fr.by_name("embed")(model)
    assert both.selected == ["conv.weight", "fc.weight", "head.weight"]
    assert "not (matches 'embed')" in both.reason("embed.weight")
    with pytest.raises(ValueError, match="different names"):
        fr.Selection({"a": True}) | fr.Selection({"b": True})


# --- selections as masks ------------------------------------------------------------------------------


@settings(deadline=None, max_examples=10, suppress_health_check=SLOW_OK)
@given(data=st.data(), lr=st.floats(1e-3, 0.5), wd=st.floats(1e-3, 1.0))
def test_decay_mask_in_adamw_equals_torch_adamw_param_groups(data, lr, wd):
    model = Net().double()
    params = fr.params_of(model)
    grads = data.draw(gradient_sequences(params, st.integers(1, 5)))
    decayed = [k for k, (v, _) in EXPECTED.items() if v]
    new_params, _ = run_funcreg(fr.adamw(lr, weight_decay=wd, mask=fr.decay_mask(model)), params, grads)

    def make(ps):
        named = dict(zip(params, ps))
        return torch.optim.AdamW(
            [
                {"params": [named[k] for k in params if k in decayed]},
                {"params": [named[k] for k in params if k not in decayed], "weight_decay": 0.0},
            ],
            lr=lr,
            weight_decay=wd,
        )

    ps, _ = run_torch(make, params, grads)
    assert_lists_close(leaves(new_params), detached(ps), "params")


@settings(deadline=None, max_examples=10, suppress_health_check=SLOW_OK)
@given(data=st.data(), wd=st.floats(1e-3, 1.0))
def test_selector_and_selection_as_masks_in_masked(data, wd):
    model = Net().double()
    params = fr.params_of(model)
    grads = data.draw(gradient_sequences(params, st.just(1)))[0]
    selector = fr.by_name("*.weight", exclude=["bn*", "ln*", "gn", "rms"])
    chosen = ["embed.weight", "conv.weight", "fc.weight", "head.weight"]
    for mask in (selector, selector(model), selector(params)):
        tx = fr.masked(fr.add_decayed_weights(wd), mask)
        u, _ = tx.update(grads, tx.init(params), params)
        for k in params:
            expected = grads[k] + wd * params[k] if k in chosen else grads[k]
            assert_tensors_close(u[k], expected, k)
            if k not in chosen:
                assert torch.equal(u[k], grads[k])


def test_story4_weight_decay_1_shrinks_w_compared_with_0():
    """x 3x4, W 4x5, loss = sum(x @ W), one SGD step with lr 0.1: decay 1 gives W_1 = W - 0.1 (G + W)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W = nn.Parameter(torch.randn(4, 5, generator=gen, dtype=torch.float64))
            self.bias = nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.W + self.bias

    model = Tiny()
    params = fr.params_of(model)
    mask = fr.decay_mask(model)
    assert mask.selected == ["W"] and "bias" in mask.reason("bias")

    def loss(p):
        return torch.func.functional_call(model, p, (x,)).sum()

    grads = torch.func.grad(loss)(params)
    # d/dW sum_n,j (x W)_nj = x^T 1 : every column of G is the column sums of x; d/dbias = 3 per entry
    G = x.sum(dim=0, keepdim=True).T.expand(4, 5)
    assert_tensors_close(grads["W"], G.contiguous(), "dL/dW")
    assert_tensors_close(grads["bias"], torch.full((5,), 3.0, dtype=torch.float64), "dL/dbias")

    def step(weight_decay):
        tx = fr.chain(fr.add_decayed_weights(weight_decay, mask=mask), fr.sgd(0.1))
        u, _ = tx.update(grads, tx.init(params), params)
        return fr.apply_updates(params, u)

    no_decay, decay = step(0.0), step(1.0)
    W = params["W"]
    assert_tensors_close(no_decay["W"], W - 0.1 * G, "W, decay 0")
    assert_tensors_close(decay["W"], 0.9 * W - 0.1 * G, "W, decay 1")
    assert_tensors_close(decay["W"] - no_decay["W"], -0.1 * W, "the decay's effect")
    assert torch.equal(decay["bias"], no_decay["bias"])  # the bias is excluded
    # the same step with torch.optim param groups
    opt_model = Tiny()
    opt_model.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(
        [{"params": [opt_model.W], "weight_decay": 1.0}, {"params": [opt_model.bias], "weight_decay": 0.0}],
        lr=0.1,
    )
    opt_model(x).sum().backward()
    opt.step()
    assert_tensors_close(decay["W"], opt_model.W.detach(), "vs torch SGD")
    assert_tensors_close(decay["bias"], opt_model.bias.detach(), "bias vs torch SGD")


# --- conventions read from the model: no_weight_decay(), tokens, relative positions, layer scale ---------


def timm_no_decay(model: nn.Module, no_weight_decay_list=()) -> set[str]:
    """timm's rule, written out from timm/optim/_param_groups.py (param_groups_weight_decay):
    ``param.ndim <= 1 or name.endswith(".bias") or fnmatch(name, pattern)`` for a pattern of the list,
    the list being ``model.no_weight_decay()`` in ``create_optimizer_v2``."""
    import fnmatch

    return {
        n
        for n, p in model.named_parameters()
        if p.ndim <= 1 or n.endswith(".bias") or any(fnmatch.fnmatch(n, pat) for pat in no_weight_decay_list)
    }


class TimmViT(nn.Module):
    """The parameter names of timm's VisionTransformer/DeiT, and its no_weight_decay()."""

    def __init__(self, distilled: bool = False) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        if distilled:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, 8, 4, 4)
        block = nn.Module()
        block.norm1, block.norm2 = nn.LayerNorm(8), nn.LayerNorm(8)
        block.attn = nn.Module()
        block.attn.qkv, block.attn.proj = nn.Linear(8, 24), nn.Linear(8, 8)
        block.ls1 = nn.Module()
        block.ls1.gamma = nn.Parameter(torch.ones(8))
        block.mlp = nn.Module()
        block.mlp.fc1, block.mlp.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.blocks = nn.Sequential(block)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}  # timm lists dist_token whether or not it exists


class TimmSwin(nn.Module):
    """timm's SwinTransformer names: relative position bias tables in the blocks, absolute_pos_embed."""

    def __init__(self) -> None:
        super().__init__()
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        block = nn.Module()
        block.norm1 = nn.LayerNorm(8)
        block.attn = nn.Module()
        block.attn.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
        block.attn.qkv = nn.Linear(8, 24)
        self.layers = nn.Sequential(nn.Sequential(block))
        self.head = nn.Linear(8, 3)

    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed"}

    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table"}


class TimmConvNeXt(nn.Module):
    """timm's ConvNeXt block: a per-channel layer scale named gamma, a conv kernel, a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, 2)
        block = nn.Module()
        block.conv_dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        block.norm = nn.LayerNorm(8)
        block.mlp = nn.Module()
        block.mlp.fc1, block.mlp.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        block.gamma = nn.Parameter(torch.ones(8))
        self.stages = nn.Sequential(block)
        self.head = nn.Linear(8, 3)


@pytest.mark.parametrize(
    "make",
    [TimmViT, lambda: TimmViT(distilled=True), TimmSwin, TimmConvNeXt],
    ids=["vit", "deit", "swin", "convnext"],
)
def test_decay_mask_matches_timm_with_the_models_no_weight_decay(make):
    model = make()
    listed = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    keywords = set(model.no_weight_decay_keywords()) if hasattr(model, "no_weight_decay_keywords") else set()
    timm = timm_no_decay(model, listed) | {
        n for n, _ in model.named_parameters() if any(k in n for k in keywords)
    }
    sel = fr.decay_mask(model)
    assert set(sel.unselected) == timm
    if isinstance(model, TimmViT):
        assert sel.reason("cls_token") == "model.no_weight_decay() lists 'cls_token'"
        if not hasattr(model, "dist_token"):  # listed but absent: tolerated, and reported
            assert sel.notes == (
                "model.no_weight_decay() lists 'dist_token', which matches no parameter of this model (ignored)",
            )
            assert "note: model.no_weight_decay() lists 'dist_token'" in str(sel)
    # the name rules alone reach the same decision (a model that lists nothing, or a parameter tree)
    assert set(fr.decay_mask(model, model_rules=False).unselected) == timm
    assert set(fr.decay_mask(fr.params_of(model)).unselected) == timm


def test_decay_mask_honours_no_weight_decay_of_submodules_and_keeps_user_excludes_strict():
    class Wrapper(nn.Module):  # a LightningModule-style wrapper around a timm backbone
        def __init__(self) -> None:
            super().__init__()
            self.backbone = TimmViT()
            self.classifier = nn.Linear(3, 2)

    sel = fr.decay_mask(Wrapper())
    assert not sel["backbone.cls_token"] and not sel["backbone.pos_embed"]
    assert sel.reason("backbone.pos_embed") == "backbone.no_weight_decay() lists 'pos_embed'"
    assert sel.notes == (
        "backbone.no_weight_decay() lists 'dist_token', which matches no parameter of this model (ignored)",
    )
    # what used to be the workaround: an explicit exclude of names the model lacks stays an error
    vit = TimmViT()
    with pytest.raises(ValueError, match="exclude pattern 'dist_token' matches no parameter"):
        fr.decay_mask(vit, exclude=vit.no_weight_decay())


def test_decay_mask_name_rules_for_tokens_relative_positions_and_layer_scale():
    """Models that do not list anything: T5's relative_attention_bias, HF's ViT tokens, layer scales."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = nn.Module()
            self.embeddings.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.embeddings.position_embeddings = nn.Parameter(
                torch.zeros(1, 3, 4)
            )  # HF ViT: a bare parameter
            self.embeddings.word = nn.Embedding(10, 4)
            self.pos = nn.Module()
            self.pos.position_embeddings = nn.Embedding(8, 4)  # BERT: an Embedding table, decayed
            self.attention = nn.Module()
            self.attention.relative_attention_bias = nn.Embedding(32, 2)  # T5
            self.attention.rel_pos_h = nn.Parameter(torch.zeros(7, 4))  # SAM
            self.layer = nn.Module()
            self.layer.layer_scale_parameter = nn.Parameter(torch.ones(4))  # HF ConvNeXt
            self.layer.lambda1 = nn.Parameter(torch.ones(4))  # HF DINOv2
            self.layer.dense = nn.Linear(4, 4)

    sel = fr.decay_mask(Model())
    assert sel.selected == ["embeddings.word.weight", "pos.position_embeddings.weight", "layer.dense.weight"]
    assert sel.reason("embeddings.cls_token") == "token or position embedding ('cls_token')"
    assert (
        sel.reason("embeddings.position_embeddings") == "token or position embedding ('position_embeddings')"
    )
    assert (
        sel.reason("attention.relative_attention_bias.weight")
        == "relative position bias ('relative_attention_bias')"
    )
    assert sel.reason("attention.rel_pos_h") == "relative position bias ('rel_pos_h')"
    assert sel.reason("layer.layer_scale_parameter") == "layer scale ('layer_scale_parameter')"
    assert sel.reason("layer.lambda1") == "layer scale ('lambda1')"


def test_decay_mask_on_parametrized_weights():
    """weight_norm: decay the magnitude g, not the direction v; orthogonal and spectral_norm: neither."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = nn.Sequential(
        parametrizations.weight_norm(nn.Linear(3, 4)),
        parametrizations.orthogonal(nn.Linear(4, 4)),
        parametrizations.spectral_norm(nn.Linear(4, 2)),
        nn.Linear(2, 2),
    )
    sel = fr.decay_mask(model)
    assert sel.selected == ["0.parametrizations.weight.original0", "3.weight"]
    assert "weight_norm magnitude g of '0.weight'" in sel.reason("0.parametrizations.weight.original0")
    assert "weight_norm direction v" in sel.reason("0.parametrizations.weight.original1")
    assert "orthogonal" in sel.reason("1.parametrizations.weight.original")
    assert "spectral_norm" in sel.reason("2.parametrizations.weight.original")
    # why: the weight does not change when v or the spectral_norm original is scaled
    with torch.no_grad():
        w0, w2 = model[0].weight.clone(), model[2].weight.clone()
        model[0].parametrizations.weight.original1.mul_(0.5)
        model[2].parametrizations.weight.original.mul_(0.5)
        torch.testing.assert_close(model[0].weight, w0, atol=1e-6, rtol=1e-6)
        model[2].eval()  # no power iteration: the same u and v
        torch.testing.assert_close(model[2].weight, w2, atol=1e-6, rtol=1e-6)
    # the old hook-based helpers, named weight_g/weight_v and weight_orig
    with pytest.warns(FutureWarning):
        old = nn.Sequential(
            torch.nn.utils.weight_norm(nn.Linear(3, 4)), torch.nn.utils.spectral_norm(nn.Linear(4, 2))
        )
    assert fr.decay_mask(old).selected == ["0.weight_g"]


# --- by_module: Keras' kernel_regularizer -----------------------------------------------------------


class KerasLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.dense = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.out = nn.Linear(4, 2)


def test_by_module_selects_kernels_and_gives_keras_l2():
    torch.manual_seed(0)
    model = KerasLike().double()
    with torch.no_grad():  # norm scales away from 1, so that penalizing them shows
        model.bn.weight.uniform_(0.5, 2.0)
        model.ln.weight.uniform_(0.5, 2.0)
    params = fr.params_of(model)
    kernels = fr.by_module(nn.Linear, nn.Conv2d)(model)
    assert kernels.selected == ["conv.weight", "dense.weight", "out.weight"]
    assert (
        kernels.reason("conv.weight") == "weight of Conv2d"
        and kernels.reason("ln.weight") == "not in a Linear, Conv2d module"
    )
    l2 = 0.01
    # Keras L2(l2) as kernel_regularizer on every Dense and Conv layer: l2 * sum(kernel ** 2), no 1/2
    keras = l2 * sum(
        m.weight.detach().square().sum() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    )
    assert_tensors_close(fr.l2(2 * l2, mask=kernels)(params), keras, "Keras L2 on kernels")
    # the translation the guide used to give also penalizes the LayerNorm and BatchNorm scales (and the embedding)
    assert fr.l2(2 * l2, mask=fr.by_name("*.weight"))(params) > keras * 1.2
    assert fr.by_module(nn.Linear, params="all")(model).selected == [
        "dense.weight",
        "dense.bias",
        "out.weight",
        "out.bias",
    ]
    assert fr.by_module(nn.Conv2d, params=("bias",))(model).selected == ["conv.bias"]


def test_by_module_errors():
    model = KerasLike()
    with pytest.raises(TypeError, match="needs the module, not a parameter tree"):
        fr.by_module(nn.Linear)(fr.params_of(model))
    with pytest.raises(TypeError, match="needs the module, not a parameter tree"):
        fr.masked(fr.add_decayed_weights(0.1), fr.by_module(nn.Linear)).init(fr.params_of(model))
    with pytest.raises(ValueError, match="the model has no module of type Conv1d"):
        fr.by_module(nn.Linear, nn.Conv1d)(model)
    with pytest.raises(ValueError, match="selects no parameter"):
        fr.by_module(nn.LayerNorm, params="gamma")(model)
    with pytest.raises(TypeError, match="Module subclasses"):
        fr.by_module(torch.Tensor)
    with pytest.raises(ValueError, match="at least one module type"):
        fr.by_module()


def test_selection_to_dataframe():
    pd = pytest.importorskip("pandas")
    sel = fr.decay_mask(Net())
    df = sel.to_dataframe()
    assert isinstance(df, pd.DataFrame) and list(df.columns) == ["name", "shape", "decay", "reason"]
    assert list(df["name"]) == list(sel) and list(df["decay"]) == [sel[n] for n in sel]
    assert df.loc[df["name"] == "bn.weight", "reason"].item() == sel.reason("bn.weight")
    assert list(fr.by_name("fc")(Net()).to_dataframe().columns) == ["name", "shape", "selected", "reason"]


_GLOB_CHARS = st.sampled_from(list("ab.0*?[]!-"))


@settings(deadline=None, max_examples=400)
@given(name=st.text(st.sampled_from(list("ab.0[]!-")), max_size=8), pattern=st.text(_GLOB_CHARS, max_size=7))
def test_glob_match_is_fnmatchcase(name, pattern):
    """The traceable glob funcreg uses for masks by name answers as ``fnmatch.fnmatchcase`` does,
    on names and patterns made of the characters globs treat specially."""
    import fnmatch

    from funcreg._src.selection.named_params import glob_match

    assert glob_match(name, pattern) == fnmatch.fnmatchcase(name, pattern), (name, pattern)
