"""Closed-loop load: N clients, each on its own keep-alive connection, posting a photo for a fixed time."""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class VariantStats:
    """What one kind of request (e.g. ``gradcam=true``) saw."""

    latencies_ms: list[float] = field(default_factory=list)
    server_ms: dict[str, list[float]] = field(default_factory=dict)  # timing_ms from 200 bodies
    gradcam: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        """Plain numbers for the report."""
        return {
            "requests": len(self.latencies_ms),
            "p50_ms": _r(percentile(self.latencies_ms, 50)),
            "p95_ms": _r(percentile(self.latencies_ms, 95)),
            "server_median_ms": {k: _r(statistics.median(v)) for k, v in self.server_ms.items() if v},
            "gradcam": dict(self.gradcam),
        }


@dataclass
class LoadResult:
    """One load phase."""

    clients: int
    seconds: float
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    variants: dict[str, VariantStats] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        """Number of 200 answers."""
        return self.statuses.get(200, 0)

    @property
    def server_errors(self) -> int:
        """Number of 5xx answers."""
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def summary(self) -> dict[str, Any]:
        """Plain numbers for the report: throughput, statuses, errors and per-variant latency."""
        all_latencies = [x for v in self.variants.values() for x in v.latencies_ms]
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 2),
            "requests": sum(self.statuses.values()),
            "throughput_rps": round(self.ok / self.seconds, 3) if self.seconds else 0.0,
            "p50_ms": _r(percentile(all_latencies, 50)),
            "p95_ms": _r(percentile(all_latencies, 95)),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(self.errors),
            "server_errors": self.server_errors,
            "variants": {name: v.summary() for name, v in self.variants.items()},
        }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def run_load(
    port: int,
    body: bytes,
    *,
    clients: int,
    seconds: float,
    variants: Sequence[str] = ("",),
    content_type: str = "image/jpeg",
    timeout_s: float = 120.0,
) -> LoadResult:
    """``clients`` threads post ``body`` back to back for ``seconds``; each request uses the next query
    string of ``variants`` in turn (alternating variants pairs them under the same conditions)."""
    result = LoadResult(clients=clients, seconds=seconds)
    result.variants = {v: VariantStats() for v in variants}
    lock = threading.Lock()
    start_line = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        start_line.wait()
        turn = offset
        try:
            while time.perf_counter() < deadline[0]:
                variant = variants[turn % len(variants)]
                turn += 1
                t0 = time.perf_counter()
                try:
                    conn.request(
                        "POST", "/predict" + variant, body=body, headers={"Content-Type": content_type}
                    )
                    response = conn.getresponse()
                    answer = response.read()
                    status = response.status
                except (OSError, http.client.HTTPException) as exc:
                    with lock:
                        result.errors[type(exc).__name__] += 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
                    time.sleep(0.05)
                    continue
                elapsed_ms = (time.perf_counter() - t0) * 1e3
                timing: dict[str, float] = {}
                gradcam = "-"
                if status == 200:
                    parsed = json.loads(answer)
                    timing = parsed.get("timing_ms", {})
                    gradcam = parsed.get("gradcam", {}).get("status", "-")
                with lock:
                    result.statuses[status] += 1
                    if status == 200:
                        stats = result.variants[variant]
                        stats.latencies_ms.append(elapsed_ms)
                        stats.gradcam[gradcam] += 1
                        for key, value in timing.items():
                            stats.server_ms.setdefault(key, []).append(float(value))
                if status == 503:
                    time.sleep(0.1)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    deadline[0] = started + seconds
    start_line.wait()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - started
    return result
