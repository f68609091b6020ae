"""Download faults against a real HTTP server on 127.0.0.1, through `python -m pipeline.fetch_data`:
each fails with one clear line naming the URL, leaves no partial file in the download cache and the
previous data/raw/ as it was; then the same URL, once the server behaves, fetches fine."""

from __future__ import annotations

import hashlib
import time

import pytest

from helpers.archives import files_of, write_zip
from helpers.files import raw_state
from helpers.images import image_tree
from helpers.checks import error_line
from helpers.files import leftovers

AREA = "Download faults"

# case -> (what is tried, server mode for the first request, error text, params)
CASES = {
    "404": ("HTTP 404 (the URL does not exist yet)", "missing", "HTTP 404 Not Found", {}),
    "500": ("HTTP 500 from the server", "error", "HTTP 500 Internal Server Error", {}),
    "reset": ("connection reset (RST) half-way through the body", "reset", "Connection reset", {}),
    "short": ("server closes the connection before Content-Length bytes", "truncated", "got ", {}),
    "stall": ("server sends half the body, then stalls (data.timeout_s=0.5)", "stall", "timed out", {}),
    "checksum": ("body that does not match data.sha256", "corrupt", "sha256 mismatch", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_download_fault_then_retry(fetched, http_server, tmp_path, fault_log, case):
    """A download fault from a loopback server, then a retry once it behaves."""
    tried, mode, text, params = CASES[case]
    body = write_zip(tmp_path / "d.zip", files_of(image_tree(tmp_path / "src", split=False))).read_bytes()
    digest = hashlib.sha256(body).hexdigest()
    if mode == "corrupt":
        url = http_server.serve("/d.zip", body[:-10] + bytes(10))
    elif mode == "missing":
        url = http_server.url("/d.zip")
    else:
        url = http_server.serve("/d.zip", body, mode)
    fetched.set(data__source=url, data__sha256=digest, **params)  # data.timeout_s is 0.5 (`fetched`)
    before = raw_state(fetched)
    start = time.monotonic()
    proc = fetched.run("fetch_data", check=False, timeout=60)
    elapsed = time.monotonic() - start
    line = error_line(proc.stderr)
    cache = fetched.path("data/downloads")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert url in line and text in line, line
    assert not cache.exists() or list(cache.iterdir()) == []  # no partial download, not even a temp file
    assert raw_state(fetched) == before and leftovers(fetched.path("data")) == []
    assert elapsed < 30

    http_server.serve("/d.zip", body, "ok")  # the server behaves again: same URL
    retry = fetched.run("fetch_data", check=False, timeout=60)
    assert retry.returncode == 0, retry.stderr
    assert raw_state(fetched) != before and len(files_of(fetched.path("data/raw"))) == 24
    assert [p.name.split("-", 1)[1] for p in cache.iterdir()] == ["d.zip"]
    assert http_server.requests == ["/d.zip", "/d.zip"]
    fault_log.record(AREA, tried,
                     f"exit {proc.returncode} after {elapsed:.1f} s: '{line.split(' pipeline: ', 1)[-1]}'; download "
                     "cache empty, data/raw unchanged. Retry of the same URL once the server serves it: exit 0, "
                     "24 images fetched, sha256 verified, archive cached")
