"""The package's layout rules, checked on its source: no import cycles (imports inside functions count too),
and production code imports nothing that exists for tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pqc_kv_cache

PACKAGE = Path(pqc_kv_cache.__file__).parent
# modules that exist for tests and references only
TEST_ONLY = {"pqc_kv_cache.backends.kernel_shim"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every package module ``path`` imports, at any depth of the file (functions and TYPE_CHECKING too)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = base[:len(base) - (node.level - 1)]
                mod = ".".join(root + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    files = {(_module_name(p)): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    # a package's __init__ is not an edge of its own submodules' imports of siblings
    return {name: {t for t in _imports(p, name, known) if not name.startswith(t + ".")} for name, p in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def test_the_package_has_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_production_code_imports_nothing_that_exists_for_tests():
    graph = _graph()
    offenders = {n: sorted(graph[n] & TEST_ONLY) for n in graph if n not in TEST_ONLY and graph[n] & TEST_ONLY}
    assert offenders == {}


MAX_LINES = 600


def test_no_module_of_the_package_is_over_600_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}, f"split these by concern: {long}"
