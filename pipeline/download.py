"""Downloads for fetch_data: an http(s) archive streamed to a cache folder (a re-run reuses it),
its sha256 verified when data.sha256 is set.

Bounded in every way a server can misbehave: each read by data.timeout_s, the whole download by
data.download_deadline_s (a server trickling a byte a second never trips a per-read timeout), its
size by data.max_archive_bytes and the free disk space (counted while streaming: a server need not
send a Content-Length). Redirects are followed, logged and returned; a redirect from https to plain
http is refused, and credentials go to the original host only."""

from __future__ import annotations

import base64
import hashlib
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path, PurePosixPath

from pipeline.cli import progress
from pipeline.config import Data
from pipeline.errors import FetchError
from pipeline.io import CHUNK, atomic_path, free_bytes, sha256_file
from pipeline.urls import redact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Downloaded:
    path: Path
    final_url: str | None  # where the redirects (if any) led; None when the archive came from the cache


def download(cfg: Data) -> Downloaded:
    """Stream data.source into data.download_dir (once: a cached archive is reused) and verify
    data.sha256. Logs and errors name the URL with its credentials redacted."""
    url, sha256 = cfg.source, cfg.sha256
    shown = redact(url)
    name = PurePosixPath(urllib.parse.urlparse(url).path).name or "download"
    cached = Path(cfg.download_dir) / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    if cached.exists():
        if sha256 is None or sha256_file(cached) == sha256.lower():
            log.info("using cached %s for %s", cached, shown)
            return Downloaded(cached, None)
        log.info("cached %s does not match data.sha256; downloading again", cached)
    try:
        with atomic_path(cached) as tmp:
            final, actual = _stream(url, tmp, cfg)
            if sha256 is not None and actual != sha256.lower():
                raise FetchError(f"{shown}: sha256 mismatch: expected {sha256.lower()}, actual {actual}")
    except (urllib.error.URLError, HTTPException, OSError) as e:
        if isinstance(e, urllib.error.HTTPError):
            e = f"HTTP {e.code} {e.reason}"
        raise FetchError(f"download of {shown} failed: {e}") from None
    return Downloaded(cached, final)


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


def _request(url: str) -> tuple[urllib.request.Request, str | None]:
    """The request for `url`, and its basic-auth header: credentials in the URL's user-info go into
    one, as browsers and curl send them (urllib would take them for a host name). The header is
    "unredirected": urllib does not copy it into a redirect's request (_Redirects decides)."""
    parts = urllib.parse.urlsplit(url)
    auth = None
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        token = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
        auth = "Basic " + base64.b64encode(token).decode()
        url = urllib.parse.urlunsplit(parts._replace(netloc=host))
    req = urllib.request.Request(url, headers={"User-Agent": "image-pipeline/1"})
    if auth is not None:
        req.add_unredirected_header("Authorization", auth)
    return req, auth


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but never from https to http (the archive, and any credentials, would
    cross the network in clear), and sends the credentials only to the URL's own scheme, host and
    port."""

    def __init__(self, url: str, auth: str | None):
        self.url, self.auth = url, auth

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(req.full_url).scheme == "https" and urllib.parse.urlsplit(newurl).scheme != "https":
            raise FetchError(f"download of {redact(self.url)} refused: redirected from https to "
                             f"{redact(newurl)} (a downgrade to plain http)")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and self.auth is not None and _origin(newurl) == _origin(self.url):
            new.add_unredirected_header("Authorization", self.auth)
        return new


def _stream(url: str, dest: Path, cfg: Data) -> tuple[str, str]:
    """Download `url` into `dest` within the bounds; returns (the final URL, sha256 of the body)."""
    shown = redact(url)
    deadline = time.monotonic() + cfg.download_deadline_s
    req, auth = _request(url)
    opener = urllib.request.build_opener(_Redirects(url, auth))
    h = hashlib.sha256()
    with opener.open(req, timeout=cfg.timeout_s) as resp, open(dest, "wb") as f:
        final = resp.geturl()
        if final != req.full_url:
            log.info("%s redirected to %s", shown, redact(final))
        limit, bound = _size_limit(dest.parent, cfg)
        total = int(resp.headers.get("Content-Length") or 0) or None
        if total is not None and total > limit:
            raise FetchError(f"download of {shown} refused: its {total} bytes exceed {bound}")
        got = 0
        with progress(f"download {dest.name}", total=total, unit="B") as bar:
            # read1: what has arrived, at most CHUNK; read(CHUNK) would wait for a whole CHUNK, so a
            # trickling server would never reach the deadline check.
            while chunk := resp.read1(CHUNK):
                got += len(chunk)
                if got > limit:
                    raise FetchError(f"download of {shown} stopped: more than {bound}")
                if time.monotonic() > deadline:
                    raise FetchError(f"download of {shown} failed: not finished within "
                                     f"data.download_deadline_s={cfg.download_deadline_s:g} s ({got} bytes so far)")
                f.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
        if total is not None and got != total:
            raise FetchError(f"download of {shown} failed: got {got} of {total} bytes")
    return final, h.hexdigest()


def _size_limit(folder: Path, cfg: Data) -> tuple[int, str]:
    """The most bytes the download may have, and that bound in words for an error."""
    free = free_bytes(folder)
    if free < cfg.max_archive_bytes:
        return free, f"the {free} bytes free on the disk of data.download_dir={cfg.download_dir}"
    return cfg.max_archive_bytes, f"data.max_archive_bytes={cfg.max_archive_bytes}"


def verify_sha256(path: Path, expected: str | None) -> str:
    actual = sha256_file(path)
    if expected is not None and actual != expected.lower():
        raise FetchError(f"{path}: sha256 mismatch: expected {expected.lower()}, actual {actual}")
    return actual
