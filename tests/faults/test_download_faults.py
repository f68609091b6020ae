"""Download faults against a real HTTP server on 127.0.0.1, through `python -m pipeline.fetch_data`:
each fails with one clear line naming the URL, leaves no partial file in the download cache and the
previous data/raw/ as it was; then the same URL, once the server behaves, fetches fine."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import pytest

from helpers.archives import files_of, write_zip
from helpers.files import raw_state
from helpers.images import image_tree
from helpers.checks import error_line
from helpers.files import leftovers
from helpers.http import LoopbackServer
from helpers.tls import self_signed, server_context

AREA = "Download faults"

# case -> (what is tried, server mode for the first request, error text, params)
CASES = {
    "404": ("HTTP 404 (the URL does not exist yet)", "missing", "HTTP 404 Not Found", {}),
    "500": ("HTTP 500 from the server", "error", "HTTP 500 Internal Server Error", {}),
    "reset": ("connection reset (RST) half-way through the body", "reset", "Connection reset", {}),
    "short": ("server closes the connection before Content-Length bytes", "truncated", "got ", {}),
    "stall": ("server sends half the body, then stalls (data.timeout_s=0.5)", "stall", "timed out", {}),
    "checksum": ("body that does not match data.sha256", "corrupt", "sha256 mismatch", {}),
    "trickle": (("server trickles the body, a byte every 0.3 s, no Content-Length (data.timeout_s=0.5, "
                 "data.download_deadline_s=2)"), "trickle", "not finished within data.download_deadline_s=2 s",
                {"data__download_deadline_s": 2}),
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


def _zip(tmp_path) -> bytes:
    return write_zip(tmp_path / "d.zip", files_of(image_tree(tmp_path / "src", split=False))).read_bytes()


def _failed_cleanly(project, proc, before) -> str:
    line = error_line(proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    cache = project.path("data/downloads")
    assert not cache.exists() or list(cache.iterdir()) == []
    assert raw_state(project) == before and leftovers(project.path("data")) == []
    return line


def test_download_without_length_is_capped_while_streaming(fetched, http_server, fault_log):
    """8 MiB without a Content-Length, data.max_archive_bytes=1000000: stopped once past the bound."""
    url = http_server.serve("/big.zip", bytes(8 << 20), "nolength")
    fetched.set(data__source=url, data__max_archive_bytes=1000000)
    before = raw_state(fetched)
    proc = fetched.run("fetch_data", check=False, timeout=60)
    line = _failed_cleanly(fetched, proc, before)
    assert url in line and "more than data.max_archive_bytes=1000000" in line, line
    fault_log.record(AREA, "8 MiB body without a Content-Length, data.max_archive_bytes=1000000",
                     f"exit {proc.returncode}: '{line.split(' pipeline: ', 1)[-1]}'; no partial file, data/raw kept "
                     "(was: all 8 MiB downloaded)")


def test_redirects_are_recorded_and_credentials_stay_with_the_origin(fetched, http_server, tmp_path, fault_log):
    """A redirect on the same server, then to another server: followed, the final URL logged and in
    data/raw.json; the basic-auth credentials of the URL reach the original server only."""
    other = LoopbackServer()
    try:
        final = other.serve("/final.zip", _zip(tmp_path))
        http_server.serve("/moved.zip", final.encode(), "redirect")
        start = http_server.serve("/d.zip", http_server.url("/moved.zip").encode(), "redirect")
        fetched.set(data__source=start.replace("http://", "http://alice:pw-9z@"))
        proc = fetched.run("fetch_data", check=False, timeout=60)
        assert proc.returncode == 0, proc.stderr
        auth = "Basic " + base64.b64encode(b"alice:pw-9z").decode()
        assert http_server.authorizations == [auth, auth] and other.authorizations == [None]
        assert f"redirected to {final}" in proc.stderr
        raw = json.loads(fetched.path("data/raw.json").read_text())
        assert raw["final_url"] == final and "pw-9z" not in json.dumps(raw)
    finally:
        other.close()
    fault_log.record(AREA, "source with credentials redirected on its server, then to another server",
                     f"exit 0; final URL logged and in data/raw.json (final_url: {final}); the credentials were "
                     "sent to the original server only (was: to every server on the way)")


def test_redirect_from_https_to_http_is_refused(fetched, http_server, tmp_path, fault_log):
    """An https source redirecting to plain http: refused, naming both URLs; nothing fetched."""
    cert, key = self_signed(tmp_path / "tls")
    secure = LoopbackServer(tls=server_context(cert, key))
    try:
        plain = http_server.serve("/d.zip", _zip(tmp_path))
        url = secure.serve("/d.zip", plain.encode(), "redirect")
        fetched.set(data__source=url)
        before = raw_state(fetched)
        proc = fetched.run("fetch_data", check=False, timeout=60, env={"SSL_CERT_FILE": str(cert)})
        line = _failed_cleanly(fetched, proc, before)
        assert url in line and plain in line and "downgrade to plain http" in line, line
        assert secure.requests == ["/d.zip"] and http_server.requests == []
    finally:
        secure.close()
    fault_log.record(AREA, "https source answering with a redirect to plain http",
                     f"exit {proc.returncode}: '{line.split(' pipeline: ', 1)[-1]}'; the http URL never requested, "
                     "data/raw kept (was: followed silently)")
