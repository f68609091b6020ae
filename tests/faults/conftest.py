"""The fault suite's shared parts.

- `fault_log`: each test records what it tried and what happened (the exit code, the error line,
  MLflow statuses, hashes it compared); at the end of the session the records, with each test's
  outcome, become reports/faults.md: one Markdown table per area. A test that fails before it
  records anything still gets a row (its docstring and its failure), so the report never shows
  only the good news.
- Temp git + DVC repos made from this checkout, with fast params (`FAULT_PARAMS`): `pristine_repo`
  (never reproduced) and `baseline_repo` (one uninterrupted `dvc repro`, committed). Both are
  session-scoped and read-only: tests work on `.clone()`s, which cost a file copy, not a run.
- Processes started in their own session (`Background`), so a test can signal or kill -9 a whole
  `dvc repro` with its stage, the way a terminal's Ctrl-C, a CI cancel or the OOM killer does, and
  find the stage's own process among them (/proc, no psutil).
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import REPO, CheckpointWatch, build_repo, ran_stages, sh
from pipeline import train  # imported up front (torch, torchvision): the first read of a checkpoint must not take seconds

REPORT = REPO / "reports" / "faults.md"
AREAS = ("Interruptions", "Bad images", "Malicious archives", "Download faults", "Tracking faults",
         "Corruption", "Bad params")
_STARTED = time.monotonic()

# -- the recorder -----------------------------------------------------------------------------------


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


@pytest.fixture
def fault_log(request) -> BoundLog:
    return BoundLog(request.node.nodeid)


def _failure_line(report) -> str:
    text = getattr(report, "longreprtext", "") or ""
    lines = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")]
    line = lines[0] if lines else (text.strip().splitlines() or [""])[-1]
    return line[:300]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    doc = (getattr(item.obj, "__doc__", None) or item.name).strip().splitlines()[0]
    if getattr(item, "callspec", None) is not None:
        doc += f" [{item.callspec.id}]"
    out = RECORDER.outcomes.setdefault(item.nodeid, Outcome(getattr(item.module, "AREA", "Interruptions"), doc))
    if hasattr(report, "wasxfail"):
        out.status, out.message = ("xfailed", report.wasxfail) if report.skipped else ("failed", "XPASS(strict)")
    elif report.failed:
        out.status, out.message = "failed", f"{report.when}: {_failure_line(report)}"
    elif report.skipped and out.status == "passed":
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
        out.status, out.message = "skipped", reason.removeprefix("Skipped: ")
    return report


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


def write_report(path: Path = REPORT) -> None:
    outcomes = RECORDER.outcomes
    counts = {s: sum(1 for o in outcomes.values() if o.status == s) for s in ("passed", "failed", "xfailed", "skipped")}
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Fault suite: what was tried and what happened",
        "",
        "Written by `tests/faults/conftest.py` at the end of every pytest session that runs the fault tests",
        "(`.venv/bin/python -m pytest -q tests/faults`, and CI's `make test`). Each row is one fault a test",
        "injected and what the pipeline did, taken from the run itself: exit codes, error lines, MLflow run",
        "statuses, file hashes compared before and after. A row's result is its test's outcome.",
        "",
        f"Run {now}: {len(outcomes)} tests, {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['xfailed']} known gap(s) (xfail), {counts['skipped']} skipped; "
        f"{time.monotonic() - _STARTED:.0f} s.",
        "",
    ]
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


def pytest_sessionfinish(session, exitstatus):
    if RECORDER.outcomes:
        write_report()


# -- observed output ----------------------------------------------------------------------------------


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


# -- processes ------------------------------------------------------------------------------------------


def group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes in process group `pgid`, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append((int(entry.name), cmd))
    return out


class Background:
    """A command in its own session and process group (a test can signal all of it, as a terminal
    or CI does), its stdout and stderr in one log file."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict, log_path: Path):
        self.cmd, self.log_path = cmd, log_path
        self.log = open(log_path, "w+")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def members(self) -> list[tuple[int, str]]:
        return group_members(self.pid)

    def find(self, needle: str) -> int | None:
        return next((pid for pid, cmd in self.members() if needle in cmd), None)

    def signal_group(self, sig: int) -> None:
        os.killpg(self.pid, sig)

    def wait(self, timeout: float = 180) -> int:
        """Wait for the command and every process of its group (a stage that outlives a killed dvc)."""
        try:
            rc = self.proc.wait(timeout=timeout)
            deadline = time.monotonic() + timeout
            while self.members() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not self.members(), f"still running: {self.members()}"
            return rc
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")


def poll(check, what: str, timeout: float = 120, bg: Background | None = None, interval: float = 0.003):
    """Call `check()` until it returns something truthy (returned); fail if `bg` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if bg is not None and not bg.alive():
            raise AssertionError(f"{' '.join(bg.cmd)} exited {bg.proc.returncode} before {what}:\n{bg.output()[-3000:]}")
        time.sleep(interval)
    if bg is not None:
        bg.kill()
    raise AssertionError(f"no {what} within {timeout}s" + (f":\n{bg.output()[-3000:]}" if bg else ""))


def read_checkpoint(path: Path) -> dict | None:
    """What train's read_checkpoint reads there (checksum checked), or None: absent or damaged."""
    try:
        return train.read_checkpoint(path)
    except (FileNotFoundError, ValueError, RuntimeError, EOFError, OSError):
        return None


def wait_for_checkpoint(repo: "Repo", bg: Background, epoch: int, timeout: float = 180) -> dict:
    """The train checkpoint once it holds epoch >= `epoch` (a damaged version read is skipped)."""
    watch = CheckpointWatch(repo.checkpoint(), read_checkpoint)
    return poll(lambda: watch.at_least(epoch), f"checkpoint of epoch {epoch}", timeout, bg)


# -- temp git + DVC repos -------------------------------------------------------------------------------

# The pipeline in seconds, with enough epochs to interrupt (no early stopping: patience > epochs).
FAULT_PARAMS = {
    "prepare": {"image_size": 8, "min_images_per_class": 3},
    "train": {"epochs": 8, "hidden_units": 4, "batch_size": 32, "patience": 100},
}


class Repo:
    """A temp git + DVC repo holding this checkout's files (tracked, and untracked ones git does not
    ignore: work in progress is tested as it is), with FAULT_PARAMS and a local image source."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env = root, env

    @classmethod
    def build(cls, root: Path, mlflow_template: Path) -> "Repo":
        return cls(root, build_repo(root, mlflow_template, FAULT_PARAMS))

    def clone(self, dest: Path) -> "Repo":
        """A copy (git, DVC cache and lock, MLflow store, outputs) to change freely. Its MLflow store
        names this repo's mlruns/ for artifacts (absolute paths): clones add runs there, never remove."""
        shutil.copytree(self.root, dest, symlinks=True, ignore=shutil.ignore_patterns("mlruns"))
        return Repo(dest, {**self.env, "PYTHONPATH": str(dest)})

    # files and params
    def path(self, rel: str) -> Path:
        return self.root / rel

    def params(self) -> dict:
        return yaml.safe_load(self.path("params.yaml").read_text())

    def set(self, **values) -> None:
        """set(train__epochs=3): section__key=value into params.yaml."""
        p = self.params()
        for key, value in values.items():
            section, name = key.split("__", 1)
            p[section][name] = value
        self.path("params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))

    def checkpoint(self) -> Path:
        return self.path(self.params()["train"]["checkpoint_dir"]) / "train.pt"

    def lock(self) -> bytes:
        return self.path("dvc.lock").read_bytes()

    def lock_stage(self, stage: str) -> dict | None:
        return (yaml.safe_load(self.lock()) or {}).get("stages", {}).get(stage)

    # commands
    def git(self, *args: str) -> subprocess.CompletedProcess:
        return sh(["git", *args], self.root, self.env)

    def commit(self, message: str) -> None:
        self.git("add", "-A")
        self.git("commit", "-qm", message)

    def dvc(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return sh(["dvc", *args], self.root, self.env, check=check, timeout=timeout)

    def stage(self, stage: str, *args: str, check: bool = False, timeout: float = 300,
              env: dict | None = None) -> subprocess.CompletedProcess:
        """`python -m pipeline.<stage>` as dvc.yaml runs it, in the foreground."""
        return sh([sys.executable, "-m", f"pipeline.{stage}", *args], self.root, {**self.env, **(env or {})},
                  check=check, timeout=timeout)

    def start(self, *cmd: str, env: dict | None = None) -> Background:
        log = self.root.parent / f"{self.root.name}-{time.monotonic_ns()}.log"
        return Background(list(cmd), self.root, {**self.env, **(env or {})}, log)

    def start_dvc(self, *args: str, env: dict | None = None) -> Background:
        return self.start("dvc", *args, env=env)

    def start_stage(self, stage: str, env: dict | None = None) -> Background:
        return self.start(sys.executable, "-m", f"pipeline.{stage}", env=env)

    # MLflow (the repo's own sqlite store)
    @property
    def db(self) -> Path:
        return self.path("mlflow.db")

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=f"sqlite:///{self.db}")

    def runs(self) -> list:
        c = self.client()
        exp = c.get_experiment_by_name(self.params()["mlflow"]["experiment"])
        return c.search_runs([exp.experiment_id]) if exp else []

    def champion_version(self) -> str | None:
        """@champion's version, read straight from the store (no MLflow client: works while a stage runs)."""
        name = self.params()["mlflow"]["registered_model"]
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30) as con:
            row = con.execute("SELECT version FROM registered_model_aliases WHERE name = ? AND alias = 'champion'",
                              (name,)).fetchone()
        return str(row[0]) if row else None

    def epoch_steps(self, run_id: str, key: str = "val_loss") -> list[int]:
        return sorted(m.step for m in self.client().get_metric_history(run_id, key))


def temp_leftovers(*folders: Path) -> list[str]:
    """Temp or old copies (`.<name>.tmp-*`, `.<name>.old-*`) a writer left in `folders`."""
    return sorted(str(p) for f in folders if f.is_dir() for p in f.glob(".*") if re.search(r"\.(tmp|old)-", p.name))


@pytest.fixture(scope="session")
def pristine_repo(tmp_path_factory, mlflow_template) -> Repo:
    """This checkout as a git + DVC repo with FAULT_PARAMS, never reproduced. Read-only: clone it."""
    return Repo.build(tmp_path_factory.mktemp("pristine") / "repo", mlflow_template)


@pytest.fixture(scope="session")
def baseline_repo(pristine_repo, tmp_path_factory) -> Repo:
    """pristine_repo after one uninterrupted `dvc repro`, committed: the reference result, and
    model version 1 @champion. Read-only: clone it."""
    repo = pristine_repo.clone(tmp_path_factory.mktemp("baseline") / "repo")
    proc = repo.dvc("repro")
    assert ran_stages(proc.stdout) == {"fetch_data", "prepare", "train", "evaluate"}, proc.stdout
    repo.commit("baseline repro")
    return repo
