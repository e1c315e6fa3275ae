"""Load the configured model once at deploy time, so that each cold start of the deployed build does less.

``python -m dermal_fn.serving.warm`` (render.yaml's ``buildCommand`` runs it after ``pip install``)
reads the service's own environment (``MODEL_URI``, ``MODEL_SHA256``, ``MODEL_CACHE_DIR``, …) and
loads the model exactly as a worker's cold start does: it fetches and verifies the file into
``MODEL_CACHE_DIR``, checks the backbone (its CRC-32 and, where the exporter did not prove it for
this runtime, one inference) and builds XNNPACK's packed weights. When ``MODEL_CACHE_DIR`` is inside
the deployed folder, a cold start then finds:

- the model file: a ``gs://`` model is not downloaded again unless its generation changed (one
  metadata request still checks that), only hashed again;
- the verified marker, so it skips the backbone's CRC-32 and any check inference
  (``load_check: "earlier load"``);
- the packed weights, when it runs on the same kind of CPU as the build (the cache is keyed by
  :func:`dermal_fn.core.engine.cpu_identity`; on another CPU it is rebuilt at the first load, as
  without this step).

It writes JSON log lines, the last one ``model warmed`` (or why not), and exits 0 when the model
loaded, 1 when it did not: the build fails, and the deploy that is running keeps serving instead of
being replaced by one that cannot load its model. A configuration error exits 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dermal_fn.errors import ConfigError, ModelUnavailable
from dermal_fn.serving.config import Settings
from dermal_fn.serving.logs import setup_logging

logger = logging.getLogger("dermal_fn.warm")


def main(argv: Sequence[str] | None = None) -> int:
    """Load the model the environment names; 0 when it loaded, 1 when not, 2 for bad configuration."""
    argparse.ArgumentParser(
        prog="python -m dermal_fn.serving.warm",
        description="Fetch, verify and load the model the environment names (MODEL_URI, MODEL_CACHE_DIR, "
        "…) once, at deploy time, leaving its caches for the service's cold starts.",
    ).parse_args(argv)
    setup_logging()
    started = time.perf_counter()
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        logger.error("model not warmed", extra={"json_fields": {"error": str(exc)}})
        return 2
    from dermal_fn.serving.holder import ModelHolder

    holder = ModelHolder(settings)
    try:
        engine = holder.get()
    except ModelUnavailable as exc:  # the holder has logged the cause ("model load failed")
        logger.error("model not warmed", extra={"json_fields": {"error": exc.detail or str(exc)}})
        return 1
    weight_cache: Path | None = getattr(engine, "weight_cache", None)
    logger.info(
        "model warmed",
        extra={
            "json_fields": {
                "model": engine.info.name,
                "sha256": engine.info.sha256,
                "backend": engine.info.backend,
                "cache_dir": settings.model_cache_dir,
                "weight_cache": None
                if weight_cache is None or not weight_cache.exists()
                else weight_cache.name,
                "seconds": round(time.perf_counter() - started, 3),
            }
        },
    )
    return 0  # the engine is closed at exit, its native lines as JSON (ModelHolder registered that)


if __name__ == "__main__":
    sys.exit(main())
