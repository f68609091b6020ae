"""The browser tests' precondition: Playwright and a Chromium (tools/browser.py), else a skip that says
what is missing."""

from __future__ import annotations

import pytest


def browser_or_skip() -> None:
    from tools.browser import Unavailable, executable

    try:
        import playwright  # noqa: F401
        executable()
    except (ImportError, Unavailable) as e:
        pytest.skip(f"no browser to drive: {e}")
