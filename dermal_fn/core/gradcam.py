"""Grad-CAM numbers: pool the gradient, weight the channels, ReLU, normalise.

Pure functions on NumPy arrays, as in the keras-io Grad-CAM example; rendering lives in
:mod:`dermal_fn.core.render`.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def channel_weights(gradient: np.ndarray) -> np.ndarray:
    """Mean of d(score)/d(feature map) over the spatial axes: one weight per channel."""
    g = np.asarray(gradient, dtype=np.float64)
    if g.ndim == 4:
        g = g[0]
    return np.asarray(g.mean(axis=(0, 1)))


def normalise(cam: np.ndarray, *, eps: float = EPS) -> np.ndarray:
    """ReLU then divide by the maximum; an all-non-positive map stays all zeros, never NaN."""
    cam = np.maximum(np.nan_to_num(np.asarray(cam, dtype=np.float64), nan=0.0), 0.0)
    peak = float(cam.max()) if cam.size else 0.0
    if peak <= eps:
        return np.zeros_like(cam)
    return np.asarray(cam / peak)


def grad_cam(feature_map: np.ndarray, gradient: np.ndarray) -> np.ndarray:
    """Grad-CAM grid (h, w) in [0, 1] from a feature map and its gradient, (h, w, c) or (1, h, w, c)."""
    a = np.asarray(feature_map, dtype=np.float64)
    if a.ndim == 4:
        a = a[0]
    weights = channel_weights(gradient)
    return normalise(np.tensordot(a, weights, axes=([2], [0])))
