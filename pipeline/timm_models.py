"""timm as the second model source: `train.model: timm/<name>` is any model timm lists.

Everything here asks timm, never a per-model table: the name is checked against `timm.list_models()`,
the classifier is reset and a 1-channel input adapted by `timm.create_model(num_classes=...,
in_chans=...)`, pretrained weights for 1 channel by timm's `adapt_input_conv`, the input
normalisation comes from the model's pretrained config, and the blocks that `train.finetune`
freezes are timm's own coarse parameter groups (`group_matcher`, the stem and the stages, as timm's
layer-wise learning-rate decay uses them).

timm is imported inside the functions: params validation (fetch_data, prepare) stays without torch.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from pipeline.config import TIMM_PREFIX as PREFIX
from pipeline.errors import ConfigError, PipelineError


def is_timm(name: str) -> bool:
    return name.startswith(PREFIX)


def arch(name: str) -> str:
    """`timm/<name>` -> timm's model name, checked against timm's list (a typo gets close matches)."""
    import timm

    model = name.removeprefix(PREFIX)
    if not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(PREFIX + c for c in close)}?" if close else "see timm.list_models()"
        raise ConfigError(f"train.model: {name!r} is not a model timm {timm.__version__} knows; {hint}")
    return model


def pretrained_cfg(name: str):
    """timm's PretrainedCfg of the model's default (or named, `arch.tag`) weights."""
    import timm

    cfg = timm.get_pretrained_cfg(arch(name))
    if cfg is None:
        raise PipelineError(f"train.model: {name} has no pretrained config in timm")
    return cfg


def create(name: str, num_classes: int, channels: int) -> nn.Module:
    """A randomly initialised `name` with a `num_classes` classifier and a `channels`-channel stem."""
    import timm

    return timm.create_model(arch(name), pretrained=False, num_classes=num_classes, in_chans=channels)


def norm(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of 0..1 pixels the pretrained weights expect (0.5/0.5 for the tf_ ports)."""
    cfg = pretrained_cfg(name)
    return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)


def head_path(net: nn.Module) -> str:
    """Dotted path of the final classifier module, as the model itself names it (get_classifier)."""
    head = net.get_classifier()
    return next(n for n, m in net.named_modules() if m is head)


def first_conv(net: nn.Module) -> str:
    first = net.pretrained_cfg.get("first_conv")
    return first[0] if isinstance(first, (tuple, list)) else first


def adapt_state(net: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the first conv adapted to `net`'s input channels the way timm adapts its own
    pretrained weights (adapt_input_conv: 1 channel = the sum over RGB)."""
    from timm.models import adapt_input_conv

    key = f"{first_conv(net)}.weight"
    own = net.state_dict().get(key)
    if own is None or key not in state or state[key].shape == own.shape:
        return state
    return {**state, key: adapt_input_conv(own.shape[1], state[key])}


def blocks(net: nn.Module) -> list[nn.Module]:
    """The feature extractor as blocks, input to output: timm's coarse groups (stem, stages; a neck
    such as EfficientNet's conv_head joins the last stage), the classifier excluded. A model without
    a group_matcher is one block."""
    from timm.models import group_modules

    head = head_path(net)
    is_head = lambda n: n == head or n.startswith(head + ".")  # noqa: E731
    if hasattr(net, "group_matcher"):
        groups = group_modules(net, net.group_matcher(coarse=True))
        named = [[n for n in names if not is_head(n)] for _, names in sorted(groups.items())]
    else:
        named = [[n for n, m in net.named_modules() if n and m._parameters and not is_head(n)]]
    return [nn.ModuleList([net.get_submodule(n) for n in names]) for names in named if names]


def default_weights_file(name: str) -> Path:
    """Where DEFAULT looks first, offline: a timm state dict of the model's default pretrained tag
    under the torch hub cache (what `python -m tools.convert_lite0` writes for tf_efficientnet_lite0)."""
    from torch.hub import get_dir

    cfg = pretrained_cfg(name)
    tag = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    return Path(get_dir()) / "checkpoints" / "timm" / f"{tag}.pth"


def default_weights(name: str) -> dict[str, torch.Tensor]:
    """train.weights=DEFAULT for a timm model: the hub-cache file (default_weights_file) when it
    exists, else timm's own download (Hugging Face hub or URL); offline, an error naming the file."""
    import timm

    path = default_weights_file(name)
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    cfg = pretrained_cfg(name)
    source = f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
    try:
        return timm.create_model(arch(name), pretrained=True).state_dict()
    except Exception as e:  # no network: OSError, huggingface_hub's errors, RuntimeError for no weights
        raise PipelineError(f"train.weights=DEFAULT: timm's pretrained weights for {name} are not cached and "
                            f"could not be downloaded from {source or 'anywhere'} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); place a timm state dict "
                            f"(torch.save(model.state_dict())) at {path}, or set train.weights to its path") from None
