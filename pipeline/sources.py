"""Data sources for fetch_data: built-in digits, http(s) archives (download.py), local folders or
archives (archives.py), and torchvision data sets. Each one ends as image files in class folders
under one folder, in torchvision's ImageFolder layout: `train/<class>/*` (+ `test/<class>/*`) or
just `<class>/*`."""

from __future__ import annotations

import logging
import os
import shutil
import urllib.error
import urllib.parse
from pathlib import Path

from pipeline.archives import extract
from pipeline.cli import progress
from pipeline.config import Data
from pipeline.download import download, verify_sha256
from pipeline.errors import FetchError
from pipeline.io import is_hidden, sha256_file
from pipeline.urls import redact

log = logging.getLogger(__name__)

SPLITS = ("train", "test")


def source_kind(source: str) -> str:
    if source.startswith("builtin:"):
        return "builtin"
    if source.startswith("torchvision:"):
        return "torchvision"
    if urllib.parse.urlparse(source).scheme in ("http", "https"):
        return "url"
    return "local"


def materialize(cfg: Data, work: Path) -> dict:
    """Put the source's files under `work` (any layout) and return what is known about them."""
    kind = source_kind(cfg.source)
    info: dict = {"source": redact(cfg.source), "kind": kind}
    if kind == "builtin":
        write_digits(work)
    elif kind == "torchvision":
        export_torchvision(cfg.source.split(":", 1)[1], Path(cfg.torchvision_root), work)
    elif kind == "url":
        got = download(cfg)
        if got.final_url is not None:  # downloaded now (not from the cache): where the redirects led
            info["final_url"] = redact(got.final_url)
        info["archive_sha256"] = sha256_file(got.path)
        extract(got.path, work, cfg)
    else:
        path = Path(cfg.source).expanduser()
        if not path.exists():
            raise FetchError(f"data.source {cfg.source}: no such file or folder")
        if path.is_dir():
            copy_tree(path, work)
        else:
            info["archive_sha256"] = verify_sha256(path, cfg.sha256)
            extract(path, work, cfg)
    return info


# -- built-in and torchvision sources ------------------------------------------------------------


def write_digits(out: Path) -> None:
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16) as PNGs in class folders."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype("uint8")
    for i, (img, label) in enumerate(zip(pixels, digits.target)):
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"{i:04d}.png")


def export_torchvision(name: str, root: Path, out: Path) -> None:
    """Export a torchvision data set's train and test splits to PNG class folders.

    torchvision uses the files already under `root` and downloads only the missing ones.
    """
    import numpy as np
    from PIL import Image
    from torchvision import datasets

    cls = getattr(datasets, name)
    for split in SPLITS:
        try:
            ds = cls(root=str(root), train=split == "train", download=True)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            raise FetchError(
                f"torchvision:{name}: could not load it from {root} nor download it ({e}); "
                f"place its files under {root}/ (data.torchvision_root) as torchvision expects"
            ) from e
        data = ds.data.numpy() if hasattr(ds.data, "numpy") else np.asarray(ds.data)
        targets = np.asarray(ds.targets)
        names = [c.replace("/", "_") for c in ds.classes]  # FashionMNIST has "T-shirt/top"
        for c in names:
            (out / split / c).mkdir(parents=True, exist_ok=True)
        with progress(f"export {name} {split}", total=len(data)) as bar:
            for i in range(len(data)):
                Image.fromarray(data[i]).save(out / split / names[targets[i]] / f"{i:05d}.png")
                bar.update()


# -- local folders --------------------------------------------------------------------------------


def copy_tree(src: Path, out: Path) -> None:
    """Copy the visible files of `src` to `out`, following symlinks but never into a loop, and
    refusing a link that leaves `src` (its target's content would land in data/raw, which DVC
    caches and pushes: a link to ~/.ssh/id_rsa or /etc/shadow would be published)."""
    seen: set[tuple[int, int]] = set()
    root = os.path.realpath(src)

    def walk(folder: Path, rel: Path) -> None:
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen:
            log.warning("skipping %s: a symlink loop back into a folder already copied", folder)
            return
        seen.add((st.st_dev, st.st_ino))
        # Folders are created even when empty: an empty class folder must reach prepare, which
        # refuses it by name (prepare.min_images_per_class), instead of silently losing a class.
        (out / rel).mkdir(parents=True, exist_ok=True)
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if is_hidden(entry.name):
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                _check_link(path, root, src)
            try:
                if entry.is_dir():
                    walk(path, rel / entry.name)
                elif entry.is_file():
                    shutil.copyfile(path, out / rel / entry.name)
                    bar.update()
                else:
                    log.warning("skipping %s: not a regular file (broken link?)", path)
            except OSError as e:  # ELOOP and friends: a link cycle that stat itself refuses
                log.warning("skipping %s: %s", path, e)

    with progress(f"copy {src}", unit="files") as bar:
        walk(src, Path())


def _check_link(path: Path, root: str, src: Path) -> None:
    target = os.path.realpath(path)  # a link loop resolves to itself here, and is skipped later
    if os.path.commonpath([target, root]) != root:
        raise FetchError(f"data.source {src}: {path.relative_to(src)} is a link to {target}, outside the "
                         "source folder (not allowed: copy the file in instead)")


# -- layout ---------------------------------------------------------------------------------------


def visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and not is_hidden(p.name))


def arrange(work: Path, out: Path) -> dict[str, dict[str, int]]:
    """Move the class folders found under `work` to `out` in the canonical layout.

    Returns image counts {split: {class: n}}, split "all" when the source has no train/test split.
    """
    root = work
    while True:  # archives often wrap everything in one top folder: pizza_steak_sushi/train/...
        dirs = visible_dirs(root)
        files = [p for p in root.iterdir() if p.is_file() and not is_hidden(p.name)]
        if len(dirs) == 1 and not files and dirs[0].name not in SPLITS:
            root = dirs[0]
            continue
        break
    names = {d.name for d in dirs}
    if "train" in names:
        ignored = sorted(names - set(SPLITS))
        if ignored:
            log.warning("ignoring folders beside train/ and test/: %s", ", ".join(ignored))
        splits = {s: root / s for s in SPLITS if s in names}
    else:
        splits = {"all": root}
    counts: dict[str, dict[str, int]] = {}
    for split, folder in splits.items():
        classes = visible_dirs(folder)
        if not classes:
            raise FetchError(f"{folder.relative_to(work)}/: no class folders found; expected "
                             "train/<class>/* (+ test/<class>/*) or <class>/*")
        dest = out if split == "all" else out / split
        dest.mkdir(parents=True, exist_ok=True)
        counts[split] = {}
        for c in classes:
            counts[split][c.name] = sum(1 for _ in _files(c))
            os.replace(c, dest / c.name)
    if len(counts.get("all", counts.get("train", {}))) < 2:
        raise FetchError("the source has fewer than 2 class folders; a classifier needs at least 2")
    if "test" in counts:
        extra = sorted(set(counts["test"]) - set(counts["train"]))
        if extra:
            raise FetchError(f"test/ has classes that train/ lacks: {', '.join(extra)}")
    return counts


def _files(folder: Path):
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        yield from (f for f in filenames if not is_hidden(f))
