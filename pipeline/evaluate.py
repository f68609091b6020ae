"""Stage evaluate: models/model.pt + the test split -> reports/metrics.json, reports/predictions.csv,
reports/promotion.json; completes train's MLflow run (test metrics, confusion matrix, error analysis),
registers its model, and moves `@champion` to it only when it beats the champion on the same test
data by at least evaluate.promote_min_delta.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import numpy as np
import torch

from pipeline import plots, registry, tracking
from pipeline.champion import promote
from pipeline.cli import run_stage
from pipeline.config import Params
from pipeline.dataset import Split, load_meta, load_split
from pipeline.engine import classify
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, read_json, write_json
from pipeline.metrics import compute_metrics
from pipeline.models import load_classifier
from pipeline.paths import METRICS_JSON, MODEL_PATH, PREDICTIONS_CSV, PROMOTION_JSON, TRAIN_JSON
from pipeline.runtime import resolve_runtime

log = logging.getLogger(__name__)

GRID = 10  # images in each panel of the error-analysis figure


def write_predictions(path: Path, test: Split, probs: torch.Tensor, classes: list[str]) -> None:
    conf, pred = probs.max(dim=1)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "actual", "predicted", "probability"])
            for i, file in enumerate(test.files):
                writer.writerow([file, classes[test.labels[i]], classes[pred[i]], f"{conf[i].item():.6f}"])


def error_figure(test: Split, probs: torch.Tensor, classes: list[str]):
    """The most confident correct and wrong predictions (the notebooks' plot_most_correct, both ways)."""
    conf, pred = probs.max(dim=1)
    correct = pred.numpy() == test.labels
    order = np.argsort(-conf.numpy(), kind="stable")
    picks = [i for i in order if correct[i]][:GRID // 2] + [i for i in order if not correct[i]][:GRID // 2]
    titles = [f"true {classes[test.labels[i]]}\npred {classes[pred[i]]} {conf[i]:.2f}" for i in picks]
    colors = ["green" if correct[i] else "red" for i in picks]
    return plots.image_grid(test.images[picks], titles, colors,
                            "Most confident correct (green) and wrong (red) test predictions")


def _metric_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def main(params: Params) -> None:
    cfg = params.evaluate
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
    with tracking.run(train_info["run_id"]):
        _log_run(metrics, test, probs, classes)
        decision = promote(params, metrics[cfg.promote_metric], test, classes, test_hash, train_info, rt)
        # Everything is computed and written before the alias moves: a failure above leaves it.
        write_json(METRICS_JSON, {k: v for k, v in metrics.items() if k != "confusion_matrix"})
        write_predictions(PREDICTIONS_CSV, test, probs, classes)
        write_json(PROMOTION_JSON, decision)
        if decision["promoted"]:
            registry.set_champion(params.mlflow.registered_model, decision["new_version"])
        # Only now, so that no version or run claims a promotion whose alias never moved.
        registry.tag_version(params.mlflow.registered_model, decision["new_version"],
                             {"promoted": decision["promoted"]})
        tracking.set_tags({"promotion.promoted": decision["promoted"]})
    log.info("test %s %.4f; %s -> %s", cfg.promote_metric, decision["new_score"],
             "promoted to @champion" if decision["promoted"] else "not promoted", decision["reason"])


def _log_run(metrics: dict, test: Split, probs: torch.Tensor, classes: list[str]) -> None:
    scalars = {f"test_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    for cls, values in metrics["per_class"].items():
        for name in ("precision", "recall", "f1"):
            scalars[f"test_{name}_{_metric_key(cls)}"] = values[name]
    tracking.log_metrics(scalars)
    cm = np.array(metrics["confusion_matrix"])
    fig = plots.confusion_matrix(cm, classes)
    tracking.log_figure(fig, "confusion_matrix.png")
    plots.close(fig)
    fig = error_figure(test, probs, classes)
    tracking.log_figure(fig, "most_confident_predictions.png")
    plots.close(fig)
    tracking.log_text(
        "\n".join([",".join(["actual\\predicted", *classes])]
                  + [",".join([c, *map(str, row)]) for c, row in zip(classes, cm.tolist())]) + "\n",
        "confusion_matrix.csv")


if __name__ == "__main__":
    run_stage(main)
