"""create_optimizer by name for every optimizer of the table: equal to torch.optim with the same two
param groups (decay for the selected parameters, none for the others)."""

from __future__ import annotations

import pytest
import torch

import funcreg as fr

CASES = {
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "adamax": (torch.optim.Adamax, {}),
    "nadam": (torch.optim.NAdam, {}),
    "radam": (torch.optim.RAdam, {}),
    "rmsprop": (torch.optim.RMSprop, {"momentum": 0.5, "centered": True}),
    "adagrad": (torch.optim.Adagrad, {"lr_decay": 0.01}),
    "adadelta": (torch.optim.Adadelta, {}),
}


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Tanh(), torch.nn.Linear(4, 1)
    ).double()


@pytest.mark.parametrize("name", sorted(CASES))
def test_create_optimizer_by_name_equals_torch_optim_with_two_groups(name):
    torch_cls, options = CASES[name]
    ours, theirs = _model(0), _model(0)
    opt = fr.create_optimizer(ours, name, lr=0.01, weight_decay=0.1, **options)
    decayed = fr.decay_mask(theirs)
    params = dict(theirs.named_parameters())
    groups = [
        {"params": [p for n, p in params.items() if decayed[n]], "weight_decay": 0.1},
        {"params": [p for n, p in params.items() if not decayed[n]], "weight_decay": 0.0},
    ]
    ref = torch_cls(groups, lr=0.01, **options)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(5, 3, generator=g, dtype=torch.float64)
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            model(x).pow(2).sum().backward()
            o.step()
    for (n, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=f"{name}: {n}")


def test_an_unknown_hyperparameter_is_named_with_the_nearest_known_one():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(
        TypeError, match=r"optimizer 'adamw' takes no argument 'betaz' \(did you mean 'betas'\?\)"
    ):
        fr.create_optimizer(model, "adamw", lr=0.1, betaz=(0.9, 0.99))
    with pytest.raises(TypeError, match=r"optimizer 'sgd' takes no argument 'zzz'; it takes: .*momentum"):
        fr.create_transform(model, "sgd", lr=0.1, zzz=1, momentun=0.9)  # the first unknown one is named
