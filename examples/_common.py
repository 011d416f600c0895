"""Helpers shared by the story examples (three_ways.py, sandbox.py, digits_sparsity.py, ...).

Nothing here is funcreg: argument parsing (``--quick``, ``--out DIR``), printing tables (a pandas
DataFrame when pandas is installed, plain text otherwise), progress bars (tqdm when installed, a plain
loop otherwise), scikit-learn's digits data (it ships with scikit-learn: no download), standardised
and split with fixed seeds, and saving a matplotlib figure with the Agg backend.

The examples import it as ``import _common`` (Python puts the script's folder, ``examples/``, on
``sys.path``). Run directly, it checks that the helpers work:

    python examples/_common.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)  # small ops are much slower with several threads on small machines

DEFAULT_OUT = Path(__file__).resolve().parent / "out"  # git-ignored (.gitignore: examples/out/)

try:  # optional: nicer tables
    import pandas as _pd
except ImportError:  # pragma: no cover - depends on the environment
    _pd = None

try:  # optional: progress bars
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover - depends on the environment
    _tqdm = None


# ------------------------------------------------------------------------------------------------
# Command line


def parse_args(
    doc: str | None, add_arguments: Any = None, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """``--quick`` (a few seconds, for CI) and ``--out DIR`` (figures; default ``examples/out/``).

    ``add_arguments(parser)`` may add the example's own options. The description is the first line of
    ``doc`` (the example's module docstring).
    """
    first = (doc or "").strip().splitlines()[0] if doc and doc.strip() else None
    parser = argparse.ArgumentParser(description=first)
    parser.add_argument(
        "--quick", action="store_true", help="a few seconds: fewer steps and seeds (CI runs this)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"where figures go (default: {DEFAULT_OUT})",
    )
    if add_arguments is not None:
        add_arguments(parser)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# Printing


def _fmt(value: Any, float_format: str) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, float_format)
    return str(value)


def print_table(
    rows: Sequence[Mapping[str, Any]], title: str | None = None, float_format: str = ".4g"
) -> None:
    """Prints a list of dicts (one per row, same keys) as a table.

    With pandas: a ``DataFrame`` (printed in full, floats with ``float_format``); without: aligned text.
    """
    if title:
        print(f"\n{title}")
    if not rows:
        print("(no rows)")
        return
    columns = list(rows[0])
    if _pd is not None:
        frame = _pd.DataFrame(
            [{c: (r[c].item() if isinstance(r[c], torch.Tensor) else r[c]) for c in columns} for r in rows]
        )
        for c in columns:  # text columns read better left-aligned, header included
            if all(isinstance(v, str) for v in frame[c]):
                width = max(len(str(c)), *(len(v) for v in frame[c]))
                frame[c] = frame[c].str.ljust(width)
                frame = frame.rename(columns={c: str(c).ljust(width)})
        with _pd.option_context(
            "display.max_rows", None, "display.max_columns", None, "display.width", 250,
            "display.max_colwidth", 80, "display.float_format", lambda v: format(v, float_format),
        ):  # fmt: skip
            print(frame.to_string(index=False))
        return
    cells = [[str(c) for c in columns]] + [[_fmt(r[c], float_format) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    text = [all(isinstance(r[c], str) for r in rows) for c in columns]  # left-aligned, numbers right-aligned
    for row in cells:
        print(
            "  ".join(cell.ljust(w) if t else cell.rjust(w) for cell, w, t in zip(row, widths, text)).rstrip()
        )


def progress(
    iterable: Iterable[Any], desc: str = "", total: int | None = None, leave: bool = False
) -> Iterator[Any]:
    """``tqdm(iterable)`` when tqdm is installed (on stderr), the bare iterable otherwise."""
    if _tqdm is None:
        yield from iterable
        return
    yield from _tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True)


@contextmanager
def timed(label: str, store: dict[str, float] | None = None) -> Iterator[None]:
    """Measures the wall time of a block; prints it, and records it in ``store[label]`` if given."""
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    if store is not None:
        store[label] = elapsed
    print(f"[{label}: {elapsed:.2f} s]")


# ------------------------------------------------------------------------------------------------
# Data


def load_digits_split(
    seed: int = 0,
    test_size: float = 0.25,
    images: bool = False,
    train_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (1797 8x8 images, 10 classes): ``x_train, x_test, y_train, y_test``.

    A stratified split with ``random_state=seed``; statistics from the training set only:

    * ``images=False``: each of the 64 pixels standardised (pixels that are constant in the training
      set are only centred), shape ``(n, 64)``;
    * ``images=True``: one mean and standard deviation over all pixels (per-pixel statistics would
      distort the images a convolution looks at), shape ``(n, 1, 8, 8)``.

    ``train_size`` keeps only that many training examples (stratified), for overfitting regimes.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64)
    y = torch.tensor(digits.target, dtype=torch.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    if train_size is not None and train_size < len(x_train):
        x_train, _, y_train, _ = train_test_split(
            x_train, y_train, train_size=train_size, random_state=seed, stratify=y_train
        )
    if images:
        mean, std = x_train.mean(), x_train.std()
    else:
        mean, std = x_train.mean(dim=0), x_train.std(dim=0)
        std = torch.where(std > 1e-8, std, torch.ones_like(std))
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    if images:
        x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    return x_train.to(dtype), x_test.to(dtype), y_train, y_test


def member_batches(
    n_train: int, batch_size: int, seeds: Sequence[int], epochs: int
) -> Iterator[torch.Tensor]:
    """Index batches of shape ``(members, batch_size)``: each member its own shuffling (seeded).

    Every member sees the same number of batches; the last, incomplete batch of an epoch is dropped.
    """
    generators = [torch.Generator().manual_seed(1000 + s) for s in seeds]
    per_epoch = n_train // batch_size
    for _ in range(epochs):
        orders = torch.stack([torch.randperm(n_train, generator=g) for g in generators])
        for i in range(per_epoch):
            yield orders[:, i * batch_size : (i + 1) * batch_size]


# ------------------------------------------------------------------------------------------------
# Figures


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out_dir: Path, name: str) -> Path:
    """Saves ``fig`` as ``out_dir/name`` (PNG, 120 dpi), closes it and prints the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    try:
        shown = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        shown = str(path)
    if shown.startswith(".."):
        shown = str(path.resolve())
    print(f"\nfigure saved to {shown}")
    return path


def main() -> None:  # a self-check, so that `python examples/_common.py --quick` (CI runs every file) works
    args = parse_args(__doc__)
    x_train, x_test, y_train, y_test = load_digits_split(images=True)
    print_table(
        [
            {
                "split": "train",
                "x": tuple(x_train.shape),
                "mean": x_train.mean().item(),
                "std": x_train.std().item(),
            },
            {
                "split": "test",
                "x": tuple(x_test.shape),
                "mean": x_test.mean().item(),
                "std": x_test.std().item(),
            },
        ],
        title="digits, standardised with training-set statistics",
    )
    total = sum(1 for _ in progress(member_batches(len(x_train), 64, [0, 1], epochs=1), desc="batches"))
    print(
        f"{total} batches of 64 per epoch; helpers OK (pandas: {_pd is not None}, tqdm: {_tqdm is not None})."
    )
    print(f"This module only holds helpers for the examples; figures go to {args.out}.")


if __name__ == "__main__":
    main()
