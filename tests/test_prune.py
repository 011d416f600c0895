"""fr.prune / fr.prune_report: the pruned model's outputs equal the original's; widths follow the rule.

Every weight, bias and BatchNorm statistic is drawn with numpy (never torch's global RNG), zero patterns
are drawn by Hypothesis, and the expected widths are derived here from the documented rule (a unit goes
when the next layer ignores it, or when its row is zero and its constant output is 0 or can be folded),
not read from the implementation.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import SLOW_OK
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import funcreg as fr

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def make(cls, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
    """A module without random initialisation (torch's global RNG untouched); filled by ``fill``."""
    return nn.utils.skip_init(cls, *args, **kwargs)


def fill(model: nn.Module, rng: np.random.Generator, dtype: torch.dtype) -> nn.Module:
    """Every parameter ~ N(0, 1/fan_in), BatchNorm statistics drawn (variances in [0.5, 2])."""
    model = model.to(dtype)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(3)
            elif name.endswith("running_var"):
                t.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, t.shape)))
            elif name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(torch.from_numpy(rng.uniform(-1.0, 1.0, t.shape)))
            else:
                fan_in = max(1, t[0].numel()) if t.ndim > 1 else 1
                t.copy_(torch.from_numpy(rng.normal(0.0, 1.0 / np.sqrt(fan_in), t.shape)))
    return model.eval()


def zero_rows(t: torch.Tensor) -> torch.Tensor:
    return (t.reshape(t.shape[0], -1) == 0).all(dim=1)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if expected.dtype == torch.float64:
        torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-12)
    else:  # float32 rounding: a removed unit's contribution is added in another order
        torch.testing.assert_close(actual, expected, atol=2e-6, rtol=1e-5)


def expected_removed(
    rows_zero: torch.Tensor, cols_zero: torch.Tensor, const_zero: torch.Tensor, foldable: bool
) -> torch.Tensor:
    """The documented rule, with "keep at least one unit"."""
    removed = cols_zero | (rows_zero & (const_zero | foldable))
    if bool(removed.all()):
        removed = removed.clone()
        removed[0] = False
    return removed


# ----------------------------------------------------------------------------------------------------
# Property tests: MLPs and CNNs with drawn zero patterns


@st.composite
def mlps(draw):  # noqa: ANN001, ANN201
    widths = [
        draw(st.integers(2, 5)),
        draw(st.integers(1, 6)),
        draw(st.integers(1, 6)),
        draw(st.integers(1, 3)),
    ]
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    bn = draw(st.booleans())
    biases = [draw(st.booleans()) for _ in range(3)]
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    # zero patterns: rows of the two hidden layers, their biases, columns of the next layers
    rows = [draw(st.lists(st.booleans(), min_size=w, max_size=w)) for w in widths[1:3]]
    bias_zero = [draw(st.lists(st.booleans(), min_size=w, max_size=w)) for w in widths[1:3]]
    cols = [draw(st.lists(st.booleans(), min_size=w, max_size=w)) for w in widths[1:3]]
    return widths, act, bn, biases, dtype, seed, rows, bias_zero, cols


@settings(max_examples=40, deadline=None, suppress_health_check=SLOW_OK)
@given(mlps(), st.integers(1, 7))
def test_pruned_mlp_equals_the_original_and_has_the_widths_of_the_rule(case, n) -> None:  # noqa: ANN001
    widths, act, bn, biases, dtype, seed, rows, bias_zero, cols = case
    layers = [make(nn.Linear, widths[0], widths[1], bias=biases[0])]
    if bn:
        layers.append(make(nn.BatchNorm1d, widths[1]))
    layers += [ACTIVATIONS[act](), make(nn.Linear, widths[1], widths[2], bias=biases[1]), ACTIVATIONS[act]()]
    layers += [make(nn.Linear, widths[2], widths[3], bias=biases[2])]
    rng = np.random.default_rng(seed)
    model = fill(nn.Sequential(*layers), rng, dtype)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for i in range(2):
            linears[i].weight[torch.tensor(rows[i])] = 0.0
            if linears[i].bias is not None:
                linears[i].bias[torch.tensor(bias_zero[i])] = 0.0
            linears[i + 1].weight[:, torch.tensor(cols[i])] = 0.0
    x = torch.from_numpy(rng.normal(0.0, 2.0, (n, widths[0]))).to(dtype)
    original = copy.deepcopy(model)
    pruned = fr.prune(model)
    close(pruned(x), model(x))
    for a, b in zip(original.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)  # the model is not modified

    # expected widths: a Linear consumer can always absorb a constant, so every zero row goes
    pruned_linears = [m for m in pruned if isinstance(m, nn.Linear)]
    w2 = linears[1].weight
    removed1 = expected_removed(
        zero_rows(linears[0].weight), (w2 == 0).all(dim=0), torch.ones(widths[1], dtype=torch.bool), True
    )
    keep1 = ~removed1
    removed2 = expected_removed(
        zero_rows(w2[:, keep1]),
        (linears[2].weight == 0).all(dim=0),
        torch.ones(widths[2], dtype=torch.bool),
        True,
    )
    assert pruned_linears[0].out_features == int(keep1.sum())
    assert pruned_linears[1].out_features == int((~removed2).sum())
    assert pruned_linears[2].out_features == widths[3]  # outputs are never removed
    torch.testing.assert_close(pruned_linears[0].weight, linears[0].weight[keep1], atol=0, rtol=0)
    if bn:
        assert pruned[1].num_features == int(keep1.sum())
        for key in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(pruned[1], key), getattr(model[1], key)[keep1])


@st.composite
def cnns(draw):  # noqa: ANN001, ANN201
    c1, c2 = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    pool = draw(st.sampled_from(["max", "avg", "avg_padded", "adaptive"]))
    pad2 = draw(st.sampled_from([0, 1]))
    bn = draw(st.booleans())
    bias1 = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    rows1 = draw(st.lists(st.booleans(), min_size=c1, max_size=c1))
    bias_zero1 = draw(st.lists(st.booleans(), min_size=c1, max_size=c1))
    cols2 = draw(st.lists(st.booleans(), min_size=c1, max_size=c1))
    rows2 = draw(st.lists(st.booleans(), min_size=c2, max_size=c2))
    blocks3 = draw(st.lists(st.booleans(), min_size=c2, max_size=c2))
    return c1, c2, act, pool, pad2, bn, bias1, dtype, seed, rows1, bias_zero1, cols2, rows2, blocks3


@settings(max_examples=40, deadline=None, suppress_health_check=SLOW_OK)
@given(cnns(), st.integers(1, 4))
def test_pruned_cnn_equals_the_original_and_has_the_widths_of_the_rule(case, n) -> None:  # noqa: ANN001
    c1, c2, act, pool, pad2, bn, bias1, dtype, seed, rows1, bias_zero1, cols2, rows2, blocks3 = case
    pools = {
        "max": lambda: nn.MaxPool2d(2),
        "avg": lambda: nn.AvgPool2d(2),
        "avg_padded": lambda: nn.AvgPool2d(3, stride=2, padding=1),  # counts its zero padding
        "adaptive": lambda: nn.AdaptiveAvgPool2d(3),
    }
    layers = [make(nn.Conv2d, 2, c1, 3, padding=1, bias=bias1)]
    if bn:
        layers.append(make(nn.BatchNorm2d, c1))
    layers += [
        ACTIVATIONS[act](),
        pools[pool](),
        make(nn.Conv2d, c1, c2, 2, padding=pad2),
        ACTIVATIONS[act](),
    ]
    # 6x6 input -> 6x6 -> pool (every kind: 3x3) -> conv k2: 2x2 (pad 0) or 4x4 (pad 1)
    side = 2 if pad2 == 0 else 4
    layers += [nn.Flatten(), make(nn.Linear, c2 * side * side, 3)]
    rng = np.random.default_rng(seed)
    model = fill(nn.Sequential(*layers), rng, dtype)
    conv1, conv2, fc = (m for m in model if isinstance(m, (nn.Conv2d, nn.Linear)))
    with torch.no_grad():
        conv1.weight[torch.tensor(rows1)] = 0.0
        if conv1.bias is not None:
            conv1.bias[torch.tensor(bias_zero1)] = 0.0
        conv2.weight[:, torch.tensor(cols2)] = 0.0
        conv2.weight[torch.tensor(rows2)] = 0.0
        blocks = fc.weight.view(3, c2, side * side)
        blocks[:, torch.tensor(blocks3)] = 0.0
    x = torch.from_numpy(rng.normal(0.0, 1.0, (n, 2, 6, 6))).to(dtype)
    pruned = fr.prune(model)
    close(pruned(x), model(x))

    # the constant a zero filter outputs after BatchNorm and the activation (pooling keeps constants)
    with torch.no_grad():
        b = conv1.bias.double() if conv1.bias is not None else torch.zeros(c1, dtype=torch.float64)
        if bn:
            norm = model[1]
            b = (b - norm.running_mean.double()) / torch.sqrt(norm.running_var.double() + norm.eps)
            b = b * norm.weight.double() + norm.bias.double()
        c = ACTIVATIONS[act]()(b)
    # a padded conv2 cannot absorb a constant, nor can anything after an AvgPool2d that counts padding
    foldable1 = pad2 == 0 and pool != "avg_padded"
    removed1 = expected_removed(
        zero_rows(conv1.weight), (conv2.weight == 0).all(dim=(0, 2, 3)), c == 0, foldable1
    )
    keep1 = ~removed1
    block_zero = (fc.weight.view(3, c2, -1) == 0).all(dim=2).all(dim=0)
    removed2 = expected_removed(
        zero_rows(conv2.weight[:, keep1]), block_zero, torch.ones(c2, dtype=torch.bool), True
    )
    new1, new2, new_fc = (m for m in pruned if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert new1.out_channels == int(keep1.sum())
    assert new2.in_channels == int(keep1.sum())
    assert new2.out_channels == int((~removed2).sum())
    assert new_fc.in_features == int((~removed2).sum()) * side * side  # a Flatten block per channel
    assert new_fc.out_features == 3


# ----------------------------------------------------------------------------------------------------
# The rule, case by case


def small_mlp(dtype: torch.dtype = torch.float64, act: type = nn.ReLU) -> nn.Sequential:
    model = nn.Sequential(make(nn.Linear, 3, 4), act(), make(nn.Linear, 4, 2))
    return fill(model, np.random.default_rng(0), dtype)


def test_a_zero_row_with_a_nonzero_bias_is_folded_into_the_next_bias() -> None:
    model = small_mlp()
    params = {k: v.clone() for k, v in fr.params_of(model).items()}
    params["0.weight"][2] = 0.0
    params["0.bias"][2] = 0.7  # relu(0.7) = 0.7: a constant input to the next layer
    pruned = fr.prune(model, params)
    assert pruned[0].out_features == 3 and pruned[2].in_features == 3
    expected_bias = params["2.bias"] + params["2.weight"][:, 2] * 0.7
    torch.testing.assert_close(pruned[2].bias, expected_bias, atol=1e-15, rtol=0)
    torch.testing.assert_close(pruned[2].weight, params["2.weight"][:, [0, 1, 3]], atol=0, rtol=0)


def test_a_unit_the_next_layer_ignores_is_removed_whatever_its_row() -> None:
    model = small_mlp()
    params = {k: v.clone() for k, v in fr.params_of(model).items()}
    params["2.weight"][:, 1] = 0.0  # column 1 of the next layer: unit 1 is ignored
    pruned = fr.prune(model, params)
    assert pruned[0].out_features == 3
    torch.testing.assert_close(pruned[0].weight, params["0.weight"][[0, 2, 3]], atol=0, rtol=0)
    torch.testing.assert_close(pruned[2].bias, params["2.bias"], atol=0, rtol=0)  # nothing to fold


def test_output_units_are_never_removed_and_one_unit_is_kept() -> None:
    model = small_mlp()
    params = {k: v.clone() for k, v in fr.params_of(model).items()}
    params["2.weight"][0] = 0.0  # an output unit: stays
    params["0.weight"][:] = 0.0  # every hidden unit removable: one stays
    pruned = fr.prune(model, params)
    assert pruned[2].out_features == 2
    assert pruned[0].out_features == 1
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(5, 3)))
    close(pruned(x), torch.func.functional_call(model, params, (x,)))


def conv_pair(padding: int, bias: float, bn: bool = False) -> tuple[nn.Sequential, dict[str, torch.Tensor]]:
    layers = [make(nn.Conv2d, 1, 3, 3, padding=1)] + ([make(nn.BatchNorm2d, 3)] if bn else [])
    layers += [nn.ReLU(), make(nn.Conv2d, 3, 2, 3, padding=padding)]
    model = fill(nn.Sequential(*layers), np.random.default_rng(2), torch.float64)
    params = {k: v.clone() for k, v in fr.params_of(model).items()}
    params["0.weight"][1] = 0.0
    params["0.bias"][1] = bias
    return model, params


def test_a_padded_conv_keeps_a_unit_with_a_nonzero_constant_an_unpadded_one_absorbs_it() -> None:
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(2, 1, 6, 6)))
    model, params = conv_pair(padding=1, bias=0.5)
    pruned = fr.prune(model, params)
    assert pruned[0].out_channels == 3  # at the border the padded conv sees fewer copies of relu(0.5)
    close(pruned(x), torch.func.functional_call(model, params, (x,)))
    model, params = conv_pair(padding=0, bias=0.5)
    pruned = fr.prune(model, params)
    assert pruned[0].out_channels == 2
    expected = params["2.bias"] + 0.5 * params["2.weight"][:, 1].sum(dim=(1, 2))
    torch.testing.assert_close(pruned[2].bias, expected, atol=1e-15, rtol=0)
    close(pruned(x), torch.func.functional_call(model, params, (x,)))


def test_a_zero_filter_whose_constant_is_zero_goes_even_before_a_padded_conv() -> None:
    model, params = conv_pair(padding=1, bias=-0.5)  # relu(-0.5) = 0
    pruned = fr.prune(model, params)
    assert pruned[0].out_channels == 2 and pruned[2].in_channels == 2


def test_batchnorm_channels_and_buffers_are_sliced_and_trained_buffers_are_used() -> None:
    model, params = conv_pair(padding=0, bias=0.0, bn=True)
    buffers = {k: v.clone() for k, v in fr.buffers_of(model).items()}
    buffers["1.running_mean"] += 0.25  # "trained" statistics differ from the module's own
    pruned = fr.prune(model, params, buffers)
    assert pruned[1].num_features == 2
    for key, source in (
        ("running_mean", buffers),
        ("running_var", buffers),
        ("weight", params),
        ("bias", params),
    ):
        assert torch.equal(getattr(pruned[1], key), source[f"1.{key}"][[0, 2]])
    x = torch.from_numpy(np.random.default_rng(4).normal(size=(3, 1, 5, 5)))
    model.eval()
    close(pruned(x), torch.func.functional_call(model, {**params, **buffers}, (x,)))


def test_flatten_maps_each_channel_to_its_block_of_features() -> None:
    model = fill(
        nn.Sequential(make(nn.Conv2d, 1, 3, 2), nn.ReLU(), nn.Flatten(), make(nn.Linear, 3 * 4, 2)),
        np.random.default_rng(5),
        torch.float64,
    )  # 3x3 input -> 3 channels of 2x2 -> 12 features, channel c at features 4c..4c+3
    params = {k: v.clone() for k, v in fr.params_of(model).items()}
    params["3.weight"][:, 4:8] = 0.0  # channel 1's block
    pruned = fr.prune(model, params)
    assert pruned[0].out_channels == 2 and pruned[3].in_features == 8
    torch.testing.assert_close(
        pruned[3].weight, torch.cat([params["3.weight"][:, :4], params["3.weight"][:, 8:]], 1), atol=0, rtol=0
    )


def test_nested_sequentials_keep_their_names_and_the_pruned_model_is_in_eval_mode() -> None:
    inner = nn.Sequential(make(nn.Linear, 3, 4), nn.Dropout(0.5), nn.ReLU())
    model = fill(nn.Sequential(inner, make(nn.Linear, 4, 2)), np.random.default_rng(6), torch.float32).train()
    params = {k: v.clone() for k, v in fr.params_of(model).items()}
    params["0.0.weight"][0] = 0.0
    params["0.0.bias"][0] = -1.0
    pruned = fr.prune(model, params)
    assert list(fr.params_of(pruned)) == ["0.0.weight", "0.0.bias", "1.weight", "1.bias"]
    assert not pruned.training and model.training  # the original keeps its mode
    x = torch.from_numpy(np.random.default_rng(7).normal(size=(4, 3)).astype(np.float32))
    close(pruned(x), torch.func.functional_call(model.eval(), params, (x,)))


def test_prune_after_group_lasso_training_removes_units() -> None:
    rng = np.random.default_rng(8)
    model = fill(nn.Sequential(make(nn.Linear, 4, 8), nn.Tanh(), make(nn.Linear, 8, 1)), rng, torch.float64)
    x = torch.from_numpy(rng.normal(size=(64, 4)))
    y = x[:, :1] - 0.5 * x[:, 1:2]

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, p, (x,)), y)

    rows = fr.by_name("0.weight")
    step = fr.make_step(
        loss, fr.sgd(0.1), penalty=fr.group_lasso(0.05, mask=rows), form="proximal", learning_rate=0.1
    )
    state = step.init(fr.params_of(model))
    for _ in range(100):
        state, _ = step(state, x, y)
    zero = int(zero_rows(state.params["0.weight"]).sum())
    assert zero > 0
    pruned = fr.prune(model, state.params)
    assert pruned[0].out_features == 8 - zero
    close(pruned(x), torch.func.functional_call(model, state.params, (x,)))


# ----------------------------------------------------------------------------------------------------
# Errors name the layer


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


@pytest.mark.parametrize(
    ("model", "error", "match"),
    [
        (
            lambda: nn.Sequential(nn.Linear(3, 4), Residual(), nn.Linear(4, 1)),
            TypeError,
            r"layer '1' is a Residual, a module with children",
        ),
        (
            lambda: nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten()),
            ValueError,
            r"layer '0' is a grouped Conv2d \(groups=2\)",
        ),
        (lambda: nn.Sequential(nn.Conv1d(2, 4, 3)), TypeError, r"layer '0' is a Conv1d"),
        (lambda: Residual(), TypeError, r"prune expects an nn.Sequential .* got a Residual"),
        (
            lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(2, 3)),
            ValueError,
            r"Linear '1' receives the 4-d output of Conv2d '0'",
        ),
        (
            lambda: nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=1), nn.Linear(4, 1)),
            TypeError,
            r"layer '1' \(Softmax\) mixes channels",
        ),
        (
            lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)),
            ValueError,
            r"layer '1' .*track_running_stats=False",
        ),
        (
            lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(7, 3)),
            ValueError,
            r"layer '2' has 7 input features .* multiple of 2",
        ),
    ],
)
def test_unsupported_models_raise_naming_the_layer(model, error, match) -> None:  # noqa: ANN001
    with pytest.raises(error, match=match):
        fr.prune(model())


def test_params_are_checked_by_name_and_shape() -> None:
    model = small_mlp()
    with pytest.raises(ValueError, match=r"key '0.weigth' the model does not have \(did you mean '0.weight'"):
        fr.prune(model, {"0.weigth": torch.zeros(4, 3)})
    stacked = fr.stack([fr.params_of(model)] * 2)
    with pytest.raises(
        ValueError,
        match=r"params\['0.weight'\] has shape \(2, 4, 3\), the model's is \(4, 3\) \(a stacked ensemble",
    ):
        fr.prune(model, stacked)


# ----------------------------------------------------------------------------------------------------
# The report


def test_report_counts_parameters_and_flops_by_hand() -> None:
    c1, c2, k = 4, 6, 3
    model = fill(
        nn.Sequential(
            make(nn.Conv2d, 1, c1, k, padding=1),
            nn.ReLU(),
            make(nn.Conv2d, c1, c2, k),
            nn.ReLU(),
            nn.Flatten(),
            make(nn.Linear, c2 * 4 * 4, 5),
        ),
        np.random.default_rng(9),
        torch.float32,
    )  # 6x6 -> 6x6 (pad 1) -> 4x4
    params = {k_: v.clone() for k_, v in fr.params_of(model).items()}
    params["0.weight"][[0, 2]] = 0.0
    params["0.bias"][[0, 2]] = 0.0  # relu(0) = 0: both filters go
    params["2.weight"][1] = 0.0  # and one filter of the second conv (folded into the Linear)
    pruned = fr.prune(model, params)
    x = torch.from_numpy(np.random.default_rng(10).normal(size=(7, 1, 6, 6)).astype(np.float32))
    report = fr.prune_report(model, pruned, x, params, repeats=3)

    def size(a: int, b: int) -> int:  # conv1 a filters, conv2 b filters
        return (a * 1 * k * k + a) + (b * a * k * k + b) + (5 * b * 16 + 5)

    def flops(a: int, b: int) -> int:
        return 2 * (1 * k * k * a * 36) + 2 * (a * k * k * b * 16) + 2 * (b * 16 * 5)

    assert (report.params_before, report.params_after) == (size(4, 6), size(2, 5))
    assert (report.flops_before, report.flops_after) == (flops(4, 6), flops(2, 5))
    assert report.max_abs_diff < 1e-5
    assert report.seconds_before > 0 and report.seconds_after > 0
    units = {s.name: (s.units_before, s.units_after) for s in report.layers}
    assert units == {"0": (4, 2), "2": (6, 5), "5": (5, 5)}
    text = str(report)
    assert "4 -> 2" in text and "FLOPs per example" in text


def test_a_zero_batchnorm_weight_makes_a_channel_constant_and_removable() -> None:
    """Network slimming: an L1 prox on BatchNorm weights zeroes gamma; the channel then outputs beta."""
    model = fill(
        nn.Sequential(make(nn.Conv2d, 1, 3, 3), make(nn.BatchNorm2d, 3), nn.ReLU(), make(nn.Conv2d, 3, 2, 2)),
        np.random.default_rng(14),
        torch.float64,
    )
    params = {k: v.clone() for k, v in fr.params_of(model).items()}
    params["1.weight"][2] = 0.0
    params["1.bias"][2] = 0.4  # the channel is relu(0.4) everywhere, whatever conv 0's filter does
    pruned = fr.prune(model, params)
    assert pruned[0].out_channels == 2 and pruned[1].num_features == 2
    expected = params["3.bias"] + 0.4 * params["3.weight"][:, 2].sum(dim=(1, 2))
    torch.testing.assert_close(pruned[3].bias, expected, atol=1e-15, rtol=0)
    x = torch.from_numpy(np.random.default_rng(15).normal(size=(3, 1, 6, 6)))
    close(pruned(x), torch.func.functional_call(model, params, (x,)))


class _CrossAttention(nn.Module):
    """Attention from a sequence to a memory of another width (kdim = vdim != embed_dim)."""

    def __init__(self, e: int, m: int, heads: int, batch_first: bool) -> None:
        super().__init__()
        self.memory = nn.Linear(e, m)
        self.attn = nn.MultiheadAttention(e, heads, kdim=m, vdim=m, batch_first=batch_first)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x if self.batch_first else x.transpose(0, 1)
        mem = self.memory(seq)
        return self.attn(seq, mem, mem, need_weights=False)[0]


@pytest.mark.parametrize("batch_first", [True, False])
def test_report_counts_attention_flops_by_hand(batch_first: bool) -> None:
    # per example, sequence L, width E, memory width M: the memory Linear L*E*M multiply-adds; the
    # attention's projections q (L*E*E), k and v (L*M*E each), out (L*E*E); scores and weighted
    # values L*L*E each. FLOPs are 2x the multiply-adds
    b, seq, e, m = 3, 5, 8, 6
    torch.manual_seed(0)
    model = _CrossAttention(e, m, heads=2, batch_first=batch_first).eval()
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(b, seq, e)).astype(np.float32))
    report = fr.prune_report(model, copy.deepcopy(model), x, repeats=2)
    mac = seq * e * m + (seq * e * e + 2 * seq * m * e + seq * e * e) + 2 * seq * seq * e
    assert report.flops_before == report.flops_after == 2 * mac


@pytest.mark.parametrize("padding_mode", ["reflect", "zeros"])
def test_a_constant_filter_is_folded_where_its_padding_repeats_the_constant(padding_mode: str) -> None:
    # a filter with zero weights outputs relu(bias) everywhere, the border included, when the next
    # convolution pads by reflection (the padded border repeats the constant): it folds into that
    # convolution's bias exactly. With zero padding the border sees zeros instead, so it stays. An
    # unpadded average pool (count_include_pad does not matter without padding) keeps it constant
    model = fill(
        nn.Sequential(
            make(nn.Conv2d, 1, 3, 3),
            nn.ReLU(),
            nn.AvgPool2d(2),
            make(nn.Conv2d, 3, 2, 3, padding=1, padding_mode=padding_mode),
            nn.Flatten(),
            make(nn.Linear, 2 * 4 * 4, 2),
        ),
        np.random.default_rng(4),
        torch.float64,
    )  # 10x10 -> 8x8 -> 4x4 -> 4x4 (padded)
    params = {k: v.clone() for k, v in fr.params_of(model).items()}
    params["0.weight"][1] = 0.0
    params["0.bias"][1] = 0.7
    pruned = fr.prune(model, params)
    x = torch.from_numpy(np.random.default_rng(5).normal(size=(3, 1, 10, 10)))
    report = fr.prune_report(model, pruned, x, params, repeats=2)
    units = {s.name: s.units_after for s in report.layers}
    assert units["0"] == (2 if padding_mode == "reflect" else 3)
    assert report.max_abs_diff < 1e-10


# ----------------------------------------------------------------------------------------------------
# Padding modes, the heads argument, and what the report counts for unusual layouts and inputs


def test_same_padding_with_zeros_is_pruned_and_same_with_another_padding_mode_is_refused() -> None:
    model = fill(
        nn.Sequential(
            make(nn.Conv2d, 1, 3, 3, padding="same"),
            nn.ReLU(),
            make(nn.Conv2d, 3, 2, 3, padding="same"),
        ),
        np.random.default_rng(21),
        torch.float64,
    )
    params = {k: v.clone() for k, v in fr.params_of(model).items()}
    params["0.weight"][1] = 0.0
    params["0.bias"][1] = -0.5  # relu(-0.5) = 0: the filter adds nothing, even at the zero-padded border
    pruned = fr.prune(model, params)
    assert pruned[0].out_channels == 2 and pruned[2].in_channels == 2
    x = torch.from_numpy(np.random.default_rng(22).normal(size=(2, 1, 5, 5)))
    reference = copy.deepcopy(model)
    reference.load_state_dict(params)
    close(pruned(x), reference(x))
    reflect = nn.Sequential(nn.Conv2d(1, 3, 3, padding="same", padding_mode="reflect"), nn.ReLU())
    with pytest.raises(ValueError, match=r"layer '0' combines padding='same' with padding_mode='reflect'"):
        fr.prune(reflect)


@pytest.mark.parametrize("heads", [[1], ("attn",), [object()]])
def test_heads_that_are_not_attention_heads_are_refused(heads) -> None:  # noqa: ANN001
    with pytest.raises(TypeError, match=r"prune: heads must be None .* got "):
        fr.prune(small_mlp(), heads=heads)


def test_report_param_ratio_is_after_over_before() -> None:
    model = small_mlp()
    params = {k: v.clone() for k, v in fr.params_of(model).items()}
    params["2.weight"][:, 0] = 0.0  # the last layer ignores one hidden unit
    pruned = fr.prune(model, params)
    report = fr.prune_report(model, pruned, torch.zeros(2, 3, dtype=torch.float64), params, repeats=1)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in pruned.parameters())
    assert after < before
    assert report.param_ratio == pytest.approx(after / before, rel=1e-15)
    assert f"{before} -> {after} ({after / before:.1%})" in str(report)


class _ScalarIn(nn.Module):
    """A model whose example input is a 0-d tensor: one example."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = make(nn.Linear, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.reshape(1, 1))


def test_report_counts_a_0d_input_as_one_example() -> None:
    model = fill(_ScalarIn(), np.random.default_rng(23), torch.float64)
    report = fr.prune_report(model, copy.deepcopy(model), torch.tensor(0.5, dtype=torch.float64), repeats=1)
    assert (report.flops_before, report.flops_after) == (2 * 1 * 3, 2 * 1 * 3)
    assert (report.params_before, report.params_after) == (6, 6) and report.max_abs_diff == 0.0


def test_report_counts_a_two_layer_sequential_of_different_kinds_as_its_layers() -> None:
    """Sequential(Linear without bias, ReLU) is not a low-rank factorisation (that is two layers of
    one kind): the report lists its Linear, not the Sequential."""
    model = fill(
        nn.Sequential(nn.Sequential(make(nn.Linear, 3, 4, bias=False), nn.ReLU()), make(nn.Linear, 4, 2)),
        np.random.default_rng(24),
        torch.float64,
    )
    params = {k: v.clone() for k, v in fr.params_of(model).items()}
    params["1.weight"][:, 2] = 0.0  # hidden unit 2 is ignored
    pruned = fr.prune(model, params)
    x = torch.from_numpy(np.random.default_rng(25).normal(size=(3, 3)))
    report = fr.prune_report(model, pruned, x, params, repeats=1)
    sizes = [
        (s.name, s.kind, s.units_before, s.units_after, s.params_before, s.params_after)
        for s in report.layers
    ]
    assert sizes == [("0.0", "Linear", 4, 3, 12, 9), ("1", "Linear", 2, 2, 10, 8)]
