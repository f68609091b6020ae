"""The logged model, as an MLflow "model from code": MLflow runs this file to load the model (no
unpickling), and the architecture is rebuilt by this project's code from two plain artifacts: the
weights (safetensors) and the ModelConfig (JSON). `mlflow models serve` serves it; evaluate, predict
and warm starts read the same two artifacts without running any code from the model's folder
(registry.load_model)."""


import json
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from pipeline.errors import PipelineError
from pipeline.models import Classifier, ModelConfig, classifier, load_weights

WEIGHTS = "weights"  # artifact keys, and their file names
CONFIG = "model_config"
FILES = {WEIGHTS: "weights.safetensors", CONFIG: "model_config.json"}


def load_files(weights: Path, config: Path) -> Classifier:
    """The Classifier the two artifact files describe."""
    try:
        cfg = ModelConfig.from_dict(json.loads(Path(config).read_text()))
    except (ValueError, TypeError) as e:
        raise PipelineError(f"{config}: not a model config: {e}") from None
    return classifier(cfg, load_weights(Path(weights)))


class ImageClassifierModel(PythonModel):
    """float32 images in 0..1, (N, C, H, W) -> class probabilities (N, classes)."""

    def load_context(self, context) -> None:
        self.model = load_files(context.artifacts[WEIGHTS], context.artifacts[CONFIG])

    def predict(self, context, model_input: np.ndarray, params=None):
        x = torch.from_numpy(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(x).numpy()


mlflow.models.set_model(ImageClassifierModel())
