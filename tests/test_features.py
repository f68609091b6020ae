"""The frozen-feature cache of finetune: head (pipeline/features.py): without augmentation the head
trains to the same weights as on images, the cache is reused and keyed, augmented views are drawn once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.project import committed_params

from pipeline import features
from pipeline.dataset import DatasetMeta, SplitFiles
from pipeline.engine import TrainData, TrainState, fit, image_inputs
from pipeline.paths import FEATURE_CACHE_DIR
from pipeline.runtime import resolve_runtime
from pipeline.train import build, make_learner, on_features
from pipeline.transforms import Norm

MODEL = "timm/mobilenetv3_small_050"
SIZE = 32


@pytest.fixture(autouse=True)
def threads():
    """pipeline.train.on_features sets torch's threads to 1 (for the head); other tests keep theirs."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def tiny_data(seed: int = 0) -> TrainData:
    """24 train and 9 val random RGB images of 3 classes at SIZE px."""
    g = torch.Generator().manual_seed(seed)
    img = lambda n: torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    splits = {s: SplitFiles(count=0, sha256={f"{s}.npy": f"{seed}"}) for s in ("train", "val", "test")}
    meta = DatasetMeta(image_size=SIZE, channels=3, classes=("a", "b", "c"), mean=(0.5,) * 3, std=(0.25,) * 3,
                       source=None, raw_sha256=None, splits=splits)
    return TrainData(img(24), torch.arange(24) % 3, img(9), torch.arange(9) % 3, meta)


def params(**overrides):
    base = {"train.model": MODEL, "train.finetune": "head", "train.epochs": "3", "train.batch_size": "8",
            "train.augment": "[]", "train.precision": "fp32", "train.lr": "0.01", "train.patience": "100"}
    return committed_params({**base, **{k.replace("__", "."): str(v) for k, v in overrides.items()}}).train


def train(cached: bool, data: TrainData, cfg, seed: int = 42):
    """What pipeline.train does, cached or not: (final state, history, network, feature info)."""
    rt = resolve_runtime("cpu", cfg.precision)
    torch.manual_seed(seed)
    network = build(cfg, data.meta)
    info = None
    if cached:
        head, data, info = on_features(cfg, network, data, rt, seed)
        learner = make_learner(cfg, head, [], data, rt, seed)
        inputs = features.cached_inputs(data.train_x.shape[1], learner.generator)
    else:
        learner = make_learner(cfg, network.net, network.frozen, data, rt, seed)
        inputs = image_inputs(Norm(network.config.mean, network.config.std), cfg.augment, learner.generator)
    state, _ = fit(cfg, learner, data, inputs, TrainState(), lambda s: None)
    if cached:
        state.best_state = features.full_state(network.net, cfg.model, state.best_state)
    return state, network, info


def test_without_augmentation_the_cache_trains_the_same_head(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(2)
    data, cfg = tiny_data(), params()
    plain, _, _ = train(False, data, cfg)
    cached, _, info = train(True, data, cfg)
    assert info["feature_cache"] == "miss"
    for a, b in zip(plain.history, cached.history):  # the same shuffles, the same numbers
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["epoch"], key)
    assert plain.best_state.keys() == cached.best_state.keys()
    for k, v in plain.best_state.items():
        assert torch.allclose(v.float(), cached.best_state[k].float(), rtol=1e-4, atol=1e-5), k
    # the whole network is what is saved: backbone bit-identical to a fresh build, BN statistics included
    torch.manual_seed(42)
    fresh = build(cfg, data.meta).net.state_dict()
    moved = {k for k in fresh if not torch.equal(fresh[k], cached.best_state[k])}
    assert moved == {"classifier.weight", "classifier.bias"}

    # a second run reads the cache; another seed of the views or other data computes new features
    _, _, again = train(True, data, cfg)
    assert again["feature_cache"] == "hit"
    assert len(list(FEATURE_CACHE_DIR.glob("*.safetensors"))) == 1
    train(True, tiny_data(seed=1), cfg)
    assert len(list(FEATURE_CACHE_DIR.glob("*.safetensors"))) == 2


def test_augmented_views_are_drawn_once_and_picked_per_epoch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(2)
    data = tiny_data()
    cfg = params(train__augment='["flip", "resized_crop"]', train__feature_views=3)
    rt = resolve_runtime("cpu", "fp32")
    torch.manual_seed(0)
    network = build(cfg, data.meta)
    _, feats, _ = on_features(cfg, network, data, rt, 0)
    plain = on_features(params(), network, data, rt, 0)[1]
    assert feats.train_x.shape[:2] == (24, 3)
    # view 0: the image as evaluated (to rounding: the second call runs on 1 thread, see on_features)
    assert torch.allclose(feats.train_x[:, 0], plain.train_x[:, 0], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(feats.train_x[:, 1], feats.train_x[:, 0])  # augmented views differ
    assert torch.allclose(feats.val_x, plain.val_x, rtol=1e-4, atol=1e-6)
    picked = features.cached_inputs(3, torch.Generator().manual_seed(0)).train(feats.train_x)
    rows = [[torch.equal(picked[i], feats.train_x[i, v]) for v in range(3)] for i in range(24)]
    assert all(any(r) for r in rows) and len({np.argmax(r) for r in rows}) > 1
