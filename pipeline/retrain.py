"""`make retrain`: what CI runs when data, params or code change, and what runs the same way locally.

1. `dvc pull --run-cache` when a DVC remote is configured: the base's data and the run cache, so
   stages that already ran with the same code, params and data (a pull request's CI run, before its
   merge to main) are restored instead of trained again;
2. `dvc repro --pull` (re-runs exactly the stages downstream of what changed, nothing when nothing
   did, and takes a stage's outputs from the remote where the run cache has them);
3. with `--promote` (CI on main only): `python -m pipeline.promote`, which moves `@champion`;
4. a Markdown summary — `dvc metrics diff` and `dvc params diff` against RETRAIN_BASE (default
   HEAD: the last commit), whether the model would become or became @champion — written to
   reports/retrain_summary.md and appended to $GITHUB_STEP_SUMMARY when set;
5. `dvc push --run-cache` when a remote is configured.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from pipeline.io import atomic_path, read_json
from pipeline.paths import CHAMPION_JSON, PROMOTION_JSON

log = logging.getLogger("pipeline.retrain")

SUMMARY = Path("reports/retrain_summary.md")


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


def promotion_lines() -> list[str]:
    """evaluate's assessment and, when promote ran for this model, where @champion went."""
    if not PROMOTION_JSON.exists():
        return ["No promotion decision (evaluate did not run)."]
    p = read_json(PROMOTION_JSON)
    champ = "none" if p["champion_score"] is None else format(p["champion_score"], ".4f")
    lines = [f"Model version {p['new_version']} {'would' if p['would_promote'] else 'would not'} become "
             f"@champion — {p['reason']} ({p['metric']}: new {p['new_score']:.4f}, champion {champ})."]
    if CHAMPION_JSON.exists():
        c = read_json(CHAMPION_JSON)
        if c["version"] == p["new_version"] and c["test_data_hash"] == p["test_data_hash"]:
            verdict = "**promoted to @champion**" if c["promoted"] else "**not promoted**"
            lines.append(f"Promotion of version {c['version']}: {verdict} — {c['reason']}.")
    return lines


def summary(base: str) -> str:
    """The job summary: metrics and params diffs against `base`, and the promotion decision."""
    metrics, params = _diff("metrics", base), _diff("params", base)
    lines = [f"## Retrain against `{base}`", "", "### Metrics", "", metrics, "", "### Params", "", params, "",
             "### Promotion", "", *promotion_lines()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.retrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--promote", action="store_true", help="move @champion too (CI: on main only)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base = os.environ.get("RETRAIN_BASE") or "HEAD"
    remote = has_remote()
    try:
        if remote:
            dvc("pull", "--run-cache", "--allow-missing")
            try:  # the diff base's metrics; without them the diff shows only the new values
                dvc("fetch", "--all-commits", "--type", "metrics", capture=True)
            except subprocess.CalledProcessError as e:
                log.warning("could not fetch every commit's metrics: %s", (e.stderr or "").strip()[-300:])
        dvc("repro", *(["--pull"] if remote else []))  # --pull: the outputs of a run-cache hit, too
        if args.promote:
            subprocess.run([sys.executable, "-m", "pipeline.promote"], check=True)
        text = summary(base)
        with atomic_path(SUMMARY) as tmp:
            tmp.write_text(text)
        if os.environ.get("GITHUB_STEP_SUMMARY"):
            with open(os.environ["GITHUB_STEP_SUMMARY"], "a") as f:
                f.write(text)
        print(text)
        if remote:
            dvc("push", "--run-cache")
    except subprocess.CalledProcessError as e:
        log.error("error: %s exited %d", " ".join(e.cmd), e.returncode)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
