"""Data sources for fetch_data: built-in digits, http(s) archives, local folders or archives, and
torchvision data sets. Each one ends as image files in class folders under one folder, in
torchvision's ImageFolder layout: `train/<class>/*` (+ `test/<class>/*`) or just `<class>/*`."""

from __future__ import annotations

import gzip
import hashlib
import logging
import lzma
import os
import shutil
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from http.client import HTTPException
from pathlib import Path, PurePosixPath

from pipeline.cli import progress
from pipeline.config import Data, PipelineError
from pipeline.io import CHUNK, atomic_path, sha256_file

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}


class FetchError(PipelineError):
    """The source cannot be fetched; the message names the URL, path or archive member."""


def source_kind(source: str) -> str:
    if source.startswith("builtin:"):
        return "builtin"
    if source.startswith("torchvision:"):
        return "torchvision"
    if urllib.parse.urlparse(source).scheme in ("http", "https"):
        return "url"
    return "local"


def is_hidden(name: str) -> bool:
    """Hidden entries (.git, .ipynb_checkpoints, .DS_Store) and OS litter are never data."""
    return name.startswith(".") or name in IGNORED_NAMES


def materialize(cfg: Data, work: Path) -> dict:
    """Put the source's files under `work` (any layout) and return what is known about them."""
    kind = source_kind(cfg.source)
    info: dict = {"source": cfg.source, "kind": kind}
    if kind == "builtin":
        write_digits(work)
    elif kind == "torchvision":
        export_torchvision(cfg.source.split(":", 1)[1], Path(cfg.torchvision_root), work)
    elif kind == "url":
        archive = download(cfg.source, Path(cfg.download_dir), cfg.sha256, cfg.timeout_s)
        info["archive_sha256"] = sha256_file(archive)
        extract(archive, work, cfg)
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


# -- download -------------------------------------------------------------------------------------


def download(url: str, cache_dir: Path, sha256: str | None, timeout_s: float) -> Path:
    """Stream `url` into `cache_dir` (once: a cached archive is reused) and verify `sha256`."""
    name = PurePosixPath(urllib.parse.urlparse(url).path).name or "download"
    cached = cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    if cached.exists():
        if sha256 is None or sha256_file(cached) == sha256.lower():
            log.info("using cached %s for %s", cached, url)
            return cached
        log.info("cached %s does not match data.sha256; downloading again", cached)
    try:
        with atomic_path(cached) as tmp:
            actual = _stream(url, tmp, timeout_s)
            if sha256 is not None and actual != sha256.lower():
                raise FetchError(f"{url}: sha256 mismatch: expected {sha256.lower()}, actual {actual}")
    except (urllib.error.URLError, HTTPException, OSError) as e:
        if isinstance(e, urllib.error.HTTPError):
            e = f"HTTP {e.code} {e.reason}"
        raise FetchError(f"download of {url} failed: {e}") from None
    return cached


def _stream(url: str, dest: Path, timeout_s: float) -> str:
    h = hashlib.sha256()
    req = urllib.request.Request(url, headers={"User-Agent": "image-pipeline/1"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp, open(dest, "wb") as f:
        total = int(resp.headers.get("Content-Length") or 0) or None
        got = 0
        with progress(f"download {dest.name}", total=total, unit="B") as bar:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                h.update(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        if total is not None and got != total:
            raise FetchError(f"download of {url} failed: got {got} of {total} bytes")
    return h.hexdigest()


def verify_sha256(path: Path, expected: str | None) -> str:
    actual = sha256_file(path)
    if expected is not None and actual != expected.lower():
        raise FetchError(f"{path}: sha256 mismatch: expected {expected.lower()}, actual {actual}")
    return actual


# -- archives -------------------------------------------------------------------------------------


def extract(archive: Path, out: Path, cfg: Data) -> None:
    """Extract a zip or tar archive into `out`, refusing members that would land outside it, links,
    special files, and archives over the size, member-count or compression-ratio bounds."""
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, out, cfg)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, out, cfg)
        else:
            raise FetchError(f"{archive}: not a zip or tar archive")
    # A damaged archive (bad CRC, a header that understates a member's size, a truncated stream) is
    # the user's to fix, like any other bad source: one line naming the archive, not a traceback.
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error,
            lzma.LZMAError, gzip.BadGzipFile) as e:
        raise FetchError(f"{archive}: corrupt or truncated archive: {e}") from None


def _member_path(archive: Path, out: Path, name: str) -> Path | None:
    """Where member `name` goes under `out`, or None for folders' own entries and ignored names."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise FetchError(f"{archive}: member {name!r} has an absolute path (would land outside the target)")
    if ".." in parts:
        raise FetchError(f"{archive}: member {name!r} contains '..' (would land outside the target)")
    parts = [p for p in parts if p not in ("", ".")]
    if not parts or any(p in IGNORED_NAMES for p in parts):
        return None
    return out.joinpath(*parts)


class _Budget:
    """Counts members and bytes actually written against the archive bounds (headers can lie)."""

    def __init__(self, archive: Path, cfg: Data):
        self.archive, self.cfg, self.members, self.bytes = archive, cfg, 0, 0

    def member(self, name: str) -> None:
        self.members += 1
        if self.members > self.cfg.max_archive_members:
            raise FetchError(f"{self.archive}: more than data.max_archive_members="
                             f"{self.cfg.max_archive_members} members (zip bomb?)")

    def copy(self, src, dest: Path, name: str, declared: int) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with open(dest, "wb") as f:
            while chunk := src.read(CHUNK):
                written += len(chunk)
                self.bytes += len(chunk)
                if written > declared:
                    raise FetchError(f"{self.archive}: member {name!r} is larger than its header says")
                if self.bytes > self.cfg.max_archive_bytes:
                    raise FetchError(f"{self.archive}: uncompressed size exceeds data.max_archive_bytes="
                                     f"{self.cfg.max_archive_bytes} (zip bomb?)")
                f.write(chunk)

    def check_ratio(self, what: str, size: int, packed: int) -> None:
        """`what` (a member, or the whole archive) would expand `size / packed` times."""
        if size > CHUNK and size > self.cfg.max_compression_ratio * max(packed, 1):
            raise FetchError(f"{self.archive}: {what} expands {size / max(packed, 1):.0f}x, over "
                             f"data.max_compression_ratio={self.cfg.max_compression_ratio:g} (zip bomb?)")


def _extract_zip(archive: Path, out: Path, cfg: Data) -> None:
    budget = _Budget(archive, cfg)
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        # Check every member before writing any, so a bad archive writes nothing at all.
        if len(infos) > cfg.max_archive_members:
            raise FetchError(f"{archive}: {len(infos)} members, over data.max_archive_members="
                             f"{cfg.max_archive_members} (zip bomb?)")
        if sum(i.file_size for i in infos) > cfg.max_archive_bytes:
            raise FetchError(f"{archive}: uncompressed size exceeds data.max_archive_bytes="
                             f"{cfg.max_archive_bytes} (zip bomb?)")
        for info in infos:
            _member_path(archive, out, info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise FetchError(f"{archive}: member {info.filename!r} is a symbolic link (not allowed)")
            # Only the file-type bits say "special": zips written by Python's ZipFile.writestr (and
            # other tools) store permission bits alone (0o600 << 16, type 0), which are plain files.
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise FetchError(f"{archive}: member {info.filename!r} is a special file (not allowed)")
            budget.check_ratio(f"member {info.filename!r}", info.file_size, info.compress_size)
        with progress(f"extract {archive.name}", total=len(infos), unit="files") as bar:
            for info in infos:
                bar.update()
                dest = _member_path(archive, out, info.filename)
                if dest is not None and info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)  # an empty class folder is kept (see copy_tree)
                if dest is None or info.is_dir():
                    continue
                with zf.open(info) as src:
                    budget.copy(src, dest, info.filename, info.file_size)


def _extract_tar(archive: Path, out: Path, cfg: Data) -> None:
    budget = _Budget(archive, cfg)
    packed = archive.stat().st_size
    with tarfile.open(archive, "r:*") as tf, progress(f"extract {archive.name}", unit="files") as bar:
        for m in tf:  # streamed: a tar with millions of members is stopped at the bound
            bar.update()
            budget.member(m.name)
            dest = _member_path(archive, out, m.name)
            if m.issym() or m.islnk():
                raise FetchError(f"{archive}: member {m.name!r} is a {'symbolic' if m.issym() else 'hard'} "
                                 f"link to {m.linkname!r} (not allowed)")
            if not (m.isfile() or m.isdir()):
                raise FetchError(f"{archive}: member {m.name!r} is a device file, FIFO or other special "
                                 f"file (not allowed)")
            if m.isdir() and dest is not None:
                dest.mkdir(parents=True, exist_ok=True)  # an empty class folder is kept (see copy_tree)
            if m.isdir() or dest is None:
                continue
            budget.check_ratio("the archive", budget.bytes + m.size, packed)
            src = tf.extractfile(m)
            budget.copy(src, dest, m.name, m.size)


# -- local folders --------------------------------------------------------------------------------


def copy_tree(src: Path, out: Path) -> None:
    """Copy the visible files of `src` to `out`, following symlinks but never into a loop."""
    seen: set[tuple[int, int]] = set()

    def walk(folder: Path, rel: Path) -> None:
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen:
            log.warning("skipping %s: a symlink loop back into a folder already copied", folder)
            return
        seen.add((st.st_dev, st.st_ino))
        # Fix (tests/faults): folders are created even when empty. Only files made folders before,
        # so an empty class folder vanished and the model silently lost a class; now it reaches
        # prepare, which refuses it by name (prepare.min_images_per_class).
        (out / rel).mkdir(parents=True, exist_ok=True)
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if is_hidden(entry.name):
                continue
            path = Path(entry.path)
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
