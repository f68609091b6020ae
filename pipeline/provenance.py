"""Where a run or a model came from: the git commit, branch and pull request, DVC's experiment and the
data's hash, as tags for MLflow."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml



def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def branch() -> str:
    """The branch being built: GitHub Actions' (a pull request's head branch), else git's; "" if none."""
    return (os.environ.get("GITHUB_HEAD_REF") or os.environ.get("GITHUB_REF_NAME")
            or _git("rev-parse", "--abbrev-ref", "HEAD").removesuffix("HEAD"))


def pull_request() -> str:
    """The pull request's number in a GitHub Actions pull_request job (refs/pull/<n>/merge), else ""."""
    match = re.fullmatch(r"refs/pull/(\d+)/merge", os.environ.get("GITHUB_REF", ""))
    return match.group(1) if match else ""


def dvc_managed(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """What DVC writes when it runs the pipeline: dvc.lock and every stage's outputs (a change to them
    is a result, not a change of the code)."""
    try:
        stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        stages = {}
    outs = [next(iter(o)) if isinstance(o, dict) else o for st in stages.values()
            for kind in ("outs", "metrics", "plots") for o in st.get(kind, [])]
    return ["dvc.lock", *outs]


def code_dirty() -> bool:
    """Uncommitted changes to the code, params or data pointers (not to what DVC writes)."""
    excluded = [f":(exclude){path}" for path in dvc_managed()]
    return bool(_git("status", "--porcelain", "--", ".", *excluded))


def git_tags() -> dict[str, str]:
    tags = {"git.commit": _git("rev-parse", "HEAD") or "none", "git.dirty": str(code_dirty()).lower(),
            "git.branch": branch(), "git.pull_request": pull_request()}
    return {k: v for k, v in tags.items() if v}


def changed_params(flat: dict) -> dict:
    """The params in `flat` ({"section.key": value}) that differ from the last commit's params.yaml:
    what this run tries. {} outside a git checkout or when nothing changed."""
    text = _git("show", "HEAD:params.yaml")
    try:
        committed = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return {}
    if not isinstance(committed, dict):
        return {}
    before = {f"{s}.{k}": v for s, values in committed.items() if isinstance(values, dict) for k, v in values.items()}
    return {k: v for k, v in flat.items() if k in before and not _same(before[k], v)}


def _same(committed, value) -> bool:
    if isinstance(value, float) and isinstance(committed, (int, float, str)) and not isinstance(committed, bool):
        try:
            return float(committed) == value  # YAML 1.1 reads `3e-4` as text
        except ValueError:
            return False
    return (list(committed) if isinstance(committed, (list, tuple)) else committed) == value


def dvc_exp_tags() -> dict[str, str]:
    """Inside `dvc exp run`: the experiment's name and baseline revision. Runs of one sweep share the
    baseline, and PIPELINE_SWEEP (set by `make sweep`) names the sweep itself."""
    tags = {"dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
            "dvc.exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV"),
            "sweep": os.environ.get("PIPELINE_SWEEP")}
    return {k: v for k, v in tags.items() if v}


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
