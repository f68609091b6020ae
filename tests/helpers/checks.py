"""Checks of how a stage failed: exit status, the one error line, and nothing lost."""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

import pytest

from helpers.files import leftovers, raw_state

if TYPE_CHECKING:
    from helpers.project import Project


def error_line(text: str) -> str:
    """The line a stage or DVC printed for its failure (`... pipeline: error: ...`, `ERROR: ...`),
    else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if " error: " in ln or ln.startswith("ERROR:") or "interrupted (SIGINT)" in ln or "terminated (SIGTERM)" in ln:
            return ln
    return lines[-1] if lines else ""


def lines_with(text: str, needle: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if needle in ln]


def assert_failed_cleanly(project: Project, proc: subprocess.CompletedProcess, before, *texts: str) -> None:
    """A stage run exited 1 with one clear error line holding `texts` (no traceback), and left
    data/raw + data/raw.json as `before` (raw_state) with no temp folders behind."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for text in texts:
        assert text in proc.stderr, f"{text!r} not in:\n{proc.stderr}"
    assert raw_state(project) == before
    assert leftovers(project.path("data")) == []


def fetch_fails(project: Project, *texts: str) -> str:
    """fetch raises a PipelineError (what run_stage prints) holding `texts`, and leaves data/raw +
    data/raw.json exactly as they were, with no temp folders behind. Returns the message."""
    from pipeline.errors import PipelineError
    from pipeline.fetch_data import fetch

    before = raw_state(project)
    with pytest.raises(PipelineError) as err:
        project.call(fetch)
    message = str(err.value)
    for text in texts:
        assert text in message, f"{text!r} not in: {message}"
    assert raw_state(project) == before
    assert leftovers(project.path("data")) == []
    return message
