"""Predict classes of image files with a trained model:

    python -m pipeline.predict IMAGE_OR_DIR... [--model models:/<name>@champion | runs:/... |
                                                 models/model.pt] [--top-k K] [--plot out.png]

Images go through the same decoding as prepare (pipeline/images.py) and the model's own
normalisation. A file that is not a usable image gets an error line and a non-zero exit status;
the other files are still predicted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import plots, registry, tracking
from pipeline.config import PARAMS_FILE, load_params
from pipeline.errors import PipelineError
from pipeline.images import BadImage, decode
from pipeline.io import is_hidden
from pipeline.models import Classifier, load_classifier

log = logging.getLogger(__name__)

DEFAULT_MODEL = "models/model.pt"


def load_any(ref: str) -> Classifier:
    """A Classifier from a models/model.pt file or any MLflow model URI (models:/..., runs:/...)."""
    if Path(ref).exists():
        return load_classifier(ref)
    if ":/" not in ref:
        raise PipelineError(f"--model {ref}: no such file, and not an MLflow model URI")
    return registry.load_model(ref).eval()


def expand(paths: list[str]) -> list[Path]:
    """Files as given, and the visible files under given folders, sorted. Only the parts below a
    given folder can hide a file: `../imgs` and `~/.cache/imgs` are folders like any other."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*")
                          if f.is_file() and not any(is_hidden(x) for x in f.relative_to(p).parts))
        else:
            out.append(p)
    return out


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


def predict_files(model: Classifier, files: list[Path], top_k: int, max_pixels: int):
    """(rows of file/class/probability (+ top-k), uint8 images kept for plotting, errors per file)."""
    rows, images, errors = [], [], {}
    for f in files:
        try:
            img = decode(f, model.image_size, model.channels, max_pixels)
        except (BadImage, OSError) as e:
            errors[str(f)] = str(e)
            continue
        with torch.no_grad():
            probs = model(torch.from_numpy(img[None].copy()).float() / 255.0)[0]
        top = torch.topk(probs, min(top_k, len(model.classes)))
        row = {"file": str(f), "class": model.classes[top.indices[0]], "probability": round(top.values[0].item(), 4)}
        for rank in range(1, len(top.indices)):
            row[f"top{rank + 1}"] = f"{model.classes[top.indices[rank]]} {top.values[rank].item():.4f}"
        rows.append(row)
        images.append(img)
    return rows, images, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="image files or folders of images")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="models/model.pt, models:/<name>@<alias>, runs:/<id>/model")
    parser.add_argument("--top-k", type=positive, default=1, help="also show the next K-1 classes (K >= 1)")
    parser.add_argument("--plot", type=Path, help="write the images with their predictions to this PNG (the "
                                                  "notebooks' pred_and_plot_image); its folder is created")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        params = load_params(PARAMS_FILE)
        if args.model.startswith(("models:/", "runs:/")):
            tracking.configure(params.mlflow.experiment)
        model = load_any(args.model)
        files = expand(args.paths)
        if not files:
            raise PipelineError(f"no files found in {', '.join(args.paths)}")
        rows, images, errors = predict_files(model, files, args.top_k, params.prepare.max_image_pixels)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rows:
        table = pd.DataFrame(rows)
        # The one-line form only when there is nothing else to show (one image, no top-k columns).
        print(table.to_string(index=False) if len(rows) > 1 or len(table.columns) > 3 else
              f"{rows[0]['file']}: {rows[0]['class']} ({rows[0]['probability']:.4f})")
    for f, reason in errors.items():
        print(f"error: {f}: {reason}", file=sys.stderr)
    if args.plot and rows:
        titles = [f"Pred: {r['class']} | Prob: {r['probability']:.3f}" for r in rows]
        fig = plots.image_grid(np.stack(images), titles, ["black"] * len(rows), f"Predictions ({args.model})",
                               cols=min(len(rows), 5))
        try:
            plots.save(fig, args.plot)  # atomic, creating the folder
        except OSError as e:  # not writable, a file where the folder should be
            print(f"error: --plot {args.plot}: {e}", file=sys.stderr)
            return 2
        finally:
            plots.close(fig)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
