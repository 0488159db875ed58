"""The package's imports flow one way: no module imports itself back through others, not even from
inside a function (a late import that only dodges a circle is still a circle), and no module
imports the package root. Read from the source with ``ast``, so every import counts, whether it
runs at import time, inside a function or under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from pathlib import Path

import med3dvlm

PACKAGE = Path(med3dvlm.__file__).resolve().parent
ROOT = "med3dvlm"


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module and package of med3dvlm."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = (ROOT, *path.relative_to(PACKAGE).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The med3dvlm modules that ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            # "from pkg import sub" imports the submodule sub; "from mod import name" imports mod
            out |= {f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names}
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def part(name: str, packages: set[str]) -> str:
    """The top-level module or subpackage (med3dvlm.train, med3dvlm.eval, ...) a module belongs to."""
    top = ".".join(name.split(".")[:2])
    return top if top in packages or top == name else name


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_sees_local_relative_and_package_imports():
    edges = graph()
    assert "med3dvlm.pipeline" in edges[ROOT]  # function-local, in med3dvlm.load
    assert "med3dvlm.prompts" in edges["med3dvlm.pipeline"]  # "from . import prompts"
    assert "med3dvlm.checkpoints" in edges["med3dvlm.models.vlm"]  # absolute
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_itself_through_others():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_circle_between_subpackages_and_nothing_imports_the_root():
    edges = graph()
    packages = {name for name, path in modules().items() if path.name == "__init__.py"}
    parts: dict[str, set[str]] = {}
    for name, targets in edges.items():
        parts.setdefault(part(name, packages), set()).update(part(t, packages) for t in targets)
    for name, targets in parts.items():
        targets.discard(name)
    cycle = find_cycle(parts)
    assert cycle is None, "circle between parts of the package: " + " -> ".join(cycle)
    assert "med3dvlm.train" not in parts["med3dvlm.eval"]  # evaluation runs without the training code
    upward = sorted(name for name, targets in edges.items() if ROOT in targets)
    assert upward == [], f"these import the package root (take __version__ from med3dvlm._version): {upward}"
