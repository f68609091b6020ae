"""Test metrics from class probabilities: accuracy (per image), macro and per-class precision, recall
and F1, top-5 accuracy, and the confusion matrix.

All of them follow from the confusion matrix, so they are computed here from it rather than through a
metrics library (importing one costs every evaluate and promote process seconds). A ratio with a zero
denominator is 0, and the macro averages leave out classes that are neither in the test set nor ever
predicted (torchmetrics' convention): a class the test split lacks does not drag the mean down.
"""

from __future__ import annotations

import torch

TOP_K = 5


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def compute_metrics(probs: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> dict:
    """Accuracy (per image), macro and per-class precision/recall/F1, top-5 accuracy when there are
    more than 5 classes, and the confusion matrix (rows: actual, columns: predicted)."""
    n = len(classes)
    targets = targets.long()
    preds = probs.argmax(dim=1)
    confusion = torch.bincount(targets * n + preds, minlength=n * n).reshape(n, n)
    tp = confusion.diagonal().double()
    predicted = confusion.sum(dim=0).double()  # tp + fp
    actual = confusion.sum(dim=1).double()  # tp + fn, the support
    precision, recall = _ratio(tp, predicted), _ratio(tp, actual)
    f1 = _ratio(2 * tp, predicted + actual)
    seen = (predicted + actual) > 0
    metrics = {
        "accuracy": (tp.sum() / max(len(targets), 1)).item(),
        "precision_macro": precision[seen].mean().item() if seen.any() else 0.0,
        "recall_macro": recall[seen].mean().item() if seen.any() else 0.0,
        "f1_macro": f1[seen].mean().item() if seen.any() else 0.0,
    }
    if n > TOP_K:
        top = probs.topk(TOP_K, dim=1).indices
        metrics[f"top{TOP_K}_accuracy"] = (top == targets[:, None]).any(dim=1).double().mean().item()
    metrics["per_class"] = {c: {"precision": precision[i].item(), "recall": recall[i].item(), "f1": f1[i].item(),
                                "support": int(actual[i])} for i, c in enumerate(classes)}
    metrics["test_images"] = len(targets)
    metrics["confusion_matrix"] = confusion.tolist()
    return metrics
