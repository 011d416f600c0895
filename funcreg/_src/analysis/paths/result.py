"""The result of a regularization path: the losses per coefficient and replicate, and the choice.

The statistics (mean, standard error, the best and the one-standard-error coefficient) are computed
from the stored per-replicate losses when asked, so a path built by hand, or loaded, chooses as one
just trained does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from funcreg._src.core.typing import PyTree
from funcreg._src.training.members import unstack


# eq=False keeps identity equality and hashing (== on the tensors would be elementwise)
@dataclass(eq=False, repr=False)
class RegularizationPath:
    """The result of :func:`regularization_path`: per coefficient and replicate, and the choice.

    Replicates are the seeds x folds (or the seeds, with a validation split) of one coefficient.

    Attributes:
        name: the hyperparameter's name (``hparams[name]`` in the factories).
        coefficients: ``(C,)`` float64, ascending.
        train_loss: ``(C, R)``: each member's mean loss on its own training examples (no penalty).
        val_loss: ``(C, R)``: each member's mean evaluation loss on its validation examples.
        sparsity: ``(C, R)``: the fraction of exact zeros among all parameters of each member.
        replicates: ``R`` labels, ``"seed 0, fold 1"``.
        params: the trained parameters, stacked: member ``c * R + r`` is coefficient ``c``, replicate ``r``.
        refit_params: with folds and ``refit=True``, the parameters trained on all examples, stacked:
            member ``c * S + s`` for coefficient ``c`` and seed ``s``; else ``None``.

    Examples:
        >>> import torch, funcreg as fr
        >>> val = torch.tensor([[1.0, 1.2], [0.8, 1.0], [0.85, 1.05], [2.0, 2.2]], dtype=torch.float64)
        >>> zeros = torch.zeros(4, 2, dtype=torch.float64)  # 4 coefficients x 2 folds
        >>> coeffs = torch.tensor([0.0, 0.1, 1.0, 10.0], dtype=torch.float64)
        >>> path = fr.RegularizationPath("c", coeffs, zeros, val, zeros, ["fold 0", "fold 1"], 1, {}, None)
        >>> path.val_mean.tolist(), round(path.val_se[1].item(), 6)  # the se at the best: std / sqrt(2)
        ([1.1, 0.9, 0.95, 2.1], 0.1)
        >>> path.best, path.one_se  # 0.95 <= 0.9 + 0.1: the larger coefficient 1.0 is within one SE
        (0.1, 1.0)
    """

    name: str
    coefficients: torch.Tensor
    train_loss: torch.Tensor
    val_loss: torch.Tensor
    sparsity: torch.Tensor
    replicates: list[str]
    seeds: int
    params: PyTree
    refit_params: PyTree | None

    # -- statistics over replicates -------------------------------------------------------------
    @property
    def val_mean(self) -> torch.Tensor:
        """``(C,)``: the mean validation loss over replicates."""
        return self.val_loss.mean(dim=1)

    @property
    def val_std(self) -> torch.Tensor:
        """``(C,)``: the standard deviation over replicates (``n - 1`` in the denominator; 0 for one)."""
        r = self.val_loss.shape[1]
        return self.val_loss.std(dim=1) if r > 1 else torch.zeros_like(self.val_mean)

    @property
    def val_se(self) -> torch.Tensor:
        """``(C,)``: the standard error of the mean, ``val_std / sqrt(R)`` (glmnet's ``cvsd``)."""
        return self.val_std / math.sqrt(self.val_loss.shape[1])

    @property
    def best_index(self) -> int:
        """The index of the lowest mean validation loss (ties: the largest coefficient; NaN never wins)."""
        mean = torch.nan_to_num(self.val_mean, nan=math.inf)
        return int(torch.nonzero(mean == mean.min()).max())

    @property
    def best(self) -> float:
        """The coefficient with the lowest mean validation loss (glmnet's ``lambda.min``)."""
        return float(self.coefficients[self.best_index])

    @property
    def one_se_index(self) -> int:
        """The index of the largest coefficient whose mean validation loss is within one standard error
        of the minimum: ``mean[c] <= mean[best] + se[best]`` (glmnet's ``lambda.1se``)."""
        i = self.best_index
        mean = torch.nan_to_num(self.val_mean, nan=math.inf)
        threshold = mean[i] + self.val_se[i]
        return int(torch.nonzero(mean <= threshold).max())

    @property
    def one_se(self) -> float:
        """The one-standard-error coefficient: the most regularized model that is not significantly
        worse than the best."""
        return float(self.coefficients[self.one_se_index])

    def index_of(self, coefficient: float) -> int:
        """The index of ``coefficient`` in :attr:`coefficients` (to a relative 1e-9; else ``ValueError``)."""
        c = torch.as_tensor(float(coefficient), dtype=torch.float64)
        i = int(torch.argmin((self.coefficients - c).abs()))
        if not torch.isclose(self.coefficients[i], c, rtol=1e-9, atol=1e-300):
            raise ValueError(f"coefficient {coefficient!r} is not on the path {self.coefficients.tolist()}")
        return i

    def params_at(self, coefficient: float, seed: int = 0) -> PyTree:
        """The model to keep at ``coefficient``: trained on all examples (folds with ``refit``) or on
        the training split (a validation split), for the ``seed``-th initialisation."""
        i = self.index_of(coefficient)
        if not 0 <= seed < self.seeds:
            raise ValueError(f"Invalid seed value: {seed} (the path has {self.seeds} seeds)")
        if self.refit_params is not None:
            return unstack(self.refit_params)[i * self.seeds + seed]
        if len(self.replicates) != self.seeds:
            raise ValueError(
                "this path was run with folds and refit=False: no model was trained on all examples"
            )
        return unstack(self.params)[i * self.seeds + seed]

    # -- presentation ---------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """One dict per coefficient: the columns of :meth:`to_dataframe`."""
        std, se = self.val_std, self.val_se
        out = []
        for i, c in enumerate(self.coefficients.tolist()):
            out.append(
                {
                    self.name: c,
                    "train_loss": float(self.train_loss[i].mean()),
                    "val_loss": float(self.val_mean[i]),
                    "val_std": float(std[i]),
                    "val_se": float(se[i]),
                    "sparsity": float(self.sparsity[i].mean()),
                    "choice": ("best" if i == self.best_index else "")
                    + (" 1-se" if i == self.one_se_index else ""),
                }
            )
        for row in out:
            row["choice"] = row["choice"].strip()
        return out

    def to_dataframe(self) -> Any:
        """A pandas DataFrame, one row per coefficient (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("RegularizationPath.to_dataframe needs pandas: pip install pandas") from err
        return pd.DataFrame(self.rows())

    def table(self) -> str:
        """The path as a text table: coefficient, train loss, val loss (mean +- std), sparsity, choice."""
        header = (self.name, "train loss", "val loss (mean +- std)", "sparsity", "choice")
        cells = [header]
        for row in self.rows():
            cells.append(
                (
                    f"{row[self.name]:.4g}",
                    f"{row['train_loss']:.6g}",
                    f"{row['val_loss']:.6g} +- {row['val_std']:.2g}",
                    f"{row['sparsity']:.3f}",
                    row["choice"],
                )
            )
        widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
        lines = [
            "  ".join(c.rjust(w) if i < 4 else c for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in cells
        ]
        r = len(self.replicates)
        lines.append(
            f"{r} replicate{'s' if r > 1 else ''} per coefficient; "
            f"best {self.best:.4g}, one-SE {self.one_se:.4g}"
        )
        return "\n".join(lines)

    __str__ = table

    def __repr__(self) -> str:
        return (
            f"RegularizationPath({self.name}: {len(self.coefficients)} coefficients x {len(self.replicates)} "
            f"replicates, best={self.best:.4g}, one_se={self.one_se:.4g})"
        )

    def plot(self, ax: Any = None) -> Any:
        """Mean validation loss +- one standard error against the coefficient (log axis), the training
        loss, the two choices, and the sparsity on a second axis. Needs matplotlib; returns ``ax``."""
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(7, 4.5))
        coeffs = self.coefficients.tolist()
        positive = [c for c in coeffs if c > 0]
        zero_at = min(positive) / 10 if positive else 1e-3  # 0 one decade left of the smallest value
        xs = [c if c > 0 else zero_at for c in coeffs]
        ax.errorbar(
            xs,
            self.val_mean.tolist(),
            yerr=self.val_se.tolist(),
            marker="o",
            capsize=3,
            label="validation (± 1 SE)",
        )
        ax.plot(
            xs, self.train_loss.mean(dim=1).tolist(), marker=".", linestyle="--", alpha=0.7, label="train"
        )
        ax.axvline(xs[self.best_index], color="tab:red", linestyle=":", label=f"best {self.best:.3g}")
        ax.axvline(
            xs[self.one_se_index], color="tab:purple", linestyle="-.", label=f"one-SE {self.one_se:.3g}"
        )
        if positive:
            ax.set_xscale("log")
        ax.set_xlabel(self.name)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.plot(
            xs, self.sparsity.mean(dim=1).tolist(), color="tab:green", alpha=0.6, marker="s", markersize=3
        )
        twin.set_ylabel("sparsity (fraction of exact zeros)", color="tab:green")
        twin.set_ylim(0, 1)
        ax.legend(fontsize=8)
        return ax
