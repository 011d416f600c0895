"""A transform's record (``tx.record``): the one typed place a donated step looks for its kernel, and
``Penalty.kernel_form``, the protocol through which a penalty form is folded into a kernel."""

from __future__ import annotations

import pytest
import torch

import funcreg as fr
from funcreg._src.core.record import NO_RECORD, PenaltyForm, TransformRecord
from funcreg._src.kernels.fused import AdamKernel, SgdKernel
from funcreg._src.kernels.fused_forms import FormKernel
from funcreg._src.kernels.update import kernel_of


def _identity_by_hand() -> fr.GradientTransformation:
    return fr.GradientTransformation(lambda p: fr.EmptyState(), lambda u, s, p=None: (u, s))


def test_a_transform_built_by_hand_has_an_empty_record_and_no_kernel():
    tx = _identity_by_hand()
    assert tx.record is NO_RECORD
    assert kernel_of(tx) is None
    assert repr(tx).startswith("GradientTransformation(")


def test_the_aliases_record_their_torch_kernel_and_print_their_call():
    assert isinstance(fr.adamw(1e-3, weight_decay=0.1).record.kernel, AdamKernel)
    assert isinstance(fr.adam(1e-3).record.kernel, AdamKernel)
    assert isinstance(fr.sgd(0.1, momentum=0.9).record.kernel, SgdKernel)
    tx = fr.adamw(0.001)
    assert repr(tx) == tx.record.config and tx.record.config.startswith("adamw(0.001")
    # a transform without a torch kernel records none
    assert fr.rmsprop(0.01).record.kernel is None


def test_a_chain_records_its_parts_and_folds_an_l1_proximal_form_once():
    alias, form = fr.adamw(1e-3), fr.proximal(fr.l1(1e-4), 1e-3)
    tx = fr.chain(alias, form)
    assert tx.record.parts == ((alias, form), None)
    assert isinstance(form.record.form, PenaltyForm) and form.record.form.kind == "proximal"
    kernel = kernel_of(tx)
    assert isinstance(kernel, FormKernel)
    assert kernel_of(tx) is kernel  # found once, kept in the record
    names = fr.named_chain(("opt", alias), ("l1", form))
    assert names.record.parts == ((alias, form), ("opt", "l1"))
    assert isinstance(kernel_of(names), FormKernel)


def test_with_record_returns_a_new_transform_and_keeps_the_functions():
    tx = _identity_by_hand()
    other = tx.with_record(config="mine()")
    assert other is not tx and tx.record is NO_RECORD
    assert other.update is tx.update
    assert repr(other) == "mine()"
    with pytest.raises(TypeError, match="record must be a TransformRecord"):
        fr.GradientTransformation(tx.init, tx.update, {"config": "x"})  # type: ignore[arg-type]
    # a NamedTuple still: unpacks into its two functions
    init, update = other
    assert update is tx.update


def test_a_custom_record_kernel_runs_the_donated_step():
    """The record is the dispatch: a kernel put there is what donated_update runs."""
    calls = []

    def kernel(grads, state, params):
        calls.append(1)
        for w, g in zip(params.values(), grads.values()):
            w.sub_(g)
        return params, state

    tx = _identity_by_hand().with_record(kernel=kernel)
    params = {"w": torch.ones(3)}
    out, _ = fr.donated_update(tx, {"w": torch.full((3,), 0.25)}, tx.init(params), params)
    assert calls == [1]
    assert torch.equal(out["w"], torch.full((3,), 0.75)) and out["w"] is params["w"]


@pytest.mark.parametrize(
    ("penalty", "expected"),
    [
        (fr.l2(0.5), ("l2", 0.5)),
        (fr.l1(2.0), ("l1", 2.0)),
        (fr.l2(3), ("l2", 3.0)),
        (fr.l2(torch.tensor(0.5)), None),  # a tensor coefficient (vmapped, learned): the generic path
        (fr.elastic_net(0.1, 0.2), None),
        (fr.anchor(0.1, {"w": torch.zeros(2)}), None),
        (fr.group_lasso(0.1), None),
        (fr.l1(0.1) + fr.l2(0.1), None),
        (fr.mcp(1.0), None),
    ],
)
def test_kernel_form_says_exactly_which_penalties_are_plain_l1_or_l2(penalty, expected):
    assert penalty.kernel_form() == expected


def test_a_penalty_that_declares_a_kernel_form_is_folded_and_equals_the_pure_step():
    """Folding asks the protocol only: a user's Penalty that is c*|w|_1 and says so is folded, and the
    folded donated step equals the pure one."""

    class MyL1(fr.Penalty):
        name = "my_l1"

        def selected_flat(self, fp):
            return [True] * len(fp.leaves)

        def terms_flat(self, fp):
            return [(self.name, sum(0.3 * w.abs().sum() for w in fp.leaves))]

        def grad_flat(self, fp):
            return [0.3 * torch.sgn(w) for w in fp.leaves]

        def why_no_prox(self, fp):
            return None

        def prox_flat(self, fp, step):
            return [torch.nn.functional.softshrink(w, float(step) * 0.3) for w in fp.leaves]

        def kernel_form(self):
            return ("l1", 0.3)

    tx = fr.chain(fr.adamw(0.1), fr.proximal(MyL1(), 0.1))
    assert isinstance(kernel_of(tx), FormKernel)
    params = {"w": torch.tensor([1.0, -0.02, 0.5])}
    grads = {"w": torch.tensor([0.1, 0.2, -0.3])}
    pure_updates, _ = tx.update(grads, tx.init(params), params)
    pure = fr.apply_updates(params, pure_updates)
    donated = {"w": params["w"].clone()}
    out, _ = fr.donated_update(tx, grads, tx.init(donated), donated)
    torch.testing.assert_close(out["w"], pure["w"], atol=1e-7, rtol=1e-6)


def test_transform_record_defaults_are_empty():
    assert TransformRecord() == NO_RECORD
    assert NO_RECORD.kernel is None and NO_RECORD.parts is None and not NO_RECORD.folded


def test_records_and_table_entries_cannot_be_changed_in_place():
    # a record is shared by every copy of a transform, a table entry by every optimizer built from
    # its name: a write would change them all, so both are frozen (with_record makes a new record)
    import dataclasses

    from funcreg._src.optim.table import optimizer_spec

    tx = fr.chain(fr.sgd(0.1), fr.proximal(fr.l1(0.01), learning_rate=0.1))
    form = fr.decoupled(fr.l2(0.1), learning_rate=0.1).record.form
    assert form is not None and form.report  # the form reports its value unless told otherwise
    assert PenaltyForm("coupled", fr.l2(0.1), None).report
    for frozen, field in [(tx.record, "kernel"), (form, "report"), (optimizer_spec("adamw"), "name")]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(frozen, field, None)
    assert tx.with_record(kernel=None).record is not tx.record
