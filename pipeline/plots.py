"""Figures (matplotlib, Agg): loss/accuracy curves, confusion matrix, most-confident predictions.
Each function returns a Figure; callers log or save it."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def loss_curves(history: list[dict]):
    """Loss and accuracy per epoch, train and val, in two panels (the notebooks' plot_loss_curves)."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], label=f"train_{key}")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], label=f"val_{key}")
        ax.set_title("Loss" if key == "loss" else "Accuracy")
        ax.set_xlabel("epoch")
        ax.legend()
    return fig


def confusion_matrix(cm: np.ndarray, classes: list[str]):
    """Counts and row-normalised (recall per true class) side by side, class names on both axes."""
    n = len(classes)
    side = max(5.0, 0.45 * n + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side, side), layout="constrained")
    rows = cm.sum(axis=1, keepdims=True)
    normed = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    for ax, data, title, fmt in ((axes[0], cm, "Counts", "d"), (axes[1], normed, "Row-normalised", ".2f")):
        ax.imshow(data, cmap="Blues")
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(title)
        if n <= 30:
            top = data.max() if data.size else 0
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, format(data[i, j], fmt), ha="center", va="center", fontsize=8,
                            color="white" if data[i, j] > top / 2 else "black")
    return fig


def image_grid(images: np.ndarray, titles: list[str], colors: list[str], suptitle: str, cols: int = 5):
    """uint8 (N, C, H, W) images with a title each (the notebooks' plot_most_correct / pred_and_plot)."""
    n = len(images)
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title, color in zip(axes.flat, images, titles, colors):
        img = img.transpose(1, 2, 0)
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        ax.set_title(title, color=color, fontsize=9)
    fig.suptitle(suptitle)
    return fig


def close(fig) -> None:
    plt.close(fig)
