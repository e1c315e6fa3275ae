"""The service: one model per process (lazy, under a lock), a bounded inference queue, the answer body.

Nothing happens at import. gunicorn imports ``main.py`` in its master and forks the worker, so the
model, its interpreter threads and the storage client are made on the first request (or the first
``/health``) in the worker that serves it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from dermal_fn.core import imaging, render, trust
from dermal_fn.core.engine import Engine, Inference, ModelInfo
from dermal_fn.errors import ConfigError, DermalError, ModelCrashed, ModelUnavailable, Overloaded
from dermal_fn.serving import memory
from dermal_fn.serving.config import Settings
from dermal_fn.serving.engines import load_engine
from dermal_fn.serving.logs import close_quietly_at_exit
from dermal_fn.serving.options import CheckedOptions, Overlay, PredictOptions

logger = logging.getLogger(__name__)

ModelState = Literal["idle", "loading", "loaded", "error"]
# kept free under the memory limit when deciding whether a decode fits: inference and the overlay
DECODE_RESERVE_MB = 32.0


# after the n-th failed load in a row the next attempt waits MODEL_RETRY_S * 2 ** (n - 1), at most this
MAX_BACKOFF_S = 300.0
# a model whose load killed this many workers in a row is not loaded again until it changes
MAX_CRASHED_LOADS = 2


class ModelHolder:
    """Loads the model once per process; callers that find a load under way wait for it (bounded).

    A failed load is remembered and answered at once (ModelUnavailable with ``Retry-After``) until
    its backoff has passed; the backoff starts at MODEL_RETRY_S, doubles with each failure in a row
    (at most ``MAX_BACKOFF_S``) and is
    shared by requests and by ``/health``'s background warming, so neither hammers storage. A load
    that kills the worker (a corrupt flatbuffer can segfault the runtime) leaves a marker in the
    cache folder; the next worker reads it and, after ``MAX_CRASHED_LOADS`` of them, reports the
    model as failed instead of crashing again.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()  # held for the whole of a load
        self._engine: Engine | None = None
        self._error: DermalError | None = None
        self._failures = 0
        self._retry_at: float | None = None
        self._warming: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self.attempts = 0
        self.loaded_at: float | None = None
        self.load_seconds: float | None = None
        self.fetch_info: dict[str, Any] = {}

    @property
    def engine(self) -> Engine | None:
        """The loaded engine, if any (never blocks)."""
        return self._engine

    @property
    def error(self) -> DermalError | None:
        """Why the last load failed, while no model is loaded (``str``: public; ``detail``: the cause)."""
        return self._error

    @property
    def state(self) -> ModelState:
        """``loaded``, ``loading``, ``error`` (the last load failed) or ``idle`` (never tried)."""
        if self._engine is not None:
            return "loaded"
        if self._lock.locked():
            return "loading"
        return "error" if self._error is not None else "idle"

    def retry_in(self) -> float:
        """Seconds until the next load may be tried (0 when it may be tried now)."""
        retry_at = self._retry_at
        return 0.0 if retry_at is None else max(0.0, retry_at - time.monotonic())

    def get(self, *, wait_s: float | None = None) -> Engine:
        """The engine, loading it first if needed.

        Waits at most ``wait_s`` (default MODEL_LOAD_TIMEOUT_S) for a load under way; during a failed
        load's backoff, raises at once. ModelUnavailable either way, with ``Retry-After``.
        """
        engine = self._engine
        if engine is not None:
            return engine
        self._refuse_during_backoff()
        wait = self.settings.model_load_timeout_s if wait_s is None else wait_s
        if not self._lock.acquire(timeout=wait):
            raise ModelUnavailable(
                f"expected the model to be loaded, found it still loading after {wait:g} s; retry shortly",
                retry_after_s=ModelUnavailable.retry_after_s,
            )
        try:
            if self._engine is not None:
                return self._engine
            self._refuse_during_backoff()  # a load finished and failed while we waited
            return self._load()
        finally:
            self._lock.release()

    def close(self, *, wait_s: float = 30.0) -> None:
        """Close the engine once a load under way has ended (waiting at most ``wait_s``).

        For a service being replaced (a reload, a test): a background load that outlived it would
        finish later with nobody to close its engine.
        """
        acquired = self._lock.acquire(timeout=wait_s)
        try:
            engine, self._engine = self._engine, None
        finally:
            if acquired:
                self._lock.release()
        if engine is not None:
            engine.close()

    def _refuse_during_backoff(self) -> None:
        remaining = self.retry_in()
        if remaining > 0 and self._error is not None:
            raise ModelUnavailable(
                f"expected the model to be loaded, found that {self._error}; the next attempt is in {math.ceil(remaining)} s",
                detail=self._error.detail,
                retry_after_s=math.ceil(remaining),
            )

    def _load(self) -> Engine:
        from model_fetch import FetchError, default_cache_dir, fetch_model
        from model_fetch.cache import private_dir

        started = time.perf_counter()
        settings = self.settings
        self.attempts += 1
        try:
            if settings.demo_refused:
                raise ConfigError(
                    f"expected MODEL_URI to name the model to serve on {settings.platform}, found it empty; "
                    "set MODEL_URI (or ALLOW_DEMO_MODEL=true to serve the synthetic demo, not for diagnosis)"
                )
            cache = private_dir(
                Path(settings.model_cache_dir) if settings.model_cache_dir else default_cache_dir()
            )
            fetched = fetch_model(
                settings.model_uri,
                cache_dir=cache,
                expected_sha256=settings.model_sha256,
                timeout_s=settings.model_fetch_timeout_s,
                max_bytes=settings.max_model_bytes,
            )
            with CrashMarker(cache / "loading", key=fetched.sha256):
                engine = load_engine(
                    fetched.path,
                    sha256=fetched.sha256,
                    num_threads=settings.litert_threads,
                    weight_cache_dir=cache / "xnnpack",
                    verified_dir=cache / "verified",
                )
        except Exception as exc:
            self._failed(exc, expected=isinstance(exc, (FetchError, DermalError, OSError)))
            assert self._error is not None
            raise ModelUnavailable(
                f"expected the model to be loaded, found that {self._error}; "
                f"the next attempt is in {math.ceil(self.retry_in())} s",
                detail=self._error.detail,
                retry_after_s=math.ceil(self.retry_in()),
            ) from exc
        self.load_seconds = time.perf_counter() - started
        self.loaded_at = time.time()
        self.fetch_info = {
            "source": fetched.source,
            "generation": fetched.generation,
            "downloaded": fetched.downloaded,
            "fetch_seconds": round(fetched.seconds, 3),
        }
        self._engine = engine
        self._error, self._failures, self._retry_at = None, 0, None
        if engine.info.backend == "litert":
            close_quietly_at_exit(logger, engine.close)  # LiteRT's exit lines: JSON or dropped
        logger.info(
            "model loaded",
            extra={
                "json_fields": {
                    "model": engine.info.name,
                    "sha256": engine.info.sha256,
                    "backend": engine.info.backend,
                    "threads": settings.litert_threads,
                    "load_seconds": round(self.load_seconds, 3),
                    "load_check": engine.load_check,
                    **self.fetch_info,
                }
            },
        )
        return engine

    def _failed(self, exc: Exception, *, expected: bool) -> None:
        """Remember a failed load and when the next may be tried; log the cause (never to clients)."""
        self._failures += 1
        delay = min(MAX_BACKOFF_S, self.settings.model_retry_s * 2 ** (self._failures - 1))
        if isinstance(exc, ModelCrashed):
            delay = MAX_BACKOFF_S  # it will crash again until the file changes: look again rarely
        self._retry_at = time.monotonic() + delay
        cause = f"{type(exc).__name__}: {exc}"
        public = f"the model could not be loaded ({type(exc).__name__})"
        if isinstance(exc, ModelCrashed):  # no path, bucket or endpoint in it: say why to everyone
            public = f"{public}: {exc}"
        self._error = DermalError(public, detail=cause)
        logger.error(
            "model load failed",
            exc_info=None if expected else exc,
            extra={
                "json_fields": {
                    "model_uri": self.settings.model_uri,
                    "error": cause,
                    "failures": self._failures,
                    "retry_in_s": delay,
                }
            },
        )

    def warm(self) -> bool:
        """Start loading in the background (a platform's health check warms the instance).

        True when a load is now under way (started here or already running), False when the model
        is loaded or a failed load's backoff has not passed.
        """
        if self._engine is not None:
            return False
        if self._lock.locked():
            return True
        if self.retry_in() > 0:
            return False
        with self._state_lock:
            if self._warming is None or not self._warming.is_alive():
                self._warming = threading.Thread(target=self._warm, name="dermal-warm", daemon=True)
                self._warming.start()
        return True

    def _warm(self) -> None:
        with contextlib.suppress(ModelUnavailable):  # recorded in self.error, reported by /health
            self.get()


class CrashMarker:
    """Files that say "this process is loading this model"; the ones of dead processes are crashed loads.

    On entry: markers of this model left by processes that no longer run are counted; at ``limit`` or
    more the load is refused (ModelCrashed) and they stay. Otherwise this process writes its own
    marker (``<key>.<pid>.loading``), removed on exit (the load returned or raised); a successful
    load also clears the dead ones. A marker whose process still runs is a concurrent load of the
    same model (another server on the machine, a restarting worker), not a crash.
    """

    def __init__(self, folder: Path, *, key: str, limit: int = MAX_CRASHED_LOADS) -> None:
        self.folder = folder
        self.key = key[:32]
        self.limit = limit
        self.path = folder / f"{self.key}.{os.getpid()}.loading"
        self.crashed: list[Path] = []

    def __enter__(self) -> CrashMarker:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.crashed = [m for m in self.folder.glob(f"{self.key}.*.loading") if not _process_alive(m)]
        if len(self.crashed) >= self.limit:
            raise ModelCrashed(
                f"expected the model to load, found it killed the worker {len(self.crashed)} times while "
                "loading (a corrupt or incompatible backbone); replace the model file to try again",
                detail=f"crash markers in {self.folder}",
            )
        self.path.write_text(f"{os.getpid()}\n")
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.path.unlink(missing_ok=True)
        if exc_type is None:
            for marker in self.crashed:  # it loaded after all: the history is no longer a verdict
                marker.unlink(missing_ok=True)


def _process_alive(marker: Path) -> bool:
    """Whether the process named in ``<key>.<pid>.loading`` still runs."""
    try:
        pid = int(marker.name.split(".")[-2])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class InferenceGate:
    """Admission for predict requests, then one inference slot.

    ``admission()`` is held for a request's whole life (receiving the body, waiting for the model or
    the slot, inferring): at most ``concurrency + max_queue`` at once, the rest refused at once with
    503, so slow uploads or a slow model load can never take every server thread from ``/health``.
    Inside, at most ``concurrency`` decode and infer at once (``with gate:``).
    """

    def __init__(self, *, concurrency: int, max_queue: int, timeout_s: float) -> None:
        self._slots = threading.BoundedSemaphore(concurrency)
        self._tickets = threading.BoundedSemaphore(concurrency + max_queue)
        self._admitted = 0
        self._guard = threading.Lock()
        self.capacity = concurrency + max_queue
        self.max_queue = max_queue
        self.timeout_s = timeout_s

    @property
    def admitted(self) -> int:
        """Predict requests in flight now (any phase)."""
        return self._admitted

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """Hold one of the ``concurrency + max_queue`` places, or raise Overloaded at once."""
        if not self._tickets.acquire(blocking=False):
            raise Overloaded(
                f"expected at most {self.capacity} predict requests in flight "
                f"(MAX_QUEUE {self.max_queue} + the one running), found them all taken"
            )
        with self._guard:
            self._admitted += 1
        try:
            yield
        finally:
            with self._guard:
                self._admitted -= 1
            self._tickets.release()

    def __enter__(self) -> InferenceGate:
        if not self._slots.acquire(timeout=self.timeout_s):
            raise Overloaded(f"expected a free model slot within {self.timeout_s:g} s, found none")
        return self

    def __exit__(self, *exc: object) -> None:
        self._slots.release()


@dataclass(frozen=True)
class Prediction:
    """A finished prediction: the JSON body and what logs may say about it."""

    body: dict[str, Any]
    class_index: int
    gradcam_status: str


@dataclass(frozen=True)
class DecodedPhoto:
    """A request's photo, decoded: the model's input, the small copy the overlay is drawn on, its quality."""

    pixels: np.ndarray
    photo: Image.Image
    decode_ms: float
    quality: dict[str, Any] | None = None  # when the request asked for the assessment


@dataclass(frozen=True)
class GradcamPlan:
    """Whether this request gets a heatmap, and the ``gradcam`` body when it does not."""

    run: bool
    body: dict[str, Any]


class Service:
    """Settings, the model holder and the gate of one process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        memory.disable_core_dumps()  # this process will hold photos: a crash must not write them out
        self.allocator = memory.tune_allocator()  # before the model and the first photo
        self.holder = ModelHolder(settings)
        self.gate = InferenceGate(
            concurrency=1, max_queue=settings.max_queue, timeout_s=settings.queue_timeout_s
        )

    def memory_status(self) -> dict[str, Any]:
        """RSS, percent of the limit, the limit (the container's, else the host's) and the soft limit."""
        rss = memory.rss_mb()
        limit = self.settings.memory_limit_mb
        total = limit if limit is not None else memory.host_memory_mb()
        return {
            "rss_mb": round(rss, 1),
            "percent": round(100.0 * rss / total, 2) if total else 0.0,
            "limit_mb": round(total, 1),
            "limit_source": "container" if limit is not None else "host",
            "soft_limit_mb": _round(self.settings.memory_soft_limit_mb),
            "peak_rss_mb": _round(memory.peak_rss_mb()),
        }

    def predict(
        self,
        image_bytes: bytes,
        options: PredictOptions,
        *,
        enable_gradcam: bool | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> Prediction:
        """Decode, run the model, explain: the contract's 200 body.

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
        assessment = assess(engine, inference, decoded.quality) if decoded.quality is not None else None
        t0 = timer()
        gradcam_body = self.gradcam_body(plan, inference, decoded.photo, info, overlay=checked.overlay)
        render_ms = (timer() - t0) * 1e3 if gradcam_body["status"] == "ok" else 0.0
        timing_ms = {
            "decode": decoded.decode_ms,
            "model": inference.model_ms,
            "gradcam": inference.gradcam_ms + render_ms,
            "total": (timer() - started) * 1e3,
        }
        body = answer_body(info, inference, gradcam_body, top_k=checked.top_k, timing_ms=timing_ms)
        if assessment is not None:
            body["assessment"] = assessment
        return Prediction(body=body, class_index=inference.class_index, gradcam_status=gradcam_body["status"])

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
            trust.photo_quality(decoded.rgb, original_size=decoded.original_size, input_size=info.input_size)
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
        return int((limit - memory.rss_mb() - DECODE_RESERVE_MB) * memory.MIB)

    def plan_gradcam(self, options: CheckedOptions, *, enable_gradcam: bool | None = None) -> GradcamPlan:
        """Heatmap or not: the operator (ENABLE_GRADCAM, or ``enable_gradcam``), then the request, then memory.

        A client cannot turn on what the operator turned off; above the soft memory limit the
        heatmap is skipped and the body says so.
        """
        allowed = self.settings.enable_gradcam if enable_gradcam is None else enable_gradcam
        if not allowed or options.gradcam is False:
            return GradcamPlan(run=False, body={"status": "disabled"})
        soft = self.settings.memory_soft_limit_mb
        if soft is not None:
            rss = memory.rss_mb()
            if rss > soft:
                return GradcamPlan(
                    run=False,
                    body={
                        "status": "skipped",
                        "reason": "memory_pressure",
                        "rss_mb": round(rss, 1),
                        "limit_mb": round(soft, 1),
                    },
                )
        return GradcamPlan(run=True, body={"status": "ok"})

    def gradcam_body(
        self,
        plan: GradcamPlan,
        inference: Inference,
        photo: Image.Image,
        info: ModelInfo,
        *,
        overlay: Overlay = "png",
    ) -> dict[str, Any]:
        """The ``gradcam`` object: the plan's note, or the grid and the picture ``overlay`` asks for."""
        if not plan.run or inference.grid is None:
            return plan.body
        body: dict[str, Any] = {
            "status": "ok",
            "class_index": inference.class_index,
            "label": info.labels[inference.class_index],
            "layer": info.layer,
            "score": inference.score,
            "grid": np.round(inference.grid, 4).tolist(),
        }
        if overlay == "png":
            body["overlay_png"] = render.overlay_png_base64(photo, inference.grid)
        elif overlay == "heatmap":
            body["heatmap_png"] = render.heatmap_png_base64(inference.grid, photo.size)
        return body


def assess(engine: Engine, inference: Inference, quality: dict[str, Any]) -> dict[str, Any]:
    """The contract's ``assessment``: photo quality, distance from the calibration data, confidence."""
    calibration = engine.calibration
    model = calibration.distribution if calibration is not None else None
    if model is None:
        distribution: dict[str, Any] = {"status": "unknown", "score": None, "threshold": None}
    else:
        score = model.score(inference.pooled)
        distribution = {
            "status": "out" if score > model.threshold else "in",
            "score": round(score, 4),
            "threshold": round(model.threshold, 4),
        }
    threshold = calibration.confidence_threshold if calibration is not None else trust.UNCALIBRATED_CONFIDENCE
    top = float(np.max(inference.probabilities))
    return {
        "quality": quality,
        "distribution": distribution,
        "confidence": {
            "status": "confident" if top >= threshold else "uncertain",
            "max_probability": round(top, 6),
            "threshold": round(threshold, 6),
        },
    }


def answer_body(
    info: ModelInfo,
    inference: Inference,
    gradcam_body: dict[str, Any],
    *,
    top_k: int,
    timing_ms: dict[str, float],
) -> dict[str, Any]:
    """The contract's 200 body: model, the ``top_k`` predictions (most probable first), gradcam, timings."""
    order = np.argsort(-inference.probabilities, kind="stable")[:top_k]
    return {
        "model": info.as_json(),
        "predictions": [
            {
                "index": int(i),
                "label": info.labels[int(i)],
                "probability": round(float(inference.probabilities[i]), 6),
            }
            for i in order
        ],
        "gradcam": gradcam_body,
        "timing_ms": {key: round(value, 2) for key, value in timing_ms.items()},
    }


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


def reset_service(settings: Settings | None = None) -> Service | None:
    """Drop the process's service (tests, or a config reload); optionally install a new one."""
    global _SERVICE
    with _SERVICE_LOCK:
        old = _SERVICE
        _SERVICE = Service(settings) if settings is not None else None
    if old is not None:
        old.holder.close()
    return _SERVICE
