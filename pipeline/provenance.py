"""Where a run came from: the git commit, DVC's experiment and the data's hash, as tags for MLflow."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml


def dvc_exp_tags() -> dict[str, str]:
    """Inside `dvc exp run`: the experiment's name and baseline revision. Runs of one sweep share the
    baseline, and PIPELINE_SWEEP (set by `make sweep`) names the sweep itself."""
    tags = {"dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
            "dvc.exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV"),
            "sweep": os.environ.get("PIPELINE_SWEEP")}
    return {k: v for k, v in tags.items() if v}


def git_tags() -> dict[str, str]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "HEAD")
    return {"git.commit": commit or "none", "git.dirty": str(bool(git("status", "--porcelain"))).lower()}


def dvc_out_hash(path: str, lock: Path = Path("dvc.lock")) -> str:
    """The md5 DVC recorded in dvc.lock for output `path` (e.g. data/prepared), or "" if none."""
    if not lock.exists():
        return ""
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") == path:
                return out.get("md5", "")
    return ""
