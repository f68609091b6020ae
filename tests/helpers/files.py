"""Comparing trees before and after: what a failed stage must leave exactly as it was."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from helpers.project import Project


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256 of content} of every file under `root` (symlinks as their target), to
    prove a failed stage left a tree exactly as it was."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def raw_state(project: Project) -> tuple[dict[str, str], bytes]:
    """data/raw's tree and data/raw.json's bytes: what a failed fetch_data must leave untouched."""
    return snapshot(project.path("data/raw")), project.path("data/raw.json").read_bytes()


def leftovers(*folders: Path) -> list[str]:
    """Temp or old copies (`.<name>.tmp-*`, `.<name>.old-*`) a writer left in `folders`."""
    return sorted(str(p) for f in folders if f.is_dir() for p in f.glob(".*") if re.search(r"\.(tmp|old)-", p.name))
