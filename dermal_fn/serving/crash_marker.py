"""Crash markers: evidence that loading a model crashed the worker, and nothing else counted as such.

While a worker loads a model it keeps a marker file open (``<key>.<pid>.loading``) and points
Python's :mod:`faulthandler` at it: a crash signal (SIGSEGV, SIGBUS, SIGILL, SIGABRT, SIGFPE: a
corrupt flatbuffer in the runtime) writes "Fatal Python error" into the marker as the process dies.
The next worker reads the markers of processes that no longer run:

- with that text: a crashed load. After ``limit`` of them the model is refused (``ModelCrashed``)
  until the file changes, instead of crashing worker after worker;
- without it: the process ended some other way (a deploy's SIGTERM, gunicorn's SIGHUP restart, a
  scale-in, SIGKILL). That is no evidence against the model; the marker is removed. When the
  container's cgroup counted an OOM kill during that load, the holder says so (``last_exit``).

The cache folder is optional: a marker that cannot be written (read-only or full disk) leaves the
load unguarded, said once in the log with the path, rather than stopping it.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
from pathlib import Path
from typing import IO

from dermal_fn.errors import ModelCrashed
from dermal_fn.serving import memory

logger = logging.getLogger(__name__)

# a model whose load killed this many workers by a crash signal is not loaded again until it changes
MAX_CRASHED_LOADS = 2
CRASH_EVIDENCE = "Fatal Python error"


class CrashMarker:
    """``with CrashMarker(folder, key=sha256):`` around a load (see the module's account)."""

    def __init__(self, folder: Path | None, *, key: str, limit: int = MAX_CRASHED_LOADS) -> None:
        self.folder = folder
        self.key = key[:32]
        self.limit = limit
        self.path = folder / f"{self.key}.{os.getpid()}.loading" if folder is not None else None
        self.crashed: list[Path] = []
        self.out_of_memory = False  # a dead loader's marker says the cgroup OOM-killed during its load
        self._file: IO[str] | None = None
        self._faulthandler_was_on = False

    def __enter__(self) -> CrashMarker:
        if self.folder is None or self.path is None:
            return self
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            dead = [m for m in self.folder.glob(f"{self.key}.*.loading") if not process_alive(m)]
        except OSError as exc:
            logger.warning(
                "crash markers unavailable in %s (%s): loading without them", self.folder, exc.strerror
            )
            return self
        self.crashed = [m for m in dead if _crashed(m)]
        for marker in dead:
            if marker not in self.crashed:
                self.out_of_memory = self.out_of_memory or _oom_killed_since(marker)
                _remove(marker)  # a graceful stop or a SIGKILL: no verdict on the model
        if len(self.crashed) >= self.limit:
            raise ModelCrashed(
                f"expected the model to load, found it crashed the worker {len(self.crashed)} times while "
                "loading (a corrupt or incompatible backbone); replace the model file to try again",
                detail=f"crash markers in {self.folder}",
            )
        try:
            self._file = open(self.path, "w", encoding="utf-8")
            self._file.write(f"{os.getpid()} oom_kills={memory.cgroup_oom_kills()}\n")
            self._file.flush()
        except OSError as exc:
            logger.warning("crash marker %s not written (%s): loading without it", self.path, exc.strerror)
            self._file = None
            return self
        self._faulthandler_was_on = faulthandler.is_enabled()
        faulthandler.enable(file=self._file, all_threads=True)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._file is None or self.path is None:
            return
        faulthandler.disable()
        if self._faulthandler_was_on:
            faulthandler.enable(file=sys.stderr, all_threads=True)
        self._file.close()
        _remove(self.path)
        if exc_type is None:
            for marker in self.crashed:  # it loaded after all: the history is no longer a verdict
                _remove(marker)


def process_alive(marker: Path) -> bool:
    """Whether the process named in ``<key>.<pid>.loading`` still runs."""
    try:
        pid = int(marker.name.split(".")[-2])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _crashed(marker: Path) -> bool:
    try:
        return CRASH_EVIDENCE in marker.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def _oom_killed_since(marker: Path) -> bool:
    """Whether the cgroup's OOM-kill count grew since the dead loader wrote its marker."""
    try:
        first = marker.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
        recorded = int(first.split("oom_kills=", 1)[1])
    except (OSError, IndexError, ValueError):
        return False
    now = memory.cgroup_oom_kills()
    return now is not None and now > recorded


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        logger.warning("could not remove crash marker %s", path)
