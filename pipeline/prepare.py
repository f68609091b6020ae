"""Stage prepare: data/raw/ -> data/prepared/ (uint8 tensor cache), reports/data.json.

Every image is decoded once, straight into a memory-mapped array, so memory stays at the size of the
output however many images there are. Unusable files are quarantined with a reason, never fatal;
a class left with too few images is.
"""

from __future__ import annotations

import csv
import logging
import multiprocessing
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from pipeline.cli import progress, run_stage
from pipeline.config import Params, Prepare
from pipeline.dataset import DatasetMeta, SplitFiles, write_meta
from pipeline.errors import PipelineError
from pipeline.images import decode_or_reason
from pipeline.io import atomic_path, is_hidden, read_json, recover, remove, require_free, sha256_file, write_json
from pipeline.paths import DATA_REPORT, PREPARED_DIR, RAW_DIR, RAW_JSON

log = logging.getLogger(__name__)

# Images are copied or summed a chunk of bytes at a time (not of rows: 4096 rows of 224 px RGB as
# float64 are 4.9 GB), so that memory stays bounded for any number and size of images.
CHUNK_BYTES = 32 * 2**20


def chunk_rows(images: np.ndarray, itemsize: int) -> int:
    """Rows of `images` per chunk, for a working copy of `itemsize` bytes per value."""
    return max(1, CHUNK_BYTES // (itemsize * int(np.prod(images.shape[1:]))))


def list_images(raw_dir: Path, layout: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Classes (sorted, from train) and (split, class, relative path) for every visible file.

    Split is "train", "test" or "all" (no test split in the source). Hidden folders are skipped and
    symlinked folders are not followed (a symlink loop cannot trap the walk).
    """
    splits = {"all": raw_dir} if layout == "classes" else {s: raw_dir / s for s in ("train", "test")}
    items = []
    folders = set()
    for split, folder in splits.items():
        if not folder.is_dir():
            continue
        for cls in sorted(p.name for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name)):
            if split in ("train", "all"):
                folders.add(cls)
            for dirpath, dirnames, filenames in os.walk(folder / cls):
                dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
                for name in sorted(filenames):
                    if not is_hidden(name):
                        rel = Path(dirpath, name).relative_to(raw_dir).as_posix()
                        items.append((split, cls, rel))
    # Classes are the class folders, not the classes that have files: an empty class folder must
    # reach check_class_counts, which refuses it by name, instead of silently vanishing.
    classes = sorted(folders)
    return classes, items


def check_class_counts(counts: dict[str, int], minimum: int, when: str) -> None:
    short = {c: n for c, n in counts.items() if n < minimum}
    if short:
        listed = ", ".join(f"{c!r} ({n})" for c, n in sorted(short.items()))
        raise PipelineError(f"{when}, classes with fewer than prepare.min_images_per_class={minimum} "
                            f"images: {listed}")


def decode_all(rels: list[str], raw_dir: Path, cfg: Prepare, out: Path) -> tuple[np.ndarray, dict[str, str]]:
    """Decode files into a new memory-mapped .npy at `out`; returns (ok mask, {file: reason})."""
    images = open_output(out, (len(rels), cfg.channels, cfg.image_size, cfg.image_size))
    ok = np.zeros(len(rels), dtype=bool)
    quarantined = {}
    # A function of pipeline.images, not of this module: this one runs as __main__, which spawned
    # workers cannot always import by that name.
    work = partial(decode_or_reason, root=raw_dir, size=cfg.image_size, channels=cfg.channels,
                   max_pixels=cfg.max_image_pixels)
    workers = min(os.cpu_count() or 1, 8) if len(rels) >= 1000 else 1
    bar = progress("prepare: decode", total=len(rels))
    # spawn, not fork: a forked child can inherit a lock held by another thread of this process
    # (a progress-bar monitor, a BLAS pool) and hang for ever.
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(work, rels, chunksize=64) if pool else map(work, rels)
        for i, result in enumerate(results):
            if isinstance(result, str):
                quarantined[rels[i]] = result
            else:
                images[i] = result
                ok[i] = True
            bar.update()
    finally:
        bar.close()
        if pool:
            pool.terminate()
    images.flush()
    del images
    return ok, quarantined


def open_output(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A new memory-mapped uint8 .npy of `shape`, its blocks reserved on the disk up front: a write
    to a page the disk has no room for would kill the process with SIGBUS, and this raises ENOSPC."""
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, path.stat().st_size)
    return images


def output_bytes(n: int, cfg: Prepare) -> int:
    """Disk space prepare needs at its peak: all decoded images, plus the same again as the split
    files written from them (all.npy is removed only after)."""
    return 2 * n * cfg.channels * cfg.image_size**2 + 2**20


def split_indices(labels: np.ndarray, source_split: np.ndarray, cfg: Prepare, seed: int) -> dict[str, np.ndarray]:
    """Stratified, seeded split into train/val/test.

    With a test split in the source, it stays the test set and val is carved from train; otherwise
    test and val are both carved from all images, class by class.
    """
    rng = np.random.default_rng(seed)
    has_test = bool((source_split == "test").any())
    out: dict[str, list] = {"train": [], "val": [], "test": []}
    if has_test:
        out["test"].append(np.flatnonzero(source_split == "test"))
    for cls in np.unique(labels):
        idx = np.flatnonzero((labels == cls) & (source_split != "test"))
        idx = idx[rng.permutation(len(idx))]
        n_test = 0 if has_test else int(round(len(idx) * cfg.test_fraction))
        n_val = int(round((len(idx) - n_test) * cfg.val_fraction))
        out["test"].append(idx[:n_test])
        out["val"].append(idx[n_test:n_test + n_val])
        out["train"].append(idx[n_test + n_val:])
    return {k: np.sort(np.concatenate(v)) if v else np.array([], dtype=np.int64) for k, v in out.items()}


def channel_stats(images: np.ndarray, idx: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std, in 0..1 units, over images[idx], a chunk at a time."""
    total = np.zeros(images.shape[1])
    squares = np.zeros(images.shape[1])
    rows = chunk_rows(images, itemsize=8)
    for start in range(0, len(idx), rows):
        chunk = images[idx[start:start + rows]].astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 2, 3))
        squares += (chunk ** 2).sum(axis=(0, 2, 3))
    n = len(idx) * images.shape[2] * images.shape[3]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean ** 2, 1e-12))
    return mean.round(6).tolist(), std.round(6).tolist()


def write_split(folder: Path, split: str, images: np.ndarray, idx: np.ndarray,
                labels: np.ndarray, rels: list[str]) -> SplitFiles:
    npy, table = folder / f"{split}.npy", folder / f"{split}.csv"
    out = open_output(npy, (len(idx),) + images.shape[1:])
    rows = chunk_rows(images, itemsize=1)
    for start in range(0, len(idx), rows):
        out[start:start + rows] = images[idx[start:start + rows]]
    out.flush()
    del out
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label"])
        writer.writerows((rels[i], int(labels[i])) for i in idx)
    return SplitFiles(count=len(idx), sha256={p.name: sha256_file(p) for p in (npy, table)})


@dataclass(frozen=True)
class Listing:
    """The images prepare found under data/raw, one entry per file in each array."""

    classes: list[str]
    rels: list[str]  # paths relative to data/raw
    labels: np.ndarray  # class index
    source_split: np.ndarray  # "train", "test" or "all"


def build_cache(params: Params, raw: dict, listing: Listing, raw_dir: Path, out_dir: Path):
    """Decode, split and write the cache in a temp folder renamed to `out_dir`; returns (split
    indices, {file: reason} of the quarantined ones, mean, std)."""
    cfg = params.prepare
    classes, rels, labels, source_split = listing.classes, listing.rels, listing.labels, listing.source_split
    index = {c: i for i, c in enumerate(classes)}
    trainable = source_split != "test"
    with atomic_path(out_dir, directory=True) as tmp:
        ok, quarantined = decode_all(rels, raw_dir, cfg, tmp / "all.npy")
        check_class_counts({c: int(((labels == i) & trainable & ok).sum()) for c, i in index.items()},
                           cfg.min_images_per_class, "after quarantining unusable files")
        keep = np.flatnonzero(ok)
        parts = {k: keep[v] for k, v in split_indices(labels[keep], source_split[keep], cfg,
                                                       params.base.seed).items()}
        images = np.load(tmp / "all.npy", mmap_mode="r")
        mean, std = channel_stats(images, parts["train"])
        splits = {s: write_split(tmp, s, images, idx, labels, rels) for s, idx in parts.items()}
        del images
        remove(tmp / "all.npy")
        write_json(tmp / "classes.json", classes)
        write_meta(tmp, DatasetMeta(image_size=cfg.image_size, channels=cfg.channels, classes=tuple(classes),
                                    mean=tuple(mean), std=tuple(std), source=raw.get("source"),
                                    raw_sha256=raw.get("content_sha256"), splits=splits))
    return parts, quarantined, mean, std


def prepare(params: Params, raw_dir: Path = RAW_DIR, raw_json: Path = RAW_JSON,
            out_dir: Path = PREPARED_DIR, report_path: Path = DATA_REPORT) -> dict:
    """Build the cache in a temp folder and rename it into place; returns the data report."""
    cfg = params.prepare
    recover(raw_dir)  # a fetch_data killed mid-swap left the previous folder aside
    if not raw_json.exists():
        raise PipelineError(f"{raw_json}: missing; run the fetch_data stage first")
    raw = read_json(raw_json)
    classes, items = list_images(raw_dir, raw["layout"])
    if not classes:
        raise PipelineError(f"{raw_dir}: no class folders with images")
    unknown = sorted({c for s, c, _ in items if c not in classes})
    if unknown:
        raise PipelineError(f"{raw_dir}/test has classes that train lacks: {', '.join(unknown)}")
    index = {c: i for i, c in enumerate(classes)}
    rels = [rel for _, _, rel in items]
    labels = np.array([index[c] for _, c, _ in items], dtype=np.int64)
    source_split = np.array([s for s, _, _ in items])
    trainable = source_split != "test"
    # Fail before decoding anything when the files alone are too few, or the disk too small.
    check_class_counts({c: int(((labels == i) & trainable).sum()) for c, i in index.items()},
                       cfg.min_images_per_class, f"in {raw_dir}")
    require_free(out_dir.parent, output_bytes(len(rels), cfg),
                 f"{out_dir} ({len(rels)} images of {cfg.channels}x{cfg.image_size}x{cfg.image_size})")
    try:
        parts, quarantined, mean, std = build_cache(params, raw, Listing(classes, rels, labels, source_split),
                                                    raw_dir, out_dir)
    except OSError as e:  # a full or failing disk: the temp folder is removed, the previous cache kept
        raise PipelineError(f"{out_dir}: writing the prepared data failed: {e}") from None
    if quarantined:
        log.warning("quarantined %d of %d files (reasons in %s)", len(quarantined), len(rels), report_path)

    report = {
        "classes": classes,
        "images": {s: int(len(idx)) for s, idx in parts.items()},
        "counts": {s: {c: int((labels[idx] == i).sum()) for c, i in index.items()} for s, idx in parts.items()},
        "quarantined": [{"file": f, "reason": r} for f, r in sorted(quarantined.items())],
        "mean": mean,
        "std": std,
    }
    write_json(report_path, report)
    return report


def main(params: Params) -> None:
    report = prepare(params)
    log.info("prepared %s images (%s) of %d classes, %d quarantined -> %s",
             sum(report["images"].values()), ", ".join(f"{k} {v}" for k, v in report["images"].items()),
             len(report["classes"]), len(report["quarantined"]), PREPARED_DIR)


if __name__ == "__main__":
    run_stage(main)
