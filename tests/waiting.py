"""Waiting on another process: one polling loop for every test that waits for a state to change.

Code that waits takes a clock, and tests of it drive a :class:`FakeClock`. What is left is waiting on
something outside the test's process (a server starting, a model loading in a worker, a log line
being written): :func:`wait_until` polls a predicate against a deadline and says what it waited for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class FakeClock:
    """A monotonic clock that moves only when a test says so (``advance``)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        self.now += seconds


def wait_until(
    predicate: Callable[[], T | None],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.05,
    describe: Callable[[], str] = lambda: "",
    clock: Callable[[], float] = time.monotonic,
    pause: Callable[[float], None] = time.sleep,
) -> T:
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout_s``.

    ``describe`` adds context to the failure (a server's log tail, say).
    """
    deadline = clock() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if clock() > deadline:
            context = describe()
            raise AssertionError(
                f"expected {what} within {timeout_s:g} s" + (f"; {context}" if context else "")
            )
        pause(interval_s)
