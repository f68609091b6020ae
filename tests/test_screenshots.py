"""`make screenshots` in a real headless Chromium: the MLflow UI's runs list and a run's pages, and
`dvc plots show`'s page opened with the internet cut off."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from helpers.browser import browser_or_skip
from helpers.project import sh


def test_screenshots_show_runs_curves_system_metrics_and_offline_plots(baseline_repo, tmp_path):
    browser_or_skip()
    repo = baseline_repo.clone(tmp_path / "repo")
    out = tmp_path / "shots"
    # the tool waits on each MLflow page for what it must show: the run's name in the runs list, the
    # charts' "Step" axis, the system metrics' cpu_utilization_percentage chart
    done = sh([sys.executable, "-m", "tools.screenshots", "--out", str(out)], repo.root, repo.env(), timeout=600)
    for name in ("mlflow_runs", "mlflow_run", "mlflow_system_metrics", "dvc_plots"):
        assert f"{name}: " in done.stdout, done.stdout
        pixels = np.asarray(Image.open(out / f"{name}.png").convert("L"), dtype=float)
        assert pixels.std() > 10, f"{name}.png is blank"  # a page drew, not an empty one
    # dvc plots show's page needs nothing from the internet: PNGs, no scripts from a CDN
    repo.dvc("plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    assert html.count("<img") == 3 and "<script" not in html and "cdn." not in html
