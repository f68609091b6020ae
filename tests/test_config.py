"""params.yaml validation: every key required, unknown keys and bad values rejected with the key named."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from helpers.project import committed, committed_params
from pipeline.cli import parse_overrides
from pipeline.config import Params, load_params
from pipeline.errors import ConfigError, PipelineError


def repo_params() -> dict:
    return yaml.safe_load(committed("params.yaml"))


def params_file(tmp_path, raw) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def with_value(dotted: str, value) -> dict:
    raw = repo_params()
    section, key = dotted.split(".", 1)
    raw[section][key] = value
    return raw


def test_repo_params_load_and_match_the_file():
    params = committed_params()
    raw = repo_params()
    assert isinstance(params, Params)
    flat = params.flat()
    # Every key of the file is a field, with the file's value (ints widened to float where typed so).
    expected = {f"{s}.{k}": v for s, section in raw.items() for k, v in section.items()}
    assert set(flat) == set(expected)
    for key, value in expected.items():
        assert flat[key] == (list(value) if isinstance(value, tuple) else value), key
    assert isinstance(params.data.timeout_s, float)
    assert params.flat("prepare") == {k: v for k, v in flat.items() if k.startswith("prepare.")}


def test_params_are_frozen():
    params = committed_params()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.prepare.image_size = 64  # type: ignore[misc]


def test_config_error_is_a_pipeline_error():
    # run_stage turns PipelineErrors into one line and exit status 1.
    assert issubclass(ConfigError, PipelineError) and issubclass(ConfigError, ValueError)


# (dotted key, bad value, texts the message must contain besides the key itself)
BAD_VALUES = [
    ("base.seed", "42", ["a int"]),
    ("base.seed", 1.5, ["a int"]),
    ("base.seed", True, ["a int"]),
    ("base.device", "gpu", ["auto", "cuda:N"]),
    ("data.source", "", ["builtin:digits"]),
    ("data.source", "builtin:cifar", ["builtin:digits"]),
    ("data.source", "torchvision:ImageNet", ["torchvision:MNIST"]),
    ("data.source", 5, ["a str"]),
    ("data.sha256", "abc123", ["64 hex digits"]),
    ("data.timeout_s", "x", ["a float"]),
    ("data.timeout_s", 0, ["> 0"]),
    ("data.timeout_s", -3.5, ["> 0"]),
    ("data.torchvision_root", None, ["a str"]),
    ("data.max_archive_bytes", 0, ["> 0"]),
    ("data.max_archive_bytes", 1.5e9, ["a int"]),
    ("data.max_archive_members", -1, ["> 0"]),
    ("data.max_compression_ratio", 0, ["> 0"]),
    ("prepare.image_size", 2, ["[4, 1024]"]),
    ("prepare.image_size", 5000, ["[4, 1024]"]),
    ("prepare.image_size", "32", ["a int"]),
    ("prepare.channels", 2, ["one of 1, 3"]),
    ("prepare.channels", True, ["one of 1, 3"]),
    ("prepare.channels", "3", ["one of 1, 3"]),
    ("prepare.val_fraction", 0, ["(0.0, 0.9]"]),
    ("prepare.val_fraction", 0.95, ["(0.0, 0.9]"]),
    ("prepare.val_fraction", 0.85, ["val_fraction + test_fraction < 1"]),  # each in range, 0.85 + 0.2 >= 1
    ("prepare.test_fraction", -0.1, ["(0.0, 0.9]"]),
    ("prepare.min_images_per_class", 1, ["[2, "]),
    ("prepare.max_image_pixels", 0, ["> 0"]),
    ("train.model", "nope", ["tinyvgg", "resnet18", "efficientnet_b0"]),
    ("train.optimizer", "rmsprop", ["adam", "adamw", "sgd"]),
    ("train.finetune", "some", ["full", "head", "last_n"]),
    ("train.scheduler", "step", ["cosine", "onecycle"]),
    ("train.precision", "int8", ["bf16", "fp16"]),
    ("train.monitor", "loss", ["val_loss", "val_acc"]),
    ("train.augment", ["flip", "rotate"], ["flip, crop, resized_crop, trivialaugment"]),
    ("train.augment", "flip", ["a list"]),
    ("train.batch_norm", "yes", ["a bool"]),
    ("train.epochs", 0, ["[1, "]),
    ("train.batch_size", 0, ["[1, "]),
    ("train.lr", 0, ["> 0"]),
    ("train.dropout", 1.0, ["[0.0, 0.95]"]),
    ("train.hidden_units", None, ["a int"]),
    ("evaluate.promote_metric", "auc", ["accuracy", "f1_macro"]),
    ("evaluate.batch_size", 0, ["[1, "]),
    ("mlflow.experiment", "", ["non-empty"]),
    ("mlflow.registered_model", "my model", ["letters, digits"]),
]


@pytest.mark.parametrize("key,value,expected", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_value_is_rejected_naming_the_key(tmp_path, key, value, expected):
    path = params_file(tmp_path, with_value(key, value))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    message = str(err.value)
    assert message.startswith(f"{key}: invalid value"), message
    for text in expected:
        assert text in message, message


@pytest.mark.parametrize("key,value", [
    ("base.device", "cuda:1"), ("data.sha256", "AB" * 32), ("data.timeout_s", 2), ("data.source", "http://x/y.zip"),
    ("prepare.channels", 3), ("train.augment", None), ("train.weights", "DEFAULT"), ("train.model", "resnet18"),
])
def test_good_values_are_accepted(tmp_path, key, value):
    """The validator is not simply rejecting everything: valid neighbours of the bad values load."""
    params = load_params(params_file(tmp_path, with_value(key, value)))
    got = params.flat()[key]
    assert got == ([] if value is None and key == "train.augment" else value)


@pytest.mark.parametrize("key", ["prepare.imagesize", "data.url", "train.epoch", "base.seeds"])
def test_unknown_key_is_rejected_naming_it_and_the_allowed_ones(tmp_path, key):
    section, name = key.split(".")
    raw = repo_params()
    raw[section][name] = 1
    with pytest.raises(ConfigError) as err:
        load_params(params_file(tmp_path, raw))
    message = str(err.value)
    assert message.startswith(f"{key}: unknown key"), message
    for allowed in repo_params()[section]:
        assert allowed in message


def test_unknown_section_is_rejected(tmp_path):
    raw = repo_params()
    raw["serve"] = {"port": 8080}
    with pytest.raises(ConfigError, match=r"^serve: unknown key; allowed in params.yaml: base, data, prepare"):
        load_params(params_file(tmp_path, raw))


@pytest.mark.parametrize("key", ["data.timeout_s", "prepare.max_image_pixels", "base.seed", "mlflow.experiment"])
def test_missing_key_is_an_error_not_a_default(tmp_path, key):
    section, name = key.split(".")
    raw = repo_params()
    del raw[section][name]
    with pytest.raises(ConfigError, match=rf"^{key}: missing from params.yaml"):
        load_params(params_file(tmp_path, raw))


def test_missing_section_is_an_error(tmp_path):
    raw = repo_params()
    del raw["evaluate"]
    with pytest.raises(ConfigError, match=r"^evaluate: missing"):
        load_params(params_file(tmp_path, raw))


@pytest.mark.parametrize("text,expected", [
    ("5\n", "expected a mapping of sections, got int"),
    ("- a\n- b\n", "expected a mapping of sections, got list"),
    ("base: {seed: 1\n", "not valid YAML"),
])
def test_malformed_file(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_params(params_file(tmp_path, text))


def test_section_that_is_not_a_mapping_names_the_section(tmp_path):
    raw = repo_params()
    raw["prepare"] = 5
    with pytest.raises(ConfigError, match=r"^prepare: expected a mapping, got 5"):
        load_params(params_file(tmp_path, raw))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text,expected", [("3e-4", 3e-4), ("1E-9", 1e-9), ("5e-1", 0.5), ("+1e-2", 0.01)])
def test_float_in_exponent_notation_is_a_float(tmp_path, text, expected):
    """PyYAML (YAML 1.1) reads `1e-9` without a dot as a string; a float key takes it as the number."""
    assert yaml.safe_load(f"lr: {text}")["lr"] == text  # the YAML quirk itself
    text_file = committed("params.yaml").replace("weight_decay: ", f"weight_decay: {text} #")
    path = params_file(tmp_path, text_file)
    assert load_params(path).train.weight_decay == expected
    assert load_params(params_file(tmp_path, repo_params()), {"train.lr": text}).train.lr == expected
    with pytest.raises(ConfigError, match=r"^train.lr: invalid value '1e-9x'; allowed: a float"):
        load_params(path, {"train.lr": "1e-9x"})
    with pytest.raises(ConfigError, match=r"^train.epochs: invalid value '1e3'; allowed: a int"):
        load_params(path, {"train.epochs": "1e3"})  # int keys stay strict


def test_overrides_are_yaml_values_and_validated(tmp_path):
    path = params_file(tmp_path, repo_params())
    params = load_params(path, {"prepare.image_size": "16", "train.augment": "[flip, crop]", "data.sha256": "null"})
    assert params.prepare.image_size == 16
    assert params.train.augment == ("flip", "crop")
    assert params.data.sha256 is None
    with pytest.raises(ConfigError, match=r"^prepare.channels: invalid value 2"):
        load_params(path, {"prepare.channels": "2"})
    with pytest.raises(ConfigError, match=r"^prepare.imagesize: unknown key"):
        load_params(path, {"prepare.imagesize": "16"})
    with pytest.raises(ConfigError, match=r"override nosuch.key: unknown key"):
        load_params(path, {"nosuch.key": "1"})


def test_parse_overrides():
    assert parse_overrides(["--prepare.image_size", "16", "--train.lr=0.1"]) == {
        "prepare.image_size": "16", "train.lr": "0.1"}
    with pytest.raises(PipelineError, match="unexpected argument"):
        parse_overrides(["prepare.image_size", "16"])
    with pytest.raises(PipelineError, match="missing a value"):
        parse_overrides(["--prepare.image_size"])


@pytest.mark.parametrize("stage", ["fetch_data", "prepare"])
def test_a_stage_exits_non_zero_naming_the_unknown_key(data_project, stage):
    data_project.set(prepare__imagesize=32)
    proc = data_project.run(stage, check=False)
    assert proc.returncode == 1
    assert "prepare.imagesize: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not data_project.path("data/raw").exists() and not data_project.path("data/prepared").exists()


def test_a_stage_rejects_a_bad_command_line_override(data_project):
    proc = data_project.run("fetch_data", "--data.timeout_s", "x", check=False)
    assert proc.returncode == 1
    assert "data.timeout_s: invalid value 'x'" in proc.stderr
    assert not data_project.path("data/raw").exists()


def test_a_stage_lists_the_valid_models(data_project):
    data_project.set(train__model="nope")
    proc = data_project.run("fetch_data", check=False)
    assert proc.returncode == 1
    assert "train.model: invalid value 'nope'; allowed: one of" in proc.stderr
    assert "tinyvgg" in proc.stderr and "resnet18" in proc.stderr
