"""Ensembles and sweeps: many members (seeds x coefficients) trained as one vmapped computation.

Members are stacked along a new leading axis of every tensor. Members must be *created* outside
vmap with their own seeds (random initialisation inside vmap would give identical members);
:func:`init_members` does that. :func:`ensemble_step` vmaps a :class:`funcreg.Step` over members,
with one batch shared by all members or one batch per member, and per-member randomness (dropout).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from funcreg._src.core.aliasing import OverlapCheck
from funcreg._src.core.donation import DonationTracker
from funcreg._src.core.tree import flatten, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.training.hparams import as_hparams, float_dtype
from funcreg._src.training.members import num_members, vmap
from funcreg._src.training.stacked import stacked_kernel, stacked_step
from funcreg._src.training.step import Step, TrainState

Batch = Literal["shared", "per_member"]


class EnsembleStep:
    """A :class:`funcreg.Step` vmapped over members; see :func:`ensemble_step`."""

    def __init__(self, step: Step, batch: Batch) -> None:
        self.step = step
        self.batch = batch
        self._donations = DonationTracker()
        self._overlap = OverlapCheck()
        # eager: the optimizer on the stacked tensors, outside vmap, where that is exact
        self._stacked = stacked_kernel(step)

    def init(
        self, params: PyTree, buffers: PyTree | None = None, hparams: dict[str, Any] | None = None
    ) -> TrainState:
        """The stacked :class:`funcreg.TrainState` of all members.

        ``params`` (and ``buffers``) are stacked trees; each ``hparams`` value is a float (shared by
        all members) or a tensor with one value per member.
        """
        n = num_members(params)
        if buffers:
            _check_members("buffers", buffers, n)
        hp = as_hparams(hparams, float_dtype(params))
        hp = {k: _per_member(k, v, n) for k, v in hp.items()}
        self._check_hparams(hp, n)
        state = vmap(self.step.init, (0, 0, 0))(params, buffers if buffers else None, hp)
        # entries that do not depend on the member (step counts) come out of vmap expanded, with
        # stride 0: give every member its own memory
        leaves, spec = flatten(state)
        return unflatten([None if x is None else x.contiguous() for x in leaves], spec)

    def _check_hparams(self, hparams: dict[str, torch.Tensor], n: int) -> None:
        """Builds each member's transform and penalty once, eagerly, with that member's values.

        Inside vmap a factory's validation cannot read the values (``weight_decay=-5`` for one member
        would run unnoticed), so each member's hyperparameters are checked here, before vmapping,
        and an error names the member. Re-checked only when the hparams tensors change.
        """
        key = tuple((k, id(v), v._version) for k, v in sorted(hparams.items()))
        if not hparams or key == getattr(self, "_checked", None):
            return
        for m in range(n):
            member = {k: v[m] for k, v in hparams.items()}
            try:
                self.step.transform(member)
            except (ValueError, TypeError) as err:
                values = {k: float(v) for k, v in member.items()}
                raise type(err)(f"member {m} (hparams {values}): {err}") from None
        self._checked = key

    def __call__(self, train_state: TrainState, *batch: Any) -> tuple[TrainState, dict[str, Any]]:
        """One step for every member: ``(train_state, metrics)`` with a leading member axis."""
        n = num_members(train_state.params)
        if not _is_traced(train_state.hparams):
            self._check_hparams(train_state.hparams, n)
        if self.batch == "per_member":
            for i, b in enumerate(batch):
                _check_members(f"batch argument {i}", b, n)
        in_dims = (0,) + ((0 if self.batch == "per_member" else None),) * len(batch)
        if self.step.donate:
            if not _is_traced(train_state.hparams) and not self._donations.is_latest(train_state):
                self._overlap.check(train_state.params, train_state.opt_state, names=("params", "opt_state"))
            self._donations.consume(train_state)
        out = None
        if self._stacked is not None:
            out = stacked_step(self.step, self._stacked, train_state, batch, in_dims)
        if out is None:
            # donation inside vmap: eager vmap keeps the update pure (batched in-place writes are not
            # safe to mix with unbatched operands); under torch.compile the writes go into the inputs
            out = vmap(self.step, in_dims)(train_state, *batch)
        if self.step.donate:
            self._donations.produce(out[0])
        return out


def _is_traced(hparams: dict[str, torch.Tensor]) -> bool:
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    return compiling or any(torch._C._functorch.is_functorch_wrapped_tensor(v) for v in hparams.values())


def _check_members(what: str, tree: PyTree, n: int) -> None:
    try:
        m = num_members(tree)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
    if m != n:
        raise ValueError(f"{what} has {m} members along its leading axis, the parameters have {n}")


def _per_member(name: str, value: torch.Tensor, n: int) -> torch.Tensor:
    if value.ndim == 0:
        return value.expand(n).clone()
    if value.ndim != 1 or value.shape[0] != n:
        raise ValueError(
            f"hparams[{name!r}] has shape {tuple(value.shape)}; expected a float or a 1-D tensor with one "
            f"value per member ({n})"
        )
    return value


def ensemble_step(step: Step, batch: Batch = "shared") -> EnsembleStep:
    """Vmaps a training step over ensemble members (seeds, coefficients, or both).

    Args:
        step: from :func:`funcreg.make_step`.
        batch: ``"shared"`` (every member sees the same batch) or ``"per_member"`` (each batch
            argument has a leading member axis: each seed its own data order).

    Randomness inside the step (dropout) differs per member (``vmap(randomness="different")``).
    A sweep is an ensemble whose ``hparams`` differ per member: build ``tx``/``penalty`` of
    :func:`funcreg.make_step` as factories of ``hparams``.

    Examples:
        >>> import torch, funcreg as fr
        >>> loss = lambda p, x: ((p["w"] * x).sum() - 1.0) ** 2
        >>> step = fr.make_step(loss, lambda h: fr.sgd(0.1, weight_decay=h["wd"]))
        >>> ens = fr.ensemble_step(step)
        >>> state = ens.init({"w": torch.ones(3, 2)}, hparams={"wd": torch.tensor([0.0, 0.1, 0.2])})
        >>> state, metrics = ens(state, torch.tensor([0.5, 0.5]))
        >>> metrics["data_loss"].shape, state.params["w"][:, 0]
        (torch.Size([3]), tensor([1.0000, 0.9900, 0.9800]))
    """
    if not isinstance(step, Step):
        raise TypeError(f"ensemble_step expects a funcreg Step (from make_step), got {type(step).__name__}")
    if batch not in ("shared", "per_member"):
        raise ValueError(f"Invalid batch value: {batch!r} (expected 'shared' or 'per_member')")
    return EnsembleStep(step, batch)
