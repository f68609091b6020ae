"""Retraining on data change, `make retrain`, and DVC experiments as MLflow runs, in real temp git +
DVC repos made from this checkout's tracked files."""

from __future__ import annotations

import json
import time

import pytest

from helpers.images import make_images
from helpers.project import VENV_BIN, ran_stages, sh

def test_data_change_reruns_exactly_downstream(repo):
    root, env = repo.root, repo.env()
    first = sh(["dvc", "repro"], root, env)
    assert ran_stages(first.stdout) == {"fetch_data", "prepare", "train", "evaluate"}
    repo.commit("first repro")

    again = sh(["dvc", "repro"], root, env)
    assert ran_stages(again.stdout) == set(), again.stdout
    assert "didn't change" in again.stdout
    assert "up to date" in sh(["dvc", "status"], root, env).stdout.lower()

    # A user adds images to the local source: DVC sees it, and everything downstream re-runs.
    make_images(root / "data/sources/images", per_class=3, size=12, seed=9,
                classes=("circle",))  # overwrites 3 files with new content
    (root / "data/sources/images/square/new_square.png").write_bytes(
        (root / "data/sources/images/square/square_000.png").read_bytes())
    status = sh(["dvc", "status"], root, env).stdout
    assert "fetch_data" in status and "data/sources" in status
    changed = sh(["dvc", "repro"], root, env)
    assert ran_stages(changed.stdout) == {"fetch_data", "prepare", "train", "evaluate"}
    raw = json.loads((root / "data/raw.json").read_text())
    assert raw["counts"]["all"]["square"] == 13

    # A params change of one stage re-runs that stage and those after it only.
    repo.set(evaluate__promote_min_delta=0.5)
    only_eval = sh(["dvc", "repro"], root, env)
    assert ran_stages(only_eval.stdout) == {"evaluate"}


def test_make_retrain_writes_summary(repo):
    root, env = repo.root, repo.env()
    sh(["dvc", "repro"], root, env)
    repo.commit("baseline")
    repo.set(train__lr=0.01)
    summary_file = root / "gh_summary.md"
    env = {**env, "GITHUB_STEP_SUMMARY": str(summary_file), "RETRAIN_BASE": "HEAD"}
    # -o: the venv is this checkout's, already installed; make must not reinstall into it.
    proc = sh(["make", "-o", f"{VENV_BIN.parent}/.installed", f"VENV={VENV_BIN.parent}", "retrain"], root, env)
    assert "Running stage 'train'" in proc.stdout
    text = (root / "reports/retrain_summary.md").read_text()
    assert text == summary_file.read_text()
    assert "### Metrics" in text and "### Params" in text and "### Promotion" in text
    assert "train.lr" in text and "0.003" in text and "0.01" in text  # params diff: old and new
    # The metrics diff against HEAD lists what moved: at least the new train run's numbers.
    assert "| reports/train_metrics.json" in text and "best_val_loss" in text
    promotion = json.loads((root / "reports/promotion.json").read_text())
    assert f"Model version {promotion['new_version']}" in text

    repo.commit("retrained")  # nothing changed since: a sentence each, not empty tables
    sh(["make", "-o", f"{VENV_BIN.parent}/.installed", f"VENV={VENV_BIN.parent}", "retrain"], root, env)
    text = (root / "reports/retrain_summary.md").read_text()
    assert "No metric changed." in text and "No param changed." in text and "| Path" not in text, text


def test_experiments_and_queued_sweep_are_mlflow_runs(repo):
    root, env = repo.root, repo.env()
    sh(["dvc", "repro"], root, env)
    repo.commit("baseline")

    one = sh(["dvc", "exp", "run", "-n", "lr-high", "-S", "train.lr=0.01"], root, env)
    assert "Running stage 'train'" in one.stdout
    runs = [r for r in repo.runs() if r.data.tags.get("dvc.exp_name") == "lr-high"]
    assert len(runs) == 1 and runs[0].data.params["train.lr"] == "0.01"
    assert runs[0].info.run_name == "lr-high: tinyvgg images lr=0.01"  # the experiment, model, data, what differs
    assert runs[0].data.tags["dvc.exp_baseline_rev"]
    assert runs[0].info.status == "FINISHED" and "test_accuracy" in runs[0].data.metrics

    # Two queued experiments run at once against the default sqlite store: both finish.
    sh(["dvc", "exp", "run", "--queue", "-S", "train.lr=0.002,0.004"], root, env)
    start = sh(["dvc", "queue", "start", "-j", "2"], root, {**env, "PIPELINE_SWEEP": "sweep-test"})
    assert start.returncode == 0
    sh(["dvc", "queue", "status"], root, env)
    # `dvc queue start` returns at once; `dvc queue logs` / `exp show` after waiting for the workers.
    deadline_s = 400
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        status = sh(["dvc", "queue", "status"], root, env).stdout
        # Count finished tasks: `dvc queue status` reads running and queued tasks separately, so a task
        # a worker takes between the two reads is in neither list for a moment.
        if status.count("Success") + status.count("Failed") >= 2:
            break
        time.sleep(3)
    assert "Failed" not in status, status
    sweep = [r for r in repo.runs() if r.data.tags.get("sweep") == "sweep-test"]
    assert sorted(r.data.params["train.lr"] for r in sweep) == ["0.002", "0.004"], status
    assert all(r.info.status == "FINISHED" and "test_accuracy" in r.data.metrics for r in sweep)
    assert len({r.data.tags["dvc.exp_baseline_rev"] for r in sweep}) == 1
    # Their artifacts live in the project's mlruns/, not in the deleted temp workspaces.
    for r in sweep:
        assert r.info.artifact_uri.startswith((root / "mlruns").as_uri())
    shown = sh(["dvc", "exp", "show", "--no-pager", "--csv"], root, env).stdout
    assert "0.002" in shown and "0.004" in shown and "accuracy" in shown


def test_a_pull_request_registers_its_model_and_main_promotes_it_without_training_again(repo, tmp_path,
                                                                                       mlflow_template):
    """The CI flow, with two clones sharing one DVC remote and one MLflow store: the pull request's job
    (`make retrain`) trains, registers and pushes its run cache, and moves nothing; main's job after the
    merge (`make retrain RETRAIN_ARGS=--promote`) restores train and evaluate from that run cache and
    promotes the very version the pull request registered."""
    import shutil

    shutil.copy(mlflow_template, tmp_path / "shared.db")
    remote = tmp_path / "remote"
    repo.dvc("remote", "add", "-d", "shared", str(remote))
    repo.commit("a DVC remote")
    make = ["make", "-o", f"{VENV_BIN.parent}/.installed", f"VENV={VENV_BIN.parent}"]
    env = {**repo.env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'shared.db'}", "RETRAIN_BASE": "HEAD"}

    def clone(name: str, branch: str):
        path = tmp_path / name
        sh(["git", "clone", "-q", "-b", branch, str(repo.root), str(path)], tmp_path, env)
        shutil.copytree(repo.path("data/sources/images"), path / "data/sources/images", dirs_exist_ok=True)
        return path, {**env, "PYTHONPATH": str(path)}

    repo.git("checkout", "-q", "-b", "feature")
    repo.set(train__lr=0.002)
    repo.commit("a pull request: another learning rate")
    pr, pr_env = clone("pr", "feature")
    first = sh([*make, "retrain"], pr, pr_env)
    assert "Running stage 'train'" in first.stdout and "Running stage 'evaluate'" in first.stdout
    decision = json.loads((pr / "reports/promotion.json").read_text())
    assert decision["would_promote"] is True and "would become @champion" in (pr / "reports/retrain_summary.md").read_text()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    with pytest.raises(Exception):
        client.get_model_version_by_alias("image-classifier", "champion")  # the pull request moved nothing
    runs_after_pr = client.search_runs([client.get_experiment_by_name("image-classifier").experiment_id])

    repo.git("checkout", "-q", "main")
    repo.git("merge", "-q", "--ff-only", "feature")
    main, main_env = clone("main", "main")
    merged = sh([*make, "retrain", "RETRAIN_ARGS=--promote"], main, main_env)
    assert "Running stage 'train'" not in merged.stdout and "Running stage 'evaluate'" not in merged.stdout, merged.stdout
    assert "Stage 'train' is cached - skipping run" in merged.stdout  # restored from the run cache
    version = client.get_model_version_by_alias("image-classifier", "champion")
    assert str(version.version) == decision["new_version"] and version.run_id == decision["run_id"]
    assert (main / "models/model.pt").read_bytes() == (pr / "models/model.pt").read_bytes()
    after = client.search_runs([client.get_experiment_by_name("image-classifier").experiment_id])
    assert len(after) == len(runs_after_pr) == 1  # main trained nothing
    outcome = json.loads((main / "reports/champion.json").read_text())
    assert outcome["promoted"] is True and outcome["version"] == decision["new_version"]
    assert "**promoted to @champion**" in (main / "reports/retrain_summary.md").read_text()


def test_a_run_of_a_clean_checkout_is_not_dirty(baseline_repo):
    """`dvc repro` rewrites dvc.lock while it runs the stages: that is not a change of the code."""
    (run,) = baseline_repo.runs()
    assert run.data.tags["git.dirty"] == "false" and run.data.tags["git.branch"] == "main"
    assert run.data.tags["git.commit"] == baseline_repo.git("rev-parse", "HEAD~1").stdout.strip()


def test_a_teammate_pulls_an_experiment_instead_of_training_it_again(repo, tmp_path, mlflow_template):
    """`dvc exp push` to a shared git and DVC remote from one clone; `dvc exp pull` and `dvc exp apply` in
    another: the experiment's params, metrics and model arrive, and `dvc repro` has nothing to train."""
    import shutil

    shutil.copy(mlflow_template, tmp_path / "shared.db")
    repo.dvc("remote", "add", "-d", "shared", str(tmp_path / "dvc-remote"))
    repo.commit("a DVC remote")
    sh(["git", "clone", "-q", "--bare", str(repo.root), str(tmp_path / "origin.git")], tmp_path, repo.env())
    env = {**repo.env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'shared.db'}"}

    def clone(name: str):
        path = tmp_path / name
        sh(["git", "clone", "-q", str(tmp_path / "origin.git"), str(path)], tmp_path, env)
        shutil.copytree(repo.path("data/sources/images"), path / "data/sources/images", dirs_exist_ok=True)
        return path, {**env, "PYTHONPATH": str(path)}

    mine, mine_env = clone("mine")
    ran = sh(["dvc", "exp", "run", "-n", "lr-fast", "-S", "train.lr=0.01"], mine, mine_env)
    assert "Running stage 'train'" in ran.stdout
    sh(["dvc", "exp", "push", "origin", "lr-fast"], mine, mine_env)
    metrics = json.loads((mine / "reports/metrics.json").read_text())

    theirs, their_env = clone("theirs")
    sh(["dvc", "exp", "pull", "origin", "lr-fast"], theirs, their_env)
    assert "lr-fast" in sh(["dvc", "exp", "show", "--no-pager", "--csv"], theirs, their_env).stdout
    sh(["dvc", "exp", "apply", "lr-fast"], theirs, their_env)
    again = sh(["dvc", "repro"], theirs, their_env)
    assert ran_stages(again.stdout) == set(), again.stdout  # nothing trained again
    assert json.loads((theirs / "reports/metrics.json").read_text()) == metrics
    assert (theirs / "models/model.pt").read_bytes() == (mine / "models/model.pt").read_bytes()
