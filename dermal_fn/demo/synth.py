"""Synthetic, dermoscopy-like images of skin with drawn spots, for the demo model.

Each image is skin of a random tone (low-frequency shading, fine texture, an optional dermoscope
vignette, optional dark hairs) with at most one drawn spot. The label says what is drawn, never a
diagnosis:

    no_lesion                   skin only
    round_uniform_spot          near-circular spot of one brown tone with a smooth border
    irregular_multicolour_spot  wobbly border, blotches of 2-3 colours
    oval_spot_with_halo         oval medium-brown centre inside a lighter, pinkish ring

Spot size and position, skin, shading, vignette and hair are drawn from the same distributions for
every class, so only the spot itself tells the classes apart. NumPy and Pillow only: this module is
used at test and benchmark time, where TensorFlow is not installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

LABELS: tuple[str, ...] = (
    "no_lesion",
    "round_uniform_spot",
    "irregular_multicolour_spot",
    "oval_spot_with_halo",
)
NO_LESION, ROUND_UNIFORM, IRREGULAR_MULTICOLOUR, OVAL_WITH_HALO = range(len(LABELS))
SPOT_CLASSES: tuple[int, ...] = (ROUND_UNIFORM, IRREGULAR_MULTICOLOUR, OVAL_WITH_HALO)

HAIR_PROBABILITY = 0.3
CENTRE_RANGE = (0.25, 0.75)  # spot centre, as a fraction of the side
OUTER_RADIUS_RANGE = (0.08, 0.22)  # farthest drawn spot pixel from its centre, fraction of the side

# Skin tones from very light to dark (roughly Fitzpatrick I to VI), interpolated piecewise; a tone is
# a position in [0, 5] along them (0 very light, 5 dark)
ALL_TONES = (0.0, 5.0)
_SKIN_TONES = np.array(
    [
        [243, 220, 200],
        [232, 196, 170],
        [208, 164, 130],
        [180, 130, 95],
        [140, 95, 65],
        [100, 66, 48],
    ],
    dtype=np.float32,
)
# Pigments as per-channel factors on the local skin colour, so contrast holds on every tone.
_LIGHT_BROWN = np.array([0.72, 0.58, 0.50], dtype=np.float32)
_DARK_BROWN = np.array([0.50, 0.38, 0.32], dtype=np.float32)
_MEDIUM_BROWN = np.array([0.60, 0.46, 0.38], dtype=np.float32)
_BLACKISH = np.array([0.30, 0.22, 0.19], dtype=np.float32)
_REDDISH = np.array([0.86, 0.46, 0.45], dtype=np.float32)
_BLUE_GREY_ON_LUMINANCE = np.array([0.52, 0.60, 0.76], dtype=np.float32)
_PINK_TINT = np.array([1.0, 0.83, 0.85], dtype=np.float32)
_HAIR_COLOUR = np.array([42, 31, 26], dtype=np.float32)
_LUMINANCE_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True, eq=False)
class Sample:
    """One generated image with what was drawn on it."""

    image: np.ndarray  # uint8, (size, size, 3), RGB
    label: int  # index into LABELS
    mask: np.ndarray  # bool, (size, size): the spot's pixels, all False for no_lesion
    centre: tuple[int, int] | None  # (row, col) of the spot, None for no_lesion
    hair: bool  # whether hairs were drawn


class Batch(NamedTuple):
    """Images, labels and spot masks of a generated set, in matching order."""

    images: np.ndarray  # uint8, (n, size, size, 3)
    labels: np.ndarray  # int64, (n,)
    masks: np.ndarray  # bool, (n, size, size)


def generate(
    rng: np.random.Generator,
    *,
    size: int = 128,
    label: int | None = None,
    hair: bool | None = None,
    tones: tuple[float, float] = ALL_TONES,
) -> Sample:
    """Draw one image of skin, with the spot of class `label` (random when None).

    `hair` forces hairs on or off; None draws them with probability HAIR_PROBABILITY. Hairs are
    drawn last, so the same generator state with hair on and off gives the same image apart from
    the hair pixels. ``tones`` limits the skin to a part of the range (a light-skin-only data set).
    """
    if size < 32:
        raise ValueError(f"expected size >= 32 pixels, found {size}")
    if label is None:
        label = int(rng.integers(len(LABELS)))
    elif not 0 <= label < len(LABELS):
        raise ValueError(f"expected a label index in [0, {len(LABELS)}), found {label}")
    hair_drawn = bool(rng.random() < HAIR_PROBABILITY) if hair is None else hair
    if hair is not None:
        rng.random()  # keep the stream aligned with the hair=None case

    rows = np.arange(size, dtype=np.float32)[:, None] + 0.5
    cols = np.arange(size, dtype=np.float32)[None, :] + 0.5
    image = _skin(rng, size=size, rows=rows, cols=cols, tones=tones)

    mask = np.zeros((size, size), dtype=bool)
    centre: tuple[int, int] | None = None
    if label != NO_LESION:
        centre_row, centre_col = (float(v) * size for v in rng.uniform(*CENTRE_RANGE, size=2))
        outer_radius = float(rng.uniform(*OUTER_RADIUS_RANGE)) * size
        angle = float(rng.uniform(0.0, np.pi))
        cos_angle, sin_angle = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        dy = rows - np.float32(centre_row)
        dx = cols - np.float32(centre_col)
        along = dx * cos_angle + dy * sin_angle
        across = dy * cos_angle - dx * sin_angle
        spot = _SpotFrame(along=along, across=across, outer_radius=outer_radius)
        draw_spot = _SPOT_PAINTERS[label]
        image, mask = draw_spot(rng, image, spot)
        centre = (round(centre_row - 0.5), round(centre_col - 0.5))

    image = _vignette(rng, image, rows=rows, cols=cols, size=size)
    image = image + _grain(rng, (size, size, 1), spread=4.0) + _grain(rng, image.shape, spread=2.0)
    if hair_drawn:
        image = _hairs(rng, image, size=size)
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Sample(image=pixels, label=label, mask=mask, centre=centre, hair=hair_drawn)


def generate_batch(
    n: int,
    *,
    seed: int,
    size: int = 128,
    classes: Sequence[int] | None = None,
    tones: tuple[float, float] = ALL_TONES,
) -> Batch:
    """Draw `n` images balanced over `classes` (default all LABELS), the same for the same seed.

    Class counts differ by at most one; the order is shuffled.
    """
    if n < 0:
        raise ValueError(f"expected a non-negative image count, found {n}")
    class_indices = np.arange(len(LABELS)) if classes is None else np.asarray(classes, dtype=np.int64)
    if class_indices.size == 0 or not np.all((class_indices >= 0) & (class_indices < len(LABELS))):
        raise ValueError(f"expected class indices in [0, {len(LABELS)}), found {list(class_indices)}")
    rng = np.random.default_rng(seed)
    labels = class_indices[rng.permutation(np.arange(n) % class_indices.size)]
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=bool)
    for index, label in enumerate(labels):
        sample = generate(rng, size=size, label=int(label), tones=tones)
        images[index] = sample.image
        masks[index] = sample.mask
    return Batch(images=images, labels=labels.astype(np.int64), masks=masks)


def save_folder(
    directory: Path | str,
    n: int,
    *,
    seed: int,
    size: int = 128,
    fmt: Literal["jpeg", "png"] = "jpeg",
) -> list[Path]:
    """Write `n` generated images as `00012_round_uniform_spot.jpg` into `directory`; the paths."""
    if fmt not in ("jpeg", "png"):
        raise ValueError(f"expected fmt 'jpeg' or 'png', found {fmt!r}")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".jpg" if fmt == "jpeg" else ".png"
    batch = generate_batch(n, seed=seed, size=size)
    paths: list[Path] = []
    for index, (pixels, label) in enumerate(zip(batch.images, batch.labels, strict=True)):
        path = folder / f"{index:05d}_{LABELS[int(label)]}{suffix}"
        if fmt == "jpeg":
            Image.fromarray(pixels).save(path, format="JPEG", quality=95)
        else:
            Image.fromarray(pixels).save(path, format="PNG")
        paths.append(path)
    return paths


@dataclass(frozen=True)
class _SpotFrame:
    """Pixel coordinates in the spot's rotated frame, in pixels from its centre."""

    along: np.ndarray  # along the major axis
    across: np.ndarray  # along the minor axis
    outer_radius: float  # no drawn pixel of the spot lies farther than this from the centre

    def polar(self, *, radius: float, aspect: float) -> tuple[np.ndarray, np.ndarray]:
        """Elliptic radius (1 on the ellipse with semi-axes radius, radius*aspect) and angle."""
        u = self.along / np.float32(radius)
        v = self.across / np.float32(radius * aspect)
        return np.hypot(u, v), np.arctan2(v, u)


def _smooth_noise(rng: np.random.Generator, *, size: int, cells: int) -> np.ndarray:
    """Standard-normal noise on a `cells`-square grid, bicubically upsampled to `size` square."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    upsampled = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(upsampled, dtype=np.float32)


def _grain(rng: np.random.Generator, shape: tuple[int, ...], *, spread: float) -> np.ndarray:
    """Zero-mean uniform pixel noise in [-spread, spread]: cheaper than Gaussian, looks the same."""
    return np.float32(2 * spread) * (rng.random(shape, dtype=np.float32) - np.float32(0.5))


def _soft_inside(rho: np.ndarray, boundary: np.ndarray | float, *, edge: float) -> np.ndarray:
    """Coverage in [0, 1]: 1 well inside `boundary`, 0 past it by half an `edge`, smooth between."""
    t = np.clip((boundary - rho) / np.float32(edge) + np.float32(0.5), 0.0, 1.0)
    return t * t * (np.float32(3.0) - np.float32(2.0) * t)


def _skin(
    rng: np.random.Generator,
    *,
    size: int,
    rows: np.ndarray,
    cols: np.ndarray,
    tones: tuple[float, float] = ALL_TONES,
) -> np.ndarray:
    """Skin of a random tone within ``tones`` with low-frequency shading and mid-frequency texture, float RGB."""
    position = float(rng.uniform(*tones))
    lower = min(int(position), len(_SKIN_TONES) - 2)
    tone = _SKIN_TONES[lower] + (position - lower) * (_SKIN_TONES[lower + 1] - _SKIN_TONES[lower])
    tone = tone * rng.uniform(0.96, 1.04, size=3).astype(np.float32)

    slope_row, slope_col = (np.float32(v) for v in rng.uniform(-0.08, 0.08, size=2))
    lighting = 1.0 + (slope_row * (rows / size - 0.5) + slope_col * (cols / size - 0.5))
    shading = 1.0 + np.float32(0.045) * _smooth_noise(rng, size=size, cells=4)
    texture = 1.0 + np.float32(0.03) * _smooth_noise(rng, size=size, cells=max(4, size // 4))
    brightness = lighting * shading * texture
    redness = 1.0 + np.float32(0.03) * _smooth_noise(rng, size=size, cells=6)
    skin = brightness[..., None] * tone
    skin[..., 0] *= redness
    return skin


def _paint(image: np.ndarray, colour: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """Blend `colour` (RGB or per-pixel RGB) over `image` with per-pixel `coverage`."""
    alpha = coverage[..., None]
    return image * (1.0 - alpha) + colour * alpha


def _paint_round_uniform(
    rng: np.random.Generator, image: np.ndarray, spot: _SpotFrame
) -> tuple[np.ndarray, np.ndarray]:
    """A near-circular spot of one brown tone with a smooth border."""
    edge = float(rng.uniform(0.08, 0.14))
    radius = spot.outer_radius / (1.0 + edge / 2)
    rho, _ = spot.polar(radius=radius, aspect=float(rng.uniform(0.88, 1.0)))
    coverage = _soft_inside(rho, 1.0, edge=edge)
    depth = float(rng.uniform(0.0, 1.0))
    pigment = _LIGHT_BROWN + depth * (_DARK_BROWN - _LIGHT_BROWN)
    opacity = float(rng.uniform(0.85, 1.0))
    painted = _paint(image, image * pigment, coverage * opacity)
    return painted, coverage >= 0.5


def _paint_irregular_multicolour(
    rng: np.random.Generator, image: np.ndarray, spot: _SpotFrame
) -> tuple[np.ndarray, np.ndarray]:
    """A spot with a wobbly border and blotches of 2-3 colours."""
    edge = float(rng.uniform(0.03, 0.07))
    radius = spot.outer_radius / (1.0 + edge / 2)
    rho, theta = spot.polar(radius=radius, aspect=float(rng.uniform(0.72, 1.0)))
    harmonics = np.arange(2, 8, dtype=np.float32)
    amplitudes = rng.uniform(0.02, 0.1, size=harmonics.size).astype(np.float32)
    phases = rng.uniform(0.0, 2 * np.pi, size=harmonics.size).astype(np.float32)
    table_angles = np.linspace(-np.pi, np.pi, 721, dtype=np.float32)
    table = 1.0 + (amplitudes * np.cos(harmonics * table_angles[:, None] + phases)).sum(axis=1)
    table /= table.max()
    boundary = np.interp(theta, table_angles, table).astype(np.float32)
    coverage = _soft_inside(rho, boundary, edge=edge)

    size = image.shape[0]
    luminance = image @ _LUMINANCE_WEIGHTS
    palette = [
        image * _MEDIUM_BROWN,
        image * _BLACKISH,
        luminance[..., None] * _BLUE_GREY_ON_LUMINANCE,
        image * _REDDISH,
    ]
    chosen = rng.choice(len(palette), size=int(rng.integers(2, 4)), replace=False)
    cells = max(4, round(1.6 * size / spot.outer_radius))
    fields = np.stack([_smooth_noise(rng, size=size, cells=cells) for _ in chosen])
    weights = np.exp(np.float32(4.0) * (fields - fields.max(axis=0)))
    weights /= weights.sum(axis=0)
    colours = sum(
        (weights[k][..., None] * palette[int(c)] for k, c in enumerate(chosen)),
        start=np.zeros_like(image),
    )
    painted = _paint(image, colours, coverage * float(rng.uniform(0.88, 1.0)))
    return painted, coverage >= 0.5


def _paint_oval_with_halo(
    rng: np.random.Generator, image: np.ndarray, spot: _SpotFrame
) -> tuple[np.ndarray, np.ndarray]:
    """An oval medium-brown centre inside a lighter, pinkish ring."""
    halo_edge = float(rng.uniform(0.12, 0.2))
    radius = spot.outer_radius / (1.0 + halo_edge / 2)
    aspect = float(rng.uniform(0.55, 0.75))
    rho, _ = spot.polar(radius=radius, aspect=aspect)
    halo = _soft_inside(rho, 1.0, edge=halo_edge)
    inner = float(rng.uniform(0.5, 0.66))
    centre = _soft_inside(rho, inner, edge=0.08)

    lighter = image + (255.0 - image) * np.float32(rng.uniform(0.3, 0.45))
    painted = _paint(image, lighter * _PINK_TINT, halo * float(rng.uniform(0.75, 0.95)))
    pigment = _MEDIUM_BROWN * rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    painted = _paint(painted, image * pigment, centre * float(rng.uniform(0.88, 1.0)))
    return painted, halo >= 0.5


_SPOT_PAINTERS = {
    ROUND_UNIFORM: _paint_round_uniform,
    IRREGULAR_MULTICOLOUR: _paint_irregular_multicolour,
    OVAL_WITH_HALO: _paint_oval_with_halo,
}


def _vignette(
    rng: np.random.Generator, image: np.ndarray, *, rows: np.ndarray, cols: np.ndarray, size: int
) -> np.ndarray:
    """Darken the corners like a dermoscope's field of view, on about half of the images."""
    apply, strength = rng.random() < 0.5, float(rng.uniform(0.25, 0.6))
    if not apply:
        return image
    half = size / 2
    distance = np.hypot(rows - half, cols - half) / (half * np.sqrt(2.0))
    falloff = np.clip((distance - 0.6) / 0.4, 0.0, 1.0) ** 2
    return image * (1.0 - strength * falloff)[..., None]


def _hairs(rng: np.random.Generator, image: np.ndarray, *, size: int) -> np.ndarray:
    """Draw 2-12 dark, gently curved hairs over the image."""
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    steps = np.linspace(0.0, 1.0, 24, dtype=np.float64)[:, None]
    for _ in range(int(rng.integers(2, 13))):
        start = rng.uniform(-0.1, 1.1, size=2) * size
        heading = rng.uniform(0.0, 2 * np.pi)
        length = rng.uniform(0.35, 1.0) * size
        end = start + length * np.array([np.cos(heading), np.sin(heading)])
        bend = rng.normal(0.0, 0.2) * length
        control = (start + end) / 2 + bend * np.array([-np.sin(heading), np.cos(heading)])
        curve = (1 - steps) ** 2 * start + 2 * (1 - steps) * steps * control + steps**2 * end
        width = max(1, round(size / 128 * float(rng.uniform(0.8, 2.2))))
        darkness = int(rng.integers(170, 256))
        draw.line([(float(x), float(y)) for x, y in curve], fill=darkness, width=width)
    layer = layer.filter(ImageFilter.GaussianBlur(radius=0.4 * size / 128))
    coverage = np.asarray(layer, dtype=np.float32) / 255.0
    colour = _HAIR_COLOUR * np.float32(rng.uniform(0.7, 1.3))
    return _paint(image, colour, coverage)


def save_labelled(
    directory: Path | str,
    n: int,
    *,
    seed: int,
    size: int = 128,
    fmt: Literal["jpeg", "png"] = "jpeg",
    tones: tuple[float, float] = ALL_TONES,
) -> list[Path]:
    """Write ``n`` generated images into one sub-folder per label (``directory/<label>/00012.jpg``); the paths.

    The layout ``calibrate`` and ``evaluate`` read (``image_dataset_from_directory``'s).
    """
    folder = Path(directory)
    batch = generate_batch(n, seed=seed, size=size, tones=tones)
    paths: list[Path] = []
    for index, (pixels, label) in enumerate(zip(batch.images, batch.labels, strict=True)):
        sub = folder / LABELS[int(label)]
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{index:05d}.{'jpg' if fmt == 'jpeg' else 'png'}"
        Image.fromarray(pixels).save(
            path, format="JPEG" if fmt == "jpeg" else "PNG", **({"quality": 95} if fmt == "jpeg" else {})
        )
        paths.append(path)
    return paths
