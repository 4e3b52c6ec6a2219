"""The package's structure: no import cycle among QWIT's modules, and the saga
rules import only data and rules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

QWIT = Path(__file__).resolve().parents[1] / "qwit"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(QWIT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: set[str], *, type_only: bool = False) -> set[str]:
    """QWIT modules ``path`` imports, at any depth of its code (a function's
    import is a cycle deferred, not avoided); under TYPE_CHECKING too if
    ``type_only``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def resolve(level: int, module: str | None) -> str:
        if level == 0:
            return module or ""
        base = package.split(".")
        base = base[: len(base) - (level - 1)]
        return ".".join([*base, module] if module else base)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node) and not type_only:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            target = resolve(node.level, node.module)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:
                    found.add(sub)  # `from . import temporal`
                elif target in modules:
                    found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return found


def import_graph(*, type_only: bool = False) -> dict[str, set[str]]:
    paths = {module_name(p): p for p in QWIT.rglob("*.py")}
    modules = set(paths)
    return {name: imports_of(path, modules, type_only=type_only) for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_no_import_cycle_among_qwit_modules():
    graph = import_graph()
    assert len(graph) > 20
    assert cycles(graph) == []


def test_no_import_cycle_even_through_imports_for_type_checking():
    # An engine is typed against what it uses of its client (EngineHost), a
    # PostgreSQL driver against what it uses of its worker (DriverHost):
    # no module names, even for its types only, a module that imports it.
    graph = import_graph(type_only=True)
    assert cycles(graph) == []
    assert "qwit._flow" in graph["qwit._engine"]  # type-only imports are read


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    graph["qwit._plan"] = {*graph["qwit._plan"], "qwit._saga"}  # _saga imports _plan
    assert any({"qwit._plan", "qwit._saga"} <= set(c) for c in cycles(graph))


def test_saga_imports_only_data_and_rules():
    code = "import sys, qwit._saga; print(' '.join(m for m in sys.modules if m.startswith('qwit')))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "qwit._saga" in out
    for heavy in ("qwit._runner", "qwit._flow", "qwit.temporal", "qwit._client", "qwit.local"):
        assert heavy not in out
    assert not any(m.startswith("temporalio") for m in out)


def test_import_qwit_then_every_public_name():
    code = "import qwit; [getattr(qwit, n) for n in qwit.__all__]; print(qwit.Flow.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "qwit"


def test_qwit_testing_is_reachable_after_a_plain_import_qwit():
    # (as the contract spells it: ``await qwit.testing.check_rollbacks(...)``)
    code = "import qwit; print(qwit.testing.check_rollbacks.__name__, 'testing' in dir(qwit))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["check_rollbacks", "True"]
