"""The shape of the code base, checked from its source: module size, import cycles, and
method names kept inside the detectors' own modules (issue 14)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Top-level folders -> the package each becomes once installed (pyproject.toml package-dir).
PACKAGES = {"defectflow": "defectflow", "tasks": "defectflow.tasks", "flows": "defectflow.flows"}
MAX_LINES = 450
METHOD_NAMES = ("patchcore", "padim", "cutpaste", "classifier", "ensemble", "msflow",
                "segad_fusion")


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its source (also inside functions)."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from package import module` imports the module; `from module import name`,
            # the module (or the closest project module above it).
            candidates = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem
                          for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    # A package's __init__ importing its own submodules is how a package is built, not a
    # cycle: a submodule importing a sibling through the package resolves to the sibling.
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    return graph


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["defectflow.tasks.images"] = graph["defectflow.tasks.images"] | {
        "defectflow.flows.pipeline"}
    assert find_cycle(graph) is not None


@pytest.mark.parametrize("name,path", sorted(modules().items()))
def test_modules_are_short(name, path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES})"


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def method_name_literals(path: Path) -> list[str]:
    """``file:line: text`` of every string literal used as a name (not a docstring, not prose
    with spaces such as a help text) that holds a method's name."""
    pattern = re.compile(r"\b(" + "|".join(METHOD_NAMES) + r")\b")
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings and not re.search(r"\s", node.value)
                and pattern.search(node.value)):
            hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    return hits


def test_method_names_stay_in_the_methods_package():
    allowed = {ROOT / "tasks" / "params.py"}
    hits = []
    for folder in ("tasks", "flows", "defectflow", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            inside_methods = (ROOT / "tasks" / "methods") in path.parents
            if not inside_methods and path not in allowed:
                hits.extend(method_name_literals(path))
    assert not hits, "method names as string literals:\n" + "\n".join(hits)


def test_method_name_check_sees_literals(tmp_path):
    planted = ROOT / "tasks" / "_planted_for_test.py"
    planted.write_text('"""patchcore in a docstring is fine."""\nNAME = "padim"\n'
                       'LABEL = f"{1}-segad_fusion"\nHELP = "a patchcore model"\n')
    try:
        hits = method_name_literals(planted)
    finally:
        planted.unlink()
    assert [h.split(": ", 1)[1] for h in hits] == ["'padim'", "'-segad_fusion'"]
