"""Stage evaluate: models/model.pt + the test split -> reports/metrics.json, reports/predictions.csv,
reports/promotion.json; completes train's MLflow run (test metrics, confusion matrix, error analysis),
registers its model (tagged with its scores, test data, commit, branch and pull request), and records
whether it would become `@champion`. It moves nothing: `python -m pipeline.promote` does (champion.py).
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import numpy as np
import torch

from pipeline import champion, plots, provenance, registry, tracking
from pipeline.checkpoint import checkpoint_runs
from pipeline.cli import run_stage
from pipeline.config import Params
from pipeline.dataset import Split, load_meta, load_split
from pipeline.engine import classify
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, read_json, sha256_file, write_json
from pipeline.metrics import compute_metrics
from pipeline.models import load_classifier
from pipeline.paths import (CONFUSION_PNG, METRICS_JSON, MODEL_PATH, PER_CLASS_JSON, PREDICTIONS_CSV, PREDICTIONS_PNG,
                            PREPARED_DIR, PROMOTION_JSON, TRAIN_JSON)
from pipeline.runtime import resolve_runtime

log = logging.getLogger(__name__)

GRID = 10  # images in each panel of the error-analysis figure
# what `dvc metrics show` shows (reports/metrics.json); per-class values go to reports/per_class.json
HEADLINE = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "top5_accuracy", "test_images")


def write_predictions(path: Path, test: Split, probs: torch.Tensor, classes: list[str]) -> None:
    conf, pred = probs.max(dim=1)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "actual", "predicted", "probability"])
            for i, file in enumerate(test.files):
                writer.writerow([file, classes[test.labels[i]], classes[pred[i]], f"{conf[i].item():.6f}"])


def across_classes(indices: list[int], classes_of: np.ndarray, count: int) -> list[int]:
    """The first `count` of `indices` (already in order of confidence), taking one per class in turn,
    so that a model sure of one class does not fill the row with it."""
    queues: dict[int, list[int]] = {}
    for i in indices:
        queues.setdefault(int(classes_of[i]), []).append(i)
    picks = []
    while len(picks) < count and any(queues.values()):
        for queue in sorted(queues.values(), key=lambda q: indices.index(q[0]) if q else len(indices)):
            if queue and len(picks) < count:
                picks.append(queue.pop(0))
    return picks


def error_figure(test: Split, probs: torch.Tensor, classes: list[str]):
    """The most confident correct and wrong predictions, one class after another (the notebooks'
    plot_most_correct, both ways)."""
    conf, pred = probs.max(dim=1)
    correct = pred.numpy() == test.labels
    order = [int(i) for i in np.argsort(-conf.numpy(), kind="stable")]
    picks = (across_classes([i for i in order if correct[i]], test.labels, GRID // 2)
             + across_classes([i for i in order if not correct[i]], test.labels, GRID // 2))
    titles = [f"true {classes[test.labels[i]]}\npred {classes[pred[i]]} {conf[i]:.2f}" for i in picks]
    colors = ["green" if correct[i] else "red" for i in picks]
    return plots.image_grid(test.images[picks], titles, colors,
                            "Most confident correct (green) and wrong (red) test predictions, across classes")


def _metric_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def main(params: Params) -> None:
    cfg, name = params.evaluate, params.mlflow.registered_model
    # fp32, whatever train.precision says: test metrics and predictions.csv must equal what the
    # served model (fp32 pyfunc) and predict.py give for the same images.
    rt = resolve_runtime(params.base.device, "fp32")
    if not TRAIN_JSON.exists() or not MODEL_PATH.exists():
        raise PipelineError(f"{MODEL_PATH} or {TRAIN_JSON} missing; run the train stage first")
    train_info = read_json(TRAIN_JSON)
    meta = load_meta()
    classes = list(meta.classes)
    test = load_split("test", meta=meta)
    model = load_classifier(MODEL_PATH)
    probs = classify(model, test.images, cfg.batch_size, rt)
    metrics = compute_metrics(probs, torch.from_numpy(test.labels), classes)
    test_hash = meta.split_digest("test")  # scores are comparable only on the same test split

    tracking.configure(params.mlflow.experiment)
    tracking.require_run(train_info["run_id"], TRAIN_JSON)
    tracking.end_orphaned_runs(keep={train_info["run_id"], *checkpoint_runs(params.train.checkpoint_dir)})
    with tracking.run(train_info["run_id"]):
        tracking.claim_run()
        test_set = tracking.log_dataset(PREPARED_DIR, name=f"{meta.source} (test split)", digest=test_hash,
                                        context="testing")
        _log_run(metrics, test, probs, classes, train_info["model_uri"].removeprefix("models:/"), test_set)
        version = registry.register(train_info["model_uri"], name, train_info["run_id"], tags={
            **champion.score_tags(metrics, test_hash), "model_sha256": sha256_file(MODEL_PATH),
            **provenance.git_tags(), **provenance.dvc_exp_tags()})
        decision = champion.assess(cfg, name, version, metrics[cfg.promote_metric], test_hash, test, classes, rt)
        tracking.set_tags({"registered_model_version": decision.new_version,
                           "promotion.would_promote": decision.would_promote, "promotion.reason": decision.reason})
        write_json(METRICS_JSON, {k: v for k, v in metrics.items() if k in HEADLINE})
        write_json(PER_CLASS_JSON, metrics["per_class"])
        write_predictions(PREDICTIONS_CSV, test, probs, classes)
        write_json(PROMOTION_JSON, decision.to_json())
    log.info("test %s %.4f; version %s %s @champion: %s", cfg.promote_metric, decision.new_score,
             decision.new_version, "would become" if decision.would_promote else "would not become", decision.reason)


def _log_run(metrics: dict, test: Split, probs: torch.Tensor, classes: list[str], model_id: str, test_set) -> None:
    """Test metrics on the run and on its logged model (mlflow.search_logged_models ranks models by
    them), the confusion matrix and the error-analysis figure."""
    scalars = {f"test_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    # per class in sections of their own (the UI folds a metric key's prefix before "/"), by name
    for cls, values in metrics["per_class"].items():
        for name in ("precision", "recall", "f1"):
            scalars[f"per_class_{name}/{_metric_key(cls)}"] = values[name]
    tracking.log_metrics(scalars, model_id=model_id, dataset=test_set)
    cm = np.array(metrics["confusion_matrix"])
    for path, fig in ((CONFUSION_PNG, plots.confusion_matrix(cm, classes)),
                      (PREDICTIONS_PNG, error_figure(test, probs, classes))):
        plots.save(fig, path)
        plots.close(fig)
        tracking.log_artifact(path)
    tracking.log_text(
        "\n".join([",".join(["actual\\predicted", *classes])]
                  + [",".join([c, *map(str, row)]) for c, row in zip(classes, cm.tolist())]) + "\n",
        "confusion_matrix.csv")


if __name__ == "__main__":
    run_stage(main)
