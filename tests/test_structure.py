"""The code's shape, derived from the code itself: no import cycles in pipeline/, each DVC stage depends
on exactly the pipeline/ modules it runs (so a code change retrains what it should), and no test module
imports another."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from helpers.project import REPO

PACKAGE = REPO / "pipeline"


def imported_modules(path: Path) -> set[str]:
    """pipeline.* modules that `path` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            if node.module == "pipeline":  # from pipeline import x, y
                out |= {f"pipeline.{a.name}" for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pipeline.")}
    return out


def graph() -> dict[str, set[str]]:
    return {f"pipeline.{p.stem}": imported_modules(p) - {f"pipeline.{p.stem}"} for p in PACKAGE.glob("*.py")}


def closure(module: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += edges.get(m, ())
    return seen


def test_pipeline_has_no_import_cycle():
    edges = graph()
    cycles = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if a in closure(b, edges) and a < b)
    assert cycles == []


def test_a_cycle_would_be_found():
    edges = {"pipeline.a": {"pipeline.b"}, "pipeline.b": {"pipeline.c"}, "pipeline.c": {"pipeline.a"}}
    assert "pipeline.a" in closure("pipeline.c", edges) and "pipeline.c" in closure("pipeline.a", edges)


def test_the_shipped_package_imports_neither_tools_nor_tests():
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any(n.split(".")[0] in ("tools", "tests", "helpers") for n in names), (path.name, names)


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_depends_on_exactly_the_modules_it_runs(stage):
    spec = STAGES[stage]
    module = re.search(r"python -m (pipeline\.\w+)", spec["cmd"]).group(1)
    needed = {m.replace(".", "/") + ".py" for m in closure(module, graph())}
    deps = {d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])}
    listed = {d for d in deps if d.startswith("pipeline/")}
    assert sorted(needed - listed) == [], f"{stage}: a change to these would not re-run it"
    assert sorted(listed - needed) == [], f"{stage}: these re-run it for nothing (or no longer exist)"


def test_no_test_module_imports_another():
    for path in (REPO / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not [n for n in names if n.split(".")[-1].startswith("test_") or n.endswith("conftest")], path
