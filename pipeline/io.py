"""Files: atomic outputs, JSON, hashing, and which files count as data.

Everything a stage writes goes to a temp path first and is renamed into place, so a failure or a
kill never leaves a half-written output and never loses the previous one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

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
    _remove_stale(target)
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
        if directory:
            replace_dir(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException:
        remove(tmp)
        raise


def _remove_stale(target: Path) -> None:
    """Remove temp (`.<name>.tmp-<pid>-*`) and old (`.<name>.old-<pid>`) siblings of `target` whose
    writer process no longer exists; a live writer's are left alone."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)(?:-.*)?")
    for path in target.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and not _alive(int(match.group(1))):
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
    """Move folder `src` to `target`, replacing it; the old one is renamed aside, then deleted."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        remove(old)
        os.replace(target, old)
    os.replace(src, target)
    if old is not None:
        remove(old)


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
