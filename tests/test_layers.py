"""The layering of docs/architecture.md holds: a module's top-level imports come from its own row of
the table or the rows above it. A module missing from the table fails too, so the map stays whole."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "funcreg" / "_src"


def _rows() -> dict[str, int]:
    rows: dict[str, int] = {}
    table = [
        line for line in (ROOT / "docs" / "architecture.md").read_text().splitlines() if line.startswith("| ")
    ]
    for i, line in enumerate(table):
        cells = line.split("|")
        if len(cells) < 3:
            continue
        for module in re.findall(r"`(?:\w+/)?(\w+)\.py`", cells[2]) + re.findall(r"`(\w+)/`", cells[2]):
            rows.setdefault(module, i)
    return rows


def _module(path: Path) -> str:
    # a package's modules are mapped by the package name (penalties/), except distributed/'s
    if path.parent == SRC or path.parent.name == "distributed":
        return path.stem
    return path.parent.name


def _target(module: str) -> str:
    parts = module.split(".")
    return parts[3] if parts[2] == "distributed" and len(parts) > 3 else parts[2]


def test_every_module_imports_only_from_its_row_or_the_rows_above():
    rows = _rows()
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        name = _module(path)
        if name not in rows:
            problems.append(f"{path.relative_to(ROOT)} is not in the table of docs/architecture.md")
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("funcreg._src."):
                target = _target(node.module)
                if target not in rows:
                    problems.append(
                        f"{path.relative_to(ROOT)} imports {node.module}, which is not in the table"
                    )
                elif rows[target] > rows[name]:
                    problems.append(
                        f"{path.relative_to(ROOT)} imports {node.module} from a row below its own"
                    )
    assert not problems, "\n".join(problems)


def test_the_check_sees_a_violation():
    # the table maps the protocol above the optimizers: base importing alias would be caught
    rows = _rows()
    assert rows["base"] < rows["alias"] < rows["update"]
