"""Helpers for the hostile-input, privacy, access, OpenAPI and fuzz tests.

- ``settings_for``: Settings for a test service on a bundle (conftest's ``small_bundle``);
- image makers for odd-but-valid and hostile uploads, all in memory;
- ``client_for``: the real function through ``functions_framework.create_app(...).test_client()``;
- ``ServerProcess``: a real ``functions-framework`` process on a free 127.0.0.1 port, stderr captured.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dermal_fn.demo import synth
from dermal_fn.serving.config import Settings
from tests.http_fixtures import ServerProcess

REPO = Path(__file__).resolve().parent.parent
MAIN = REPO / "main.py"


def settings_for(bundle: Path, **overrides: Any) -> Settings:
    """Settings for a test service: the tiny bundle, 1 MB uploads, one thread, no memory limit."""
    values: dict[str, Any] = {
        "model_uri": str(bundle),
        "max_upload_mb": 1.0,
        "litert_threads": 1,
        "memory_limit_mb": None,
        "memory_soft_limit_mb": None,
    }
    values.update(overrides)
    return Settings(**values)


@contextmanager
def client_for(settings: Settings) -> Iterator[Any]:
    """The real function (main.py) in a test client, with the process's service set to ``settings``."""
    import functions_framework

    from dermal_fn.serving.service import reset_service

    reset_service(settings)
    try:
        app = functions_framework.create_app(target="dermal", source=str(MAIN))
        yield app.test_client()
    finally:
        reset_service(None)


# --- images --------------------------------------------------------------------------------------


def lesion(*, size: int = 128, seed: int = 0, label: int = synth.ROUND_UNIFORM) -> synth.Sample:
    """A synthetic skin photo with one drawn spot."""
    return synth.generate(np.random.default_rng(seed), size=size, label=label, hair=False)


def photo(*, size: int = 128, seed: int = 0) -> Image.Image:
    """A synthetic RGB photo."""
    return Image.fromarray(lesion(size=size, seed=seed).image, mode="RGB")


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    """Encode a Pillow image in memory."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def jpeg(*, size: int = 128, seed: int = 0, quality: int = 90) -> bytes:
    """A synthetic photo as JPEG."""
    return encode(photo(size=size, seed=seed), "JPEG", quality=quality)


def png(*, size: int = 128, seed: int = 0) -> bytes:
    """A synthetic photo as PNG."""
    return encode(photo(size=size, seed=seed), "PNG")


def png16() -> bytes:
    """A 16-bit greyscale PNG with values over the whole 16-bit range."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")


def animated(fmt: str) -> tuple[bytes, Image.Image]:
    """A 3-frame animation (GIF or WebP) and its first frame."""
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    params: dict[str, Any] = {"save_all": True, "append_images": frames[1:], "duration": 50, "loop": 0}
    if fmt == "WEBP":
        params["lossless"] = True
    return encode(frames[0], fmt, **params), frames[0]


@functools.cache
def odd_valid_images() -> dict[str, bytes]:
    """Unusual but valid uploads that must give 200."""
    rgb = photo(size=96, seed=3)
    palette_transparent = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_transparent.info["transparency"] = 0
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    return {
        "png_16bit": png16(),
        "jpeg_cmyk": encode(rgb.convert("CMYK"), "JPEG"),
        "png_palette": encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG"),
        "png_palette_transparent": encode(palette_transparent, "PNG"),
        "png_rgba": encode(rgba, "PNG"),
        "png_greyscale_alpha": encode(rgb.convert("LA"), "PNG"),
        "png_1bit": encode(rgb.convert("1"), "PNG"),
        "jpeg_greyscale": encode(rgb.convert("L"), "JPEG"),
        "png_greyscale": encode(rgb.convert("L"), "PNG"),
        "gif_animated": animated("GIF")[0],
        "webp_animated": animated("WEBP")[0],
        "webp": encode(rgb, "WEBP"),
        "bmp": encode(rgb, "BMP"),
        "tiff": encode(rgb, "TIFF"),
        "png_1x1": encode(Image.new("RGB", (1, 1), (120, 80, 60)), "PNG"),
        "jpeg_1x1": encode(Image.new("RGB", (1, 1), (120, 80, 60)), "JPEG"),
        "jpeg_progressive": encode(rgb, "JPEG", progressive=True),
        "jpeg_exif_rotated": exif_rotated(rgb, orientation=6, fmt="JPEG"),
        "jpeg_large_draft": jpeg(size=1600, seed=4, quality=70),
    }


# EXIF orientation -> the transpose a viewer applies to the stored pixels to show them upright
VIEWER_TRANSPOSE: dict[int, Image.Transpose | None] = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# the inverse of each viewer transpose: how a camera stores an upright scene
_INVERSE = {
    Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270,
    Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90,
}


# the uploads of the hardening table: small files that decode big (6000x4000 is 24 MP, the pixel limit)
EXPANDING_SIZE = (6000, 4000)
PANORAMA_SIZE = (65_500, 729)


def _spot(array: np.ndarray, value: Any) -> np.ndarray:
    """A flat image with one filled square off-centre: compresses to almost nothing, yet has content."""
    h, w = array.shape[:2]
    array[h // 3 : h // 3 + h // 5, w // 2 : w // 2 + h // 5] = value
    return array


@functools.cache
def expanding_images() -> dict[str, bytes]:
    """Each row of the table: a few KB to MB on the wire, hundreds of MB if decoded naively.

    ``grey16_png``, ``rgba_png``, ``float_tiff`` are 6000x4000 (24 MP); ``cmyk_jpeg`` and
    ``rgb_jpeg`` are 65500x729 panoramas (47.7 MP, JPEG's 4x allowance over the pixel limit).
    """
    w, h = EXPANDING_SIZE
    grey16 = _spot(np.full((h, w), 9000, dtype=np.uint16), 52000)
    rgba = _spot(np.full((h, w, 4), (200, 160, 140, 255), dtype=np.uint8), (90, 40, 30, 128))
    floats = _spot(np.full((h, w), 180.5, dtype=np.float32), 20.25)
    pw, ph = PANORAMA_SIZE
    panorama = _spot(np.full((ph, pw, 3), (205, 170, 150), dtype=np.uint8), (80, 45, 35))
    return {
        "grey16_png": encode(Image.fromarray(grey16), "PNG"),
        "rgba_png": encode(Image.fromarray(rgba, mode="RGBA"), "PNG"),
        "float_tiff": encode(Image.fromarray(floats, mode="F"), "TIFF", compression="tiff_adobe_deflate"),
        "cmyk_jpeg": encode(Image.fromarray(panorama, mode="RGB").convert("CMYK"), "JPEG", quality=80),
        "rgb_jpeg": encode(Image.fromarray(panorama, mode="RGB"), "JPEG", quality=80),
    }


def exif_rotated(upright: Image.Image, *, orientation: int, fmt: str = "JPEG") -> bytes:
    """``upright`` stored the way a camera would, with an EXIF Orientation tag that restores it."""
    viewer = VIEWER_TRANSPOSE[orientation]
    stored = upright if viewer is None else upright.transpose(_INVERSE.get(viewer, viewer))
    exif = Image.Exif()
    exif[0x0112] = orientation
    params: dict[str, Any] = {"exif": exif.tobytes()}
    if fmt == "JPEG":
        params["quality"] = 95
    return encode(stored, fmt, **params)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 30_000, height: int = 30_000, *, rows: int = 16) -> bytes:
    """A PNG header claiming ``width`` x ``height`` (8-bit grey) with a few KB of zero rows after it.

    Decoding it fully would need ``width * height`` bytes; a decoder that trusts the header runs
    out of memory before noticing the data ends. A few KB on the wire.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = (b"\x00" + b"\x00" * width) * rows
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw, 9))
        + _png_chunk(b"IEND", b"")
    )


def jpeg_bomb(width: int = 65_000, height: int = 65_000) -> bytes:
    """A small JPEG whose frame header is patched to claim ``width`` x ``height``."""
    data = bytearray(jpeg(size=64))
    index = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, index + 5, height, width)
    return bytes(data)


def gif_bomb(width: int = 65_535, height: int = 65_535) -> bytes:
    """A tiny GIF whose logical screen and frame claim ``width`` x ``height``."""
    data = bytearray(encode(Image.new("P", (8, 8)), "GIF"))
    struct.pack_into("<HH", data, 6, width, height)
    index = data.find(b"\x2c")
    struct.pack_into("<HH", data, index + 5, width, height)
    return bytes(data)


def heic() -> bytes:
    """The start of an HEIC file: an ISO-BMFF ``ftyp`` box with brand ``heic``, then a ``meta`` box."""
    ftyp = b"ftyp" + b"heic" + b"\x00\x00\x00\x00" + b"mif1heic"
    meta = b"meta" + b"\x00" * 24
    return struct.pack(">I", len(ftyp) + 4) + ftyp + struct.pack(">I", len(meta) + 4) + meta


def avif() -> bytes:
    """The start of an AVIF file (ftyp brand ``avif``)."""
    ftyp = b"ftyp" + b"avif" + b"\x00\x00\x00\x00" + b"mif1avif"
    return struct.pack(">I", len(ftyp) + 4) + ftyp + b"\x00" * 32


def mp4() -> bytes:
    """The start of an MP4 video (ftyp brand ``isom``): ISO media, but not a photo."""
    ftyp = b"ftyp" + b"isom" + b"\x00\x00\x02\x00" + b"isomiso2avc1mp41"
    return struct.pack(">I", len(ftyp) + 4) + ftyp + b"\x00\x00\x00\x08free"


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
SVG_XML = b'<?xml version="1.0"?>\n' + SVG
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


# --- multipart -----------------------------------------------------------------------------------


def multipart(
    parts: list[tuple[str, bytes, str | None]], *, boundary: str = "dermal-test-boundary"
) -> tuple[bytes, str]:
    """A multipart/form-data body from (name, value, filename) parts, and its Content-Type."""
    out = io.BytesIO()
    for name, value, filename in parts:
        out.write(f"--{boundary}\r\n".encode())
        disposition = f'Content-Disposition: form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
            out.write(f"{disposition}\r\nContent-Type: application/octet-stream\r\n\r\n".encode())
        else:
            out.write(f"{disposition}\r\n\r\n".encode())
        out.write(value)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


# --- a real functions-framework process ----------------------------------------------------------


@contextmanager
def running_server(*, env: Mapping[str, str], log_path: Path) -> Iterator[ServerProcess]:
    """A started server (tests.http_fixtures.ServerProcess) with its model loaded; always stopped."""
    server = ServerProcess(env, log_path=log_path, inherit_env=False)
    server.start()
    try:
        server.wait_ready(path="/health")
        server.wait_loaded()
        yield server
    finally:
        server.stop()
