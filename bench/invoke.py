"""The bare interpreter: LiteRT ``invoke()`` alone on the bundle's backbone, same input, same threads.

Run in a child process (``python -m bench.invoke BUNDLE PHOTO --threads N``), so its memory and
threads do not mix with the benchmark's; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import results


def time_invoke(
    bundle: Path, photo: Path, *, threads: int, runs: int, max_seconds: float
) -> dict[str, float]:
    """Median and p95 of ``invoke()`` in ms over up to ``runs`` runs (after 2 warm-up runs)."""
    from ai_edge_litert.interpreter import Interpreter

    from dermal_fn.core import bundle as bundle_format
    from dermal_fn.core import imaging

    manifest = bundle_format.read(bundle).manifest
    decoded = imaging.decode(photo.read_bytes(), min_side=max(imaging.DISPLAY_SIDE, *manifest.input_size))
    pixels = imaging.model_input(
        decoded.rgb, size=manifest.input_size, scale=manifest.input_scale, resize=manifest.resize
    )
    interpreter = Interpreter(model_path=str(bundle), num_threads=threads)
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    interpreter.set_tensor(int(inp["index"]), pixels)
    for _ in range(2):
        interpreter.invoke()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < runs and time.perf_counter() - started < max_seconds:
        t0 = time.perf_counter()
        interpreter.invoke()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "threads": threads,
        "runs": len(times),
        "median_ms": round(statistics.median(times), 2),
        "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 2),
        "min_ms": round(times[0], 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Print the timing of one bundle as a JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.invoke")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("photo", type=Path)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--max-seconds", type=float, default=15.0)
    args = parser.parse_args(argv)
    result = time_invoke(
        args.bundle, args.photo, threads=args.threads, runs=args.runs, max_seconds=args.max_seconds
    )
    sys.stdout.write(json.dumps(result) + "\n")
    results.write("invoke", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
