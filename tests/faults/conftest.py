"""The fault suite's fixtures and report hooks.

- `fault_log`: each test records what it tried and what happened; at the end of the session the
  records become reports/faults.md (helpers/fault_report.py).
The temp git + DVC repos the fault tests start from (`pristine_repo`, `baseline_repo`) are in
tests/conftest.py.
"""

from __future__ import annotations

import pytest
from helpers import fault_report


@pytest.fixture
def fault_log(request) -> fault_report.BoundLog:
    return fault_report.BoundLog(request.node.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    fault_report.record_outcome(item, report)
    return report

