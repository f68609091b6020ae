"""params.yaml, loaded once into frozen dataclasses and validated.

params.yaml is the only place defaults live: every field here is required, so a key missing from the
file is an error, and so is a key the code does not know. Errors name the key and what is allowed.
What each key means: docs/params.md.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import yaml

from pipeline.errors import ConfigError

PARAMS_FILE = "params.yaml"

AUGMENTATIONS = ("flip", "crop", "resized_crop", "trivialaugment")  # kept in sync with transforms.AUGMENTS
# The keys of pipeline.models.ARCHITECTURES (which checks it matches), here so that validating params does
# not import torch: fetch_data and prepare stay light (prepare's peak memory is the benchmark's).
MODEL_NAMES = ("tinyvgg", "vgg11_bn", "vgg16", "vgg16_bn", "resnet18", "efficientnet_b0",
               "mobilenet_v3_small", "mobilenet_v3_large")
TIMM_PREFIX = "timm/"  # timm/<name>: any timm model, checked against timm's list when train builds it


@dataclass(frozen=True)
class Base:
    seed: int
    device: str

    def check(self) -> None:
        # numpy's default_rng takes 0..2**32-1 only; outside it prepare would crash with a traceback.
        _range("base.seed", self.seed, 0, 2**32 - 1)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            _fail("base.device", self.device, "one of auto, cpu, cuda, cuda:N")


@dataclass(frozen=True)
class Data:
    source: str
    sha256: Optional[str]
    torchvision_root: str
    download_dir: str
    timeout_s: float
    download_deadline_s: float
    max_archive_bytes: int
    max_archive_members: int
    max_compression_ratio: float

    def check(self) -> None:
        if not self.source:
            _fail("data.source", self.source, "builtin:digits, torchvision:<name>, an http(s) URL, or a path")
        if self.source.startswith("builtin:") and self.source != "builtin:digits":
            _fail("data.source", self.source, "builtin:digits")
        if self.source.startswith("torchvision:") and self.source.split(":", 1)[1] not in TORCHVISION_SETS:
            _fail("data.source", self.source, ", ".join(f"torchvision:{n}" for n in TORCHVISION_SETS))
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.sha256.lower()):
            _fail("data.sha256", self.sha256, "null or 64 hex digits")
        _positive("data.timeout_s", self.timeout_s)
        _positive("data.download_deadline_s", self.download_deadline_s)
        _positive("data.max_archive_bytes", self.max_archive_bytes)
        _positive("data.max_archive_members", self.max_archive_members)
        _positive("data.max_compression_ratio", self.max_compression_ratio)


TORCHVISION_SETS = ("MNIST", "FashionMNIST", "CIFAR10")


@dataclass(frozen=True)
class Prepare:
    image_size: int
    channels: Literal[1, 3]
    val_fraction: float
    test_fraction: float
    min_images_per_class: int
    max_image_pixels: int

    def check(self) -> None:
        _range("prepare.image_size", self.image_size, 4, 1024)
        _range("prepare.val_fraction", self.val_fraction, 0.0, 0.9, low_open=True)
        _range("prepare.test_fraction", self.test_fraction, 0.0, 0.9, low_open=True)
        if self.val_fraction + self.test_fraction >= 1:
            _fail("prepare.val_fraction", self.val_fraction, "val_fraction + test_fraction < 1")
        _range("prepare.min_images_per_class", self.min_images_per_class, 2, 10**9)
        _positive("prepare.max_image_pixels", self.max_image_pixels)


@dataclass(frozen=True)
class Train:
    model: str
    hidden_units: int
    batch_norm: bool
    dropout: float
    weights: Optional[str]
    finetune: Literal["full", "head", "last_n"]
    unfreeze_last: int
    epochs: int
    batch_size: int
    optimizer: Literal["adam", "adamw", "sgd"]
    lr: float
    weight_decay: float
    scheduler: Literal["none", "cosine", "onecycle"]
    label_smoothing: float
    augment: tuple[str, ...]
    feature_cache: bool
    feature_views: int
    patience: int
    monitor: Literal["val_loss", "val_acc"]
    min_delta: float
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    nproc: int
    checkpoint_dir: str

    def check(self) -> None:
        if self.model not in MODEL_NAMES and not (self.model.startswith(TIMM_PREFIX) and len(self.model) > len(TIMM_PREFIX)):
            _fail("train.model", self.model, "one of " + ", ".join(MODEL_NAMES) + f", or {TIMM_PREFIX}<a timm model>")
        _range("train.hidden_units", self.hidden_units, 1, 4096)
        _range("train.dropout", self.dropout, 0.0, 0.95)
        _range("train.unfreeze_last", self.unfreeze_last, 1, 1000)
        _range("train.epochs", self.epochs, 1, 100000)
        _range("train.batch_size", self.batch_size, 1, 1 << 16)
        _positive("train.lr", self.lr)
        _range("train.weight_decay", self.weight_decay, 0.0, 1.0)
        _range("train.label_smoothing", self.label_smoothing, 0.0, 0.9)
        for name in self.augment:
            if name not in AUGMENTATIONS:
                _fail("train.augment", name, "a list of " + ", ".join(AUGMENTATIONS))
        _range("train.feature_views", self.feature_views, 1, 1000)
        _range("train.patience", self.patience, 1, 100000)
        _range("train.min_delta", self.min_delta, 0.0, 1e9)
        _range("train.nproc", self.nproc, 1, 1024)


@dataclass(frozen=True)
class Evaluate:
    promote_metric: Literal["accuracy", "f1_macro", "precision_macro", "recall_macro"]
    promote_min_delta: float
    batch_size: int

    def check(self) -> None:
        _range("evaluate.promote_min_delta", self.promote_min_delta, 0.0, 1.0)
        _range("evaluate.batch_size", self.batch_size, 1, 1 << 16)


@dataclass(frozen=True)
class Mlflow:
    experiment: str
    registered_model: str

    def check(self) -> None:
        if not self.experiment:
            _fail("mlflow.experiment", self.experiment, "a non-empty name")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.registered_model):
            _fail("mlflow.registered_model", self.registered_model, "letters, digits, '_', '.', '-'")


@dataclass(frozen=True)
class Params:
    base: Base
    data: Data
    prepare: Prepare
    train: Train
    evaluate: Evaluate
    mlflow: Mlflow

    def flat(self, *sections: str) -> dict[str, object]:
        """The values of the given sections (all when none) as {"section.key": value}, for MLflow."""
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            if sections and f.name not in sections:
                continue
            for key, value in dataclasses.asdict(getattr(self, f.name)).items():
                out[f"{f.name}.{key}"] = list(value) if isinstance(value, tuple) else value
        return out


def load_params(path: str | Path = PARAMS_FILE, overrides: dict[str, str] | None = None) -> Params:
    """Read, type-check and range-check params.yaml; `overrides` maps "section.key" to a YAML value."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run the stages from the project root)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for dotted, text in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not isinstance(raw.get(section), dict) or not key:
            raise ConfigError(f"override {dotted}: unknown key; sections are {', '.join(raw)}")
        raw[section][key] = yaml.safe_load(text)
    return _build(Params, raw, "")


def _build(cls, raw, prefix: str):
    """Build dataclass `cls` from a dict, rejecting unknown and missing keys, checking types."""
    where = prefix.rstrip(".") or "params.yaml"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; allowed in {where}: {', '.join(names)}")
    missing = [k for k in names if k not in raw]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: missing from params.yaml (no defaults live in code)")
    values = {}
    for name in names:
        key, hint, value = prefix + name, hints[name], raw[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key + ".")
        else:
            values[name] = _coerce(key, hint, value)
    obj = cls(**values)
    if hasattr(obj, "check"):
        obj.check()
    return obj


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(key: str, hint, value):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, inner, value)
    if origin is Literal:
        if value not in args or type(value) is bool:
            _fail(key, value, "one of " + ", ".join(map(str, args)))
        return value
    if origin is tuple:
        if value is None:
            return ()
        if not isinstance(value, list):
            _fail(key, value, "a list")
        return tuple(_coerce(key, args[0], v) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads `lr: 3e-4` as text: it wants `3.0e-4`; ML configs write 3e-4
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        _fail(key, value, f"a {hint.__name__}")
    return value


def _fail(key: str, value, allowed: str):
    raise ConfigError(f"{key}: invalid value {value!r}; allowed: {allowed}")


def _positive(key: str, value) -> None:
    if not value > 0:
        _fail(key, value, "a number > 0")


def _range(key: str, value, low, high, low_open: bool = False) -> None:
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        _fail(key, value, f"{'(' if low_open else '['}{low}, {high}]")
