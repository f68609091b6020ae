"""MLproject: its entry points, `mlflow run . -e evaluate` end to end, and pipeline.repro's command."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers.project import REPO, Repo
from pipeline import repro
from pipeline.errors import PipelineError

STAGES = ("fetch_data", "prepare", "train", "evaluate")


@pytest.mark.parametrize("argv, expected", [
    ([], ["dvc", "repro"]),
    (["--train.lr", "0.01"], ["dvc", "exp", "run", "-S", "train.lr=0.01"]),
    (["--train.lr=0.01", "--train.epochs", "5"], ["dvc", "exp", "run", "-S", "train.lr=0.01", "-S", "train.epochs=5"]),
])
def test_repro_command(argv, expected):
    assert repro.command(argv) == expected


@pytest.mark.parametrize("argv", [["train.lr", "0.01"], ["--train.lr"], ["--lr", "0.01"]])
def test_repro_rejects_malformed_overrides(argv, capsys):
    with pytest.raises(PipelineError):
        repro.command(argv)
    assert repro.main(argv) == 2  # before running anything
    assert "error:" in capsys.readouterr().err


def test_mlproject_entry_points():
    spec = yaml.safe_load((REPO / "MLproject").read_text())
    entries = spec["entry_points"]
    assert set(entries) == {"main", "promote", *STAGES}
    assert entries["promote"]["command"] == "python -m pipeline.promote"
    assert entries["main"]["command"] == "python -m pipeline.repro"
    for stage in STAGES:
        assert entries[stage]["command"] == f"python -m pipeline.{stage}"
        assert "parameters" not in entries[stage]  # params.yaml holds every default


def mlflow_project(eval_trained, tmp_path) -> tuple[Path, str, dict]:
    """A git copy of the repo holding what fetch_data, prepare and train produced, a copy of their
    MLflow store, and the environment `mlflow run` gets there: (repo, tracking URI, env)."""
    repo = Repo.create(tmp_path / "repo")
    for rel in ("params.yaml", "data/prepared", "models", "reports"):
        src, dst = eval_trained.path(rel), repo.path(rel)
        if src.is_dir():
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    for stale in ("metrics.json", "promotion.json", "predictions.csv"):  # the repo's, not this run's
        repo.path("reports").joinpath(stale).unlink(missing_ok=True)
    repo.git("add", "-A", "-f")
    repo.git("commit", "-q", "-m", "snapshot")
    db = tmp_path / "mlflow.db"
    shutil.copy(eval_trained.tracking_uri.removeprefix("sqlite:///"), db)
    uri = f"sqlite:///{db}"
    env = {**repo.env(), "MLFLOW_TRACKING_URI": uri}
    env.pop("PYTHONPATH")
    return repo.root, uri, env


def test_mlflow_run_evaluate_entry_point(eval_trained, tmp_path):
    """`mlflow run . -e evaluate --env-manager local -P ...` in a git copy of the repo holding what
    the earlier stages produced: the train run gets its test metrics, its model is registered, and -P
    reaches the stage."""
    from mlflow import MlflowClient

    repo, uri, env = mlflow_project(eval_trained, tmp_path)
    proc = subprocess.run(["mlflow", "run", ".", "-e", "evaluate", "--env-manager", "local",
                           "-P", "evaluate.promote_min_delta=0.25"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    metrics = json.loads((repo / "reports/metrics.json").read_text())
    promotion = json.loads((repo / "reports/promotion.json").read_text())
    assert promotion["min_delta"] == 0.25  # the -P override reached the stage
    train = json.loads((repo / "reports/train.json").read_text())
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(train["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
    version = client.get_model_version("image-classifier", promotion["new_version"])
    assert version.run_id == train["run_id"] and promotion["would_promote"] is True  # registered, assessed
    assert not version.aliases  # evaluate moves no alias: promote does
    # the train run before this had no test metrics: they came from this evaluate
    before = MlflowClient(tracking_uri=eval_trained.tracking_uri).get_run(train["run_id"])
    assert "test_accuracy" not in before.data.metrics


@pytest.mark.parametrize("experiment_flag", [[], ["--experiment-name", "image-classifier"]], ids=["default", "named"])
def test_mlflow_run_train_entry_point(eval_trained, tmp_path, experiment_flag):
    """`mlflow run . -e train -P ...` starts a run in MLflow's Default experiment and hands it over in
    MLFLOW_RUN_ID. Without --experiment-name, train logs to a new run in the pipeline's experiment
    (MLflow refused to resume a run of another experiment); with it, train logs into that run."""
    from mlflow import MlflowClient

    repo, uri, env = mlflow_project(eval_trained, tmp_path)
    proc = subprocess.run(["mlflow", "run", ".", "-e", "train", "--env-manager", "local", *experiment_flag,
                           "-P", "train.epochs=1"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    train = json.loads((repo / "reports/train.json").read_text())
    run = client.get_run(train["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "1"
    assert run.info.experiment_id == client.get_experiment_by_name("image-classifier").experiment_id
    wrapper = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
               if r.data.tags.get("mlflow.project.entryPoint") == "train"]
    assert len(wrapper) == 1
    if experiment_flag:
        assert wrapper[0].info.run_id == train["run_id"]  # train logged into mlflow run's run
    else:
        assert wrapper[0].info.run_id != train["run_id"] and wrapper[0].info.experiment_id == "0"
        assert "is in another experiment" in proc.stderr
