"""What evaluate predicted for a trained project's test images: the reference that predict, the served
model, ONNX and the demo are checked against."""

from __future__ import annotations

import base64
import csv
from pathlib import Path


def evaluate_predictions(project) -> list[dict]:
    """reports/predictions.csv rows, in test-split order."""
    with open(project.path("reports/predictions.csv"), newline="") as f:
        return list(csv.DictReader(f))


def confident(project, n: int) -> list[dict]:
    """n test images evaluate predicted with probability > 0.6 (no near-tie between two classes),
    from different predicted classes where possible."""
    rows = [r for r in evaluate_predictions(project) if float(r["probability"]) > 0.6]
    picked, seen = [], set()
    for r in rows:
        if r["predicted"] not in seen:
            picked.append(r)
            seen.add(r["predicted"])
    picked += [r for r in rows if r not in picked]
    assert len(picked) >= n, "the trained model is too unsure to pick test images"
    return picked[:n]


def b64(path) -> str:
    """A file's bytes as a client of the served model sends them."""
    return base64.b64encode(Path(path).read_bytes()).decode()


def pyfunc_probabilities(model, x, classes: list[str]):
    """The served model's (a loaded pyfunc's) probabilities of every class for float images `x`
    (N, C, H, W) in 0..1, sent as its "pixels" rows, in `classes` order."""
    import numpy as np
    import pandas as pd

    answer = model.predict(pd.DataFrame({"pixels": list(x)}), params={"top_k": len(classes)})
    assert answer["error"].isna().all(), list(answer["error"])
    probs = np.zeros((len(x), len(classes)))
    for i, (names, values) in enumerate(zip(answer["top_classes"], answer["top_probabilities"])):
        probs[i, [classes.index(n) for n in names]] = values
    return probs


def copy_images(project, rows: list[dict], folder: Path, name: str) -> Path:
    """Copy the test images of `rows` into a new `folder`, the i-th as `name.format(i=i)`."""
    import shutil

    folder.mkdir()
    for i, r in enumerate(rows):
        shutil.copy(project.path("data/raw") / r["file"], folder / name.format(i=i))
    return folder
