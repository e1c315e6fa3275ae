"""Logging as Cloud Logging reads it: one JSON line per record with a ``severity`` field."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

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
