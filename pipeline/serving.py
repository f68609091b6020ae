"""The logged model, as an MLflow "model from code": MLflow runs this file to load the model (no
unpickling), and the architecture is rebuilt by this project's code from two plain artifacts: the
weights (safetensors) and the ModelConfig (JSON). An ONNX export of the same model lies beside them.
`mlflow models serve` serves it; evaluate, predict and warm starts read the artifacts without running
any code from the model's folder (registry.load_model).

What a client sends, one row per image (`{"dataframe_records": [{"image": "<base64>"}, ...]}`):
- "image": the image file's bytes, base64-encoded: any format prepare reads (JPEG, PNG, WebP, 16-bit,
  CMYK, EXIF-rotated...), decoded, resized and converted exactly as prepare does;
- or "pixels": the image as floats in 0..1, shape (channels, size, size) at the model's size.
What it answers, one row per image: "class", "probability", the top classes with their
probabilities, and "error": null, or why that row's image could not be classified (the other rows
are answered all the same). Param "top_k" (default 3).
"""

import base64
import binascii
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

from pipeline.errors import PipelineError
from pipeline.images import BadImage, decode
from pipeline.models import (
    ONNX_CONFIG_KEY,
    Classifier,
    ModelConfig,
    classifier,
    load_weights,
)

WEIGHTS, CONFIG, ONNX = "weights", "model_config", "onnx"  # artifact keys...
FILES = {WEIGHTS: "weights.safetensors", CONFIG: "model_config.json", ONNX: "model.onnx"}  # ...and file names
TOP_K = 3
MAX_IMAGE_PIXELS = 89_478_485  # a decompression bomb beyond this (PIL's default, prepare's too)


def load_files(weights: Path, config: Path) -> Classifier:
    """The Classifier the weights and config artifacts describe."""
    try:
        cfg = ModelConfig.from_dict(json.loads(Path(config).read_text()))
    except (ValueError, TypeError) as e:
        raise PipelineError(f"{config}: not a model config: {e}") from None
    return classifier(cfg, load_weights(Path(weights)))


class BadInput(ValueError):
    """One row cannot be classified; str(e) is the short reason the answer gives for it."""


def _pixels(model: Classifier, row: dict) -> np.ndarray:
    """A row's image as float32 (C, H, W) in 0..1 at the model's size."""
    cfg = model.config
    image, pixels = row.get("image"), row.get("pixels")
    if isinstance(image, str) and image:
        try:
            data = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise BadInput("'image' is not base64") from None
        try:
            return decode(data, cfg.image_size, cfg.channels, MAX_IMAGE_PIXELS).astype(np.float32) / 255.0
        except BadImage as e:
            raise BadInput(f"'image': {e}") from None
    if pixels is None or (isinstance(pixels, float) and np.isnan(pixels)):
        raise BadInput("no 'image' (base64 bytes of an image file) and no 'pixels'")
    try:
        arr = np.asarray(pixels.tolist() if hasattr(pixels, "tolist") else pixels, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadInput("'pixels' is not a nested list of numbers") from None
    want = (cfg.channels, cfg.image_size, cfg.image_size)
    if arr.shape != want:
        raise BadInput(f"'pixels' has shape {arr.shape}; this model takes {want} (channels, height, width)")
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise BadInput(f"'pixels' must be floats in 0..1 (got {arr.min():g}..{arr.max():g}): divide 0..255 "
                       "values by 255, or send the image file as 'image'")
    return arr.astype(np.float32)


def predict_frame(model: Classifier, frame: pd.DataFrame, top_k: int = TOP_K) -> pd.DataFrame:
    """Classify every row of `frame` (see the module's docstring); one answer row per input row."""
    k = max(1, min(int(top_k), len(model.classes)))
    good, images, errors = [], [], {}
    for i, row in enumerate(frame.to_dict("records")):
        try:
            images.append(_pixels(model, row))
            good.append(i)
        except BadInput as e:
            errors[i] = str(e)
    answers: list[dict] = [{"class": None, "probability": None, "top_classes": [], "top_probabilities": [],
                            "error": errors.get(i)} for i in range(len(frame))]
    if images:
        with torch.no_grad():
            probs = model(torch.from_numpy(np.stack(images)))
        top = torch.topk(probs, k)
        for row, values, indices in zip(good, top.values.tolist(), top.indices.tolist()):
            names = [model.classes[j] for j in indices]
            answers[row].update({"class": names[0], "probability": values[0], "top_classes": names,
                                 "top_probabilities": values})
    # object columns keep None as None: pandas' own dtypes make it NaN, which JSON answers can't carry
    return pd.DataFrame(answers, columns=["class", "probability", "top_classes", "top_probabilities", "error"],
                        dtype=object)


def signature():
    """The input, output and params the served model declares (mlflow models serve checks them)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import (
        AnyType,
        Array,
        ColSpec,
        ParamSchema,
        ParamSpec,
        Schema,
    )

    # "pixels" is checked here (predict_frame): MLflow's own check refuses a batch mixing both forms
    inputs = Schema([ColSpec("string", "image", required=False), ColSpec(AnyType(), "pixels", required=False)])
    outputs = Schema([ColSpec("string", "class", required=False), ColSpec("double", "probability", required=False),
                      ColSpec(Array("string"), "top_classes"), ColSpec(Array("double"), "top_probabilities"),
                      ColSpec("string", "error", required=False)])
    return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("top_k", "long", TOP_K)]))


def png_base64(image: np.ndarray) -> str:
    """A uint8 (C, H, W) image as a PNG file, base64-encoded: what a client sends as "image"."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def input_example(image: np.ndarray) -> pd.DataFrame:
    """One request row holding a real image (uint8 (C, H, W)) as a client sends it: PNG, base64."""
    return pd.DataFrame({"image": [png_base64(image)]})


def export_onnx(model: Classifier, path: Path) -> None:
    """The served Classifier (normalisation, network, softmax) as ONNX, any batch size: images
    (N, C, H, W) in 0..1 -> probabilities (N, classes). Its ModelConfig (classes, image size...) goes
    into the file's metadata, so the .onnx file alone is enough to predict with."""
    import onnx

    cfg = model.config
    example = torch.rand(2, cfg.channels, cfg.image_size, cfg.image_size)
    torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=17, input_names=["images"],
                      output_names=["probabilities"],
                      dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}})
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {ONNX_CONFIG_KEY: json.dumps(cfg.to_dict())})
    onnx.save(proto, str(path))


class ImageClassifierModel(PythonModel):
    def load_context(self, context) -> None:
        self.model = load_files(context.artifacts[WEIGHTS], context.artifacts[CONFIG])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return predict_frame(self.model, model_input, (params or {}).get("top_k", TOP_K))


mlflow.models.set_model(ImageClassifierModel())
