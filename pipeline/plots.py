"""Figures (matplotlib, Agg): loss/accuracy curves, confusion matrix, most-confident predictions.
Each function returns a Figure; `save` writes it whole (nothing clipped) for DVC and MLflow alike."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.io import atomic_path  # noqa: E402

# train and val told apart by colour, line style and marker, so they read in greyscale too
STYLES = {"train": dict(color="tab:blue", linestyle="-", marker="o"),
          "val": dict(color="tab:orange", linestyle="--", marker="s")}


def loss_curves(history: list[dict]):
    """Loss and accuracy per epoch, train and val, in two panels (the notebooks' plot_loss_curves)."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for ax, key, label in ((ax_loss, "loss", "cross-entropy loss (mean per image)"),
                           (ax_acc, "acc", "accuracy (per image)")):
        for split, style in STYLES.items():
            ax.plot(epochs, [h[f"{split}_{key}"] for h in history], label=split, markersize=3, **style)
        ax.set_title("Loss" if key == "loss" else "Accuracy")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def confusion_matrix(cm: np.ndarray, classes: list[str]):
    """Counts and row-normalised (recall per true class) side by side: actual classes on the rows,
    predicted on the columns, as in the confusion_matrix.csv artifact."""
    n = len(classes)
    side = max(5.0, 0.45 * n + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side, side), layout="constrained")
    rows = cm.sum(axis=1, keepdims=True)
    normed = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    for ax, data, title, fmt in ((axes[0], cm, "Counts", "d"), (axes[1], normed, "Row-normalised (recall)", ".2f")):
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


def save(fig, path: Path) -> None:
    """The figure as a PNG at `path`, whole: the bounding box takes in every title and label."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight", pad_inches=0.2)


def close(fig) -> None:
    plt.close(fig)
