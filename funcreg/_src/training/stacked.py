"""An ensemble's optimizer run once on the stacked tensors, outside vmap.

Under ``vmap`` an optimizer's update runs its per-tensor operations on batched tensors, with the
tree plumbing of every transform around them. An elementwise optimizer whose hyperparameters are
the same for every member computes on the stacked tensors ``(members, ...)`` exactly what it computes
per member, so an eager ensemble step takes the gradients under ``vmap`` and then runs the alias's
torch kernel (:mod:`funcreg._src.kernels.fused`: torch's foreach Adam/AdamW/SGD sequence, or the fused
kernels) once over the stacked parameters and state: a few foreach launches per step.

It applies when the step's ``tx`` is an ``adam``/``adamw``/``sgd`` alias itself (not a factory of
hyperparameters), the penalty, if any, is in the loss (a gradient-edit or proximal form reports per
member), a decay mask does not look at tensors (a callable mask would see the member axis), and every
member has taken the same number of steps. Elsewhere, and under ``torch.compile``, the whole step is
vmapped as before. Results equal the vmapped step to rounding (the kernel's operation order), tested.
"""

from __future__ import annotations

from typing import Any

import torch

from funcreg._src.core.base import GradientTransformation
from funcreg._src.core.tree import compiling, flatten, unflatten
from funcreg._src.core.typing import PyTree
from funcreg._src.kernels.fused import AdamKernel, SgdKernel
from funcreg._src.kernels.update import kernel_of, records_autograd
from funcreg._src.selection.table import Selection
from funcreg._src.training.members import num_members, vmap
from funcreg._src.training.step import Step, TrainState, _copy_tree

Kernel = AdamKernel | SgdKernel


def stacked_kernel(step: Step) -> Kernel | None:
    """The torch kernel that can step all members at once, or ``None`` (see the module)."""
    if not isinstance(step.tx, GradientTransformation):
        return None
    if step.penalty is not None and step.form != "loss":
        return None
    kernel = kernel_of(step.tx)
    if not isinstance(kernel, (AdamKernel, SgdKernel)):
        return None
    mask = getattr(kernel, "mask", None)
    if mask is not None and callable(mask) and not isinstance(mask, Selection):
        return None
    return kernel


def stacked_step(
    step: Step, kernel: Kernel, train_state: TrainState, batch: tuple[Any, ...], in_dims: tuple[Any, ...]
) -> tuple[TrainState, dict[str, Any]] | None:
    """One ensemble step with the optimizer on the stacked tensors, or ``None`` where it does not
    apply (the caller then vmaps the whole step). With ``step.donate`` the state's tensors are
    written into; otherwise they are copied first, and the caller's are left as they were."""
    params, opt_state, buffers, hparams = train_state
    # the kernel runs under no_grad: a step that autograd would record (differentiated through) is vmapped
    if compiling() or records_autograd(params, opt_state, hparams):
        return None
    n = num_members(params)
    counters = [x for x in flatten(opt_state)[0] if isinstance(x, torch.Tensor) and x.dtype == torch.int64]
    if any(c.shape != (n,) for c in counters):
        return None
    # members stepped together (the usual case): their counters agree, and one 0-d view of each
    # serves the kernel; one sync for all of them
    if counters and not bool(torch.stack([(c == c[0]).all() for c in counters]).all()):
        return None

    grads, (metrics, new_buffers, aux) = _gradients(step, params, buffers, hparams, batch, in_dims, vmap)
    if not step.donate:
        params, opt_state = _copy_tree(params), _copy_tree(opt_state)
    leaves, spec = flatten(opt_state)
    views = unflatten(
        [x[0] if isinstance(x, torch.Tensor) and x.dtype == torch.int64 else x for x in leaves], spec
    )
    with torch.no_grad():
        done = kernel(grads, views, params)
        if done is None:
            return None
        for c in (x for x in leaves if isinstance(x, torch.Tensor) and x.dtype == torch.int64):
            c[1:] = c[0]  # every member's counter, stepped through member 0's view
    metrics = step.finish_metrics(metrics, opt_state, aux)
    return TrainState(done[0], opt_state, new_buffers, hparams), metrics


def _gradients(
    step: Step,
    params: PyTree,
    buffers: PyTree,
    hparams: Any,
    batch: tuple[Any, ...],
    in_dims: tuple[Any, ...],
    vmap: Any,
) -> tuple[PyTree, tuple[dict[str, Any], PyTree, Any]]:
    """Every member's gradients and step outputs: the objective under vmap, differentiated by autograd.

    ``vmap(grad(f))`` runs every operation of the backward pass through both transforms; autograd
    over ``vmap(f)`` runs the backward pass on the stacked tensors directly (about a fifth less time
    on the digits MLP at 16 members). The members are independent, so the gradient of the sum of
    their objectives is each member's own gradient; a parameter the objective does not use gets
    zeros, as from ``torch.func.grad``.
    """
    leaves, spec = flatten(params)
    wants = [isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()) for x in leaves]
    tracked = [x.detach().requires_grad_(True) if w else x for x, w in zip(leaves, wants)]

    def objective(p: PyTree, b: PyTree, h: Any, *xs: Any) -> Any:
        return step._objective(p, b, h, xs)

    with torch.enable_grad():
        total, extra = vmap(objective, (0, 0, 0, *in_dims[1:]))(
            unflatten(tracked, spec), buffers, hparams, *batch
        )
        inputs = [x for x, w in zip(tracked, wants) if w]
        if inputs and total.requires_grad:
            found = iter(torch.autograd.grad(total.sum(), inputs, materialize_grads=True))
        else:  # an objective that does not depend on the parameters
            found = iter([torch.zeros_like(x) for x in inputs])
    grads = unflatten([next(found) if w else x for x, w in zip(tracked, wants)], spec)
    extra = _detached(extra)  # (metrics, new_buffers[, aux]), in one walk
    return grads, (extra[0], extra[1], extra[2] if step.has_aux else None)


def _detached(tree: PyTree) -> PyTree:
    leaves, spec = flatten(tree)
    return unflatten([x.detach() if isinstance(x, torch.Tensor) else x for x in leaves], spec)
