"""When not to trust an answer: calibration, distance from the calibration data, photo quality.

Small pure functions on NumPy arrays (and one on a Pillow image), no settings:

- ``fit_temperature`` / ``calibrated``: temperature scaling of the logits, fitted by NLL;
- ``DistributionModel``: how far a photo's pooled features (the feature map averaged over space)
  lie from the calibration data: class-conditional Mahalanobis distance with one shared covariance,
  kept as its top principal directions plus an isotropic residual (a few MB even at 1280 channels),
  divided by the channel count; higher = further;
- ``abstention_threshold``: the confidence below which an answer is "uncertain";
- metrics for ``evaluate``: ECE, NLL, balanced accuracy, recalls, one-vs-rest AUROC;
- ``photo_quality``: blur (variance of the Laplacian), exposure and resolution, on a small grey copy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

EPS = 1e-12
ECE_BINS = 15
# the share of the calibration data whose distribution score is inside the threshold
IN_DISTRIBUTION_SHARE = 0.95
DEFAULT_TARGET_ACCURACY = 0.9
# an uncalibrated bundle calls an answer "confident" above this (softmax is overconfident: be wary)
UNCALIBRATED_CONFIDENCE = 0.8
MAX_RANK = 256


# --- calibration -----------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, stable."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def calibrated(logits: np.ndarray, *, temperature: float, output: str, binary: bool) -> np.ndarray:
    """What the model reports, from logits divided by ``temperature`` (binary: [1 - p, p])."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if binary:
        p = 1.0 / (1.0 + np.exp(-z[..., 0]))
        return np.stack([1.0 - p, p], axis=-1)
    if output == "sigmoid":
        return np.asarray(1.0 / (1.0 + np.exp(-z)))
    return softmax(z)


def nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels."""
    p = np.asarray(probabilities, dtype=np.float64)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.mean(np.log(np.clip(p, EPS, 1.0))))


def ece(probabilities: np.ndarray, labels: np.ndarray, *, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-1 confidence, ``bins`` equal-width bins."""
    p = np.asarray(probabilities, dtype=np.float64)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high) if low > 0 else (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, output: str, binary: bool) -> float:
    """The temperature minimising NLL: golden-section search on log T over [0.05, 20].

    A weak prior on log T (a standard normal, i.e. ``(log T)^2 / 2`` over the N images) keeps the fit
    finite when the calibration data are separated without error: NLL alone then keeps falling as
    T goes to 0, and a held-out mistake becomes infinitely confident. With real errors in the data
    the prior moves T by a fraction of a percent.
    """
    n = max(1, len(labels))

    def loss(log_t: float) -> float:
        p = calibrated(logits, temperature=math.exp(log_t), output=output, binary=binary)
        return nll(p, labels) + log_t * log_t / (2.0 * n)

    low, high = math.log(0.05), math.log(20.0)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    for _ in range(80):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    return float(math.exp((low + high) / 2.0))


def abstention_threshold(
    probabilities: np.ndarray, labels: np.ndarray, *, target_accuracy: float = DEFAULT_TARGET_ACCURACY
) -> tuple[float, float, float]:
    """(threshold, coverage, accuracy): the lowest confidence cut whose accepted answers reach the target.

    Answers with top-1 probability >= threshold are "confident". When no cut reaches the target the
    threshold is 1.0 (nothing is confident) and coverage 0.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == np.asarray(labels)
    order = np.argsort(-confidence, kind="stable")
    hits = np.cumsum(correct[order])
    accuracy = hits / np.arange(1, len(order) + 1)
    good = np.flatnonzero(accuracy >= target_accuracy)
    if good.size == 0:
        return 1.0, 0.0, 0.0
    last = int(good[-1])
    return float(confidence[order][last]), float((last + 1) / len(order)), float(accuracy[last])


# --- distance from the calibration data ----------------------------------------------------------------


def pooled(feature_map: np.ndarray) -> np.ndarray:
    """The feature map averaged over space: one value per channel, (C,)."""
    a = np.asarray(feature_map, dtype=np.float64)
    return np.asarray(a.reshape(-1, a.shape[-1]).mean(axis=0))


@dataclass(frozen=True)
class DistributionModel:
    """Class means and a shared covariance (top ``rank`` directions + residual) of pooled features."""

    means: np.ndarray  # (K, C)
    components: np.ndarray  # (r, C), orthonormal rows
    variances: np.ndarray  # (r,), the covariance's eigenvalues along the components
    residual_variance: float  # the mean eigenvalue of everything else
    threshold: float  # scores above it are "out"

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, *, rank: int | None = None) -> DistributionModel:
        """Fit on (N, C) pooled features and their labels; the threshold is left at infinity."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels)
        classes = np.unique(y)
        means = np.zeros((int(classes.max()) + 1, x.shape[1]))
        centred = np.empty_like(x)
        for k in classes:
            means[k] = x[y == k].mean(axis=0)
            centred[y == k] = x[y == k] - means[k]
        present = np.zeros(len(means), dtype=bool)
        present[classes] = True
        means[~present] = np.nan  # a class with no calibration image has no mean: never nearest
        covariance = centred.T @ centred / max(1, len(x) - len(classes))
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
        floor = max(float(eigenvalues.max(initial=0.0)) * 1e-6, EPS)
        r = min(rank or MAX_RANK, max(1, len(x) - len(classes)), x.shape[1])
        rest = eigenvalues[r:]
        residual = float(max(rest.mean(), floor)) if rest.size else floor
        return cls(
            means=means,
            components=np.ascontiguousarray(eigenvectors[:, :r].T),
            variances=np.maximum(eigenvalues[:r], max(residual, floor)),
            residual_variance=residual,
            threshold=math.inf,
        )

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean, per channel, for (N, C) features."""
        x = np.atleast_2d(np.asarray(features, dtype=np.float64))
        best = np.full(len(x), np.inf)
        for mean in self.means:
            if np.isnan(mean).any():
                continue
            d = x - mean
            along = d @ self.components.T  # (N, r)
            inside = np.sum(along**2 / self.variances, axis=1)
            residual = np.maximum(np.sum(d**2, axis=1) - np.sum(along**2, axis=1), 0.0)
            best = np.minimum(best, inside + residual / self.residual_variance)
        return np.asarray(best / x.shape[1])

    def score(self, feature: np.ndarray) -> float:
        """:meth:`scores` for one (C,) feature vector."""
        return float(self.scores(feature[np.newaxis])[0])

    def with_threshold(self, threshold: float) -> DistributionModel:
        """The same statistics with ``threshold``."""
        return DistributionModel(
            self.means, self.components, self.variances, self.residual_variance, threshold
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for the bundle's ``calibration.npz`` (float32)."""
        return {
            "means": self.means.astype(np.float32),
            "components": self.components.astype(np.float32),
            "variances": self.variances.astype(np.float32),
            "residual_variance": np.asarray([self.residual_variance], dtype=np.float32),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], *, threshold: float) -> DistributionModel:
        """Back from :meth:`to_arrays`; KeyError/ValueError when an array is missing or misshapen."""
        means = np.asarray(arrays["means"], dtype=np.float64)
        components = np.asarray(arrays["components"], dtype=np.float64)
        variances = np.asarray(arrays["variances"], dtype=np.float64)
        residual = float(np.asarray(arrays["residual_variance"]).reshape(-1)[0])
        if means.ndim != 2 or components.ndim != 2 or components.shape[1] != means.shape[1]:
            raise ValueError(
                f"expected means (K, C) and components (r, C), found {means.shape}, {components.shape}"
            )
        if variances.shape != (components.shape[0],) or not (residual > 0 and np.all(variances > 0)):
            raise ValueError("expected one positive variance per component and a positive residual variance")
        return cls(means, components, variances, residual, threshold)


def cross_fitted_threshold(
    features: np.ndarray, labels: np.ndarray, *, share: float = IN_DISTRIBUTION_SHARE, seed: int = 0
) -> float:
    """The ``share`` quantile of scores that each half of the data gets from statistics fitted on the other.

    Scoring the data the statistics were fitted on would put the threshold too low (every point pulls
    its own class mean and covariance towards itself); two-fold cross-fitting does not.
    """
    x, y = np.asarray(features), np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(x))
    halves = (order[: len(x) // 2], order[len(x) // 2 :])
    held_out = []
    for fit_part, score_part in (halves, halves[::-1]):
        held_out.append(DistributionModel.fit(x[fit_part], y[fit_part]).scores(x[score_part]))
    return float(np.quantile(np.concatenate(held_out), share))


# --- evaluation --------------------------------------------------------------------------------------


def auroc(positive: Sequence[float] | np.ndarray, negative: Sequence[float] | np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half): Mann-Whitney U / (n m)."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return math.nan
    both = np.concatenate([pos, neg])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both))
    sorted_values = both[order]
    i = 0
    while i < len(both):  # average ranks over ties
        j = i
        while j + 1 < len(both) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def recalls(probabilities: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Recall of each class (NaN for a class with no example)."""
    predicted = np.asarray(probabilities).argmax(axis=1)
    y = np.asarray(labels)
    out = np.full(n_classes, np.nan)
    for k in range(n_classes):
        if np.any(y == k):
            out[k] = float(np.mean(predicted[y == k] == k))
    return out


def one_vs_rest_auroc(probabilities: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """AUROC of each class's probability, that class against the rest (NaN when one side is empty)."""
    p, y = np.asarray(probabilities), np.asarray(labels)
    return np.array([auroc(p[y == k, k], p[y != k, k]) for k in range(n_classes)])


# --- photo quality -----------------------------------------------------------------------------------

QUALITY_SIDE = 256
BLUR_THRESHOLD = 30.0  # variance of the Laplacian at 256 px: synthetic photos 80-235, blurred 3-20
# the brightest tenth of the photo still darker than this: too dark. Kept low on purpose: darker skin
# is darker, and a photo of it must not be called underexposed (generated skin of every tone: p90 >= 79)
DARK_P90 = 60.0
BRIGHT_SHARE = 0.3  # more than this share of pixels at 250+: too bright (blown out)
BRIGHT_P10 = 225.0  # or even the darkest tenth this bright: washed out


def percentiles(values: np.ndarray, qs: tuple[float, ...]) -> tuple[float, ...]:
    """``np.percentile(values, qs)`` with its default (linear) method, from one sort.

    NumPy 2.4's percentile imports ``numpy.ma`` on first use (0.1 CPU-s, a sixth of a cold start,
    paid by the first request); this does not.
    """
    ordered = np.sort(np.asarray(values, dtype=np.float64), axis=None)
    if ordered.size == 0:
        raise ValueError("expected values to take percentiles of, found none")
    out = []
    for q in qs:
        position = (ordered.size - 1) * q / 100.0
        below = int(np.floor(position))
        above = min(below + 1, ordered.size - 1)
        fraction = position - below
        out.append(float(ordered[below] + (ordered[above] - ordered[below]) * fraction))
    return tuple(out)


def photo_quality(
    image: Image.Image, *, original_size: tuple[int, int], input_size: tuple[int, int]
) -> dict[str, Any]:
    """``{"status": "ok"|"poor", "issues": [...], "measured": {...}}`` from a grey copy of <= 256 px.

    Issues: ``blurry`` (variance of the Laplacian under BLUR_THRESHOLD), ``too_dark``,
    ``too_bright``, ``low_resolution`` (fewer pixels than the model's input).
    """
    grey = image.convert("L")
    if max(grey.size) > QUALITY_SIDE:
        grey.thumbnail((QUALITY_SIDE, QUALITY_SIDE), Image.Resampling.BOX)
    a = np.asarray(grey, dtype=np.float32)
    if min(a.shape) >= 3:
        laplacian = -4.0 * a[1:-1, 1:-1] + a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:]
        sharpness = float(laplacian.var())
    else:
        sharpness = 0.0
    p10, p90 = percentiles(a, (10.0, 90.0))
    blown = float(np.mean(a >= 250.0))
    pixels = int(original_size[0]) * int(original_size[1])
    issues = []
    if sharpness < BLUR_THRESHOLD:
        issues.append("blurry")
    if p90 < DARK_P90:
        issues.append("too_dark")
    if blown > BRIGHT_SHARE or p10 >= BRIGHT_P10:
        issues.append("too_bright")
    if pixels < input_size[0] * input_size[1]:
        issues.append("low_resolution")
    return {
        "status": "poor" if issues else "ok",
        "issues": issues,
        "measured": {
            "sharpness": round(sharpness, 1),
            "brightness_p10": round(p10, 1),
            "brightness_p90": round(p90, 1),
            "blown_out_share": round(blown, 4),
            "pixels": pixels,
            "model_input_pixels": int(input_size[0] * input_size[1]),
        },
    }


# --- what a calibrated bundle carries ------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """A bundle's calibration: the temperature, the confidence threshold, the distribution statistics.

    ``section`` is the manifest's ``calibration`` object as written (method, data, figures).
    """

    temperature: float
    confidence_threshold: float
    distribution: DistributionModel | None
    section: Mapping[str, Any]

    @classmethod
    def from_manifest(cls, section: Any, arrays: Mapping[str, np.ndarray] | None) -> Calibration:
        """Parse the manifest's section and ``calibration.npz``; ValueError/KeyError/TypeError when malformed."""
        if not isinstance(section, Mapping):
            raise TypeError(
                f"expected the calibration section to be an object, found {type(section).__name__}"
            )
        temperature = float(section["temperature"])
        threshold = float(section["confidence"]["threshold"])
        if not (math.isfinite(temperature) and temperature > 0 and 0.0 <= threshold <= 1.0):
            raise ValueError(
                f"expected temperature > 0 and a threshold in [0, 1], found {temperature}, {threshold}"
            )
        distribution = None
        if section.get("distribution") is not None:
            if arrays is None:
                raise KeyError("calibration.npz")
            distribution = DistributionModel.from_arrays(
                arrays, threshold=float(section["distribution"]["threshold"])
            )
        return cls(temperature, threshold, distribution, dict(section))
