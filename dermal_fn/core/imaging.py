"""Image decoding: sniff the type, refuse bombs from the header, decode small, orient, make RGB.

Everything happens in memory; nothing here writes a file or logs image content.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from dermal_fn.errors import InvalidImage, UnsupportedMediaType

InputScale = Literal["raw", "unit", "symmetric"]
INPUT_SCALES: tuple[InputScale, ...] = ("raw", "unit", "symmetric")
ResizeMethod = Literal["bilinear", "nearest", "bicubic", "area"]
RESIZE_METHODS: dict[str, Image.Resampling] = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
}

DECODABLE = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 24_000_000
JPEG_PIXEL_FACTOR = 4
DRAFT_SLACK = 0.95
# decode at least this large, so the overlay has a useful resolution
DISPLAY_SIDE = 512
# decode phone photos at least this large for the overlay (small models still get a readable overlay)
OVERLAY_MIN_SIDE = 384


@dataclass(frozen=True)
class DecodedImage:
    """A decoded upload: RGB at reduced size, and what it was."""

    rgb: Image.Image
    format: str
    original_size: tuple[int, int]  # (width, height) as stored, before draft reduction


def sniff(data: bytes) -> str:
    """Name the container from magic bytes, or raise for what we do not decode."""
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:2] == b"BM":
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace")
        raise UnsupportedMediaType(
            f"expected JPEG, PNG, WebP, GIF, BMP or TIFF, found an ISO media file (brand {brand!r}: "
            "HEIC/HEIF/AVIF); export the photo as JPEG"
        )
    if head.startswith(b"%PDF"):
        raise UnsupportedMediaType("expected JPEG, PNG, WebP, GIF, BMP or TIFF, found a PDF document")
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<svg", b"<?xml", b"<!doctype svg")):
        raise UnsupportedMediaType("expected a raster image (JPEG, PNG, WebP, ...), found SVG/XML")
    if not data:
        raise InvalidImage("expected image bytes, found an empty body")
    if _looks_like_text(head):
        raise InvalidImage("expected JPEG, PNG, WebP, GIF, BMP or TIFF bytes, found text")
    raise InvalidImage("expected JPEG, PNG, WebP, GIF, BMP or TIFF bytes, found an unknown format")


def _looks_like_text(head: bytes) -> bool:
    """UTF-8 of printable characters and whitespace (a multi-byte character cut at the end is fine)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:
            return False
        text = head[: exc.start].decode("utf-8")
    return all(char.isprintable() or char in "\t\r\n" for char in text)


def decode(
    data: bytes, *, min_side: int = DISPLAY_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> DecodedImage:
    """Decode bytes to an RGB image, refusing bombs before decoding pixels.

    Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale with ``Image.draft`` (the shorter side stays
    at least ``DRAFT_SLACK`` x ``min_side``); EXIF orientation is applied; any mode becomes 8-bit RGB; animated images
    give their first frame.
    """
    kind = sniff(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[kind])
            width, height = image.size
            if width < 1 or height < 1:
                raise InvalidImage(f"expected a non-empty image, found {width}x{height}")
            # a JPEG is decoded at 1/2..1/8 scale (draft), so it may declare 4x as many pixels
            allowed = max_pixels * (JPEG_PIXEL_FACTOR if kind == "JPEG" else 1)
            if width * height > allowed:
                raise InvalidImage(
                    f"expected at most {allowed / 1e6:.0f} megapixels, found {width}x{height} "
                    f"({width * height / 1e6:.0f} MP)"
                )
            if kind == "JPEG":
                reduction = draft_reduction(width, height, min_side=min_side)
                if reduction > 1:
                    image.draft("RGB", (-(-width // reduction), -(-height // reduction)))
            image.load()
            oriented = ImageOps.exif_transpose(image)
            rgb = to_rgb(oriented)
    except (InvalidImage, UnsupportedMediaType):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(
            f"expected at most {max_pixels / 1e6:.0f} megapixels, found a header declaring far more "
            "(a decompression bomb)"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error) as exc:
        raise InvalidImage(
            f"expected a complete {kind} image, found a damaged one ({type(exc).__name__})"
        ) from exc
    return DecodedImage(rgb=rgb, format=kind, original_size=(width, height))


def draft_reduction(width: int, height: int, *, min_side: int, slack: float = DRAFT_SLACK) -> int:
    """The largest JPEG DCT reduction (1, 2, 4 or 8) keeping the shorter side near ``min_side``.

    ``slack`` lets the shorter side fall a little below ``min_side`` (a 4000x3000 photo at 1/8 is
    500x375 for a 384 px model): decoding at 1/8 instead of 1/4 halves the decode time, and the
    model's resize barely notices a 2 % upscale.
    """
    shorter = min(width, height)
    for reduction in (8, 4, 2):
        if shorter / reduction >= slack * min_side:
            return reduction
    return 1


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit scaled down, transparency composited on white."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        if mode != "I" or array.max(initial=0) > 255:
            array = array / 257.0
        grey = Image.fromarray(np.asarray(np.clip(np.round(array), 0, 255), dtype=np.uint8), mode="L")
        return grey.convert("RGB")
    if mode == "F":
        array = np.clip(np.asarray(image, dtype=np.float64), 0, 255)
        return Image.fromarray(np.asarray(np.round(array), dtype=np.uint8), mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return image.convert("RGB")
    return image


def model_input(
    image: Image.Image,
    *,
    size: tuple[int, int],
    scale: InputScale = "raw",
    resize: str = "bilinear",
) -> np.ndarray:
    """Resize to the model's (height, width) and scale: a float32 array of shape (1, h, w, 3)."""
    height, width = size
    resample = RESIZE_METHODS[resize]
    resized = image.resize((width, height), resample) if image.size != (width, height) else image
    pixels = np.asarray(resized, dtype=np.float32)[np.newaxis]
    if scale == "unit":
        pixels = pixels / np.float32(255.0)
    elif scale == "symmetric":
        pixels = pixels / np.float32(127.5) - np.float32(1.0)
    return np.ascontiguousarray(pixels, dtype=np.float32)


def display_copy(image: Image.Image, *, max_side: int = DISPLAY_SIDE) -> Image.Image:
    """A copy no larger than max_side on its longer side, for the overlay."""
    copy = image.copy()
    copy.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return copy
