"""A copy of this checkout as a fresh git repo: what `make bench` measures in and what the tests build
their DVC repos from, so both see what a clean clone would hold."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def copy_checkout(dest: Path, params_text: str, env: dict | None = None) -> None:
    """Copy the checkout's files to `dest` (tracked ones, and untracked ones git does not ignore: the
    next commit's; not tests/ nor dvc.lock, which the copy reproduces itself), with `params_text` as its
    params.yaml, and commit them in a new git repo on branch main."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for rel in files:
        if rel.startswith("tests/") or rel == "dvc.lock" or not (ROOT / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    (dest / "params.yaml").write_text(params_text)
    git = ["git", "-c", "user.name=pipeline", "-c", "user.email=pipeline@localhost", "-c", "commit.gpgsign=false"]
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "copy of the checkout"]):
        subprocess.run(git + cmd, cwd=dest, env=env, check=True, capture_output=True)
