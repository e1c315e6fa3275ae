"""How alike two models' answers are: the numbers a quantized bundle is held to.

Pure functions on NumPy arrays: Pearson r of two Grad-CAM grids, the top-20 % region of a grid and
the IoU of two such regions. The exporter's quantization gate and ``dermal-fn compare`` both use them.
"""

from __future__ import annotations

import math

import numpy as np

TOP_REGION_SHARE = 0.2
EPS = 1e-12

__all__ = ["EPS", "TOP_REGION_SHARE", "pearson_r", "top_region", "top_region_iou"]


def pearson_r(a: np.ndarray, b: np.ndarray, *, eps: float = EPS) -> float:
    """Pearson correlation of two grids; two constant grids correlate 1 if equal, else 0."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"expected grids of one shape, found {np.shape(a)} and {np.shape(b)}")
    dx = x - x.mean()
    dy = y - y.mean()
    sx = math.sqrt(float(dx @ dx))
    sy = math.sqrt(float(dy @ dy))
    if sx <= eps or sy <= eps:
        return 1.0 if sx <= eps and sy <= eps and np.allclose(x, y) else 0.0
    return float(np.clip(float(dx @ dy) / (sx * sy), -1.0, 1.0))


def top_region(grid: np.ndarray, *, share: float = TOP_REGION_SHARE) -> np.ndarray:
    """Boolean mask of the ``share`` highest cells (at least one; ties go to the earlier cell)."""
    flat = np.asarray(grid, dtype=np.float64).ravel()
    k = max(1, math.ceil(share * flat.size - 1e-9))
    order = np.argsort(-flat, kind="stable")[:k]
    mask = np.zeros(flat.size, dtype=bool)
    mask[order] = True
    return mask.reshape(np.shape(grid))


def top_region_iou(a: np.ndarray, b: np.ndarray, *, share: float = TOP_REGION_SHARE) -> float:
    """Intersection over union of the two grids' top-``share`` regions."""
    ra = top_region(a, share=share)
    rb = top_region(b, share=share)
    union = int(np.count_nonzero(ra | rb))
    return float(np.count_nonzero(ra & rb)) / union if union else 1.0
