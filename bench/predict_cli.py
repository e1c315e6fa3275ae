"""Peak RSS and latency of ``python -m dermal_fn predict`` on a bundle vs the same ``.keras`` (TensorFlow).

    .venv/bin/python -m bench.predict_cli [--bundle B] [--keras K] [--image I] [--runs 3]

Each run is a fresh process measured by GNU time (peak RSS = ru_maxrss of the CLI process, wall time
from process start to exit). ``in-process`` is the answer's own ``timing_ms.total`` (decode, model,
Grad-CAM, overlay). Medians of ``--runs`` runs, both backends in the same run. The defaults are the
benchmark's EfficientNetV2-S @384 artifacts (``python -m bench.run`` builds them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import results

OUT = Path(__file__).resolve().parent / "out"


def measure(model: Path, image: Path) -> tuple[float, float, float]:
    """(peak RSS MB, wall seconds, in-process total ms) of one CLI prediction."""
    command = [
        "/usr/bin/time",
        "-f",
        "%M %e",
        sys.executable,
        "-m",
        "dermal_fn",
        "predict",
        str(model),
        str(image),
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=True,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
    )
    max_kb, wall = done.stderr.strip().splitlines()[-1].split()
    body = json.loads(done.stdout)
    assert body["gradcam"]["status"] == "ok"
    return int(max_kb) * 1024 / 1e6, float(wall), float(body["timing_ms"]["total"])


def main(argv: Sequence[str] | None = None) -> int:
    """Measure both backends and print a Markdown table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=OUT / "effnetv2s_384_none.dermal")
    parser.add_argument("--keras", type=Path, default=OUT / "effnetv2s_384.keras")
    parser.add_argument("--image", type=Path, default=OUT / "photo_4000x3000.jpg")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    rows = {}
    for name, model in (
        ("bundle (LiteRT + NumPy head)", args.bundle),
        (".keras (TensorFlow backend)", args.keras),
    ):
        runs = [measure(model, args.image) for _ in range(args.runs)]
        rows[name] = tuple(statistics.median(r[i] for r in runs) for i in range(3))
    print(f"| `predict` on {args.image.name}, medians of {args.runs} | peak RSS | wall time | in-process |")
    print("|---|---:|---:|---:|")
    for name, (rss, wall, total) in rows.items():
        print(f"| {name} | {rss:.0f} MB | {wall:.2f} s | {total:.0f} ms |")
    (b_rss, b_wall, b_total), (k_rss, k_wall, k_total) = rows.values()
    print(
        f"| ratio TensorFlow / bundle | {k_rss / b_rss:.1f}x | {k_wall / b_wall:.1f}x | {k_total / b_total:.1f}x |"
    )
    results.write(
        "predict_cli",
        {
            name: {"peak_rss_mb": rss, "wall_s": wall, "in_process_ms": total}
            for name, (rss, wall, total) in rows.items()
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
