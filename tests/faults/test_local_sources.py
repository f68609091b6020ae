"""Local source folders through `python -m pipeline.fetch_data`: a link that leaves the folder is
refused, naming it; links inside it are followed."""

from __future__ import annotations

import os

from helpers.checks import error_line
from helpers.files import leftovers, raw_state
from helpers.images import image_tree

AREA = "Local sources"


def test_link_leaving_the_source_folder_is_refused(fetched, tmp_path, fault_log):
    """`circle/leak.png` links to a file outside the source folder (a stand-in for /etc/passwd)."""
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("not for the DVC remote")
    src = image_tree(fetched.path("data/sources/links"), split=False)
    os.symlink(secret, src / "circle" / "leak.png")
    fetched.set(data__source="data/sources/links")
    before = raw_state(fetched)
    proc = fetched.run("fetch_data", check=False, timeout=60)
    line = error_line(proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "circle/leak.png" in line and str(secret) in line and "outside the source folder" in line, line
    assert raw_state(fetched) == before and leftovers(fetched.path("data")) == []

    # links that stay inside the folder are fine: one to a file, one to a folder
    (src / "circle" / "leak.png").unlink()
    os.symlink("../square/square_000.png", src / "circle" / "alias.png")
    image_tree(src / ".store", split=False)  # hidden: copied only through the link to it
    os.symlink(".store/square", src / "square_too")
    ok = fetched.run("fetch_data", check=False, timeout=60)
    assert ok.returncode == 0, ok.stderr
    raw = fetched.path("data/raw")
    assert (raw / "circle" / "alias.png").read_bytes() == (src / "square" / "square_000.png").read_bytes()
    assert len(list((raw / "square_too").iterdir())) == 8
    fault_log.record(AREA, "a local source folder holding `circle/leak.png`, a link to a file outside it",
                     f"exit {proc.returncode}: '{line.split(' pipeline: ', 1)[-1]}'; data/raw kept (was: the "
                     "file's content copied into data/raw). Links inside the folder are still followed")
