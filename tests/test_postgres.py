"""`make server` on a real PostgreSQL backend store (Debian's package, a throwaway cluster on a free
loopback port), with basic auth and artifacts proxied to a folder that stands in for object storage:
train, evaluate and promote through it, two experiments at once, and a server restart mid-training
followed by a resume."""

from __future__ import annotations

import signal
import time

import pytest

from helpers import postgres
from helpers.mlflow_server import Server
from helpers.project import EVAL_FAST, Project
from helpers.training import EPOCH_KEYS, read_checkpoint, summary, wait_for_checkpoint


@pytest.fixture
def cluster():
    try:
        pg = postgres.start()
    except postgres.Unavailable as e:
        pytest.skip(str(e))
    yield pg
    postgres.stop(pg)


def test_the_pipeline_against_a_postgresql_backed_server(cluster, tmp_path, monkeypatch):
    timings = {f"postgres {k}": v for k, v in cluster.timings.items()}
    store = tmp_path / "object-store"
    server = Server(tmp_path / "server", MLFLOW_BACKEND_STORE_URI=cluster.url, MLFLOW_ARTIFACTS_DESTINATION=str(store))
    server.start()
    timings["server first start (creates the schema)"] = server.starts[-1]
    try:
        client = server.client(monkeypatch)
        env = server.client_env(GITHUB_REF_NAME="main", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")

        # train, evaluate and promote through the server, and a second experiment training at the same time
        project = Project.create(tmp_path / "a", **EVAL_FAST)
        for stage in ("fetch_data", "prepare"):  # they never talk to MLflow
            project.run(stage)
        project.tracking_uri = server.url  # before cloning: the clone then uses the server too
        other = project.clone(tmp_path / "b")
        other.set(train__lr=0.01)
        began = time.monotonic()
        twin = other.start_stage("train", env=env)
        project.run("train", env=env)
        assert twin.wait(300) == 0, twin.output()[-2000:]
        timings["two trainings at once"] = time.monotonic() - began
        for stage in ("evaluate", "promote"):
            project.run(stage, env=env)
        run = client.get_run(summary(project)["run_id"])
        assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server...
        assert list(store.rglob("loss_curves.png")) and list(store.rglob("weights.safetensors"))  # ...to its store
        assert client.get_model_version_by_alias("image-classifier", "champion").run_id == run.info.run_id
        second = client.get_run(summary(other)["run_id"])
        assert second.info.status == "FINISHED" and second.info.run_id != run.info.run_id
        timings["train x2, evaluate, promote"] = time.monotonic() - began

        # the server restarted mid-training: train fails at its next call, then resumes in its run
        again = project.clone(tmp_path / "restart")
        again.set(train__epochs=12)
        bg = again.start_stage("train", env=env)
        first = wait_for_checkpoint(again, bg, epoch=2)
        server.stop(signal.SIGTERM)
        assert bg.wait(180) == 1 and "stopped answering" in bg.output(), bg.output()[-2000:]
        left = read_checkpoint(again.checkpoint())
        server.start()
        timings["server restart"] = server.starts[-1]
        resumed = again.run("train", env=env)
        assert f"resuming MLflow run {first['run_id']} from epoch {left['epoch']}" in resumed.stderr
        run = client.get_run(first["run_id"])
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(first["run_id"], EPOCH_KEYS["val_loss"]))
        assert steps == list(range(1, 13))  # each epoch logged once
    finally:
        server.stop()
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
