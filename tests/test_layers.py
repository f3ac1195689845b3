"""The middle layer runs one way: no module of the package imports, even lazily, one that imports it back."""

from __future__ import annotations

import ast

from tests.conftest import ROOT


def imports_of(path) -> set[str]:
    """runner modules a file imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("runner.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "runner":
                found |= {f"runner.{a.name}" for a in node.names}
            elif node.module.startswith("runner."):
                found.add(node.module)
    return found


def graph() -> dict[str, set[str]]:
    modules = {f"runner.{p.stem}": p for p in (ROOT / "runner").glob("*.py") if p.stem != "__init__"}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_imports_have_no_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_run_object_is_a_leaf_that_the_middle_layer_imports():
    edges = graph()
    assert {"runner.job", "runner.cv", "runner.experiment"} <= {m for m, deps in edges.items() if "runner.spec" in deps}
    assert not edges["runner.spec"] & {"runner.job", "runner.cv", "runner.experiment", "runner.run", "runner.train"}
    assert "runner.job" not in edges["runner.cv"]  # the old job <-> cv circle


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
