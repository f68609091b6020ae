"""Full disks, power loss and kills at the worst moment of an output's replacement, against the real
stages: a clear error and the previous outputs kept; what a crash interrupts is put back."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest
from helpers.checks import error_line
from helpers.disk import run_on_small_disk
from helpers.files import leftovers, raw_state, snapshot
from helpers.images import image_tree

AREA = "Disks and crashes"
MiB = 1 << 20

# fetch_data, killed (SIGKILL, no cleanup runs) right after replace_dir renamed the previous data/raw
# aside and before it renamed the new one into place: the worst moment of the swap.
KILLED_MID_SWAP = """
import os, signal, sys
from pipeline import cli, fetch_data

rename = os.replace

def replace(src, dst):
    rename(src, dst)
    if os.path.basename(str(dst)).startswith(".raw.old-"):
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
cli.run_stage(fetch_data.main)
"""


def test_kill_between_the_renames_of_a_folder_swap(fetched, fault_log):
    """fetch_data killed between the two renames of data/raw's swap: the next stage (prepare reads
    data/raw; fetch_data rewrites it) finds the previous folder put back."""
    before = raw_state(fetched)
    image_tree(fetched.path("data/sources/other"), split=True)
    fetched.set(data__source="data/sources/other")
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_SWAP], cwd=fetched.root, env=fetched.env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    aside = [p.name for p in fetched.path("data").glob(".raw.old-*")]
    assert not fetched.path("data/raw").exists() and len(aside) == 1  # the state the kill left
    fetched.set(prepare__image_size=8, prepare__min_images_per_class=3)
    prep = fetched.run("prepare", check=False)
    assert prep.returncode == 0, prep.stderr
    assert raw_state(fetched) == before and leftovers(fetched.path("data")) == []
    report = json.loads(fetched.path("reports/data.json").read_text())
    assert sum(report["images"].values()) == 24  # prepared from the previous data/raw
    fault_log.record(AREA, "fetch_data killed (SIGKILL) between the swap's two renames: data/raw renamed aside "
                     f"as {aside[0]}, the new one not yet in place",
                     "the next stage (prepare) renamed the previous data/raw back: byte-identical, 24 images "
                     "prepared, nothing left aside")


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_outputs_are_flushed_before_and_after_the_rename(fetched, tmp_path, fault_log):
    """A power loss must find the old or the new output, never a torn one: the system calls of a file
    write (write_json, as model.pt and every report are written) and of a folder swap (fetch_data)
    flush the content before the rename and the folder's entry after it."""
    trace = tmp_path / "trace"
    code = "from pipeline.io import write_json; write_json('reports/x.json', {'a': 1})"
    for cmd in ([sys.executable, "-c", code], [sys.executable, "-m", "pipeline.fetch_data"]):
        subprocess.run(["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync,syncfs,rename,renameat,renameat2",
                        "-o", str(trace), *cmd], cwd=fetched.root, env=fetched.env(), check=True,
                       capture_output=True, timeout=120)
        calls = [line.split(None, 1)[1] for line in trace.read_text().splitlines() if "= 0" in line]
        renames = [i for i, c in enumerate(calls) if c.startswith("rename")]
        flushes = [i for i, c in enumerate(calls) if c.startswith(("fsync", "fdatasync", "syncfs"))]
        last = renames[-1]  # the output's own rename into place
        assert any(i < last for i in flushes) and any(i > last for i in flushes), calls
    fault_log.record(AREA, "power loss during a write (traced with strace: a file by write_json, the data/raw swap "
                     "by fetch_data)", "content flushed (fsync / syncfs) before the rename into place, the folder's "
                     "entry flushed after it")


def test_full_disk_during_prepare(fetched, tmp_path, fault_log):
    """prepare's output does not fit on the disk: it fails before decoding, with one line naming
    data/prepared and the space it needs; the previous data/prepared is kept."""
    fetched.set(prepare__image_size=8, prepare__min_images_per_class=3)
    fetched.run("prepare")
    previous = snapshot(fetched.path("data/prepared"))
    fetched.set(prepare__image_size=256, prepare__channels=3)  # 24 x 192 KiB, twice at the peak: 9 MiB
    proc, after = run_on_small_disk(fetched, 4 * MiB, tmp_path / "disk", sys.executable, "-m", "pipeline.prepare")
    line = error_line(proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "data/prepared" in line and "not enough free disk space" in line, line
    assert snapshot(after / "prepared") == previous and leftovers(after) == []
    fault_log.record(AREA, "prepare at 256x256 RGB (9 MiB of output) with data/ on a 4 MiB disk",
                     f"exit {proc.returncode} before decoding: '{line.split(' pipeline: ', 1)[-1]}'; previous "
                     "data/prepared byte-identical, no temp folder left (was: SIGBUS, exit 135, no error line, "
                     "the temp folder filling the disk)")
