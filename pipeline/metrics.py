"""Test metrics from class probabilities: accuracy (per image), macro and per-class precision, recall
and F1, top-5 accuracy, and the confusion matrix."""

from __future__ import annotations

import torch
import torchmetrics.functional.classification as tmf

TOP_K = 5


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
