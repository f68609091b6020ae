"""Tracking faults: the tracking server down when train starts, the server dying mid-training (and
coming back), and the local sqlite store locked by a concurrent writer. Real `mlflow server`s (with
basic auth, started by `make server`'s module) on free loopback ports; train as the real stage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from helpers.checks import error_line, lines_with
from helpers.mlflow_server import Server, free_port
from helpers.project import REPO
from helpers.training import EPOCH_KEYS, EPOCH_METRICS, read_checkpoint, wait_for_checkpoint
from pipeline.tracking import SQLITE_BUSY_TIMEOUT_S

AREA = "Tracking faults"
def test_tracking_server_down_at_start_fails_fast(baseline_repo, tmp_path, fault_log):
    """train with MLFLOW_TRACKING_URI pointing at a server that is not running."""
    repo = baseline_repo.clone(tmp_path / "repo")
    model = repo.path("models/model.pt").read_bytes()
    down = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = repo.run("train", check=False, env={"MLFLOW_TRACKING_URI": down})
    elapsed = time.monotonic() - start
    line = error_line(proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    # Starting Python and importing torch and mlflow alone takes 5-10 s on a 2-core machine; what this
    # guards against is MLflow's own retries, which take minutes.
    assert elapsed < 60, f"took {elapsed:.1f}s"
    assert down in line and "unreachable" in line
    assert "epoch 1/" not in proc.stderr  # before any training
    assert repo.path("models/model.pt").read_bytes() == model and not repo.checkpoint().exists()
    fault_log.record(AREA, "train with MLFLOW_TRACKING_URI at a closed loopback port (server down at start)",
                     f"exit {proc.returncode} after {elapsed:.1f} s, before any epoch: "
                     f"'{line.split(' pipeline: ', 1)[-1]}'; models/model.pt untouched, no checkpoint")


def run_metrics_once(client, run_id: str, epochs: int) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        steps = sorted(m.step for m in client.get_metric_history(run_id, EPOCH_KEYS[key]))
        assert steps == list(range(1, epochs + 1)), (key, steps)


def configure_after_losing_the_race(server: Server, root: Path, experiment: str, monkeypatch) -> tuple:
    """tracking.configure() in this process as a stage that loses the race to create the experiment on
    a fresh server: after its look-up found nothing, another stage created it. Returns (the experiment
    this stage's runs would go to, the experiment's id)."""
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    from helpers.project import inside_project
    from pipeline import tracking

    other = server.client(monkeypatch)
    real = TrackingServiceClient.get_experiment_by_name
    first = [True]

    def looked_too_early(self, name):
        if first[0]:
            first[0] = False
            other.create_experiment(name)  # the other stage, between this one's look-up and its creation
            return None
        return real(self, name)

    with inside_project(types.SimpleNamespace(root=root, tracking_uri=server.url)), monkeypatch.context() as m:
        fluent._active_experiment_id = None
        m.setattr(TrackingServiceClient, "get_experiment_by_name", looked_too_early)
        tracking.configure(experiment)
        active = fluent._active_experiment_id
    return active, other.get_experiment_by_name(experiment).experiment_id


def outage_repo(baseline_repo, tmp_path, epochs: int):
    repo = baseline_repo.clone(tmp_path / "repo")
    repo.set(train__epochs=epochs)
    repo.path("models/model.pt").unlink()
    return repo


def test_tracking_server_dying_mid_training(baseline_repo, tmp_path, fault_log, monkeypatch):
    """The tracking server is killed (SIGKILL) mid-training and restarted after the stage failed; train re-run."""
    epochs = 8  # baseline_repo's: the server dies at epoch 1's logging, so epochs 2..8 are left to resume
    server = Server(tmp_path / "server")
    server.start()
    try:
        repo = outage_repo(baseline_repo, tmp_path, epochs)
        experiment = repo.params()["mlflow"]["experiment"]
        active, created = configure_after_losing_the_race(server, repo.root, experiment, monkeypatch)
        assert active == created
        # MLflow's HTTP retries off: an outage longer than MLflow's retry window (by default 7 retries
        # with exponential backoff, about 4 minutes), without waiting those minutes.
        env = server.client_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
        bg = repo.start_stage("train", env=env)
        first = wait_for_checkpoint(repo, bg, epoch=1)
        server.stop(signal.SIGKILL)
        rc = bg.wait(120)  # fails at its next MLflow call
        out = bg.output()
        left = read_checkpoint(repo.checkpoint())
        line = error_line(out)
        assert rc == 1 and "Traceback" not in out, out[-3000:]
        assert server.url in line and "stopped answering" in line, line
        assert left is not None and left["run_id"] == first["run_id"]
        assert 1 <= left["epoch"] < epochs  # the checkpoint is kept
        assert not repo.path("models/model.pt").exists()

        server.start()  # same port, same stores
        resumed = repo.run("train", check=False, env=env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resuming MLflow run {left['run_id']} from epoch {left['epoch']}" in resumed.stderr
        run_metrics_once(server.client(monkeypatch), first["run_id"], epochs)
        assert repo.path("models/model.pt").exists() and not repo.checkpoint().exists()
    finally:
        server.stop()
    fault_log.record(
        AREA, "two stages start at once on a fresh tracking server: this one looks the experiment up (none), the "
              "other creates it, then this one creates it (tracking.configure, in-process, the race forced)",
        f"the creation's 'already exists' is taken as done: the stage's active experiment is '{experiment}' (id "
        f"{active}), where its runs go (MLflow's own set_experiment returns from that race without activating it, "
        "and the run went to 'Default': fixed in tracking.configure)")
    warning = lines_with(out, "could not mark the MLflow run")
    fault_log.record(
        AREA, f"tracking server SIGKILLed after epoch {first['epoch']}'s checkpoint of a train of {epochs} epochs, MLflow "
              "HTTP retries off (= an outage longer than MLflow's retry window); server restarted on the same port "
              "and store; train re-run",
        f"train exit {rc} at epoch {left['epoch']}, no traceback: '{line.split(' pipeline: ', 1)[-1]}'"
        + (" (and a warning: the run could not be marked FAILED)" if warning else "")
        + f"; checkpoint kept, no models/model.pt. Re-run: exit 0, "
          f"'{lines_with(resumed.stderr, 'resuming MLflow run')[0].split(': ', 1)[-1]}'; the run FINISHED with each of "
          f"{len(EPOCH_METRICS)} epoch metrics logged exactly once for epochs 1..{epochs}; server start-ups took "
          f"{', '.join(f'{t:.0f} s' for t in server.starts)}")


@pytest.mark.skipif(not os.environ.get("FAULTS_SLOW"), reason="about a minute (MLflow's retry backoff): FAULTS_SLOW=1")
def test_tracking_server_back_within_mlflow_retry_window(baseline_repo, tmp_path, fault_log, monkeypatch):
    """The tracking server is killed mid-training and restarted at once, while train waits in MLflow's retries."""
    epochs = 30
    server = Server(tmp_path / "server")
    server.start()
    try:
        repo = outage_repo(baseline_repo, tmp_path, epochs)
        # MLflow's 7 retries with backoff factor 1 instead of 2 (tries at about 1, 3, 7, 15, 31, 63 s): the
        # same mechanism as the default's ~4 minute window, so that the test waits less.
        bg = repo.start_stage("train", env=server.client_env(MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1"))
        first = wait_for_checkpoint(repo, bg, epoch=1)
        server.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        server.start()
        back = time.monotonic() - killed_at
        rc = bg.wait(300)
        done = time.monotonic() - killed_at
        out = bg.output()
        assert rc == 0, out[-3000:]
        assert "Retrying" in out and "resuming" not in out
        run_metrics_once(server.client(monkeypatch), first["run_id"], epochs)
        assert repo.path("models/model.pt").exists() and not repo.checkpoint().exists()
    finally:
        server.stop()
    fault_log.record(
        AREA, f"tracking server SIGKILLed after epoch {first['epoch']}'s checkpoint of a train of {epochs} epochs and "
              f"restarted at once (back after {back:.0f} s), MLflow's HTTP retries on",
        f"train waited in MLflow's retries ({len(lines_with(out, 'Retrying'))} retries) and went on: exit {rc}, "
        f"{done:.0f} s after the kill, no resume needed; the run FINISHED with every epoch's metrics exactly once "
        f"(1..{epochs}), models/model.pt written")


LOCKER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
con.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.execute("COMMIT")
print("released", flush=True)
"""


def test_sqlite_store_locked_by_a_concurrent_writer(baseline_repo, tmp_path, fault_log):
    """Another process holds an exclusive lock on mlflow.db while train logs to it."""
    repo = baseline_repo.clone(tmp_path / "repo")
    hold = 6.5  # over sqlite3's default busy timeout (5 s), under the stage's SQLITE_BUSY_TIMEOUT_S
    assert 5 < hold < SQLITE_BUSY_TIMEOUT_S
    assert "MLFLOW_TRACKING_URI" not in repo.env()  # the default store: sqlite:///<repo>/mlflow.db?timeout=60
    bg = repo.start_stage("train")
    ckpt = wait_for_checkpoint(repo, bg, epoch=1)
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(repo.db), str(hold)], stdout=subprocess.PIPE,
                              text=True)
    assert locker.stdout.readline().strip() == "locked"
    locked_at = time.monotonic()
    assert bg.alive()  # train had not finished when the lock was taken
    rc = bg.wait(300)
    waited = time.monotonic() - locked_at
    assert locker.wait(30) == 0 and locker.stdout.readline().strip() == "released"
    out = bg.output()
    assert rc == 0, out[-3000:]
    assert waited >= hold - 0.5  # it could not finish while the lock was held
    run = repo.client().get_run(ckpt["run_id"])
    epochs = repo.params()["train"]["epochs"]
    assert run.info.status == "FINISHED"
    assert repo.epoch_steps(run.info.run_id) == list(range(1, epochs + 1))
    assert "database is locked" not in out
    fault_log.record(AREA, f"a second process holds `BEGIN EXCLUSIVE` on mlflow.db for {hold:g} s (longer than "
                           "sqlite's default 5 s busy timeout) from train's epoch 1 on; MLFLOW_TRACKING_URI unset",
                     f"train waited on the lock (finished {waited:.1f} s after it was taken), exit {rc}; the run "
                     f"FINISHED with val_loss logged once for each epoch 1..{epochs}; no 'database is locked'")


# -- tracking state that no longer exists -----------------------------------------------------------


def killed_after_a_checkpoint(train_data, tmp_path, mlflow_template):
    """A project whose train was kill -9ed after its first checkpoint: (project, checkpoint)."""
    from helpers.project import copy_prepared

    p = copy_prepared(train_data, tmp_path, mlflow_template, train__epochs=100, train__patience=100)
    bg = p.start_stage("train")
    ckpt = wait_for_checkpoint(p, bg, epoch=1)
    bg.kill()
    assert read_checkpoint(p.checkpoint())["epoch"] < 100
    return p, ckpt


@pytest.mark.parametrize("gone", ["deleted", "other store"])
def test_checkpoint_whose_run_is_gone_is_set_aside(train_data, tmp_path, mlflow_template, fault_log, gone):
    """A killed train's checkpoint whose MLflow run was deleted from the UI, or lives in another store."""
    p, ckpt = killed_after_a_checkpoint(train_data, tmp_path, mlflow_template)
    if gone == "deleted":
        p.client().delete_run(ckpt["run_id"])  # the same params and store: only the run is gone
        expected = f"its MLflow run {ckpt['run_id']} is not in the tracking store"
    else:
        import shutil

        shutil.copy(mlflow_template, tmp_path / "other.db")
        p.tracking_uri = f"sqlite:///{tmp_path / 'other.db'}"
        expected = "params, data or tracking store changed"
    proc = p.run("train", check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert expected in proc.stderr and "kept as train.stale" in proc.stderr
    assert "epoch 1/100" in proc.stderr and "resuming MLflow run" not in proc.stderr  # trained afresh
    (new,) = [r for r in p.runs() if r.info.run_id != ckpt["run_id"]]
    assert new.info.status == "FINISHED"
    fault_log.record(AREA, f"a killed train's checkpoint whose MLflow run is gone ({gone}), then train again",
                     f"exit 0; warning: '{lines_with(proc.stderr, 'not resuming')[0].split(': ', 1)[-1][:200]}'; "
                     "trained from epoch 1 in a new run, FINISHED")


def test_train_killed_before_its_first_checkpoint_leaves_no_run_running(train_data, tmp_path, mlflow_template,
                                                                        fault_log):
    """kill -9 of train after its MLflow run started and before its first checkpoint; train again."""
    import sqlite3

    from helpers.processes import poll
    from helpers.project import copy_prepared

    p = copy_prepared(train_data, tmp_path, mlflow_template, train__batch_size=1, train__epochs=3)
    db = p.tracking_uri.removeprefix("sqlite:///")

    def running_run():
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
            row = con.execute("SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                              "WHERE r.status = 'RUNNING' AND t.key = 'pipeline.process'").fetchone()
        return row[0] if row else None

    bg = p.start_stage("train")
    orphan = poll(running_run, "a RUNNING run claimed by train", timeout=120, bg=bg, interval=0.002)
    bg.kill()
    assert not p.checkpoint().exists(), "the kill came after the first checkpoint"
    assert p.client().get_run(orphan).info.status == "RUNNING"

    proc = p.run("train")
    run = p.client().get_run(orphan)
    assert run.info.status == "KILLED" and "ended without ending the run" in run.data.tags["abandoned"]
    assert f"MLflow run {orphan} was left RUNNING by a killed process" in proc.stderr
    assert [r.info.status for r in p.runs() if r.info.run_id != orphan] == ["FINISHED"]
    fault_log.record(AREA, "kill -9 of train after its run started, before its first checkpoint; train again",
                     f"the orphaned run {run.info.status} with tag abandoned='{run.data.tags['abandoned']}'; "
                     "the new run FINISHED")


def test_evaluate_of_a_run_not_in_this_store_says_what_to_do(eval_trained, tmp_path, mlflow_template, fault_log):
    """evaluate while MLFLOW_TRACKING_URI names a store without the run reports/train.json names."""
    import shutil

    p = eval_trained.clone(tmp_path / "p")
    shutil.copy(mlflow_template, tmp_path / "other.db")
    p.tracking_uri = f"sqlite:///{tmp_path / 'other.db'}"
    proc = p.run("evaluate", check=False)
    line = error_line(proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "reports/train.json names MLflow run" in line and "dvc repro -f train" in line
    assert not p.path("reports/metrics.json").exists()
    fault_log.record(AREA, "evaluate against a tracking store that lacks reports/train.json's run",
                     f"exit 1: '{line.split('error: ', 1)[-1]}'")


# A registry call as evaluate makes them (pipeline.registry), in a process with the stages' signal
# handlers: SIGINT arrives while the call waits for the tracking server's answer.
REGISTRY_CALL = """
import signal, sys, time
from pipeline import cli, registry

signal.signal(signal.SIGINT, cli._on_signal)
try:
    registry.versions("image-classifier")
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


def test_registry_call_finishes_before_an_interrupt(http_server, fault_log):
    """SIGINT during a model-registry call (evaluate registers, reads and tags versions): the call
    completes, then the process stops, so no registry request is cut half-way."""
    http_server.serve("/api/2.0/mlflow/model-versions/search", b'{"model_versions": []}', "held")
    proc = subprocess.Popen([sys.executable, "-c", REGISTRY_CALL], env={**os.environ, "PYTHONPATH": str(REPO),
                            "MLFLOW_TRACKING_URI": http_server.url("")}, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not http_server.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http_server.requests, "the registry call never reached the server"
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)  # an unshielded call would hang up now
        http_server.release.set()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in out, (proc.returncode, out)
    assert http_server.answered == [True]  # the call was still there to read the answer
    fault_log.record(AREA, "SIGINT while a model-registry call (search_model_versions) waits for the server",
                     "the call completed when the server answered, then the process exited 130")
