"""tools/mutate.py makes each mutant at its own place: CPython's parser shares one operator object
between all expressions of a kind, so a mutant found through its operator would land on another
expression (the bug behind the first three recorded runs). Each mutant here is compared with the
source edited by hand at the intended place."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("mutate", ROOT / "tools" / "mutate.py")
mutate = importlib.util.module_from_spec(_spec)
sys.modules["mutate"] = mutate  # dataclasses look their module up there
assert _spec.loader is not None
_spec.loader.exec_module(mutate)

SOURCE = '''def f(a, b, c, d):
    """Doc: a * b < 1."""
    x = a * b
    y = c * d
    if a < b < c and not d:
        return x + y
    return {}.pop(0, 7)
'''

EXPECTED = [  # (edit, its line in SOURCE, the line as it must read after the mutant)
    ("Mult -> Div", 3, "    x = a / b"),
    ("Mult -> Div", 4, "    y = c / d"),
    ("And -> Or", 5, "    if a < b < c or not d:"),
    ("Add -> Sub", 6, "        return x - y"),
    ("Lt -> LtE", 5, "    if a <= b < c and (not d):"),
    ("Lt -> LtE", 5, "    if a < b <= c and (not d):"),
    ("not x -> x", 5, "    if a < b < c and d:"),
    (".pop -> .get", 7, "    return {}.get(0, 7)"),
    ("0 -> 1", 7, "    return {}.pop(1, 7)"),
    ("7 -> 8", 7, "    return {}.pop(0, 8)"),
]


def test_each_mutant_changes_exactly_its_own_place(tmp_path):
    (tmp_path / "m.py").write_text(SOURCE)
    mutants = mutate.mutants_of("m.py", root=tmp_path)
    assert sorted((m.edit, m.line) for m in mutants) == sorted((edit, line) for edit, line, _ in EXPECTED)
    plain = mutate.ast.unparse(mutate.ast.parse(SOURCE)).splitlines()
    made = set()
    for m in mutants:
        lines = mutate.mutated_source("m.py", m.index, root=tmp_path).splitlines()
        changed = [(old, new) for old, new in zip(plain, lines) if old != new]
        assert len(changed) == 1, (m, changed)  # one line changed, and it is this mutant's
        made.add((m.edit, changed[0][1]))
    assert made == {(edit, text) for edit, _, text in EXPECTED}


def test_an_earlier_report_selects_by_module_index_line_and_edit(tmp_path):
    (tmp_path / "m.py").write_text(SOURCE)
    mutants = mutate.mutants_of("m.py", root=tmp_path)
    first, second, third = mutants[0], mutants[1], mutants[2]
    earlier = [
        {
            "module": first.module,
            "index": first.index,
            "line": first.line,
            "edit": first.edit,
            "outcome": "killed",
        },
        {
            "module": second.module,
            "index": second.index,
            "line": second.line,
            "edit": second.edit,
            "outcome": "survived",
        },
        # the same index after an edit of the module moved it: not the same mutant
        {
            "module": third.module,
            "index": third.index,
            "line": third.line + 1,
            "edit": third.edit,
            "outcome": "killed",
        },
    ]
    resumed = mutate.by_earlier_outcome(mutants, earlier, "killed", keep=False)
    assert [m.index for m in resumed] == [m.index for m in mutants if m is not first]
    again = mutate.by_earlier_outcome(mutants, earlier, "survived", keep=True)
    assert [m.index for m in again] == [second.index]


def test_a_mapped_test_file_the_coverage_map_has_not_seen_runs_whole(monkeypatch, tmp_path):
    (tmp_path / "m.py").write_text(SOURCE)
    mutant = mutate.mutants_of("m.py", root=tmp_path)[0]
    monkeypatch.setattr(mutate, "tests_for", lambda module: ["tests/test_old.py", "tests/test_new.py"])
    monkeypatch.setattr(mutate, "_function_lines", lambda module: set())
    cmap = {
        "seconds": {"tests/test_old.py::t": 1.0},
        "lines": {"m.py": {str(mutant.line): ["tests/test_old.py::t"]}},
    }
    assert mutate.tests_by_coverage(mutant, cmap, 20.0) == ["tests/test_old.py::t", "tests/test_new.py"]
