"""Quantization cost on EfficientNetV2-S: bundle sizes per mode, then RAM, latency and agreement.

    python -m bench.quant_sizes --out-dir bench/out/quant [--size 384] [--images 20]

Builds the benchmark's EfficientNetV2-S (``bench.models``: random weights, seeded; they cost the same
bytes, memory and time as trained ones, though not the same agreement), saves it as ``.keras``, exports it with ``--quantize none``, ``fp16``, ``int8-dynamic`` and ``int8`` (each in
its own ``python -m dermal_fn export`` process), prints the sizes as a Markdown table and checks that
the int8 bundle is at most 35 % of the fp32 one. With ``--images N > 0`` it then runs
``python -m dermal_fn compare`` of the fp32 bundle against each quantized one on N generated images
(peak RSS and p50 latency are measured in one child process per model). Exports are cached in the
output folder; delete it to rebuild. Exit status 1 when the size check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import models, results
from bench.models import LABELS

MODES = ("none", "fp16", "int8-dynamic", "int8")
INT8_MAX_SHARE = 0.35


def xnnpack_speedup(bundle: Path, *, size: int, runs: int = 5) -> dict[str, float]:
    """Median backbone ms with LiteRT's default delegate (XNNPACK) and with plain builtin kernels.

    A clear speedup for the int8 bundle shows XNNPACK really runs its integer ops.
    """
    import statistics

    import numpy as np
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    pixels = np.random.default_rng(0).uniform(0, 255, size=(1, size, size, 3)).astype(np.float32)
    medians = {}
    for name, resolver in (
        ("xnnpack_ms", OpResolverType.AUTO),
        ("builtin_ms", OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES),
    ):
        interpreter = Interpreter(
            model_path=str(bundle), num_threads=1, experimental_op_resolver_type=resolver
        )
        interpreter.allocate_tensors()
        index = interpreter.get_input_details()[0]["index"]
        times = []
        for _ in range(runs + 1):
            interpreter.set_tensor(index, pixels)
            started = time.perf_counter()
            interpreter.invoke()
            times.append((time.perf_counter() - started) * 1e3)
        medians[name] = round(statistics.median(times[1:]), 1)
        del interpreter
    return medians


def _run(command: Sequence[str], *, log: Path) -> float:
    """Run a child with its output in a log file; the seconds it took."""
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as sink:
        code = subprocess.run(list(command), stdout=sink, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed with status {code}; see {log}")
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    """Build, export every mode, report sizes (and compare figures); 1 when int8 is too big."""
    parser = argparse.ArgumentParser(prog="python -m bench.quant_sizes", description=__doc__)
    parser.add_argument("--out-dir", type=Path, default=Path("bench/out/quant"))
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--images", type=int, default=20, help="generated images for compare; 0 skips it")
    args = parser.parse_args(argv)

    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    labels = out / "labels.txt"
    labels.write_text("".join(f"{label}\n" for label in LABELS), encoding="utf-8")
    python = sys.executable
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    keras_path = models.keras_path(models.ModelSpec("effnetv2s", args.size), out)  # the one model builder
    seconds["build"] = time.perf_counter() - started
    bundles: dict[str, Path] = {}
    for mode in MODES:
        bundle = out / f"effnetv2s_{args.size}_{mode}.dermal"
        if not bundle.is_file():
            seconds[f"export {mode}"] = _run(
                [
                    python,
                    "-m",
                    "dermal_fn",
                    "export",
                    str(keras_path),
                    "--out",
                    str(bundle),
                    "--labels",
                    str(labels),
                    "--quantize",
                    mode,
                ],
                log=out / f"export_{mode}.log",
            )
        bundles[mode] = bundle

    sizes = {mode: path.stat().st_size for mode, path in bundles.items()}
    base_size = sizes["none"]
    report: dict[str, object] = {
        "model": f"EfficientNetV2-S {args.size}x{args.size}, 7 classes, random seeded weights",
        "keras_bytes": keras_path.stat().st_size,
        "bundle_bytes": sizes,
        "share_of_fp32": {mode: round(size / base_size, 4) for mode, size in sizes.items()},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    lines = [
        f"EfficientNetV2-S {args.size}x{args.size} (.keras {keras_path.stat().st_size / 1e6:.1f} MB)",
        "",
        "| mode | bundle MB | share of fp32 |",
        "|---|---:|---:|",
    ]
    lines += [f"| {mode} | {size / 1e6:.1f} | {size / base_size:.0%} |" for mode, size in sizes.items()]
    print("\n".join(lines), flush=True)

    speed = {mode: xnnpack_speedup(path, size=args.size) for mode, path in bundles.items()}
    report["backbone_ms_one_thread"] = speed
    lines = ["", "| mode | backbone ms, XNNPACK | backbone ms, builtin kernels |", "|---|---:|---:|"]
    lines += [f"| {mode} | {v['xnnpack_ms']:.0f} | {v['builtin_ms']:.0f} |" for mode, v in speed.items()]
    print("\n".join(lines), flush=True)

    if args.images > 0:
        from dermal_fn.demo.synth import save_folder

        images = out / f"images_{args.size}"
        if not images.is_dir():
            save_folder(images, args.images, seed=7, size=args.size)
        comparisons = {}
        for mode in MODES[1:]:
            target = out / f"compare_{mode}.json"
            _run(
                [
                    python,
                    "-m",
                    "dermal_fn",
                    "compare",
                    str(bundles["none"]),
                    str(bundles[mode]),
                    "--images",
                    str(images),
                    "--json",
                    str(target),
                ],
                log=out / f"compare_{mode}.log",
            )
            comparisons[mode] = json.loads(target.read_text(encoding="utf-8"))
            print((out / f"compare_{mode}.log").read_text(encoding="utf-8"), flush=True)
        report["compare"] = comparisons

    results.write("quant_sizes", report, also=out / "quant_sizes.json")
    share = sizes["int8"] / base_size
    if share > INT8_MAX_SHARE:
        print(f"FAIL: int8 bundle is {share:.0%} of fp32, above {INT8_MAX_SHARE:.0%}", file=sys.stderr)
        return 1
    print(f"ok: int8 bundle is {share:.0%} of fp32 (limit {INT8_MAX_SHARE:.0%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
