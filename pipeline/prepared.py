"""The prepared tensor cache under data/prepared/, shared by prepare (writer), train, evaluate and the
benchmark (readers).

Per split: `<split>.npy`, uint8 images (N, C, H, W), and `<split>.csv` (file, label). Beside them
`classes.json` and `meta.json` (size, channels, train mean/std, per-file sha256 so a corrupted cache
is detected instead of silently used).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import PipelineError
from pipeline.io import read_json, sha256_file

PREPARED_DIR = Path("data/prepared")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, C, H, W), memory-mapped
    labels: np.ndarray  # int64 (N,)
    files: list[str]  # relative to data/raw


def meta_digest(meta: dict) -> str:
    """sha256 of meta.json's content without its own `meta_sha256` field."""
    rest = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def load_meta(folder: Path = PREPARED_DIR) -> dict:
    path = folder / "meta.json"
    if not path.exists():
        raise PipelineError(f"{path}: missing; run the prepare stage first (dvc repro prepare)")
    # Fix (tests/faults): meta.json holds the other files' sha256 but nothing checked meta.json
    # itself: an edited mean/std or image size was used silently, broken JSON was a traceback.
    try:
        meta = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: corrupted (not valid JSON: {e}); re-run the prepare stage "
                            "(dvc repro -f prepare)") from None
    if not isinstance(meta, dict) or meta.get("meta_sha256") != meta_digest(meta):
        raise PipelineError(f"{path}: missing or corrupted (its content does not match its meta_sha256); "
                            "re-run the prepare stage (dvc repro -f prepare)")
    return meta


def load_split(split: str, folder: Path = PREPARED_DIR, meta: dict | None = None, verify: bool = True) -> Split:
    """Memory-map one split; with `verify`, its files must match the sha256 recorded in meta.json."""
    meta = meta or load_meta(folder)
    npy, table = folder / f"{split}.npy", folder / f"{split}.csv"
    if verify:
        for path in (npy, table):
            expected = meta["splits"][split]["sha256"][path.name]
            if not path.exists() or sha256_file(path) != expected:
                raise PipelineError(f"{path}: missing or corrupted (sha256 differs from meta.json); "
                                    "re-run the prepare stage (dvc repro -f prepare)")
    images = np.load(npy, mmap_mode="r")
    with open(table, newline="") as f:
        rows = list(csv.reader(f))[1:]
    labels = np.array([int(r[1]) for r in rows], dtype=np.int64)
    if len(labels) != len(images):
        raise PipelineError(f"{table}: {len(labels)} rows but {npy} holds {len(images)} images")
    return Split(images=images, labels=labels, files=[r[0] for r in rows])
