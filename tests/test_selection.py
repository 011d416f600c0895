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
    with pytest.raises(ValueError, match=r"exclude pattern 'embd' matches no parameter \(did you mean [^)]*'embed'"):
        fr.decay_mask(Net(), exclude=["embd"])
    with pytest.raises(ValueError, match=r"exclude pattern 'zzz' matches no parameter \(names are: [^)]*'embed"):
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
        "encoder": {"linear": {"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}, "norm": {"weight": torch.zeros(3, 3)}},
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
    with pytest.raises(ValueError, match=re.escape("by_name pattern 'hed.*' matches no parameter (did you mean")):
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
    names = data.draw(st.lists(st.from_regex(r"[a-z]{1,4}(\.[a-z]{1,3})?", fullmatch=True), min_size=1, max_size=6, unique=True))
    a = fr.Selection(dict(zip(names, data.draw(st.lists(st.booleans(), min_size=len(names), max_size=len(names))))))
    b = fr.Selection(dict(zip(names, data.draw(st.lists(st.booleans(), min_size=len(names), max_size=len(names))))))
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
        [{"params": [opt_model.W], "weight_decay": 1.0}, {"params": [opt_model.bias], "weight_decay": 0.0}], lr=0.1
    )
    opt_model(x).sum().backward()
    opt.step()
    assert_tensors_close(decay["W"], opt_model.W.detach(), "vs torch SGD")
    assert_tensors_close(decay["bias"], opt_model.bias.detach(), "bias vs torch SGD")
