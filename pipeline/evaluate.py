"""Stage evaluate: models/model.pt + the test split -> reports/metrics.json, reports/predictions.csv,
reports/promotion.json; completes train's MLflow run (test metrics, confusion matrix, error analysis),
registers its model, and moves `@champion` to it only when it beats the champion on the same test
data by at least evaluate.promote_min_delta.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import torch
import torchmetrics.functional.classification as tmf

from pipeline import plots, tracking
from pipeline.cli import run_stage
from pipeline.config import Params, PipelineError
from pipeline.engine import Runtime, predict_logits, resolve_runtime
from pipeline.io import atomic_path, read_json, write_json
from pipeline.models import Classifier, load_classifier
from pipeline.prepared import Split, load_meta, load_split
from pipeline.train import MODEL_PATH, TRAIN_JSON
from pipeline.transforms import to_float

log = logging.getLogger(__name__)

METRICS_JSON = Path("reports/metrics.json")
PREDICTIONS_CSV = Path("reports/predictions.csv")
PROMOTION_JSON = Path("reports/promotion.json")
TOP_K = 5
GRID = 10  # images in each panel of the error-analysis figure


def probabilities(model: Classifier, images: np.ndarray, batch_size: int, rt: Runtime) -> torch.Tensor:
    """Class probabilities for uint8 images through the served model (which normalises itself)."""
    model = model.to(rt.device).eval()
    return predict_logits(model, torch.from_numpy(np.array(images)), to_float, batch_size, rt)


def compute_metrics(probs: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> dict:
    """Accuracy (per image), macro and per-class precision/recall/F1, top-5 accuracy when there are
    more than 5 classes, and the confusion matrix (rows: actual, columns: predicted)."""
    n = len(classes)
    kw = {"num_classes": n}
    metrics = {
        "accuracy": tmf.multiclass_accuracy(probs, targets, average="micro", **kw).item(),
        "precision_macro": tmf.multiclass_precision(probs, targets, average="macro", **kw).item(),
        "recall_macro": tmf.multiclass_recall(probs, targets, average="macro", **kw).item(),
        "f1_macro": tmf.multiclass_f1_score(probs, targets, average="macro", **kw).item(),
    }
    if n > TOP_K:
        metrics[f"top{TOP_K}_accuracy"] = tmf.multiclass_accuracy(probs, targets, average="micro",
                                                                  top_k=TOP_K, **kw).item()
    per = {name: getattr(tmf, f"multiclass_{name}")(probs, targets, average=None, **kw).tolist()
           for name in ("precision", "recall", "f1_score")}
    support = torch.bincount(targets, minlength=n).tolist()
    metrics["per_class"] = {c: {"precision": per["precision"][i], "recall": per["recall"][i],
                                "f1": per["f1_score"][i], "support": support[i]} for i, c in enumerate(classes)}
    metrics["test_images"] = len(targets)
    metrics["confusion_matrix"] = tmf.multiclass_confusion_matrix(probs, targets, **kw).tolist()
    return metrics


def test_data_hash(meta: dict) -> str:
    """Identifies the test split (its image and label files): scores are comparable only within one."""
    files = meta["splits"]["test"]["sha256"]
    return hashlib.sha256("".join(files[k] for k in sorted(files)).encode()).hexdigest()


def decide(new: float, champ: float | None, min_delta: float, metric: str) -> tuple[bool, str]:
    """Promote when there is no champion, or the new score beats it by at least min_delta (a tie
    never promotes: the alias moves only for a real improvement)."""
    if champ is None:
        return True, "no champion yet"
    gain = new - champ
    if gain > 0 and gain >= min_delta:
        return True, f"{metric} {new:.4f} beats champion {champ:.4f} by {gain:.4f} >= {min_delta}"
    return False, f"{metric} {new:.4f} does not beat champion {champ:.4f} by more than 0 and >= {min_delta}"


def champion_score(name: str, metric: str, test_hash: str, test: Split, classes: list[str],
                   batch_size: int, rt: Runtime) -> tuple[object, float | None, str]:
    """(champion version or None, its score on today's test split, how that score was obtained)."""
    version = tracking.champion(name)
    if version is None:
        return None, None, "none"
    tags = version.tags or {}
    if tags.get("test_data_hash") == test_hash and f"test_{metric}" in tags:
        return version, float(tags[f"test_{metric}"]), "recorded on the same test data"
    model = tracking.load_model(f"models:/{name}/{version.version}")
    if list(getattr(model, "classes", [])) != classes or model.image_size != test.images.shape[-1] \
            or model.channels != test.images.shape[1]:
        return version, None, "champion takes other classes or input size: not comparable, replaced"
    probs = probabilities(model, test.images, batch_size, rt)
    score = compute_metrics(probs, torch.from_numpy(test.labels), classes)[metric]
    return version, score, "re-scored on today's test data (it was scored on other data)"


def write_predictions(path: Path, test: Split, probs: torch.Tensor, classes: list[str]) -> None:
    conf, pred = probs.max(dim=1)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "actual", "predicted", "probability"])
            for i, file in enumerate(test.files):
                writer.writerow([file, classes[test.labels[i]], classes[pred[i]], f"{conf[i].item():.6f}"])


def error_figure(test: Split, probs: torch.Tensor, classes: list[str]):
    """The notes' plot_most_correct, both ways: the most confident correct and wrong predictions."""
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
    classes = meta["classes"]
    test = load_split("test", meta=meta)
    model = load_classifier(MODEL_PATH)
    probs = probabilities(model, test.images, cfg.batch_size, rt)
    metrics = compute_metrics(probs, torch.from_numpy(test.labels), classes)
    test_hash = test_data_hash(meta)

    tracking.configure(params.mlflow.experiment)
    with tracking.run(train_info["run_id"]):
        _log_run(metrics, test, probs, classes)
        decision = promote(params, metrics[cfg.promote_metric], test, classes, test_hash, train_info, rt)
        # Everything is computed and written before the alias moves: a failure above leaves it.
        write_json(METRICS_JSON, {k: v for k, v in metrics.items() if k != "confusion_matrix"})
        write_predictions(PREDICTIONS_CSV, test, probs, classes)
        write_json(PROMOTION_JSON, decision)
        if decision["promoted"]:
            tracking.set_champion(params.mlflow.registered_model, decision["new_version"])
        # Only now, so that no version or run claims a promotion whose alias never moved.
        tracking.tag_version(params.mlflow.registered_model, decision["new_version"],
                             {"promoted": decision["promoted"]})
        tracking.set_tags({"promotion.promoted": decision["promoted"]})
    log.info("test %s %.4f; %s -> %s", cfg.promote_metric, decision["new_score"],
             "promoted to @champion" if decision["promoted"] else "not promoted", decision["reason"])


def promote(params: Params, new_score: float, test: Split, classes: list[str], test_hash: str,
            train_info: dict, rt: Runtime) -> dict:
    """Register the run's model and decide whether it becomes @champion (the alias itself moves
    later, after the outputs are written, and only then are the version and the run tagged
    `promoted`). Tags the version and the run with the score and the reason."""
    cfg, name = params.evaluate, params.mlflow.registered_model
    version = tracking.register(train_info["model_uri"], name, train_info["run_id"])
    champ, champ_score, how = champion_score(name, cfg.promote_metric, test_hash, test, classes,
                                             cfg.batch_size, rt)
    if champ is not None and champ.version == version.version:
        promoted, reason = False, "this version already is @champion"
    elif champ is not None and champ_score is None:
        promoted, reason = True, how
    else:
        promoted, reason = decide(new_score, champ_score, cfg.promote_min_delta, cfg.promote_metric)
    tracking.tag_version(name, version.version, {f"test_{cfg.promote_metric}": new_score,
                                                 "test_data_hash": test_hash, "promotion_reason": reason})
    tracking.set_tags({"promotion.reason": reason,
                       "registered_model_version": version.version})
    return {
        "promoted": promoted, "reason": reason, "metric": cfg.promote_metric,
        "min_delta": cfg.promote_min_delta, "new_version": version.version, "new_score": new_score,
        "champion_version": champ.version if champ else None, "champion_score": champ_score,
        "champion_scored": how, "test_data_hash": test_hash, "run_id": train_info["run_id"],
    }


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
