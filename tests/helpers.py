"""Shared test helpers: tree comparison, running funcreg and torch.optim side by side, finding states.

Trees are flattened here with ``torch.utils._pytree`` directly (``None`` kept as a leaf), not with
funcreg's own helpers, so a bug in funcreg's flattening cannot hide itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from hypothesis import HealthCheck
from hypothesis import strategies as st

import funcreg as fr
from funcreg.testing import gradient_sequences, param_trees

F64_ATOL = 1e-12
F32_ATOL, F32_RTOL = 1e-6, 1e-5

# Drawing a tree and ten gradient trees is slow for Hypothesis's taste on a loaded 2-core machine.
SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]


@st.composite
def problems(draw: Any, steps: Any = None, dtype: Any = None, nested: Any = None, min_leaves: int = 1) -> Any:
    """A parameter tree (flat or nested, float32 or float64) and 1 to 10 (or ``steps``) gradient trees for it."""
    nested = draw(st.booleans()) if nested is None else nested
    params = draw(param_trees(dtype=dtype, nested=nested, min_leaves=min_leaves))
    return params, draw(gradient_sequences(params, st.integers(1, 10) if steps is None else steps))


def leaves(tree: Any) -> list[Any]:
    """The leaves of ``tree`` in flattening order, ``None`` included."""
    return pytree.tree_leaves(tree, is_leaf=lambda x: x is None)


def assert_tensors_close(
    actual: torch.Tensor, expected: torch.Tensor, what: str = "", equal_nan: bool = False
) -> None:
    """float64: max abs diff <= 1e-12; float32: ``assert_close(atol=1e-6, rtol=1e-5)``; others: equal.

    With ``equal_nan``, NaN must sit at the same places in both (and is then not compared).
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: {actual} != {expected}"
    elif actual.dtype == torch.float64:
        if equal_nan:
            nan = torch.isnan(actual)
            assert torch.equal(nan, torch.isnan(expected)), f"{what}: NaN at different places"
            actual, expected = actual[~nan], expected[~nan]
        diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
        assert diff <= F64_ATOL, f"{what}: max abs diff {diff:.3e} > {F64_ATOL}"
    else:
        torch.testing.assert_close(
            actual, expected, atol=F32_ATOL, rtol=F32_RTOL, equal_nan=equal_nan, msg=lambda m: f"{what}: {m}"
        )


def paired_leaves(actual: Any, expected: Any, what: str) -> list[tuple[int, Any, Any]]:
    """The tensor leaves of two trees side by side, after checking the trees have one structure."""
    a, spec_a = pytree.tree_flatten(actual, is_leaf=lambda x: x is None)
    e, spec_e = pytree.tree_flatten(expected, is_leaf=lambda x: x is None)
    assert spec_a == spec_e, f"{what}: structure {spec_a} != {spec_e}"
    for i, (x, y) in enumerate(zip(a, e)):
        assert (x is None) == (y is None), f"{what}: leaf {i} is {x!r} vs {y!r}"
    return [(i, x, y) for i, (x, y) in enumerate(zip(a, e)) if x is not None]


def assert_trees_close(actual: Any, expected: Any, what: str = "tree", equal_nan: bool = False) -> None:
    """Same structure (``None`` in the same places) and each tensor close (see above)."""
    for i, x, y in paired_leaves(actual, expected, what):
        assert_tensors_close(x, y, f"{what} leaf {i}", equal_nan)


def assert_lists_close(actual: list[Any], expected: list[Any], what: str) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} leaves vs {len(expected)}"
    for i, (x, y) in enumerate(zip(actual, expected)):
        assert_tensors_close(x, y, f"{what} leaf {i}")


def assert_trees_equal(actual: Any, expected: Any, what: str = "tree", equal_nan: bool = False) -> None:
    """Bitwise: same structure, dtypes and values (NaN where NaN with ``equal_nan``)."""
    for i, x, y in paired_leaves(actual, expected, what):
        assert x.dtype == y.dtype, f"{what}: leaf {i} dtype {x.dtype} != {y.dtype}"
        where = f"{what} leaf {i}"
        torch.testing.assert_close(
            x, y, atol=0, rtol=0, equal_nan=equal_nan, msg=lambda m, where=where: f"{where}: {m}"
        )


def find_states(state: Any, cls: type) -> list[Any]:
    """Every instance of the NamedTuple ``cls`` inside a (chain, named_chain, masked, ...) state."""
    if isinstance(state, cls):
        return [state]
    if isinstance(state, dict):
        return [s for v in state.values() for s in find_states(v, cls)]
    if isinstance(state, (tuple, list)):
        return [s for v in state for s in find_states(v, cls)]
    return []


def find_state(state: Any, cls: type) -> Any:
    found = find_states(state, cls)
    assert len(found) == 1, f"expected one {cls.__name__} in the state, found {len(found)}"
    return found[0]


def run_funcreg(tx: fr.GradientTransformation, params: Any, grads_seq: list[Any]) -> tuple[Any, Any]:
    """``len(grads_seq)`` steps of ``tx`` from ``params``; returns the final params and state."""
    state = tx.init(params)
    for grads in grads_seq:
        updates, state = tx.update(grads, state, params)
        params = fr.apply_updates(params, updates)
    return params, state


def run_torch(
    make_optimizer: Any, params: Any, grads_seq: list[Any], schedulers: Any = None
) -> tuple[list[Any], Any]:
    """The same steps with ``torch.optim``: ``make_optimizer(list_of_parameters)`` builds the optimizer.

    A ``None`` gradient becomes ``p.grad = None`` (torch skips that parameter). ``schedulers(opt)``
    optionally builds lr schedulers, stepped after every optimizer step. Returns the
    ``nn.Parameter`` objects in flattening order and the optimizer.
    """
    ps = [torch.nn.Parameter(p.detach().clone()) for p in leaves(params)]
    opt = make_optimizer(ps)
    scheds = schedulers(opt) if schedulers is not None else []
    for grads in grads_seq:
        for p, g in zip(ps, leaves(grads)):
            p.grad = None if g is None else g.detach().clone()
        opt.step()
        for s in scheds:
            s.step()
    return ps, opt


def torch_state(opt: torch.optim.Optimizer, ps: list[torch.nn.Parameter], key: str) -> list[Any]:
    """``opt.state[p][key]`` for each parameter (``None`` where absent)."""
    return [opt.state[p].get(key) for p in ps]


def detached(ps: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach() for p in ps]


# torch.optim's state keys for the fields of funcreg's per-parameter states
# each funcreg alias named after a torch.optim class: that class's name
TORCH_NAMESAKES = {
    "sgd": "SGD",
    "adam": "Adam",
    "adamw": "AdamW",
    "adamax": "Adamax",
    "nadam": "NAdam",
    "radam": "RAdam",
    "rmsprop": "RMSprop",
    "adagrad": "Adagrad",
    "adadelta": "Adadelta",
    "rprop": "Rprop",
    "adafactor": "Adafactor",
    "muon": "Muon",
}


TORCH_KEYS = {
    fr.TraceState: {"trace": "momentum_buffer"},
    fr.ScaleByAdamState: {"mu": "exp_avg", "nu": "exp_avg_sq", "nu_max": "max_exp_avg_sq"},
}


def replace_field(state: Any, cls: type, field: str, values: list[Any]) -> Any:
    """``state`` with the per-parameter tree ``field`` of every ``cls`` inside it set to ``values``.

    A leaf stays as it is where it is ``None`` (no state for that parameter) or the value is ``None``.
    """

    def fill(tree: Any) -> Any:
        old, spec = pytree.tree_flatten(tree, is_leaf=lambda x: x is None)
        new = [o if (o is None or v is None) else v.detach().clone() for o, v in zip(old, values)]
        return pytree.tree_unflatten(new, spec)

    def walk(s: Any) -> Any:
        if isinstance(s, cls):
            tree = getattr(s, field)
            return s if tree is None else s._replace(**{field: fill(tree)})
        if isinstance(s, dict):
            return {k: walk(v) for k, v in s.items()}
        if isinstance(s, tuple) and hasattr(s, "_fields"):
            return type(s)(*[walk(v) for v in s])
        if isinstance(s, (tuple, list)):
            return type(s)(walk(v) for v in s)
        return s

    return walk(state)


def lockstep(
    tx: fr.GradientTransformation,
    params: Any,
    grads_seq: list[Any],
    make_optimizer: Any,
    check: Any,
    schedulers: Any = None,
) -> None:
    """Steps funcreg and ``torch.optim`` side by side, calling ``check(params, state, opt, ps, step)`` after each.

    After every check, funcreg's params and moment buffers are set to torch's, so each step is
    compared from identical inputs: the one-step maps must agree to rounding, and rounding differences
    cannot compound. (They would: Adam with coupled decay is sign-like near w = 0, where one ulp in w
    can change the next step by lr; an absolute tolerance over a whole trajectory then tests chaos,
    not the implementation.) Step counts are not synced: they are compared by ``check``.
    """
    ps = [torch.nn.Parameter(p.detach().clone()) for p in leaves(params)]
    opt = make_optimizer(ps)
    scheds = schedulers(opt) if schedulers is not None else []
    spec = pytree.tree_structure(params, is_leaf=lambda x: x is None)
    state = tx.init(params)
    for step, grads in enumerate(grads_seq, start=1):
        updates, state = tx.update(grads, state, params)
        params = fr.apply_updates(params, updates)
        for p, g in zip(ps, leaves(grads)):
            p.grad = None if g is None else g.detach().clone()
        opt.step()
        for s in scheds:
            s.step()
        check(params, state, opt, ps, step)
        params = pytree.tree_unflatten([p.detach().clone() for p in ps], spec)
        for cls, fields in TORCH_KEYS.items():
            for field, key in fields.items():
                state = replace_field(state, cls, field, torch_state(opt, ps, key))


def decay_schedule(wd: float, gamma: float) -> Any:
    """``count -> wd * gamma**count / (1 + count)``: a weight-decay schedule with a different value at
    every step and 0 never (read at a wrong count, it shows)."""
    return lambda count: wd * gamma**count / (1 + count)


class GroupWeightDecaySchedule:
    """A torch "scheduler" of ``group["weight_decay"]``: ``schedule(t)`` before step ``t`` (0-based),
    as torch's LR schedulers set ``group["lr"]``; the reference for funcreg's ``weight_decay=``
    schedules (``lockstep(..., schedulers=lambda opt: [GroupWeightDecaySchedule(opt, schedule)])``)."""

    def __init__(self, opt: torch.optim.Optimizer, schedule: Any) -> None:
        self.opt, self.schedule, self.count = opt, schedule, 0
        self._set()

    def _set(self) -> None:
        for group in self.opt.param_groups:
            group["weight_decay"] = float(self.schedule(self.count))

    def step(self) -> None:
        self.count += 1
        self._set()


# Tolerances of the training tests: a vmapped or compiled run against separate eager runs.
STEP_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def assert_step_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same shape and dtype; integers (step counts, num_batches_tracked) equal; floats within ``STEP_TOL``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: {actual} != {expected}"
        return
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert diff <= STEP_TOL[actual.dtype], f"{what}: max abs diff {diff:.3e} > {STEP_TOL[actual.dtype]}"


def check_compiled_matches_eager(step: Any, eager_state: Any, compiled_state: Any, batches: Any) -> None:
    """``torch.compile(step)`` equals ``step`` at every batch (metrics and state), as one graph that is
    never recompiled (``error_on_recompile``)."""
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = torch.compile(step)
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompilation raises RecompileError
        for t, batch in enumerate(batches):
            eager_state, eager_metrics = step(eager_state, *batch)
            compiled_state, compiled_metrics = compiled(compiled_state, *batch)
            for k in eager_metrics:
                assert_step_close(compiled_metrics[k], eager_metrics[k], f"step {t} metrics[{k!r}]")
            for i, (a, b) in enumerate(zip(leaves(compiled_state), leaves(eager_state))):
                assert (a is None) == (b is None)
                if a is not None:
                    assert_step_close(a, b, f"step {t} state leaf {i}")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["graph_break"])


# One of each kind of transform (aliases, combinators, wrappers, penalty forms), over a tree
# {"w": (2, 3), "b": (3,)}: the hostile-input and donation tests run every rule over all of them.
TRANSFORMS = {
    "sgd": lambda: fr.sgd(0.1),
    "sgd_momentum": lambda: fr.sgd(0.1, momentum=0.9, weight_decay=0.01),
    "adam": lambda: fr.adam(0.01, weight_decay=0.01),
    "adamw": lambda: fr.adamw(0.01),
    "adamw_amsgrad_masked": lambda: fr.adamw(
        0.01, amsgrad=True, mask=lambda p: {k: v.ndim >= 2 for k, v in p.items()}
    ),
    "clip_adam": lambda: fr.chain(
        fr.clip_by_global_norm(1.0), fr.scale_by_adam(), fr.scale_by_learning_rate(0.01)
    ),
    "proximal_l1": lambda: fr.chain(fr.sgd(0.1), fr.proximal(fr.l1(0.01), learning_rate=0.1)),
    "coupled_l2": lambda: fr.chain(fr.add_penalty_grad(fr.l2(0.1)), fr.sgd(0.1, momentum=0.5)),
    "decoupled_l1": lambda: fr.chain(fr.adam(0.01), fr.decoupled(fr.l1(0.01), learning_rate=0.01)),
    "masked_trace": lambda: fr.masked(fr.trace(0.9), {"w": True, "b": False}),
    "partition": lambda: fr.partition(
        {"a": fr.adam(0.01), "b": fr.sgd(0.1, momentum=0.9)}, {"w": "a", "b": "b"}
    ),
    "apply_if_finite": lambda: fr.apply_if_finite(fr.adam(0.01), max_consecutive_errors=2),
    "named_chain": lambda: fr.named_chain(("m", fr.trace(0.9)), ("lr", fr.scale_by_learning_rate(0.1))),
}


def keep_buffers(tx: fr.GradientTransformation, kept: bool) -> fr.GradientTransformation:
    """``tx``, whose donated kernel (``fr.adam``/``fr.adamw``/``fr.sgd``, alone or with a folded penalty
    form) writes every temporary into kept buffers when ``kept`` (normally only tensors of at least
    ``scratch.LARGE`` elements do), so that small test tensors exercise that path too."""
    from funcreg._src.kernels.fused_forms import FormKernel
    from funcreg._src.kernels.update import kernel_of

    kernel = kernel_of(tx)
    kernel = kernel.kernel if isinstance(kernel, FormKernel) else kernel
    assert kernel is not None, "no donated kernel behind this transform"
    kernel._scratch.large = 1 if kept else 1 << 62
    return tx
