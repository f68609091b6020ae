"""Archives the tests write: good ones from image folders, and hostile members (links, devices,
escaping paths, bombs) to place after good ones."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

from helpers.images import image_tree


def files_of(root: Path, prefix: str = "") -> dict[str, bytes]:
    """{prefix + relative path: bytes} of the files under `root`, as archive members."""
    return {prefix + p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_zip(path: Path, members: dict, compression=zipfile.ZIP_DEFLATED) -> Path:
    """Write a zip of {name or ZipInfo: bytes}."""
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            if isinstance(name, zipfile.ZipInfo):
                name.compress_type = compression
            zf.writestr(name, data)
    return path


def write_tar(path: Path, members: dict, mode: str = "w:gz") -> Path:
    """Write a tar of {name: bytes} or {TarInfo: bytes | None} (None for links and special files)."""
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = name if isinstance(name, tarfile.TarInfo) else tarfile.TarInfo(name)
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


MiB = 1 << 20


def zip_info(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: the high 16 bits of external_attr are st_mode
    info.external_attr = mode << 16
    return info


def tar_info(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
    return info


def good_members(tmp_path: Path) -> dict:
    return files_of(image_tree(tmp_path / "good_src", split=False))


def outside(tmp_path: Path) -> Path:
    """Where absolute-path and link members point: a folder outside the project."""
    folder = tmp_path / "outside"
    folder.mkdir(exist_ok=True)
    return folder


def build(tmp_path: Path, project, fmt: str, bad: dict) -> Path:
    members = {**good_members(tmp_path), **bad}  # bad members last
    path = project.path(f"data/sources/bad.{fmt}")
    return write_zip(path, members) if fmt == "zip" else write_tar(path, members)


def assert_nothing_escaped(tmp_path: Path, project) -> None:
    """No file, folder or link named evil* anywhere near the project, nor in `outside/`, nor where
    '..' members would have resolved from data/<tmp>/.incoming/."""
    escaped = list(tmp_path.rglob("evil*"))
    assert escaped == [], escaped
    assert not (outside(tmp_path) / "evil.txt").exists()
    assert list(outside(tmp_path).iterdir()) == []
    for up in range(1, 7):
        assert not (project.path("data/x/.incoming") / ("../" * up + "evil.txt")).resolve().exists()
