"""What the trust signals cost on EfficientNetV2-S @384: RSS and time per request, assessed or not.

    python -m bench.trust_cost [--model bench/out/effnetv2s_384_none.dermal] [--requests 15]

Calibrates the bundle on generated images (the 7 labels assigned in turn: the weights are random, so
the figures are costs, not accuracy), then in one fresh process per configuration serves a 12 MP
photo ``--requests`` times through the service: uncalibrated with ``assess=false``, uncalibrated
assessed, calibrated assessed. Reports private RSS (RssAnon: what the statistics and checks can cost) and file-backed RSS
(RssFile: mapped model and weight-cache pages, shared and reclaimable, which vary with the page
cache from run to run) after the requests, the peak (VmHWM), the median total time, and the median
time of the checks themselves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import results
from bench.server import REPO

DEFAULT_MODEL = REPO / "bench" / "out" / "effnetv2s_384_none.dermal"


def child(bundle: str, photo_path: str, n: int, assess: bool) -> dict[str, Any]:
    """In a fresh process: ``n`` predictions of one photo, the assessment's own time measured apart."""
    import dataclasses
    import time

    from dermal_fn.core import trust
    from dermal_fn.serving import service as service_module
    from dermal_fn.serving.config import Settings
    from dermal_fn.serving.options import PredictOptions

    photo = Path(photo_path).read_bytes()
    settings = dataclasses.replace(
        Settings.from_env({}),
        model_uri=bundle,
        litert_threads=2,
        memory_limit_mb=None,
        memory_soft_limit_mb=None,
    )
    service = service_module.Service(settings)
    assess_ms: list[float] = []
    quality_ms: list[float] = []

    def timed(original: Any, into: list[float]) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            out = original(*args, **kwargs)
            into.append((time.perf_counter() - started) * 1e3)
            return out

        return wrapper

    service_module.assessment_json = timed(service_module.assessment_json, assess_ms)
    trust.photo_quality = timed(trust.photo_quality, quality_ms)
    totals = []
    body: Any = {}
    for _ in range(n):
        body = service.predict(photo, PredictOptions(assess=assess)).body
        totals.append(body["timing_ms"]["total"])
    status = {
        line.split(":")[0]: int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile"))
    }
    return {
        "totals": totals,
        "assess_ms": assess_ms,
        "quality_ms": quality_ms,
        "rss_mb": status["VmRSS"] / 1024,
        "hwm_mb": status["VmHWM"] / 1024,
        "anon_mb": status["RssAnon"] / 1024,
        "file_mb": status["RssFile"] / 1024,
        "distribution": body.get("assessment", {}).get("distribution"),
    }


def measure(bundle: Path, photo: Path, *, requests: int, assess: bool) -> dict[str, Any]:
    """One fresh process serving ``bundle``; its figures."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.trust_cost",
            "--child",
            str(bundle),
            str(photo),
            str(requests),
            "1" if assess else "0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _median_run(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over fresh processes of each figure (per-request lists pooled)."""
    return {
        "rss_mb": statistics.median(s["rss_mb"] for s in samples),
        "hwm_mb": statistics.median(s["hwm_mb"] for s in samples),
        "anon_mb": statistics.median(s["anon_mb"] for s in samples),
        "file_mb": statistics.median(s["file_mb"] for s in samples),
        "totals": [statistics.median(s["totals"]) for s in samples],
        "assess_ms": [x for s in samples for x in s["assess_ms"]],
        "quality_ms": [x for s in samples for x in s["quality_ms"]],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["--child"]:  # one measuring process (see measure)
        child_bundle, child_photo, child_n, child_assess = args_in[1:5]
        sys.stdout.write(
            json.dumps(child(child_bundle, child_photo, int(child_n), child_assess == "1")) + "\n"
        )
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.trust_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, default=15)
    parser.add_argument("--images", type=int, default=280, help="calibration images (default 280)")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per configuration (median)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from bench.images import PHONE_SIZE, photo_jpeg
    from dermal_fn.core import bundle as bundle_format
    from dermal_fn.demo import synth
    from dermal_fn.tools.trust import calibrate

    labels = bundle_format.read(args.model).manifest.labels
    with tempfile.TemporaryDirectory(prefix="dermal-trust-cost-") as tmp:
        root = Path(tmp)
        batch = synth.generate_batch(args.images, seed=5, size=384)
        from PIL import Image

        for index, pixels in enumerate(batch.images):
            folder = root / "data" / labels[index % len(labels)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{index:05d}.jpg", quality=92)
        calibrated = root / "calibrated.dermal"
        calibrate(args.model, root / "data", calibrated, progress=None)
        photo = root / "photo.jpg"
        photo.write_bytes(photo_jpeg(PHONE_SIZE))
        for bundle in (args.model, calibrated):  # each bundle's XNNPACK weight cache built once, not measured
            measure(bundle, photo, requests=1, assess=False)
        configurations = {
            "uncalibrated, assess=false": (args.model, False),
            "uncalibrated, assessed": (args.model, True),
            "calibrated, assessed": (calibrated, True),
        }
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configurations}
        for _ in range(args.runs):  # interleaved, so drift of the machine hits every configuration alike
            for name, (bundle, assess) in configurations.items():
                runs[name].append(measure(bundle, photo, requests=args.requests, assess=assess))
        rows = {name: _median_run(samples) for name, samples in runs.items()}
        sizes = {"uncalibrated": args.model.stat().st_size, "calibrated": calibrated.stat().st_size}
    lines = [
        f"{args.model.name}, {args.requests} requests of a 12 MP photo per process, medians of {args.runs} fresh "
        f"processes per configuration (weight caches warm) "
        f"(calibration.npz adds {(sizes['calibrated'] - sizes['uncalibrated']) / 2**20:.2f} MB to the file)",
        "",
        "| configuration | private RSS (RssAnon, MB) | file-backed RSS (RssFile, MB) | peak VmHWM (MB) | median total (ms) | distribution + confidence (ms) | quality (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        assessment = f"{statistics.median(row['assess_ms']):.2f}" if row["assess_ms"] else "–"
        quality = f"{statistics.median(row['quality_ms']):.2f}" if row["quality_ms"] else "–"
        lines.append(
            f"| {name} | {row['anon_mb']:.1f} | {row['file_mb']:.1f} | {row['hwm_mb']:.1f} | {statistics.median(row['totals']):.1f} | "
            f"{assessment} | {quality} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    results.write("trust_cost", {"table": lines})
    return 0


if __name__ == "__main__":
    sys.exit(main())
