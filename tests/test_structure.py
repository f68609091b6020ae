"""The code's shape, derived from the code itself: no import cycles in pipeline/, each DVC stage depends
on exactly the pipeline/ modules it runs (so a code change retrains what it should), and no test module
imports another; the modules conftest runs first exist."""

from __future__ import annotations

import ast

import pytest
import yaml

from helpers.project import REPO
from tools.dvc_deps import closure, graph, needed_files, stage_module

PACKAGE = REPO / "pipeline"


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
    needed = set(needed_files(stage_module(spec["cmd"])))
    deps = {d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])}
    listed = {d for d in deps if d.startswith("pipeline/")}
    assert sorted(needed - listed) == [], f"{stage}: a change to these would not re-run it (python -m tools.dvc_deps)"
    assert sorted(listed - needed) == [], f"{stage}: these re-run it for nothing, or are gone (python -m tools.dvc_deps)"


def test_no_test_module_imports_another():
    for path in (REPO / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not [n for n in names if n.split(".")[-1].startswith("test_") or n.endswith("conftest")], path


def test_the_longest_modules_conftest_runs_first_exist():
    tree = ast.parse((REPO / "tests/conftest.py").read_text())
    (names,) = [ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "LONGEST_MODULES" for t in node.targets)]
    assert names and [m for m in names if not (REPO / "tests" / m).is_file()] == []
