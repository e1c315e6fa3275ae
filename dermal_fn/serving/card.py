"""The model card (``GET /model``): what the bundle's manifest says about the model, in plain fields.

Labels, input and preprocessing, the Grad-CAM layer, quantization and what it measurably costs
(the exporter's comparison with Keras), calibration and its figures, the source's digest, and an
intended-use statement. Nothing here is computed per request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dermal_fn.core.engine import Engine
from dermal_fn.serving.shapes import InputJson, ManifestSection, ModelCardJson

INTENDED_USE = {
    "summary": (
        "Research and demonstration software that shows what an image classifier predicts for a skin "
        "photo and where it looked. Not a medical device and not for diagnosis, screening or triage: "
        "every output needs review by a qualified clinician."
    ),
    "regulatory": (
        "Not cleared, approved or CE-marked. Software that acquires, processes or analyses a medical "
        "image does not meet the FDA's first criterion for non-device clinical decision support "
        "(FD&C Act section 520(o)(1)(E)), so it cannot claim that exemption."
    ),
    "trust_signals": (
        "Each answer carries an assessment: photo quality (blur, exposure, resolution), whether the photo "
        "is unlike the calibration data, and whether the top probability clears the abstention threshold. "
        "They say when not to trust an answer; they never make one trustworthy."
    ),
}


def model_card(engine: Engine) -> ModelCardJson:
    """The card for the loaded model (a Keras file served by TensorFlow has no manifest: fewer fields)."""
    info = engine.info
    manifest = getattr(engine, "manifest", None)
    extra: Mapping[str, Any] = manifest.extra if manifest is not None else {}
    verification = _section(extra.get("verification"))
    calibration = _section(extra.get("calibration"))
    return {
        "name": info.name,
        "sha256": info.sha256,
        "backend": info.backend,
        "synthetic": "synthetic" in info.name.lower(),
        "labels": list(info.labels),
        "input": _input(engine),
        "gradcam": {"layer": info.layer, "method": "Grad-CAM from the NumPy head's exact backward pass"},
        "quantization": {
            "mode": info.quantization,
            "measured_against_keras": {
                key: verification[key]
                for key in ("max_probability_diff", "max_heatmap_diff", "top1_agreement", "inputs")
                if key in verification
            }
            if verification is not None
            else None,
            # a quantized bundle against its fp32 model on held-out photos (the exporter's gate)
            "measured_against_fp32": _section(verification.get("quantized"))
            if verification is not None
            else None,
        },
        "verification": verification,
        "calibrated": info.calibrated,
        "calibration": calibration,
        "evaluation": _section(calibration.get("evaluation")) if calibration is not None else None,
        "source": _section(extra.get("source")),
        "audit": _section(extra.get("audit")),  # evaluate --write: faithfulness, sanity check, skin tone
        "intended_use": INTENDED_USE,
    }


def _section(value: object) -> ManifestSection | None:
    """A manifest section when it is a JSON object, else None."""
    return dict(value) if isinstance(value, dict) else None


def _input(engine: Engine) -> InputJson:
    """The photo's way into the model: size, scale, resize, normalisation, preset."""
    info = engine.info
    manifest = getattr(engine, "manifest", None)
    shown = InputJson(
        height=info.input_size[0], width=info.input_size[1], scale=info.input_scale, resize=info.resize
    )
    if not info.normalization.identity:
        normalization = info.normalization
        shown["mean"], shown["std"] = list(normalization.mean), list(normalization.std)
        shown["channels"] = normalization.channels
    if manifest is not None and manifest.preset:
        shown["preset"] = manifest.preset
    return shown
