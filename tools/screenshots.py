"""`make screenshots`: what a user sees after `make repro`, as PNGs in reports/screenshots/:

- mlflow_runs.png: the MLflow UI's runs list of the experiment (the URL the README gives);
- mlflow_run.png: the newest run's page with its metric charts;
- mlflow_system_metrics.png: that run's System metrics tab;
- dvc_plots.png: `dvc plots show`'s page, opened with every request beyond this machine refused.

It starts `mlflow ui` on the workspace's store on a free loopback port and stops it afterwards.
Needs Chromium and Playwright (tools/browser.py); without them it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tools.browser import Unavailable, browser, offline

OUT = Path("reports/screenshots")
# MLflow 3's UI opens on a GenAI overview with an assistant panel unless told it is model training.
UI_SETTINGS = """
localStorage.setItem('mlflow.workflowType_v1', '"machine_learning"');
localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(tracking_uri: str, folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(folder / "mlflow-ui.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow ui exited {proc.returncode}: {(folder / 'mlflow-ui.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2).close()
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow ui did not answer within 180 s")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, 9)


def take(out: Path, experiment: str) -> dict[str, Path]:
    import mlflow

    from pipeline import tracking

    uri = tracking.tracking_uri()
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in {tracking.redacted_uri()}: run `make repro` first")
    run = mlflow.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1,
                             output_format="list")[0]
    out.mkdir(parents=True, exist_ok=True)
    shots = {}
    with tempfile.TemporaryDirectory() as tmp:
        plots = Path(tmp) / "plots"
        subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(plots)], check=True, capture_output=True)
        proc, url = start_ui(uri, Path(tmp))
        try:
            with browser() as b:
                ctx = b.new_context(viewport={"width": 1500, "height": 1100})
                ctx.add_init_script(UI_SETTINGS)
                offline(ctx)
                page = ctx.new_page()
                runs = tracking.runs_url(exp.experiment_id, url)
                base = f"{url}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
                for name, target, ready in (("mlflow_runs", runs, run.info.run_name),
                                            ("mlflow_run", f"{base}/model-metrics", "Step"),
                                            ("mlflow_system_metrics", f"{base}/system-metrics", "cpu_utilization_percentage")):
                    page.goto(target, wait_until="load")
                    page.get_by_text(ready).first.wait_for(timeout=90_000)
                    page.wait_for_timeout(3000)  # charts draw after their data arrive
                    shots[name] = out / f"{name}.png"
                    page.screenshot(path=shots[name])
                page.goto((plots / "index.html").as_uri(), wait_until="load")
                page.wait_for_timeout(500)
                shots["dvc_plots"] = out / "dvc_plots.png"
                page.screenshot(path=shots["dvc_plots"], full_page=True)
                ctx.close()
        finally:
            stop(proc)
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.screenshots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    from pipeline.config import PARAMS_FILE, load_params

    try:
        shots = take(args.out, load_params(PARAMS_FILE).mlflow.experiment)
    except Unavailable as e:
        print(f"screenshots skipped: {e}")
        return 0
    for name, path in shots.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
