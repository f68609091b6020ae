"""train.nproc=2: the train stage under torchrun with DistributedDataParallel over gloo on the CPU."""

from __future__ import annotations

import json

import pandas as pd
from mlflow import MlflowClient

FAST = dict(prepare__image_size=12, train__hidden_units=12, train__epochs=6, train__patience=10,
            train__batch_size=32)


def trained(project, nproc: int):
    project.set(**FAST, train__nproc=nproc)
    project.run("fetch_data")
    project.run("prepare")
    proc = project.run("train", timeout=600)
    summary = json.loads(project.path("reports/train.json").read_text())
    history = pd.read_csv(project.path("reports/train_history.csv"))
    return proc, summary, history


def test_two_processes_log_one_run_with_global_metrics(project, tmp_path, mlflow_template):
    proc, summary, history = trained(project, nproc=2)
    assert proc.stderr.count("epoch 1/6") == 1  # rank 0 alone reports
    assert len(history) == 6 and project.path("models/model.pt").exists()
    client = MlflowClient(tracking_uri=project.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("image-classifier").experiment_id])
    assert len(runs) == 1  # one run, from rank 0
    run = runs[0]
    assert run.info.run_id == summary["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["train.processes"] == "2" and run.data.params["train.nproc"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 6
    assert not list(project.path(".checkpoints").glob("*.pt"))

    # Accuracy comparable to one process on the same data and params.
    from conftest import Project
    import shutil

    single_db = tmp_path / "single.db"
    shutil.copy(mlflow_template, single_db)
    (tmp_path / "single").mkdir()
    one = Project(tmp_path / "single", single_db)
    _, single, _ = trained(one, nproc=1)
    assert summary["best_val_acc"] > 0.8 and single["best_val_acc"] > 0.8
    assert abs(summary["best_val_acc"] - single["best_val_acc"]) < 0.1
