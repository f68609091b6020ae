"""All four stages through DVC, for MLproject's `main` entry point.

No overrides: `dvc repro`, then `python -m pipeline.promote`, as `make repro`. With
`--section.key value` overrides (from `mlflow run -P`): a DVC experiment,
`dvc exp run -S section.key=value ...`, so params.yaml in the workspace is the one the stages read
and dvc.lock records what ran; an experiment is not promoted.
"""

from __future__ import annotations

import subprocess
import sys

from pipeline.cli import parse_overrides
from pipeline.errors import PipelineError


def command(argv: list[str]) -> list[str]:
    overrides = parse_overrides(argv)
    if not overrides:
        return ["dvc", "repro"]
    return ["dvc", "exp", "run", *(a for k, v in overrides.items() for a in ("-S", f"{k}={v}"))]


def main(argv: list[str] | None = None) -> int:
    try:
        cmd = command(sys.argv[1:] if argv is None else argv)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("+", " ".join(cmd), flush=True)
    code = subprocess.call(cmd)
    if code == 0 and cmd == ["dvc", "repro"]:
        promote = [sys.executable, "-m", "pipeline.promote"]
        print("+", " ".join(promote[1:]), flush=True)
        code = subprocess.call(promote)
    return code


if __name__ == "__main__":
    sys.exit(main())
