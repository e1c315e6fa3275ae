"""Rendering a Grad-CAM grid: upsample, colour map, blend on the photo, encode as PNG.

Two pictures: :func:`overlay` (the photo with the heatmap blended on it, the HTTP API's
``overlay_png``) and :func:`heatmap` (the coloured heatmap alone, its blend weight as alpha, as an
8-bit palette PNG: a client lays it over the photo it already has and sees the same picture).

No matplotlib: the colour map is the classic "jet" ramp written out in NumPy.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

MAX_ALPHA = 0.6


def jet(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with the jet ramp (blue → cyan → yellow → red)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., np.newaxis]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)  # r, g, b peaks at 3/4, 1/2, 1/4
    rgb = np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)
    return np.asarray(np.round(rgb * 255.0), dtype=np.uint8)


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a (h, w) grid to (height, width) given as size=(width, height)."""
    image = Image.fromarray(np.asarray(grid, dtype=np.float32), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


JET_LUT = jet(np.linspace(0.0, 1.0, 256))  # (256, 3) uint8


def heat_levels(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The grid upsampled to ``size`` (width, height) as uint8 levels 0..255: indices into ``JET_LUT``."""
    heat = np.clip(upsample(grid, size), 0.0, 1.0)
    return np.asarray(np.round(heat * 255.0), dtype=np.uint8)


def alpha_table(max_alpha: float) -> np.ndarray:
    """The blend weight of each level: ``round(level * max_alpha)``, uint8 (256,)."""
    return np.asarray(np.round(np.arange(256) * max_alpha), dtype=np.uint8)


def overlay(photo: Image.Image, grid: np.ndarray, *, max_alpha: float = MAX_ALPHA) -> Image.Image:
    """Blend the upsampled heatmap onto the photo; cold regions keep the photo as it is.

    Works in uint8 with a 256-entry colour table and Pillow's compositing: a few ms for 512 px.
    """
    base = photo.convert("RGB")
    levels = heat_levels(grid, base.size)
    colour = Image.fromarray(JET_LUT[levels], mode="RGB")
    mask = Image.fromarray(alpha_table(max_alpha)[levels], mode="L")
    return Image.composite(colour, base, mask)


def heatmap(grid: np.ndarray, size: tuple[int, int], *, max_alpha: float = MAX_ALPHA) -> Image.Image:
    """The upsampled heatmap alone at ``size`` (width, height): a palette image, jet colours, alpha.

    Palette entry ``i`` is ``JET_LUT[i]`` with alpha ``alpha_table(max_alpha)[i]``, the colour and the
    mask :func:`overlay` composites with: laid over the photo ("source over") it gives what
    :func:`overlay` draws, and its PNG is a few KB.
    """
    image = Image.fromarray(heat_levels(grid, size), mode="L").convert("P")  # "L" → "P" keeps the indices
    image.putpalette(JET_LUT.tobytes(), rawmode="RGB")
    image.info["transparency"] = alpha_table(max_alpha).tobytes()
    return image


def png_bytes(image: Image.Image) -> bytes:
    """Encode an image as PNG (fast zlib level: this is on every request's path)."""
    buffer = io.BytesIO()
    image.save(
        buffer,
        format="PNG",
        optimize=False,
        compress_level=1,
        transparency=image.info.get("transparency"),
    )  # 6x faster than 6, ~14 % larger
    return buffer.getvalue()


def overlay_png_base64(photo: Image.Image, grid: np.ndarray) -> str:
    """The overlay as a base64 PNG string, as the JSON answer carries it."""
    return base64.b64encode(png_bytes(overlay(photo, grid))).decode("ascii")


def heatmap_png_base64(grid: np.ndarray, size: tuple[int, int]) -> str:
    """The heatmap alone (:func:`heatmap`) as a base64 PNG string."""
    return base64.b64encode(png_bytes(heatmap(grid, size))).decode("ascii")
