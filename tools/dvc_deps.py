"""`python -m tools.dvc_deps`: write each dvc.yaml stage's pipeline/ deps as exactly the modules its
`python -m pipeline.<stage>` imports, directly or not, at module level or inside functions.
tests/test_structure.py fails when dvc.yaml and the code disagree; this puts them back in line."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pipeline"


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


def stage_module(cmd: str) -> str | None:
    match = re.search(r"python -m (pipeline\.\w+)", cmd)
    return match.group(1) if match else None


def needed_files(module: str) -> list[str]:
    return sorted(m.replace(".", "/") + ".py" for m in closure(module, graph()))


def rewrite(text: str) -> str:
    """dvc.yaml's text with every stage's pipeline/ deps replaced by the needed ones (comments and
    other deps kept)."""
    stages = yaml.safe_load(text)["stages"]
    lines, out, stage, i = text.split("\n"), [], None, 0
    while i < len(lines):
        line = lines[i]
        match = re.match(r"^  (\w+):\s*$", line)
        if match and match.group(1) in stages:
            stage = match.group(1)
        out.append(line)
        i += 1
        module = stage_module(stages[stage]["cmd"]) if stage else None
        if line.strip() == "deps:" and module:
            others = []
            while i < len(lines) and lines[i].startswith("      - "):
                if not lines[i].strip().startswith("- pipeline/"):
                    others.append(lines[i])
                i += 1
            out += [f"      - {path}" for path in needed_files(module)] + others
    return "\n".join(out)


def main() -> int:
    path = ROOT / "dvc.yaml"
    text = path.read_text()
    new = rewrite(text)
    if new != text:
        path.write_text(new)
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
