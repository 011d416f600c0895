"""Mutation testing for funcreg: change one operator in one module, run that module's tests, repeat.

A mutant that makes a test fail is *killed*; one that every test passes *survived*: nothing checks
that line's behaviour. The mutants are small AST edits (comparisons, arithmetic, boolean operators,
``not``, integer and bool constants, ``pop``/``get``), applied one at a time to a private copy of the
repository, so the working tree is never touched. Each module is mapped to the test files that cover
it in ``pyproject.toml`` (``[tool.funcreg.mutation.tests]``; a module without an entry gets the test
file named after it), so one mutant runs in seconds on one thread.

    python tools/mutate.py funcreg/_src/kernels/scratch.py funcreg/_src/forms/fista.py --budget 600
    python tools/mutate.py --all --shard 1/4 --budget 3600 --report mutation-1.json

The report lists every mutant (module, line, the edit, killed / survived / timeout) and the kill
rate per module; ``--markdown`` prints the table docs/mutation.md records.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent

SWAPS: dict[type, type] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.And: ast.Or,
    ast.Or: ast.And,
}


@dataclass
class Mutant:
    module: str
    index: int  # the n-th mutable site of the module, in walk order
    line: int
    edit: str
    outcome: str = "not run"
    seconds: float = 0.0


def _sites(tree: ast.AST) -> Iterator[tuple[ast.AST, str, int]]:
    """Every node a mutant can change, what the change is, and its line (docstrings and annotations
    are skipped by the callers)."""
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Compare):
            for op in node.ops:
                if type(op) in SWAPS:
                    yield op, f"{type(op).__name__} -> {SWAPS[type(op)].__name__}", line
        elif isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in SWAPS:
            yield node.op, f"{type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}", line
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            yield node, "not x -> x", line
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            yield node, f"{node.value} -> {not node.value}", line
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            yield node, f"{node.value} -> {node.value + 1}", line
        elif isinstance(node, ast.Attribute) and node.attr in ("pop", "get"):
            yield node, f".{node.attr} -> .{'get' if node.attr == 'pop' else 'pop'}", line


def _skip_docstrings_and_annotations(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(getattr(body[0], "value", None), ast.Constant):
                skip.update(id(n) for n in ast.walk(body[0]))
        for field in ("annotation", "returns"):
            sub = getattr(node, field, None)
            if isinstance(sub, ast.AST):
                skip.update(id(n) for n in ast.walk(sub))
    return skip


def mutants_of(module: str, root: pathlib.Path = ROOT) -> list[Mutant]:
    tree = ast.parse((root / module).read_text())
    skip = _skip_docstrings_and_annotations(tree)
    out = []
    for i, (_, edit, line) in enumerate(s for s in _sites(tree) if id(s[0]) not in skip):
        out.append(Mutant(module, i, line, edit))
    return out


def mutated_source(module: str, index: int, root: pathlib.Path = ROOT) -> str:
    tree = ast.parse((root / module).read_text())
    skip = _skip_docstrings_and_annotations(tree)
    sites = [s for s in _sites(tree) if id(s[0]) not in skip]
    node = sites[index][0]
    parents = {id(c): p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    if isinstance(node, ast.UnaryOp):
        parent = parents[id(node)]
        for field, value in ast.iter_fields(parent):
            if value is node:
                setattr(parent, field, node.operand)
            elif isinstance(value, list):
                setattr(parent, field, [node.operand if v is node else v for v in value])
    elif isinstance(node, ast.Constant):
        node.value = (not node.value) if type(node.value) is bool else node.value + 1
    elif isinstance(node, ast.Attribute):
        node.attr = "get" if node.attr == "pop" else "pop"
    else:  # an operator: replace it in its owner
        owner = parents[id(node)]
        new = SWAPS[type(node)]()
        if isinstance(owner, ast.Compare):
            owner.ops = [new if o is node else o for o in owner.ops]
        else:
            owner.op = new  # type: ignore[attr-defined]
    return ast.unparse(ast.fix_missing_locations(copy.deepcopy(tree)))


def tests_for(module: str) -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    table = config.get("tool", {}).get("funcreg", {}).get("mutation", {}).get("tests", {})
    if module in table:
        return list(table[module])
    guess = f"tests/test_{pathlib.Path(module).stem}.py"
    return [guess] if (ROOT / guess).exists() else []


def run_one(work: pathlib.Path, mutant: Mutant, tests: list[str], timeout: float) -> None:
    target = work / mutant.module
    original = target.read_text()
    target.write_text(mutated_source(mutant.module, mutant.index, root=work))
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    try:
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, timeout=timeout)
        mutant.outcome = "survived" if done.returncode == 0 else "killed"
    except subprocess.TimeoutExpired:
        mutant.outcome = "timeout"  # an infinite loop: counted as killed
    finally:
        target.write_text(original)
    mutant.seconds = round(time.perf_counter() - start, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="modules to mutate (paths under funcreg/)")
    parser.add_argument("--all", action="store_true", help="every module of funcreg/")
    parser.add_argument("--shard", default="1/1", help="i/n: this run's share of the mutants")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds for the whole run")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant")
    parser.add_argument("--report", default="mutation-report.json")
    parser.add_argument("--markdown", action="store_true", help="print the per-module table")
    args = parser.parse_args()
    modules = (
        sorted(str(p.relative_to(ROOT)) for p in (ROOT / "funcreg").rglob("*.py"))
        if args.all
        else args.modules
    )
    i, n = (int(x) for x in args.shard.split("/"))
    deadline = time.perf_counter() + args.budget
    with tempfile.TemporaryDirectory() as tmp:
        # the mutants come from this copy, so editing the working tree meanwhile changes nothing
        work = pathlib.Path(tmp) / "repo"
        shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", ".ci-venv", "site", "__pycache__"))
        everything = [x for mod in modules for x in mutants_of(mod, root=work)]
        mutants = [m for k, m in enumerate(everything) if k % n == i - 1]
        for m in mutants:
            tests = tests_for(m.module)
            if not tests:
                m.outcome = "no tests mapped"
                continue
            if time.perf_counter() > deadline:
                break
            run_one(work, m, tests, args.timeout)
            print(f"{m.outcome:9s} {m.module}:{m.line} {m.edit} ({m.seconds}s)", flush=True)
    pathlib.Path(args.report).write_text(json.dumps([asdict(m) for m in mutants], indent=1))
    if args.markdown:
        print(table(mutants))


def table(mutants: list[Mutant]) -> str:
    rows = ["| module | mutants run | killed | survived | kill rate |", "|---|---|---|---|---|"]
    by: dict[str, list[Mutant]] = {}
    for m in mutants:
        by.setdefault(m.module, []).append(m)
    for module, ms in sorted(by.items()):
        ran = [m for m in ms if m.outcome in ("killed", "survived", "timeout")]
        killed = sum(m.outcome != "survived" for m in ran)
        rate = f"{100 * killed / len(ran):.0f}%" if ran else "-"
        rows.append(f"| `{module}` | {len(ran)} of {len(ms)} | {killed} | {len(ran) - killed} | {rate} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
