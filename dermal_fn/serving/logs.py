"""Logging as Cloud Logging reads it: one JSON line per record with a ``severity`` field."""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import gc
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
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


# --- the native runtime's own lines, as JSON ---------------------------------------------------------

_NATIVE = re.compile(r"^(INFO|WARNING|ERROR|FATAL|VERBOSE|DEBUG):\s*(.*)$")
# expected on every machine without the vendor's runtime: said at DEBUG, not as a warning each cold start
_BENIGN = (
    "Failed to load plugin",
    "Could not load shared library",
    "cannot open shared object file",
    # a machine without an NPU (every server): LiteRT says so at WARNING, twice, on each cold start
    "accelerator could not be loaded and registered: kLiteRtStatusErrorNotFound",
)
_NATIVE_LEVELS = {
    "VERBOSE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "INFO": logging.DEBUG,  # accelerator registration and the like: not for a normal log
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "FATAL": logging.CRITICAL,
}


@contextlib.contextmanager
def native_output_as_json(logger: logging.Logger) -> Iterator[None]:
    """Capture what native code writes to file descriptor 2 meanwhile; re-emit it as JSON log records.

    LiteRT writes plain lines (``INFO: [environment.cc:36] ...``, a failed vendor plugin as a
    WARNING) straight to fd 2, which Cloud Logging files as text or errors. Lines that are already
    JSON (our own records written meanwhile) pass through unchanged; ``└`` continuation lines join
    the record before them; a plugin that is simply not installed is said at DEBUG.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    chunks: list[bytes] = []
    drainer = threading.Thread(target=_drain, args=(read_end, chunks), name="dermal-native-log", daemon=True)
    drainer.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the last writer of the pipe is gone: the drainer sees its end
        drainer.join(timeout=5)
        os.close(saved)
        _re_emit(b"".join(chunks).decode("utf-8", "replace"), logger)


def _drain(fd: int, chunks: list[bytes]) -> None:
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while block := pipe.read(65536):
            chunks.append(block)


def _re_emit(text: str, logger: logging.Logger) -> None:
    records: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            sys.stderr.write(line + "\n")  # already a JSON record (ours): as it was
        elif line.lstrip().startswith("└") and records:
            records[-1].append(line.strip(" └"))
        else:
            records.append([line])
    for parts in records:
        match = _NATIVE.match(parts[0])
        severity, message = (match.group(1), match.group(2)) if match else ("INFO", parts[0])
        message = " ".join([message, *parts[1:]])
        level = _NATIVE_LEVELS.get(severity, logging.INFO)
        if any(marker in message for marker in _BENIGN):
            level = logging.DEBUG
        logger.log(level, message, extra={"json_fields": {"source": "litert", "native_severity": severity}})
    sys.stderr.flush()


def close_quietly_at_exit(close: Callable[[], None], logger: logging.Logger) -> None:
    """At interpreter exit: ``close()`` with its native lines as JSON, then drop what native code prints after.

    LiteRT's environments print a line each as they are destroyed; the ones owned by the engine are
    destroyed by ``close()`` inside the capture, the process-wide ones by C++ static destructors after
    Python is gone, when nothing is left to re-emit them: fd 2 then goes to /dev/null.
    """

    def at_exit() -> None:
        with native_output_as_json(logger):
            close()
            gc.collect()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    atexit.register(at_exit)
