"""Batch scoring's cost: images/s through the Beam pipeline against a plain loop, same photos and bundle.

    .venv-batch/bin/python -m bench.batch [--model dermal_fn/models/synthetic_demo.dermal] [--images 600]
                                          [--size 512] [--pairs 3]

Each run is a fresh process (so each pays its own model load and warm-up, and its peak RSS is its
own): ``loop`` decodes and answers every photo with the function's own service, one at a time;
``pipeline`` runs ``dermal-fn batch`` on Beam's in-process runner, reading the same files and
writing JSON lines. The two take turns (A B A B …); the ratio is per pair, and its median is the
figure (target ≥ 0.9: the engine must not cost more than a tenth). Runs with one LiteRT thread on
one core (``taskset``-like affinity), so the figure is per core. Writes ``bench/out/batch.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import results
from bench.procs import status_mb
from bench.server import REPO

DEFAULT_MODEL = REPO / "dermal_fn" / "models" / "synthetic_demo.dermal"


def child(kind: str, model: str, folder: str, out: str) -> dict[str, Any]:
    """One measured run in this (fresh) process: seconds, images/s, peak RSS."""
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    files = sorted(str(p) for p in Path(folder).iterdir())
    started = time.perf_counter()
    if kind == "loop":
        from dermal_fn.serving.config import Settings
        from dermal_fn.serving.options import PredictOptions
        from dermal_fn.serving.service import Service

        service = Service(Settings(model_uri=model, litert_threads=1))
        n = len(service.holder.get().info.labels)
        options = PredictOptions(top_k=n, overlay="none")
        with open(out, "w") as sink:
            for path in files:
                body = service.predict(Path(path).read_bytes(), options).body
                sink.write(json.dumps({"image": path, **body}) + "\n")
    else:
        from dermal_fn.batch.pipeline import run

        run(model, folder, out, threads=1)
    seconds = time.perf_counter() - started
    peak_mb = status_mb(os.getpid(), "VmHWM")  # its own peak (ru_maxrss would carry the parent's across exec)
    return {
        "kind": kind,
        "images": len(files),
        "seconds": seconds,
        "images_per_s": len(files) / seconds,
        "peak_rss_mb": peak_mb,
    }


def measure(kind: str, model: Path, folder: Path, out: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.batch", "--child", kind, str(model), str(folder), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        raise SystemExit(f"{kind} run failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["--child"]:
        sys.stdout.write(json.dumps(child(*args_in[1:5])) + "\n")
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--size", type=int, default=512, help="side of the generated photos (JPEG)")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args(args_in)
    from dermal_fn.demo import synth

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        folder = Path(tmp) / "photos"
        synth.save_folder(folder, args.images, seed=5, size=args.size)
        runs: list[dict[str, Any]] = []
        ratios = []
        for pair in range(args.pairs):
            loop = measure("loop", args.model, folder, Path(tmp) / f"loop-{pair}.jsonl")
            beam = measure("pipeline", args.model, folder, Path(tmp) / f"rows-{pair}")
            runs += [loop, beam]
            ratios.append(beam["images_per_s"] / loop["images_per_s"])
    report = {
        "model": str(args.model),
        "images": args.images,
        "photo_side": args.size,
        "loop_images_per_s": statistics.median(r["images_per_s"] for r in runs if r["kind"] == "loop"),
        "pipeline_images_per_s": statistics.median(
            r["images_per_s"] for r in runs if r["kind"] == "pipeline"
        ),
        "ratio_pipeline_to_loop": statistics.median(ratios),
        "ratios": ratios,
        "loop_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs if r["kind"] == "loop"),
        "pipeline_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs if r["kind"] == "pipeline"),
        "runs": runs,
    }
    sys.stdout.write(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1) + "\n")
    results.write("batch", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
