"""Files: atomic outputs, JSON, hashing, free space, and which files count as data.

Everything a stage writes goes to a temp path first, is flushed to the disk (fsync) and renamed into
place, so a failure, a kill or a power loss never leaves a half-written output and never loses the
previous one."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from pipeline.errors import PipelineError

CHUNK = 1 << 20  # bytes per read when hashing or streaming
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}  # OS litter, never data
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(target: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temp file (or folder) beside `target`; on a clean exit it replaces `target`.

    On an exception the temp path is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The temp name carries the writer's pid, so what a killed writer left (kill -9 runs no
    # cleanup) is recognised and removed here, while a live writer's is left alone.
    recover(target)
    prefix = f".{target.name}.tmp-{os.getpid()}-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    tmp.chmod((0o777 if directory else 0o666) & ~_UMASK)  # mkstemp/mkdtemp make them private
    try:
        yield tmp
        # Flushed before the rename: after a power loss the name points at the whole new content
        # or at the old one, never at a torn file that a later stage would trust.
        if directory:
            _sync_tree(tmp)
            replace_dir(tmp, target)
        else:
            _fsync(tmp)
            os.replace(tmp, target)
            _fsync(target.parent)
    except BaseException:
        remove(tmp)
        raise


def recover(target: str | Path) -> None:
    """Undo what a killed writer of `target` left: if it died between replace_dir's two renames
    (`target` gone, its previous copy at `.<name>.old-<pid>`), put the previous copy back; then
    remove its temp (`.<name>.tmp-<pid>-*`) and old siblings. A live writer's are left alone."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)(?:-.*)?")
    stale = {"tmp": [], "old": []}
    for path in target.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and not _alive(int(match.group(2))):
            stale[match.group(1)].append(path)
    if stale["old"] and not (target.exists() or target.is_symlink()):
        newest = max(stale["old"], key=lambda p: p.lstat().st_mtime)
        os.replace(newest, target)
        _fsync(target.parent)
        stale["old"].remove(newest)
    for path in stale["tmp"] + stale["old"]:
        remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a killed process its parent has not reaped yet (a zombie) writes nothing any more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def replace_dir(src: Path, target: Path) -> None:
    """Move folder `src` to `target`, replacing it; the old one is renamed aside, then deleted.

    A kill between the two renames leaves no `target` but `.<name>.old-<pid>`, which recover()
    (run by the next writer, and by readers such as prepare) renames back."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        remove(old)
        os.replace(target, old)
    os.replace(src, target)
    _fsync(target.parent)
    if old is not None:
        remove(old)


def _fsync(path: Path) -> None:
    """Flush a file's content, or a folder's entries (a rename in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to the disk: one syncfs(2) of its file system on
    Linux (a folder of 100k images would take minutes of per-file fsyncs), else file by file."""
    if _syncfs(folder):
        return
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                _fsync(path)
        _fsync(Path(dirpath))


def _syncfs(folder: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):  # not glibc/Linux
        return False
    fd = os.open(folder, os.O_RDONLY)
    try:
        return syncfs(fd) == 0
    finally:
        os.close(fd)


def free_bytes(folder: str | Path) -> int:
    """Bytes an unprivileged writer can still put on the file system holding `folder` (or its
    nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def require_free(folder: str | Path, needed: int, what: str) -> None:
    """Fail before writing `needed` bytes for `what` into `folder` when the disk has less free, so a
    full disk ends in one clear line instead of a crash half-way (a memory-mapped write that cannot
    get a page dies of SIGBUS)."""
    free = free_bytes(folder)
    if needed > free:
        raise PipelineError(f"{folder}: not enough free disk space for {what}: needs {_size(needed)}, "
                            f"{_size(free)} free")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def is_hidden(name: str) -> bool:
    """Hidden entries (.git, .ipynb_checkpoints, .DS_Store) and OS litter are never data."""
    return name.startswith(".") or name in IGNORED_NAMES
