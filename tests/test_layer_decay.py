"""Layer-wise learning-rate decay: ``fr.layer_decay``, ``fr.layer_decay_groups``, ``fr.scale_by_layer``.

References: the scales derived by hand from the layer order (a ViT-like model whose ``group_matcher``
is the convention of timm's ViT: stem, ``blocks.<i>``, the final norm joined to the last block, the
head last), and ``torch.optim.AdamW`` with one param group per layer at learning rate
``lr * decay ** (n - 1 - layer)``, stepped in lockstep (float64, ``atol=1e-12, rtol=1e-10``).
``tests/test_layer_decay_timm.py`` compares the groups with timm's own ``param_groups_layer_decay``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import funcreg as fr

TOL = {"atol": 1e-12, "rtol": 1e-10}


class TinyViT(nn.Module):
    """The parameter layout of a ViT: tokens, patch embedding, blocks, final norm, head."""

    def __init__(self, depth: int, dim: int = 4) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.patch_embed = nn.Linear(3, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm1": nn.LayerNorm(dim), "mlp": nn.Linear(dim, dim)}) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)

    def group_matcher(self, coarse: bool = False) -> dict:
        return {
            "stem": r"^cls_token|pos_embed|patch_embed",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}  # dist_token: listed, absent, as in timm


def _expected_layer(name: str, depth: int) -> int:
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith("norm."):
        return depth  # joined to the last block's layer
    return depth + 1  # the head


@settings(deadline=None, max_examples=25)
@given(depth=st.integers(1, 6), decay=st.floats(0.05, 1.0), min_scale=st.sampled_from([0.0, 0.1]))
def test_the_scales_follow_the_layer_order(depth, decay, min_scale):
    model = TinyViT(depth)
    scales = fr.layer_decay(model, decay, min_scale=min_scale)
    n = depth + 2
    assert scales.num_layers == n
    assert set(scales) == {name for name, _ in model.named_parameters()}
    for name, _ in model.named_parameters():
        layer = _expected_layer(name, depth)
        assert scales.layers[name] == layer, name
        assert scales[name] == pytest.approx(max(min_scale, decay ** (n - 1 - layer)), rel=1e-12, abs=0)
    assert str(scales).splitlines()[-1].split() == ["head.bias", str(n - 1), "1"]


def test_an_explicit_matcher_and_a_callable_one():
    model = nn.ModuleDict({"embed": nn.Linear(2, 3), "body": nn.Linear(3, 3), "head": nn.Linear(3, 1)})
    by_regex = fr.layer_decay(model, 0.5, matcher={"stem": r"^embed", "body": r"^body"})
    by_callable = fr.layer_decay(
        model, 0.5, matcher=lambda n: {"embed": 0, "body": 1, "head": 2}[n.split(".")[0]]
    )
    assert dict(by_regex) == dict(by_callable)
    assert [by_regex[f"{m}.weight"] for m in ("embed", "body", "head")] == [0.25, 0.5, 1.0]


def _gradients(model, steps, seed):
    rng = np.random.default_rng(seed)
    return [
        {n: torch.from_numpy(rng.normal(size=tuple(p.shape))) for n, p in model.named_parameters()}
        for _ in range(steps)
    ]


@settings(deadline=None, max_examples=8)
@given(seed=st.integers(0, 2**31 - 1), depth=st.integers(1, 3), decay=st.floats(0.3, 1.0))
def test_layer_decay_groups_and_scale_by_layer_equal_adamw_with_a_group_per_layer(seed, depth, decay):
    torch.manual_seed(0)
    model = TinyViT(depth).double()
    lr, wd = 0.01, 0.05
    n = depth + 2
    # the reference: torch AdamW, groups built here from the layer order and the 1-d rule
    ref_params = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    groups: dict[tuple[int, bool], list] = {}
    for name, p in ref_params.items():
        excluded = p.ndim <= 1 or name in {"pos_embed", "cls_token"}
        groups.setdefault((_expected_layer(name, depth), excluded), []).append(p)
    reference = torch.optim.AdamW(
        [
            {"params": ps, "lr": lr * decay ** (n - 1 - layer), "weight_decay": 0.0 if excluded else wd}
            for (layer, excluded), ps in groups.items()
        ],
        lr=lr,
    )
    ours_params = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    by_name = dict(ours_params)
    built = fr.layer_decay_groups(model, decay, wd, lr=lr)
    adapter = fr.TorchOptimizer(
        [{**g, "params": [(name, by_name[name]) for name, _ in g["params"]]} for g in built], "adamw", lr=lr
    )
    # the functional twin: one AdamW, the decay mask of the same rule, the update scaled per layer
    mask = {
        name: not (p.ndim <= 1 or name in {"pos_embed", "cls_token"}) for name, p in model.named_parameters()
    }
    tx = fr.chain(fr.adamw(lr, weight_decay=wd, mask=mask), fr.scale_by_layer(fr.layer_decay(model, decay)))
    functional = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = tx.init(functional)
    for grads in _gradients(model, 3, seed):
        for name, p in ref_params.items():
            p.grad = grads[name].clone()
            ours_params[name].grad = grads[name].clone()
        reference.step()
        adapter.step()
        u, state = tx.update(grads, state, functional)
        functional = fr.apply_updates(functional, u)
    for name, p in ref_params.items():
        torch.testing.assert_close(ours_params[name].detach(), p.detach(), **TOL)
        # scaling AdamW's update is scaling its rate, decoupled decay included
        torch.testing.assert_close(functional[name], p.detach(), **TOL)


def test_scale_by_layer_donated_and_compiled_equal_the_pure_step():
    model = TinyViT(2)
    tx = fr.chain(fr.sgd(0.1, momentum=0.9), fr.scale_by_layer(fr.layer_decay(model, 0.5)))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: torch.full_like(p, 0.5) for n, p in params.items()}
    u, _ = tx.update(grads, tx.init(params), params)
    pure = fr.apply_updates(params, u)
    donated = {n: p.clone() for n, p in params.items()}
    out, _ = fr.donated_update(tx, grads, tx.init(donated), donated)
    compiled = torch.compile(lambda g, s, p: tx.update(g, s, p), backend="eager")
    cu, _ = compiled(grads, tx.init(params), params)
    for n in params:
        torch.testing.assert_close(out[n], pure[n], atol=0, rtol=0)
        torch.testing.assert_close(fr.apply_updates(params, cu)[n], pure[n], atol=0, rtol=0)
    assert out["head.weight"] is donated["head.weight"]


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="has no group_matcher"):
        fr.layer_decay(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="decay"):
        fr.layer_decay(TinyViT(1), 1.5)
    with pytest.raises(TypeError, match="matcher"):
        fr.layer_decay(nn.Linear(2, 2), matcher=3)
    with pytest.raises(TypeError, match="regex, suffix"):
        fr.layer_decay(nn.Linear(2, 2), matcher={"a": [r"^weight"]})
    with pytest.raises(ValueError, match="'blockz.*' matches no trainable parameter"):
        fr.layer_decay_groups(TinyViT(1), no_weight_decay=["blockz.*"])
    tx = fr.scale_by_layer({"a": 0.5, "b": 1.0})
    with pytest.raises(fr.SelectionError, match="no factor for parameter 'c'"):
        tx.update({"a": torch.ones(1), "c": torch.ones(1)}, tx.init(None))
    with pytest.raises(fr.SelectionError, match="'b' has a factor but is not a parameter"):
        tx.update({"a": torch.ones(1)}, tx.init(None))
    with pytest.raises(ValueError, match="empty"):
        fr.scale_by_layer({})
    with pytest.raises(TypeError, match="mapping"):
        fr.scale_by_layer([0.5])  # type: ignore[arg-type]
