"""Hostile archives: each is refused with a message naming the archive and the member, writes nothing
outside the extraction folder, and leaves the previous data/raw/ and data/raw.json as they were.

Every bad member comes after good ones, so a streamed (tar) extraction has already written files when
it stops: those must vanish with the temp folder too.
"""

from __future__ import annotations

import stat
import struct
import tarfile
import zipfile

import pytest

from helpers.archives import MiB, assert_nothing_escaped, build, files_of, good_members, outside, tar_info, zip_info
from helpers.checks import fetch_fails
from helpers.files import raw_state
from pipeline.fetch_data import fetch


# name -> (format, bad members given tmp_path, texts the error must hold[, params to set])
CASES = {
    "zip_slip": ("zip", lambda t: {"../evil.txt": b"pwned"}, ["'../evil.txt'", "'..'"]),
    "zip_slip_deep": ("zip", lambda t: {"circle/../../../../../evil.txt": b"pwned"}, ["'..'"]),
    "zip_slip_backslash": ("zip", lambda t: {"..\\..\\..\\evil.txt": b"pwned"}, ["'..'"]),
    "zip_absolute": ("zip", lambda t: {str(outside(t) / "evil.txt"): b"pwned"}, ["absolute path"]),
    "zip_drive_letter": ("zip", lambda t: {"C:/evil.txt": b"pwned"}, ["absolute path"]),
    "zip_symlink": ("zip", lambda t: {zip_info("circle/evil.png", stat.S_IFLNK | 0o777): str(outside(t)).encode()},
                    ["'circle/evil.png'", "symbolic link"]),
    "zip_fifo": ("zip", lambda t: {zip_info("circle/evil.png", stat.S_IFIFO | 0o644): b""},
                 ["'circle/evil.png'", "special file"]),
    "zip_bomb_ratio": ("zip", lambda t: {"circle/evil.png": bytes(4 * MiB)},
                       ["'circle/evil.png'", "data.max_compression_ratio=200 (zip bomb?)"]),
    # 84 members of exactly 1 MiB of zeros, each ~1 kB packed: each member, and the whole archive,
    # expand ~1000x (the per-member check once started above 1 MiB, and there was no whole-zip one).
    "zip_bomb_many_members": ("zip", lambda t: {f"circle/evil{i}.png": bytes(MiB) for i in range(84)},
                              ["expands", "data.max_compression_ratio=200 (zip bomb?)"]),
    # one member of 100 KiB of zeros among good ones: the whole archive expands 5x, the member 1000x
    "zip_bomb_small_member": ("zip", lambda t: {"circle/evil.png": bytes(100 * 1024)},
                              ["member 'circle/evil.png' expands", "data.max_compression_ratio=200 (zip bomb?)"]),
    "zip_total_bytes": ("zip", lambda t: {}, ["data.max_archive_bytes=5000 (zip bomb?)"],
                        {"data__max_archive_bytes": 5000}),
    "zip_members": ("zip", lambda t: {}, ["24 members, over data.max_archive_members=10 (zip bomb?)"],
                    {"data__max_archive_members": 10}),
    "tar_slip": ("tar.gz", lambda t: {"../../../evil.txt": b"pwned"}, ["'../../../evil.txt'", "'..'"]),
    "tar_absolute": ("tar.gz", lambda t: {str(outside(t) / "evil.txt"): b"pwned"}, ["absolute path"]),
    "tar_symlink": ("tar.gz", lambda t: {tar_info("circle/evil.png", tarfile.SYMTYPE, "/etc/passwd"): None},
                    ["'circle/evil.png'", "symbolic link to '/etc/passwd'"]),
    # The classic two-step: a link to a folder outside, then a file written "into" the link.
    "tar_symlink_dir": ("tar.gz", lambda t: {tar_info("circle/evil", tarfile.SYMTYPE, str(outside(t))): None,
                                             "circle/evil/evil.txt": b"pwned"}, ["symbolic link"]),
    "tar_hardlink": ("tar.gz", lambda t: {tar_info("circle/evil.png", tarfile.LNKTYPE, "/etc/passwd"): None},
                     ["'circle/evil.png'", "hard link to '/etc/passwd'"]),
    "tar_hardlink_relative": ("tar.gz", lambda t: {tar_info("circle/evil.png", tarfile.LNKTYPE,
                                                            "../../../outside/evil.txt"): None},
                              ["hard link"]),
    "tar_char_device": ("tar.gz", lambda t: {tar_info("circle/evil.png", tarfile.CHRTYPE): None},
                        ["'circle/evil.png'", "device file, FIFO"]),
    "tar_block_device": ("tar.gz", lambda t: {tar_info("circle/evil.png", tarfile.BLKTYPE): None},
                         ["device file, FIFO"]),
    "tar_fifo": ("tar.gz", lambda t: {tar_info("circle/evil.png", tarfile.FIFOTYPE): None},
                 ["'circle/evil.png'", "device file, FIFO"]),
    # The tar check is on the whole archive (a stream has no per-member packed size): 16 MiB of zeros
    # against ~40 kB of archive.
    "tar_bomb_ratio": ("tar.gz", lambda t: {"circle/evil.png": bytes(16 * MiB)},
                       ["the archive expands", "data.max_compression_ratio=200 (zip bomb?)"]),
    "tar_total_bytes": ("tar.gz", lambda t: {}, ["data.max_archive_bytes=5000 (zip bomb?)"],
                        {"data__max_archive_bytes": 5000}),
    "tar_members": ("tar.gz", lambda t: {}, ["more than data.max_archive_members=10 members (zip bomb?)"],
                    {"data__max_archive_members": 10}),
}




@pytest.mark.parametrize("case", list(CASES))
def test_hostile_archive_is_refused(fetched, tmp_path, case):
    fmt, bad, texts, *rest = CASES[case]
    archive = build(tmp_path, fetched, fmt, bad(tmp_path))
    fetched.set(data__source=f"data/sources/{archive.name}", **(rest[0] if rest else {}))
    fetch_fails(fetched, f"data/sources/{archive.name}: ", *texts)
    assert_nothing_escaped(tmp_path, fetched)


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_the_bounds_are_what_refuses_the_bombs(fetched, tmp_path, fmt):
    """Control for the bomb cases: raise the bounds and the very same archives are accepted, so the
    refusals above come from the guards, not from something else being wrong with the archives."""
    archive = build(tmp_path, fetched, fmt, {"circle/zeros.png": bytes(4 * MiB)})
    fetched.set(data__source=f"data/sources/{archive.name}", data__max_compression_ratio=1e6,
                data__max_archive_bytes=5 * MiB, data__max_archive_members=25)  # exactly 24 + 1 members
    info = fetched.call(fetch)
    assert info["counts"]["all"] == {"circle": 9, "square": 8, "stripes": 8}
    assert fetched.path("data/raw/circle/zeros.png").stat().st_size == 4 * MiB
    assert files_of(fetched.path("data/raw")) == {**good_members(tmp_path), "circle/zeros.png": bytes(4 * MiB)}


def test_zip_whose_header_understates_a_member_is_refused(fetched, tmp_path):
    """A bomb that lies: the headers declare 100 bytes for a 4 MiB member, slipping under the ratio and
    size checks that read headers. zipfile stops at the declared size and the CRC then fails."""
    path = build(tmp_path, fetched, "zip", {"circle/evil.png": bytes(4 * MiB)})
    data = bytearray(path.read_bytes())
    name = b"circle/evil.png"
    # (signature, offset of the name, offset of the uncompressed size): local header, central directory
    for signature, name_at, size_at in ((b"PK\x03\x04", 30, 22), (b"PK\x01\x02", 46, 24)):
        at = -1
        while (at := data.find(signature, at + 1)) >= 0:
            if data[at + name_at: at + name_at + len(name)] == name:
                data[at + size_at: at + size_at + 4] = struct.pack("<I", 100)
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo("circle/evil.png").file_size == 100  # the lie is in place
    fetched.set(data__source="data/sources/bad.zip")
    fetch_fails(fetched, "bad.zip", "corrupt or truncated archive", "circle/evil.png")


@pytest.mark.parametrize("fmt,expected", [("zip", "not a zip or tar archive"),  # its directory is at the end
                                          ("tar.gz", "corrupt or truncated archive")])
def test_truncated_archive_is_a_clear_error(fetched, tmp_path, fmt, expected):
    path = build(tmp_path, fetched, fmt, {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    fetched.set(data__source=f"data/sources/{path.name}")
    fetch_fails(fetched, f"data/sources/{path.name}: {expected}")


def test_hostile_archive_from_a_url_is_refused_too(fetched, http_server, tmp_path):
    body = build(tmp_path, fetched, "zip", {"../../../evil.txt": b"pwned"}).read_bytes()
    url = http_server.serve("/bad.zip", body)
    fetched.set(data__source=url)
    fetch_fails(fetched, "'../../../evil.txt'", "'..'")
    assert_nothing_escaped(tmp_path, fetched)


def test_hostile_archive_exits_non_zero_from_the_stage(fetched, tmp_path):
    archive = build(tmp_path, fetched, "tar.gz", {tar_info("circle/evil.png", tarfile.SYMTYPE, "/etc/passwd"): None})
    before = raw_state(fetched)
    fetched.set(data__source=f"data/sources/{archive.name}")
    proc = fetched.run("fetch_data", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: data/sources/bad.tar.gz: member 'circle/evil.png' is a symbolic link" in proc.stderr
    assert raw_state(fetched) == before
    assert_nothing_escaped(tmp_path, fetched)
