"""Verification: how an exported bundle compares with the Keras model it came from.

The exporter serves the staged bundle with the LiteRT engine on seeded inputs and compares it with
TensorFlow end to end and head-only (:func:`verify`); :func:`refusals` says why a bundle must not be
written. TensorFlow is imported inside :func:`verify` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dermal_fn.core.engine import Engine, Inference, LiteRTEngine, litert_runtime
from dermal_fn.core.imaging import InputScale, Normalization

Quantization = Literal["none", "fp16", "int8-dynamic", "int8"]
QUANTIZATIONS: tuple[Quantization, ...] = ("none", "fp16", "int8-dynamic", "int8")

PROBABILITY_TOLERANCE = 1e-4
HEATMAP_TOLERANCE = 1e-3
# probability-score heatmaps are checked against TensorFlow only for min(p, 1 - p) above this
PROBABILITY_SCORE_MIN = 1e-3


@dataclass(frozen=True)
class Verification:
    """How the written bundle compares with TensorFlow on the verification inputs."""

    inputs: int
    max_probability_diff: float  # bundle end to end vs the Keras model
    max_heatmap_diff: float
    top1_agreement: float
    head_max_probability_diff: float  # NumPy head vs Keras head on the bundle's own feature map
    head_max_heatmap_diff: float
    # the LiteRT that ran the bundle here: serving on the same runtime, with the backbone's CRC-32
    # intact, need not run it on a zero image again at load (dermal_fn.core.engine.LiteRTEngine)
    runtime: str = ""

    def as_json(self) -> dict[str, float | int | str]:
        """Plain data for the manifest."""
        return {k: (round(v, 9) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def verification_inputs(
    size: tuple[int, int],
    scale: InputScale,
    *,
    count: int = 4,
    seed: int = 0,
    normalization: Normalization | None = None,
) -> list[np.ndarray]:
    """Smooth random images in the model's input range (seeded), shape (1, h, w, 3) float32."""
    from PIL import Image

    from dermal_fn.core.imaging import model_input

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.uint8)
        image = Image.fromarray(coarse, mode="RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 12, size=(size[0], size[1], 3))
        pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        out.append(
            model_input(
                Image.fromarray(pixels, mode="RGB"), size=size, scale=scale, normalization=normalization
            )
        )
    return out


def verify(
    bundle_engine: LiteRTEngine,
    keras_engine: Engine,
    inputs: Sequence[np.ndarray],
) -> Verification:
    """Compare the bundle with TensorFlow: end to end, and head-only on the bundle's feature map."""
    import tensorflow as tf

    from dermal_fn.core.gradcam import grad_cam
    from dermal_fn.keras.reference import KerasEngine

    assert isinstance(keras_engine, KerasEngine)
    tape_head = keras_engine.tape_head
    max_p = max_h = head_p = head_h = 0.0
    agree = 0
    n_classes = len(bundle_engine.info.labels)
    for pixels in inputs:
        ours = bundle_engine.run(pixels, score="logit")
        ref = keras_engine.run(pixels, class_index=ours.class_index, score="logit")
        assert ours.grid is not None and ref.grid is not None
        max_p = max(max_p, float(np.max(np.abs(ours.probabilities - ref.probabilities))))
        max_h = max(max_h, float(np.max(np.abs(ours.grid - ref.grid))))
        agree += int(np.argmax(ours.probabilities) == np.argmax(ref.probabilities))
        features = bundle_engine.feature_map(pixels)
        for score in ("logit", "probability"):
            for class_index in sorted({ours.class_index, (ours.class_index + 1) % n_classes}):
                mine = bundle_engine.head.forward(features)
                p = float(mine.probabilities[class_index])
                if score == "probability" and min(p, 1.0 - p) < PROBABILITY_SCORE_MIN:
                    # dp/dz = p (1 - p): TensorFlow's float32 1 - p near 0 or 1 is rounding noise
                    # (measured: 0.2 % error on the gradient at p = 0.99999), no reference to check
                    continue
                grad = bundle_engine.head.backward(
                    mine,
                    bundle_engine.head.score_gradient(mine, class_index=class_index, score=score),
                )
                tensor = tf.convert_to_tensor(features)
                with tf.GradientTape() as tape:
                    tape.watch(tensor)
                    logits = tape_head.logits(tensor)
                    probs = tape_head.probabilities(logits)
                    value = tape_head.score(logits, probs, class_index=class_index, score=score)
                tf_grad = tape.gradient(value, tensor).numpy()
                head_p = max(head_p, float(np.max(np.abs(mine.probabilities - probs.numpy()[0]))))
                head_h = max(
                    head_h,
                    float(np.max(np.abs(grad_cam(features, grad) - grad_cam(features, tf_grad)))),
                )
    return Verification(
        inputs=len(inputs),
        max_probability_diff=max_p,
        max_heatmap_diff=max_h,
        top1_agreement=agree / max(len(inputs), 1),
        head_max_probability_diff=head_p,
        head_max_heatmap_diff=head_h,
        runtime=litert_runtime(),
    )


def refusals(report: Verification, *, quantize: Quantization) -> list[str]:
    """Step 3's verdict: why this bundle must not be written (empty: it may)."""
    problems = []
    if (
        report.head_max_probability_diff > PROBABILITY_TOLERANCE
        or report.head_max_heatmap_diff > HEATMAP_TOLERANCE
    ):
        problems.append(
            f"the NumPy head differs from Keras (|Δp| {report.head_max_probability_diff:.2e}, "
            f"|Δheatmap| {report.head_max_heatmap_diff:.2e})"
        )
    if quantize == "none" and (
        report.max_probability_diff > PROBABILITY_TOLERANCE or report.max_heatmap_diff > HEATMAP_TOLERANCE
    ):
        problems.append(
            f"the bundle differs from Keras end to end (|Δp| {report.max_probability_diff:.2e} > "
            f"{PROBABILITY_TOLERANCE:g} or |Δheatmap| {report.max_heatmap_diff:.2e} > {HEATMAP_TOLERANCE:g})"
        )
    return problems


# --- the quantization gate -------------------------------------------------------------------------------

MIN_AGREEMENT = 0.98
MIN_HEATMAP_R = 0.95


@dataclass(frozen=True)
class QuantizationReport:
    """A quantized bundle against the fp32 Keras model on held-out images (the gate's figures)."""

    images: int
    source: str  # where the images came from: held-out calibration photos, --verify, generated
    top1_agreement: float
    max_probability_diff: float
    mean_probability_diff: float
    heatmap_r_mean: float
    heatmap_r_min: float
    top_region_iou_mean: float
    min_agreement: float
    min_heatmap_r: float

    @property
    def misses(self) -> list[str]:
        """The figures below their floors, in words (empty: the gate holds)."""
        out = []
        if self.top1_agreement < self.min_agreement:
            out.append(f"top-1 agreement {self.top1_agreement:.3f} < --min-agreement {self.min_agreement:g}")
        if self.heatmap_r_mean < self.min_heatmap_r:
            out.append(f"mean heatmap r {self.heatmap_r_mean:.3f} < --min-heatmap-r {self.min_heatmap_r:g}")
        return out

    def as_json(self) -> dict[str, float | int | str | bool]:
        """Plain data for the manifest (``verification.quantized``) and the model card."""
        values: dict[str, float | int | str | bool] = {
            k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()
        }
        values["passed"] = not self.misses
        return values


def fp32_references(keras_engine: Engine, inputs: Sequence[np.ndarray]) -> list[Inference]:
    """The fp32 model's answers (logit-score Grad-CAM of its top class), what the gate compares with."""
    return [keras_engine.run(pixels, score="logit") for pixels in inputs]


def compare_quantized(
    bundle_engine: LiteRTEngine,
    keras_engine: Engine,
    inputs: Sequence[np.ndarray],
    *,
    source: str,
    min_agreement: float = MIN_AGREEMENT,
    min_heatmap_r: float = MIN_HEATMAP_R,
    references: Sequence[Inference] | None = None,
) -> QuantizationReport:
    """The quantized bundle against the fp32 model on ``inputs``: agreement, probabilities, heatmaps.

    The heatmaps compared are each model's Grad-CAM of the fp32 model's top class (logit score).
    ``references``: the fp32 model's answers on ``inputs`` (:func:`fp32_references`), when several
    bundles are held to the same images.
    """
    from dermal_fn.core.agreement import pearson_r, top_region_iou

    if references is None:
        references = fp32_references(keras_engine, inputs)
    agree, max_p, mean_p, rs, ious = 0, 0.0, [], [], []
    for pixels, reference in zip(inputs, references, strict=True):
        ours = bundle_engine.run(pixels, class_index=reference.class_index, score="logit")
        assert ours.grid is not None and reference.grid is not None
        difference = np.abs(ours.probabilities - reference.probabilities)
        max_p = max(max_p, float(difference.max()))
        mean_p.append(float(difference.mean()))
        agree += int(np.argmax(ours.probabilities) == np.argmax(reference.probabilities))
        rs.append(pearson_r(ours.grid, reference.grid))
        ious.append(top_region_iou(ours.grid, reference.grid))
    n = max(len(inputs), 1)
    return QuantizationReport(
        images=len(inputs),
        source=source,
        top1_agreement=agree / n,
        max_probability_diff=max_p,
        mean_probability_diff=float(np.mean(mean_p)) if mean_p else 0.0,
        heatmap_r_mean=float(np.mean(rs)) if rs else 0.0,
        heatmap_r_min=float(np.min(rs)) if rs else 0.0,
        top_region_iou_mean=float(np.mean(ious)) if ious else 0.0,
        min_agreement=min_agreement,
        min_heatmap_r=min_heatmap_r,
    )
