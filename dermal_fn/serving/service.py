"""The service: settings, the model holder and the gate of one process, and the steps of a prediction.

Nothing happens at import. gunicorn imports ``main.py`` in its master and forks the worker, so the
model, its interpreter threads and the storage client are made on the first request (or the first
``/health``) in the worker that serves it. The holder is :mod:`~dermal_fn.serving.holder`, the gate
:mod:`~dermal_fn.serving.gate`, the body :mod:`~dermal_fn.serving.answer`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dermal_fn.core import imaging
from dermal_fn.core.engine import ModelInfo
from dermal_fn.serving import memory
from dermal_fn.serving.answer import assessment_json, gradcam_json, photo_quality, predict_body
from dermal_fn.serving.config import Settings
from dermal_fn.serving.gate import InferenceGate
from dermal_fn.serving.holder import ModelHolder
from dermal_fn.serving.options import CheckedOptions, PredictOptions
from dermal_fn.serving.shapes import GradcamJson, MemoryJson, PredictBody, QualityJson, TimingJson

# kept free under the memory limit when deciding whether a decode fits: inference and the overlay
DECODE_RESERVE_MB = 32.0


@dataclass(frozen=True)
class Prediction:
    """A finished prediction: the JSON body and what logs may say about it."""

    body: PredictBody
    class_index: int
    gradcam_status: str


@dataclass(frozen=True)
class DecodedPhoto:
    """A request's photo, decoded: the model's input, the small copy the overlay is drawn on, its quality."""

    pixels: np.ndarray
    photo: Image.Image
    decode_ms: float
    quality: QualityJson | None = None  # when the request asked for the assessment


@dataclass(frozen=True)
class GradcamPlan:
    """Whether this request gets a heatmap, and the ``gradcam`` body when it does not."""

    run: bool
    body: GradcamJson


class Service:
    """Settings, the model holder and the gate of one process."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.pid = os.getpid()
        memory.disable_core_dumps()  # this process will hold photos: a crash must not write them out
        self.allocator = memory.tune_allocator()  # before the model and the first photo
        self.holder = ModelHolder(settings, clock=clock)
        self.gate = InferenceGate(
            concurrency=1, max_queue=settings.max_queue, timeout_s=settings.queue_timeout_s
        )

    def memory_use(self) -> tuple[float, float]:
        """(RSS, what counts against the limit): the container's charge (in-memory files included)
        where the limit is the cgroup's, else the RSS itself. One reading of each."""
        rss = memory.rss_mb()
        charged = memory.cgroup_charge_mb() if self.settings.memory_from_cgroup else None
        return rss, rss if charged is None else max(charged, rss)

    def memory_status(self) -> MemoryJson:
        """RSS, the charge, percent of the limit, the limit (the container's, else the host's), the soft limit."""
        rss, usage = self.memory_use()
        limit = self.settings.memory_limit_mb
        total = limit if limit is not None else memory.host_memory_mb()
        return MemoryJson(
            rss_mb=round(rss, 1),
            usage_mb=round(usage, 1),
            percent=round(100.0 * usage / total, 2) if total else 0.0,
            limit_mb=round(total, 1),
            limit_source="container" if limit is not None else "host",
            soft_limit_mb=_round(self.settings.memory_soft_limit_mb),
            peak_rss_mb=_round(memory.peak_rss_mb()),
        )

    def predict(
        self,
        image_bytes: bytes,
        options: PredictOptions,
        *,
        enable_gradcam: bool | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> Prediction:
        """Decode, run the model, explain: the 200 body of ``POST /predict``.

        Steps: check the options against the model; inside the gate, decode, plan the heatmap and
        run the model; outside it, render the overlay (it overlaps the next request's inference);
        then assemble the body.
        """
        started = timer()
        engine = self.holder.get(wait_s=self.settings.queue_timeout_s)
        info = engine.info
        checked = options.checked(info.labels)
        with self.gate:
            decoded = self.decode(image_bytes, info, timer=timer, quality=checked.assess)
            plan = self.plan_gradcam(checked, enable_gradcam=enable_gradcam)
            inference = engine.run(
                decoded.pixels, class_index=checked.class_index, score=checked.score, gradcam=plan.run
            )
        assessment = (
            assessment_json(engine, inference, decoded.quality) if decoded.quality is not None else None
        )
        render_ms = 0.0
        gradcam = plan.body
        if plan.run and inference.grid is not None:
            t0 = timer()
            gradcam = gradcam_json(inference, decoded.photo, info, overlay=checked.overlay)
            render_ms = (timer() - t0) * 1e3
        timing_ms = TimingJson(
            decode=decoded.decode_ms,
            model=inference.model_ms,
            gradcam=inference.gradcam_ms + render_ms,
            total=(timer() - started) * 1e3,
        )
        body = predict_body(
            info, inference, gradcam, top_k=checked.top_k, timing_ms=timing_ms, assessment=assessment
        )
        return Prediction(body=body, class_index=inference.class_index, gradcam_status=gradcam["status"])

    def decode(
        self,
        image_bytes: bytes,
        info: ModelInfo,
        *,
        timer: Callable[[], float] = time.perf_counter,
        quality: bool = False,
    ) -> DecodedPhoto:
        """The model's input, the overlay's photo and (``quality``) the photo's quality, before the model runs."""
        t0 = timer()
        decoded = imaging.decode(
            image_bytes,
            min_side=imaging.decode_side(info.input_size),
            max_pixels=int(self.settings.max_image_megapixels * 1e6),
            max_bytes=self.settings.max_decode_bytes,
            available_bytes=self.memory_headroom_bytes(),
        )
        pixels = info.model_input(decoded.rgb)
        photo = imaging.display_copy(decoded.rgb)
        checks = (
            photo_quality(decoded.rgb, original_size=decoded.original_size, input_size=info.input_size)
            if quality
            else None
        )
        del decoded  # the largest object of a request
        return DecodedPhoto(pixels=pixels, photo=photo, decode_ms=(timer() - t0) * 1e3, quality=checks)

    def memory_headroom_bytes(self) -> int | None:
        """Bytes a decode may still use under the container's limit (less a reserve); None without a limit."""
        limit = self.settings.memory_limit_mb
        if limit is None:
            return None
        return int((limit - self.memory_use()[1] - DECODE_RESERVE_MB) * memory.MIB)

    def plan_gradcam(self, options: CheckedOptions, *, enable_gradcam: bool | None = None) -> GradcamPlan:
        """Heatmap or not: the operator (ENABLE_GRADCAM, or ``enable_gradcam``), then the request, then memory.

        A client cannot turn on what the operator turned off; ``by`` says who turned it off. Above
        the soft memory limit the heatmap is skipped and the body says so.
        """
        allowed = self.settings.enable_gradcam if enable_gradcam is None else enable_gradcam
        if not allowed:
            return GradcamPlan(run=False, body=GradcamJson(status="disabled", by="operator"))
        if options.gradcam is False:
            return GradcamPlan(run=False, body=GradcamJson(status="disabled", by="request"))
        soft = self.settings.memory_soft_limit_mb
        if soft is not None:
            rss, usage = self.memory_use()
            if usage > soft:
                return GradcamPlan(
                    run=False,
                    body=GradcamJson(
                        status="skipped",
                        reason="memory_pressure",
                        rss_mb=round(rss, 1),
                        usage_mb=round(usage, 1),
                        limit_mb=round(soft, 1),
                    ),
                )
        return GradcamPlan(run=True, body=GradcamJson(status="ok"))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


_SERVICE: Service | None = None
_SERVICE_LOCK = threading.Lock()


def get_service() -> Service:
    """The process's service, made on first use from the environment (never at import).

    One made before a fork belongs to the parent (its interpreter and threads do not survive the
    fork): the child makes its own.
    """
    global _SERVICE
    service = _SERVICE
    if service is not None and service.pid == os.getpid():
        return service
    with _SERVICE_LOCK:
        if _SERVICE is None or _SERVICE.pid != os.getpid():
            _SERVICE = Service(Settings.from_env())
        return _SERVICE


def reset_service(
    settings: Settings | None = None, *, clock: Callable[[], float] = time.monotonic
) -> Service | None:
    """Drop the process's service (tests, or a config reload); optionally install a new one."""
    global _SERVICE
    with _SERVICE_LOCK:
        old = _SERVICE
        _SERVICE = Service(settings, clock=clock) if settings is not None else None
    if old is not None:
        old.holder.close()
    return _SERVICE
