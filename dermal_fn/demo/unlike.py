"""Images unlike skin, for out-of-distribution checks: text, flat colour, noise, shapes, patterns, gradients.

    save_unlike(folder, n, seed=0)  # n files, the kinds in turn, seeded

Nothing here resembles a skin photo on purpose: a calibrated bundle should call these ``out``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

Painter = Callable[[np.random.Generator, int], Image.Image]


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in rng.integers(0, 256, size=3))
    return r, g, b


def text(rng: np.random.Generator, size: int) -> Image.Image:
    """Dark lines of letters on a light page, like a photographed document."""
    image = Image.new("RGB", (size, size), (int(rng.integers(225, 256)),) * 3)
    draw = ImageDraw.Draw(image)
    letters = "abcdefghijklmnopqrstuvwxyz      ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;"
    step = max(10, size // 16)
    for y in range(step // 2, size - step // 2, step):
        line = "".join(letters[int(i)] for i in rng.integers(0, len(letters), size=size // 5))
        draw.text((int(rng.integers(2, 12)), y), line, fill=(int(rng.integers(0, 60)),) * 3)
    return image


def flat(rng: np.random.Generator, size: int) -> Image.Image:
    """One colour, any colour."""
    return Image.new("RGB", (size, size), _colour(rng))


def noise(rng: np.random.Generator, size: int) -> Image.Image:
    """Uniform RGB noise."""
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), mode="RGB")


def shapes(rng: np.random.Generator, size: int) -> Image.Image:
    """Saturated rectangles, ellipses and lines on a plain background."""
    image = Image.new("RGB", (size, size), _colour(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0, x1, y1 = sorted(rng.integers(0, size, size=2).tolist()) + sorted(
            rng.integers(0, size, size=2).tolist()
        )
        box = (min(x0, y0), min(x1, y1), max(x0, y0) + 2, max(x1, y1) + 2)
        kind = int(rng.integers(3))
        if kind == 0:
            draw.rectangle(box, fill=_colour(rng))
        elif kind == 1:
            draw.ellipse(box, fill=_colour(rng))
        else:
            draw.line(box, fill=_colour(rng), width=int(rng.integers(2, 8)))
    return image


def pattern(rng: np.random.Generator, size: int) -> Image.Image:
    """Stripes or a checkerboard in two colours."""
    cells = int(rng.integers(4, 24))
    rows, cols = np.indices((size, size)) * cells // size
    grid = (rows + cols) % 2 if rng.random() < 0.5 else cols % 2
    a, b = np.array(_colour(rng), dtype=np.uint8), np.array(_colour(rng), dtype=np.uint8)
    return Image.fromarray(np.where(grid[..., None] == 1, a, b).astype(np.uint8), mode="RGB")


def gradient(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth ramp between two colours."""
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :, None]
    a, b = np.array(_colour(rng), dtype=np.float32), np.array(_colour(rng), dtype=np.float32)
    ramp = np.broadcast_to(a + (b - a) * t, (size, size, 3))
    return Image.fromarray(np.rint(ramp).astype(np.uint8), mode="RGB")


KINDS: dict[str, Painter] = {
    "text": text,
    "flat": flat,
    "noise": noise,
    "shapes": shapes,
    "pattern": pattern,
    "gradient": gradient,
}


def save_unlike(folder: str | Path, n: int, *, seed: int = 0, size: int = 256) -> list[Path]:
    """Write ``n`` such images as ``00003_shapes.png`` into ``folder``, the kinds in turn; the paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(KINDS)
    paths = []
    for index in range(n):
        kind = names[index % len(names)]
        path = out / f"{index:05d}_{kind}.png"
        KINDS[kind](rng, size).save(path, format="PNG")
        paths.append(path)
    return paths
