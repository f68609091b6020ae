"""Generated images: learnable class patterns, noise, and the odd files prepare must quarantine or convert."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(root: Path, classes=("circle", "square", "stripes"), per_class: int = 20, size: int = 24,
                split: str | None = None, seed: int = 0, fmt: str = "png") -> Path:
    """Write `per_class` learnable RGB images per class (a distinct pattern per class plus noise)
    under root/[split/]<class>/. Returns root."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for ci, cls in enumerate(classes):
        folder = root / split / cls if split else root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3))
            kind = ci % 3
            if kind == 0:
                base[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2] = 1
            elif kind == 1:
                base[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
            else:
                base[:, (xx[0] // 3) % 2 == 0] = 1
            base[..., ci % 3] *= 0.6 + 0.1 * (ci // 3)
            img = np.clip(base * 200 + rng.normal(0, 20, base.shape) + 20, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{cls}_{i:03d}.{fmt}")
    return root


def image_tree(root: Path, split: bool = True) -> Path:
    """A small source: train/<class>/* (8 per class) + test/<class>/* (3), or <class>/* (8); 16 px."""
    if split:
        make_images(root, split="train", per_class=8, size=16)
        make_images(root, split="test", per_class=3, size=16, seed=1)
    else:
        make_images(root, per_class=8, size=16)
    return root


def noise_images(root: Path, classes=("a", "b", "c"), per_class: int = 16, size: int = 12, seed: int = 0) -> Path:
    """Random-pixel images in class folders: nothing to learn, so a model that memorises the train
    split only gets worse on val (val_loss stops improving within a few epochs)."""
    rng = np.random.default_rng(seed)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / cls / f"{i:03d}.png")
    return root


# -- odd files: their writers, and the checks of their decoded pixels -------------------------------

S = 16  # every special image is S x S and prepared at S, so no resampling blurs the expected pixels


# -- files that are not plain RGB images ------------------------------------------------------------


def _noise(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def truncated_jpeg(path: Path) -> None:
    Image.fromarray(_noise((64, 64, 3))).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])


def corrupt_png(path: Path) -> None:
    Image.fromarray(_noise((S, S, 3))).save(path)
    data = bytearray(path.read_bytes())
    at = data.find(b"IDAT")
    data[at + 20: at + 60] = bytes(40)  # zeroes in the middle of the compressed pixel data
    path.write_bytes(bytes(data))


def rgba_png(path: Path) -> None:
    """Left half opaque red; right half transparent black on top, half-transparent black below."""
    a = np.zeros((S, S, 4), dtype=np.uint8)
    a[:, : S // 2] = (255, 0, 0, 255)
    a[S // 2:, S // 2:] = (0, 0, 0, 128)
    Image.fromarray(a, mode="RGBA").save(path)


def palette_png(path: Path, transparent: bool) -> None:
    """Palette colour 0 (10, 20, 30) on the left, colour 1 (200, 100, 50) on the right; with
    `transparent`, colour 1 is the transparent one (a tRNS chunk)."""
    img = Image.fromarray(np.where(np.arange(S) < S // 2, 0, 1).astype(np.uint8)[None].repeat(S, 0), mode="P")
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    if transparent:
        img.save(path, transparency=1)
    else:
        img.save(path)


def grey16_png(path: Path) -> None:
    """16-bit greyscale, four bands of rows: 65535, 32768, 1000, 0."""
    a = np.repeat(np.array([65535, 32768, 1000, 0], dtype=np.uint16), S // 4)[:, None].repeat(S, 1)
    Image.fromarray(a).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I;16")  # really 16-bit on disk


def huge_grey16_png(path: Path, width: int = 9400, height: int = 9400, value: int = 32768) -> Path:
    """A 16-bit greyscale PNG of width x height pixels, all `value`, written row by row with zlib (PIL
    would build the whole image in memory first): 88.4 M pixels, just under PIL's decompression-bomb
    limit, compress to about 170 KB."""
    row = b"\x00" + value.to_bytes(2, "big") * width  # filter type 0, then big-endian samples
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)  # 16-bit, greyscale, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def corner_jpeg(path: Path, orientation: int | None) -> None:
    """A white top-left quadrant on black, stored as is, with an EXIF orientation tag to apply."""
    img = Image.new("L", (S, S), 0)
    img.paste(255, (0, 0, S // 2, S // 2))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    img.save(path, quality=95, exif=exif.tobytes())


def quadrants(arr: np.ndarray) -> list[int]:
    """Mean of (top-left, top-right, bottom-left, bottom-right) over all channels."""
    halves = (slice(0, S // 2), slice(S // 2, S))
    return [int(arr[:, rows, cols].mean()) for rows in halves for cols in halves]


def check_rgba(a):  # a: (3, S, S)
    assert (a[:, :, : S // 2].T == (255, 0, 0)).all()  # opaque red stays red
    assert (a[:, : S // 2, S // 2:] == 255).all()  # fully transparent -> white, not black
    assert np.abs(a[:, S // 2:, S // 2:].astype(int) - 127).max() <= 1  # 50% black over white


def check_palette(a):
    assert (a[:, :, : S // 2].T == (10, 20, 30)).all() and (a[:, :, S // 2:].T == (200, 100, 50)).all()


def check_palette_transparent(a):
    assert (a[:, :, : S // 2].T == (10, 20, 30)).all() and (a[:, :, S // 2:] == 255).all()


def check_grey16(a):
    rows = a[:, :: S // 4, 0]  # one row per band, every channel
    assert (rows == np.array([255, 128, 4, 0])[None]).all(), rows  # 65535/257, 32768/257 (not clipped)


def check_grey(a):
    assert (a == 77).all(), a  # greyscale into 3 channels: the same value in each


def check_cmyk(a):
    r, g, b = a.reshape(3, -1).mean(axis=1)
    assert r > 200 and g < 60 and b < 60, (r, g, b)  # CMYK (0, 255, 255, 0) is red, not cyan


def check_corner(expected_white: int):
    def check(a):
        q = quadrants(a)
        assert q[expected_white] > 200 and all(v < 60 for i, v in enumerate(q) if i != expected_white), q
    return check


# file name -> (writer, ("quarantine", [reason texts]) or ("pixels", check of the (3, S, S) result))
SPECIAL = {
    "empty.png": (lambda p: p.write_bytes(b""), ("quarantine", ["empty file (0 bytes)"])),
    "truncated.jpg": (truncated_jpeg, ("quarantine", ["corrupt or truncated image", "truncated"])),
    "notes.jpg": (lambda p: p.write_text("shopping list\neggs\nmilk\n"), ("quarantine", ["a text file, not an image"])),
    "error.png": (lambda p: p.write_text("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
                                         "<body><h1>Not Found</h1></body></html>\n"),
                  ("quarantine", ["an HTML page, not an image"])),
    "corrupt.png": (corrupt_png, ("quarantine", ["corrupt or truncated image"])),
    "junk.png": (lambda p: p.write_bytes(b"\xff\xfe" + _noise(510).tobytes()),  # \xff is never UTF-8
                 ("quarantine", ["not a recognised image"])),
    # 1e8 pixels of a 1-bit PNG: ~12 kB on disk, over PIL's (and params.yaml's) 89478485 limit
    "bomb.png": (lambda p: Image.new("1", (10000, 10000)).save(p), ("quarantine", ["decompression bomb",
                                                                                  "100000000 pixels"])),
    "cmyk.jpg": (lambda p: Image.new("CMYK", (S, S), (0, 255, 255, 0)).save(p, quality=95), ("pixels", check_cmyk)),
    "rgba.png": (rgba_png, ("pixels", check_rgba)),
    "palette.png": (lambda p: palette_png(p, False), ("pixels", check_palette)),
    "palette_transparent.png": (lambda p: palette_png(p, True), ("pixels", check_palette_transparent)),
    "grey16.png": (grey16_png, ("pixels", check_grey16)),
    "grey.png": (lambda p: Image.new("L", (S, S), 77).save(p), ("pixels", check_grey)),
    "exif1.jpg": (lambda p: corner_jpeg(p, 1), ("pixels", check_corner(0))),
    "exif3.jpg": (lambda p: corner_jpeg(p, 3), ("pixels", check_corner(3))),  # rotated 180
    "exif6.jpg": (lambda p: corner_jpeg(p, 6), ("pixels", check_corner(1))),  # 90 clockwise: top-left -> top-right
    "exif8.jpg": (lambda p: corner_jpeg(p, 8), ("pixels", check_corner(2))),  # 90 anticlockwise: -> bottom-left
}
QUARANTINED = sorted(n for n, (_, (kind, _)) in SPECIAL.items() if kind == "quarantine")
CONVERTED = sorted(n for n, (_, (kind, _)) in SPECIAL.items() if kind == "pixels")
