"""The architecture table (pipeline/models.py): every architecture builds and runs for any class count,
1 or 3 channels and small images; finetune modes really freeze; pretrained weights load offline."""

from __future__ import annotations

import hashlib
import os
import re

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from helpers.project import committed_params
from pipeline.dataset import DatasetMeta
from pipeline.engine import Learner, make_optimizer, train_one_epoch
from pipeline.errors import ConfigError, PipelineError
from pipeline.models import (
    ARCHITECTURES,
    MinSize,
    ReLU,
    apply_finetune,
    build_model,
    set_train_mode,
    spec_of,
    unwrap,
)
from pipeline.runtime import resolve_runtime
from pipeline.timm_models import default_weights_file
from pipeline.train import build
from pipeline.transforms import Norm, eval_transforms
from pipeline.weights import resolve_weights

ALL_MODELS = ["tinyvgg", "vgg11_bn", "vgg16", "vgg16_bn", "resnet18", "efficientnet_b0",
              "mobilenet_v3_small", "mobilenet_v3_large"]
# A few small timm models of different families (train.model: timm/<any timm model>)
TIMM_MODELS = ["timm/tf_efficientnet_lite0", "timm/mobilenetv3_small_050", "timm/resnet10t"]
BIG = {"vgg11_bn", "vgg16", "vgg16_bn"}  # 130M+ parameters: batch of 2
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def test_the_architecture_table_is_the_documented_list():
    # params.yaml documents these names; a model added or dropped must be added to these tests too.
    assert sorted(ARCHITECTURES) == sorted(ALL_MODELS)


def small(name: str, num_classes: int, channels: int, size: int, **kw) -> nn.Module:
    return build_model(name, num_classes, channels, size, hidden_units=8, batch_norm=True, dropout=0.0, **kw)


# -- forward pass ---------------------------------------------------------------------------------

# 16 px (upsampled by MinSize for the torchvision models) and 32 px, 1 and 3 channels
CASES = [(name, size, channels) for name in ALL_MODELS + TIMM_MODELS
         for size, channels in ([(16, 1), (16, 3), (32, 1), (32, 3)] if name == "tinyvgg" else [(16, 1), (32, 3)])]


@pytest.mark.parametrize("name,size,channels", CASES)
def test_forward_pass_gives_one_row_of_class_scores_per_image(name, size, channels):
    torch.manual_seed(0)
    net = small(name, 7, channels, size).eval()
    n = 2 if name in BIG else 3
    with torch.no_grad():
        out = net(torch.rand(n, channels, size, size))
    assert out.shape == (n, 7)
    assert torch.isfinite(out).all()
    # the architecture's stride needs >= 32 px: smaller inputs are upsampled by a MinSize wrapper
    assert isinstance(net, MinSize) == (name != "tinyvgg" and size < 32)
    # the first conv really takes `channels` (not a 3-channel conv fed a broadcast image)
    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == channels


def with_special_values(dtype: torch.dtype) -> torch.Tensor:
    """(1, 2, 5, 5) channels_last: +-0, +-inf, +-NaN, +-smallest subnormal, +-largest finite (as bf16
    bit patterns), then ordinary values."""
    bits = torch.tensor([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x0001, 0x8001, 0x7F7F, 0xFF7F])
    special = torch.where(bits < 0x8000, bits, bits - 0x10000).to(torch.int16).view(torch.bfloat16)
    rest = torch.randn(40, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x = torch.cat([special, rest]).to(dtype).view(1, 2, 5, 5)
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_relu_equals_torch_relu_values_and_gradients(dtype):
    # models.ReLU works on the bits of bf16 CPU tensors: its values must be torch.relu's all the same.
    x = with_special_values(dtype)
    assert torch.isnan(x).sum() == 2 and torch.isinf(x).sum() == 2
    ref_in, ours_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, ours = torch.relu(ref_in * 1), ReLU()(ours_in * 1)  # * 1: in place needs a non-leaf
    nan = torch.isnan(ref)
    assert torch.equal(ours[~nan], ref[~nan]) and torch.isnan(ours[nan]).all()
    assert ours.dtype == dtype and ours.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref.backward(grad)
    ours.backward(grad)
    assert torch.equal(ours_in.grad[~nan], ref_in.grad[~nan])


def test_tinyvgg_trains_the_same_with_the_bf16_relu():
    # the whole model under bf16 autocast: outputs and weight gradients equal nn.ReLU's exactly
    torch.manual_seed(0)
    ours = build_model("tinyvgg", 3, 1, 8, hidden_units=4, batch_norm=True, dropout=0.0)
    ref = build_model("tinyvgg", 3, 1, 8, hidden_units=4, batch_norm=True, dropout=0.0)
    ref.load_state_dict(ours.state_dict())
    for block in ref.features:
        for i, layer in enumerate(block):
            if isinstance(layer, ReLU):
                block[i] = nn.ReLU(inplace=True)
    assert sum(isinstance(m, ReLU) for m in ours.modules()) == 4
    assert not any(isinstance(m, ReLU) for m in ref.modules())
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    for net in (ours, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(x).float().square().sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ours(x), ref(x))
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_unknown_model_is_an_error_listing_the_choices():
    with pytest.raises(PipelineError) as err:
        small("resnet50", 3, 3, 32)
    message = str(err.value)
    assert "resnet50" in message
    for name in ALL_MODELS:
        assert name in message


# -- finetune: what is frozen stays frozen --------------------------------------------------------

# Trainable parameter names (of the unwrapped network) per finetune mode, written out by hand.
TRAINABLE = {
    ("tinyvgg", "head"): r"classifier\.2\.",
    ("tinyvgg", "last_n"): r"(features\.1\.|classifier\.2\.)",  # the 2nd conv block + the head
    ("mobilenet_v3_small", "head"): r"classifier\.3\.",
    # last block: the classifier's hidden Linear (as VGG's hidden FC layers are its last block)
    ("mobilenet_v3_small", "last_n"): r"classifier\.(0|3)\.",
    ("resnet18", "head"): r"fc\.",
    ("resnet18", "last_n"): r"(layer4\.|fc\.)",
    # timm's coarse groups: the last stage takes the neck (conv_head, bn2) with it
    ("timm/tf_efficientnet_lite0", "head"): r"classifier\.",
    ("timm/tf_efficientnet_lite0", "last_n"): r"(blocks\.6\.|conv_head\.|bn2\.|classifier\.)",
    ("timm/resnet10t", "head"): r"fc\.",
    ("timm/resnet10t", "last_n"): r"(layer4\.|fc\.)",
}


def bn_stats(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items() if "running_" in k}


def one_epoch(name: str, finetune: str, seed: int = 0):
    """Build `name` for 3 classes at 16 px RGB, apply `finetune` (unfreeze_last=1), and run one
    epoch of AdamW (weight decay on) on random data. Returns (net, frozen, before, optimizer)."""
    torch.manual_seed(seed)
    net = small(name, 3, 3, 16)
    frozen = apply_finetune(net, name, finetune, 1)
    cfg = committed_params({"train.model": name, "train.finetune": finetune, "train.optimizer": "adamw",
                            "train.lr": "0.01", "train.weight_decay": "0.1", "train.scheduler": "none"}).train
    rt = resolve_runtime("cpu", "fp32")
    opt, sched = make_optimizer(cfg, net, 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    set_train_mode(net, frozen)
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (16,), generator=g)
    learner = Learner(net=net, optimizer=opt, scheduler=sched, scaler=rt.grad_scaler(),
                      loss_fn=nn.CrossEntropyLoss(), generator=g, rt=rt, frozen=frozen)
    train_one_epoch(learner, images, labels, eval_transforms(Norm((0.5,) * 3, (0.25,) * 3)), 8)
    return net, frozen, before, opt


@pytest.mark.parametrize("finetune", ["head", "last_n"])
@pytest.mark.parametrize("name", ["tinyvgg", "mobilenet_v3_small", "resnet18", "timm/tf_efficientnet_lite0",
                                  "timm/resnet10t"])
def test_finetune_trains_only_what_it_says(name, finetune):
    torch.manual_seed(0)
    net = small(name, 3, 3, 16)
    apply_finetune(net, name, finetune, 1)
    trainable = {n for n, p in unwrap(net).named_parameters() if p.requires_grad}
    expected = {n for n, _ in unwrap(net).named_parameters() if re.match(TRAINABLE[name, finetune], n)}
    assert expected and trainable == expected


@pytest.mark.parametrize("name", ALL_MODELS + TIMM_MODELS)
def test_every_parameter_is_in_a_block_or_the_head(name):
    # Otherwise `last_n` trains it whatever unfreeze_last says while `head` freezes it.
    net = unwrap(small(name, 3, 1, 16))
    spec = spec_of(name, net)
    head = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]  # the final Linear, 3 outputs
    assert head.out_features == 3
    covered = {id(p) for block in spec.blocks(net) for p in block.parameters()}
    covered |= {id(p) for p in head.parameters()}
    assert [n for n, p in net.named_parameters() if id(p) not in covered] == []
    # and last_n with unfreeze_last=1 trains exactly the last block and the head
    apply_finetune(net, name, "last_n", 1)
    last = {id(p) for p in spec.blocks(net)[-1].parameters()} | {id(p) for p in head.parameters()}
    assert {id(p) for p in net.parameters() if p.requires_grad} == last


@pytest.mark.parametrize("finetune", ["head", "last_n"])
@pytest.mark.parametrize("name", ["tinyvgg", "mobilenet_v3_small", "timm/mobilenetv3_small_050"])
def test_frozen_weights_and_bn_statistics_do_not_move_in_training(name, finetune):
    net, frozen, before, opt = one_epoch(name, finetune)
    core = unwrap(net)
    prefix = "net." if isinstance(net, MinSize) else ""
    trainable = {prefix + n for n, p in core.named_parameters() if p.requires_grad}
    assert trainable

    # frozen BN layers stayed in eval mode during the epoch; the rest of the net trained
    frozen_bn = [m for block in frozen for m in block.modules() if isinstance(m, _BatchNorm)]
    assert frozen_bn and not any(m.training for m in frozen_bn)
    assert net.training

    after = net.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    # every trainable parameter moved; nothing else did (frozen weights bit-identical, frozen BN
    # running statistics and batch counters unchanged)
    in_frozen = {id(m) for block in frozen for m in block.modules()}
    live_bn = [n for n, m in core.named_modules() if isinstance(m, _BatchNorm) and id(m) not in in_frozen]
    live_buffers = {f"{prefix}{n}.{b}" for n in live_bn for b in ("running_mean", "running_var", "num_batches_tracked")}
    assert moved == trainable | live_buffers

    # the optimizer holds only trainable parameters, and state only for them
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in net.parameters() if p.requires_grad}
    assert {id(p) for p in opt.state} == in_opt


@pytest.mark.parametrize("name", ["tinyvgg", "mobilenet_v3_small"])
def test_full_finetune_moves_every_bn_statistic(name):
    # The control for the test above: the same epoch without freezing moves all BN statistics, so
    # "unchanged" there is the freezing's doing, not data too weak to move them.
    net, frozen, before, _ = one_epoch(name, "full")
    assert frozen == []
    after = net.state_dict()
    stats = [k for k in before if "running_mean" in k]
    assert stats and all(not torch.equal(before[k], after[k]) for k in stats)


# -- pretrained weights, offline ------------------------------------------------------------------


@pytest.fixture
def torch_home(tmp_path, monkeypatch, offline) -> str:
    """An empty TORCH_HOME (the hub cache is $TORCH_HOME/hub/checkpoints) and no internet."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return str(home)


def cache_file(torch_home: str, name: str, weights: str = "DEFAULT") -> str:
    enum = torchvision.models.get_model_weights(name)
    w = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    return os.path.join(torch_home, "hub", "checkpoints", os.path.basename(w.url))


def random_donor(name: str, seed: int = 123) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None).state_dict()


@pytest.mark.parametrize("weights", ["DEFAULT", "IMAGENET1K_V1"])
def test_torchvision_weights_come_from_the_hub_cache_as_they_are(torch_home, weights):
    path = cache_file(torch_home, "mobilenet_v3_small", weights)
    donor = random_donor("mobilenet_v3_small")
    os.makedirs(os.path.dirname(path))
    torch.save(donor, path)
    # The file name carries the sha256 prefix torchvision publishes; ours is random weights and does
    # not match it. check_hash=True checks only what it downloads: a cached file is used as it is.
    prefix = re.search(r"-([a-f0-9]+)\.pth$", path).group(1)
    with open(path, "rb") as f:
        assert not hashlib.sha256(f.read()).hexdigest().startswith(prefix)

    pretrained = resolve_weights("mobilenet_v3_small", weights)
    state, norm = pretrained.state, pretrained.norm
    assert state.keys() == donor.keys()
    assert all(torch.equal(state[k], donor[k]) for k in donor)
    assert norm.mean == pytest.approx(IMAGENET["mean"]) and norm.std == pytest.approx(IMAGENET["std"])

    # built for 1 channel and 4 classes: features loaded, first conv = sum over RGB, new classifier
    net = unwrap(small("mobilenet_v3_small", 4, 1, 32, pretrained=state))
    own = net.state_dict()
    assert torch.equal(own["features.1.block.0.0.weight"], donor["features.1.block.0.0.weight"])
    assert torch.equal(own["classifier.0.weight"], donor["classifier.0.weight"])
    assert torch.allclose(own["features.0.0.weight"], donor["features.0.0.weight"].sum(1, keepdim=True))
    assert own["classifier.3.weight"].shape == (4, 1024)


def test_default_weights_missing_offline_name_the_cache_file(torch_home):
    path = cache_file(torch_home, "mobilenet_v3_small")
    with pytest.raises(PipelineError) as err:
        resolve_weights("mobilenet_v3_small", "DEFAULT")
    assert path in str(err.value)
    assert not os.path.exists(path)  # no partial download left as if it were the weights


def test_pretrained_normalisation_fits_greyscale_data(torch_home):
    # DEFAULT weights on 1-channel data (prepare.channels: 1, the default): ImageNet's per-RGB mean
    # and std must become one channel's, or (x - mean) / std broadcasts images to 3 channels and
    # the first batch fails in the 1-channel first conv.
    path = cache_file(torch_home, "mobilenet_v3_small")
    os.makedirs(os.path.dirname(path))
    torch.save(random_donor("mobilenet_v3_small"), path)
    cfg = committed_params({"train.model": "mobilenet_v3_small", "train.weights": "DEFAULT",
                            "train.finetune": "head"}).train
    meta = DatasetMeta(image_size=16, channels=1, classes=("a", "b"), mean=(0.3,), std=(0.2,), source=None,
                       raw_sha256=None, splits={})
    network = build(cfg, meta)
    config = network.config
    assert config.mean == pytest.approx([sum(IMAGENET["mean"]) / 3])
    assert config.std == pytest.approx([sum(IMAGENET["std"]) / 3])
    x = eval_transforms(Norm(config.mean, config.std))(torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8))
    assert x.shape == (2, 1, 16, 16)
    with torch.no_grad():
        assert network.net.eval()(x).shape == (2, 2)


def test_weights_names_are_checked(torch_home):
    with pytest.raises(PipelineError, match="IMAGENET1K_V1"):  # lists the valid names
        resolve_weights("mobilenet_v3_small", "IMAGENET9K_V9")
    with pytest.raises(PipelineError, match="tinyvgg has no torchvision weights"):
        resolve_weights("tinyvgg", "DEFAULT")


def test_weights_from_a_local_state_dict(tmp_path):
    torch.manual_seed(1)
    donor = small("tinyvgg", 5, 3, 16)
    plain = tmp_path / "weights.pt"
    torch.save(donor.state_dict(), plain)
    pretrained = resolve_weights("tinyvgg", str(plain))
    state, norm = pretrained.state, pretrained.norm
    assert norm is None  # prepare's statistics are used
    torch.manual_seed(2)
    net = small("tinyvgg", 3, 3, 16, pretrained=state)  # 3 classes: the 5-class classifier is dropped
    own, theirs = net.state_dict(), donor.state_dict()
    for k in theirs:
        if k.startswith("features."):
            assert torch.equal(own[k], theirs[k]), k
    assert own["classifier.2.weight"].shape == (3, 8 * 4 * 4)

    # a models/model.pt of this pipeline: its state dict and its normalisation
    model_pt = tmp_path / "model.pt"
    torch.save({"state_dict": donor.state_dict(), "config": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}},
               model_pt)
    pretrained = resolve_weights("tinyvgg", str(model_pt))
    state, norm = pretrained.state, pretrained.norm
    assert norm == Norm((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert all(torch.equal(state[k], theirs[k]) for k in theirs)

    with pytest.raises(PipelineError, match="no such file"):
        resolve_weights("tinyvgg", str(tmp_path / "missing.pt"))
    with pytest.raises(PipelineError, match="does not fit"):  # tinyvgg weights for a resnet18
        small("resnet18", 3, 3, 32, pretrained=state)


# -- timm models ----------------------------------------------------------------------------------


def test_a_timm_typo_is_an_error_naming_the_key_and_close_matches():
    with pytest.raises(ConfigError, match=r"^train\.model: .*did you mean timm/tf_efficientnet_lite0\b"):
        small("timm/tf_efficientnet_lite00", 3, 3, 32)


def test_params_take_timm_names_and_refuse_an_empty_one():
    assert committed_params({"train.model": "timm/resnet10t"}).train.model == "timm/resnet10t"
    with pytest.raises(ConfigError, match=r"^train\.model: .*timm/<a timm model>"):
        committed_params({"train.model": "timm/"})


def test_timm_default_weights_come_from_the_hub_cache_offline(torch_home, monkeypatch):
    # Offline, DEFAULT names the file it looks for (where tools.convert_lite0 writes); with a timm
    # state dict there: loaded, a 1-channel stem through timm's adapt_input_conv (the sum over RGB),
    # a new classifier, and the pretrained config's normalisation.
    import huggingface_hub.constants

    # HF_HUB_OFFLINE=1 as read at import: the hub's retries through the dead proxy take ~50 s
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    name = "timm/tf_efficientnet_lite0"
    path = default_weights_file(name)
    assert str(path).startswith(torch_home)
    with pytest.raises(PipelineError) as err:
        resolve_weights(name, "DEFAULT")
    assert str(path) in str(err.value) and "train.weights" in str(err.value)
    with pytest.raises(PipelineError, match="DEFAULT"):
        resolve_weights(name, "IMAGENET1K_V1")

    torch.manual_seed(3)
    donor = timm.create_model("tf_efficientnet_lite0").state_dict()
    path.parent.mkdir(parents=True)
    torch.save(donor, path)
    pretrained = resolve_weights(name, "DEFAULT")
    assert pretrained.norm == Norm((0.5,) * 3, (0.5,) * 3)
    assert pretrained.source == "timm:tf_efficientnet_lite0.in1k"
    net = unwrap(small(name, 4, 1, 32, pretrained=pretrained.state))
    own = net.state_dict()
    assert all(torch.equal(own[k], donor[k]) for k in donor if not k.startswith(("conv_stem.", "classifier.")))
    assert torch.allclose(own["conv_stem.weight"], donor["conv_stem.weight"].sum(1, keepdim=True))
    assert own["classifier.weight"].shape == (4, 1280)
    # the new classifier is nn.Linear's (bound 1/sqrt(fan_in)), not timm's 1/sqrt(num_classes)
    assert own["classifier.weight"].abs().max() <= 1 / 1280 ** 0.5
