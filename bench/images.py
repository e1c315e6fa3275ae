"""Phone-size test photos: a synthetic skin image (dermal_fn.demo.synth) upscaled, with sensor grain."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from dermal_fn.demo import synth

PHONE_SIZE = (4000, 3000)  # 12 MP, (width, height)
SMALL_SIZE = (640, 480)  # 0.3 MP


def photo_jpeg(size: tuple[int, int], *, seed: int = 0, quality: int = 90) -> bytes:
    """A JPEG of ``size`` (width, height): a seeded synthetic spot on skin, upscaled, with grain."""
    rng = np.random.default_rng(seed)
    sample = synth.generate(rng, size=512, label=synth.IRREGULAR_MULTICOLOUR, hair=True)
    width, height = size
    side = max(width, height)
    square = Image.fromarray(sample.image, mode="RGB").resize((side, side), Image.Resampling.BICUBIC)
    left, top = (side - width) // 2, (side - height) // 2
    photo = np.asarray(square.crop((left, top, left + width, top + height)), dtype=np.int16)
    # sensor grain from a tile, so a 12 MP photo compresses like one (a few MB at quality 90)
    tile = rng.integers(-7, 8, size=(500, 500, 3), dtype=np.int16)
    reps = (-(-height // 500), -(-width // 500), 1)
    grain = np.tile(tile, reps)[:height, :width]
    pixels = np.clip(photo + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def cached_photo(out_dir: Path, size: tuple[int, int]) -> bytes:
    """The photo of ``size`` from ``out_dir``, made on first use."""
    path = out_dir / f"photo_{size[0]}x{size[1]}.jpg"
    if not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(photo_jpeg(size))
        tmp.replace(path)
    return path.read_bytes()
