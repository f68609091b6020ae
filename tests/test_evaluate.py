"""The evaluate stage: metrics against hand-computed values, and what a full run writes and records."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
import torch

from pipeline.dataset import DatasetMeta
from pipeline.metrics import compute_metrics


def test_data_hash(meta: dict) -> str:
    """The digest evaluate records for meta.json's test split."""
    return DatasetMeta.from_json(meta).split_digest("test")


test_data_hash.__test__ = False  # a helper, not a test

# -- compute_metrics on tiny fixed cases, expected values worked out by hand ----------------------


def one_hot_probs(preds: list[int], n: int) -> torch.Tensor:
    """Probabilities whose argmax is `preds`: 0.8 on the predicted class, the rest spread evenly."""
    probs = torch.full((len(preds), n), 0.2 / (n - 1))
    probs[torch.arange(len(preds)), torch.tensor(preds)] = 0.8
    return probs


def test_metrics_equal_hand_computed_confusion_matrix():
    targets = [0, 0, 0, 0, 1, 1, 1, 2]
    preds = [0, 0, 0, 1, 1, 2, 0, 2]
    # Confusion matrix, rows actual, columns predicted:
    #   actual a (4 images): predicted a a a b  -> [3, 1, 0]
    #   actual b (3 images): predicted b c a    -> [1, 1, 1]
    #   actual c (1 image):  predicted c        -> [0, 0, 1]
    # accuracy = diagonal / all = (3 + 1 + 1) / 8 = 0.625
    # precision = diagonal / column sums (4, 2, 2): a 3/4 = 0.75, b 1/2 = 0.5, c 1/2 = 0.5
    #   macro = (0.75 + 0.5 + 0.5) / 3 = 0.583333
    # recall = diagonal / row sums (4, 3, 1): a 3/4 = 0.75, b 1/3 = 0.333333, c 1/1 = 1.0
    #   macro = (0.75 + 0.333333 + 1.0) / 3 = 0.694444
    # F1 = 2PR / (P + R): a 0.75, b 2*0.5*(1/3) / (0.5 + 1/3) = 0.4, c 2*0.5*1 / 1.5 = 0.666667
    #   macro = (0.75 + 0.4 + 0.666667) / 3 = 0.605556
    m = compute_metrics(one_hot_probs(preds, 3), torch.tensor(targets), ["a", "b", "c"])

    assert m["confusion_matrix"] == [[3, 1, 0], [1, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(0.625, abs=1e-6)
    assert m["precision_macro"] == pytest.approx(0.583333, abs=1e-5)
    assert m["recall_macro"] == pytest.approx(0.694444, abs=1e-5)
    assert m["f1_macro"] == pytest.approx(0.605556, abs=1e-5)
    expected = {"a": (0.75, 0.75, 0.75, 4), "b": (0.5, 0.333333, 0.4, 3), "c": (0.5, 1.0, 0.666667, 1)}
    assert set(m["per_class"]) == set(expected)
    for cls, (p, r, f1, support) in expected.items():
        got = m["per_class"][cls]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f1), abs=1e-5), cls
        assert got["support"] == support
    assert m["test_images"] == 8
    assert "top5_accuracy" not in m  # only with more than 5 classes


def test_top5_accuracy_only_with_more_than_five_classes():
    # 6 classes; each row ranks the classes by probability (0.30 > 0.25 > 0.20 > 0.12 > 0.08 > 0.05).
    ranked = [0.30, 0.25, 0.20, 0.12, 0.08, 0.05]
    orders = [[0, 1, 2, 3, 4, 5],   # target 0 ranked 1st: top-1 and top-5 hit
              [1, 2, 3, 4, 5, 0],   # target 5 ranked 5th: top-5 hit only
              [2, 3, 4, 5, 0, 1],   # target 1 ranked 6th (last): miss
              [3, 4, 5, 0, 1, 2]]   # target 5 ranked 3rd: top-5 hit only
    targets = [0, 5, 1, 5]
    probs = torch.zeros(4, 6)
    for i, order in enumerate(orders):
        for rank, cls in enumerate(order):
            probs[i, cls] = ranked[rank]
    # top-5 accuracy = 3 hits / 4 = 0.75; top-1 accuracy = 1 / 4 = 0.25
    m = compute_metrics(probs, torch.tensor(targets), [f"c{i}" for i in range(6)])
    assert m["top5_accuracy"] == pytest.approx(0.75, abs=1e-6)
    assert m["accuracy"] == pytest.approx(0.25, abs=1e-6)

    # exactly 5 classes: top-5 would always be 1.0, so it is not reported
    five = compute_metrics(one_hot_probs([0, 1, 2, 3, 4], 5), torch.tensor([0, 1, 2, 3, 0]),
                           [f"c{i}" for i in range(5)])
    assert "top5_accuracy" not in five
    assert five["accuracy"] == pytest.approx(0.8, abs=1e-6)  # 4 of 5 right


def test_macro_averages_leave_out_classes_never_seen_nor_predicted():
    # 4 classes; d is in neither the targets nor the predictions, c is predicted once but never actual.
    #   a: tp 1, fp 0, fn 0 -> P 1, R 1, F1 1
    #   b: tp 2, fp 0, fn 1 -> P 1, R 2/3, F1 0.8
    #   c: tp 0, fp 1, fn 0 -> P 0, R 0 (no support), F1 0
    #   d: left out of the macro means (it would add a 0 to each)
    m = compute_metrics(one_hot_probs([0, 2, 1, 1], 4), torch.tensor([0, 1, 1, 1]), ["a", "b", "c", "d"])
    assert m["precision_macro"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["recall_macro"] == pytest.approx((1 + 2 / 3) / 3, abs=1e-6)
    assert m["f1_macro"] == pytest.approx(0.6, abs=1e-6)
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["accuracy"] == pytest.approx(0.75, abs=1e-6)


def test_test_data_hash_depends_only_on_the_test_split():
    meta = {"image_size": 8, "channels": 1, "classes": ["a", "b"], "mean": [0.5], "std": [0.2], "source": None,
            "raw_sha256": None, "splits": {"train": {"count": 2, "sha256": {"train.npy": "1", "train.csv": "2"}},
                                           "test": {"count": 2, "sha256": {"test.npy": "3", "test.csv": "4"}}}}
    h = test_data_hash(meta)
    other_train = json.loads(json.dumps(meta))
    other_train["splits"]["train"]["sha256"]["train.npy"] = "9"
    assert test_data_hash(other_train) == h
    other_test = json.loads(json.dumps(meta))
    other_test["splits"]["test"]["sha256"]["test.npy"] = "9"
    assert test_data_hash(other_test) != h


# -- a full evaluate run (the session's eval_done project) ----------------------------------------


def read_json(project, rel):
    return json.loads(project.path(rel).read_text())


def test_evaluate_writes_reports(eval_done):
    metrics = read_json(eval_done, "reports/metrics.json")
    meta = read_json(eval_done, "data/prepared/meta.json")
    classes = meta["classes"]
    # `dvc metrics show`'s file holds the headline numbers; per-class values have a report of their own
    assert set(metrics) == {"accuracy", "precision_macro", "recall_macro", "f1_macro", "top5_accuracy", "test_images"}
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "top5_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["accuracy"] > 0.3  # a trained model, far above chance (0.1)
    per_class = read_json(eval_done, "reports/per_class.json")
    assert set(per_class) == set(classes)

    with open(eval_done.path("reports/predictions.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "actual", "predicted", "probability"]
    with open(eval_done.path("data/prepared/test.csv"), newline="") as f:
        test_files = [r[0] for r in list(csv.reader(f))[1:]]
    assert [r["file"] for r in rows] == test_files  # one row per test image, in order
    assert metrics["test_images"] == len(rows)
    assert {r["actual"] for r in rows} <= set(classes) and {r["predicted"] for r in rows} <= set(classes)
    assert all(0.0 < float(r["probability"]) <= 1.0 for r in rows)
    recomputed = sum(r["actual"] == r["predicted"] for r in rows) / len(rows)
    assert recomputed == pytest.approx(metrics["accuracy"], abs=1e-6)
    support = {c: sum(r["actual"] == c for r in rows) for c in classes}
    assert {c: v["support"] for c, v in per_class.items()} == support
    for name in ("confusion_matrix.png", "most_confident_predictions.png"):  # `dvc plots show`'s figures
        assert eval_done.path(f"reports/figures/{name}").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    promotion = read_json(eval_done, "reports/promotion.json")
    train = read_json(eval_done, "reports/train.json")
    assert promotion["would_promote"] is True and promotion["reason"] == "no champion yet"
    assert promotion["champion_version"] is None and promotion["champion_scored"] == "none"
    assert promotion["new_score"] == pytest.approx(metrics["accuracy"])
    assert promotion["run_id"] == train["run_id"]
    assert promotion["test_data_hash"] == test_data_hash(meta)


def test_evaluate_completes_the_train_run_and_registers_the_model(eval_done):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=eval_done.tracking_uri, registry_uri=eval_done.tracking_uri)
    train = read_json(eval_done, "reports/train.json")
    metrics = read_json(eval_done, "reports/metrics.json")
    params = eval_done.params()
    run = client.get_run(train["run_id"])
    assert run.info.status == "FINISHED"
    logged = run.data.metrics
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "top5_accuracy"):
        assert logged[f"test_{key}"] == pytest.approx(metrics[key]), key
    per_class = read_json(eval_done, "reports/per_class.json")
    assert logged["per_class_recall/3"] == pytest.approx(per_class["3"]["recall"])  # its own section, by name
    assert not [k for k in logged if k.startswith("test_") and k.split("_")[-1].isdigit()]
    assert "best_val_acc" in logged  # still the train run, not a new one
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "most_confident_predictions.png", "confusion_matrix.csv"} <= artifacts
    cm_csv = client.download_artifacts(run.info.run_id, "confusion_matrix.csv")
    with open(cm_csv) as f:
        cm = np.array([row[1:] for row in list(csv.reader(f))[1:]], dtype=int)
    assert np.trace(cm) / cm.sum() == pytest.approx(metrics["accuracy"], abs=1e-6)

    name = params["mlflow"]["registered_model"]
    versions = client.search_model_versions(f"name = '{name}'")
    assert [int(v.version) for v in versions] == [1]
    version = versions[0]
    assert version.run_id == train["run_id"] and version.source == train["model_uri"]
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
        assert float(version.tags[f"test_{key}"]) == pytest.approx(metrics[key]), key
    assert version.tags["test_data_hash"] == read_json(eval_done, "reports/promotion.json")["test_data_hash"]
    assert version.tags["model_sha256"] == hashlib.sha256(eval_done.path("models/model.pt").read_bytes()).hexdigest()
    assert version.tags["git.commit"] == "none"  # the project is not a git checkout
    assert run.data.tags["promotion.would_promote"] == "True"
    assert run.data.tags["promotion.reason"] == "no champion yet"
    assert run.data.tags["registered_model_version"] == "1"
    # promote (eval_done ran it after evaluate) moved the alias and recorded it, after the move
    assert client.get_model_version_by_alias(name, "champion").version == version.version
    assert version.tags["promoted"] == "true" and "champion.candidate" in version.tags
    assert run.data.tags["promotion.promoted"] == "true"
    champion = read_json(eval_done, "reports/champion.json")
    assert champion["version"] == "1" and champion["promoted"] is True and champion["champion_version"] == "1"

    # the test metrics also belong to the logged model, on the test set (MLflow 3's logged-model metrics)
    model = client.get_logged_model(train["model_uri"].removeprefix("models:/"))
    on_model = {m.key: m for m in model.metrics}
    assert on_model["test_accuracy"].value == pytest.approx(metrics["accuracy"])
    assert on_model["test_accuracy"].dataset_digest == read_json(eval_done, "reports/promotion.json")["test_data_hash"][:32]
    tests = [d for d in run.inputs.dataset_inputs if {t.key: t.value for t in d.tags}.get("mlflow.data.context") == "testing"]
    assert len(tests) == 1 and tests[0].dataset.digest == on_model["test_accuracy"].dataset_digest
