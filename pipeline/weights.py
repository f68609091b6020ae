"""train.weights -> the pretrained state dict to start from, and the normalisation it was trained with.

`DEFAULT` or a torchvision weights name come from the torch hub cache (downloaded when online); for a
`timm/<name>` model DEFAULT is timm's pretrained weights (pipeline/timm_models.py); a path is a state
dict or a models/model.pt of this pipeline; `models:/<name>@<alias>` (or runs:/...) is a logged
model, read through the registry module.
"""

from __future__ import annotations

import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import registry, timm_models
from pipeline.errors import PipelineError
from pipeline.models import unwrap
from pipeline.transforms import Norm


@dataclass(frozen=True)
class Pretrained:
    state: dict  # parameter name -> tensor, as the architecture saves it
    norm: Norm | None  # the input normalisation it was trained with; None: use prepare's statistics
    source: str  # what it was resolved to (a models:/ alias names its version), recorded on the run


def resolve_weights(name: str, weights: str | None) -> Pretrained | None:
    """train.weights for architecture `name`; None for random initialisation."""
    if weights is None:
        return None
    if weights.startswith(("models:/", "runs:/")):
        model, source = registry.load_model_with_source(weights)
        return Pretrained(unwrap(model.net).state_dict(), Norm(model.config.mean, model.config.std), source)
    path = Path(weights).expanduser()
    if path.suffix in (".pt", ".pth") or path.exists():
        if not path.exists():
            raise PipelineError(f"train.weights: {path}: no such file")
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and "state_dict" in obj:  # a models/model.pt of this pipeline
            cfg = obj.get("config", {})
            norm = Norm(tuple(cfg["mean"]), tuple(cfg["std"])) if "mean" in cfg else None
            return Pretrained(obj["state_dict"], norm, str(path))
        # a timm checkpoint was trained with its pretrained config's normalisation
        return Pretrained(obj, Norm(*timm_models.norm(name)) if timm_models.is_timm(name) else None, str(path))
    if timm_models.is_timm(name):
        return _timm_weights(name, weights)
    return _torchvision_weights(name, weights)


def _timm_weights(name: str, weights: str) -> Pretrained:
    if weights != "DEFAULT":
        raise PipelineError(f"train.weights={weights}: a timm model takes DEFAULT (timm's pretrained weights; "
                            f"pick other ones as train.model: {name.split('.')[0]}.<tag>) or a path")
    cfg = timm_models.pretrained_cfg(name)
    state = timm_models.default_weights(name)
    return Pretrained(state, Norm(*timm_models.norm(name)), f"timm:{cfg.architecture}.{cfg.tag}")


def _torchvision_weights(name: str, weights: str) -> Pretrained:
    from torch.hub import get_dir, load_state_dict_from_url
    from torchvision.models import get_model_weights

    if name == "tinyvgg":
        raise PipelineError(f"train.weights={weights}: tinyvgg has no torchvision weights; use null or a path")
    enum = get_model_weights(name)
    try:
        w = enum.DEFAULT if weights == "DEFAULT" else enum[weights.split(".")[-1]]
    except KeyError:
        raise PipelineError(f"train.weights={weights}: not a weights name of {name}; choose DEFAULT or "
                            f"one of {', '.join(m.name for m in enum)}") from None
    cached = Path(get_dir()) / "checkpoints" / os.path.basename(w.url)
    try:
        state = load_state_dict_from_url(w.url, map_location="cpu", progress=True, check_hash=True)
    except (urllib.error.URLError, OSError) as e:
        raise PipelineError(f"train.weights={weights}: {w} is not in the torch hub cache and could not be "
                            f"downloaded ({e}); place {w.url} at {cached}") from None
    t = w.transforms()
    return Pretrained(state, Norm(tuple(t.mean), tuple(t.std)), str(w))
