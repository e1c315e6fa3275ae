"""The model holder: one model per process, loaded once under a lock, with a backoff after failures.

A failed load is remembered and answered at once until its backoff has passed; a load that kills
the worker leaves a crash marker (:class:`CrashMarker`) that the next worker reads.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

from dermal_fn.core.engine import Engine
from dermal_fn.errors import ConfigError, DermalError, LoadTimedOut, ModelCrashed, ModelUnavailable
from dermal_fn.serving.config import Settings
from dermal_fn.serving.crash_marker import CrashMarker
from dermal_fn.serving.engines import load_engine
from dermal_fn.serving.logs import close_quietly_at_exit
from dermal_fn.serving.shapes import ModelState
from model_fetch.uri import redact_uri

logger = logging.getLogger(__name__)


class FetchInfo(TypedDict):
    """Where the loaded model came from (logged at load)."""

    source: str
    generation: int | None
    downloaded: bool
    fetch_seconds: float


# after the n-th failed load in a row the next attempt waits MODEL_RETRY_S * 2 ** (n - 1), at most this
MAX_BACKOFF_S = 300.0


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

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        open_engine: Callable[..., Engine] = load_engine,
    ) -> None:
        self.settings = settings
        self.clock = clock  # the backoff's time: tests pass a clock they move instead of sleeping
        self.open_engine = open_engine  # load_engine; a test passes one it can hold up
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
        self.fetch_info: FetchInfo | None = None
        # how the previous loader of this model ended, when not by a crash: "out_of_memory"
        self.last_exit: str | None = None
        self._cache_warned = False
        self._abandoned: threading.Thread | None = None  # a load past MODEL_LOAD_TIMEOUT_S, still finishing

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
        return 0.0 if retry_at is None else max(0.0, retry_at - self.clock())

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
        from model_fetch import FetchError, fetch_model, prune_cache

        started = time.perf_counter()
        deadline = time.monotonic() + self.settings.model_load_timeout_s
        settings = self.settings
        abandoned = self._abandoned
        if abandoned is not None and abandoned.is_alive():  # never two loads' memory at once
            raise ModelUnavailable(
                "expected the model to be loaded, found the previous load, abandoned after "
                f"MODEL_LOAD_TIMEOUT_S={settings.model_load_timeout_s:g} s, still finishing; retry shortly",
                retry_after_s=math.ceil(settings.model_retry_s),
            )
        self.attempts += 1
        try:
            if settings.demo_refused:
                raise ConfigError(
                    f"expected MODEL_URI to name the model to serve on {settings.platform}, found it empty; "
                    "set MODEL_URI (or ALLOW_DEMO_MODEL=true to serve the synthetic demo, not for diagnosis)"
                )
            cache = self._usable_cache()
            fetched = fetch_model(
                settings.model_uri,
                cache_dir=cache,
                expected_sha256=settings.model_sha256,
                timeout_s=max(0.1, min(settings.model_fetch_timeout_s, deadline - time.monotonic())),
                max_bytes=settings.max_model_bytes,
            )
            engine = self._open_within(fetched.path, fetched.sha256, cache, deadline=deadline)
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
        self.fetch_info = fetch_info = FetchInfo(
            source=fetched.source,
            generation=fetched.generation,
            downloaded=fetched.downloaded,
            fetch_seconds=round(fetched.seconds, 3),
        )
        self._engine = engine
        self._error, self._failures, self._retry_at = None, 0, None
        if cache is not None:  # only now: until the new generation loaded, the old one was the fallback
            removed = prune_cache(settings.model_uri, cache, keep=fetched.path)
            if removed:
                logger.info(
                    "removed %d older cached cop(ies) of the model: %s", len(removed), ", ".join(removed)
                )
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
                    **fetch_info,
                }
            },
        )
        return engine

    def _open_within(self, path: Path, sha256: str, cache: Path | None, *, deadline: float) -> Engine:
        """Open the engine in a thread of its own, waiting for it until ``deadline`` (``time.monotonic``).

        Past the deadline the load is abandoned: LoadTimedOut now, and when the thread finishes, its
        engine is closed (the native load cannot be interrupted; until it ends no other load starts).
        The crash marker lives in that thread, for as long as the native load runs.
        """
        outcome: dict[str, object] = {}
        guard = threading.Lock()
        finished = threading.Event()

        def load() -> None:
            engine: Engine | None = None
            try:
                with CrashMarker(cache / "loading" if cache else None, key=sha256) as marker:
                    if marker.out_of_memory:
                        self.last_exit = "out_of_memory"
                        logger.warning(
                            "the previous worker was killed out of memory while loading this model"
                        )
                    engine = self.open_engine(
                        path,
                        sha256=sha256,
                        num_threads=self.settings.litert_threads,
                        weight_cache_dir=cache / "xnnpack" if cache else None,
                        verified_dir=cache / "verified" if cache else None,
                    )
            except BaseException as exc:  # handed to the waiting thread, which raises it
                outcome["error"] = exc
            with guard:
                outcome["engine"] = engine
                abandoned = bool(outcome.get("abandoned"))
            finished.set()
            if abandoned and engine is not None:
                engine.close()
                logger.warning("an abandoned load finished after MODEL_LOAD_TIMEOUT_S; its engine is closed")

        thread = threading.Thread(target=load, name="dermal-load", daemon=True)
        thread.start()
        finished.wait(max(0.0, deadline - time.monotonic()))
        with guard:
            if "engine" not in outcome:
                outcome["abandoned"] = True
                self._abandoned = thread
                raise LoadTimedOut(
                    f"expected the model to be fetched and loaded within MODEL_LOAD_TIMEOUT_S="
                    f"{self.settings.model_load_timeout_s:g} s, found it still loading; the load was abandoned"
                )
        error = outcome.get("error")
        if isinstance(error, BaseException):
            raise error
        engine = outcome["engine"]
        assert isinstance(engine, Engine)
        return engine

    def _usable_cache(self) -> Path | None:
        """MODEL_CACHE_DIR (or a temp dir) made private; None when it cannot be used (read-only, full).

        Everything in it is optional for a local model (the digest memo, the verified marker, packed
        weights, crash markers): the model is served without them, said once with the path.
        """
        from model_fetch import FetchError, default_cache_dir
        from model_fetch.cache import private_dir

        folder = Path(self.settings.model_cache_dir) if self.settings.model_cache_dir else default_cache_dir()
        try:
            usable = private_dir(folder)
            probe = usable / f".write-test.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            return usable
        except (OSError, FetchError) as exc:  # not ours or not a folder; EROFS/ENOSPC/EACCES from the probe
            if not self._cache_warned:
                self._cache_warned = True
                logger.warning(
                    "model cache %s cannot be used (%s): serving without its optional files",
                    folder,
                    getattr(exc, "strerror", None) or exc,
                )
            return None

    def _failed(self, exc: Exception, *, expected: bool) -> None:
        """Remember a failed load and when the next may be tried; log the cause (never to clients)."""
        self._failures += 1
        delay = min(MAX_BACKOFF_S, self.settings.model_retry_s * 2 ** (self._failures - 1))
        if isinstance(exc, ModelCrashed):
            delay = MAX_BACKOFF_S  # it will crash again until the file changes: look again rarely
        self._retry_at = self.clock() + delay
        cause = f"{type(exc).__name__}: {exc}"
        public = f"the model could not be loaded ({type(exc).__name__})"
        if (
            isinstance(exc, DermalError) and exc.says_why
        ):  # no path, bucket or endpoint in it: say why to everyone
            public = f"{public}: {exc}"
        self._error = DermalError(public, detail=cause)
        logger.error(
            "model load failed",
            exc_info=None if expected else exc,
            extra={
                "json_fields": {
                    "model_uri": redact_uri(self.settings.model_uri),
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
