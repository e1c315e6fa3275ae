"""dermal_fn.core.imaging: sniffing, bomb refusal from the header, odd-but-valid images, EXIF orientation."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from dermal_fn.core import imaging
from dermal_fn.errors import InvalidImage, UnsupportedMediaType
from tests import hostile_fixtures as hf

ODD = hf.odd_valid_images()


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (hf.jpeg(size=32), "JPEG"),
        (hf.png(size=32), "PNG"),
        (hf.animated("GIF")[0], "GIF"),
        (hf.animated("WEBP")[0], "WEBP"),
        (ODD["bmp"], "BMP"),
        (ODD["tiff"], "TIFF"),
    ],
)
def test_sniff_names_the_container_from_magic_bytes(data: bytes, kind: str) -> None:
    assert imaging.sniff(data) == kind


@pytest.mark.parametrize(
    ("data", "error", "needle"),
    [
        (hf.heic(), UnsupportedMediaType, "heic"),
        (hf.avif(), UnsupportedMediaType, "avif"),
        (hf.SVG, UnsupportedMediaType, "SVG"),
        (hf.SVG_XML, UnsupportedMediaType, "SVG"),
        (b"\xef\xbb\xbf  " + hf.SVG, UnsupportedMediaType, "SVG"),
        (hf.PDF, UnsupportedMediaType, "PDF"),
        (b"", InvalidImage, "empty"),
        (b"just some words, not a photo", InvalidImage, "text"),
        (bytes(range(256)), InvalidImage, "unknown format"),
    ],
)
def test_sniff_refuses_what_is_not_decoded(data: bytes, error: type[Exception], needle: str) -> None:
    with pytest.raises(error, match=needle):
        imaging.sniff(data)


@pytest.mark.parametrize(
    "data",
    [hf.jpeg()[:400], hf.jpeg()[: len(hf.jpeg()) // 2], hf.png()[:100], hf.png()[: len(hf.png()) // 2]],
    ids=["jpeg_header_only", "jpeg_half", "png_header_only", "png_half"],
)
def test_truncated_images_are_invalid(data: bytes) -> None:
    with pytest.raises(InvalidImage, match="expected a complete"):
        imaging.decode(data)


@pytest.mark.parametrize(
    ("data", "max_pixels"),
    [
        (hf.png_bomb(30_000, 30_000), 50_000_000),
        (hf.png_bomb(8_000, 8_000), 50_000_000),
        (hf.png_bomb(2_000, 2_000), 1_000_000),
        (hf.jpeg_bomb(65_000, 65_000), 50_000_000),
        (hf.gif_bomb(), 50_000_000),
    ],
    ids=["png_30000", "png_8000_over_50mp", "png_2000_over_1mp", "jpeg_65000", "gif_65535"],
)
def test_bombs_are_refused_from_the_header_fast(data: bytes, max_pixels: int) -> None:
    assert len(data) < 10_000  # a few KB on the wire
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match="megapixels"):
        imaging.decode(data, max_pixels=max_pixels)
    assert time.perf_counter() - started < 1.0


def test_an_image_at_the_pixel_limit_is_decoded() -> None:
    data = hf.png_bomb(1_000, 1_000, rows=1_000)
    decoded = imaging.decode(data, max_pixels=1_000_000)
    assert decoded.original_size == (1_000, 1_000)


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_but_valid_images_decode_to_8bit_rgb(name: str) -> None:
    decoded = imaging.decode(ODD[name], min_side=32)
    assert decoded.rgb.mode == "RGB"
    assert min(decoded.rgb.size) >= 1
    pixels = np.asarray(decoded.rgb)
    assert pixels.dtype == np.uint8 and pixels.shape[2] == 3


def test_16bit_png_keeps_its_range() -> None:
    pixels = np.asarray(imaging.decode(hf.png16()).rgb)
    assert pixels[0, 0].tolist() == [0, 0, 0]
    assert pixels[-1, -1].tolist() == [255, 255, 255]
    assert len(np.unique(pixels[..., 0])) > 200  # scaled, not clipped to 0/255


def test_cmyk_jpeg_colours_survive() -> None:
    rgb = hf.photo(size=64, seed=1)
    decoded = imaging.decode(hf.encode(rgb.convert("CMYK"), "JPEG", quality=95), min_side=64)
    diff = np.abs(np.asarray(decoded.rgb, dtype=float) - np.asarray(rgb, dtype=float)).mean()
    assert diff < 12.0


def test_transparency_is_composited_on_white() -> None:
    clear = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    pixels = np.asarray(imaging.decode(hf.encode(clear, "PNG")).rgb)
    assert (pixels == 255).all()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_give_their_first_frame(fmt: str) -> None:
    data, first = hf.animated(fmt)
    decoded = imaging.decode(data)
    assert decoded.rgb.size == first.size
    assert np.abs(np.asarray(decoded.rgb, dtype=int) - np.asarray(first, dtype=int)).max() <= 2


def test_one_pixel_image() -> None:
    decoded = imaging.decode(ODD["png_1x1"])
    assert decoded.rgb.size == (1, 1)
    assert np.asarray(decoded.rgb)[0, 0].tolist() == [120, 80, 60]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_honoured_exactly_for_png(orientation: int) -> None:
    upright = hf.photo(size=64, seed=5).crop((0, 0, 64, 40))  # not square: a wrong turn changes the size
    decoded = imaging.decode(hf.exif_rotated(upright, orientation=orientation, fmt="PNG"))
    assert decoded.rgb.size == upright.size
    assert np.array_equal(np.asarray(decoded.rgb), np.asarray(upright))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_honoured_for_jpeg(orientation: int) -> None:
    upright = hf.photo(size=128, seed=6).crop((0, 0, 128, 80))
    data = hf.exif_rotated(upright, orientation=orientation, fmt="JPEG")
    stored = Image.open(io.BytesIO(data)).convert("RGB")  # the pixels as stored, EXIF ignored
    decoded = imaging.decode(data)
    assert decoded.rgb.size == upright.size
    shown = np.asarray(decoded.rgb, dtype=float)
    assert np.abs(shown - np.asarray(upright, dtype=float)).mean() < 4.0
    if stored.size == upright.size:  # a half turn: the stored pixels differ from what is shown
        assert np.abs(np.asarray(stored, dtype=float) - np.asarray(upright, dtype=float)).mean() > 10.0


def test_large_jpeg_is_decoded_reduced_but_not_below_min_side() -> None:
    decoded = imaging.decode(ODD["jpeg_large_draft"], min_side=512)
    assert decoded.original_size == (1600, 1600)
    assert 512 <= min(decoded.rgb.size) < 1600
