"""Hostile archives as data.source, through the real `python -m pipeline.fetch_data`: each is refused
with one error line naming the member, nothing lands outside the extraction folder, and the previous
data/raw/ and data/raw.json stay as they were. (tests/test_archives.py has the full matrix in-process.)"""

from __future__ import annotations

import sys
import tarfile

import numpy as np
import pytest

from helpers.files import leftovers, raw_state, snapshot
from helpers.checks import error_line
from helpers.archives import MiB, assert_nothing_escaped, build, good_members, outside, tar_info, write_zip, zip_info
from helpers.disk import run_on_small_disk

AREA = "Malicious archives"
S_IFLNK = 0o120000

# case -> (what is tried, format, bad members given tmp_path, the text the error line must hold)
CASES = {
    "zip-slip": ("zip with member `../../evil.txt`", "zip", lambda t: {"../../evil.txt": b"pwned"}, "contains '..'"),
    "absolute": ("tar.gz with a member at an absolute path (a folder outside the project)", "tar.gz",
                 lambda t: {str(outside(t) / "evil.txt"): b"pwned"}, "absolute path"),
    "zip-symlink": ("zip with a symbolic-link member pointing outside", "zip",
                    lambda t: {zip_info("circle/evil.png", S_IFLNK | 0o777): str(outside(t)).encode()},
                    "is a symbolic link"),
    "tar-symlink-then-file": ("tar.gz: a symlink `circle/evil` to a folder outside, then `circle/evil/evil.txt`",
                              "tar.gz", lambda t: {tar_info("circle/evil", tarfile.SYMTYPE, str(outside(t))): None,
                                                   "circle/evil/evil.txt": b"pwned"}, "is a symbolic link"),
    "hard-link": ("tar.gz with a hard-link member to /etc/passwd", "tar.gz",
                  lambda t: {tar_info("circle/evil.png", tarfile.LNKTYPE, "/etc/passwd"): None}, "is a hard link"),
    "zip-bomb": ("zip bomb: a 4 MiB member of zeros (~4 kB compressed)", "zip",
                 lambda t: {"circle/evil.png": bytes(4 * MiB)}, "over data.max_compression_ratio=200 (zip bomb?)"),
    "zip-of-1MiB-members": ("zip bomb of 84 members of exactly 1 MiB of zeros (~100 kB zip, 930x in all)", "zip",
                            lambda t: {f"circle/evil{i}.png": bytes(MiB) for i in range(84)},
                            "over data.max_compression_ratio=200 (zip bomb?)"),
    "zip-small-member-bomb": ("zip with one 100 KiB member of zeros (1000x; the archive as a whole 5x)", "zip",
                              lambda t: {"circle/evil.png": bytes(100 * 1024)},
                              "member 'circle/evil.png' expands"),
    "device-file": ("tar.gz with a character device member (/dev/null's numbers)", "tar.gz",
                    lambda t: {tar_info("circle/evil.png", tarfile.CHRTYPE): None}, "is a device file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_archive_is_refused_by_the_stage(fetched, tmp_path, fault_log, case):
    """A hostile archive as data.source, through `python -m pipeline.fetch_data`."""
    tried, fmt, bad, text = CASES[case]
    archive = build(tmp_path, fetched, fmt, bad(tmp_path))  # 24 good members first, the bad ones last
    before = raw_state(fetched)
    fetched.set(data__source=f"data/sources/{archive.name}")
    proc = fetched.run("fetch_data", check=False, timeout=60)
    line = error_line(proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert text in line and f"data/sources/{archive.name}" in line, line
    assert raw_state(fetched) == before
    assert leftovers(fetched.path("data")) == []
    assert_nothing_escaped(tmp_path, fetched)
    fault_log.record(AREA, tried,
                     f"exit {proc.returncode}: '{line.split(' pipeline: ', 1)[-1]}'; data/raw and data/raw.json "
                     "byte-identical; no temp folder left; no evil* file anywhere under the test's folder nor "
                     "outside it")


def test_archive_larger_than_the_free_disk_is_refused(fetched, tmp_path, fault_log):
    """An archive whose content (incompressible, under every ratio bound) is larger than the disk of
    data/ has free: refused before a byte is extracted, naming the archive; data/raw kept."""
    random = np.random.default_rng(0)
    members = {**good_members(tmp_path), **{f"circle/big{i}.png": random.bytes(MiB) for i in range(6)}}
    archive = write_zip(tmp_path / "big.zip", members)  # outside data/, which the small disk replaces
    fetched.set(data__source=str(archive))
    before = raw_state(fetched)
    proc, after = run_on_small_disk(fetched, 4 * MiB, tmp_path / "disk", sys.executable, "-m", "pipeline.fetch_data")
    line = error_line(proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(archive) in line and "bytes free on the disk" in line, line
    assert (snapshot(after / "raw"), (after / "raw.json").read_bytes()) == before
    assert leftovers(after) == []
    fault_log.record(AREA, "zip of 6 MiB of random bytes (no ratio bound applies) extracted onto a 4 MiB disk",
                     f"exit {proc.returncode}: '{line.split(' pipeline: ', 1)[-1]}'; nothing extracted, "
                     "data/raw and data/raw.json byte-identical, no temp folder left")
