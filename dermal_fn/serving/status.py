"""The service's state as the answers of ``/health`` and ``/memory`` (and of ``dermal_fn.health()``)."""

from __future__ import annotations

import math

from dermal_fn.serving.answer import model_json
from dermal_fn.serving.service import Service
from dermal_fn.serving.shapes import HealthBody, HealthErrorJson, HealthModelJson, MemoryBody


def health_body(service: Service, *, trusted: bool = True) -> HealthBody:
    """Liveness and model state (``model_state``: idle, loading, loaded or error).

    The first call starts loading the model in the background, so a platform's health check warms
    the instance. Once a load has failed, ``status`` is ``error`` until a load succeeds, retries
    included: what failed (the error's class) and when the next attempt is; the cause (``detail``)
    and the model's identity only when ``trusted`` (no API_KEY, or the caller showed it).
    """
    holder = service.holder
    warming = holder.engine is None and holder.warm()
    state = holder.state
    engine, error = holder.engine, holder.error  # read after state: a load may finish meanwhile
    if engine is not None:
        state = "loaded"
    elif state == "idle" and warming:
        state = "loading"  # the load just started in the background
    body = HealthBody(
        status="ok",
        model_loaded=engine is not None,
        model_state=state,
        gradcam_enabled=service.settings.enable_gradcam,
    )
    if engine is not None:
        if trusted:
            body["model"] = HealthModelJson(**model_json(engine.info), quantization=engine.info.quantization)
        body["load_seconds"] = round(holder.load_seconds or 0.0, 3)
    elif error is not None:  # the last load failed; a retry may be under way (state "loading")
        body["status"] = "error"
        body["error"] = HealthErrorJson(
            code="model_unavailable", message=str(error), retry_after_s=max(1, math.ceil(holder.retry_in()))
        )
        if error.detail and trusted and service.settings.api_key is not None:
            body["error"]["detail"] = error.detail
    else:
        body["loading"] = True
    if holder.last_exit == "out_of_memory":
        body["last_exit"] = "out_of_memory"
    return body


def memory_body(service: Service) -> MemoryBody:
    """The original Django app's /memory shape: memory, whether the model is loaded, whether heatmaps are on."""
    return MemoryBody(
        status="ok",
        memory=service.memory_status(),
        model_loaded=service.holder.engine is not None,
        gradcam_enabled=service.settings.enable_gradcam,
    )
