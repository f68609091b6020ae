"""Downloads for fetch_data: an http(s) archive streamed to a cache folder (a re-run reuses it),
its sha256 verified when data.sha256 is set."""

from __future__ import annotations

import base64
import hashlib
import logging
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from pathlib import Path, PurePosixPath

from pipeline.cli import progress
from pipeline.errors import FetchError
from pipeline.io import CHUNK, atomic_path, sha256_file
from pipeline.urls import redact

log = logging.getLogger(__name__)


def download(url: str, cache_dir: Path, sha256: str | None, timeout_s: float) -> Path:
    """Stream `url` into `cache_dir` (once: a cached archive is reused) and verify `sha256`. Logs and
    errors name the URL with its credentials redacted."""
    shown = redact(url)
    name = PurePosixPath(urllib.parse.urlparse(url).path).name or "download"
    cached = cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    if cached.exists():
        if sha256 is None or sha256_file(cached) == sha256.lower():
            log.info("using cached %s for %s", cached, shown)
            return cached
        log.info("cached %s does not match data.sha256; downloading again", cached)
    try:
        with atomic_path(cached) as tmp:
            actual = _stream(url, tmp, timeout_s)
            if sha256 is not None and actual != sha256.lower():
                raise FetchError(f"{shown}: sha256 mismatch: expected {sha256.lower()}, actual {actual}")
    except (urllib.error.URLError, HTTPException, OSError) as e:
        if isinstance(e, urllib.error.HTTPError):
            e = f"HTTP {e.code} {e.reason}"
        raise FetchError(f"download of {shown} failed: {e}") from None
    return cached


def _request(url: str) -> urllib.request.Request:
    """The request for `url`; credentials in its user-info go into a basic-auth header, as browsers
    and curl send them (urllib would take them for a host name)."""
    parts = urllib.parse.urlsplit(url)
    headers = {"User-Agent": "image-pipeline/1"}
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        token = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        url = urllib.parse.urlunsplit(parts._replace(netloc=host))
    return urllib.request.Request(url, headers=headers)


def _stream(url: str, dest: Path, timeout_s: float) -> str:
    h = hashlib.sha256()
    req = _request(url)
    with urllib.request.urlopen(req, timeout=timeout_s) as resp, open(dest, "wb") as f:
        total = int(resp.headers.get("Content-Length") or 0) or None
        got = 0
        with progress(f"download {dest.name}", total=total, unit="B") as bar:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                h.update(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        if total is not None and got != total:
            raise FetchError(f"download of {redact(url)} failed: got {got} of {total} bytes")
    return h.hexdigest()


def verify_sha256(path: Path, expected: str | None) -> str:
    actual = sha256_file(path)
    if expected is not None and actual != expected.lower():
        raise FetchError(f"{path}: sha256 mismatch: expected {expected.lower()}, actual {actual}")
    return actual
