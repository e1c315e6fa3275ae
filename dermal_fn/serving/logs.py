"""Logging as Cloud Logging reads it: one JSON line per record with a ``severity`` field."""

from __future__ import annotations

import atexit
import datetime as dt
import gc
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from dermal_fn.core.native_log import native_output_as_records

_SEVERITY = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object; fields passed as ``extra={"json_fields": {...}}`` are merged."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelno, record.levelname),
            "message": record.getMessage(),
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "logger": record.name,
        }
        fields = getattr(record, "json_fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: int = logging.INFO, *, stream: Any = None) -> None:
    """Send this package's and model_fetch's records to stderr as JSON lines (idempotent)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.set_name("dermal-json")
    for name in ("dermal_fn", "model_fetch"):
        log = logging.getLogger(name)
        log.handlers = [h for h in log.handlers if h.get_name() != "dermal-json"]
        log.addHandler(handler)
        log.setLevel(level)
        log.propagate = False


# --- the native runtime's lines at exit (the rest: dermal_fn.core.native_log) -------------------------


def close_quietly_at_exit(logger: logging.Logger, close: Callable[[], None] | None = None) -> None:
    """At interpreter exit: ``close()`` (when given), then drop what native code prints after.

    LiteRT's environments print a line each as they are destroyed; the ones owned by an engine are
    destroyed by its ``close()``, which re-emits them as records itself, anything only a cycle still
    holds by the collection here, inside a capture, and the process-wide ones by C++ static
    destructors after Python is gone, when nothing is left to re-emit them: fd 2 then goes to
    /dev/null.
    """

    def at_exit() -> None:
        if close is not None:
            close()
        with native_output_as_records(logger):
            gc.collect()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    atexit.register(at_exit)
