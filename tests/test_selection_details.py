"""Details of selections and masks: bracket globs, tensor mask leaves, parametrization reasons,
old-style weight_norm owners, ``by_module`` argument checks and selections read more than once."""

from __future__ import annotations

import fnmatch
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import funcreg as fr
from funcreg._src.selection.mask_cache import CachedMask
from funcreg._src.selection.named_params import glob_match
from funcreg._src.selection.resolve import resolve_mask

# --- glob sets whose first member is ']' ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("]", "[]]"),
        ("a", "[]]"),
        ("]", "[!]]"),
        ("a", "[!]]"),
        ("x]y", "x[]]y"),
        ("x]]", "x[]]]"),
        ("]", "[]a]"),
        ("a", "[]a]"),
    ],
)
def test_glob_set_opening_with_a_close_bracket_is_fnmatchcase(name, pattern):
    assert glob_match(name, pattern) == fnmatch.fnmatchcase(name, pattern), (name, pattern)


_SET_BODY = st.text(st.sampled_from(list("ab]-")), max_size=3)
_PLAIN = st.text(st.sampled_from(list("ab*?")), max_size=3)


@settings(deadline=None, max_examples=200)
@given(
    name=st.text(st.sampled_from(list("ab]![-")), max_size=5),
    prefix=_PLAIN,
    negate=st.booleans(),
    body=_SET_BODY,
    suffix=_PLAIN,
)
def test_glob_sets_opening_with_close_bracket_match_as_fnmatchcase(name, prefix, negate, body, suffix):
    """Patterns built around a ``[]...]`` or ``[!]...]`` set (``]`` right after the opening is a member)."""
    pattern = f"{prefix}[{'!' if negate else ''}]{body}]{suffix}"
    assert glob_match(name, pattern) == fnmatch.fnmatchcase(name, pattern), (name, pattern)


# --- masks with tensor leaves ---------------------------------------------------------------------


def test_a_mask_tree_holding_tensors_follows_in_place_edits():
    """A mask holding bool tensors is not cached: editing its tensors in place changes the mask."""
    tree = {"w": torch.ones(2), "b": torch.ones(2)}
    mask = {"w": torch.tensor(True), "b": torch.tensor(False)}
    cached = CachedMask(mask)
    assert cached(tree) == [True, False]
    mask["w"].fill_(False)
    mask["b"].fill_(True)
    assert cached(tree) == [False, True] == resolve_mask(mask, tree)
    # the same through a masked transform: scale(0) zeroes the selected leaf only
    tx = fr.masked(fr.scale(0.0), mask)
    state = tx.init(tree)
    out, state = tx.update({"w": torch.ones(2), "b": torch.ones(2)}, state, tree)
    torch.testing.assert_close(out["w"], torch.ones(2))
    torch.testing.assert_close(out["b"], torch.zeros(2))
    mask["w"].fill_(True)
    mask["b"].fill_(False)
    out, _ = tx.update({"w": torch.ones(2), "b": torch.ones(2)}, state, tree)
    torch.testing.assert_close(out["w"], torch.zeros(2))
    torch.testing.assert_close(out["b"], torch.ones(2))


@pytest.mark.parametrize("value", [torch.tensor(True), torch.tensor([True]), torch.tensor([[False]])])
def test_a_one_element_bool_tensor_is_a_mask_value(value):
    tree = {"w": torch.ones(2), "b": torch.ones(3)}
    assert resolve_mask({"w": value, "b": False}, tree) == [bool(value.item()), False]


@pytest.mark.parametrize(
    "value",
    [torch.tensor(1), torch.tensor([1.0]), torch.tensor(0, dtype=torch.uint8), torch.tensor([True, False])],
)
def test_a_tensor_that_is_not_one_bool_is_rejected_as_a_mask_value(value):
    tree = {"w": torch.ones(2), "b": torch.ones(3)}
    with pytest.raises(TypeError, match=r"mask value at 'w' must be a bool"):
        resolve_mask({"w": value, "b": False}, tree)


def test_a_mask_function_that_returns_a_function_is_rejected():
    tree = {"w": torch.ones(2)}
    with pytest.raises(TypeError, match="mask callable returned another callable"):
        resolve_mask(lambda p: lambda q: True, tree)
    with pytest.raises(TypeError, match="mask callable returned another callable"):
        resolve_mask(lambda p: fr.by_name("w"), tree)
    # a function returning a mask is fine
    assert resolve_mask(lambda p: {"w": True}, tree) == [True]


# --- parametrizations -----------------------------------------------------------------------------


class _Doubled(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


class _Negated(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x


def test_decay_reason_names_a_custom_parametrization():
    from torch.nn.utils import parametrize

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    parametrize.register_parametrization(model[0], "weight", _Doubled())
    parametrize.register_parametrization(model[1], "weight", _Doubled())
    parametrize.register_parametrization(model[1], "weight", _Negated())
    sel = fr.decay_mask(model)
    assert sel["0.parametrizations.weight.original"] and sel["1.parametrizations.weight.original"]
    assert sel.reason("0.parametrizations.weight.original") == "original of '0.weight' (Doubled), ndim 2"
    assert (
        sel.reason("1.parametrizations.weight.original")
        == "original of '1.weight' (Doubled + Negated), ndim 2"
    )


def _old_weight_norm(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(module)


def test_by_module_weight_of_old_weight_norm_is_g_and_v_not_the_bias():
    model = nn.Sequential(_old_weight_norm(nn.Linear(3, 4)), nn.Linear(4, 2))
    assert list(fr.params_of(model)) == ["0.bias", "0.weight_g", "0.weight_v", "1.weight", "1.bias"]
    sel = fr.by_module(nn.Linear)(model)
    assert sel.selected == ["0.weight_g", "0.weight_v", "1.weight"]
    assert sel.reason("0.bias") == "bias of Linear, not 'weight'"
    decay = fr.decay_mask(model)
    assert decay.selected == ["0.weight_g", "1.weight"]
    assert decay.reason("0.bias") == "bias"


class _OwnV(nn.Module):
    """A module with a plain parameter that is merely called ``weight_v`` (no ``weight_g``)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.ones(2, 2))
        self.weight_orig = nn.Parameter(torch.ones(2, 2))  # no weight_u: not spectral_norm either


def test_a_parameter_named_weight_v_without_weight_g_is_not_weight_norm():
    model = nn.Sequential(_OwnV())
    assert fr.by_module(_OwnV, params="weight_v")(model).selected == ["0.weight_v"]
    decay = fr.decay_mask(model)
    assert decay.selected == ["0.weight_v", "0.weight_orig"]
    assert decay.reason("0.weight_v") == "weight with ndim 2"


# --- by_module arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("params", [(), [], ("weight", 3), (None,)])
def test_by_module_params_must_be_names(params):
    with pytest.raises(TypeError, match="by_module params must be 'all', a name or a tuple of names"):
        fr.by_module(nn.Linear, params=params)


# --- a selection read more than once --------------------------------------------------------------


def test_a_selection_reads_the_same_every_time():
    model = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
    sel = fr.decay_mask(model)
    expected_reasons = {
        "0.weight": "weight with ndim 2",
        "0.bias": "bias",
        "1.weight": "normalization layer (LayerNorm)",
        "1.bias": "normalization layer (LayerNorm)",
    }
    expected_table = "\n".join(
        [
            "name      shape  decay  reason",
            "0.weight  3x2    yes    weight with ndim 2",
            "0.bias    3      no     bias",
            "1.weight  3      no     normalization layer (LayerNorm)",
            "1.bias    3      no     normalization layer (LayerNorm)",
        ]
    )
    for _ in range(3):
        assert {n: sel.reason(n) for n in sel} == expected_reasons
        assert str(sel) == expected_table
        assert sel.table() == expected_table
    # a combination reads its operands' reasons, which are still there afterwards
    both = sel & sel
    assert both.reason("0.bias") == "(bias) & (bias)"
    assert sel.reason("0.bias") == "bias" and str(sel) == expected_table
