"""The one transforms module: train, evaluate and predict all turn uint8 image batches into model input
here, so they cannot disagree. Everything works on whole batches of tensors on the model's device
(the GPU when there is one) instead of per image in DataLoader workers.

Pixels reach the model as (x / 255 - mean) / std. Resizing and colour conversion already happened
once in prepare (pipeline/images.py), which predict reuses for new files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Transform = Callable[[torch.Tensor], torch.Tensor]

CROP_PAD = 4 / 32  # random-crop padding as a fraction of the image side (4 px at 32 px, as CIFAR recipes)
RESIZED_CROP_SCALE = (0.35, 1.0)  # share of the image's area a resized crop keeps
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)  # its aspect ratio (torchvision's RandomResizedCrop default)


@dataclass(frozen=True)
class Norm:
    """Per-channel input normalisation of 0..1 pixels: (x - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1 (model input before normalisation)."""
    return x.float().div_(255.0)


def eval_transforms(norm: Norm) -> Transform:
    return lambda x: norm(to_float(x))


def train_transforms(norm: Norm, augment: tuple[str, ...], generator: torch.Generator) -> Transform:
    """Random augmentations from `augment` (AUGMENTS' names, applied in that order), then normalisation.
    Random numbers come from `generator` (on the CPU), so a seeded run is reproducible and a resumed
    run continues the same sequence."""
    ops = [AUGMENTS[name] for name in augment]

    def apply(x: torch.Tensor) -> torch.Tensor:
        x = to_float(x)
        for op in ops:
            x = op(x, generator)
        return norm(x)

    return apply


def _rand(n: int, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g).to(device)


def flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Horizontal flip of a random half of the batch."""
    mask = (_rand(len(x), g, x.device) < 0.5).view(-1, 1, 1, 1)
    return torch.where(mask, x.flip(-1), x)


def crop(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop of each image from a zero-padded copy (a random shift of up to CROP_PAD)."""
    n, _, h, w = x.shape
    pad = max(1, round(CROP_PAD * h))
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(-1, x.shape[1], -1, w + 2 * pad)
    padded = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(-1, x.shape[1], h, -1)
    return padded.gather(3, cols)


def resized_crop(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop on a batch: each image is cut to a random window of
    RESIZED_CROP_SCALE of its area and RESIZED_CROP_RATIO aspect, then scaled back to full size
    (bilinear; one affine grid_sample for the batch). The window always lies inside the image."""
    n, device = len(x), x.device
    lo, hi = RESIZED_CROP_SCALE
    area = lo + (hi - lo) * torch.rand(n, generator=g)
    log_lo, log_hi = math.log(RESIZED_CROP_RATIO[0]), math.log(RESIZED_CROP_RATIO[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, generator=g))
    sx = torch.sqrt(area * ratio).clamp(max=1.0)  # the window's width and height as fractions
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (1 - sx) * (torch.rand(n, generator=g) * 2 - 1)  # its centre, in -1..1 grid units
    ty = (1 - sy) * (torch.rand(n, generator=g) * 2 - 1)
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1).to(device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).clamp_(0, 1)


def trivialaugment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """TrivialAugment-style: each image gets one op, drawn uniformly, at a uniform random strength.

    Ops: identity, brightness, contrast, rotate, shear x/y, translate x/y. The geometric ones share
    one affine grid_sample for the whole batch; the colour ones are per-image factors.
    """
    n, device = len(x), x.device
    op = torch.randint(0, 8, (n,), generator=g).to(device)
    m = (_rand(n, g, device) * 2 - 1)  # strength in [-1, 1]
    brightness = torch.where(op == 1, 1 + 0.9 * m, torch.ones_like(m)).view(n, 1, 1, 1)
    contrast = torch.where(op == 2, 1 + 0.9 * m, torch.ones_like(m)).view(n, 1, 1, 1)
    angle = torch.where(op == 3, m * math.radians(30), torch.zeros_like(m))
    shear_x = torch.where(op == 4, 0.3 * m, torch.zeros_like(m))
    shear_y = torch.where(op == 5, 0.3 * m, torch.zeros_like(m))
    tx = torch.where(op == 6, 0.3 * m, torch.zeros_like(m))  # fraction of the half-width
    ty = torch.where(op == 7, 0.3 * m, torch.zeros_like(m))
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([cos, -sin + shear_x, tx], 1),  # one op per image: they never combine
        torch.stack([sin + shear_y, cos, ty], 1),
    ], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    return (x * brightness).clamp_(0, 1)


AUGMENTS = {"flip": flip, "crop": crop, "resized_crop": resized_crop, "trivialaugment": trivialaugment}
