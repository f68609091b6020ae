"""Decoding one image (a file, or its bytes as a client sends them) into a uint8 (C, H, W) array: used
by prepare for the cache, by predict and by the served model, so all see identical pixels. Anything
that is not a usable image raises BadImage with a reason."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class BadImage(Exception):
    """The file is not a usable image; str(e) is the reason recorded in the quarantine."""


def decode(source: str | Path | bytes, size: int, channels: int, max_pixels: int) -> np.ndarray:
    """Decode a file (or an image's bytes), EXIF-rotate, convert to L or RGB, and resize to size x size
    (squashing, like the notebooks' transforms.Resize((size, size))). Returns uint8 of shape
    (channels, size, size)."""
    if isinstance(source, bytes):
        path, head = io.BytesIO(source), source[:512]
        empty = not source
    else:
        path = Path(source)
        empty = path.stat().st_size == 0
    if empty:
        raise BadImage("empty file (0 bytes)")
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # PIL only warns between max_pixels and 2x that; both are bombs here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.draft(None, (size, size))  # JPEG: decode at a reduced scale, much faster
                img.load()
                # In place: exif_transpose() otherwise returns a copy even when there is nothing to turn.
                ImageOps.exif_transpose(img, in_place=True)
                if _is_wide(img):
                    img = _wide_to_l(img.resize((size, size), Image.Resampling.BILINEAR))
                img = _to_mode(img, channels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise BadImage(_sniff(head if isinstance(source, bytes) else _head(path))) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"corrupt or truncated image: {e}") from None
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def decode_or_reason(rel: str, root: Path, size: int, channels: int, max_pixels: int) -> np.ndarray | str:
    """decode(root / rel) for prepare's worker pool: the array, or why the file is quarantined."""
    try:
        return decode(root / rel, size, channels, max_pixels)
    except BadImage as e:
        return str(e)
    except OSError as e:  # unreadable file: permissions, a broken link
        return f"unreadable: {e}"


def _is_wide(img: Image.Image) -> bool:
    """16-bit and 32-bit greyscale: more than 8 bits per pixel."""
    return img.mode.startswith("I;16") or img.mode in ("I", "F")


def _wide_to_l(img: Image.Image) -> Image.Image:
    """8-bit greyscale from a 16- or 32-bit one, scaled rather than clipped. Called after the resize
    to the output size, so its arithmetic is on a few thousand pixels: on the decoded image (88 M
    pixels fit under prepare.max_image_pixels) float64 copies took gigabytes."""
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0  # float images are usually 0..1
        out = np.clip(arr, 0, 255).round()
    else:  # 16-bit range 0..65535 onto 0..255, rounded to nearest: v / 257 = (v + 128) // 257
        out = np.clip((np.asarray(img, dtype=np.int64) + 128) // 257, 0, 255)
    return Image.fromarray(out.astype(np.uint8), mode="L")


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to L (1 channel) or RGB (3): transparency goes onto white, CMYK and
    palettes through PIL's converters."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(512)


def _sniff(head: bytes) -> str:
    lower = head.lower()
    if b"<html" in lower or b"<!doctype" in lower:
        return "an HTML page, not an image"
    try:
        head.decode("utf-8")
        return "a text file, not an image"
    except UnicodeDecodeError:
        return "not a recognised image format"
