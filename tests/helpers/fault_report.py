"""The fault suite's report: each test records what it tried and what happened (the exit code, the
error line, MLflow statuses, hashes it compared); at the end of the session the records, with each
test's outcome, become reports/faults.md: one Markdown table per area. A test that fails before it
records anything still gets a row (its docstring and its failure), so the report never shows only
the good news. tests/faults/conftest.py feeds it through pytest's hooks."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from helpers.project import REPO

REPORT = REPO / "reports" / "faults.md"
AREAS = ("Interruptions", "Bad images", "Malicious archives", "Local sources", "Download faults", "Tracking faults",
         "Disks and crashes", "Corruption", "Bad params", "Predict inputs")
_STARTED = time.monotonic()


@dataclass
class Row:
    area: str
    tried: str
    happened: str
    nodeid: str
    passed: bool | None = None  # None: as the test's outcome says


@dataclass
class Outcome:
    area: str
    doc: str
    status: str = "passed"  # passed | failed | xfailed | skipped
    message: str = ""


@dataclass
class FaultLog:
    rows: list[Row] = field(default_factory=list)
    outcomes: dict[str, Outcome] = field(default_factory=dict)


RECORDER = FaultLog()


class BoundLog:
    """`fault_log` inside one test: record(area, what was tried, what happened[, passed])."""

    def __init__(self, nodeid: str):
        self.nodeid = nodeid

    def record(self, area: str, tried: str, happened: str, passed: bool | None = None) -> None:
        assert area in AREAS, area
        RECORDER.rows.append(Row(area, tried, happened, self.nodeid, passed))


def _cell(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[:limit] + " …"
    return text.replace("|", "\\|")


def _result(row_passed: bool | None, out: Outcome) -> str:
    if out.status == "failed" or row_passed is False:
        return f"**FAIL**: {_cell(out.message or 'recorded as failed', 200)}"
    if out.status == "xfailed":
        return f"**known gap** (xfail): {_cell(out.message, 300)}"
    if out.status == "skipped":
        return f"skipped: {_cell(out.message, 200)}"
    return "pass"


def running_runs(folder: Path) -> tuple[int, list[str]]:
    """(MLflow sqlite stores under `folder`, the runs still RUNNING in them as "<store>: <run id>")."""
    import sqlite3

    stores, running = 0, []
    for db in folder.rglob("*.db"):
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
                rows = con.execute("SELECT run_uuid FROM runs WHERE status = 'RUNNING' AND "
                                   "lifecycle_stage = 'active'").fetchall()
        except sqlite3.Error:  # not an MLflow store
            continue
        stores += 1
        running += [f"{db.relative_to(folder)}: {r[0]}" for r in rows]
    return stores, running


PARTS = REPORT.parent / ".faults-parts"  # one file per pytest-xdist worker, merged by the controller


def start_session(is_worker: bool) -> None:
    if not is_worker:
        shutil.rmtree(PARTS, ignore_errors=True)


def finish_session(worker: str | None, temp: Path) -> None:
    """A worker leaves its records for the controller; the controller (or a session without
    workers) merges them and writes the report."""
    if worker is not None:
        if RECORDER.outcomes:
            PARTS.mkdir(parents=True, exist_ok=True)
            (PARTS / f"{worker}.json").write_text(json.dumps(
                {"rows": [asdict(r) for r in RECORDER.rows],
                 "outcomes": {k: asdict(v) for k, v in RECORDER.outcomes.items()}}))
        return
    for part in sorted(PARTS.glob("*.json")) if PARTS.is_dir() else []:
        data = json.loads(part.read_text())
        RECORDER.rows += [Row(**r) for r in data["rows"]]
        RECORDER.outcomes.update({k: Outcome(**v) for k, v in data["outcomes"].items()})
    shutil.rmtree(PARTS, ignore_errors=True)
    if RECORDER.outcomes:
        write_report(temp=temp)


def write_report(path: Path = REPORT, temp: Path | None = None) -> None:
    """The report; with `temp`, the session's temp folder, also the runs its stores hold RUNNING."""
    outcomes = RECORDER.outcomes
    counts = {s: sum(1 for o in outcomes.values() if o.status == s) for s in ("passed", "failed", "xfailed", "skipped")}
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Fault suite: what was tried and what happened",
        "",
        "Written by tests/helpers/fault_report.py at the end of every pytest session that runs the fault tests",
        "(`.venv/bin/python -m pytest -q tests/faults`, and CI's `make test`). Each row is one fault a test",
        "injected and what the pipeline did, taken from the run itself: exit codes, error lines, MLflow run",
        "statuses, file hashes compared before and after. A row's result is its test's outcome.",
        "",
        f"Run {now}: {len(outcomes)} tests, {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['xfailed']} known gap(s) (xfail), {counts['skipped']} skipped; "
        f"{time.monotonic() - _STARTED:.0f} s.",
        "",
    ]
    if temp is not None:
        stores, running = running_runs(temp)
        lines += [f"MLflow runs left RUNNING in the session's {stores} stores at its end: {len(running)}"
                  + (": " + "; ".join(running[:20]) if running else "") + ".", ""]
    for area in AREAS:
        rows = [r for r in RECORDER.rows if r.area == area]
        recorded = {r.nodeid for r in RECORDER.rows}
        silent = [(n, o) for n, o in outcomes.items() if o.area == area and n not in recorded]
        if not rows and not silent:
            continue
        lines += [f"## {area}", "", "| what was tried | what happened | result | test |", "|---|---|---|---|"]
        for r in rows:
            out = outcomes.get(r.nodeid, Outcome(area, "", "failed", "did not finish"))
            lines.append(f"| {_cell(r.tried)} | {_cell(r.happened)} | {_result(r.passed, out)} | "
                         f"`{r.nodeid.split('::', 1)[-1]}` |")
        for nodeid, out in silent:  # a test that ended before recording: its docstring and outcome
            lines.append(f"| {_cell(out.doc)} | (nothing recorded: {_cell(out.message or out.status, 300)}) | "
                         f"{_result(None, out)} | `{nodeid.split('::', 1)[-1]}` |")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)




def failure_line(report) -> str:
    text = getattr(report, "longreprtext", "") or ""
    lines = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")]
    line = lines[0] if lines else (text.strip().splitlines() or [""])[-1]
    return line[:300]


def record_outcome(item, report) -> None:
    """Keep the outcome of one test phase (pytest's report) for write_report."""
    doc = (getattr(item.obj, "__doc__", None) or item.name).strip().splitlines()[0]
    if getattr(item, "callspec", None) is not None:
        doc += f" [{item.callspec.id}]"
    out = RECORDER.outcomes.setdefault(item.nodeid, Outcome(getattr(item.module, "AREA", "Interruptions"), doc))
    if hasattr(report, "wasxfail"):
        out.status, out.message = ("xfailed", report.wasxfail) if report.skipped else ("failed", "XPASS(strict)")
    elif report.failed:
        out.status, out.message = "failed", f"{report.when}: {failure_line(report)}"
    elif report.skipped and out.status == "passed":
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
        out.status, out.message = "skipped", reason.removeprefix("Skipped: ")
