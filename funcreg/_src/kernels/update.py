"""Applying updates to parameters: `apply_updates`, and `donated_update`, the one functional entry of a
donated step, which runs the torch kernel a transform records (`kernel_of`) where it applies and the
generic in-place path otherwise."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import torch

from funcreg._src.core import leafwise
from funcreg._src.core.aliasing import OverlapCheck
from funcreg._src.core.base import GradientTransformation, flat
from funcreg._src.core.donation import DonationTracker, set_donating
from funcreg._src.core.record import DonatedKernel
from funcreg._src.core.tree import compiling, flatten, tensors_of, tree_names
from funcreg._src.core.typing import PyTree
from funcreg._src.kernels.fused_forms import form_kernel


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """Returns ``params + updates`` as new tensors; the caller's tensors are never written into.

    A ``None`` update leaves its parameter as it is (the same tensor). Structures must match
    (``StructureError`` naming the first differing key), and every update has exactly its
    parameter's shape (``ContractError``), dtype and device (``LeafTypeError``): nothing is broadcast
    or cast silently.

    Examples:
        >>> import torch, funcreg as fr
        >>> fr.apply_updates({"w": torch.ones(2)}, {"w": torch.tensor([0.5, -0.5])})
        {'w': tensor([1.5000, 0.5000])}
    """
    f = flat(updates, params, "apply_updates", needs_params=True)
    ps = f.present_params()
    if ps and leafwise.owned(ps):  # a donated step: the parameters are the caller's to overwrite
        leafwise.add_(ps, f.present_updates())
        return f.tree(ps, base=f.params)
    new = leafwise.add(ps, f.present_updates()) if ps else []
    return f.tree(new, base=f.params)


def records_autograd(*trees: Any) -> bool:
    """Whether autograd would record an update over these trees: grad mode is on and a tensor
    requires grad, or a ``torch.func`` transform is active. Where it would not, the update can run
    under ``torch.no_grad()``, which spares every elementwise helper its own per-leaf check."""
    if not torch.is_grad_enabled():
        return False
    if torch._C._are_functorch_transforms_active():
        return True
    for tree in trees:
        if any(isinstance(x, torch.Tensor) and x.requires_grad for x in flatten(tree)[0]):
            return True
    return False


def check_donatable(
    what: str, tree: PyTree, unique: bool = False, tensors: list[torch.Tensor] | None = None
) -> None:
    """Raises ``ValueError`` where writing into ``tree``'s tensors would be wrong: autograd needs their
    values (grad mode on and a tensor requires grad, or ``torch.func.grad`` is tracing them), or, with
    ``unique``, one tensor appears twice (a parameter listed twice would be stepped twice).
    ``tensors``: ``tensors_of(tree)``, where the caller has it already."""
    grad_on = torch.is_grad_enabled()
    functorch = torch._C._are_functorch_transforms_active()
    if not grad_on and not unique and not functorch:
        return
    # the common case in one cheap pass over the tensors; the named error from a second, full one
    tensors = tensors_of(tree) if tensors is None else tensors
    if grad_on and any(x.requires_grad for x in tensors):
        _raise_undonatable(what, tree, unique)
    if functorch and any(torch._C._functorch.is_gradtrackingtensor(x) for x in tensors):
        _raise_undonatable(what, tree, unique)
    if unique and len({id(x) for x in tensors}) != len(tensors):
        _raise_undonatable(what, tree, unique)


def _raise_undonatable(what: str, tree: PyTree, unique: bool) -> None:
    """Raises the reason a tree may not be donated, naming the key: a tensor autograd needs (it
    requires grad, or is traced by ``torch.func.grad``) or, with ``unique``, two leaves that are the
    same tensor. Called once the caller's quick check found a reason."""
    leaves, _ = flatten(tree)
    names = tree_names(tree)
    grad_on = torch.is_grad_enabled()
    seen: dict[int, int] = {}
    for i, x in enumerate(leaves):
        if not isinstance(x, torch.Tensor):
            continue
        if (grad_on and x.requires_grad) or torch._C._functorch.is_gradtrackingtensor(x):
            raise ValueError(
                f"cannot donate {what} {names[i]!r}: autograd needs its value (differentiating "
                "through the step); use the pure path, or run the step under torch.no_grad()"
            )
        if unique and id(x) in seen:
            raise ValueError(
                f"cannot donate {what}: {names[seen[id(x)]]!r} and {names[i]!r} are the same tensor"
            )
        seen[id(x)] = i
    raise AssertionError(f"cannot donate {what}")  # unreachable: the caller found a reason


def donated_update(
    tx: GradientTransformation, grads: PyTree, state: Any, params: PyTree
) -> tuple[PyTree, Any]:
    """One step of the bare loop, ``tx.update`` then :func:`apply_updates`, writing into ``state`` and
    ``params`` instead of allocating new ones.

    Equal to the pure ``updates, state = tx.update(grads, state, params); params =
    apply_updates(params, updates)`` (tested for every alias, combinator and penalty form), at
    ``torch.optim``'s cost: moments, momentum buffers, counters and parameters are updated in place.
    The donated ``state`` and ``params`` must not be used afterwards except through the returned ones
    (for most transforms they are the same tensors with new contents). ``grads`` are only read.
    Transforms that cannot update in place run pure, which is always correct. Refused
    (``ValueError``, naming the tensors) where autograd needs the old values, a tensor is donated
    twice, two parameters or a parameter and a state tensor share memory (views of one storage), a
    gradient shares memory with either, or ``state`` is one that an earlier donated step of this
    thread consumed (any generation). A donated
    step is not differentiable: it runs under ``torch.no_grad()`` (use the pure path to differentiate
    through an optimizer step, e.g. with respect to a learning rate).

    Returns:
        ``(params, state)`` after the step.

    Examples:
        >>> import torch, funcreg as fr
        >>> tx = fr.adamw(0.1, weight_decay=0.5)
        >>> params = {"w": torch.ones(2)}
        >>> state = tx.init(params)
        >>> buffer = params["w"]
        >>> params, state = fr.donated_update(tx, {"w": torch.zeros(2)}, state, params)
        >>> params["w"], params["w"] is buffer  # 1 - 0.1 * 0.5: written into the donated tensor
        (tensor([0.9500, 0.9500]), True)
    """
    if compiling():  # under torch.compile the checks ran when the caller was traced eagerly, or not at all
        return donated_step(tx, grads, state, params)
    # one walk over each tree, shared by the checks (on thousands of small tensors the walks are
    # what the checks cost)
    param_tensors, state_tensors = tensors_of(params), tensors_of(state)
    check_donatable("params", params, unique=True, tensors=param_tensors)
    check_donatable("state", state, tensors=state_tensors)
    checks = _CHECKS
    checks.overlap.check(params, state, grads, tensors=(param_tensors, state_tensors))
    checks.donations.consume(state)  # last: a step refused above consumed nothing
    params, state = donated_step(tx, grads, state, params)
    checks.donations.produce(state)
    return params, state


class _ThreadChecks(threading.local):
    """The checks of :func:`donated_update` in this thread: the state it consumed last, and the
    memory layout of what it last wrote."""

    def __init__(self) -> None:
        self.donations = DonationTracker()
        self.overlap = OverlapCheck()


_CHECKS = _ThreadChecks()


def donated_step(tx: GradientTransformation, grads: PyTree, state: Any, params: PyTree) -> tuple[PyTree, Any]:
    """:func:`donated_update` without its checks (the caller made them): the fused kernel where the
    transform has one and it applies (under ``torch.compile`` too, traced as torch.optim's compiled
    step is, outside vmap and grad), else ``update`` + ``apply_updates`` with donation on."""
    eager = not compiling()
    plain = eager and not records_autograd(grads)
    traced = not eager and not records_autograd(grads, state, params)
    kernel = kernel_of(tx) if plain or traced else None
    if kernel is not None:
        with torch.no_grad():
            done = kernel(grads, state, params)
        if done is not None:
            return done
    previous = set_donating(True)
    try:
        if plain:
            with torch.no_grad():
                updates, state = tx.update(grads, state, params)
                params = apply_updates(params, updates)
        else:
            updates, state = tx.update(grads, state, params)
            params = apply_updates(params, updates)
    finally:
        set_donating(previous)
    return params, state


def kernel_of(tx: GradientTransformation) -> DonatedKernel | None:
    """The torch kernel behind ``tx``'s donated step, or ``None``: an alias's own (``fr.adam``,
    ``fr.adamw``, ``fr.sgd``: ``tx.record.kernel``), or for a chain of an alias and a penalty form the
    folded :class:`FormKernel`, found from ``tx.record.parts`` once and kept in the record."""
    record = tx.record
    if record.kernel is not None or record.parts is None or record.folded:
        return record.kernel
    kernel = form_kernel(*record.parts)
    if not compiling():
        # a memo of what the parts give (the record is otherwise never replaced on a built transform);
        # not while tracing, where the write would be a guard that fails at the next call: a recompile
        tx.__dict__["_record"] = dataclasses.replace(record, kernel=kernel, folded=True)
    return kernel
