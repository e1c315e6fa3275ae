"""dermal_fn.core.imaging: sniffing, bomb refusal from the header, odd-but-valid images, EXIF orientation."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from dermal_fn.core import imaging
from dermal_fn.errors import ImageTooLarge, InsufficientMemory, InvalidImage, UnsupportedMediaType
from tests import hostile_fixtures as hf

ODD = hf.odd_valid_images()
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (hf.jpeg(size=32), "JPEG"),
        (hf.png(size=32), "PNG"),
        (hf.animated("GIF")[0], "GIF"),
        (hf.animated("WEBP")[0], "WEBP"),
        (ODD["bmp"], "BMP"),
        (ODD["tiff"], "TIFF"),
        (hf.heic(), "HEIF"),
        (hf.avif(), "AVIF"),
    ],
)
def test_sniff_names_the_container_from_magic_bytes(data: bytes, kind: str) -> None:
    assert imaging.sniff(data) == kind


@pytest.mark.parametrize(
    ("data", "error", "needle"),
    [
        (hf.mp4(), UnsupportedMediaType, "a video or another ISO media file"),
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


# --- uploads built to expand (the hardening table), each decoded in a fresh process ------------------------

PEAK_SCRIPT = """
import json, sys
from pathlib import Path

from dermal_fn.core import imaging
from dermal_fn.errors import DermalError


def hwm_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024


data = Path(sys.argv[1]).read_bytes()
imaging.decode(Path(sys.argv[2]).read_bytes())  # plugins loaded, allocator warm
before = hwm_mb()
outcome = "decoded"
if sys.argv[3] == "naive":  # what the original Django app did: decode at full size, convert, float copies
    import numpy as np
    from PIL import Image
    import io
    image = Image.open(io.BytesIO(data)); image.load()
    array = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
else:
    try:
        decoded = imaging.decode(data, min_side=384)
        size = decoded.rgb.size
    except DermalError as exc:
        outcome = type(exc).__name__
print(json.dumps({"outcome": outcome, "peak_mb": hwm_mb() - before}))
"""


def decode_peak(tmp_path: Path, data: bytes, *, how: str = "ours") -> dict[str, Any]:
    """Decode ``data`` in a fresh Python; its outcome and the peak RSS it added (VmHWM, MB)."""
    upload, warmup = tmp_path / "upload.bin", tmp_path / "warmup.png"
    upload.write_bytes(data)
    warmup.write_bytes(hf.png(size=64))
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(upload), str(warmup), how],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# the decoder's buffer for each (Pillow's bytes per pixel) and what the decoder must answer
EXPANDING = {
    "grey16_png": (6000 * 4000 * 2, "decoded"),
    "rgba_png": (6000 * 4000 * 4, "decoded"),
    "float_tiff": (6000 * 4000 * 4, "decoded"),
    "cmyk_jpeg": (65_500 * 729 * 4, "ImageTooLarge"),  # no JPEG draft keeps 729 px near 384: 191 MB
    "rgb_jpeg": (65_500 * 729 * 4, "ImageTooLarge"),
}


@pytest.mark.parametrize("name", sorted(EXPANDING))
def test_expanding_upload_stays_within_its_buffer(tmp_path: Path, name: str) -> None:
    buffer_bytes, expected = EXPANDING[name]
    result = decode_peak(tmp_path, hf.expanding_images()[name])
    assert result["outcome"] == expected
    if expected == "decoded":
        # the decoder's own buffer, and little else: no full-size conversions or float copies
        assert result["peak_mb"] <= buffer_bytes / 2**20 * 1.15 + 12, result
    else:
        assert result["peak_mb"] < 8, result  # refused from the header: nothing decoded


def test_the_peak_harness_sees_a_naive_decode(tmp_path: Path) -> None:
    """The oracle for the bounds above: the original Django app's way of decoding the same RGBA upload peaks far higher."""
    naive = decode_peak(tmp_path, hf.expanding_images()["rgba_png"], how="naive")
    ours = decode_peak(tmp_path, hf.expanding_images()["rgba_png"])
    assert naive["peak_mb"] > 3 * ours["peak_mb"], (naive, ours)


@pytest.mark.parametrize("name", ["grey16_png", "rgba_png", "float_tiff"])
def test_expanding_uploads_decode_to_what_they_show(name: str) -> None:
    """Reduced before conversion, the picture is still the picture: a flat background, one flat square."""
    decoded = imaging.decode(hf.expanding_images()[name], min_side=384)
    assert decoded.original_size == hf.EXPANDING_SIZE
    assert min(decoded.rgb.size) >= 384 and max(decoded.rgb.size) <= 600
    grey = np.asarray(decoded.rgb.convert("L"), dtype=np.float64)
    h, w = grey.shape
    inside = grey[h // 3 + 5 : h // 3 + h // 5 - 5, w // 2 + 5 : w // 2 + h // 5 - 5]
    outside = grey[: h // 4, : w // 4]
    assert inside.std() < 2 and outside.std() < 2
    assert abs(inside.mean() - outside.mean()) > 10


def test_decode_budget_and_headroom_are_separate_answers() -> None:
    data = hf.expanding_images()["rgba_png"]
    with pytest.raises(ImageTooLarge, match="decodes to at most 64 MB, found 6000x4000 RGBA"):
        imaging.decode(data, max_bytes=64 * 2**20)
    with pytest.raises(InsufficientMemory, match="retry shortly"):
        imaging.decode(data, available_bytes=50 * 2**20)
    assert imaging.decode(data, available_bytes=200 * 2**20).rgb.mode == "RGB"


@pytest.mark.parametrize(
    ("size", "mode", "expected"),
    [
        ((10, 10), "L", 100),
        ((10, 10), "P", 100),
        ((10, 10), "I;16", 200),
        ((10, 10), "RGB", 400),
        ((10, 10), "F", 400),
    ],
)
def test_decoded_bytes_is_pillows_storage(size: tuple[int, int], mode: str, expected: int) -> None:
    assert imaging.decoded_bytes(size, mode) == expected
    assert len(Image.new(mode, size).tobytes()) <= expected  # never under what Pillow hands out


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_reducing_in_strips_equals_pillows_reduce(mode: str) -> None:
    rng = np.random.default_rng(3)
    bands = 4 if mode == "RGBA" else 2
    image = Image.fromarray(rng.integers(0, 256, (301, 450, bands), dtype=np.uint8), mode=mode)
    strips = imaging._reduce_in_strips(image, 3, strip_bytes=20_000)  # many strips
    np.testing.assert_array_equal(np.asarray(strips), np.asarray(image.crop((0, 0, 450, 300)).reduce(3)))
