"""Archive extraction for fetch_data: zip and tar, refusing members that would land outside the
target, links, special files, and archives over the size, member-count or compression-ratio bounds
(data.max_archive_*, data.max_compression_ratio for each member and for the whole archive) or over
the free disk space."""

from __future__ import annotations

import gzip
import lzma
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path

from pipeline.cli import progress
from pipeline.config import Data
from pipeline.errors import FetchError
from pipeline.io import CHUNK, IGNORED_NAMES, free_bytes

# Members and archives smaller than this uncompressed are not ratio-checked: a tiny file of zeros
# (an empty mask, a blank BMP) legitimately compresses 1000x, and cannot fill a disk.
RATIO_FLOOR = 64 * 1024


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
    """Counts members and bytes actually written against the archive bounds (headers can lie): at
    most data.max_archive_bytes, and never more than the disk holding the target has free."""

    def __init__(self, archive: Path, out: Path, cfg: Data):
        self.archive, self.cfg, self.members, self.bytes = archive, cfg, 0, 0
        self.free = free_bytes(out)

    def member(self, name: str) -> None:
        self.members += 1
        if self.members > self.cfg.max_archive_members:
            raise FetchError(f"{self.archive}: more than data.max_archive_members="
                             f"{self.cfg.max_archive_members} members (zip bomb?)")

    def check_total(self, total: int) -> None:
        """Extracting `total` bytes in all stays within data.max_archive_bytes and the free space."""
        if total > self.cfg.max_archive_bytes:
            raise FetchError(f"{self.archive}: uncompressed size exceeds data.max_archive_bytes="
                             f"{self.cfg.max_archive_bytes} (zip bomb?)")
        if total > self.free:
            raise FetchError(f"{self.archive}: uncompressed size exceeds the {self.free} bytes free on the disk "
                             "it is extracted to (zip bomb? else free some space)")

    def copy(self, src, dest: Path, name: str, declared: int) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with open(dest, "wb") as f:
            while chunk := src.read(CHUNK):
                written += len(chunk)
                self.bytes += len(chunk)
                if written > declared:
                    raise FetchError(f"{self.archive}: member {name!r} is larger than its header says")
                self.check_total(self.bytes)
                f.write(chunk)

    def check_ratio(self, what: str, size: int, packed: int) -> None:
        """`what` (a member, or the whole archive) would expand `size / packed` times."""
        if size > RATIO_FLOOR and size > self.cfg.max_compression_ratio * max(packed, 1):
            raise FetchError(f"{self.archive}: {what} expands {size / max(packed, 1):.0f}x, over "
                             f"data.max_compression_ratio={self.cfg.max_compression_ratio:g} (zip bomb?)")


def _extract_zip(archive: Path, out: Path, cfg: Data) -> None:
    budget = _Budget(archive, out, cfg)
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        # Check every member before writing any, so a bad archive writes nothing at all.
        if len(infos) > cfg.max_archive_members:
            raise FetchError(f"{archive}: {len(infos)} members, over data.max_archive_members="
                             f"{cfg.max_archive_members} (zip bomb?)")
        total = sum(i.file_size for i in infos)
        budget.check_total(total)
        # Many members each just under the per-member floor add up: the whole archive's ratio too.
        budget.check_ratio("the archive", total, archive.stat().st_size)
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
    budget = _Budget(archive, out, cfg)
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
