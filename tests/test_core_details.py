"""Details of the core helpers: memory overlap of broadcast views, the donation flag and tracker,
step counts, prefix broadcasting, hyperparameter checks and DTensor layouts in ``apply_updates``."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import pytest
import torch

import funcreg as fr
from funcreg._src.core.aliasing import OverlapCheck, memory_span
from funcreg._src.core.donation import donating, donation
from funcreg._src.core.steps import StepCount
from funcreg._src.core.tree import broadcast_prefix
from funcreg._src.core.validation import check_int

# --- memory overlap ------------------------------------------------------------------------------------


def test_a_broadcast_view_spans_the_memory_it_reads():
    base = torch.zeros(3, 1)
    view = base.expand(3, 4)  # strides (1, 0): every column reads base's 3 elements
    assert not view.is_contiguous()
    start = base.data_ptr()
    assert memory_span(view) == (start, start + 3 * base.element_size())


def test_a_state_tensor_that_is_a_broadcast_view_of_a_parameter_is_refused():
    p = torch.zeros(3, 1)
    with pytest.raises(ValueError, match="share memory"):
        OverlapCheck().check({"w": p}, {"m": p.expand(3, 4)})


def test_a_gradient_that_is_a_broadcast_view_of_a_parameter_is_refused():
    p = torch.zeros(3, 1)
    other = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="gradient 'w' shares memory"):
        OverlapCheck().check({"w": other, "b": p}, {}, grads={"w": p.expand(3, 4), "b": torch.zeros(3, 1)})


# --- donation ------------------------------------------------------------------------------------------


def test_donation_turns_donating_on_by_default_and_restores_it():
    assert not donating()
    with donation():
        assert donating()
        with donation(False):
            assert not donating()
        assert donating()
    assert not donating()


def _donated_step() -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    X = torch.arange(6.0, dtype=torch.float64).reshape(3, 2)
    y = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    step = fr.make_step(lambda p, X, y: ((X @ p["w"] - y) ** 2).mean(), fr.adam(0.1), donate=True)
    return step, step.init({"w": torch.zeros(2, dtype=torch.float64)}), X, y


def test_a_donated_step_keeps_no_reference_to_the_train_state_it_consumed():
    step, state, X, y = _donated_step()
    before = sys.getrefcount(state)
    new, _ = step(state, X, y)
    assert sys.getrefcount(state) == before  # the consumed state is marked, not held
    with pytest.raises(ValueError, match="donated to an earlier step"):
        step(state, X, y)
    step(new, X, y)


# --- step counts ---------------------------------------------------------------------------------------


def test_a_step_count_is_immutable():
    count = StepCount((1, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        count.values = (3, 3)  # type: ignore[misc]
    assert count.values == (1, 2)


def test_step_counts_compare_by_identity_never_by_tensor_truth():
    a, b = StepCount((3, 3)), StepCount((3, 3))
    assert a == a and a != b

    def compare(t: torch.Tensor) -> torch.Tensor:
        # under vmap a tensor step has no truth value: comparing two counts must not ask for one
        x, z = StepCount((t + 1,)), StepCount((t + 1,))
        assert x != z
        return t

    steps = torch.tensor([1, 2, 3])
    assert torch.equal(torch.func.vmap(compare)(steps), steps)


# --- prefix broadcasting -------------------------------------------------------------------------------


def test_a_list_prefix_of_another_length_than_the_tree_is_refused():
    tree = [torch.zeros(1), torch.zeros(2)]
    assert broadcast_prefix([True, False], tree) == [True, False]
    with pytest.raises(fr.StructureError, match="has 1 entries at '<root>'"):
        broadcast_prefix([True], tree)
    with pytest.raises(fr.StructureError, match="has 3 entries at '<root>'"):
        broadcast_prefix([True, False, True], tree)


# --- hyperparameter checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [torch.tensor(True), torch.tensor(0.1 + 0j)], ids=["bool-tensor", "complex-tensor"]
)
def test_a_bool_or_complex_tensor_hyperparameter_is_refused(value):
    with pytest.raises(TypeError, match=r"Invalid learning_rate value: tensor .*\(expected a real tensor\)"):
        fr.adam(value)


def test_check_int_accepts_zero_and_refuses_negatives_by_default():
    check_int("n", 0)
    check_int("n", 5)
    with pytest.raises(ValueError, match=r"Invalid n value: -1 \(must be >= 0\)"):
        check_int("n", -1)
    with pytest.raises(TypeError, match="expected an int"):
        check_int("n", True)


# --- DTensor layouts -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _one_rank_mesh() -> Any:
    """A one-rank gloo group and its CPU device mesh; a group that exists already is left alone."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        if own:
            dist.destroy_process_group()


def test_a_dtensor_update_for_a_plain_parameter_is_refused_naming_the_key(_one_rank_mesh):
    from torch.distributed.tensor import Replicate, distribute_tensor

    p = torch.zeros(4, dtype=torch.float64)
    u = distribute_tensor(torch.ones(4, dtype=torch.float64), _one_rank_mesh, [Replicate()])
    with pytest.raises(fr.LeafTypeError, match=r"apply_updates: the update for 'w' is .*its parameter"):
        fr.apply_updates({"w": p}, {"w": u})
    # the other way round too
    with pytest.raises(fr.LeafTypeError, match=r"the update for 'w' is .*its parameter"):
        fr.apply_updates({"w": u}, {"w": p})
    # like with like is applied
    out = fr.apply_updates({"w": u}, {"w": u})
    assert torch.equal(out["w"].full_tensor(), torch.full((4,), 2.0, dtype=torch.float64))
