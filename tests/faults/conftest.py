"""The fault suite's fixtures and report hooks.

- `fault_log`: each test records what it tried and what happened; at the end of the session the
  records become reports/faults.md (helpers/fault_report.py).
- `pristine_repo` (never reproduced) and `baseline_repo` (one uninterrupted `dvc repro`, committed):
  temp git + DVC repos made from this checkout with FAULT_FAST params. Both are session-scoped and
  read-only: tests work on `.clone()`s, which cost a file copy, not a run.
"""

from __future__ import annotations

import pytest

from helpers import fault_report
from helpers.project import FAULT_FAST, Repo, ran_stages


@pytest.fixture
def fault_log(request) -> fault_report.BoundLog:
    return fault_report.BoundLog(request.node.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    fault_report.record_outcome(item, report)
    return report


def pytest_sessionfinish(session, exitstatus):
    if fault_report.RECORDER.outcomes:
        fault_report.write_report(temp=session.config._tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def pristine_repo(tmp_path_factory, mlflow_template) -> Repo:
    """This checkout as a git + DVC repo with FAULT_FAST params, never reproduced."""
    return Repo.create(tmp_path_factory.mktemp("pristine") / "repo", mlflow_template, **FAULT_FAST)


@pytest.fixture(scope="session")
def baseline_repo(pristine_repo, tmp_path_factory) -> Repo:
    """pristine_repo after one uninterrupted `dvc repro` and `promote` (`make repro`), committed: the
    reference result, and model version 1 @champion."""
    repo = pristine_repo.clone(tmp_path_factory.mktemp("baseline") / "repo")
    proc = repo.dvc("repro")
    assert ran_stages(proc.stdout) == {"fetch_data", "prepare", "train", "evaluate"}, proc.stdout
    repo.run("promote")
    repo.commit("baseline repro")
    return repo
