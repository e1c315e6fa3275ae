"""The explanation and fairness audit ``evaluate`` adds: faithfulness, a sanity check, skin tone.

Run on the bundle itself, as the server runs it (no TensorFlow), image by image while ``evaluate``
goes through the folder (:class:`Auditor` is its visitor):

- **faithfulness** (the first ``images`` photos): deletion and insertion curves of the Grad-CAM map
  and, side by side, of a random map and a centre prior (:mod:`dermal_fn.core.audit`). Deletion
  replaces cells with the photo's mean colour; insertion starts from the photo blurred beyond
  recognition, so neither leaks the removed cells' content.
- **randomization** (same photos): the head's weights re-drawn (seeded, each array keeps its own
  scale); the Spearman correlation of the maps before and after. A map that explains the model
  changes when the model does (Adebayo et al. 2018).
- **skin tone** (every photo): the ITA° of the photo's skin (inside the dermoscope's rim, where the
  heatmap is low), its band, and per band the figures ``evaluate`` reports for all photos.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from dermal_fn.core import audit, render, trust
from dermal_fn.core.engine import LiteRTEngine
from dermal_fn.core.gradcam import grad_cam
from dermal_fn.core.head import Head, HeadResult

MIN_BAND_IMAGES = 20  # a band with fewer is reported, marked thin, and left out of the equity gap
GALLERY = 6  # the most confident errors shown in the HTML report
SKIN_METHOD = (
    "ITA° = arctan((L* - 50) / b*) of the median L* and b* (CIELAB, D65) of the photo's skin: pixels within "
    "0.55 of the half-diagonal from the centre where the heatmap is below its median"
)


@dataclass
class Curves:
    """Deletion and insertion curves of one kind of map, summed over photos (mean on read)."""

    deletion: np.ndarray
    insertion: np.ndarray
    count: int = 0

    def add(self, deletion: np.ndarray, insertion: np.ndarray) -> None:
        self.deletion = self.deletion + deletion
        self.insertion = self.insertion + insertion
        self.count += 1

    def mean(self) -> tuple[np.ndarray, np.ndarray]:
        n = max(self.count, 1)
        return self.deletion / n, self.insertion / n


@dataclass
class Auditor:
    """Collects what the audit needs while ``evaluate`` runs each photo (``visit``)."""

    engine: LiteRTEngine
    images: int = 50  # photos that get the faithfulness curves and the randomization check
    steps: int = 10
    seed: int = 0
    curves: dict[str, Curves] = field(default_factory=dict)
    spearman: list[float] = field(default_factory=list)
    ita: list[float] = field(default_factory=list)
    too_dark: list[bool] = field(default_factory=list)
    gallery: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)  # a min-heap of errors
    seen: int = 0

    def __post_init__(self) -> None:
        zeros = np.zeros(self.steps + 1)
        self.curves = {kind: Curves(zeros.copy(), zeros.copy()) for kind in ("gradcam", "random", "centre")}
        self.rng = np.random.default_rng(self.seed)
        self.random_head = randomized(self.engine.head, np.random.default_rng(self.seed + 1))

    def visit(self, *, rgb: Image.Image, original_size: tuple[int, int], pixels: np.ndarray,
              features: np.ndarray, result: HeadResult, reported: np.ndarray, label: int) -> None:  # fmt: skip
        """One photo: its map, skin tone and quality; the curves and the sanity check for the first ones."""
        head = self.engine.head  # ``result`` is its forward pass on ``features``, run by evaluate already
        target = int(np.argmax(reported))
        grid = grad_cam(
            features, head.backward(result, head.score_gradient(result, class_index=target, score="logit"))
        )
        heat = render.upsample(grid, rgb.size)
        self.ita.append(audit.ita(audit.skin_pixels(np.asarray(rgb), heat)))
        quality = trust.photo_quality(
            rgb, original_size=original_size, input_size=self.engine.info.input_size
        )
        self.too_dark.append("too_dark" in quality["issues"])
        if label >= 0 and target != label:
            self._remember_error(rgb, grid, reported, label, target)
        if self.seen < self.images:
            self._faithfulness(pixels, grid, target)
            random_result = self.random_head.forward(features)
            random_grid = grad_cam(
                features,
                self.random_head.backward(
                    random_result,
                    self.random_head.score_gradient(random_result, class_index=target, score="logit"),
                ),
            )
            self.spearman.append(audit.spearman(grid, random_grid))
        self.seen += 1

    def _faithfulness(self, pixels: np.ndarray, grid: np.ndarray, target: int) -> None:
        height, width, channels = pixels.shape[-3], pixels.shape[-2], pixels.shape[-1]
        image = np.asarray(pixels, dtype=np.float32).reshape(height, width, channels)
        mean_fill = np.broadcast_to(image.mean(axis=(0, 1)), image.shape)
        blurred = blur(image)
        maps = {
            "gradcam": grid,
            "random": audit.random_map(grid.shape, self.rng),
            "centre": audit.centre_map(grid.shape),
        }
        for kind, saliency in maps.items():
            deletion = self._probabilities(
                audit.occlusion_steps(image, mean_fill, saliency, steps=self.steps, insertion=False), target
            )
            insertion = self._probabilities(
                audit.occlusion_steps(image, blurred, saliency, steps=self.steps, insertion=True), target
            )
            self.curves[kind].add(deletion, insertion)

    def _probabilities(self, inputs: np.ndarray, target: int) -> np.ndarray:
        out = []
        for x in inputs:
            result = self.engine.head.forward(self.engine.feature_map(x[np.newaxis]))
            out.append(float(self.engine.reported(result.logits, result.probabilities)[target]))
        return np.asarray(out)

    def _remember_error(
        self, rgb: Image.Image, grid: np.ndarray, reported: np.ndarray, label: int, target: int
    ) -> None:
        confidence = float(reported[target])
        if len(self.gallery) >= GALLERY and confidence <= self.gallery[0][0]:
            return
        thumbnail = rgb.copy()
        thumbnail.thumbnail((256, 256))
        labels = self.engine.info.labels
        entry = {
            "overlay_png": render.overlay_png_base64(thumbnail, grid),
            "predicted": labels[target],
            "truth": labels[label],
            "probability": round(confidence, 4),
        }
        item = (confidence, self.seen, entry)
        if len(self.gallery) < GALLERY:
            heapq.heappush(self.gallery, item)
        else:
            heapq.heapreplace(self.gallery, item)

    # --- the report's sections ------------------------------------------------------------------

    def explanations(self) -> dict[str, Any]:
        """``explanations``: AUCs of Grad-CAM and of the baselines, the mean curves, the sanity check."""
        figures: dict[str, Any] = {}
        for kind, curves in self.curves.items():
            deletion, insertion = curves.mean()
            figures[kind] = {
                "deletion_auc": round(audit.curve_auc(deletion), 4),
                "insertion_auc": round(audit.curve_auc(insertion), 4),
                "deletion_curve": [round(float(v), 4) for v in deletion],
                "insertion_curve": [round(float(v), 4) for v in insertion],
            }
        ours, random, centre = figures["gradcam"], figures["random"], figures["centre"]
        return {
            "images": self.curves["gradcam"].count,
            "steps": self.steps,
            "fill": {
                "deletion": "the photo's mean colour",
                "insertion": "the photo blurred beyond recognition (shrunk 8 times and stretched back)",
            },
            "deletion_auc": ours["deletion_auc"],
            "insertion_auc": ours["insertion_auc"],
            "curves": {
                kind: {k: v for k, v in f.items() if k.endswith("curve")} for kind, f in figures.items()
            },
            "baselines": {
                name: {"deletion_auc": f["deletion_auc"], "insertion_auc": f["insertion_auc"]}
                for name, f in (("random", random), ("centre", centre))
            },
            "beats_random": bool(
                ours["deletion_auc"] < random["deletion_auc"]
                and ours["insertion_auc"] > random["insertion_auc"]
            ),
            "randomization": {
                "spearman": round(float(np.mean(self.spearman)), 4) if self.spearman else None,
                "images": len(self.spearman),
                "what": "the head's weights re-drawn (seeded normal, each array at its own scale); the rank "
                "correlation of the maps before and after (a faithful method drops towards 0)",
            },
        }

    def skin_tone(
        self,
        probabilities: np.ndarray,
        labels: np.ndarray,
        *,
        threshold: float,
        flagged_out: np.ndarray | None,
    ) -> dict[str, Any]:
        """``skin_tone``: per ITA band, the photos and how the model does on them; the equity gap."""
        bands = np.array([audit.ita_band(a) for a in self.ita])
        too_dark = np.asarray(self.too_dark)
        groups = []
        for name, low, high in audit.ITA_BANDS:
            member = bands == name
            n = int(member.sum())
            group: dict[str, Any] = {
                "group": name,
                "ita_range": [low, high],
                "images": n,
                "enough": n >= MIN_BAND_IMAGES,
                "balanced_accuracy": None,
                "ece": None,
                "abstentions": None,
                "flagged_out": None,
                "flagged_too_dark": None,
            }
            if n:
                p, y = probabilities[member], labels[member]
                recalls = trust.recalls(p, y, p.shape[1])
                group["balanced_accuracy"] = _round(float(np.nanmean(recalls)))
                group["ece"] = _round(trust.ece(p, y))
                group["abstentions"] = _round(float(np.mean(p.max(axis=1) < threshold)))
                group["flagged_out"] = (
                    _round(float(np.mean(flagged_out[member]))) if flagged_out is not None else None
                )
                group["flagged_too_dark"] = _round(float(np.mean(too_dark[member])))
            groups.append(group)
        compared = [g for g in groups if g["enough"] and g["balanced_accuracy"] is not None]
        gap: dict[str, Any] = {
            "balanced_accuracy": None,
            "best": None,
            "worst": None,
            "min_images": MIN_BAND_IMAGES,
        }
        if len(compared) >= 2:
            best = max(compared, key=lambda g: g["balanced_accuracy"])
            worst = min(compared, key=lambda g: g["balanced_accuracy"])
            gap.update(
                balanced_accuracy=_round(best["balanced_accuracy"] - worst["balanced_accuracy"]),
                best=best["group"],
                worst=worst["group"],
            )
        thin = [g["group"] for g in groups if 0 < g["images"] < MIN_BAND_IMAGES]
        return {
            "method": SKIN_METHOD,
            "min_images": MIN_BAND_IMAGES,
            "groups": groups,
            "equity_gap": gap,
            "caveat": (
                f"bands with fewer than {MIN_BAND_IMAGES} photos ({', '.join(thin)}) are shown but not compared"
                if thin
                else None
            ),
        }

    def errors(self) -> list[dict[str, Any]]:
        """The most confident errors, most confident first (for the HTML report)."""
        return [entry for _, _, entry in sorted(self.gallery, key=lambda item: -item[0])]


def randomized(head: Head, rng: np.random.Generator) -> Head:
    """The head with every weight array re-drawn from a normal of its own scale (shapes kept)."""
    ops = []
    for op in head.ops:
        arrays = {
            name: rng.normal(0.0, float(np.std(values)) or 1.0, size=np.shape(values)).astype(
                np.asarray(values).dtype
            )
            for name, values in op.arrays.items()
        }
        ops.append(dataclasses.replace(op, arrays=arrays))
    return dataclasses.replace(head, ops=tuple(ops))


def blur(image: np.ndarray, *, factor: int = 8) -> np.ndarray:
    """A model input (H, W, 3) blurred beyond recognition: each channel shrunk ``factor`` times and
    stretched back (box down, bilinear up), so colours and shading stay and shapes go."""
    height, width = image.shape[0], image.shape[1]
    small = (max(1, width // factor), max(1, height // factor))
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32), mode="F")
            .resize(small, Image.Resampling.BOX)
            .resize((width, height), Image.Resampling.BILINEAR)
        )
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, axis=-1).astype(np.float32)


def _round(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 4)
