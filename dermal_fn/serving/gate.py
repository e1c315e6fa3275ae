"""The admission gate: a bounded number of predict requests in flight, one inference at a time."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from dermal_fn.errors import Overloaded


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
