"""The architecture table: `build_model(name, ...)` builds any entry of ARCHITECTURES for a number of
classes, 1 or 3 input channels and any image size, optionally with pretrained weights, and
`apply_finetune` freezes what `train.finetune` says. torchvision models keep their own structure;
only the first conv (for 1 channel) and the classifier (for the number of classes) are replaced.
`timm/<name>` is any timm model (pipeline/timm_models.py), built and split into blocks by timm itself.

ModelConfig is what rebuilds a trained network and its input handling; Classifier is the served
model (normalisation inside, probabilities out)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import timm_models
from pipeline.config import MODEL_NAMES
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


class _BitsReLU(torch.autograd.Function):
    """In-place ReLU of a bf16 tensor done on its bits, seen as int16: bf16 values below zero
    (-0.0 and -inf included) are exactly the int16 values <= -128, and zeroing bits gives +0.0.
    Negative NaNs (int16 -127..-1) stay NaN, as with torch.relu."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        torch.threshold_(x.view(torch.int16), -128, 0)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        # gradient where out > 0: for bf16 bits that is int16 > 0 (which also passes +NaN's gradient,
        # where torch.relu's backward gives 0)
        return torch.ops.aten.threshold_backward(grad.view(torch.int16), out.view(torch.int16), 0).view(grad.dtype)


class ReLU(nn.Module):
    """nn.ReLU(inplace=True), faster on bf16 CPU tensors (autocast on AVX512-BF16/AMX CPUs): PyTorch's
    bf16 CPU kernels for relu and its backward convert to fp32 and back, while the int16 ones run at
    memory speed (docs/benchmarks.md). Same values as torch.relu (tests/test_models.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            return _BitsReLU.apply(x)
        return F.relu(x, inplace=True)


class TinyVGG(nn.Module):
    """TinyVGG, the small CNN of the notebooks this project grew from (CNN Explainer's model): two
    blocks of conv3x3-ReLU-conv3x3-ReLU-maxpool2, then flatten-linear.

    Padding 1 keeps the spatial size through the convs, so any image_size >= 4 works (the notebooks
    hard-coded hidden_units*13*13 for 64x64 inputs with unpadded convs).
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, hidden_units: int,
                 batch_norm: bool, dropout: float):
        super().__init__()

        def block(c_in: int) -> nn.Sequential:
            layers: list[nn.Module] = []
            for c in (c_in, hidden_units):
                layers.append(nn.Conv2d(c, hidden_units, 3, padding=1, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(hidden_units))
                layers.append(ReLU())
            return nn.Sequential(*layers, nn.MaxPool2d(2))

        self.features = nn.Sequential(block(in_channels), block(hidden_units))
        side = image_size // 4
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout),
                                        nn.Linear(hidden_units * side * side, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MinSize(nn.Module):
    """Upsamples inputs smaller than `size` (bilinear), so ImageNet models with 32x downsampling
    accept 8x8 digits or 28x28 MNIST; larger inputs pass through untouched."""

    def __init__(self, net: nn.Module, size: int):
        super().__init__()
        self.net, self.size = net, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.net(x)


@dataclass(frozen=True)
class Spec:
    """How to find the parts of one architecture that build_model adapts or apply_finetune freezes."""

    first_conv: str  # dotted attribute path of the first Conv2d
    head: str  # dotted path of the final Linear (replaced for num_classes)
    blocks: Callable[[nn.Module], list[nn.Module]]  # feature-extractor blocks, input to output
    min_size: int  # smallest input side the architecture accepts


def _vgg_blocks(m: nn.Module) -> list[nn.Module]:
    blocks, current = [], []
    for layer in m.features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append(nn.ModuleList(current))
            current = []
    return blocks + [m.classifier[:-1]]


_VGG = Spec("features.0", "classifier.6", _vgg_blocks, 32)
_STAGED = Spec("features.0.0", "classifier.-1", lambda m: list(m.features), 32)
# MobileNetV3's classifier has a hidden Linear before the head: like VGG's hidden FC layers it is
# the last block, so `last_n` counts it instead of always training it.
_MOBILENET = Spec("features.0.0", "classifier.-1", lambda m: list(m.features) + [m.classifier[:-1]], 32)

ARCHITECTURES: dict[str, Spec] = {
    "tinyvgg": Spec("features.0.0", "classifier.2", lambda m: list(m.features), 4),
    "vgg11_bn": _VGG,
    "vgg16": _VGG,
    "vgg16_bn": _VGG,
    "resnet18": Spec("conv1", "fc", lambda m: [nn.ModuleList([m.conv1, m.bn1]), m.layer1, m.layer2,
                                               m.layer3, m.layer4], 32),
    "efficientnet_b0": _STAGED,
    "mobilenet_v3_small": _MOBILENET,
    "mobilenet_v3_large": _MOBILENET,
}
if tuple(ARCHITECTURES) != MODEL_NAMES:
    raise RuntimeError("pipeline.config.MODEL_NAMES must list the keys of ARCHITECTURES, in order")


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
    return module


def _set(module: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, last = path.rpartition(".")
    owner = _get(module, parent) if parent else module
    if last.lstrip("-").isdigit():
        owner[int(last)] = new
    else:
        setattr(owner, last, new)


TIMM_MIN_SIZE = 32  # timm's ImageNet models downsample 32x, like torchvision's


def spec_of(name: str, core: nn.Module) -> Spec:
    """The Spec of registry entry `name`, or of the built timm model `core` (unwrapped)."""
    if timm_models.is_timm(name):
        return Spec(timm_models.first_conv(core), timm_models.head_path(core), timm_models.blocks, TIMM_MIN_SIZE)
    return ARCHITECTURES[name]


def build_model(name: str, num_classes: int, channels: int, image_size: int, *, hidden_units: int,
                batch_norm: bool, dropout: float, pretrained: dict | None = None) -> nn.Module:
    """Build registry entry `name` (or `timm/<name>`). `pretrained` is a state dict for the
    architecture as torchvision, timm (or an earlier run of this pipeline) saved it; its classifier is
    dropped when shapes differ."""
    if timm_models.is_timm(name):
        net: nn.Module = timm_models.create(name, num_classes, channels)
        if pretrained is not None:
            state = {k.removeprefix("net."): v for k, v in pretrained.items()}
            skipped = _load_matching(net, timm_models.adapt_state(net, state), name)
            head = net.get_classifier()
            if isinstance(head, nn.Linear) and any(k.startswith(timm_models.head_path(net) + ".") for k in skipped):
                # A new classifier as torchvision models get one (nn.Linear's init): timm's own init
                # (EfficientNet's: uniform over 1/sqrt(num_classes)) starts 3 classes on pretrained
                # features at a loss of 5 instead of 1.1, and a short head training never recovers.
                head.reset_parameters()
        return MinSize(net, TIMM_MIN_SIZE) if image_size < TIMM_MIN_SIZE else net
    if name not in ARCHITECTURES:
        raise PipelineError(f"unknown model {name!r}; choose one of {', '.join(sorted(ARCHITECTURES))} "
                            f"or timm/<any timm model>")
    spec = ARCHITECTURES[name]
    if name == "tinyvgg":
        net = TinyVGG(channels, num_classes, image_size, hidden_units, batch_norm, dropout)
        if pretrained is not None:
            _load_matching(net, pretrained, name)
        return net
    import torchvision

    net = torchvision.models.get_model(name, weights=None)
    if pretrained is not None:
        _load_matching(net, pretrained, name)
    conv = _get(net, spec.first_conv)
    if channels != conv.in_channels:
        new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        bias=conv.bias is not None)
        with torch.no_grad():  # greyscale: the sum over RGB filters keeps pretrained responses
            new.weight.copy_(conv.weight.sum(dim=1, keepdim=True) if channels == 1 else conv.weight[:, :channels])
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        _set(net, spec.first_conv, new)
    head = _get(net, spec.head)
    if head.out_features != num_classes:
        _set(net, spec.head, nn.Linear(head.in_features, num_classes))
    return MinSize(net, spec.min_size) if image_size < spec.min_size else net


def _load_matching(net: nn.Module, state: dict, name: str) -> list[str]:
    """Load every tensor whose name and shape match; a differing classifier is left new. Returns
    the names of the tensors left as they were."""
    own = net.state_dict()
    state = {k.removeprefix("net."): v for k, v in state.items()}
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(usable))
    if len(usable) < len(own) // 2:
        raise PipelineError(f"train.weights: the state dict does not fit {name} "
                            f"({len(usable)} of {len(own)} tensors match)")
    if skipped:
        log.info("pretrained weights: %d tensors left newly initialised: %s", len(skipped), ", ".join(skipped[:6]))
    net.load_state_dict(usable, strict=False)
    return skipped


def unwrap(net: nn.Module) -> nn.Module:
    return net.net if isinstance(net, MinSize) else net


def head_name(net: nn.Module, name: str) -> str:
    """The dotted name, in the unwrapped network, of its final classifier (negative indices resolved)."""
    core = unwrap(net)
    head = _get(core, spec_of(name, core).head)
    return next(n for n, m in core.named_modules() if m is head)


def apply_finetune(net: nn.Module, name: str, mode: str, unfreeze_last: int) -> list[nn.Module]:
    """Freeze per train.finetune and return the frozen modules (their BN layers must stay in eval
    mode; see set_train_mode). `full` freezes nothing; `head` all but the classifier; `last_n` all
    but the classifier and the last `unfreeze_last` feature blocks."""
    if mode == "full":
        return []
    core = unwrap(net)
    spec = spec_of(name, core)
    blocks = spec.blocks(core)
    frozen = blocks if mode == "head" else blocks[:max(len(blocks) - unfreeze_last, 0)]
    for block in frozen:
        for p in block.parameters():
            p.requires_grad_(False)
    if mode == "head":  # everything that is not the head, blocks or not (resnet's avgpool has none)
        head_params = {id(p) for p in _get(core, spec.head).parameters()}
        for p in core.parameters():
            if id(p) not in head_params:
                p.requires_grad_(False)
    return frozen


def set_train_mode(net: nn.Module, frozen: list[nn.Module]) -> None:
    """net.train(), except that frozen parts stay in eval mode so their BN statistics don't move."""
    net.train()
    for block in frozen:
        block.eval()


ONNX_CONFIG_KEY = "model_config"  # the metadata entry of an exported .onnx file that holds its ModelConfig


@dataclass(frozen=True)
class ModelConfig:
    """What rebuilds a trained network and its input handling, saved with the weights (models/model.pt,
    the logged model) so that evaluate, predict and serving cannot drift from training."""

    model: str  # a key of ARCHITECTURES or timm/<name>
    channels: int
    image_size: int
    hidden_units: int  # TinyVGG's options; the others ignore them
    batch_norm: bool
    dropout: float
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per-channel normalisation of 0..1 pixels
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        """Plain types only: models/model.pt loads with torch.load(weights_only=True)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names})


def build_from_config(cfg: ModelConfig, pretrained: dict | None = None) -> nn.Module:
    """A fresh network for `cfg` (with `pretrained` weights where they fit)."""
    return build_model(cfg.model, cfg.num_classes, cfg.channels, cfg.image_size, hidden_units=cfg.hidden_units,
                       batch_norm=cfg.batch_norm, dropout=cfg.dropout, pretrained=pretrained)


class Classifier(nn.Module):
    """The served model: float images in 0..1, (N, C, H, W) -> class probabilities.

    Normalisation is inside, so a client of `mlflow models serve` only resizes and scales pixels;
    the config (classes, image size, channels) travels with it for predict.
    """

    def __init__(self, net: nn.Module, config: ModelConfig):
        super().__init__()
        self.net, self.config = net, config
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def classes(self) -> list[str]:
        return list(self.config.classes)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def channels(self) -> int:
        return self.config.channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net((x - self.mean) / self.std).float(), dim=1)


def load_classifier(path: str | Path) -> Classifier:
    """models/model.pt (weights + config, loaded with weights_only=True) -> Classifier on the CPU."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return classifier(ModelConfig.from_dict(obj["config"]), obj["state_dict"])


def classifier(config: ModelConfig, state: dict[str, torch.Tensor]) -> Classifier:
    """The architecture `config` names, rebuilt by this code, with `state`'s weights, on the CPU."""
    net = build_from_config(config)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:  # missing, unexpected or misshapen tensors
        raise PipelineError(f"the weights do not fit {config.model} as its config describes it: "
                            f"{str(e).splitlines()[0]}") from None
    return Classifier(net, config).eval()


def save_weights(net: nn.Module, path: Path) -> None:
    """The network's state dict as safetensors: plain tensors, which load without running any code."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(path))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise PipelineError(f"{path}: not a safetensors weights file ({e}); refusing to load it") from None
