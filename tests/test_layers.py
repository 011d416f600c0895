"""The house plan of docs/architecture.md holds.

``funcreg/_src`` is a set of wings (sub-packages), listed bottom to top in the table of
``docs/architecture.md``. Every import a module makes (at the top, inside a function, or under
``TYPE_CHECKING``) comes from its own wing or a wing above it in the table, the modules' imports have
no circles, every module is named in its wing's row (so the map stays whole), and no module
re-exports another's names (``from x import y as y``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "funcreg" / "_src"


def _wings() -> tuple[list[str], dict[str, set[str]]]:
    """The wings in the table's order, and the module files each row names (``paths/path.py``)."""
    order: list[str] = []
    listed: dict[str, set[str]] = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        cells = line.split("|")
        if not line.startswith("| ") or len(cells) < 4:
            continue
        wing = re.fullmatch(r"\s*`(\w+)/`\s*", cells[1])
        if wing:
            order.append(wing.group(1))
            listed[wing.group(1)] = set(re.findall(r"`([\w/]+\.py)`", cells[2]))
    return order, listed


def _name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["funcreg._src", *parts])


MODULES = {_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every ``funcreg._src`` module ``path`` imports, wherever the import statement stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("funcreg._src"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in MODULES else node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("funcreg._src")]
    return found


def _wing(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else None


def test_every_module_sits_in_a_wing_of_the_table_and_is_named_there():
    order, listed = _wings()
    problems = []
    for path in MODULES.values():
        rel = path.relative_to(SRC)
        if len(rel.parts) == 1:
            if path.name != "__init__.py":
                problems.append(f"{rel} sits outside every wing")
            continue
        wing = rel.parts[0]
        if wing not in order:
            problems.append(f"{rel}: the wing {wing}/ is not in the table of docs/architecture.md")
        elif path.name != "__init__.py" and "/".join(rel.parts[1:]) not in listed[wing]:
            problems.append(f"{rel} is not named in the row of {wing}/")
    for wing, files in listed.items():
        problems += [
            f"{wing}/{f} is named in the table but does not exist"
            for f in files
            if not (SRC / wing / f).exists()
        ]
    assert not problems, "\n".join(problems)


def test_every_import_comes_from_its_own_wing_or_one_below():
    order, _ = _wings()
    rank = {w: i for i, w in enumerate(order)}
    problems = []
    for module, path in MODULES.items():
        here = _wing(module)
        if here not in rank:
            continue
        for target, line in _imports(path):
            there = _wing(target)
            if there not in rank:
                problems.append(f"{module}:{line} imports {target}, outside every wing")
            elif rank[there] > rank[here]:
                problems.append(f"{module}:{line} imports {target} from the wing above it ({there}/)")
    assert not problems, "\n".join(problems)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        targets = {t for t, _ in _imports(path)}
        # a package's __init__ imports its modules, which import their siblings: the package itself
        # is not a node of the circle check, its modules are
        graph[module] = {t for t in targets if t in MODULES and t != module and not _is_package(t)}
    return graph


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def test_the_imports_have_no_circles_not_even_inside_functions():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_no_module_re_exports_another_modules_names():
    problems = []
    for module, path in MODULES.items():
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                problems += [
                    f"{module}:{node.lineno} {a.name} as {a.asname}" for a in node.names if a.asname == a.name
                ]
    assert not problems, "\n".join(problems)


def test_the_checks_see_a_violation():
    order, _ = _wings()
    assert order.index("core") < order.index("optim") < order.index("torch_optimizer")
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
