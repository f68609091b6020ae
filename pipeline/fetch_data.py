"""Stage fetch_data: data.source -> data/raw/ (class folders) and data/raw.json.

The new tree is built in a temp folder beside data/raw and renamed into place at the end, so any
failure leaves the previous data/raw/ as it was.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from pipeline import sources
from pipeline.cli import run_stage
from pipeline.config import Params
from pipeline.io import atomic_path, remove, sha256_file, write_json
from pipeline.paths import RAW_DIR, RAW_JSON, SOURCES_DIR

log = logging.getLogger(__name__)


def tree_sha256(root: Path) -> str:
    """One digest of every file's relative path and content, for comparing trees across runs."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            h.update(f"{path.relative_to(root).as_posix()}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def fetch(params: Params, raw_dir: Path = RAW_DIR, raw_json: Path = RAW_JSON) -> dict:
    """Fetch data.source into `raw_dir` and describe it in `raw_json`; returns that description."""
    cfg = params.data
    if sources.source_kind(cfg.source) == "local" and not _inside(Path(cfg.source), SOURCES_DIR):
        log.warning("data.source %s is outside %s/, so DVC cannot see changes to it: put it there "
                    "(or `dvc add` it there) to re-run fetch_data when it changes", cfg.source, SOURCES_DIR)
    with atomic_path(raw_dir, directory=True) as tmp:
        work = tmp / ".incoming"
        work.mkdir()
        info = sources.materialize(cfg, work)
        counts = sources.arrange(work, tmp)
        remove(work)
        info["layout"] = "classes" if "all" in counts else "train_test"
        info["content_sha256"] = tree_sha256(tmp)
        info["counts"] = counts
        info["images"] = {split: sum(c.values()) for split, c in counts.items()}
    write_json(raw_json, info)
    return info


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def main(params: Params) -> None:
    info = fetch(params)
    log.info("fetched %s: %s images in %s classes (%s layout) -> %s",
             info["source"], sum(info["images"].values()),
             len(next(iter(info["counts"].values()))), info["layout"], RAW_DIR)


if __name__ == "__main__":
    run_stage(main)
