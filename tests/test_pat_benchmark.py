"""Smoke test of ``benchmarks/pat_side_by_side.py --quick`` (about 10 s), and its unit counting.

torchao's PAT rows run only where torchao imports (it is not a test dependency); the funcreg and
AdamW rows always do.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "pat_side_by_side.py"


@pytest.fixture(scope="module")
def bench():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("pat_side_by_side", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["pat_side_by_side"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("pat_side_by_side", None)


def test_removable_follows_prunes_rule_for_heads(bench) -> None:
    torch.manual_seed(0)
    model, grouped = bench.build("vit")
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    e, d = 32, 8
    params["blocks.1.attn.in_proj_bias"].fill_(0.1)  # torch initialises it to zeros
    params["blocks.0.attn.out_proj.weight"][:, 0:d] = 0.0  # head 0: output columns zero
    params["blocks.1.attn.in_proj_weight"][2 * e + d : 2 * e + 2 * d] = 0.0  # head 1: value rows ...
    assert bench.removable(model, grouped, params) == {"blocks.0.attn": (1, 4), "blocks.1.attn": (0, 4)}
    params["blocks.1.attn.in_proj_bias"][2 * e + d : 2 * e + 2 * d] = 0.0  # ... and value bias zero
    assert bench.removable(model, grouped, params)["blocks.1.attn"] == (1, 4)


def test_quick_run(bench, capsys) -> None:
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("at equal sparsity") :].splitlines()[3:]
    methods = {line.split("|")[1].strip() for line in table if line.strip()}
    assert {"funcreg", "AdamW"} <= methods
    assert ("PAT" in methods) == (bench.PruneOptimizer is not None)
    for line in table:
        assert "| yes" in line, line  # the pruned model predicts what the trained one does
