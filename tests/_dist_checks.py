"""The checks of tests/test_distributed.py, run inside gloo process groups on 127.0.0.1.

Spawned processes import this module by name, so it holds everything they run: :func:`launch` starts
``nprocs`` processes (``torch.multiprocessing.start_processes`` from a forkserver that has imported
torch, torch.distributed and funcreg once, so each rank starts in milliseconds, not seconds), every
rank runs the named checks in order and writes what it measured to ``<out>/rank<r>.json``: for each
case, the largest absolute deviation from a single-process reference computed right there (unsharded
parameters, the full batch), and the largest absolute reference value (for a relative tolerance).
Everything is float64, so agreement is to rounding.

Run directly (``python tests/_dist_checks.py``) it runs the checks and prints the measurements.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch

PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.distributed.tensor",
    "torch.distributed.fsdp",
    "torch.distributed.checkpoint",
    "torch.distributed.checkpoint.state_dict",
    "torch.nn.parallel",
    "torch._dynamo",
    "funcreg",
]

D = torch.float64


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nprocs: int, checks: list[str], out: str, timeout: float) -> list[dict[str, Any]]:
    """Runs ``checks`` on ``nprocs`` gloo ranks; returns each rank's results (``rank<r>.json``).

    Raises ``TimeoutError`` (after terminating the processes) when they are not done in ``timeout``
    seconds, and ``torch.multiprocessing.ProcessRaisedException`` when one of them failed outside a check.
    """
    import multiprocessing

    import torch.multiprocessing as mp

    start_method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if start_method == "forkserver":
        multiprocessing.set_forkserver_preload(PRELOAD)
    os.makedirs(out, exist_ok=True)
    deadline = time.monotonic() + timeout
    for attempt in range(3):
        port = free_port()  # free a moment ago: another process may take it first, then retry
        ctx = mp.start_processes(
            _worker, args=(nprocs, port, checks, out), nprocs=nprocs, join=False, start_method=start_method
        )
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{nprocs} ranks running {checks} did not finish in {timeout:.0f} s")
            break
        except mp.ProcessRaisedException as err:
            if attempt == 2 or "address already in use" not in str(err).lower():
                raise
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
                    p.join(5)
    results = []
    for r in range(nprocs):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            results.append(json.load(f))
    return results


def _worker(rank: int, world: int, port: int, checks: list[str], out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    results: dict[str, Any] = {}
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        for name in checks:
            start = time.perf_counter()
            try:
                results[name] = {
                    "cases": CHECKS[name](rank, world, out),
                    "seconds": time.perf_counter() - start,
                }
            except Exception:  # noqa: BLE001 - reported to the test, which fails naming the check
                results[name] = {"error": traceback.format_exc(), "seconds": time.perf_counter() - start}
                break  # the other ranks may now wait in a collective: stop, the test reports this error
    finally:
        if dist.is_initialized():
            if not any("error" in r for r in results.values()):
                # ranks leave together: tearing gloo down while a peer still holds the
                # connection can abort the process in gloo's destructor
                dist.barrier()
            dist.destroy_process_group()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)


# ----------------------------------------------------------------------------------------------------
# comparison helpers


def _full(x: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def deviation(got: Any, want: Any) -> list[float]:
    """``[max |got - want|, max |want|]`` over the tensors of two trees (``got`` may hold DTensors)."""
    import torch.utils._pytree as pytree

    g_leaves = pytree.tree_leaves(got, is_leaf=lambda x: x is None)
    w_leaves = pytree.tree_leaves(want, is_leaf=lambda x: x is None)
    assert len(g_leaves) == len(w_leaves), f"{len(g_leaves)} leaves vs {len(w_leaves)}"
    dev, scale = 0.0, 0.0
    for g, w in zip(g_leaves, w_leaves):
        if w is None:
            assert g is None
            continue
        if not isinstance(w, torch.Tensor):
            dev, scale = max(dev, abs(float(g) - float(w))), max(scale, abs(float(w)))
            continue
        g = _full(g).detach()
        w = _full(w).detach()
        assert tuple(g.shape) == tuple(w.shape), f"shape {tuple(g.shape)} vs {tuple(w.shape)}"
        if w.numel():
            finite = torch.isfinite(w)
            if not torch.equal(finite, torch.isfinite(g)):
                return [math.inf, 0.0]
            dev = max(dev, float((g - w)[finite].abs().max()) if finite.any() else 0.0)
            scale = max(scale, float(w[finite].abs().max()) if finite.any() else 0.0)
    return [dev, scale]


def case(cases: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    """``cases[name] = fn()``, or the error's traceback (every rank fails alike: the checks are SPMD)."""
    start = time.perf_counter()
    try:
        cases[name] = fn()
    except Exception:  # noqa: BLE001 - reported by the test, naming the case
        cases[name] = traceback.format_exc()
    if os.environ.get("FUNCREG_DIST_TIMES"):
        print(f"{name}: {time.perf_counter() - start:.2f} s", file=sys.stderr)


def _mesh(world: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


# ----------------------------------------------------------------------------------------------------
# 2. sharded parameters: every transform, alias, penalty form and diagnostic on DTensor leaves


def _transforms() -> dict[str, Callable[[Any], Any]]:
    """Every alias, and chains covering each penalty form; each a factory of the reference tree
    (anchors need a reference tree of the same kind as the parameters)."""
    import funcreg as fr

    rest = {"w": False, "v": True, "b": True}

    def muon(_: Any) -> Any:
        return fr.muon(0.05, fallback=fr.adamw(0.05))

    return {
        "sgd": lambda _: fr.sgd(0.1),
        "sgd_momentum_decay": lambda _: fr.chain(fr.add_decayed_weights(0.1), fr.sgd(0.1, momentum=0.9)),
        "sgd_nesterov": lambda _: fr.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        "adam": lambda _: fr.adam(0.05),
        "adamw": lambda _: fr.adamw(0.05, weight_decay=0.1),
        "adamw_amsgrad_masked": lambda _: fr.adamw(0.05, weight_decay=0.1, amsgrad=True, mask=rest),
        "clip_adam": lambda _: fr.chain(fr.clip_by_global_norm(0.5), fr.adam(0.05)),
        "adamax": lambda _: fr.adamax(0.05),
        "nadam": lambda _: fr.nadam(0.05),
        "radam": lambda _: fr.radam(0.05),
        "rmsprop": lambda _: fr.rmsprop(0.01, momentum=0.9),
        "adagrad": lambda _: fr.adagrad(0.05),
        "adadelta": lambda _: fr.adadelta(1.0),
        "rprop": lambda _: fr.rprop(0.01),
        "adafactor": lambda _: fr.adafactor(0.05),
        "lion": lambda _: fr.lion(0.01, weight_decay=0.1),
        "muon": muon,
        "proximal_adam_l1": lambda _: fr.proximal_adam(0.05, l1=0.05),
        "apply_if_finite": lambda _: fr.apply_if_finite(fr.adam(0.05), 3),
        "loss_l2_coupled": lambda _: fr.chain(fr.add_penalty_grad(fr.l2(0.1)), fr.sgd(0.1, momentum=0.9)),
        "l1_proximal": lambda _: fr.chain(fr.sgd(0.1), fr.proximal(fr.l1(0.3), 0.1)),
        "l1_decoupled": lambda _: fr.chain(fr.adam(0.05), fr.decoupled(fr.l1(0.3), 0.05)),
        "elastic_net_proximal": lambda _: fr.chain(fr.sgd(0.1), fr.proximal(fr.elastic_net(0.2, 0.1), 0.1)),
        "lp3_coupled": lambda _: fr.chain(fr.add_penalty_grad(fr.lp(0.1, 3)), fr.sgd(0.1)),
        "group_lasso0_proximal": lambda _: fr.chain(
            fr.sgd(0.1), fr.proximal(fr.group_lasso(0.5, axis=0), 0.1)
        ),
        "group_lasso1_proximal": lambda _: fr.chain(
            fr.sgd(0.1), fr.proximal(fr.group_lasso(0.5, axis=1), 0.1)
        ),
        "group_lasso0_coupled": lambda _: fr.chain(
            fr.add_penalty_grad(fr.group_lasso(0.5, axis=0)), fr.adam(0.05)
        ),
        "group_lasso1_decoupled": lambda _: fr.chain(
            fr.adam(0.05), fr.decoupled(fr.group_lasso(0.5, axis=1), 0.05)
        ),
        "max_norm0_proximal": lambda _: fr.chain(fr.sgd(0.5), fr.proximal(fr.max_norm(1.0, axis=0), 0.5)),
        "max_norm1_proximal": lambda _: fr.chain(fr.sgd(0.5), fr.proximal(fr.max_norm(1.0, axis=1), 0.5)),
        "orthogonal_coupled": lambda _: fr.chain(fr.add_penalty_grad(fr.orthogonal(0.1)), fr.sgd(0.1)),
        "orthogonal_decoupled": lambda _: fr.chain(fr.adam(0.05), fr.decoupled(fr.orthogonal(0.1), 0.05)),
        "non_negative_proximal": lambda _: fr.chain(fr.sgd(0.1), fr.proximal(fr.non_negative(), 0.1)),
        "anchor_proximal": lambda ref: fr.chain(fr.sgd(0.1), fr.proximal(fr.anchor(0.5, ref), 0.1)),
        "anchor_coupled": lambda ref: fr.chain(
            fr.add_penalty_grad(fr.anchor(0.5, ref, precision={k: v * v for k, v in ref.items()})),
            fr.sgd(0.1),
        ),
        "nuclear_norm_proximal": lambda _: fr.chain(fr.sgd(0.1), fr.proximal(fr.nuclear_norm(0.3), 0.1)),
        "spectral_norm_coupled": lambda _: fr.chain(fr.add_penalty_grad(fr.spectral_norm(0.3)), fr.sgd(0.1)),
        "max_spectral_norm_proximal": lambda _: fr.chain(
            fr.sgd(0.5), fr.proximal(fr.max_spectral_norm(2.0), 0.5)
        ),
        "fista_l1": lambda _: fr.fista(0.1, fr.l1(0.2)),
    }


def _problem(world: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A matrix sharded along its rows, one along its columns, a vector; two gradient trees."""
    g = torch.Generator().manual_seed(0)
    params = {
        "w": torch.randn(2 * world + 1, 5, generator=g, dtype=D),  # uneven shards (3 + 2 rows on 2 ranks)
        "v": torch.randn(4, 2 * world + 1, generator=g, dtype=D),
        "b": torch.randn(2 * world + 1, generator=g, dtype=D),
    }
    params["w"][1] *= 0.01  # a small row and a small column: the group proxes zero them
    params["v"][:, 0] *= 0.01
    grads = [{k: torch.randn(v.shape, generator=g, dtype=D) for k, v in params.items()} for _ in range(2)]
    return params, grads


def _shard(tree: dict[str, torch.Tensor], mesh: Any) -> dict[str, Any]:
    """``w`` row-sharded, ``v`` column-sharded (group norms along and across the shards), ``b``
    replicated (reductions over leaves of mixed placements; FSDP's checks shard vectors)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    placements = {"w": Shard(0), "v": Shard(1), "b": Replicate()}
    return {k: distribute_tensor(v, mesh, [placements[k]]) for k, v in tree.items()}


def _run_steps(tx: Any, params: Any, grads: list[Any]) -> tuple[Any, Any]:
    import funcreg as fr

    state = tx.init(params)
    for g in grads:
        u, state = tx.update(g, state, params)
        params = fr.apply_updates(params, u)
    return params, state


def check_dtensor_transforms(rank: int, world: int, out: str) -> dict[str, list[float]]:
    """Each transform run 2 steps on sharded parameters vs on the unsharded ones; placements are kept."""
    mesh = _mesh(world)
    params, grads = _problem(world)
    sp = _shard(params, mesh)
    sg = [_shard(g, mesh) for g in grads]
    cases: dict[str, Any] = {}
    for name, make in _transforms().items():

        def compare(make: Any = make, name: str = name) -> list[float]:
            want, _ = _run_steps(make(params), params, grads)
            got, _ = _run_steps(make(sp), sp, sg)
            assert all(tuple(got[k].placements) == tuple(sp[k].placements) for k in got), (
                f"{name}: placements changed"
            )
            return deviation(got, want)

        case(cases, name, compare)
    return cases


def check_dtensor_penalties(rank: int, world: int, out: str) -> dict[str, list[float]]:
    """Each penalty's value (global, a plain tensor) and the loss-term form's gradient (autograd
    through the value) on sharded parameters vs unsharded, and the diagnostics' figures. (Gradients
    and proxes are checked through the coupled, decoupled and proximal forms in the transforms.)"""
    import funcreg as fr

    params, _ = _problem(world)
    params["w"][0, :3] = 0.0  # exact zeros for the sparsity report
    sp = _shard(params, _mesh(world))
    penalties = {
        "l2": lambda ref: fr.l2(0.1),
        "l1_masked": lambda ref: fr.l1(0.1, mask={"w": True, "v": False, "b": True}),
        "elastic_net": lambda ref: fr.elastic_net(0.1, 0.2),
        "lp3": lambda ref: fr.lp(0.1, 3),
        "group_lasso0": lambda ref: fr.group_lasso(0.5, axis=0),
        "group_lasso1": lambda ref: fr.group_lasso(0.5, axis=1),
        "max_norm0": lambda ref: fr.max_norm(1.0, axis=0),  # infeasible: inf
        "max_norm1": lambda ref: fr.max_norm(100.0, axis=1),  # feasible: 0
        "non_negative": lambda ref: fr.non_negative(),
        "orthogonal": lambda ref: fr.orthogonal(0.1),
        "anchor": lambda ref: fr.anchor(0.5, {k: 0.5 * v for k, v in ref.items()}),
        "nuclear_norm": lambda ref: fr.nuclear_norm(0.3),
        "spectral_norm": lambda ref: fr.spectral_norm(0.3),
        "sum": lambda ref: (
            fr.l2(0.1, mask={"w": False, "v": True, "b": True})
            + fr.group_lasso(0.2, mask={"w": True, "v": False, "b": False})
        ),
    }
    cases: dict[str, Any] = {}
    for name, make in penalties.items():
        P_ref, P = make(params), make(sp)

        def value(P: Any = P, P_ref: Any = P_ref, name: str = name) -> list[float]:
            got = P(sp)
            assert not hasattr(got, "placements"), (
                f"{name}: the value is a DTensor, expected a plain (global) tensor"
            )
            return deviation(got, P_ref(params))

        def autograd(P: Any = P, P_ref: Any = P_ref) -> list[float]:
            leaves = {k: v.detach().requires_grad_() for k, v in sp.items()}
            ref_leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
            got = torch.autograd.grad(P(leaves), list(leaves.values()), allow_unused=True)
            want = torch.autograd.grad(P_ref(ref_leaves), list(ref_leaves.values()), allow_unused=True)
            zero = [torch.zeros_like(v) for v in params.values()]
            return deviation(
                [z if g is None else g for z, g in zip(zero, got)],
                [z if g is None else g for z, g in zip(zero, want)],
            )

        case(cases, f"{name}/value", value)
        if P.has_grad:
            case(cases, f"{name}/loss_form_gradient", autograd)
    for threshold in (0.0, 0.05):
        got, want = fr.sparsity(sp, threshold), fr.sparsity(params, threshold)
        cases[f"sparsity({threshold})"] = deviation(
            [got[k] for k in want] + [got.overall], [want[k] for k in want] + [want.overall]
        )
    got, want = fr.sparsity(sp, relative_threshold=0.05), fr.sparsity(params, relative_threshold=0.05)
    cases["sparsity(relative_threshold=0.05)"] = deviation([got[k] for k in want], [want[k] for k in want])
    for order in (0, 1, 2, math.inf):
        got, want = fr.norms(sp, order), fr.norms(params, order)
        cases[f"norms(ord={order})"] = deviation(
            [got[k] for k in want] + [got.total], [want[k] for k in want] + [want.total]
        )
    return cases


def check_dtensor_errors(rank: int, world: int, out: str) -> dict[str, list[float]]:
    """What cannot work raises, naming the argument and what was expected."""
    import funcreg as fr

    mesh = _mesh(world)
    params, grads = _problem(world)
    sp = _shard(params, mesh)
    found = {}

    def message(fn: Callable[[], Any]) -> str:
        try:
            fn()
        except (TypeError, ValueError) as err:
            return str(err)
        raise AssertionError("no error")

    text = message(lambda: fr.anchor(0.5, params)(sp))  # a plain reference for sharded parameters
    assert "anchor reference for 'w'" in text and "a plain tensor" in text and "DTensor" in text, text
    found["anchor_plain_reference"] = text
    tx = fr.sgd(0.1)
    text = message(lambda: tx.update(grads[0], tx.init(sp), sp))  # plain gradients of sharded parameters
    assert "'w'" in text and "a plain tensor" in text and "DTensor" in text, text
    found["plain_update_of_dtensor"] = text
    tx = fr.chain(fr.distributed.mean_gradients(), fr.sgd(0.1))
    text = message(lambda: tx.update(_shard(grads[0], mesh), tx.init(sp), sp))
    assert "mean_gradients" in text and "'w'" in text and "DTensor" in text, text
    found["mean_gradients_of_dtensor"] = text
    try:
        fr.spectral_norm(0.3).prox(sp, 0.3)
    except (
        NotImplementedError
    ) as err:  # a global SVD's water level: no sharded rule in torch.distributed.tensor
        text = str(err)
    else:
        raise AssertionError("spectral_norm's prox on a sharded matrix did not raise")
    assert "spectral_norm" in text and "'w'" in text and "DTensor" in text and "mask=" in text, text
    found["spectral_prox_sharded"] = text
    try:
        fr.orthogonal_cosine(0.1)(sp)
    except NotImplementedError as err:  # its torch.eye beside a DTensor (funcreg/_src/penalties/spectral.py)
        text = str(err)
    else:
        raise AssertionError("orthogonal_cosine on a sharded matrix did not raise")
    assert "orthogonal_cosine" in text and "'w'" in text and "DTensor" in text, text
    found["orthogonal_cosine_sharded"] = text
    with open(os.path.join(out, f"errors{rank}.json"), "w") as f:
        json.dump(found, f)
    return {}


# ----------------------------------------------------------------------------------------------------
# 1. data parallelism


def _regression(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=D)
    y = torch.sin(x @ torch.randn(4, 2, generator=g, dtype=D))
    return x, y


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
    ).to(D)


def check_data_parallel(rank: int, world: int, out: str) -> dict[str, list[float]]:
    """make_step with mean_gradients first, each rank its shard of the batch, vs one process on the full batch."""
    from torch.func import functional_call

    import funcreg as fr

    x, y = _regression(4 * world)
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    model = _mlp()
    params0 = fr.params_of(model)

    def loss_fn(p: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    mask = fr.decay_mask(model)
    setups = {
        "adamw": (lambda: fr.adamw(0.05, weight_decay=0.1, mask=mask), None, "loss"),
        "sgd_momentum_l2_loss": (lambda: fr.sgd(0.1, momentum=0.9), fr.l2(0.01), "loss"),
        "adam_group_lasso_coupled": (lambda: fr.adam(0.05), fr.group_lasso(0.05, mask=mask), "coupled"),
        "adam_l2_decoupled": (lambda: fr.adam(0.05), fr.l2(0.1, mask=mask), "decoupled"),
        "clip_sgd_l1_proximal": (
            lambda: fr.chain(fr.clip_by_global_norm(0.5), fr.sgd(0.1)),
            fr.l1(0.01, mask=mask),
            "proximal",
        ),
    }
    cases = {}
    for name, (make_tx, penalty, form) in setups.items():
        lr = 0.05 if form in ("decoupled", "proximal") else None
        for donate in (False, True):
            ref = fr.make_step(
                loss_fn, make_tx(), penalty=penalty, form=form, learning_rate=lr, donate=donate
            )
            dp = fr.make_step(
                loss_fn,
                fr.chain(fr.distributed.mean_gradients(), make_tx()),
                penalty=penalty,
                form=form,
                learning_rate=lr,
                donate=donate,
            )
            s_ref, s_dp = ref.init(params0), dp.init(fr.distributed.broadcast(params0))
            for _ in range(4):
                s_ref, _ = ref(s_ref, x, y)
                s_dp, _ = dp(s_dp, xs, ys)
            cases[f"{name}{'/donated' if donate else ''}"] = deviation(s_dp.params, s_ref.params)

    # sum_gradients: sum-of-losses per shard == the full batch's sum
    def sum_loss(p: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((functional_call(model, p, (x,)) - y) ** 2).sum()

    ref = fr.make_step(sum_loss, fr.sgd(0.01))
    dp = fr.make_step(sum_loss, fr.chain(fr.distributed.sum_gradients(), fr.sgd(0.01)))
    s_ref, s_dp = ref.init(params0), dp.init(params0)
    for _ in range(3):
        s_ref, _ = ref(s_ref, x, y)
        s_dp, _ = dp(s_dp, xs, ys)
    cases["sum_gradients"] = deviation(s_dp.params, s_ref.params)
    # a process group of its own, and mixed dtypes (one collective per dtype)
    group = torch.distributed.new_group(list(range(world)))
    tx = fr.distributed.mean_gradients(group)
    g32 = {
        "a": torch.full((3,), float(rank), dtype=torch.float32),
        "b": torch.full((2,), 2.0 * rank, dtype=D),
        "c": None,
    }
    got, _ = tx.update(g32, tx.init(None))
    mean = (world - 1) / 2
    cases["mixed_dtypes_group"] = deviation(
        got,
        {
            "a": torch.full((3,), mean, dtype=torch.float32),
            "b": torch.full((2,), 2 * mean, dtype=D),
            "c": None,
        },
    )
    assert got["a"].dtype == torch.float32 and g32["a"][0] == rank  # the input is not written into
    torch.distributed.destroy_process_group(group)
    return cases


def check_compiled_mean_gradients(rank: int, world: int, out: str) -> dict[str, list[float]]:
    """mean_gradients traced by torch.compile with fullgraph=True: the collective is in the graph."""
    import funcreg as fr

    tx = fr.distributed.mean_gradients()
    grads = {"w": torch.arange(3, dtype=D) * (rank + 1), "frozen": None}
    want = {"w": torch.arange(3, dtype=D) * (world + 1) / 2, "frozen": None}  # the mean of (rank + 1)
    eager, _ = tx.update(grads, tx.init(None))  # (also fills funcreg's flat-dict cache, which a trace cannot)
    compiled = torch.compile(tx.update, backend="eager", fullgraph=True)
    got, _ = compiled(grads, tx.init(None))
    return {"eager": deviation(eager, want), "compiled": deviation(got, want)}


def check_ddp_torch_optimizer(rank: int, world: int, out: str) -> dict[str, list[float]]:
    """fr.TorchOptimizer on a DistributedDataParallel model (unchanged) vs one process on the full batch."""
    from torch.nn.parallel import DistributedDataParallel

    import funcreg as fr

    x, y = _regression(4 * world)
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]

    def run(model: torch.nn.Module, params: Any, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        inner = model.module if isinstance(model, DistributedDataParallel) else model
        opt = fr.TorchOptimizer(
            inner.named_parameters(),
            lambda lr, weight_decay: fr.adamw(lr, weight_decay=weight_decay),
            lr=0.05,
            weight_decay=0.1,
        )
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for _ in range(4):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            sched.step()
        return [p.detach().clone() for p in inner.parameters()]

    ref = run(_mlp(), None, x, y)
    got = run(DistributedDataParallel(_mlp()), None, xs, ys)
    return {"ddp_adamw_steplr": deviation(got, ref)}


# ----------------------------------------------------------------------------------------------------
# 2. FSDP2 and the functional tensor-parallel path


def _fsdp_tx(model: torch.nn.Module) -> Any:
    import funcreg as fr

    return fr.chain(
        fr.clip_by_global_norm(0.5),
        fr.adamw(0.05, weight_decay=0.1, mask=fr.decay_mask(model)),
        fr.proximal(fr.group_lasso(0.05, axis=1, mask=fr.by_name("0.weight")), 0.05),
    )


def _fully_shard(model: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0], mesh=mesh)
    fully_shard(model[3], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train(model: torch.nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def check_fsdp_torch_optimizer(rank: int, world: int, out: str) -> dict[str, list[float]]:
    """fully_shard + fr.TorchOptimizer(clip + adamw with decay_mask + proximal group lasso), 5 steps,
    vs the unsharded model on the full batch; the optimizer state holds DTensors, penalty values are global."""
    from torch.distributed.tensor import DTensor

    import funcreg as fr

    x, y = _regression(4 * world)
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    ref = _mlp()
    opt_ref = fr.TorchOptimizer(ref.named_parameters(), _fsdp_tx(ref))
    _train(ref, opt_ref, x, y, 5)
    model = _fully_shard(_mlp(), _mesh(world))
    opt = fr.TorchOptimizer(model.named_parameters(), _fsdp_tx(model))
    _train(model, opt, xs, ys, 5)
    state = opt.state[model[0].weight]
    assert isinstance(state["exp_avg"], DTensor) and not isinstance(state["value"], DTensor), state.keys()
    return {
        "params": deviation([p for p in model.parameters()], [p for p in ref.parameters()]),
        "exp_avg_sq": deviation(
            [opt.state[p]["exp_avg_sq"] for p in model.parameters()],
            [opt_ref.state[p]["exp_avg_sq"] for p in ref.parameters()],
        ),
        "penalty_value": deviation(state["value"], opt_ref.state[ref[0].weight]["value"]),
        "sparsity": deviation(fr.sparsity(model).overall, fr.sparsity(ref).overall),
        "norms": deviation(fr.norms(model).total, fr.norms(ref).total),
    }


def check_tensor_parallel_functional(rank: int, world: int, out: str) -> dict[str, list[float]]:
    """functional_call on a hook-free module with DTensor parameters (column- then row-wise sharded
    Linear layers, replicated LayerNorm), make_step with each penalty form, vs unsharded."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.func import functional_call

    import funcreg as fr

    mesh = _mesh(world)
    x, y = _regression(8)
    model = _mlp()
    params0 = fr.params_of(model)
    placements = {
        "0.weight": Shard(0),
        "0.bias": Shard(0),
        "1.weight": Replicate(),
        "1.bias": Replicate(),
        "3.weight": Shard(1),
        "3.bias": Replicate(),
    }
    sharded0 = {k: distribute_tensor(v.detach(), mesh, [placements[k]]) for k, v in params0.items()}
    xd, yd = (distribute_tensor(t, mesh, [Replicate()]) for t in (x, y))

    def loss_fn(p: Any, x: Any, y: Any) -> Any:
        # the mean written out: in torch 2.13, F.mse_loss's sharded backward is off by the world size
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    setups = {
        "clip_sgd_momentum/group_lasso_loss": (
            fr.chain(fr.clip_by_global_norm(0.5), fr.sgd(0.1, momentum=0.9)),
            fr.group_lasso(0.05, axis=1),
            "loss",
        ),
        "adam/orthogonal_coupled": (fr.adam(0.05), fr.orthogonal(0.01), "coupled"),
        "adamw/l1_decoupled": (fr.adamw(0.05, weight_decay=0.1), fr.l1(0.05), "decoupled"),
        "sgd/group_lasso_proximal": (fr.sgd(0.1), fr.group_lasso(0.1, axis=0), "proximal"),
    }
    cases = {}
    for name, (tx, penalty, form) in setups.items():
        lr = 0.05 if form in ("decoupled", "proximal") else None
        step = fr.make_step(loss_fn, tx, penalty=penalty, form=form, learning_rate=lr)
        s_ref, s_tp = step.init(params0), step.init(sharded0)
        for _ in range(2):
            s_ref, m_ref = step(s_ref, x, y)
            s_tp, m_tp = step(s_tp, xd, yd)
        assert all(tuple(s_tp.params[k].placements) == (placements[k],) for k in placements), name
        cases[name] = deviation(s_tp.params, s_ref.params)
        cases[f"{name}/data_loss"] = deviation(_full(m_tp["data_loss"]), m_ref["data_loss"])
    return cases


def check_rank_dependent_values(rank: int, world: int, out: str) -> dict[str, list[float]]:
    """Where the ranks hold different values, what each one ends with: broadcast's default source is
    rank 0; replicate_like communicates nothing (each rank keeps its own tensor); an update of another
    layout than its parameter is redistributed to the parameter's placements, and a DTensor beside a
    plain tensor (either way round) raises; a sweep with fewer members than ranks gathers them."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    import funcreg as fr
    from funcreg._src.core.dtensor import replicate_like

    mesh = _mesh(world)
    cases: dict[str, Any] = {}

    def broadcast_default() -> list[float]:
        mine = {"w": torch.full((3,), rank + 1.0, dtype=D), "frozen": None}
        return deviation(fr.distributed.broadcast(mine), {"w": torch.ones(3, dtype=D), "frozen": None})

    def replicate_local() -> list[float]:
        t = torch.full((2, 2), float(rank), dtype=D)
        ref = distribute_tensor(torch.zeros(2 * world, 2, dtype=D), mesh, [Shard(0)])
        got = replicate_like(t, ref)
        assert isinstance(got, DTensor) and tuple(got.placements) == (Replicate(),), got
        own = torch.full((2, 2), float(rank), dtype=D)
        return deviation([got.to_local(), t], [own, own])

    g = torch.Generator().manual_seed(3)
    w, grad = (torch.randn(2 * world + 1, 3, generator=g, dtype=D) for _ in range(2))
    sw = distribute_tensor(w, mesh, [Shard(0)])

    def redistributed() -> list[float]:
        tx = fr.sgd(0.5)
        u, _ = tx.update({"w": distribute_tensor(grad, mesh, [Replicate()])}, tx.init({"w": sw}), {"w": sw})
        assert tuple(u["w"].placements) == (Shard(0),), u["w"].placements
        return deviation(u, {"w": -0.5 * grad})

    def mixed_kinds() -> list[float]:
        tx = fr.sgd(0.5)
        for u, p in ((distribute_tensor(grad, mesh, [Shard(0)]), w), (grad, sw)):
            try:
                tx.update({"w": u}, tx.init({"w": p}), {"w": p})
            except fr.LeafTypeError as err:
                text = str(err)
                assert "'w'" in text and "a plain tensor" in text and "a DTensor" in text, text
            else:
                raise AssertionError(f"no error for a {type(u).__name__} update of a {type(p).__name__}")
        return [0.0, 0.0]

    def fewer_members_than_ranks() -> list[float]:
        n = world - 1  # the last rank trains no member
        mine = fr.distributed.sweep_members(n)
        everyone = {"w": torch.arange(3.0 * n, dtype=D).reshape(n, 3)}
        local = {"w": everyone["w"][mine]} if mine else None  # a rank without members passes None
        got = fr.distributed.gather_members(local, n)
        if rank != 0:
            assert got is None
            return [0.0, 0.0]
        return deviation(got, everyone)

    case(cases, "broadcast_default_source", broadcast_default)
    case(cases, "replicate_like_keeps_local_values", replicate_local)
    case(cases, "update_redistributed_to_parameter_placements", redistributed)
    case(cases, "dtensor_beside_plain_raises", mixed_kinds)
    case(cases, "gather_with_a_rank_without_members", fewer_members_than_ranks)
    return cases


# ----------------------------------------------------------------------------------------------------
# 3. distributed checkpoints


def _checkpoint_dir(out: str) -> str:
    return os.path.join(out, "..", "dcp")


def _dcp_setup(world: int, mesh: Any = None) -> tuple[torch.nn.Module, Any]:
    import funcreg as fr

    model = _mlp() if mesh is None else _fully_shard(_mlp(), mesh)
    return model, fr.TorchOptimizer(model.named_parameters(), _fsdp_tx(model))


def check_checkpoint_save(rank: int, world: int, out: str) -> dict[str, list[float]]:
    """3 steps on 2 FSDP ranks, dcp.save of model and optimizer (get_*_state_dict), 3 more steps: the
    uninterrupted run. A fresh sharded model and optimizer loaded from the checkpoint then resume."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    x, y = _regression(8)
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    mesh = _mesh(world)
    model, opt = _dcp_setup(world, mesh)
    _train(model, opt, xs, ys, 3)
    path = _checkpoint_dir(out)
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=path,
    )
    _train(model, opt, xs, ys, 3)
    final = [p.full_tensor().detach() for p in model.parameters()]
    if rank == 0:
        torch.save(final, os.path.join(path, "..", "uninterrupted.pt"))
    resumed, opt2 = _dcp_setup(world, mesh)
    sd = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, opt2)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(resumed, sd["model"])
    set_optimizer_state_dict(resumed, opt2, sd["optim"])
    _train(resumed, opt2, xs, ys, 3)
    return {"resume_2_ranks": deviation(list(resumed.parameters()), final)}


def _dcp_load_and_resume(rank: int, world: int, out: str, mesh: Any) -> list[float]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    x, y = _regression(8)
    if mesh is not None:
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
    model, opt = _dcp_setup(world, mesh)
    path = _checkpoint_dir(out)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    _train(model, opt, x, y, 3)
    final = torch.load(os.path.join(path, "..", "uninterrupted.pt"), weights_only=True)
    return deviation(list(model.parameters()), final)


def check_checkpoint_reshard(rank: int, world: int, out: str) -> dict[str, list[float]]:
    """The 2-rank checkpoint loaded on ``world`` FSDP ranks and, after the group is gone, into one
    unsharded process (dcp.load without a process group); both resume as the uninterrupted run."""
    import torch.distributed as dist

    cases = {f"resume_{world}_ranks": _dcp_load_and_resume(rank, world, out, _mesh(world))}
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        cases["resume_1_process"] = _dcp_load_and_resume(0, 1, out, None)
    return cases


# ----------------------------------------------------------------------------------------------------
# 4. sharded sweeps


def _sweep(members: list[int]) -> tuple[dict[str, torch.Tensor], Any, dict[str, torch.Tensor]]:
    """Seeds {0, 1} x weight decays {0, 0.1, 1}: 6 members; trains ``members`` as one ensemble."""
    from torch.func import functional_call

    import funcreg as fr

    seeds, wds = [0, 1], [0.0, 0.1, 1.0]
    per_seed, _, model = fr.init_members(
        lambda: torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(D),
        seeds,
    )
    seed_members = fr.unstack(per_seed)
    params0 = fr.stack([seed_members[s] for _ in wds for s in range(len(seeds))])
    wd = torch.tensor([w for w in wds for _ in seeds], dtype=D)
    x, y = _regression(32)
    orders = torch.stack(
        [torch.randperm(32, generator=torch.Generator().manual_seed(100 + s)) for _ in wds for s in seeds]
    )

    def loss_fn(p: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    step = fr.make_step(
        loss_fn,
        lambda h: fr.adamw(0.05, weight_decay=h["wd"]),
        penalty=lambda h: fr.l1(0.01),
        form="proximal",
        learning_rate=0.05,
    )
    ens = fr.ensemble_step(step, batch="per_member")
    state = ens.init(
        fr.distributed.take_members(params0, members),
        hparams={"wd": fr.distributed.take_members(wd, members)},
    )
    history = fr.History()
    order = fr.distributed.take_members(orders, members)
    for t in range(4):
        idx = order[:, 8 * t : 8 * (t + 1)]
        state, metrics = ens(state, x[idx], y[idx])
        history.append(metrics)
    final = {
        "data_loss": metrics["data_loss"],
        "penalty": metrics["penalty"],
        "sparsity": torch.tensor([fr.sparsity(m).overall for m in fr.unstack(state.params)], dtype=D),
    }
    return state.params, history, final


def check_sharded_sweep(rank: int, world: int, out: str) -> dict[str, list[float]]:
    """Each rank vmaps its members (fr.distributed.sweep_members); the gathered parameters, final
    metrics and History on rank 0 vs the single-process sweep of all members."""
    import funcreg as fr

    n = 6
    mine = fr.distributed.sweep_members(n)
    assert mine == list(range(rank, n, world))
    params, history, final = _sweep(mine)
    all_params = fr.distributed.gather_members(params, n)
    all_final = fr.distributed.gather_members(final, n)
    all_history = fr.distributed.gather_members(history, n)
    per_member = fr.distributed.gather_members([f"member {m}" for m in mine], n)
    if rank != 0:
        assert all_params is None and all_history is None
        return {}
    want_params, want_history, want_final = _sweep(list(range(n)))
    assert per_member == [f"member {m}" for m in range(n)]
    assert all_history.keys() == want_history.keys() and len(all_history) == len(want_history)
    cases = {
        "params": deviation(all_params, want_params),
        "final_metrics": deviation(all_final, want_final),
        "history": deviation(
            {k: all_history[k] for k in want_history.keys()},
            {k: want_history[k] for k in want_history.keys()},
        ),
    }
    cases["bitwise_equal"] = [
        0.0 if all(torch.equal(all_params[k], want_params[k]) for k in want_params) else 1.0,
        1.0,
    ]
    return cases


CHECKS: dict[str, Callable[[int, int, str], dict[str, list[float]]]] = {
    "dtensor_transforms": check_dtensor_transforms,
    "dtensor_penalties": check_dtensor_penalties,
    "dtensor_errors": check_dtensor_errors,
    "data_parallel": check_data_parallel,
    "compiled_mean_gradients": check_compiled_mean_gradients,
    "ddp_torch_optimizer": check_ddp_torch_optimizer,
    "fsdp_torch_optimizer": check_fsdp_torch_optimizer,
    "tensor_parallel_functional": check_tensor_parallel_functional,
    "rank_dependent_values": check_rank_dependent_values,
    "checkpoint_save": check_checkpoint_save,
    "sharded_sweep": check_sharded_sweep,
    "checkpoint_reshard": check_checkpoint_reshard,  # last: it ends the process group
}


if __name__ == "__main__":
    import tempfile

    names = sys.argv[2:] or [n for n in CHECKS if n != "checkpoint_reshard"]
    nprocs = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        res = launch(nprocs, names, os.path.join(tmp, f"w{nprocs}"), timeout=600)
        print(f"wall {time.perf_counter() - start:.1f} s")
        for name in names:
            r0 = res[0].get(name, {})
            if "error" in r0 or any("error" in r.get(name, {}) for r in res):
                print(f"ERROR {name}:", next(r[name]["error"] for r in res if "error" in r.get(name, {})))
                continue
            print(f"{name}: {r0['seconds']:.1f} s")
            for name_, value in r0["cases"].items():
                if isinstance(value, str):
                    print(f"   {name_:45s} ERROR", value[-1500:])
                else:
                    print(f"   {name_:45s} {value[0]:.2e}  (scale {value[1]:.2e})")
