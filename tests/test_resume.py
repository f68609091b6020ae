"""Resuming train after `kill -9`: same MLflow run, and the same result as an uninterrupted run (for a
whole network and for a head on cached features)."""

from __future__ import annotations

from helpers.project import TRAIN_FAST, copy_prepared
from helpers.training import (EPOCH_KEYS, EPOCH_METRICS, LEARNED, assert_same_tensors, history, model_pt, summary,
                              wait_for_checkpoint)
from pipeline.checkpoint import read_checkpoint


def assert_resumed_like(p, reference, run_id: str, epochs: int) -> None:
    """`p` holds one MLflow run, `run_id`, reopened and finished with each epoch's metrics logged exactly
    once, and ended with the same weights and curves as `reference`'s uninterrupted run."""
    (run,) = p.runs()
    assert run.info.run_id == run_id == summary(p)["run_id"]
    assert run.info.status == "FINISHED"
    c = p.client()
    for key in EPOCH_METRICS:
        assert sorted(m.step for m in c.get_metric_history(run_id, EPOCH_KEYS[key])) == list(range(1, epochs + 1)), key
    assert [[h[key] for key in LEARNED] for h in history(p)] == \
        [[h[key] for key in LEARNED] for h in history(reference)]
    assert_same_tensors(model_pt(p)["state_dict"], model_pt(reference)["state_dict"])


def test_killed_run_resumes_in_the_same_mlflow_run_to_the_same_result(train_data, train_reference, tmp_path,
                                                                      mlflow_template):
    epochs = TRAIN_FAST["train__epochs"]
    p = copy_prepared(train_data, tmp_path, mlflow_template)  # train_reference's params and data
    ckpt_path = p.path(".checkpoints/train.pt")

    bg = p.start_stage("train")
    first = wait_for_checkpoint(p, bg, epoch=2)
    bg.kill()  # SIGKILL: no handler runs, the MLflow run is left RUNNING
    assert bg.returncode == -9
    left = read_checkpoint(ckpt_path)
    k = left["epoch"]
    assert 2 <= k < epochs, f"killed after epoch {k}: too late to test resuming"
    assert left["run_id"] == first["run_id"]
    (run,) = p.runs()
    assert run.info.status == "RUNNING"
    assert not p.path("models/model.pt").exists()
    # the checkpoint is written before an epoch's metrics are logged: none beyond it (epoch k's may
    # be missing when the kill fell between the two; the resumed run logs it then, and only it)
    logged = sorted(m.step for m in p.client().get_metric_history(run.info.run_id, EPOCH_KEYS["val_loss"]))
    assert logged in (list(range(1, k + 1)), list(range(1, k)))
    print(f"killed after epoch {k}'s checkpoint; val_loss logged for epochs {logged}")

    resumed = p.run("train")
    assert f"resuming MLflow run {left['run_id']} from epoch {k}" in resumed.stderr
    assert f"epoch {k}/{epochs}" not in resumed.stderr  # epochs 1..k are not trained again
    assert f"epoch {k + 1}/{epochs}" in resumed.stderr

    assert_resumed_like(p, train_reference, left["run_id"], epochs)
    assert not ckpt_path.exists()  # removed after success


def test_checkpoint_of_other_params_is_set_aside_and_its_run_marked_killed(train_data, tmp_path, mlflow_template):
    """Killed, then run again with another train.lr: no resume (the checkpoint is set aside as
    train.stale), a new run trains from epoch 1, and the killed run no longer shows as RUNNING."""
    p = copy_prepared(train_data, tmp_path, mlflow_template)
    bg = p.start_stage("train")
    first = wait_for_checkpoint(p, bg, epoch=1)
    bg.kill()
    p.set(train__lr=p.params()["train"]["lr"] / 2)

    again = p.run("train")
    assert "params, data or tracking store changed; kept as train.stale" in again.stderr, again.stderr
    assert "resuming MLflow run" not in again.stderr and f"epoch 1/{TRAIN_FAST['train__epochs']}" in again.stderr
    assert p.path(".checkpoints/train.stale").exists()
    old = p.client().get_run(first["run_id"])
    assert old.info.status == "KILLED" and "checkpoint was set aside" in old.data.tags["abandoned"]
    (new,) = [r for r in p.runs() if r.info.run_id != first["run_id"]]
    assert new.info.status == "FINISHED" and new.info.run_id == summary(p)["run_id"]


def test_a_head_on_cached_features_resumes_to_the_same_result(train_data, tmp_path, mlflow_template):
    """finetune: head on the feature cache, killed and run again: it resumes in the same MLflow run from
    the cache the killed run wrote, and ends with the same head and curves as an uninterrupted run."""
    epochs = 60  # head epochs on cached features take milliseconds: enough of them to kill one midway
    head = dict(train__finetune="head", train__augment=[], train__epochs=epochs, train__patience=epochs + 1)
    reference = copy_prepared(train_data, tmp_path / "reference", mlflow_template, **head)
    reference.run("train")
    assert summary(reference)["feature_cache"] == "miss"

    p = copy_prepared(train_data, tmp_path / "p", mlflow_template, **head)
    bg = p.start_stage("train")
    first = wait_for_checkpoint(p, bg, epoch=2)
    bg.kill()
    left = read_checkpoint(p.checkpoint())
    k = left["epoch"]
    assert 2 <= k < epochs, f"killed after epoch {k}: too late to test resuming"
    assert left["run_id"] == first["run_id"]
    print(f"killed after epoch {k} of {epochs}")

    resumed = p.run("train")
    assert f"resuming MLflow run {left['run_id']} from epoch {k}" in resumed.stderr
    assert summary(p)["feature_cache"] == "hit"  # the killed run had written the features
    assert_resumed_like(p, reference, left["run_id"], epochs)
