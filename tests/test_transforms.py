"""Batch augmentations (pipeline/transforms.py): shape, dtype and range kept, reproducible from a
seeded generator, and they really change images."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import AUGMENTATIONS
from pipeline.transforms import AUGMENTS, Norm, crop, eval_transforms, flip, resized_crop, to_float, train_transforms


def batch(n: int = 16, channels: int = 3, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Float images in 0..1 with distinct, asymmetric content (random pixels)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g).float() / 255


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_augmentations_are_the_configured_ones():
    assert sorted(AUGMENTS) == ["crop", "flip", "resized_crop", "trivialaugment"]
    assert set(AUGMENTS) == set(AUGMENTATIONS)  # what params.yaml accepts


@pytest.mark.parametrize("name", sorted(AUGMENTS))
@pytest.mark.parametrize("channels", [1, 3])
def test_augmentation_keeps_shape_dtype_and_range(name, channels):
    x = batch(channels=channels)
    out = AUGMENTS[name](x.clone(), gen(0))
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", sorted(AUGMENTS))
def test_augmentation_is_reproducible_from_a_seeded_generator(name):
    x = batch()
    op = AUGMENTS[name]
    a, b = op(x.clone(), gen(7)), op(x.clone(), gen(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, op(x.clone(), gen(8)))  # the generator, not something else, decides


@pytest.mark.parametrize("name", sorted(AUGMENTS))
def test_augmentation_changes_images_but_not_all_the_same_way(name):
    x = batch(n=32)
    out = AUGMENTS[name](x.clone(), gen(0))
    # (trivialaugment's identity op still resamples: equal up to float rounding)
    changed = [not torch.allclose(out[i], x[i], atol=1e-5) for i in range(len(x))]
    assert sum(changed) >= len(x) // 4  # a real share of the batch is changed
    if name not in ("crop", "resized_crop"):  # these move almost every image; flip and trivialaugment leave some
        assert not all(changed)


def test_flip_mirrors_a_random_part_of_the_batch_and_leaves_the_rest():
    x = batch(n=64)
    out = flip(x.clone(), gen(0))
    mirrored = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert 16 <= sum(mirrored) <= 48  # about half


def test_crop_is_a_shift_of_the_image_filled_with_zeros():
    x = batch(n=32, size=16) * 0.9 + 0.1  # no zero pixels, so padding is recognisable
    out = crop(x.clone(), gen(0))
    pad = 2  # 4/32 of 16 px
    for i in range(len(x)):
        padded = torch.nn.functional.pad(x[i], (pad, pad, pad, pad))
        windows = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if torch.equal(padded[:, dy:dy + 16, dx:dx + 16], out[i])]
        assert windows, f"image {i} is not a shifted window of its padded original"


def test_resized_crop_is_a_zoomed_window_of_the_image():
    """A horizontal ramp (pixel value = column) stays a ramp, now over a narrower range of columns:
    a zoom into a window lying inside the image, of at least RESIZED_CROP_SCALE's area."""
    size = 32
    ramp = torch.linspace(0, 1, size).expand(size, size)
    x = ramp.expand(64, 3, size, size).clone()
    out = resized_crop(x.clone(), gen(0))
    widths = []
    for img in out:
        row = img[0, size // 2]
        assert torch.all(row[1:] >= row[:-1] - 1e-6)  # still increasing left to right: no flips, no rotation
        assert torch.allclose(img[0], img[0, :1].expand(size, size), atol=1e-6)  # every row the same
        assert row[0] >= -1e-6 and row[-1] <= 1 + 1e-6  # inside the image: no border filled in
        widths.append(float(row[-1] - row[0]))
    assert min(widths) < 0.9  # zoomed in
    assert max(widths) > min(widths) + 0.1  # by different amounts
    assert min(widths) > math.sqrt(0.35 * 3 / 4) - 0.1  # never narrower than the smallest window


def test_train_transforms_augment_then_normalise_and_continue_the_generator():
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    x = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8, generator=gen(1))
    norm = Norm(tuple(mean), tuple(std))
    plain = eval_transforms(norm)(x)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(plain, expected, atol=1e-6)
    assert torch.equal(train_transforms(norm, (), gen(0))(x), plain)  # no augment: eval transforms

    g1, g2 = gen(3), gen(3)
    t1 = train_transforms(norm, ("flip", "crop", "trivialaugment"), g1)
    t2 = train_transforms(norm, ("flip", "crop", "trivialaugment"), g2)
    first, second = t1(x), t1(x)
    assert not torch.equal(first, second)  # each batch draws new numbers from the generator
    assert torch.equal(t2(x), first) and torch.equal(t2(x), second)  # ... the same ones for the same seed
    assert first.shape == x.shape and first.dtype == torch.float32
    # a resumed run restores the generator's state and continues the same sequence
    state = g1.get_state()
    third = t1(x)
    g2.set_state(state)
    assert torch.equal(t2(x), third)


def test_to_float_scales_uint8_to_unit_range():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.equal(to_float(x), torch.tensor([0.0, 0.2, 1.0]))
