"""Tracking faults: the tracking server down when train starts, the server dying mid-training (and
coming back), and the local sqlite store locked by a concurrent writer. Real `mlflow server`s (with
basic auth, started by `make server`'s module) on free loopback ports; train as the real stage."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch  # noqa: F401  (imported up front: reading a checkpoint must not take seconds)

from faults.conftest import error_line, lines_with, read_checkpoint, wait_for_checkpoint
from pipeline.tracking import SQLITE_BUSY_TIMEOUT_S

AREA = "Tracking faults"
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_second")
USER, PASSWORD = "faults-admin", "faults-s3cret-pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m pipeline.server` on a fixed free port with its stores under `home`: killed and
    started again, it is the same server (same port, runs, users)."""

    def __init__(self, home: Path):
        self.home, self.port = home, free_port()
        home.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts: list[float] = []

    def start(self, timeout: float = 120) -> None:
        """`make server`'s command (pipeline.server.server_command: basic auth, proxied artifacts) with
        one worker instead of MLflow's 4: a quarter of the start-up time, the same server."""
        from pipeline.server import server_command

        argv, env, auth_ini = server_command({
            **os.environ, "MLFLOW_SERVER_PORT": str(self.port),
            "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{self.home / 'server.db'}",
            "MLFLOW_ARTIFACTS_DESTINATION": str(self.home / "artifacts"),
            "MLFLOW_AUTH_DB_URI": f"sqlite:///{self.home / 'auth.db'}",
            "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD})
        (self.home / "auth.ini").write_text(auth_ini)
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.home / "auth.ini")
        log = open(self.home / "server.log", "a")
        began = time.monotonic()
        self.proc = subprocess.Popen([*argv, "--workers", "1"], cwd=self.home, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        while time.monotonic() - began < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {(self.home / 'server.log').read_text()}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2).close()
                self.starts.append(time.monotonic() - began)
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        self.stop(signal.SIGKILL)
        raise AssertionError(f"server did not start: {(self.home / 'server.log').read_text()}")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=60)

    def client_env(self, **extra) -> dict:
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": USER,
                "MLFLOW_TRACKING_PASSWORD": PASSWORD, **extra}

    def client(self, monkeypatch):
        from mlflow import MlflowClient

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
        return MlflowClient(tracking_uri=self.url)


def test_tracking_server_down_at_start_fails_fast(baseline_repo, tmp_path, fault_log):
    """train with MLFLOW_TRACKING_URI pointing at a server that is not running."""
    repo = baseline_repo.clone(tmp_path / "repo")
    model = repo.path("models/model.pt").read_bytes()
    down = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = repo.stage("train", env={"MLFLOW_TRACKING_URI": down})
    elapsed = time.monotonic() - start
    line = error_line(proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert down in line and "unreachable" in line
    assert "epoch 1/" not in proc.stderr  # before any training
    assert repo.path("models/model.pt").read_bytes() == model and not repo.checkpoint().exists()
    fault_log.record(AREA, "train with MLFLOW_TRACKING_URI at a closed loopback port (server down at start)",
                     f"exit {proc.returncode} after {elapsed:.1f} s, before any epoch: "
                     f"'{line.split(' pipeline: ', 1)[-1]}'; models/model.pt untouched, no checkpoint")


def test_tracking_server_dying_mid_training(baseline_repo, tmp_path, fault_log, monkeypatch):
    """The tracking server is killed (SIGKILL) while two trains log to it; then it comes back."""
    server = Server(tmp_path / "server")
    server.start()
    try:
        # A: MLflow's HTTP retries off, i.e. an outage longer than its retry window (7 retries with
        # exponential backoff, about 4 minutes by default). B: an outage within it (7 retries, backoff
        # factor 1 instead of 2: tries at about 1, 3, 7, 15, 31, 63 s, so the test waits less).
        long = baseline_repo.clone(tmp_path / "long")
        short = baseline_repo.clone(tmp_path / "short")
        epochs = 30  # enough for both to be mid-training when the server dies
        for repo in (long, short):
            repo.set(train__epochs=epochs)
            repo.path("models/model.pt").unlink()
        env_long = server.client_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
        bg_long = long.start_stage("train", env=env_long)
        env_short = server.client_env(MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
        bg_short = short.start_stage("train", env=env_short)
        first_long = wait_for_checkpoint(long, bg_long, epoch=1)
        first_short = wait_for_checkpoint(short, bg_short, epoch=1)
        server.stop(signal.SIGKILL)
        killed_at = time.monotonic()

        rc_long = bg_long.wait(120)  # A fails at its next MLflow call
        short_waiting = bg_short.alive()  # B is waiting in MLflow's retries
        server.start()  # at once: same port, same stores
        back_at = time.monotonic()
        out_long = bg_long.output()
        left = read_checkpoint(long.checkpoint())
        line = error_line(out_long)
        assert rc_long == 1 and "Traceback" not in out_long, out_long[-3000:]
        assert server.url in line and "stopped answering" in line, line
        assert left is not None and left["run_id"] == first_long["run_id"]
        assert 1 <= left["epoch"] < epochs  # the checkpoint is kept
        assert not long.path("models/model.pt").exists()
        assert short_waiting
        resumed = long.stage("train", env=env_long)
        rc_short = bg_short.wait(300)
        done_short = time.monotonic()
        out_short = bg_short.output()

        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resuming MLflow run {left['run_id']} from epoch {left['epoch']}" in resumed.stderr
        assert rc_short == 0, out_short[-3000:]
        assert "resuming" not in out_short
        c = server.client(monkeypatch)
        for repo, first in ((long, first_long), (short, first_short)):
            run = c.get_run(first["run_id"])
            assert run.info.status == "FINISHED"
            for key in EPOCH_METRICS:
                steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, key))
                assert steps == list(range(1, epochs + 1)), (key, steps)
            assert repo.path("models/model.pt").exists() and not repo.checkpoint().exists()
    finally:
        server.stop()
    warning = lines_with(out_long, "could not mark the MLflow run")
    fault_log.record(
        AREA, f"tracking server SIGKILLed after epoch {first_long['epoch']}'s checkpoint of a {epochs}-epoch train, "
              "MLflow HTTP retries off (an outage longer than MLflow's ~4 min retry window); server restarted on the "
              "same port and store; train re-run",
        f"train exit {rc_long} at epoch {left['epoch']}, no traceback: '{line.split(' pipeline: ', 1)[-1]}'"
        + (f" (and a warning: run could not be marked FAILED)" if warning else "")
        + f"; checkpoint kept, no models/model.pt. Re-run: exit 0, "
          f"'{lines_with(resumed.stderr, 'resuming MLflow run')[0].split(': ', 1)[-1]}'; the run FINISHED with each of "
          f"{len(EPOCH_METRICS)} epoch metrics logged exactly once for epochs 1..{epochs}")
    fault_log.record(
        AREA, f"the same outage for a second train, with MLflow's HTTP retries on (7, backoff factor 1: a window of "
              f"about 2 min); the server was back {back_at - killed_at:.0f} s after the kill",
        f"train waited in MLflow's retries and went on: exit {rc_short}, {done_short - killed_at:.0f} s after the "
        f"kill, no resume needed; the run FINISHED with every epoch's metrics exactly once (1..{epochs}); "
        f"server start-ups took {', '.join(f'{s:.0f} s' for s in server.starts)}")


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
    assert "MLFLOW_TRACKING_URI" not in repo.env  # the default store: sqlite:///<repo>/mlflow.db?timeout=60
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
