"""The shapes of every JSON answer, typed once.

The HTTP layer, the command line and ``dermal_fn.predict`` build their bodies as these TypedDicts;
``static/openapi.json`` describes the same shapes, and ``tests/test_openapi.py`` walks both and fails
when a field is added, removed or made optional in one and not the other.
"""

from __future__ import annotations

from typing import Literal, NotRequired, Required, TypedDict

GradcamStatus = Literal["ok", "disabled", "skipped"]
ModelState = Literal["idle", "loading", "loaded", "error"]


class ModelJson(TypedDict):
    """``model``: which model answered."""

    name: str
    sha256: str
    backend: str
    labels: list[str]
    calibrated: bool


class PredictionJson(TypedDict):
    """One of ``predictions``: a class and its probability (calibrated when ``model.calibrated``)."""

    index: int
    label: str
    probability: float


class GradcamJson(TypedDict, total=False):
    """``gradcam``: the heatmap, or why there is none (``disabled``, ``skipped``)."""

    status: Required[GradcamStatus]
    # status "ok"
    class_index: int
    label: str
    layer: str
    score: str
    grid: list[list[float]]
    overlay_png: str  # overlay=png (the default)
    heatmap_png: str  # overlay=heatmap
    # status "disabled": who turned it off
    by: Literal["operator", "request"]
    # status "skipped"
    reason: str
    rss_mb: float
    usage_mb: float
    limit_mb: float


class QualityJson(TypedDict):
    """``assessment.quality``: is the photo good enough to judge."""

    status: Literal["ok", "poor"]
    issues: list[str]
    measured: dict[str, float]


class DistributionJson(TypedDict):
    """``assessment.distribution``: is the photo like the calibration data (higher score: further)."""

    status: Literal["in", "out", "unknown"]
    score: float | None
    threshold: float | None


class ConfidenceJson(TypedDict):
    """``assessment.confidence``: does the top probability clear the abstention threshold."""

    status: Literal["confident", "uncertain"]
    max_probability: float
    threshold: float


class AssessmentJson(TypedDict):
    """``assessment``: when not to trust the answer."""

    quality: QualityJson
    distribution: DistributionJson
    confidence: ConfidenceJson


class TimingJson(TypedDict):
    """``timing_ms``: where the request's time went."""

    decode: float
    model: float
    gradcam: float
    total: float


class PredictBody(TypedDict):
    """The 200 body of ``POST /predict`` (and of ``dermal-fn predict``, ``dermal_fn.predict``)."""

    model: ModelJson
    predictions: list[PredictionJson]
    gradcam: GradcamJson
    timing_ms: TimingJson
    assessment: NotRequired[AssessmentJson]


class ErrorJson(TypedDict):
    """``error``: what went wrong, as a code and a sentence."""

    code: str
    message: str
    request_id: NotRequired[str]
    detail: NotRequired[str]


class ErrorBody(TypedDict):
    """Every 4xx/5xx body."""

    error: ErrorJson


class HealthErrorJson(TypedDict):
    """``/health``'s ``error`` after a failed load."""

    code: str
    message: str
    retry_after_s: int
    detail: NotRequired[str]


class HealthModelJson(ModelJson):
    """``/health``'s ``model``: the answer's model object and its quantization."""

    quantization: str


class HealthBody(TypedDict):
    """``GET /health``."""

    status: Literal["ok", "error"]
    model_loaded: bool
    model_state: ModelState
    gradcam_enabled: bool
    loading: NotRequired[bool]
    load_seconds: NotRequired[float]
    model: NotRequired[HealthModelJson]
    error: NotRequired[HealthErrorJson]
    last_exit: NotRequired[Literal["out_of_memory"]]


class MemoryJson(TypedDict):
    """``/memory``'s ``memory``: this process and what its container is charged for."""

    rss_mb: float
    usage_mb: float
    percent: float
    limit_mb: float
    limit_source: Literal["container", "host"]
    soft_limit_mb: float | None
    peak_rss_mb: float | None


class MemoryBody(TypedDict):
    """``GET /memory``, the original Django app's shape."""

    status: Literal["ok"]
    memory: MemoryJson
    model_loaded: bool
    gradcam_enabled: bool


# a section of a bundle's manifest, as the exporter, calibrate or evaluate --write wrote it
ManifestSection = dict[str, object]


class InputJson(TypedDict):
    """``/model``'s ``input``: the photo's way into the model."""

    height: int
    width: int
    scale: str
    resize: str
    mean: NotRequired[list[float]]
    std: NotRequired[list[float]]
    channels: NotRequired[str]  # RGB, or BGR for caffe-style models
    preset: NotRequired[str]


class QuantizationJson(TypedDict):
    """``/model``'s ``quantization``: the mode, and what it measurably costs."""

    mode: str
    measured_against_keras: ManifestSection | None  # the exporter's check against the Keras model
    measured_against_fp32: ManifestSection | None  # a quantized bundle's gate, on held-out photos


class ModelCardJson(TypedDict):
    """``GET /model``: what the bundle's manifest says about the model."""

    name: str
    sha256: str
    backend: str
    synthetic: bool
    labels: list[str]
    input: InputJson
    gradcam: dict[str, str]
    quantization: QuantizationJson
    verification: ManifestSection | None
    calibrated: bool
    calibration: ManifestSection | None
    evaluation: ManifestSection | None
    source: ManifestSection | None
    audit: ManifestSection | None
    intended_use: dict[str, str]


# the OpenAPI document's component for each shape (tests/test_openapi.py walks these pairs)
COMPONENTS: dict[str, type] = {
    "Model": ModelJson,
    "Prediction": PredictBody,
    "GradCam": GradcamJson,
    "Assessment": AssessmentJson,
    "Health": HealthBody,
    "Memory": MemoryBody,
    "Error": ErrorBody,
    "ModelCard": ModelCardJson,
}
