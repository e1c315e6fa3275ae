"""dermal-fn: a Keras skin-image classifier with Grad-CAM, served without TensorFlow.

``predict_skin_with_explanation`` keeps the signature of the original Django app's module. The rest is in layers
whose folders say what the 512 MB worker may load: ``core`` (no TensorFlow, no settings),
``serving`` (configuration, the service, HTTP), ``keras`` (everything that needs TensorFlow),
``tools`` (the command line) and ``demo``; imports go down only (tests/test_layers.py).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["predict_skin_with_explanation"]


def predict_skin_with_explanation(
    image_bytes: bytes, top_k: int = 7, enable_gradcam: bool | None = None
) -> tuple[list[dict[str, object]], str | None]:
    """Classify a photo: ``([{"class": label, "probability": percent}, ...], heatmap_png_base64 | None)``.

    The original Django app's return shape: results most probable first (at most ``top_k``, at most the number of
    classes), probabilities in percent; the heatmap is the overlay PNG as base64, or ``None`` when
    Grad-CAM is disabled (argument, else ``ENABLE_GRADCAM``) or skipped under memory pressure.
    Uses the process's model (``MODEL_URI``), loaded on first use.
    """
    from dermal_fn.serving.options import PredictOptions
    from dermal_fn.serving.service import get_service

    service = get_service()
    labels = service.holder.get().info.labels
    options = PredictOptions(top_k=max(1, min(int(top_k), len(labels))))
    body = service.predict(image_bytes, options, enable_gradcam=enable_gradcam).body
    results: list[dict[str, object]] = [
        {"class": p["label"], "probability": round(100.0 * float(p["probability"]), 2)}
        for p in body["predictions"]
    ]
    gradcam = body["gradcam"]
    heatmap = gradcam.get("overlay_png") if gradcam.get("status") == "ok" else None
    return results, heatmap
