"""The numbers of an explanation and fairness audit: faithfulness curves, rank correlation, skin tone.

Pure functions on NumPy arrays, no model inside:

- :func:`occlusion_steps` and :func:`curve_auc`: the deletion and insertion curves (Petsiuk et al.
  2018). Cells of the heatmap's grid are removed from the model's input (deletion: replaced by a
  neutral fill) or added to a neutral start (insertion), most important first; the class
  probability is tracked and the area under the curve taken over the fraction of cells. A faithful
  map makes the probability fall fast (low deletion AUC) and rise fast (high insertion AUC).
- :func:`random_map`, :func:`centre_map`: the baselines a heatmap must beat.
- :func:`spearman`: rank correlation of two maps (the model-randomization sanity check, Adebayo et
  al. 2018: a map that does not change when the model's weights are randomized does not explain it).
- :func:`ita` and :func:`ita_band`: the individual typology angle of skin in CIELAB,
  ITA° = arctan((L* − 50) / b*) · 180/π, and its six bands by the usual cut points (Chardon 1991).
"""

from __future__ import annotations

import numpy as np

# (name, lower bound exclusive, upper bound inclusive) in degrees, lightest first
ITA_BANDS: tuple[tuple[str, float, float], ...] = (
    ("very_light", 55.0, 90.0),
    ("light", 41.0, 55.0),
    ("intermediate", 28.0, 41.0),
    ("tan", 19.0, 28.0),
    ("brown", 10.0, 19.0),
    ("dark", -90.0, 10.0),
)
EPS = 1e-12


def cell_order(grid: np.ndarray) -> np.ndarray:
    """The grid's cells, most important first (ties keep reading order): flat indices."""
    return np.argsort(-np.asarray(grid, dtype=np.float64).ravel(), kind="stable")


def cell_masks(grid_shape: tuple[int, int], image_shape: tuple[int, int]) -> np.ndarray:
    """For each grid cell, the image pixels it covers: (cells, H, W) bool (the grid stretched to the image)."""
    h, w = grid_shape
    height, width = image_shape
    rows = np.minimum((np.arange(height) * h) // height, h - 1)
    cols = np.minimum((np.arange(width) * w) // width, w - 1)
    cell_of_pixel = rows[:, None] * w + cols[None, :]
    return np.asarray(cell_of_pixel[None] == np.arange(h * w)[:, None, None])


def occlusion_steps(
    pixels: np.ndarray, fill: np.ndarray, grid: np.ndarray, *, steps: int, insertion: bool
) -> np.ndarray:
    """The ``steps + 1`` inputs of a deletion (or insertion) curve, shape (steps + 1, H, W, 3).

    ``pixels`` and ``fill`` are model inputs of one shape ((1, H, W, 3) or (H, W, 3)). Step k has the
    k/steps most important cells of ``grid`` taken from ``fill`` (deletion) or from ``pixels``
    while the rest is ``fill`` (insertion).
    """
    height, width, channels = (int(n) for n in np.shape(pixels)[-3:])
    image = np.asarray(pixels, dtype=np.float32).reshape(height, width, channels)
    neutral = np.asarray(fill, dtype=np.float32).reshape(height, width, channels)
    rows, cols = (int(n) for n in np.shape(grid))
    masks = cell_masks((rows, cols), (height, width))
    order = cell_order(grid)
    out = np.empty((steps + 1, *image.shape), dtype=np.float32)
    for k in range(steps + 1):
        chosen = order[: round(k * len(order) / steps)]
        covered = (
            masks[chosen].any(axis=0)[..., None] if len(chosen) else np.zeros((*image.shape[:2], 1), bool)
        )
        if insertion:
            out[k] = np.where(covered, image, neutral)
        else:
            out[k] = np.where(covered, neutral, image)
    return out


def curve_auc(values: np.ndarray) -> float:
    """Area under a curve sampled at equal steps over [0, 1] (trapezoids)."""
    y = np.asarray(values, dtype=np.float64)
    if y.size < 2:
        return float(y.mean()) if y.size else 0.0
    return float(np.sum((y[1:] + y[:-1]) / 2.0) / (y.size - 1))


def random_map(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A map with no information: uniform random cells."""
    return rng.random(shape)


def centre_map(shape: tuple[int, int]) -> np.ndarray:
    """A centre prior: a Gaussian bump in the middle (what a photographer's framing alone would give)."""
    h, w = shape
    rows = (np.arange(h) + 0.5) / h - 0.5
    cols = (np.arange(w) + 0.5) / w - 0.5
    return np.asarray(np.exp(-(rows[:, None] ** 2 + cols[None, :] ** 2) / (2 * 0.25**2)))


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    x = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    out = np.empty(x.size, dtype=np.float64)
    start = 0
    while start < x.size:
        end = start
        while end + 1 < x.size and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        out[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (0 when either is constant)."""
    ra, rb = ranks(a), ranks(b)
    if ra.shape != rb.shape:
        raise ValueError(f"expected maps of one shape, found {np.shape(a)} and {np.shape(b)}")
    da, db = ra - ra.mean(), rb - rb.mean()
    denominator = float(np.sqrt((da @ da) * (db @ db)))
    return float(da @ db / denominator) if denominator > EPS else 0.0


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0-255, D65) to CIELAB (L* 0-100, a*, b*); the last axis holds the three channels."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1
    )


def ita(rgb_pixels: np.ndarray) -> float:
    """The ITA° of skin pixels (N, 3) in sRGB: from their median L* and median b*."""
    lab = srgb_to_lab(np.asarray(rgb_pixels).reshape(-1, 3))
    lightness, yellow = float(np.median(lab[:, 0])), float(np.median(lab[:, 2]))
    return float(np.degrees(np.arctan2(lightness - 50.0, max(yellow, EPS))))


def ita_band(angle: float) -> str:
    """The band of an ITA° (very_light > 55 ≥ light > 41 ≥ intermediate > 28 ≥ tan > 19 ≥ brown > 10 ≥ dark)."""
    for name, low, high in ITA_BANDS:
        if low < angle <= high:
            return name
    return "very_light" if angle > 90.0 else "dark"


def skin_pixels(rgb: np.ndarray, heatmap: np.ndarray | None = None, *, inner: float = 0.55) -> np.ndarray:
    """Pixels of an (H, W, 3) photo likely to be skin, not lesion: within ``inner`` of the half-diagonal
    from the centre (a dermoscope's dark rim left out) and, given the heatmap (upsampled to the photo),
    where it is below its median (the model did not look there)."""
    image = np.asarray(rgb)
    height, width = image.shape[:2]
    rows = (np.arange(height) + 0.5)[:, None] - height / 2
    cols = (np.arange(width) + 0.5)[None, :] - width / 2
    keep = np.hypot(rows, cols) <= inner * np.hypot(height / 2, width / 2)
    if heatmap is not None:
        heat = np.asarray(heatmap, dtype=np.float64)
        keep &= heat <= np.median(heat[keep]) if keep.any() else heat <= np.median(heat)
    chosen = image[keep]
    return chosen if len(chosen) else image.reshape(-1, 3)
