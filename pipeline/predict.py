"""Predict classes of image files with a trained model:

    python -m pipeline.predict IMAGE_OR_DIR... [--model models:/<name>@champion | runs:/... |
                                                 models/model.pt | model.onnx]
                                                [--top-k K] [--plot out.png] [--output preds.csv]

Images go through the same decoding as prepare (pipeline/images.py) and the model's own
normalisation, in batches. A file that is not a usable image gets an error line (with --output, a
row whose "error" says why) and a non-zero exit status; the other files are still predicted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline import plots, registry, tracking
from pipeline.config import PARAMS_FILE, load_params
from pipeline.errors import PipelineError
from pipeline.images import BadImage, decode
from pipeline.io import atomic_path, is_hidden
from pipeline.models import ONNX_CONFIG_KEY, Classifier, ModelConfig, load_classifier

log = logging.getLogger(__name__)

DEFAULT_MODEL = "models/model.pt"
BATCH = 64  # images decoded and classified together


@dataclass(frozen=True)
class Predictor:
    """A model as predict uses it, PyTorch or ONNX: float images (N, C, H, W) in 0..1 -> probabilities."""

    config: ModelConfig
    probabilities: Callable[[np.ndarray], np.ndarray]

    @property
    def classes(self) -> list[str]:
        return list(self.config.classes)


def from_classifier(model: Classifier) -> Predictor:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    return Predictor(model.config, run)


def from_onnx(path: Path) -> Predictor:
    """An exported model (serving.export_onnx) run by onnxruntime; its config is in the file's metadata."""
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.NoSuchFile, ort_errors.Fail) as e:
        raise PipelineError(f"{path}: not a readable ONNX model: {str(e).splitlines()[0]}") from None
    raw = session.get_modelmeta().custom_metadata_map.get(ONNX_CONFIG_KEY)
    if raw is None:
        raise PipelineError(f"{path}: no '{ONNX_CONFIG_KEY}' in its metadata (not exported by this pipeline)")
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return Predictor(ModelConfig.from_dict(json.loads(raw)), run)


def load_any(ref: str) -> Classifier:
    """A Classifier from a models/model.pt file or any MLflow model URI (models:/..., runs:/...)."""
    if Path(ref).exists():
        return load_classifier(ref)
    if ":/" not in ref:
        raise PipelineError(f"--model {ref}: no such file, and not an MLflow model URI")
    return registry.load_model(ref).eval()


def load_predictor(ref: str) -> Predictor:
    if ref.endswith(".onnx") and Path(ref).is_file():
        return from_onnx(Path(ref))
    return from_classifier(load_any(ref))


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


def _row(file: Path, probs: np.ndarray, classes: list[str], top_k: int) -> dict:
    order = np.argsort(-probs, kind="stable")[:top_k]
    row = {"file": str(file), "class": classes[order[0]], "probability": round(float(probs[order[0]]), 4)}
    for rank, j in enumerate(order[1:], start=2):
        row[f"top{rank}"] = f"{classes[j]} {probs[j]:.4f}"
    return row


def predict_files(model: Predictor, files: list[Path], top_k: int, max_pixels: int, *, keep_images: bool = False,
                  progress: bool = False):
    """Every file, in batches: (rows of file/class/probability (+ top-k), in the files' order; the uint8
    images of those rows when `keep_images` (for --plot); errors per file)."""
    cfg, k = model.config, max(1, min(top_k, len(model.classes)))
    rows, images, errors = [], [], {}
    bar = tqdm(total=len(files), unit="img", disable=not progress, file=sys.stderr)
    for start in range(0, len(files), BATCH):
        batch, decoded = files[start:start + BATCH], []
        for f in batch:
            try:
                decoded.append((f, decode(f, cfg.image_size, cfg.channels, max_pixels)))
            except (BadImage, OSError) as e:
                errors[str(f)] = str(e)
        if decoded:
            x = np.stack([img for _, img in decoded]).astype(np.float32) / 255.0
            for (f, img), probs in zip(decoded, model.probabilities(x)):
                rows.append(_row(f, probs, model.classes, k))
                if keep_images:
                    images.append(img)
        bar.update(len(batch))
    bar.close()
    return rows, images, errors


def write_csv(path: str, files: list[Path], rows: list[dict], errors: dict[str, str]) -> None:
    """One row per file, in order: its prediction, or the error that stopped it."""
    by_file = {r["file"]: r for r in rows}
    table = pd.DataFrame([by_file.get(str(f), {"file": str(f)}) | {"error": errors.get(str(f), "")} for f in files])
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="image files or folders of images")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="models/model.pt, model.onnx, models:/<name>@<alias>, runs:/<id>/model")
    parser.add_argument("--top-k", type=positive, default=1, help="also show the next K-1 classes (K >= 1)")
    parser.add_argument("--plot", type=Path, help="write the images with their predictions to this PNG (the "
                                                  "notebooks' pred_and_plot_image); its folder is created")
    parser.add_argument("--output", help="write every file's prediction (or error) to this CSV, with a progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        params = load_params(PARAMS_FILE)
        if args.model.startswith(("models:/", "runs:/")):
            tracking.configure(params.mlflow.experiment)
        model = load_predictor(args.model)
        files = expand(args.paths)
        if not files:
            raise PipelineError(f"no files found in {', '.join(args.paths)}")
        rows, images, errors = predict_files(model, files, args.top_k, params.prepare.max_image_pixels,
                                             keep_images=bool(args.plot), progress=bool(args.output))
        if args.output:
            write_csv(args.output, files, rows, errors)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output:
        print(f"{args.output}: {len(rows)} predicted, {len(errors)} not images")
    elif rows:
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
