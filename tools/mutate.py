"""Mutation testing for funcreg: change one operator in one module, run that module's tests, repeat.

A mutant that makes a test fail is *killed*; one that every test passes *survived*: nothing checks
that line's behaviour. The mutants are small AST edits (comparisons, arithmetic, boolean operators,
``not``, integer and bool constants, ``pop``/``get``), applied one at a time to a private copy of the
repository, so the working tree is never touched. Each module is mapped to the test files that cover
it in ``pyproject.toml`` (``[tool.funcreg.mutation.tests]``; a module without an entry gets the test
file named after it), so one mutant runs in seconds on one thread.

    python tools/mutate.py funcreg/_src/kernels/scratch.py funcreg/_src/forms/fista.py --budget 600
    python tools/mutate.py --all --shard 1/4 --budget 3600 --report mutation-1.json

With a coverage map the tests are chosen per mutant instead: the tests whose run executed the
mutated line (pytest-cov's per-test contexts), fastest first, within ``--test-seconds`` of their
recorded time; a mutant on a line no test executes survives without a run. Each mutant then runs in
a child forked from a process that has imported torch, numpy, Hypothesis and pytest already (but not
funcreg), so it costs about its tests' time. ``--per-module K`` draws K mutants of each module
(seeded), which is how a whole-package run fits a session:

    OMP_NUM_THREADS=1 CI=true COVERAGE_FILE=cov/.coverage pytest --cov=funcreg --cov-context=test \
        --cov-report= --durations=0 --durations-min=0 > cov/pytest.log
    python tools/mutate.py --build-map cov/.coverage cov/pytest.log --map cov/map.json
    python tools/mutate.py --all --map cov/map.json --per-module 8 --budget 3600 --markdown

The report lists every mutant (module, line, the edit, killed / survived / timeout) and the kill
rate per module; ``--markdown`` prints the table docs/mutation.md records.
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import NamedTuple

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
    statement: int = 0  # the first line of the statement holding the site (what coverage records)
    tests: int = 0  # how many tests ran against it


class _Site(NamedTuple):
    """One mutable place: the node that holds it (an operator's *owner*, as CPython's parser shares
    one operator object between all expressions of a kind), the position of a comparison's
    operator, the edit and the line."""

    node: ast.AST
    slot: int
    edit: str
    line: int


def _sites(tree: ast.AST) -> Iterator[_Site]:
    """Every place a mutant can change, in walk order (docstrings and annotations are skipped by
    the callers)."""
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Compare):
            for k, op in enumerate(node.ops):
                if type(op) in SWAPS:
                    yield _Site(node, k, f"{type(op).__name__} -> {SWAPS[type(op)].__name__}", line)
        elif isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in SWAPS:
            yield _Site(node, -1, f"{type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}", line)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            yield _Site(node, -1, "not x -> x", line)
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            yield _Site(node, -1, f"{node.value} -> {not node.value}", line)
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            yield _Site(node, -1, f"{node.value} -> {node.value + 1}", line)
        elif isinstance(node, ast.Attribute) and node.attr in ("pop", "get"):
            yield _Site(node, -1, f".{node.attr} -> .{'get' if node.attr == 'pop' else 'pop'}", line)


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
    statement_of = _statement_lines(tree)
    out = []
    for i, site in enumerate(x for x in _sites(tree) if id(x.node) not in skip):
        out.append(
            Mutant(module, i, site.line, site.edit, statement=statement_of.get(id(site.node), site.line))
        )
    return out


def _statement_lines(tree: ast.AST) -> dict[int, int]:
    """The first line of the innermost statement holding each node, by the node's id."""
    lines: dict[int, int] = {}

    def visit(node: ast.AST, statement: int) -> None:
        if isinstance(node, ast.stmt):
            statement = node.lineno
        lines[id(node)] = statement
        for child in ast.iter_child_nodes(node):
            visit(child, statement)

    visit(tree, 0)
    return lines


def mutated_source(module: str, index: int, root: pathlib.Path = ROOT) -> str:
    tree = ast.parse((root / module).read_text())
    skip = _skip_docstrings_and_annotations(tree)
    site = [x for x in _sites(tree) if id(x.node) not in skip][index]
    node = site.node
    if isinstance(node, ast.UnaryOp):
        parents = {id(c): p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
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
    elif isinstance(node, ast.Compare):  # a new operator object in this comparison only
        node.ops = [SWAPS[type(o)]() if k == site.slot else o for k, o in enumerate(node.ops)]
    else:  # BinOp, BoolOp
        node.op = SWAPS[type(node.op)]()  # type: ignore[attr-defined]
    return ast.unparse(ast.fix_missing_locations(copy.deepcopy(tree)))


@functools.cache
def _config() -> dict:
    """``[tool.funcreg.mutation]`` of pyproject.toml (read once: it is asked for every mutant)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config.get("tool", {}).get("funcreg", {}).get("mutation", {})


def tests_for(module: str) -> list[str]:
    table = _config().get("tests", {})
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


def build_map(coverage_file: str, durations_log: str) -> dict:
    """Which tests executed each line (from pytest-cov's per-test contexts) and how long each test
    took (from ``--durations=0``): ``{"seconds": {test: s}, "lines": {module: {line: [test]}}}``."""
    import coverage

    seconds: dict[str, float] = {}
    pattern = re.compile(r"^\s*([\d.]+)s (?:setup|call|teardown)\s+(\S.*?)\s*$")
    for text in pathlib.Path(durations_log).read_text().splitlines():
        found = pattern.match(text)
        if found:
            seconds[found.group(2)] = seconds.get(found.group(2), 0.0) + float(found.group(1))
    data = coverage.CoverageData(coverage_file)
    data.read()
    lines: dict[str, dict[str, list[str]]] = {}
    for path in data.measured_files():
        posix = pathlib.Path(path).as_posix()  # recorded in any checkout: keep the part from funcreg/
        module = posix[posix.rindex("/funcreg/") + 1 :]
        by_line = data.contexts_by_lineno(path)
        lines[module] = {
            str(n): sorted({c.rsplit("|", 1)[0] for c in contexts if c}) for n, contexts in by_line.items()
        }
        lines[module] = {n: ts for n, ts in lines[module].items() if ts}
    return {"seconds": seconds, "lines": lines}


def tests_by_coverage(mutant: Mutant, cmap: dict, test_seconds: float) -> list[str]:
    """The tests that executed the mutant's statement, within ``test_seconds`` of their recorded
    time (at least one): those of the module's mapped test files first, then the ones that execute
    most of the module (its unit tests, more than the suites that merely pass through it), the
    faster first among equals. A statement run only at import (a module constant, a default
    argument) takes the module's mapped test files, or the tests that executed most of the module."""
    if mutant.module in _config().get("other_processes", []):
        return tests_for(mutant.module)  # run in other processes: invisible to per-test coverage
    seconds = cmap["seconds"]
    lines = cmap["lines"].get(mutant.module, {})
    focus = _focus(mutant.module, lines)
    chosen = lines.get(str(mutant.statement)) or lines.get(str(mutant.line))
    if not chosen:
        if mutant.statement in _function_lines(mutant.module):
            return _unmeasured(mutant.module, seconds)  # inside a function no measured test calls
        if tests_for(mutant.module):  # the module's own test files, whole
            return tests_for(mutant.module)
        chosen = sorted(focus, key=lambda t: -focus[t])[:50]
    own = tuple(f + "::" for f in tests_for(mutant.module))
    picked: list[str] = []
    spent = 0.0
    for test in sorted(chosen, key=lambda t: (not t.startswith(own), -focus.get(t, 0), seconds.get(t, 1.0))):
        cost = seconds.get(test, 1.0)
        if picked and spent + cost > test_seconds:
            continue  # a shorter one further down may still fit
        picked.append(test)
        spent += cost
    return picked + _unmeasured(mutant.module, seconds)


def _unmeasured(module: str, seconds: dict[str, float]) -> list[str]:
    """The module's mapped test files that the map has not seen (written after it was measured): run
    whole, as the map cannot say which of their tests reach the line."""
    measured = {t.split("::")[0] for t in seconds}
    return [f for f in tests_for(module) if f not in measured]


_FOCUS: dict[str, dict[str, int]] = {}


def _focus(module: str, lines: dict[str, list[str]]) -> dict[str, int]:
    """How many of the module's lines each test executes."""
    if module not in _FOCUS:
        count: dict[str, int] = {}
        for ts in lines.values():
            for t in ts:
                count[t] = count.get(t, 0) + 1
        _FOCUS[module] = count
    return _FOCUS[module]


_FUNCTION_LINES: dict[str, set[int]] = {}


def _function_lines(module: str) -> set[int]:
    """The lines of the module's function bodies (a statement there runs only when called)."""
    if module not in _FUNCTION_LINES:
        tree = ast.parse((ROOT / module).read_text())
        body: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
                start = node.body[0].lineno
                body.update(range(start, (node.end_lineno or start) + 1))
        _FUNCTION_LINES[module] = body
    return _FUNCTION_LINES[module]


def run_forked(work: pathlib.Path, mutant: Mutant, tests: list[str], timeout: float) -> None:
    """Run the tests against the mutant in a child of this process (which has torch imported but
    not funcreg, so the child imports the mutated copy); a test failure or an error while
    collecting kills the mutant."""
    import pytest

    target = work / mutant.module
    original = target.read_text()
    target.write_text(mutated_source(mutant.module, mutant.index, root=work))
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 3
        try:
            os.chdir(work)
            sys.path.insert(0, str(work))
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]))
        finally:
            os._exit(code)
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                outcome = {0: "survived", 1: "killed", 2: "killed"}.get(code, f"error {code}")
                break
            if time.perf_counter() - start > timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                outcome = "timeout"
                break
            time.sleep(0.02)
    finally:
        target.write_text(original)
    mutant.outcome = outcome
    mutant.tests = len(tests)
    mutant.seconds = round(time.perf_counter() - start, 1)


def _preload() -> None:
    """Import what every test imports, once, before the children are forked (funcreg excluded)."""
    os.environ.update(OMP_NUM_THREADS="1", CI="true", PYTHONDONTWRITEBYTECODE="1")
    import hypothesis  # noqa: F401
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401

    assert "funcreg" not in sys.modules, "the parent must not import funcreg"


def sample(mutants: list[Mutant], per_module: int, seed: int) -> list[Mutant]:
    """``per_module`` mutants of each module, drawn with a seeded generator, in module order."""
    by: dict[str, list[Mutant]] = {}
    for m in mutants:
        by.setdefault(m.module, []).append(m)
    rng = random.Random(seed)
    out = []
    for module in by:
        ms = by[module]
        out.extend(sorted(rng.sample(ms, min(per_module, len(ms))), key=lambda m: m.index))
    return out


def _read(report: str) -> list[dict]:
    return json.loads(pathlib.Path(report).read_text())


def by_earlier_outcome(
    mutants: list[Mutant], earlier: list[dict], outcome: str, *, keep: bool
) -> list[Mutant]:
    """The mutants that had ``outcome`` in an earlier report (``keep``), or those that did not.

    A mutant is the same one when its module, index, line and edit all match, so a module edited since
    the earlier run (its mutants renumbered or moved) is run afresh rather than matched by index."""
    found = {(m["module"], m["index"], m["line"], m["edit"]) for m in earlier if m["outcome"] == outcome}
    return [m for m in mutants if ((m.module, m.index, m.line, m.edit) in found) == keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="modules to mutate (paths under funcreg/)")
    parser.add_argument("--all", action="store_true", help="every module of funcreg/")
    parser.add_argument("--shard", default="1/1", help="i/n: this run's share of the mutants")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds for the whole run")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant")
    parser.add_argument("--report", default="mutation-report.json")
    parser.add_argument("--markdown", action="store_true", help="print the per-module table")
    parser.add_argument("--map", help="a coverage map (JSON): choose each mutant's tests by the line")
    parser.add_argument("--build-map", nargs=2, metavar=("COVERAGE_FILE", "DURATIONS_LOG"))
    parser.add_argument("--test-seconds", type=float, default=20.0, help="recorded test time per mutant")
    parser.add_argument("--per-module", type=int, default=0, help="draw this many mutants per module")
    parser.add_argument("--seed", type=int, default=0, help="the draw's seed")
    parser.add_argument("--survivors", help="a report: run only the mutants that survived in it")
    parser.add_argument("--skip-killed", help="a report: skip the mutants it killed (same line and edit)")
    args = parser.parse_args()
    if args.build_map:
        pathlib.Path(args.map).write_text(json.dumps(build_map(*args.build_map)))
        return
    cmap = json.loads(pathlib.Path(args.map).read_text()) if args.map else None
    if cmap is not None:
        _preload()
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
        if args.per_module:
            everything = sample(everything, args.per_module, args.seed)
        if args.survivors:  # again, only what survived in an earlier report (e.g. with more tests)
            everything = by_earlier_outcome(everything, _read(args.survivors), "survived", keep=True)
        if args.skip_killed:  # resume a run: what was killed stays killed while tests only grow
            everything = by_earlier_outcome(everything, _read(args.skip_killed), "killed", keep=False)
        mutants = [m for k, m in enumerate(everything) if k % n == i - 1]
        for m in mutants:
            if time.perf_counter() > deadline:
                break
            if cmap is not None:
                tests = tests_by_coverage(m, cmap, args.test_seconds)
                if not tests:
                    m.outcome = "survived"  # no test executes this line
                    m.seconds = 0.0
                else:
                    run_forked(work, m, tests, args.timeout)
            else:
                tests = tests_for(m.module)
                if not tests:
                    m.outcome = "no tests mapped"
                    continue
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
