"""Guards that keep the package's shape: no import circle, no upward arrow, no unexplained lazy import.

Everything here reads ``loopmoe/**/*.py`` with ``ast`` and ``tokenize``: nothing of the package (nor
torch) is imported, so the whole file runs in well under a second.

The graph has one node per module (a package is its ``__init__.py``) and one edge per import of a
``loopmoe`` module that runs: at module level or inside a function, absolute or relative. An import
under ``if TYPE_CHECKING:`` never runs and is left out. ``from loopmoe.x import y`` is an edge to the
submodule ``loopmoe.x.y`` where there is one, else to ``loopmoe.x``; ``import loopmoe.x.y`` is an edge
to ``loopmoe.x.y``. The packages a Python import initialises on the way (``loopmoe``, ``loopmoe.x``)
are not edges: every module would otherwise depend on the root package and everything it re-exports.
"""

from __future__ import annotations

import ast
import io
import itertools
import tokenize
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "loopmoe"

# Floors, lowest first. A module may import from its own floor or from a floor below, never above.
# Entries are paths under loopmoe/: "x.py" is one module, "x/" is a package with everything in it.
# Every module must be on a floor: a new one fails `test_every_module_is_on_a_floor` until placed.
FLOORS: list[tuple[str, str, list[str]]] = [
    (
        "ground",
        "Leaves and vocabulary: errors, file and text helpers, option fields, what loopmoe agrees to "
        "read, GPU spec sheets, the model config and its FLOP formulas. They import nothing of loopmoe "
        "but each other.",
        [
            "errors.py",
            "atomic.py",
            "paths.py",
            "text.py",
            "console.py",
            "options.py",
            "trust.py",
            "hardware.py",
            "config.py",
            "flops.py",
        ],
    ),
    (
        "model",
        "The network and what is counted from a config alone: the model (kernels included), parameter "
        "and compute budgets, the data pipeline. The root package re-exports the model and lives here.",
        ["__init__.py", "model/", "budget.py", "data/"],
    ),
    (
        "machinery",
        "What works on a model or across processes without running an experiment: capacity "
        "balancing, distributed setup and parallelisation, checkpoint conversion, evaluation, serving.",
        ["balance.py", "distributed/", "convert/", "evaluation/", "serving/"],
    ),
    (
        "runs",
        "Named starting points and the training run that uses them; test helpers shared with the "
        "test suite and the benches.",
        ["presets/", "training/", "testing/"],
    ),
    (
        "studies",
        "What plans or compares whole runs: the memory/time planner and the matched-budget comparison.",
        ["planning/", "compare/"],
    ),
    (
        "cli",
        "The command line, on top of everything.",
        ["cli/", "__main__.py"],
    ),
]


@dataclass(frozen=True)
class Import:
    """One import of a loopmoe module, as it appears in a file."""

    source: str  # importing module
    target: str  # imported module
    path: Path
    line: int
    end_line: int
    function_local: bool  # inside a def (at any depth), so it runs when the function is called
    node: ast.stmt

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_statements(tree: ast.Module):
    """(statement, inside a function) for every import that runs: ``if TYPE_CHECKING:`` bodies skipped."""

    def walk(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.orelse:  # the `else:` of `if TYPE_CHECKING:` does run
                    yield from walk_one(stmt, in_function)
                continue
            yield from walk_one(child, in_function)

    def walk_one(node: ast.AST, in_function: bool):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        else:
            yield from walk(node, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))

    yield from walk(tree, False)


def _resolve(stmt: ast.Import | ast.ImportFrom, source: str, path: Path) -> list[str]:
    """The loopmoe modules one import statement names (see the module docstring)."""
    known = modules()

    def nearest(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name if name.startswith("loopmoe") else None

    targets: list[str | None] = []
    if isinstance(stmt, ast.Import):
        targets = [nearest(a.name) for a in stmt.names if a.name == "loopmoe" or a.name.startswith("loopmoe.")]
    else:
        if stmt.level:
            package = source if path.name == "__init__.py" else source.rpartition(".")[0]
            for _ in range(stmt.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{stmt.module}" if stmt.module else package
        elif stmt.module and (stmt.module == "loopmoe" or stmt.module.startswith("loopmoe.")):
            base = stmt.module
        else:
            return []
        for alias in stmt.names:
            sub = f"{base}.{alias.name}"
            targets.append(sub if sub in known else nearest(base))
    return [t for t in dict.fromkeys(targets) if t is not None and t != source]


@cache
def imports() -> tuple[Import, ...]:
    found = []
    for source, path in modules().items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for stmt, local in _import_statements(tree):
            for target in _resolve(stmt, source, path):
                found.append(Import(source, target, path, stmt.lineno, stmt.end_lineno or stmt.lineno, local, stmt))
    return tuple(found)


def graph() -> dict[str, dict[str, Import]]:
    """source -> target -> the first import that makes the edge."""
    edges: dict[str, dict[str, Import]] = {m: {} for m in modules()}
    for imp in imports():
        edges[imp.source].setdefault(imp.target, imp)
    return edges


def strongly_connected(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's components with more than one module (iterative, sorted for stable messages)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def cycle_through(start: str, component: list[str], edges: dict[str, dict[str, Import]]) -> list[str]:
    """A shortest path start -> ... -> start inside one component (breadth first)."""
    members = set(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(edges[node]):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"{start} is in a component but on no cycle")


def describe_cycle(path: list[str], edges: dict[str, dict[str, Import]]) -> str:
    steps = [f"{a} -> {b} ({edges[a][b].where})" for a, b in itertools.pairwise(path)]
    return "\n    ".join(steps)


def test_the_import_graph_has_no_cycle():
    edges = graph()
    assert sum(len(t) for t in edges.values()) > 50, "the graph builder found almost no imports: it is broken"
    components = strongly_connected(edges)
    messages = []
    for component in components:
        path = cycle_through(component[0], component, edges)
        messages.append(
            f"circle of {len(component)} modules ({', '.join(component)}), for example:\n    "
            + describe_cycle(path, edges)
        )
    assert not components, f"{len(components)} import circle(s) in loopmoe:\n" + "\n".join(messages)


# ------------------------------------------------------------------------------------------------
# lazy imports carry their reason


@cache
def _comment_lines(path: Path) -> dict[int, bool]:
    """line -> True where the line is only a comment, False where code ends in a comment."""
    text = path.read_text()
    comments = {}
    code_lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = True
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            for line in range(tok.start[0], tok.end[0] + 1):
                code_lines.add(line)
    return {line: line not in code_lines for line in comments}


def _has_reason(imp: Import, import_lines: set[int]) -> bool:
    """A comment on a line of the statement, or on the line above it; a comment above a run of
    consecutive imports covers the whole run."""
    comments = _comment_lines(imp.path)
    if any(line in comments for line in range(imp.line, imp.end_line + 1)):
        return True
    line = imp.line - 1
    while line in import_lines:  # climb over the imports just above this one
        line -= 1
    return comments.get(line) is True


def test_each_function_local_import_says_why_it_is_lazy():
    lazy = [imp for imp in imports() if imp.function_local]
    assert lazy, "no function-local import found at all: the scanner is broken"
    lines_of_imports: dict[Path, set[int]] = {}
    for path in modules().values():
        tree = ast.parse(path.read_text())
        lines = lines_of_imports.setdefault(path, set())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    offenders = sorted(
        {imp.where: imp for imp in lazy if not _has_reason(imp, lines_of_imports[imp.path])}.values(),
        key=lambda imp: (str(imp.path), imp.line),
    )
    assert not offenders, (
        f"{len(offenders)} of {len(lazy)} function-local loopmoe imports say nowhere why they are lazy "
        "(a comment on the import's line or the line above: the circle it breaks, or the heavy import "
        "it defers):\n" + "\n".join(f"  {imp.where}: {ast.unparse(imp.node)}" for imp in offenders)
    )


# ------------------------------------------------------------------------------------------------
# layers


def floor_of(module: str) -> int | None:
    rel = modules()[module].relative_to(PACKAGE).as_posix()
    for level, (_, _, entries) in enumerate(FLOORS):
        for entry in entries:
            if rel == entry or (entry.endswith("/") and rel.startswith(entry)):
                return level
    return None


def test_every_module_is_on_a_floor():
    listed = [entry for _, _, entries in FLOORS for entry in entries]
    assert len(listed) == len(set(listed)), "an entry is on two floors"
    unplaced = [m for m in modules() if floor_of(m) is None]
    assert not unplaced, f"modules on no floor of FLOORS in {Path(__file__).name}: {unplaced}"


def upward(found: tuple[Import, ...] | list[Import]) -> list[str]:
    """One line per import that reaches a floor above its module's."""
    lines = []
    for imp in found:
        src, dst = floor_of(imp.source), floor_of(imp.target)
        if src is not None and dst is not None and dst > src:
            lines.append(
                f"  {imp.where}: {imp.source} ({FLOORS[src][0]}) -> {imp.target} ({FLOORS[dst][0]})"
                + (" [function-local]" if imp.function_local else "")
            )
    return lines


def test_no_module_imports_from_a_floor_above():
    offenders = upward(imports())
    floors = [name for name, _, _ in FLOORS]
    assert not offenders, f"{len(offenders)} upward import(s), floors {floors}:\n" + "\n".join(offenders)


def test_the_scanner_reads_each_kind_of_import(tmp_path):
    """The resolver on known statements of the real package (a broken resolver would pass every guard)."""
    known = modules()
    assert "loopmoe.model" in known and "loopmoe.config" in known and "loopmoe.model.moe" in known
    init = known["loopmoe.model"]

    def resolve(code: str, source: str, path: Path) -> list[str]:
        return _resolve(ast.parse(code).body[0], source, path)  # type: ignore[arg-type]

    moe = known["loopmoe.model.moe"]
    assert resolve("from loopmoe.config import LoopMoEConfig", "loopmoe.model.moe", moe) == ["loopmoe.config"]
    assert resolve("from loopmoe.model import moe", "loopmoe.cli.main", moe) == ["loopmoe.model.moe"]
    assert resolve("import loopmoe.model.moe", "loopmoe.cli.main", moe) == ["loopmoe.model.moe"]
    assert resolve("from .moe import SparseMoE", "loopmoe.model", init) == ["loopmoe.model.moe"]
    assert resolve("from . import moe", "loopmoe.model", init) == ["loopmoe.model.moe"]
    assert resolve("from ..config import X", "loopmoe.model.moe", moe) == ["loopmoe.config"]
    assert resolve("from .kernels.experts import ops", "loopmoe.model.moe", moe) == ["loopmoe.model.kernels.experts"]
    assert resolve("import torch", "loopmoe.model.moe", moe) == []

    tree = ast.parse(
        "import loopmoe.a\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import loopmoe.b\nelse:\n    import loopmoe.c\n"
        "def f():\n    if True:\n        import loopmoe.d\n"
        "class K:\n    def g(self):\n        import loopmoe.e\n"
    )
    found = [(ast.unparse(s), local) for s, local in _import_statements(tree)]
    assert found == [
        ("import loopmoe.a", False),
        ("from typing import TYPE_CHECKING", False),
        ("import loopmoe.c", False),
        ("import loopmoe.d", True),
        ("import loopmoe.e", True),
    ]

    edges = {"a": {"b": None}, "b": {"c": None}, "c": {"a": None}, "d": {"a": None}}
    assert strongly_connected(edges) == [["a", "b", "c"]]  # type: ignore[arg-type]
    assert cycle_through("a", ["a", "b", "c"], edges) == ["a", "b", "c", "a"]  # type: ignore[arg-type]

    known_path = known["loopmoe.config"]
    planted = Import("loopmoe.config", "loopmoe.cli.main", known_path, 1, 1, True, ast.parse("import x").body[0])
    assert upward([planted]) == [
        "  loopmoe/config.py:1: loopmoe.config (ground) -> loopmoe.cli.main (cli) [function-local]"
    ]

    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f():\n    # why\n    import a\n    import b\n\n    import c  # why\n    x = 1\n    import d\n"
    )
    comments = _comment_lines(sample)
    assert comments == {2: True, 6: False}
    stmts = [s for s, _ in _import_statements(ast.parse(sample.read_text()))]
    reasons = [
        _has_reason(Import("m", "n", sample, s.lineno, s.end_lineno or s.lineno, True, s), {3, 4, 6, 8}) for s in stmts
    ]
    assert reasons == [True, True, True, False]  # d: code (x = 1) stands between it and any comment
