"""The answer: the 200 body of a prediction, assembled from one model run.

Pure functions from what the engine returned to the shapes of :mod:`dermal_fn.serving.shapes`:
the ``model`` object, the ``top_k`` predictions, the ``gradcam`` object and the ``assessment``.
"""

from __future__ import annotations

from typing import cast

import numpy as np
from PIL import Image

from dermal_fn.core import render, trust
from dermal_fn.core.engine import Engine, Inference, ModelInfo
from dermal_fn.serving.options import Overlay
from dermal_fn.serving.shapes import (
    AssessmentJson,
    DistributionJson,
    GradcamJson,
    ModelJson,
    PredictBody,
    PredictionJson,
    QualityJson,
    TimingJson,
)


def model_json(info: ModelInfo) -> ModelJson:
    """The ``model`` object: which model answered."""
    return ModelJson(
        name=info.name,
        sha256=info.sha256,
        backend=info.backend,
        labels=list(info.labels),
        calibrated=info.calibrated,
    )


def predictions_json(info: ModelInfo, probabilities: np.ndarray, *, top_k: int) -> list[PredictionJson]:
    """The ``top_k`` most probable classes, most probable first (ties keep the label order)."""
    order = np.argsort(-probabilities, kind="stable")[:top_k]
    return [
        PredictionJson(index=int(i), label=info.labels[int(i)], probability=round(float(probabilities[i]), 6))
        for i in order
    ]


def gradcam_json(
    inference: Inference, photo: Image.Image, info: ModelInfo, *, overlay: Overlay = "png"
) -> GradcamJson:
    """The ``gradcam`` object of a run that made a heatmap: the grid and the picture ``overlay`` asks for."""
    assert inference.grid is not None
    body = GradcamJson(
        status="ok",
        class_index=inference.class_index,
        label=info.labels[inference.class_index],
        layer=info.layer,
        score=inference.score,
        grid=np.round(inference.grid, 4).tolist(),
    )
    if overlay == "png":
        body["overlay_png"] = render.overlay_png_base64(photo, inference.grid)
    elif overlay == "heatmap":
        body["heatmap_png"] = render.heatmap_png_base64(inference.grid, photo.size)
    return body


def assessment_json(engine: Engine, inference: Inference, quality: QualityJson) -> AssessmentJson:
    """The ``assessment``: photo quality, distance from the calibration data, confidence."""
    calibration = engine.calibration
    model = calibration.distribution if calibration is not None else None
    if model is None:
        distribution = DistributionJson(status="unknown", score=None, threshold=None)
    else:
        score = model.score(inference.pooled)
        distribution = DistributionJson(
            status="out" if score > model.threshold else "in",
            score=round(score, 4),
            threshold=round(model.threshold, 4),
        )
    threshold = calibration.confidence_threshold if calibration is not None else trust.UNCALIBRATED_CONFIDENCE
    top = float(np.max(inference.probabilities))
    return AssessmentJson(
        quality=quality,
        distribution=distribution,
        confidence={
            "status": "confident" if top >= threshold else "uncertain",
            "max_probability": round(top, 6),
            "threshold": round(threshold, 6),
        },
    )


def photo_quality(
    photo: Image.Image, *, original_size: tuple[int, int], input_size: tuple[int, int]
) -> QualityJson:
    """``assessment.quality`` of a decoded photo (the numbers are :func:`trust.photo_quality`'s)."""
    return cast(QualityJson, trust.photo_quality(photo, original_size=original_size, input_size=input_size))


def predict_body(
    info: ModelInfo,
    inference: Inference,
    gradcam: GradcamJson,
    *,
    top_k: int,
    timing_ms: TimingJson,
    assessment: AssessmentJson | None = None,
) -> PredictBody:
    """The 200 body: model, the ``top_k`` predictions, gradcam, timings and (when asked) the assessment."""
    body = PredictBody(
        model=model_json(info),
        predictions=predictions_json(info, inference.probabilities, top_k=top_k),
        gradcam=gradcam,
        timing_ms=TimingJson(
            decode=round(timing_ms["decode"], 2),
            model=round(timing_ms["model"], 2),
            gradcam=round(timing_ms["gradcam"], 2),
            total=round(timing_ms["total"], 2),
        ),
    )
    if assessment is not None:
        body["assessment"] = assessment
    return body
