"""`make retrain`: what CI runs when data, params or code change, and what runs the same way locally.

1. `dvc pull` when a DVC remote is configured (the raw data, prepared cache and model of the base);
2. `dvc repro` (re-runs exactly the stages downstream of what changed; nothing when nothing did);
3. a Markdown summary — `dvc metrics diff` and `dvc params diff` against RETRAIN_BASE (default
   HEAD: the last commit) and the promotion decision — written to reports/retrain_summary.md and
   appended to $GITHUB_STEP_SUMMARY when set;
4. `dvc push` when a remote is configured.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from pipeline.io import atomic_path, read_json

log = logging.getLogger("pipeline.retrain")

SUMMARY = Path("reports/retrain_summary.md")
PROMOTION = Path("reports/promotion.json")


def dvc(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    log.info("+ dvc %s", " ".join(args))
    return subprocess.run(["dvc", *args], check=True, text=True, capture_output=capture)


def has_remote() -> bool:
    return bool(dvc("remote", "list", capture=True).stdout.strip())


def _diff(kind: str, base: str) -> str:
    """`dvc metrics|params diff --md`, or a sentence when nothing changed: DVC then prints nothing, or
    (params) a table of its header and separator alone."""
    table = dvc(kind, "diff", base, "--md", capture=True).stdout.strip()
    return table if len(table.splitlines()) > 2 else f"No {kind.removesuffix('s')} changed."


def summary(base: str) -> str:
    """The job summary: metrics and params diffs against `base`, and the promotion decision."""
    metrics, params = _diff("metrics", base), _diff("params", base)
    lines = [f"## Retrain against `{base}`", "", "### Metrics", "", metrics, "", "### Params", "", params, "",
             "### Promotion", ""]
    if PROMOTION.exists():
        p = read_json(PROMOTION)
        verdict = "**promoted to @champion**" if p["promoted"] else "**not promoted**"
        lines.append(f"Model version {p['new_version']}: {verdict} — {p['reason']} "
                     f"({p['metric']}: new {p['new_score']:.4f}, champion "
                     f"{'none' if p['champion_score'] is None else format(p['champion_score'], '.4f')}).")
    else:
        lines.append("No promotion decision (evaluate did not run).")
    return "\n".join(lines) + "\n"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base = os.environ.get("RETRAIN_BASE") or "HEAD"
    remote = has_remote()
    try:
        if remote:
            dvc("pull", "--allow-missing")
        dvc("repro")
        text = summary(base)
        with atomic_path(SUMMARY) as tmp:
            tmp.write_text(text)
        if os.environ.get("GITHUB_STEP_SUMMARY"):
            with open(os.environ["GITHUB_STEP_SUMMARY"], "a") as f:
                f.write(text)
        print(text)
        if remote:
            dvc("push")
    except subprocess.CalledProcessError as e:
        log.error("error: %s exited %d", " ".join(e.cmd), e.returncode)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
