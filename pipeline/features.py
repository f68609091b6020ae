"""The frozen-feature cache of `train.finetune: head`: the frozen network's output (the input of the
classifier) for every train and val image is computed once, and the head trains on those vectors for
as many epochs as it likes, at the cost of a linear layer per epoch instead of a backbone forward.

Training views: view 0 is each image as evaluation sees it; with `train.augment` set, views
1..`train.feature_views`-1 are augmented copies drawn once (from base.seed). Each epoch the head sees
one view per image, picked at random from the learner's generator, so an epoch is still one pass over
the images. Without augmentation (one view) the head trains on exactly the numbers the uncached path
computes, with the same shuffles, so it ends with the same weights (tests/test_features.py).

The cache lives in data/features/ beside the prepared data, one safetensors file per key: the frozen
weights' digest, the prepared splits' digest, normalisation, views, seed and numerics. Any change
computes new features; the least recently used files beyond KEEP are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.engine import Inputs, TrainData, predict_logits
from pipeline.io import atomic_path
from pipeline.models import head_name, unwrap
from pipeline.paths import FEATURE_CACHE_DIR
from pipeline.runtime import Runtime
from pipeline.transforms import Norm, eval_transforms, train_transforms

log = logging.getLogger(__name__)

KEEP = 8  # cache files kept (each is N x views x feature-size float32: 1 MB for food3 with 1 view)


@dataclass(frozen=True)
class Views:
    """What the training views are drawn from."""

    norm: Norm
    augment: tuple[str, ...]
    count: int  # 1 without augmentation: more plain copies would be the same numbers
    seed: int


def views_of(norm: Norm, augment: tuple[str, ...], feature_views: int, seed: int) -> Views:
    """Without augmentation one view, whatever the seed: every training seed shares its features."""
    return Views(norm, augment, feature_views, seed) if augment else Views(norm, (), 1, 0)


@contextlib.contextmanager
def headless(net: nn.Module, name: str):
    """`net` with its final classifier replaced by the identity while inside: it then outputs what the
    classifier takes in (pooled, flattened features; MobileNet's hidden layer and VGG's FC layers
    included, as they are frozen with the rest). Yields the classifier."""
    core = unwrap(net)
    parent_name, _, attr = head_name(net, name).rpartition(".")
    parent = core.get_submodule(parent_name)
    head = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())  # a Sequential's "3" too: it keeps its place
    try:
        yield head
    finally:
        setattr(parent, attr, head)


def cache_key(net: nn.Module, head: nn.Module, data: TrainData, views: Views, rt: Runtime, name: str) -> str:
    """sha256 of everything the cached numbers depend on (the frozen weights bit for bit)."""
    h = hashlib.sha256()
    head_ids = {id(t) for t in head.state_dict(keep_vars=True).values()}
    for k, v in net.state_dict(keep_vars=True).items():
        if id(v) not in head_ids:
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    what = {"model": name, "data": data.meta.split_digest("train", "val"), "size": data.meta.image_size,
            "views": [list(views.norm.mean), list(views.norm.std), list(views.augment), views.count, views.seed],
            "numerics": [rt.device.type, str(rt.amp_dtype), rt.channels_last]}
    h.update(json.dumps(what, sort_keys=True).encode())
    return h.hexdigest()


@torch.no_grad()
def extract(net: nn.Module, data: TrainData, views: Views, batch_size: int, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (float32, CPU) of (train: N x views x D, val: M x D); `net` is headless and in eval mode."""
    plain = eval_transforms(views.norm)
    train = [predict_logits(net, data.train_x, plain, batch_size, rt)]
    g = torch.Generator().manual_seed(views.seed)
    for _ in range(1, views.count):
        train.append(predict_logits(net, data.train_x, train_transforms(views.norm, views.augment, g), batch_size, rt))
    return torch.stack(train, dim=1), predict_logits(net, data.val_x, plain, batch_size, rt)


def cached_features(net: nn.Module, name: str, data: TrainData, views: Views, batch_size: int,
                    rt: Runtime) -> tuple[TrainData, dict]:
    """The features of `data` (train as N x views x D) as TrainData on rt's device, from the cache or
    computed and stored; and {"feature_cache": "hit"|"miss", "feature_seconds": ...}."""
    from safetensors.torch import load_file, save_file

    was_training = net.training
    net.eval()
    try:
        with headless(net, name) as head:
            path = FEATURE_CACHE_DIR / f"{cache_key(net, head, data, views, rt, name)}.safetensors"
            start = time.perf_counter()
            hit = path.exists()
            if hit:
                stored = load_file(str(path))
                train, val = stored["train"], stored["val"]
                os.utime(path)  # recently used: pruned last
            else:
                train, val = extract(net, data, views, batch_size, rt)
                with atomic_path(path) as tmp:
                    save_file({"train": train, "val": val}, str(tmp))
                _prune()
    finally:
        net.train(was_training)
    if len(train) != len(data.train_y) or len(val) != len(data.val_y):
        raise RuntimeError(f"{path}: holds {len(train)}/{len(val)} rows for {len(data.train_y)}/{len(data.val_y)} images")
    seconds = time.perf_counter() - start
    log.info("frozen features %s: %s (%d train images x %d views, %d val, %d values each) in %.1fs",
             "read from the cache" if hit else "computed", path, len(train), views.count, len(val), train.shape[-1],
             seconds)
    feats = TrainData(train.to(rt.device), data.train_y, val.to(rt.device), data.val_y, data.meta)
    return feats, {"feature_cache": "hit" if hit else "miss", "feature_seconds": seconds}


def _prune() -> None:
    files = sorted(FEATURE_CACHE_DIR.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[KEEP:]:
        old.unlink(missing_ok=True)


def cached_inputs(count: int, generator: torch.Generator) -> Inputs:
    """Training input: one of each row's `count` views, drawn from `generator` (none drawn for one
    view, so the shuffles match the uncached path's); evaluation: the features as they are."""

    def pick(x: torch.Tensor) -> torch.Tensor:
        if count == 1:
            return x[:, 0]
        which = torch.randint(0, count, (len(x),), generator=generator).to(x.device)
        return x[torch.arange(len(x), device=x.device), which]

    return Inputs(train=pick, eval=lambda x: x)


def full_state(net: nn.Module, name: str, head_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`net`'s state dict (on the CPU) with the head's tensors from `head_state`."""
    prefix = ("net." if unwrap(net) is not net else "") + head_name(net, name) + "."
    state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
    state.update({prefix + k: v for k, v in head_state.items()})
    return state
