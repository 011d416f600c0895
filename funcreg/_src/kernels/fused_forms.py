"""Penalty forms folded into torch's kernels in a donated step.

A chain of two, an ``adam``/``adamw``/``sgd`` alias and a penalty form, is in a donated step what a
``torch.optim`` param group with ``weight_decay`` is:

==============================================  =============================================
chain                                           donated step
==============================================  =============================================
``add_penalty_grad(l2(c)), adam(lr)``           Adam's kernel with coupled ``weight_decay=c``
``adam(lr), decoupled(l2(c), learning_rate=s)`` AdamW's kernel, decaying by ``s * c`` (SGD: the
                                                weights scaled by ``1 - s * c`` before the step;
                                                fused without momentum: ``weight_decay=s * c / lr``)
``adamw(lr), proximal(l1(c), learning_rate=s)`` the kernel, then ``softshrink(w, s * c)`` in place
==============================================  =============================================

so the form costs what torch's decay costs (no gradient buffer, no second pass adding it, no
``prox - w`` update), plus the penalty's value for the report (one read of the parameters, before the
step, as the pure path computes it; none with ``report=False``). The penalty's selection becomes the groups. Anything else
(another penalty, a per-leaf or tensor coefficient, maximize with a coupled penalty, complex
parameters, tracing) returns ``None`` and the step runs the generic donated path, which equals the
pure one bit for bit. The folded step equals the pure path to rounding (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from funcreg._src.core import leafwise
from funcreg._src.core.record import PenaltyForm
from funcreg._src.core.tree import compiling, flatten
from funcreg._src.core.typing import PyTree
from funcreg._src.core.validation import schedule_value
from funcreg._src.forms.forms import PenaltyState, _next_report
from funcreg._src.kernels.fused import AdamKernel, ExtraDecay, SgdKernel
from funcreg._src.penalties import FlatParams


def _coefficient(form: PenaltyForm) -> float | None:
    """The scalar coefficient of an L2 (coupled, decoupled) or L1 (proximal) penalty, else ``None``:
    asked of the penalty through its protocol (:meth:`funcreg.Penalty.kernel_form`)."""
    found = form.penalty.kernel_form()
    if found is None or found[0] != ("l1" if form.kind == "proximal" else "l2"):
        return None
    return found[1]


@dataclass(frozen=True)
class FormKernel:
    """The donated step of a chain ``[form, alias]`` or ``[alias, form]`` (see the module)."""

    kernel: AdamKernel | SgdKernel
    form: PenaltyForm
    coefficient: float
    form_first: bool
    names: tuple[str, ...] | None  # a named_chain's names, in order; None for a chain

    def __call__(self, grads: PyTree, state: Any, params: PyTree) -> tuple[PyTree, Any] | None:
        if compiling() or torch._C._are_functorch_transforms_active():
            return None
        states = self._split(state)
        if states is None:
            return None
        pstate, ostate = states
        if not isinstance(pstate, PenaltyState):
            return None
        kind, c = self.form.kind, self.coefficient
        if kind == "coupled" and self.kernel.maximize:
            return None  # the chain negates the penalty's gradient with the loss's; torch's kernel does not
        fp = FlatParams.of(params)
        keep = self.form.penalty.selected_flat(fp)
        count = leafwise.concrete(pstate.count)
        rate = 1.0 if self.form.learning_rate is None else schedule_value(self.form.learning_rate, count)
        if isinstance(rate, torch.Tensor) or (kind == "proximal" and rate * c < 0):
            return None
        coefficients = [c if k else 0.0 for k in keep]
        # at the params before the step, as the pure path reports it
        report = _next_report(self.form.penalty, fp, pstate, self.form.report)
        if kind == "coupled":
            extra = ExtraDecay(coupled=coefficients)
        elif kind == "decoupled":
            extra = ExtraDecay(decoupled=coefficients, rate=float(rate))
        else:
            extra = None
        present = [g is not None for g in flatten(grads)[0]]
        done = self.kernel(grads, ostate, params, extra)
        if done is None:
            return None
        params, ostate = done
        if kind == "proximal":
            # the prox of the moved point, where the update is present and the penalty selects: in
            # place (an elementwise op may write into its own input), equal to softshrink to the bit
            for w, k, g in zip(fp.leaves, keep, present):
                if k and g:
                    torch.ops.aten.softshrink.out(w, rate * c, out=w)
        return params, self._join(report, ostate)

    def _split(self, state: Any) -> tuple[Any, Any] | None:
        if self.names is None:
            if not (isinstance(state, tuple) and not hasattr(state, "_fields") and len(state) == 2):
                return None
            parts = state
        else:
            if not (isinstance(state, dict) and tuple(state) == self.names):
                return None
            parts = tuple(state.values())
        return (parts[0], parts[1]) if self.form_first else (parts[1], parts[0])

    def _join(self, pstate: Any, ostate: Any) -> Any:
        parts = (pstate, ostate) if self.form_first else (ostate, pstate)
        return parts if self.names is None else dict(zip(self.names, parts))


def form_kernel(transforms: tuple[Any, ...], names: tuple[str, ...] | None = None) -> FormKernel | None:
    """The folded donated step of a chain of two transforms (``names``: a named_chain's), where one is
    an ``adam``/``adamw``/``sgd`` alias with a torch kernel and the other an L2 / L1 penalty form in
    the right place; else ``None``."""
    if len(transforms) != 2:
        return None
    first, second = transforms
    for form_first, form_tx, alias_tx in ((True, first, second), (False, second, first)):
        form, kernel = form_tx.record.form, alias_tx.record.kernel
        if form is None or not isinstance(kernel, (AdamKernel, SgdKernel)):
            continue
        if form_first != (form.kind == "coupled"):  # a coupled edit goes first, the others after
            continue
        c = _coefficient(form)
        if c is not None:
            return FormKernel(kernel, form, c, form_first, names)
    return None
