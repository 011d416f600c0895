"""Side by side with torchao's PAT: group lasso to the same structured sparsity, then pruning.

Three models built here from configs, trained on scikit-learn's digits (1797 8x8 images, 10 classes;
a stratified 75/25 split with ``random_state=0``, standardised with training statistics), each from
the same initial weights and on the same mini-batches with AdamW (``lr``, betas (0.9, 0.999),
``weight_decay=0.01`` on every parameter, as torch's default):

* ``mlp``: ``Linear(64, 128)-ReLU-Linear(128, 64)-ReLU-Linear(64, 10)``; groups: the rows of the two
  hidden layers (192 units);
* ``cnn``: ``Conv(1->16, 3)-ReLU-Conv(16->32, 3)-ReLU-MaxPool(2)-Flatten-Linear(128, 64)-ReLU-Linear(64, 10)``;
  groups: the filters of both convolutions and the rows of the hidden Linear (112 units);
* ``vit``: a tiny ViT: 2x2 patches embedded to 32 features by a convolution, a learned position
  embedding, 2 pre-norm transformer blocks (``nn.MultiheadAttention`` with 4 heads, an MLP 32-64-32),
  a final LayerNorm, mean pooling and a Linear head; groups: the attention heads (8).

Methods, per model:

* ``funcreg``: ``fr.TorchOptimizer(model.named_parameters(), fr.chain(fr.adamw(lr), fr.proximal(P, lr)))``
  with ``P = fr.group_lasso(c, axis=0, mask=...)`` on the grouped weights (rows, filters) or
  ``P = fr.head_lasso(c, model)`` (one group per head: its q/k/v rows and biases and its output
  projection columns, one norm): proximal gradient, ``w <- prox_{lr P}(w + u)``, every step;
* ``PAT``: torchao's ``torchao.prototype.pat.optim.PruneOptimizer(torch.optim.AdamW(groups, lr),
  reg_lambda=c)`` with ``group_type="Dim0Grouper"``, ``prox_type="ProxGroupLasso"`` on the same
  weights, or for heads ``AttentionHeadGrouperDim0`` (``num_heads = 3 * heads``: the q, k and v rows of
  a head are three groups) on ``in_proj_weight``/``in_proj_bias`` and ``AttentionHeadGrouperDim1`` on
  ``out_proj.weight``. PAT keeps latent weights that AdamW updates without the penalty and sets the
  model's weights to their prox with the threshold ``c * sqrt(|g|) * gamma``, gamma the sum of the
  learning rates so far (its "AProx"), so its coefficients live on another scale than funcreg's;
* ``AdamW``: no penalty, for reference (accuracy and step time).

Equal sparsity. For each model and method the coefficient is searched (geometric bracketing, then
bisection on the log scale, up to ``--search`` runs) until the number of removable units at the end
of training equals ``round(target * units)`` exactly (default target 50%), or else the closest run at
or above the target. A unit counts as removable under ``fr.prune``'s rule: a row / filter that is
exactly zero; a head whose output-projection columns are zero, or whose value rows and value bias are.
Then ``fr.prune`` prunes both models (PAT's zeros are exact too) and ``fr.prune_report`` counts the
parameters; the pruned models' test accuracy is checked to be the unpruned one's.

Step time. The tuned optimizers of the three methods are stepped side by side in one process on one
thread (``torch.set_num_threads(1)``), interleaved in a new random order each round
(``_machine.run``): a whole training step (``zero_grad``, forward, backward, ``step``) and the
optimizer's ``step()`` alone on fixed gradients. Medians and their ratios to PAT are printed.

    PYTHONPATH=/tmp/torchao_pkg python benchmarks/pat_side_by_side.py          # a few minutes
    PYTHONPATH=/tmp/torchao_pkg python benchmarks/pat_side_by_side.py --quick  # smoke run, seconds

torchao is imported if it can be (PAT is pure Python on top of torch; its compiled kernels are not
used). Without it the ``PAT`` rows are left out and the script says so. Needs scikit-learn.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import funcreg as fr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _machine  # noqa: E402

torch.set_num_threads(1)

try:
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)  # its optional CUDA kernels fail to load on CPU
    import torchao
    from torchao.prototype.pat.optim import PruneOptimizer

    PAT_ERROR: str | None = None
    TORCHAO_VERSION = torchao.__version__
except Exception as err:  # noqa: BLE001 - any import failure means: no PAT here
    PruneOptimizer = None
    PAT_ERROR = f"{type(err).__name__}: {err}"
    TORCHAO_VERSION = None

LR, BATCH, WEIGHT_DECAY = 2e-3, 64, 0.01

CONFIGS: dict[str, dict[str, Any]] = {
    "mlp": {"widths": (64, 128, 64, 10), "epochs": 30, "quick_epochs": 3},
    "cnn": {"channels": (16, 32), "hidden": 64, "epochs": 30, "quick_epochs": 2},
    "vit": {"patch": 2, "dim": 32, "heads": 4, "depth": 2, "mlp": 64, "epochs": 30, "quick_epochs": 2},
}
# First guesses of the coefficients (the search brackets from here): funcreg's per-step proximal
# threshold is lr * c * sqrt(|g|); PAT's is c * sqrt(|g|) * (sum of lr so far), a growing threshold.
START = {
    ("mlp", "funcreg"): 0.2,
    ("mlp", "PAT"): 0.02,
    ("cnn", "funcreg"): 0.2,
    ("cnn", "PAT"): 0.02,
    ("vit", "funcreg"): 0.2,
    ("vit", "PAT"): 0.02,
}


# ------------------------------------------------------------------------------------------------
# Data and models


def load_digits(images: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    digits = sk_digits()
    x = torch.tensor(digits.data, dtype=torch.float64)
    y = torch.tensor(digits.target, dtype=torch.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    if images:
        mean, std = x_tr.mean(), x_tr.std()
    else:
        mean, std = x_tr.mean(dim=0), x_tr.std(dim=0)
        std = torch.where(std > 1e-8, std, torch.ones_like(std))
    x_tr, x_te = ((x_tr - mean) / std).float(), ((x_te - mean) / std).float()
    if images:
        x_tr, x_te = x_tr.reshape(-1, 1, 8, 8), x_te.reshape(-1, 1, 8, 8)
    return x_tr, x_te, y_tr, y_te


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, patch: int, dim: int, heads: int, depth: int, mlp: int, **_: Any) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.pos = nn.Parameter(0.02 * torch.randn(1, (8 // patch) ** 2, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


def build(name: str) -> tuple[nn.Module, list[str]]:
    """The model of config ``name`` and the names of its grouped weights (none for the ViT: heads)."""
    cfg = CONFIGS[name]
    if name == "mlp":
        w = cfg["widths"]
        layers: list[nn.Module] = []
        for i in range(len(w) - 1):
            layers += [nn.Linear(w[i], w[i + 1]), nn.ReLU()]
        model = nn.Sequential(*layers[:-1])
        return model, [f"{2 * i}.weight" for i in range(len(w) - 2)]
    if name == "cnn":
        c1, c2 = cfg["channels"]
        model = nn.Sequential()
        for key, layer in [
            ("conv1", nn.Conv2d(1, c1, 3)),  # 8x8 -> 6x6, no padding: constant channels fold exactly
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(c1, c2, 3)),  # 6x6 -> 4x4
            ("relu2", nn.ReLU()),
            ("pool", nn.MaxPool2d(2)),  # -> 2x2
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(c2 * 4, cfg["hidden"])),
            ("relu3", nn.ReLU()),
            ("fc2", nn.Linear(cfg["hidden"], 10)),
        ]:
            model.add_module(key, layer)
        return model, ["conv1.weight", "conv2.weight", "fc1.weight"]
    return TinyViT(**cfg), []


def removable(
    model: nn.Module, grouped: list[str], params: dict[str, torch.Tensor]
) -> dict[str, tuple[int, int]]:
    """Per grouped layer, (removable units, units) under fr.prune's rule: the rows/filters of the
    grouped weights, or the heads of each attention layer."""
    out: dict[str, tuple[int, int]] = {}
    for k in grouped:
        out[k.removesuffix(".weight")] = (
            int((params[k].flatten(1).abs().amax(dim=1) == 0).sum()),
            params[k].shape[0],
        )
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.MultiheadAttention):
            continue
        h, e = mod.num_heads, mod.embed_dim
        d = e // h
        w_in, b_in, w_out = (
            params[f"{name}.{k}"] for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight")
        )
        zero = 0
        for j in range(h):
            out_zero = bool((w_out[:, j * d : (j + 1) * d] == 0).all())
            v = slice(2 * e + j * d, 2 * e + (j + 1) * d)
            v_zero = bool((w_in[v] == 0).all() and (b_in[v] == 0).all())
            zero += out_zero or v_zero
        out[name] = (zero, h)
    return out


# ------------------------------------------------------------------------------------------------
# Optimizers


def make_optimizer(method: str, model: nn.Module, grouped: list[str], coeff: float) -> torch.optim.Optimizer:
    if method == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    if method == "funcreg":
        if grouped:
            penalty = fr.group_lasso(coeff, axis=0, mask=fr.by_name(*grouped))
        else:
            penalty = fr.head_lasso(coeff, model)
        tx = fr.chain(fr.adamw(LR, weight_decay=WEIGHT_DECAY), fr.proximal(penalty, LR))
        return fr.TorchOptimizer(model.named_parameters(), tx)
    if method == "PAT":
        groups: list[dict[str, Any]] = []
        taken: set[str] = set()
        if grouped:
            groups.append(
                {
                    "params": [p for n, p in model.named_parameters() if n in grouped],
                    "group_type": "Dim0Grouper",
                    "prox_type": "ProxGroupLasso",
                }
            )
            taken.update(grouped)
        else:
            for name, mod in model.named_modules():
                if isinstance(mod, nn.MultiheadAttention):
                    h = mod.num_heads
                    groups.append(
                        {
                            "params": [mod.in_proj_weight, mod.in_proj_bias],
                            "group_type": "AttentionHeadGrouperDim0",
                            "prox_type": "ProxGroupLasso",
                            "num_heads": 3 * h,  # rows [q; k; v]: q, k and v of each head, 3h groups
                        }
                    )
                    groups.append(
                        {
                            "params": [mod.out_proj.weight],
                            "group_type": "AttentionHeadGrouperDim1",
                            "prox_type": "ProxGroupLasso",
                            "num_heads": h,
                        }
                    )
                    taken.update(f"{name}.{k}" for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight"))
        groups.append({"params": [p for n, p in model.named_parameters() if n not in taken]})
        base = torch.optim.AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY)
        return PruneOptimizer(base, reg_lambda=coeff)
    raise ValueError(method)


# ------------------------------------------------------------------------------------------------
# Training


@dataclass
class Data:
    x_train: torch.Tensor
    x_test: torch.Tensor
    y_train: torch.Tensor
    y_test: torch.Tensor


def batches(n: int, epochs: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + seed)
    out = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        out += [order[i * BATCH : (i + 1) * BATCH] for i in range(n // BATCH)]
    return out


def fresh(name: str, seed: int) -> tuple[nn.Module, list[str]]:
    torch.manual_seed(seed)
    return build(name)


@dataclass
class Run:
    method: str
    coeff: float
    zero: int
    units: int
    params: dict[str, torch.Tensor]
    seconds: float
    layers: dict[str, tuple[int, int]]


def train(name: str, method: str, coeff: float, data: Data, epochs: int, seed: int) -> Run:
    model, grouped = fresh(name, seed)
    opt = make_optimizer(method, model, grouped, coeff)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    t0 = time.perf_counter()
    for idx in batches(len(data.x_train), epochs, seed):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(data.x_train[idx]), data.y_train[idx]).backward()
        opt.step()
    seconds = time.perf_counter() - t0
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    layers = removable(model, grouped, params)
    zero, units = (sum(z for z, _ in layers.values()), sum(n for _, n in layers.values()))
    return Run(method, coeff, zero, units, params, seconds, layers)


def search(
    name: str, method: str, data: Data, epochs: int, seed: int, target: float, budget: int
) -> tuple[Run, list[Run]]:
    """The coefficient whose run ends with exactly round(target * units) removable units (or the
    closest run at or above it): geometric bracketing from START by factors of 4, then bisection of
    log(coeff)."""
    runs: list[Run] = []

    def run(c: float) -> Run:
        r = train(name, method, c, data, epochs, seed)
        runs.append(r)
        return r

    r = run(START[(name, method)])
    want = round(target * r.units)
    lo = hi = None  # lo: below the target; hi: at or above it
    c = r.coeff
    while len(runs) < budget and r.zero != want:
        if r.zero < want:
            lo = r
        else:
            hi = r
        if lo is not None and hi is not None:
            c = math.sqrt(lo.coeff * hi.coeff)
        else:
            c = c * 4 if hi is None else c / 4
        r = run(c)
    exact = [q for q in runs if q.zero == want]
    if exact:
        return min(exact, key=lambda q: q.coeff), runs
    above = [q for q in runs if q.zero >= want]
    if above:
        return min(above, key=lambda q: q.zero), runs
    return max(runs, key=lambda q: q.zero), runs


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(dim=1)
    return (pred == y).float().mean().item(), pred


# ------------------------------------------------------------------------------------------------
# Timing


class TrainStep:
    """One whole training step of a method, on the next of a fixed list of batches."""

    def __init__(self, name: str, method: str, coeff: float, data: Data, seed: int) -> None:
        self.model, grouped = fresh(name, seed)
        self.opt = make_optimizer(method, self.model, grouped, coeff)
        self.x, self.y = data.x_train, data.y_train
        self.idx = batches(len(self.x), 1, seed)
        self.i = 0
        self.loss = nn.CrossEntropyLoss()

    def step(self) -> None:
        idx = self.idx[self.i % len(self.idx)]
        self.i += 1
        self.opt.zero_grad(set_to_none=True)
        self.loss(self.model(self.x[idx]), self.y[idx]).backward()
        self.opt.step()


class OptStep(TrainStep):
    """The optimizer's step() alone, on the gradients of one batch (kept between steps)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        super().step()

    def step(self) -> None:
        self.opt.step()


def time_methods(
    name: str, coeffs: dict[str, float], data: Data, seed: int, rounds: int, warmup: int
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {m: {} for m in coeffs}
    for kind, cls in (("train", TrainStep), ("opt", OptStep)):
        variants = {m: cls(name, m, c, data, seed) for m, c in coeffs.items()}
        times = _machine.run(variants, rounds=rounds, warmup=warmup)
        for m, ts in times.items():
            out[m][kind] = statistics.median(ts) * 1e3
            out[m][kind + "_p10"] = sorted(ts)[len(ts) // 10] * 1e3
    return out


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: few epochs, small search, few rounds"
    )
    parser.add_argument("--models", default="mlp,cnn,vit")
    parser.add_argument("--target", type=float, default=0.5, help="fraction of removable units (default 0.5)")
    parser.add_argument("--epochs", type=int, default=None, help="override every model's epochs")
    parser.add_argument("--search", type=int, default=None, help="training runs per coefficient search")
    parser.add_argument(
        "--rounds", type=int, default=None, help="timing rounds (default 300, 10 with --quick)"
    )
    parser.add_argument("--seed", type=int, default=0, help="first seed (initial weights and batch order)")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds (a search per seed and method)")
    args = parser.parse_args(argv)
    budget = args.search or (3 if args.quick else 12)
    rounds = args.rounds or (10 if args.quick else 300)
    warmup = 3 if args.quick else 30

    methods = ["funcreg", "PAT", "AdamW"] if PruneOptimizer is not None else ["funcreg", "AdamW"]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(
        f"torch {torch.__version__}, funcreg {getattr(fr, '__version__', '?')}, "
        f"torchao {TORCHAO_VERSION or 'not importable'}; {_machine.cpu_model()}; "
        f"{torch.get_num_threads()} thread; load average {load}"
    )
    if PAT_ERROR is not None:
        print(f"torchao's PAT cannot be imported ({PAT_ERROR}): its rows are left out")
    print(
        f"AdamW lr={LR}, weight_decay={WEIGHT_DECAY}, batch {BATCH}; target: {args.target:.0%} of units removable"
    )

    seeds = list(range(args.seed, args.seed + args.seeds))
    rows, layer_rows = [], []
    for name in args.models.split(","):
        cfg = CONFIGS[name]
        epochs = args.epochs or (cfg["quick_epochs"] if args.quick else cfg["epochs"])
        data = Data(*load_digits(images=name != "mlp"))
        print(
            f"\n== {name}: {epochs} epochs ({len(batches(len(data.x_train), epochs, 0))} steps), seeds {seeds}"
        )
        results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for seed in seeds:
            for method in methods:
                if method == "AdamW":
                    r = train(name, method, 0.0, data, epochs, seed)
                else:
                    r, runs = search(name, method, data, epochs, seed, args.target, budget)
                    trail = ", ".join(f"{q.coeff:.3g}:{q.zero}" for q in runs)
                    print(f"  seed {seed} {method} (coeff:removable of {r.units}): {trail} -> {r.coeff:.4g}")
                model, _ = fresh(name, seed)
                acc, pred = accuracy(_load(model, r.params), data.x_test, data.y_test)
                pruned = fr.prune(model, r.params)
                acc_p, pred_p = accuracy(pruned, data.x_test, data.y_test)
                report = fr.prune_report(model, pruned, data.x_test, r.params, repeats=3)
                results[method].append(
                    {
                        "run": r,
                        "acc": acc,
                        "same": torch.equal(pred, pred_p) and acc == acc_p,
                        "report": report,
                    }
                )
                layer_rows.append(
                    {
                        "model": name,
                        "seed": str(seed),
                        "method": method,
                        "removable per layer": ", ".join(f"{k} {z}/{n}" for k, (z, n) in r.layers.items()),
                        "params after": str(report.params_after),
                    }
                )
        timing = time_methods(
            name, {m: res[0]["run"].coeff for m, res in results.items()}, data, seeds[0], rounds, warmup
        )
        ref = "PAT" if "PAT" in results else "AdamW"
        for method, res in results.items():
            accs = [q["acc"] for q in res]
            after = [q["report"].params_after for q in res]
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "coeff": "-" if method == "AdamW" else "/".join(f"{q['run'].coeff:.3g}" for q in res),
                    "removable": "/".join(str(q["run"].zero) for q in res) + f" of {res[0]['run'].units}",
                    "test acc": f"{statistics.mean(accs):.4f}"
                    + (f" ({min(accs):.3f}-{max(accs):.3f})" if len(accs) > 1 else ""),
                    "pruned = unpruned": "yes" if all(q["same"] for q in res) else "NO",
                    "params after prune": f"{statistics.mean(after):.0f} of {res[0]['report'].params_before}",
                    "train step ms": f"{timing[method]['train']:.2f}",
                    f"x {ref}": f"{timing[method]['train'] / timing[ref]['train']:.2f}",
                    "opt step ms": f"{timing[method]['opt']:.2f}",
                    f"opt x {ref}": f"{timing[method]['opt'] / timing[ref]['opt']:.2f}",
                }
            )
    print("\nremovable units per layer (and parameters after fr.prune), per seed:")
    print_table(layer_rows)
    print(
        f"\nat equal sparsity (means over seeds {seeds}; step times: medians of {rounds} interleaved rounds, seed {seeds[0]}):"
    )
    print_table(rows)
    return 0


def _load(model: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(params[k])
    return model


def print_table(rows: list[dict[str, str]]) -> None:
    keys = list(rows[0])
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    width = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    print(" | ".join(k.ljust(width[k]) for k in keys))
    print("-|-".join("-" * width[k] for k in keys))
    for r in rows:
        print(" | ".join(str(r.get(k, "")).ljust(width[k]) for k in keys))


if __name__ == "__main__":
    raise SystemExit(main())
