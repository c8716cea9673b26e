"""The package's shape, read from its source: core/ imports nothing outward, no module imports
another's private names, and the imports between distinf's modules form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distinf"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def imports() -> dict[str, list[tuple[str, list[str]]]]:
    """{module: [(imported distinf module, names taken from it)]}, at module level or in functions."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        entries = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distinf"):
                entries.append((node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                entries += [(a.name, []) for a in node.names if a.name.startswith("distinf")]
        found[module_name(path)] = entries
    return found


def resolved(target: str, name: str, modules: set[str]) -> str:
    """`from target import name`: the module `name` is, if it is one, else `target`."""
    return f"{target}.{name}" if f"{target}.{name}" in modules else target


def test_core_imports_nothing_outside_core():
    outward = [(m, t) for m, entries in imports().items() if m.startswith("distinf.core")
               for t, _ in entries if not t.startswith("distinf.core")]
    assert outward == []


def test_no_module_imports_another_modules_private_names():
    modules = set(imports())
    private = [(m, t, n) for m, entries in imports().items() for t, names in entries for n in names
               if n.startswith("_") and resolved(t, n, modules) != m]
    assert private == []


def test_the_imports_between_modules_form_no_cycle():
    found = imports()
    modules = set(found)
    graph = {m: {resolved(t, n, modules) for t, names in entries for n in (names or [""])} & modules - {m}
             for m, entries in found.items()}
    # a package's __init__ re-exports its modules: an edge into the package is not a cycle through it
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    state, cycles = {}, []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
