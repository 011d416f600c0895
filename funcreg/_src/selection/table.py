"""The :class:`Selection`: a yes/no per named parameter with its reason, printed as a table.

Matching by leaf name rather than by position lets one selection, built from a module's
``named_parameters``, serve the flat dict of :func:`funcreg.params_of` and nested trees alike, and
makes a name on one side that is missing on the other an error instead of a silent shift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from funcreg._src.core.tree import tree_names
from funcreg._src.core.typing import PyTree
from funcreg._src.selection.named_params import _suggest


class Selection(Mapping[str, bool]):
    """A yes/no decision per named parameter, with the reason for each; usable wherever a mask is.

    A selection is matched to a parameter tree by leaf name (see :func:`funcreg.tree_names`), so it
    works for the flat dicts of :func:`funcreg.params_of` and for nested trees alike. ``str()`` of a
    selection is a table of names, shapes, decisions and reasons. Selections combine with ``~``, ``&``
    and ``|``.

    Examples:
        >>> import torch, funcreg as fr
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3))
        >>> sel = fr.decay_mask(model)
        >>> sel.selected
        ['0.weight']
        >>> print(sel)
        name         shape  decay  reason
        0.weight     3x2    yes    weight with ndim 2
        0.bias       3      no     bias
        1.weight     3      no     normalization layer (LayerNorm)
        1.bias       3      no     normalization layer (LayerNorm)
    """

    def __init__(
        self,
        decisions: Mapping[str, bool],
        shapes: Mapping[str, str] | None = None,
        reasons: Mapping[str, str] | None = None,
        label: str = "selected",
        notes: Sequence[str] = (),
    ) -> None:
        self._decisions = {str(k): bool(v) for k, v in decisions.items()}
        self._shapes = dict(shapes or {})
        self._reasons = dict(reasons or {})
        self.label = label
        self.notes: tuple[str, ...] = tuple(notes)
        """Remarks printed under the table, e.g. names ``model.no_weight_decay()`` lists that the model lacks."""

    def __getitem__(self, name: str) -> bool:
        return self._decisions[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decisions)

    def __len__(self) -> int:
        return len(self._decisions)

    @property
    def selected(self) -> list[str]:
        """Names of the selected parameters, in order."""
        return [k for k, v in self._decisions.items() if v]

    @property
    def unselected(self) -> list[str]:
        """Names of the parameters left out, in order."""
        return [k for k, v in self._decisions.items() if not v]

    def reason(self, name: str) -> str:
        """Why ``name`` was selected or not."""
        return self._reasons.get(name, "")

    def table(self) -> str:
        """The selection as a text table: name, shape, decision, reason."""
        rows = [("name", "shape", self.label, "reason")]
        for name, keep in self._decisions.items():
            rows.append(
                (name, self._shapes.get(name, ""), "yes" if keep else "no", self._reasons.get(name, ""))
            )
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [
            f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows
        ]
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    __str__ = table

    def to_dataframe(self) -> Any:
        """A pandas DataFrame, one row per parameter: ``name``, ``shape``, the decision (a bool column
        named by the selection's label, ``decay`` for :func:`decay_mask`) and ``reason``.

        Examples:
            >>> import torch, funcreg as fr
            >>> df = fr.decay_mask(torch.nn.Linear(2, 3)).to_dataframe()  # needs pandas
            >>> df.to_dict("records")[0]
            {'name': 'weight', 'shape': '3x2', 'decay': True, 'reason': 'weight with ndim 2'}
        """
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("Selection.to_dataframe needs pandas: pip install pandas") from err
        return pd.DataFrame.from_records(
            [
                {
                    "name": n,
                    "shape": self._shapes.get(n, ""),
                    self.label: keep,
                    "reason": self._reasons.get(n, ""),
                }
                for n, keep in self._decisions.items()
            ],
            columns=["name", "shape", self.label, "reason"],
        )

    def __repr__(self) -> str:
        return f"Selection({len(self.selected)} of {len(self)} {self.label}: {self.selected!r})"

    def _combine(self, other: Selection, op: Callable[[bool, bool], bool], sym: str) -> Selection:
        if not isinstance(other, Selection):
            return NotImplemented
        if list(self) != list(other):
            raise ValueError(f"cannot combine selections over different names with {sym!r}")
        decisions = {k: op(self[k], other[k]) for k in self}
        reasons = {k: f"({self.reason(k)}) {sym} ({other.reason(k)})" for k in self}
        return Selection(decisions, self._shapes, reasons, self.label, self.notes + other.notes)

    def __and__(self, other: Selection) -> Selection:
        return self._combine(other, lambda a, b: a and b, "&")

    def __or__(self, other: Selection) -> Selection:
        return self._combine(other, lambda a, b: a or b, "|")

    def __invert__(self) -> Selection:
        return Selection(
            {k: not v for k, v in self._decisions.items()},
            self._shapes,
            {k: f"not ({self.reason(k)})" for k in self},
            self.label,
            self.notes,
        )

    def resolve(self, tree: PyTree) -> list[bool]:
        """One bool per leaf of ``tree``, matched by leaf name; every name must be present in both."""
        names = tree_names(tree)
        missing = [n for n in names if n not in self._decisions]
        if missing:
            raise ValueError(
                f"selection has no entry for parameter {missing[0]!r}{_suggest(missing[0], list(self))}"
            )
        extra = [n for n in self._decisions if n not in set(names)]
        if extra:
            raise ValueError(
                f"selection names {extra[0]!r}, which is not a parameter of this tree{_suggest(extra[0], names)}"
            )
        return [self._decisions[n] for n in names]
