"""The layout's rules (issue 20), read from the source: no import circle among the modules of
devicemem and bayesDREAM_ext, no import of bayesDREAM_ext from devicemem (names that moved are
reached lazily, through devicemem/integrations/moved.py), and no bayesDREAM names in devicemem
outside devicemem/integrations/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("devicemem", "bayesDREAM_ext")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports() -> dict[str, set[str]]:
    """Every import statement (in functions and TYPE_CHECKING blocks too) as module -> module."""
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            else:
                continue
            graph[name] |= {target for target in map(owner, targets) if target and target != name}
    return graph


def test_no_module_imports_itself_through_others():
    graph = _imports()

    def reaches(start: str, goal: str) -> bool:
        seen, stack = set(), list(graph[start])
        while stack:
            name = stack.pop()
            if name == goal:
                return True
            if name not in seen:
                seen.add(name)
                stack.extend(graph[name])
        return False

    circles = sorted(name for name in graph if reaches(name, name))
    assert circles == []


def test_devicemem_imports_nothing_of_bayesdream_ext():
    arrows = sorted((a, b) for a, targets in _imports().items() for b in targets
                    if a.startswith("devicemem") and b.startswith("bayesDREAM_ext"))
    assert arrows == []


@pytest.mark.parametrize("word", ["technical", "ntc", "cis", "trans"])
def test_devicemem_holds_no_bayesdream_names_outside_integrations(word):
    pattern = re.compile(rf"\b{word}\b", re.IGNORECASE)
    hits = [f"{path.relative_to(ROOT)}:{number}" for name, path in _modules().items()
            if name.startswith("devicemem") and not name.startswith("devicemem.integrations")
            for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
