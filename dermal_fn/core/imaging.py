"""Image decoding: sniff the type, refuse bombs from the header, budget the bytes, decode small, orient, make RGB.

Memory is bounded before any pixel is decoded: the header's pixel count, then the decoder's buffer
in bytes (width x height x Pillow's bytes per pixel), against a budget and the caller's headroom.
Everything after the decode works on a reduced copy. Everything happens in memory; nothing here
writes a file or logs image content.
"""

from __future__ import annotations

import functools
import io
import struct
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from dermal_fn.core.units import MIB
from dermal_fn.errors import ImageTooLarge, InsufficientMemory, InvalidImage, UnsupportedMediaType

InputScale = Literal["raw", "unit", "symmetric"]
INPUT_SCALES: tuple[InputScale, ...] = ("raw", "unit", "symmetric")
RESIZE_METHODS: dict[str, Image.Resampling] = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
}

DEFAULT_MAX_PIXELS = 24_000_000
# the decoder's buffer at its largest: 24 MP in RGB/RGBA/float (four bytes a pixel in Pillow)
DEFAULT_MAX_DECODE_BYTES = 100 * MIB
# peak of a decode over its buffer: the full buffer, its reduced copy, the conversions of that copy
DECODE_WORK_FACTOR = 1.5
EXIF_ORIENTATION = 0x0112
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
    original_size: tuple[int, int]  # (width, height) as stored, before any reduction
    decoded_bytes: int  # what the decoder's buffer held at its largest (the byte budget's measure)


# what a client is told we take, in words a clinician knows
EXPECTED = "a photo (JPEG, PNG, WebP, HEIC, AVIF, GIF, BMP or TIFF) or a DICOM image"
# ISO media brands (ftyp): Apple's and Samsung's HEIC photos, AVIF
HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"})
AVIF_BRANDS = frozenset({b"avif", b"avis"})
# how each container is named to a person
FORMAT_WORDS = {"HEIF": "HEIC photo", "AVIF": "AVIF photo", "DICOM": "DICOM image"}


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
        box = int.from_bytes(head[:4], "big")
        brands = {head[8:12]} | {head[i : i + 4] for i in range(16, min(box, len(head)) - 3, 4)}
        if brands & AVIF_BRANDS and head[8:12] not in HEIF_BRANDS:
            return "AVIF"
        if brands & HEIF_BRANDS:
            return "HEIF"
        raise UnsupportedMediaType(f"expected {EXPECTED}, found a video or another ISO media file")
    if data[128:132] == b"DICM":
        return "DICOM"
    if head.startswith(b"%PDF"):
        raise UnsupportedMediaType(f"expected {EXPECTED}, found a PDF document")
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<svg", b"<?xml", b"<!doctype svg")):
        raise UnsupportedMediaType("expected a raster image (JPEG, PNG, WebP, ...), found SVG/XML")
    if not data:
        raise InvalidImage("expected image bytes, found an empty body")
    if _looks_like_text(head):
        raise InvalidImage(f"expected {EXPECTED}, found text")
    raise InvalidImage(f"expected {EXPECTED}, found an unknown format")


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
    data: bytes,
    *,
    min_side: int = DISPLAY_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    available_bytes: int | None = None,
) -> DecodedImage:
    """Decode bytes to an RGB image within a byte budget, refusing bombs before decoding pixels.

    In order: the header's pixel count against ``max_pixels`` (a bomb: InvalidImage); a JPEG is
    decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``, the shorter side staying at least
    ``DRAFT_SLACK`` x ``min_side``); the decoder's buffer, width x height x bytes per pixel of the
    mode, against ``max_bytes`` (ImageTooLarge, 413) and, when given, against ``available_bytes``
    of memory headroom (InsufficientMemory, 503: try again); then the pixels are decoded and at once
    reduced by a whole factor while the shorter side stays at least ``min_side``. EXIF orientation,
    16-bit, float, alpha and CMYK are all handled on that reduced copy only, in integer or float32
    arithmetic; animated images give their first frame.
    """
    kind = sniff(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = open_image(data, kind, max_pixels=max_pixels)
            width, height = image.size
            check_pixels(width, height, kind=kind, max_pixels=max_pixels)
            if kind == "JPEG":
                reduction = draft_reduction(width, height, min_side=min_side)
                if reduction > 1:
                    image.draft(
                        image.mode if image.mode == "CMYK" else "RGB",
                        (-(-width // reduction), -(-height // reduction)),
                    )
            needed = decoded_bytes(image.size, image.mode)
            check_budget(image.size, image.mode, needed, max_bytes=max_bytes, available_bytes=available_bytes)
            orientation = _orientation(image)
            image.load()
            reduced = reduce_to(image, min_side=min_side)
            if reduced is not image:
                image.close()  # the full-size buffer goes now, before any conversion
            rgb = to_rgb(_orient(reduced, orientation))
    except (InvalidImage, UnsupportedMediaType, ImageTooLarge, InsufficientMemory):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(
            f"expected at most {max_pixels / 1e6:.0f} megapixels, found a header declaring far more "
            "(a decompression bomb)"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error) as exc:
        words = FORMAT_WORDS.get(kind, f"{kind} image")
        raise InvalidImage(
            f"expected a complete {words}, found a damaged one ({type(exc).__name__})"
        ) from exc
    return DecodedImage(rgb=rgb, format=kind, original_size=(width, height), decoded_bytes=needed)


def open_image(data: bytes, kind: str, *, max_pixels: int) -> Image.Image:
    """Pillow's image for ``kind``, pixels not yet decoded (a DICOM image: its first frame, decoded)."""
    if kind == "HEIF":
        _register_heif()
    if kind == "DICOM":
        from dermal_fn.core.dicom import first_frame

        return first_frame(data, max_pixels=max_pixels)
    return Image.open(io.BytesIO(data), formats=[kind])


@functools.cache
def _register_heif() -> None:
    """pillow-heif's opener, registered on the first HEIC photo (its libheif is not loaded before)."""
    try:
        import pillow_heif
    except ImportError:  # installed with the package; without it, say what is missing
        raise UnsupportedMediaType(
            "expected HEIC support on this server (pillow-heif), found it not installed"
        ) from None
    pillow_heif.register_heif_opener(thumbnails=False)


def check_pixels(width: int, height: int, *, kind: str, max_pixels: int) -> None:
    """Refuse an empty image, or one whose header declares more pixels than allowed (a bomb)."""
    if width < 1 or height < 1:
        raise InvalidImage(f"expected a non-empty image, found {width}x{height}")
    # a JPEG is decoded at 1/2..1/8 scale (draft), so it may declare 4x as many
    allowed = max_pixels * (JPEG_PIXEL_FACTOR if kind == "JPEG" else 1)
    if width * height > allowed:
        raise InvalidImage(
            f"expected at most {allowed / 1e6:.0f} megapixels, found {width}x{height} "
            f"({width * height / 1e6:.0f} MP)"
        )


def decoded_bytes(size: tuple[int, int], mode: str) -> int:
    """What Pillow's buffer for an image of this size and mode holds (its storage, not the mode's bits).

    Pillow keeps "1", "L" and "P" in one byte a pixel, "I;16*" in two, and every other mode
    (RGB included: RGBX) in four.
    """
    width, height = size
    if mode in ("1", "L", "P"):
        per_pixel = 1
    elif mode.startswith("I;16"):
        per_pixel = 2
    else:
        per_pixel = 4
    return width * height * per_pixel


def check_budget(
    size: tuple[int, int], mode: str, needed: int, *, max_bytes: int, available_bytes: int | None
) -> None:
    """ImageTooLarge when the decode needs more than ``max_bytes``; InsufficientMemory beyond the headroom."""
    width, height = size
    if needed > max_bytes:
        raise ImageTooLarge(
            f"expected an image that decodes to at most {max_bytes / MIB:.0f} MB, found {width}x{height} "
            f"{mode} ({needed / MIB:.0f} MB); send it smaller or as an 8-bit JPEG"
        )
    if available_bytes is not None and needed * DECODE_WORK_FACTOR > available_bytes:
        raise InsufficientMemory(
            f"expected {needed * DECODE_WORK_FACTOR / MIB:.0f} MB free to decode {width}x{height} {mode}, "
            f"found {max(available_bytes, 0) / MIB:.0f} MB; retry shortly"
        )


def reduce_to(image: Image.Image, *, min_side: int) -> Image.Image:
    """The image reduced by the largest whole factor that keeps its shorter side >= ``min_side``.

    ``Image.reduce`` (box average) where it works in place; in strips for RGBA and LA (Pillow would
    first make a full-size premultiplied copy); a box resize for "1", "P" and 16-bit (Pillow uses
    nearest for palettes, so colours stay colours). The same image when no factor fits.
    """
    width, height = image.size
    factor = min(width, height) // max(1, min_side)
    if factor < 2:
        return image
    if image.mode in ("1", "P") or image.mode.startswith("I;16"):
        size = (max(1, width // factor), max(1, height // factor))
        return image.resize(size, Image.Resampling.BOX)
    if image.mode in ("RGBA", "LA"):
        return _reduce_in_strips(image, factor)
    return image.reduce(factor)


def _reduce_in_strips(image: Image.Image, factor: int, *, strip_bytes: int = 8 * MIB) -> Image.Image:
    """``image.reduce(factor)`` a band of rows at a time, so the premultiplied copy is one band's."""
    width, height = image.size
    out_w, out_h = width // factor, height // factor
    rows = max(1, strip_bytes // (width * 4 * factor))  # output rows per strip
    out = Image.new(image.mode, (out_w, out_h))
    for top in range(0, out_h, rows):
        bottom = min(out_h, top + rows)
        band = image.crop((0, top * factor, out_w * factor, bottom * factor))
        out.paste(band.reduce(factor), (0, top))
    return out


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(image: Image.Image) -> int:
    """The EXIF Orientation tag (1 when absent or unreadable), read before any reduction drops it."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError, struct.error):
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _orient(image: Image.Image, orientation: int) -> Image.Image:
    """Turn the image upright as the EXIF tag says (as ``ImageOps.exif_transpose`` does)."""
    method = _TRANSPOSE.get(orientation)
    return image if method is None else image.transpose(method)


def decode_side(input_size: tuple[int, int]) -> int:
    """The shorter side a photo is decoded at for a model of ``input_size``: the model's, or the overlay's."""
    return max(*input_size, OVERLAY_MIN_SIDE)


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
    """Any Pillow mode to 8-bit RGB: 16-bit scaled down, float clipped, transparency composited on white.

    Integer or float32 arithmetic only, on the image as given (the decoder has reduced it already).
    """
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        array = np.asarray(image)
        if mode.startswith("I;16") or int(array.max(initial=0)) > 255:
            wide = np.clip(array, 0, 65535).astype(np.uint32)
            grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
        else:
            grey = np.clip(array, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        array = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32)), 0.0, 255.0)
        return Image.fromarray(np.rint(array).astype(np.uint8), mode="L").convert("RGB")
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


@dataclass(frozen=True)
class Normalization:
    """Per-channel normalisation after the scale: channel order, then ``(x - mean) / std``."""

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channels: Literal["RGB", "BGR"] = "RGB"

    @property
    def identity(self) -> bool:
        """True when it changes nothing."""
        return self == Normalization()

    def as_json(self) -> dict[str, object]:
        """The manifest's fields."""
        return {"mean": list(self.mean), "std": list(self.std), "channels": self.channels}


# keras.applications' preprocess_input modes that live outside a model (ResNet/VGG "caffe", "torch")
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_PRESETS: dict[str, tuple[InputScale, Normalization]] = {
    "caffe": ("raw", Normalization(mean=IMAGENET_MEAN_BGR, channels="BGR")),  # RGB->BGR, minus the mean
    "torch": ("unit", Normalization(mean=IMAGENET_MEAN, std=IMAGENET_STD)),  # 0-1, ImageNet mean/std
}


def model_input(
    image: Image.Image,
    *,
    size: tuple[int, int],
    scale: InputScale = "raw",
    resize: str = "bilinear",
    normalization: Normalization | None = None,
) -> np.ndarray:
    """Resize to the model's (height, width), scale, normalise: a float32 array of shape (1, h, w, 3)."""
    height, width = size
    resample = RESIZE_METHODS[resize]
    resized = image.resize((width, height), resample) if image.size != (width, height) else image
    pixels = np.asarray(resized, dtype=np.float32)[np.newaxis]
    if scale == "unit":
        pixels = pixels / np.float32(255.0)
    elif scale == "symmetric":
        pixels = pixels / np.float32(127.5) - np.float32(1.0)
    if normalization is not None and not normalization.identity:
        if normalization.channels == "BGR":
            pixels = pixels[..., ::-1]
        mean = np.asarray(normalization.mean, dtype=np.float32)
        std = np.asarray(normalization.std, dtype=np.float32)
        pixels = np.asarray((pixels - mean) / std, dtype=np.float32)
    return np.ascontiguousarray(pixels, dtype=np.float32)


def display_copy(image: Image.Image, *, max_side: int = DISPLAY_SIDE) -> Image.Image:
    """A copy no larger than max_side on its longer side, for the overlay."""
    copy = image.copy()
    copy.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return copy
