"""Quantization report: what a quantized bundle costs against its base, on a folder of images.

    python -m dermal_fn compare BASE OTHER --images DIR [--min-agreement 0.98] [--min-heatmap-r 0.95]

For every image: top-1 agreement, the largest |Δprobability| over the classes, and the Grad-CAM grid
of BASE's predicted class (logit score) in both models, compared by Pearson r and by the IoU of their
top-20 % cells. Each model's peak RSS and p50 latency are measured in its own child process
(``python -m dermal_fn.tools.compare --measure MODEL --images DIR``) so one model's memory never counts
against the other. The report is a Markdown table (and optionally JSON); the exit status is 1 when a
threshold given on the command line is missed, 2 on errors, so it can gate a deployment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dermal_fn.core.agreement import pearson_r, top_region_iou
from dermal_fn.errors import DermalError, InvalidImage, UnsupportedMediaType
from dermal_fn.tools.folders import image_files
from model_fetch.digest import path_sha256

if TYPE_CHECKING:
    from PIL import Image

    from dermal_fn.core.engine import Engine

logger = logging.getLogger(__name__)

MEASURE_TIMEOUT_S = 1800.0


# --- data --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageResult:
    """BASE against OTHER on one image."""

    image: str
    base_class: int
    other_class: int
    max_abs_probability_diff: float
    heatmap_r: float
    heatmap_iou: float


@dataclass(frozen=True)
class Measurement:
    """One model measured alone in a fresh process."""

    images: int
    load_ms: float
    p50_ms: float  # backbone + head + Grad-CAM, after a warm-up
    p50_model_ms: float
    rss_before_load_mb: float
    peak_rss_mb: float


@dataclass(frozen=True)
class Summary:
    """The comparison over all images."""

    images: int
    skipped: int
    top1_agreement: float
    mean_abs_probability_diff: float
    max_abs_probability_diff: float
    mean_heatmap_r: float
    min_heatmap_r: float
    mean_heatmap_iou: float
    min_heatmap_iou: float


def decoded_images(files: Sequence[Path], *, min_side: int) -> Iterator[tuple[Path, Image.Image]]:
    """(path, RGB image) for each decodable file; the others are logged and left out."""
    from dermal_fn.core.imaging import decode

    for path in files:
        try:
            yield path, decode(path.read_bytes(), min_side=min_side).rgb
        except (InvalidImage, UnsupportedMediaType) as exc:
            logger.warning("skipping %s: %s", path.name, exc)


def open_engine(path: str | Path, *, num_threads: int = 1) -> Engine:
    """A bundle or ``.keras`` file as an engine, with a clear error for anything else."""
    from dermal_fn.serving.engines import load_engine

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a bundle or .keras file at {path}, found nothing")
    return load_engine(path, sha256=path_sha256(Path(path)), num_threads=num_threads)


def _inputs(engine: Engine, rgb: Image.Image) -> np.ndarray:

    info = engine.info
    return info.model_input(rgb)


def compare_engines(base: Engine, other: Engine, files: Sequence[Path]) -> tuple[Summary, list[ImageResult]]:
    """Run both engines on every decodable file and compare them image by image."""
    if tuple(base.info.labels) != tuple(other.info.labels):
        raise DermalError(
            f"expected both models to have the same labels, found {list(base.info.labels)} "
            f"and {list(other.info.labels)}"
        )
    min_side = max(512, *base.info.input_size, *other.info.input_size)
    results: list[ImageResult] = []
    for path, rgb in decoded_images(files, min_side=min_side):
        ours = base.run(_inputs(base, rgb), score="logit")
        theirs = other.run(_inputs(other, rgb), class_index=ours.class_index, score="logit")
        assert ours.grid is not None and theirs.grid is not None
        if ours.grid.shape != theirs.grid.shape:
            raise DermalError(
                f"expected Grad-CAM grids of one shape, found {ours.grid.shape} and {theirs.grid.shape}"
            )
        results.append(
            ImageResult(
                image=path.name,
                base_class=ours.class_index,
                other_class=int(np.argmax(theirs.probabilities)),
                max_abs_probability_diff=float(np.max(np.abs(ours.probabilities - theirs.probabilities))),
                heatmap_r=pearson_r(ours.grid, theirs.grid),
                heatmap_iou=top_region_iou(ours.grid, theirs.grid),
            )
        )
    if not results:
        raise InvalidImage(f"expected decodable images among {len(files)} files, found none")
    return summarise(results, skipped=len(files) - len(results)), results


def summarise(results: Sequence[ImageResult], *, skipped: int = 0) -> Summary:
    """Agreement and the mean/extreme differences over images."""
    dp = [r.max_abs_probability_diff for r in results]
    rs = [r.heatmap_r for r in results]
    ious = [r.heatmap_iou for r in results]
    return Summary(
        images=len(results),
        skipped=skipped,
        top1_agreement=sum(r.base_class == r.other_class for r in results) / len(results),
        mean_abs_probability_diff=statistics.fmean(dp),
        max_abs_probability_diff=max(dp),
        mean_heatmap_r=statistics.fmean(rs),
        min_heatmap_r=min(rs),
        mean_heatmap_iou=statistics.fmean(ious),
        min_heatmap_iou=min(ious),
    )


# --- measuring one model in its own process ----------------------------------------------------------


def measure(model: str | Path, files: Sequence[Path], *, num_threads: int = 1) -> Measurement:
    """Load one model, warm it up, time it on every image; peak RSS of this process at the end."""
    from dermal_fn.serving.memory import peak_rss_mb, rss_mb

    before = rss_mb()
    started = time.perf_counter()
    engine = open_engine(model, num_threads=num_threads)
    load_ms = (time.perf_counter() - started) * 1e3
    min_side = max(512, *engine.info.input_size)
    totals: list[float] = []
    models: list[float] = []
    warmed = False
    for _, rgb in decoded_images(files, min_side=min_side):
        pixels = _inputs(engine, rgb)
        if not warmed:
            engine.run(pixels, score="logit")
            warmed = True
        t0 = time.perf_counter()
        result = engine.run(pixels, score="logit")
        totals.append((time.perf_counter() - t0) * 1e3)
        models.append(result.model_ms)
    if not totals:
        raise InvalidImage(f"expected decodable images among {len(files)} files, found none")
    peak = peak_rss_mb()
    return Measurement(
        images=len(totals),
        load_ms=load_ms,
        p50_ms=statistics.median(totals),
        p50_model_ms=statistics.median(models),
        rss_before_load_mb=before,
        peak_rss_mb=peak if peak is not None else rss_mb(),
    )


def measure_in_child(
    model: str | Path, images: str | Path, *, limit: int | None, num_threads: int = 1
) -> Measurement:
    """Run :func:`measure` in a fresh ``python -m dermal_fn.tools.compare --measure`` process."""
    command = [
        sys.executable,
        "-m",
        "dermal_fn.tools.compare",
        "--measure",
        str(model),
        "--images",
        str(images),
    ]
    command += ["--threads", str(num_threads)]
    if limit:
        command += ["--limit", str(limit)]
    package_root = str(Path(__file__).resolve().parents[1])  # the child imports this same dermal_fn
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
    }
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=MEASURE_TIMEOUT_S, env=env, check=False
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DermalError(f"expected the measuring process for {Path(model).name} to succeed, found: {tail}")
    return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))


# --- report ------------------------------------------------------------------------------------------


def markdown(
    base: Path, other: Path, summary: Summary, sizes: dict[str, int], measurements: dict[str, Measurement]
) -> str:
    """The report as a Markdown table: one column per model, differences against BASE."""

    def mb(n: float) -> str:
        return f"{n / 1e6:.2f}"

    rows = [
        ("file", base.name, other.name),
        ("quantization", model_kind(base), model_kind(other)),
        ("size (MB)", mb(sizes["base"]), f"{mb(sizes['other'])} ({sizes['other'] / sizes['base']:.0%})"),
        (
            "peak RSS (MB)",
            f"{measurements['base'].peak_rss_mb:.0f}",
            f"{measurements['other'].peak_rss_mb:.0f}",
        ),
        (
            "RSS before load (MB)",
            f"{measurements['base'].rss_before_load_mb:.0f}",
            f"{measurements['other'].rss_before_load_mb:.0f}",
        ),
        ("p50 latency (ms)", f"{measurements['base'].p50_ms:.1f}", f"{measurements['other'].p50_ms:.1f}"),
        (
            "p50 backbone+head (ms)",
            f"{measurements['base'].p50_model_ms:.1f}",
            f"{measurements['other'].p50_model_ms:.1f}",
        ),
        ("top-1 agreement", "-", f"{summary.top1_agreement:.1%}"),
        (
            "|Δprobability| mean / max",
            "-",
            f"{summary.mean_abs_probability_diff:.4f} / {summary.max_abs_probability_diff:.4f}",
        ),
        ("heatmap r mean / min", "-", f"{summary.mean_heatmap_r:.4f} / {summary.min_heatmap_r:.4f}"),
        (
            "heatmap top-20% IoU mean / min",
            "-",
            f"{summary.mean_heatmap_iou:.3f} / {summary.min_heatmap_iou:.3f}",
        ),
    ]
    lines = [
        f"Compared on {summary.images} images"
        + (f" ({summary.skipped} undecodable files skipped)" if summary.skipped else ""),
        "",
        "| | BASE | OTHER |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {a} | {b} |" for name, a, b in rows]
    return "\n".join(lines)


def model_kind(path: Path) -> str:
    """The bundle's quantization, or ``keras`` for a ``.keras`` file."""
    from dermal_fn.core import bundle as bundle_format

    if bundle_format.is_bundle(path):
        return bundle_format.read(path).manifest.quantization
    return "keras"


def failed_thresholds(
    summary: Summary, *, min_agreement: float | None, min_heatmap_r: float | None
) -> list[str]:
    """A line for each threshold the comparison misses."""
    failures = []
    if min_agreement is not None and summary.top1_agreement < min_agreement:
        failures.append(
            f"top-1 agreement {summary.top1_agreement:.4f} is below --min-agreement {min_agreement}"
        )
    if min_heatmap_r is not None and summary.mean_heatmap_r < min_heatmap_r:
        failures.append(
            f"mean heatmap r {summary.mean_heatmap_r:.4f} is below --min-heatmap-r {min_heatmap_r}"
        )
    return failures


def run(args: argparse.Namespace) -> int:
    """Compare, print the table (and write JSON); 1 when a threshold is missed."""
    base_path = Path(args.base)
    other_path = Path(args.other)
    threads = int(getattr(args, "threads", 1) or 1)
    limit = args.limit
    for name, value, low in (
        ("--min-agreement", args.min_agreement, 0.0),
        ("--min-heatmap-r", args.min_heatmap_r, -1.0),
    ):
        if value is not None and not (low <= value <= 1.0):
            raise DermalError(f"expected {name} between {low:g} and 1, found {value}")
    files = image_files(args.images, limit=limit, option="--images", suffixes=None)
    with contextlib.ExitStack() as opened:  # closed even when the other one fails to open
        base = opened.enter_context(contextlib.closing(open_engine(base_path, num_threads=threads)))
        other = opened.enter_context(contextlib.closing(open_engine(other_path, num_threads=threads)))
        summary, per_image = compare_engines(base, other, files)
    del base, other
    measurements = {
        "base": measure_in_child(base_path, args.images, limit=limit, num_threads=threads),
        "other": measure_in_child(other_path, args.images, limit=limit, num_threads=threads),
    }
    sizes = {"base": base_path.stat().st_size, "other": other_path.stat().st_size}
    failures = failed_thresholds(summary, min_agreement=args.min_agreement, min_heatmap_r=args.min_heatmap_r)
    sys.stdout.write(markdown(base_path, other_path, summary, sizes, measurements) + "\n")
    if args.json_out:
        report = {
            "base": {"path": str(base_path), "bytes": sizes["base"], **asdict(measurements["base"])},
            "other": {"path": str(other_path), "bytes": sizes["other"], **asdict(measurements["other"])},
            "summary": asdict(summary),
            "thresholds": {"min_agreement": args.min_agreement, "min_heatmap_r": args.min_heatmap_r},
            "failures": failures,
            "images": [asdict(r) for r in per_image],
        }
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for failure in failures:
        logger.error("FAIL: %s", failure)
    return 1 if failures else 0


def main(args: argparse.Namespace) -> int:
    """Entry point of ``python -m dermal_fn compare``: 0 ok, 1 threshold missed, 2 error."""
    try:
        return run(args)
    except (DermalError, OSError, subprocess.TimeoutExpired) as exc:
        logger.error("error: %s", exc)
        return 2


def _measure_main(argv: Sequence[str] | None = None) -> int:
    """The child: ``python -m dermal_fn.tools.compare --measure MODEL --images DIR``; one JSON line out."""
    parser = argparse.ArgumentParser(prog="python -m dermal_fn.tools.compare")
    parser.add_argument("--measure", required=True, metavar="MODEL")
    parser.add_argument("--images", required=True)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    try:
        measured = measure(
            args.measure,
            image_files(args.images, limit=args.limit, option="--images", suffixes=None),
            num_threads=args.threads,
        )
    except (DermalError, OSError) as exc:
        logger.error("error: %s", exc)
        return 2
    sys.stdout.write(json.dumps(asdict(measured)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_measure_main())
