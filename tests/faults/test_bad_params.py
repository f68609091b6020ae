"""Every key of params.yaml (read from the file: a key added later is covered, or this fails until it
is), given a value of the wrong type and, where a range or a set of values applies, one outside it:
load_params raises ConfigError naming exactly that key."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from helpers.project import committed
from pipeline import config
from pipeline.config import load_params
from pipeline.errors import ConfigError

AREA = "Bad params"

PARAMS = yaml.safe_load(committed("params.yaml"))
KEYS = [f"{section}.{key}" for section, values in PARAMS.items() for key in values]

# An out-of-range (or not-allowed) value per key; None: the key has no range (any value of its type).
OUT_OF_RANGE = {
    "base.seed": -1, "base.device": "gpu",
    "data.source": "builtin:mnist", "data.sha256": "abc123", "data.torchvision_root": None,
    "data.download_dir": None, "data.timeout_s": 0, "data.download_deadline_s": 0, "data.max_archive_bytes": 0, "data.max_archive_members": 0,
    "data.max_compression_ratio": -1.0,
    "prepare.image_size": 2, "prepare.channels": 2, "prepare.val_fraction": 0.95, "prepare.test_fraction": 0.0,
    "prepare.min_images_per_class": 1, "prepare.max_image_pixels": 0,
    "train.model": "resnet999", "train.hidden_units": 0, "train.batch_norm": None, "train.dropout": 0.99,
    "train.weights": None, "train.finetune": "partial", "train.unfreeze_last": 0, "train.epochs": 0,
    "train.batch_size": 0, "train.optimizer": "rmsprop", "train.lr": 0.0, "train.weight_decay": 1.5,
    "train.scheduler": "step", "train.label_smoothing": 1.0, "train.augment": ["rotate"], "train.patience": 0,
    "train.monitor": "train_loss", "train.min_delta": -0.1, "train.precision": "fp8", "train.nproc": 0,
    "train.checkpoint_dir": None, "train.feature_cache": None, "train.feature_views": 0,
    "evaluate.promote_metric": "auc", "evaluate.promote_min_delta": -0.5, "evaluate.batch_size": 0,
    "mlflow.experiment": "", "mlflow.registered_model": "my model/v2",
}


def hint(key: str):
    section, name = key.split(".")
    cls = typing.get_type_hints(config.Params)[section]
    return typing.get_type_hints(cls)[name]


def wrong_type(key: str):
    """A value of the wrong type for the key's declared type (a string where a number or a flag
    belongs, a number where a string belongs, a bare string where a list belongs)."""
    h = hint(key)
    origin, args = typing.get_origin(h), typing.get_args(h)
    if origin is typing.Union:  # Optional[str]
        h = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(h), typing.get_args(h)
    if origin is typing.Literal:
        return str(args[0]) if isinstance(args[0], int) else 1
    if origin is tuple:
        return "crop"
    return {int: "12", float: "0.5", bool: "true", str: 42}[h]


def load_with(tmp_path, key: str, value):
    params = yaml.safe_load(committed("params.yaml"))
    section, name = key.split(".")
    params[section][name] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return load_params(path)


def rejected(tmp_path, key: str, value) -> str:
    with pytest.raises(ConfigError) as err:
        load_with(tmp_path, key, value)
    message = str(err.value)
    assert message.startswith(f"{key}: "), message  # names the key first
    others = [k for k in KEYS if k != key and f"{k}:" in message]
    assert others == [], message  # and no other key
    return message


def test_every_key_has_a_case():
    """params.yaml's keys and the code's fields are the same set, and each has a range decision."""
    fields = [f"{f.name}.{g.name}" for f in dataclasses.fields(config.Params)
              for g in dataclasses.fields(typing.get_type_hints(config.Params)[f.name])]
    assert sorted(KEYS) == sorted(fields)
    missing = sorted(set(KEYS) - set(OUT_OF_RANGE))
    assert missing == [], "add these keys to OUT_OF_RANGE (None: no range)"


@pytest.mark.parametrize("key", KEYS)
def test_bad_value_names_the_key(tmp_path, fault_log, key):
    """A wrong type and an out-of-range value for one key of params.yaml."""
    load_with(tmp_path, key, PARAMS[key.split(".")[0]][key.split(".")[1]])  # the file's own value loads
    bad_type = wrong_type(key)
    happened = [f"{bad_type!r} -> ConfigError '{rejected(tmp_path, key, bad_type)}'"]
    tried = [f"`{key}: {bad_type!r}` ({type(bad_type).__name__})"]
    value = OUT_OF_RANGE[key]
    if value is not None:
        happened.append(f"{value!r} -> ConfigError '{rejected(tmp_path, key, value)}'")
        tried.append(f"`{key}: {value!r}` (out of range)")
    else:
        tried.append("(no range: any value of its type is valid)")
    fault_log.record(AREA, "; ".join(tried), "; ".join(happened))
