"""LiteRT's own stderr lines as log records of ours, so a server's stderr stays one JSON record per line.

LiteRT (C++) writes plain lines straight to file descriptor 2 as it creates and destroys its
environments: ``INFO: [environment.cc:36] ...``, a vendor plugin that is not installed as a
WARNING. Cloud Logging files such lines as text or errors, and a command-line tool's user takes them
for a failure. ``native_output_as_records`` captures fd 2 around such a call and re-emits each line
through a logger, at the level the line states (INFO and below at DEBUG; benign ones at DEBUG);
the logger's handler decides the format (JSON in the server, plain text in the CLI).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator

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


_ONE_AT_A_TIME = threading.RLock()


@contextlib.contextmanager
def native_output_as_records(logger: logging.Logger) -> Iterator[None]:
    """Capture what native code writes to file descriptor 2 meanwhile; re-emit it as log records.

    Lines that are already JSON (our own records written meanwhile) pass through unchanged; ``└``
    continuation lines join the record before them; a plugin that is simply not installed is said
    at DEBUG.

    fd 2 belongs to the whole process, so captures in different threads (a load while another
    engine closes) take turns: interleaved, one would restore the other's pipe as fd 2 and its
    lines would be lost. The same thread may nest them.
    """
    with _ONE_AT_A_TIME:
        sys.stderr.flush()
        saved = os.dup(2)
        read_end, write_end = os.pipe()
        chunks: list[bytes] = []
        drainer = threading.Thread(
            target=_drain, args=(read_end, chunks), name="dermal-native-log", daemon=True
        )
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
