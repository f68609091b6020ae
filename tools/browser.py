"""Headless Chromium from the system's packages (Debian's `chromium`), driven by Playwright: for the
screenshots (`make screenshots`) and the tests of what a person sees in a browser. Playwright's own
browser download is never used: it needs the internet."""

from __future__ import annotations

import contextlib
import os
import shutil

CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


class Unavailable(RuntimeError):
    """No browser to drive here; the message says what is missing."""


def executable() -> str:
    """PIPELINE_CHROMIUM, else the first Chromium found."""
    wanted = os.environ.get("PIPELINE_CHROMIUM")
    for path in ([wanted] if wanted else []) + list(CANDIDATES) + [shutil.which("chromium") or ""]:
        if path and os.access(path, os.X_OK):
            return path
    raise Unavailable("no Chromium: install Debian's `chromium` package (apt-get install chromium) or set "
                      "PIPELINE_CHROMIUM")


@contextlib.contextmanager
def browser():
    """A headless Chromium (Playwright's Browser); closed on exit."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise Unavailable("the playwright package is not installed (requirements-dev.txt)") from None
    path = executable()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


def offline(context) -> None:
    """Refuse every request of `context` that leaves this machine (127.0.0.1 and file: stay)."""
    def route(r):
        url = r.request.url
        if url.startswith(("file:", "http://127.0.0.1", "http://localhost", "data:")):
            r.continue_()
        else:
            r.abort()
    context.route("**/*", route)
