"""The ONNX export logged beside every model (serving.export_onnx): onnxruntime gives the PyTorch
model's probabilities, for any batch size, and the file alone is enough to predict with; a timm model
logged, served and loaded back by its name."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pipeline import predict, registry, serving, tracking
from pipeline.models import Classifier, ModelConfig, build_from_config

CLASSES = ("pizza", "steak", "sushi")
PARITY = 1e-4  # largest absolute difference in probabilities allowed


def sharpened(name: str, channels: int, size: int) -> Classifier:
    """A randomly initialised model whose batch-norm statistics are set from random images and whose
    last linear layer is scaled up, so that its probabilities differ from image to image and from
    uniform, and a wrong export shows in them."""
    torch.manual_seed(0)
    cfg = ModelConfig(model=name, channels=channels, image_size=size, hidden_units=16, batch_norm=True,
                      dropout=0.0, classes=CLASSES, mean=(0.5,) * channels, std=(0.25,) * channels)
    net = build_from_config(cfg)
    x = torch.rand(8, channels, size, size, generator=torch.Generator().manual_seed(2))
    model = Classifier(net, cfg)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a plain average over the calibration passes
    last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(x)
        model.eval()
        for _ in range(12):
            if np.ptp(model(x).numpy(), axis=1).mean() >= 0.3:
                break
            last.weight.mul_(3)
    return model


@pytest.mark.parametrize("name,channels,size", [("tinyvgg", 1, 28), ("mobilenet_v3_small", 3, 64),
                                                ("resnet18", 3, 32), ("timm/mobilenetv3_small_050", 3, 64)])
def test_onnx_probabilities_equal_pytorch(name, channels, size, tmp_path):
    model = sharpened(name, channels, size)
    path = tmp_path / "model.onnx"
    serving.export_onnx(model, path)
    onnx_model = predict.from_onnx(path)
    assert onnx_model.config == model.config  # the file carries what predict needs
    x = torch.rand(5, channels, size, size, generator=torch.Generator().manual_seed(1))  # not the export's batch size
    with torch.no_grad():
        want = model(x).numpy()
    got = onnx_model.probabilities(x.numpy())
    assert got.shape == (5, len(CLASSES))
    assert np.ptp(want, axis=1).mean() > 0.2, "probabilities too flat for the comparison to mean anything"
    diff = float(np.abs(got - want).max())
    print(f"{name}: max |onnx - torch| = {diff:.2e}")
    assert diff <= PARITY


def test_onnx_file_without_the_config_is_refused(tmp_path):
    import onnx

    model = sharpened("tinyvgg", 1, 28)
    path = tmp_path / "model.onnx"
    serving.export_onnx(model, path)
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(path))
    with pytest.raises(Exception, match="no 'model_config' in its metadata"):
        predict.from_onnx(path)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(Exception, match="junk.onnx: not a readable ONNX model"):
        predict.from_onnx(tmp_path / "junk.onnx")


def test_a_timm_model_logged_is_served_and_loaded_back_by_its_name(tmp_path, mlflow_template):
    """The logged model holds no code of the network: serving.py and registry.load_model rebuild
    `timm/<name>` from its config, and answer as the model that was logged."""
    import mlflow

    model = sharpened("timm/mobilenetv3_small_050", 3, 64)
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        example = (np.random.default_rng(0).random((3, 64, 64)) * 255).astype(np.uint8)
        with mlflow.start_run():
            uri = tracking.log_model(model, example, step=0)
        x = np.random.default_rng(1).random((4, 3, 64, 64)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
            loaded = registry.load_model(uri)(torch.from_numpy(x)).numpy()
        served = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"pixels": list(x)}))
    finally:
        mlflow.set_tracking_uri(before)
    assert loaded == pytest.approx(want, abs=1e-6)
    assert list(served["class"]) == [CLASSES[i] for i in want.argmax(axis=1)]
    assert list(served["probability"]) == pytest.approx(want.max(axis=1), abs=1e-6)
