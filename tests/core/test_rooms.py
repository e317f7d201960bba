"""The house's rooms, read from the source: ``ingest_core`` at the bottom imports no other
room; ``ingest_server``, ``loader`` and ``push_agent`` stand beside each other and import
neither each other nor ``ingestctl``; and no module imports itself back through others, not
even inside one room (a function-level import counts; one under ``TYPE_CHECKING`` does not).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOMS = ("ingest_core", "ingest_server", "loader", "push_agent", "ingestctl")
SIDE_BY_SIDE = ("ingest_server", "loader", "push_agent")


def _modules() -> dict[str, Path]:
    modules = {}
    for room in ROOMS:
        for path in (REPO / room).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports when it runs (any nesting level)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_rooms_import_only_downwards(graph: dict[str, set[str]]) -> None:
    wrong = []
    for module, targets in graph.items():
        room = module.split(".")[0]
        for target in sorted(targets):
            other = target.split(".")[0]
            if other == room:
                continue
            if room == "ingest_core" or (room in SIDE_BY_SIDE and other != "ingest_core"):
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_no_import_circles(graph: dict[str, set[str]]) -> None:
    def reaches(start: str) -> set[str]:
        seen: set[str] = set()
        todo = list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        return seen

    circles = sorted(module for module in graph if module in reaches(module))
    assert circles == []


def test_the_check_sees_function_level_imports() -> None:
    """A function-level import is an edge (the spec <-> validate circle was one)."""
    modules = _modules()
    assert "loader.validate" in _imports(REPO / "loader" / "approval.py", modules)
    assert "ingest_server.server" in _imports(REPO / "ingestctl" / "serve.py", modules)
