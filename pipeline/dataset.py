"""The prepared data set under data/prepared/: written by prepare, read by train, evaluate and the
benchmark.

Per split: `<split>.npy`, uint8 images (N, C, H, W), and `<split>.csv` (file, label). Beside them
`classes.json` and `meta.json` (DatasetMeta: size, channels, train mean/std, and each file's sha256,
so a corrupted cache is detected instead of silently used).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.io import read_json, recover, sha256_file, write_json
from pipeline.paths import PREPARED_DIR

SPLITS = ("train", "val", "test")
_REPREPARE = "re-run the prepare stage (dvc repro -f prepare)"


@dataclass(frozen=True)
class SplitFiles:
    count: int  # images
    sha256: dict[str, str]  # file name -> sha256 of its content


@dataclass(frozen=True)
class DatasetMeta:
    """meta.json: what every reader of the prepared data needs to know about it."""

    image_size: int
    channels: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, of the train split, in 0..1 units
    std: tuple[float, ...]
    source: str | None  # data.source as recorded by fetch_data (credentials redacted)
    raw_sha256: str | None  # digest of data/raw's tree
    splits: dict[str, SplitFiles]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["classes"], out["mean"], out["std"] = list(self.classes), list(self.mean), list(self.std)
        return out

    @classmethod
    def from_json(cls, raw: dict) -> "DatasetMeta":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in fields}
        values["classes"], values["mean"], values["std"] = (tuple(raw[k]) for k in ("classes", "mean", "std"))
        values["splits"] = {name: SplitFiles(**files) for name, files in raw["splits"].items()}
        return cls(**values)

    def split_digest(self, *names: str) -> str:
        """sha256 over the files of the given splits (all when none): identifies their content."""
        h = hashlib.sha256()
        for name in names or sorted(self.splits):
            files = self.splits[name].sha256
            h.update("".join(files[k] for k in sorted(files)).encode())
        return h.hexdigest()


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, C, H, W), memory-mapped
    labels: np.ndarray  # int64 (N,)
    files: list[str]  # relative to data/raw


def meta_digest(meta: dict) -> str:
    """sha256 of meta.json's content without its own `meta_sha256` field."""
    rest = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def write_meta(folder: Path, meta: DatasetMeta) -> None:
    raw = meta.to_json()
    raw["meta_sha256"] = meta_digest(raw)
    write_json(folder / "meta.json", raw)


def load_meta(folder: Path = PREPARED_DIR) -> DatasetMeta:
    """meta.json, after checking it against its own digest: an edited mean/std or image size would
    otherwise be used silently."""
    recover(folder)  # a prepare killed mid-swap left the previous folder aside
    path = folder / "meta.json"
    if not path.exists():
        raise PipelineError(f"{path}: missing; run the prepare stage first (dvc repro prepare)")
    try:
        raw = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: corrupted (not valid JSON: {e}); {_REPREPARE}") from None
    if not isinstance(raw, dict) or raw.get("meta_sha256") != meta_digest(raw):
        raise PipelineError(f"{path}: missing or corrupted (its content does not match its meta_sha256); "
                            f"{_REPREPARE}")
    return DatasetMeta.from_json(raw)


def load_split(split: str, folder: Path = PREPARED_DIR, meta: DatasetMeta | None = None,
               verify: bool = True) -> Split:
    """Memory-map one split; with `verify`, its files must match the sha256 recorded in meta.json."""
    meta = meta or load_meta(folder)
    npy, table = folder / f"{split}.npy", folder / f"{split}.csv"
    if verify:
        for path in (npy, table):
            expected = meta.splits[split].sha256[path.name]
            if not path.exists() or sha256_file(path) != expected:
                raise PipelineError(f"{path}: missing or corrupted (sha256 differs from meta.json); {_REPREPARE}")
    images = np.load(npy, mmap_mode="r")
    with open(table, newline="") as f:
        rows = list(csv.reader(f))[1:]
    labels = np.array([int(r[1]) for r in rows], dtype=np.int64)
    if len(labels) != len(images):
        raise PipelineError(f"{table}: {len(labels)} rows but {npy} holds {len(images)} images")
    return Split(images=images, labels=labels, files=[r[0] for r in rows])
