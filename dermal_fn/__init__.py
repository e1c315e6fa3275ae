"""dermal-fn: a Keras skin-image classifier with Grad-CAM, served without TensorFlow.

``predict`` returns the body of ``POST /predict`` (trust signals included);
``predict_skin_with_explanation`` keeps the signature of the original Django app's module. The rest is in layers
whose folders say what the 512 MB worker may load: ``core`` (no TensorFlow, no settings),
``serving`` (configuration, the service, HTTP), ``keras`` (everything that needs TensorFlow),
``tools`` (the command line) and ``demo``; imports go down only (tests/test_layers.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["health", "memory", "predict", "predict_skin_with_explanation", "trust_sentences"]

if TYPE_CHECKING:
    from dermal_fn.serving.sentences import Language, Sentence
    from dermal_fn.serving.shapes import HealthBody, MemoryBody, PredictBody


def predict(image_bytes: bytes, **options: object) -> PredictBody:
    """Classify a photo: exactly the 200 body of ``POST /predict``, the assessment included.

    Options as the HTTP API takes them: ``top_k``, ``class`` (or ``class_``: an index or a label),
    ``score``, ``gradcam``, ``assess``, ``overlay``. Raises the errors the API answers with
    (:mod:`dermal_fn.errors`: ``InvalidImage``, ``InvalidOption``, ``ModelUnavailable``, …). Uses the
    process's model (``MODEL_URI``), loaded once on first use. Show ``assessment`` beside the labels:
    it says when not to trust them.
    """
    from dermal_fn.errors import InvalidOption
    from dermal_fn.serving.options import OPTION_NAMES, PredictOptions
    from dermal_fn.serving.service import get_service

    if "class_" in options:
        options["class"] = options.pop("class_")
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise InvalidOption(f"expected options among {list(OPTION_NAMES)}, found {unknown}")
    return get_service().predict(bytes(image_bytes), PredictOptions.parse(options)).body


def predict_skin_with_explanation(
    image_bytes: bytes, top_k: int = 7, enable_gradcam: bool | None = None
) -> tuple[list[dict[str, object]], str | None]:
    """Classify a photo: ``([{"class": label, "probability": percent}, ...], heatmap_png_base64 | None)``.

    The original Django app's return shape: results most probable first (at most ``top_k``, at most the number of
    classes), probabilities in percent; the heatmap is the overlay PNG as base64, or ``None`` when
    Grad-CAM is disabled (argument, else ``ENABLE_GRADCAM``) or skipped under memory pressure.
    Uses the process's model (``MODEL_URI``), loaded on first use. The trust signals (photo quality,
    unlike the training data, uncertain) are not in this shape: :func:`predict` returns them.
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


def health() -> HealthBody:
    """The body of ``GET /health`` (``status`` ``error``: answer 503); the first call starts the load."""
    from dermal_fn.serving.service import get_service
    from dermal_fn.serving.status import health_body

    return health_body(get_service())


def memory() -> MemoryBody:
    """The body of ``GET /memory``: this process's RSS, the container's charge and limit."""
    from dermal_fn.serving.service import get_service
    from dermal_fn.serving.status import memory_body

    return memory_body(get_service())


def trust_sentences(body: PredictBody, *, language: Language = "en") -> list[Sentence]:
    """The answer's ``assessment`` as sentences to show beside its labels (``language``: en or vi)."""
    from dermal_fn.serving.sentences import assessment_sentences

    if "assessment" not in body:
        raise ValueError("expected an answer with its assessment, found one made with assess=false")
    return assessment_sentences(body["assessment"], language=language)
