"""funcreg on torch.distributed, tested with real gloo process groups on 127.0.0.1.

Two launches for the whole file (starting processes is the expensive part): 2 ranks run every check
of ``tests/_dist_checks.py`` but the resharding one, then 4 ranks run the sharded sweep and load the
2-rank checkpoint (and, once their group is gone, one process loads it too). Each check compares what
the ranks compute with a single-process reference computed in the same process (unsharded
parameters, the full batch), in float64; the tests below read the deviations back and hold them to
rounding: ``max |got - want| <= 1e-12 + 1e-12 * max |want|``. Every launch is bounded in time, every
process group is destroyed, and nothing leaves the loopback interface.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch

import funcreg as fr

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip(
        "torch.distributed with the gloo backend is not available in this build of torch",
        allow_module_level=True,
    )

import _dist_checks as checks  # noqa: E402  (tests/ is on sys.path, as for helpers)

ATOL = RTOL = 1e-12
MUON_ATOL = 1e-2  # Muon's Newton-Schulz iteration runs in bfloat16: sharded matmuls round differently

TWO_RANKS = [
    "dtensor_transforms",
    "dtensor_penalties",
    "dtensor_errors",
    "data_parallel",
    "compiled_mean_gradients",
    "ddp_torch_optimizer",
    "fsdp_torch_optimizer",
    "tensor_parallel_functional",
    "rank_dependent_values",
    "checkpoint_save",
    "sharded_sweep",
]
FOUR_RANKS = ["sharded_sweep", "checkpoint_reshard"]  # checkpoint_reshard ends the group: last


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both launches, once for the module: ``{"2": [rank results], "4": [...], "dir": ..., "seconds": ...}``."""
    out = tmp_path_factory.mktemp("distributed")
    found: dict[str, Any] = {"dir": str(out), "seconds": {}}
    for n, names, timeout in ((2, TWO_RANKS, 150), (4, FOUR_RANKS, 90)):
        start = time.perf_counter()
        try:
            found[str(n)] = checks.launch(n, names, str(out / f"world{n}"), timeout=timeout)
        except Exception as err:  # noqa: BLE001 - each test then fails with this error
            found[str(n)] = err
        found["seconds"][n] = time.perf_counter() - start
    return found


def _cases(runs: dict[str, Any], check: str, world: int = 2, rank: int = 0) -> dict[str, Any]:
    """The measured cases of ``check`` on ``rank``, failing the test on any rank's error."""
    results = runs[str(world)]
    if isinstance(results, Exception):
        pytest.fail(f"the {world}-rank launch failed: {results!r}")
    for r, res in enumerate(results):
        entry = res.get(check)
        if entry is None:
            pytest.fail(f"rank {r} did not run {check!r} (an earlier check failed: {sorted(res)})")
        if "error" in entry:
            pytest.fail(f"{check} failed on rank {r}:\n{entry['error']}")
    cases = results[rank][check]["cases"]
    errors = {k: v for k, v in cases.items() if isinstance(v, str)}
    if errors:
        name, text = next(iter(errors.items()))
        pytest.fail(f"{check}: {len(errors)} case(s) failed ({sorted(errors)}); {name}:\n{text}")
    return cases


def _assert_close(
    cases: dict[str, Any], atol: float = ATOL, rtol: float = RTOL, special: dict[str, float] | None = None
) -> None:
    assert cases, "no case was measured"
    bad = []
    for name, (dev, scale) in cases.items():
        limit = (special or {}).get(name, atol) + rtol * scale
        if not dev <= limit:
            bad.append(f"{name}: max deviation {dev:.3e} > {limit:.3e} (max |reference| {scale:.3g})")
    assert not bad, "distributed results differ from the single-process reference:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------------------------------
# 1. data parallelism


def test_make_step_with_mean_gradients_equals_one_process_on_the_full_batch(runs: dict[str, Any]) -> None:
    """Each rank steps on its shard with mean_gradients first: the parameters of one process on the
    full batch, for each penalty form, pure and donated, on both ranks; sum_gradients for sum losses;
    a group of its own and mixed dtypes."""
    for rank in (0, 1):
        cases = _cases(runs, "data_parallel", rank=rank)
        assert {"adamw", "clip_sgd_l1_proximal/donated", "sum_gradients", "mixed_dtypes_group"} <= set(cases)
        _assert_close(cases)


def test_mean_gradients_under_torch_compile(runs: dict[str, Any]) -> None:
    _assert_close(_cases(runs, "compiled_mean_gradients"))


def test_torch_optimizer_under_ddp(runs: dict[str, Any]) -> None:
    """fr.TorchOptimizer on a DistributedDataParallel model, with an lr scheduler, unchanged."""
    _assert_close(_cases(runs, "ddp_torch_optimizer"))


# ----------------------------------------------------------------------------------------------------
# 2. sharded parameters


def test_every_transform_and_form_on_dtensor_parameters(runs: dict[str, Any]) -> None:
    """Aliases, clipping, and every penalty form on row-, column- and vector-sharded DTensors equal
    the unsharded run (group proxes along and across the sharded dimension included)."""
    cases = _cases(runs, "dtensor_transforms")
    assert len(cases) >= 35
    _assert_close(cases, special={"muon": MUON_ATOL})


def test_penalty_values_and_diagnostics_on_dtensor_parameters_are_global(runs: dict[str, Any]) -> None:
    cases = _cases(runs, "dtensor_penalties")
    assert {"group_lasso1/value", "orthogonal/loss_form_gradient", "sparsity(0.0)", "norms(ord=inf)"} <= set(
        cases
    )
    _assert_close(cases)


def test_what_cannot_work_on_dtensor_parameters_raises_clearly(runs: dict[str, Any]) -> None:
    _cases(runs, "dtensor_errors")
    import json

    with open(os.path.join(runs["dir"], "world2", "errors0.json")) as f:
        messages = json.load(f)
    assert set(messages) == {
        "anchor_plain_reference",
        "plain_update_of_dtensor",
        "mean_gradients_of_dtensor",
        "spectral_prox_sharded",
        "orthogonal_cosine_sharded",
    }


def test_fully_shard_with_torch_optimizer_equals_unsharded(runs: dict[str, Any]) -> None:
    """FSDP2 + TorchOptimizer(clip + adamw with decay_mask + proximal group lasso), 5 steps."""
    _assert_close(_cases(runs, "fsdp_torch_optimizer"))


def test_functional_path_with_dtensor_parameters_equals_unsharded(runs: dict[str, Any]) -> None:
    """functional_call on a hook-free module with column/row-sharded and replicated DTensor
    parameters, make_step with each penalty form."""
    _assert_close(_cases(runs, "tensor_parallel_functional"))


def test_values_that_differ_by_rank_end_where_documented(runs: dict[str, Any]) -> None:
    """broadcast defaults to rank 0's values; replicate_like keeps each rank's own tensor (no
    communication); an update in another layout takes its parameter's placements, a DTensor beside a
    plain tensor raises; gather_members merges when a rank trains no member."""
    for rank in (0, 1):
        cases = _cases(runs, "rank_dependent_values", rank=rank)
        assert len(cases) == 5
        _assert_close(cases)


# ----------------------------------------------------------------------------------------------------
# 3. distributed checkpoints


def test_checkpoint_resume_on_2_ranks_equals_uninterrupted_run(runs: dict[str, Any]) -> None:
    for rank in (0, 1):
        _assert_close(_cases(runs, "checkpoint_save", rank=rank))


def test_checkpoint_resharded_to_4_ranks_and_1_process_resumes_as_uninterrupted(runs: dict[str, Any]) -> None:
    cases = _cases(runs, "checkpoint_reshard", world=4)
    assert set(cases) == {"resume_4_ranks", "resume_1_process"}
    _assert_close(cases)
    for rank in (1, 2, 3):
        _assert_close(_cases(runs, "checkpoint_reshard", world=4, rank=rank))


# ----------------------------------------------------------------------------------------------------
# 4. sharded sweeps


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_sweep_gathers_the_single_process_sweep(runs: dict[str, Any], world: int) -> None:
    """6 members (2 seeds x 3 weight decays) split round robin; parameters, final metrics and the
    History gathered on rank 0 equal the one-process ensemble of all members."""
    cases = _cases(runs, "sharded_sweep", world=world)
    assert set(cases) == {"params", "final_metrics", "history", "bitwise_equal"}
    _assert_close(cases)


# ----------------------------------------------------------------------------------------------------
# without a process group


def test_sweep_members_is_a_round_robin_partition() -> None:
    for n in (1, 5, 6, 7):
        for world in (1, 2, 3, 4, 8):
            parts = [fr.distributed.sweep_members(n, r, world) for r in range(world)]
            assert sorted(m for p in parts for m in p) == list(range(n))
            assert all(m % world == r for r, p in enumerate(parts) for m in p)
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert fr.distributed.sweep_members(3) == [0, 1, 2]  # no process group: one process, every member


def test_take_members_slices_the_member_axis() -> None:
    tree = {"w": torch.arange(12.0).reshape(4, 3), "frozen": None}
    got = fr.distributed.take_members(tree, [1, 3])
    assert torch.equal(got["w"], tree["w"][[1, 3]]) and got["frozen"] is None
    with pytest.raises(ValueError, match="member 4 is out of range for 'w', which has 4 members"):
        fr.distributed.take_members(tree, [4])
    for members in ([True], [1.0], (1, "2"), 1, "13"):  # indices are ints (not bools), in a list
        with pytest.raises(
            TypeError, match=r"Invalid members value: .* \(expected a list of member indices\)"
        ):
            fr.distributed.take_members(tree, members)
    assert torch.equal(fr.distributed.take_members(tree, (0,))["w"], tree["w"][[0]])  # a tuple is a list


def test_take_members_of_no_members_is_an_empty_member_axis() -> None:
    """A rank without members (sweep_members gives []) takes nothing: 0 rows, the other axes kept."""
    tree = {"w": torch.arange(12.0).reshape(4, 3), "h": torch.tensor([0.1, 0.2, 0.3, 0.4])}
    got = fr.distributed.take_members(tree, [])
    assert got["w"].shape == (0, 3) and got["h"].shape == (0,)
    assert got["w"].dtype == tree["w"].dtype


def test_invalid_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="Invalid rank value: 2 \\(must be < world_size, 2\\)"):
        fr.distributed.sweep_members(4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="give both rank and world_size"):
        fr.distributed.sweep_members(4, rank=0)
    with pytest.raises(ValueError, match="Invalid n value: 0"):
        fr.distributed.sweep_members(0, 0, 1)
    with pytest.raises(TypeError, match="Invalid group value: 3"):
        fr.distributed.mean_gradients(group=3)
    tx = fr.distributed.mean_gradients()  # building needs no process group; updating does
    if not torch.distributed.is_initialized():
        with pytest.raises(
            RuntimeError, match="mean_gradients needs torch.distributed's default process group"
        ):
            tx.update({"w": torch.ones(1)}, tx.init(None))
    assert repr(fr.distributed.sum_gradients()) == "sum_gradients()"


def test_gathered_parts_go_back_in_member_order() -> None:
    """What rank 0 does with the gathered parts (ranks without members send None), without processes."""
    from funcreg._src.distributed.sweep import _merge_histories, _merge_trees, _order

    for n, world in ((5, 2), (3, 4), (6, 4)):
        owned = [fr.distributed.sweep_members(n, r, world) for r in range(world)]
        parts = [{"m": torch.tensor(m, dtype=torch.float64), "none": None} if m else None for m in owned]
        merged = _merge_trees(parts, _order(n, world), n)
        assert merged["m"].tolist() == list(range(n)) and merged["none"] is None
        histories = []
        for m in owned:
            h = fr.History()
            for t in range(3):
                h.append({"data_loss": 10.0 * t + torch.tensor(m, dtype=torch.float64)})
            histories.append(h if m else None)
        got = _merge_histories(histories, _order(n, world), n)
        want = 10.0 * torch.arange(3.0, dtype=torch.float64)[:, None] + torch.arange(n, dtype=torch.float64)
        assert torch.equal(got["data_loss"], want)
