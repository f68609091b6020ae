"""A small disk for a project: its data/ folder on a tmpfs of a given size, in a mount namespace of
its own (`unshare`), so a stage meets a full disk for real and nothing else on the machine does."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from helpers.project import Project

# Inside the namespace: data/ is copied aside, a tmpfs mounted over it, the copy put back; the
# command runs; what data/ then holds is copied out to $AFTER (the tmpfs vanishes with the namespace).
_SCRIPT = """
set -e
cp -a data/. "$STAGE/"
mount -t tmpfs -o size="$SIZE" tmpfs data
cp -a "$STAGE/." data/
set +e
"$@"
rc=$?
cp -a data/. "$AFTER/"
exit $rc
"""


def can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, check=False)
    return probe.returncode == 0


def run_on_small_disk(project: Project, size: int, work: Path, *cmd: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Run `cmd` in `project` with its data/ on a `size`-byte tmpfs holding a copy of data/; returns
    the process and a folder holding what data/ held when it ended. Skips where mount namespaces
    are not allowed (some containers)."""
    if not can_mount():
        pytest.skip("unshare -rm cannot mount a tmpfs here")
    stage, after = work / "stage", work / "after"
    stage.mkdir(parents=True)
    after.mkdir(parents=True)
    env = {**project.env(), "STAGE": str(stage), "AFTER": str(after), "SIZE": str(size)}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", _SCRIPT, "sh", *cmd], cwd=project.root, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    return proc, after
