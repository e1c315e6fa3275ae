"""What this CPU's instruction sets allow int8 to gain: one convolution, fp32 against full int8, one thread.

    .venv/bin/python -m bench.isa [--side 48] [--channels 192]

EfficientNetV2-S's time is mostly 1x1 and 3x3 convolutions, i.e. matrix products. This builds one
3x3 convolution (``--channels`` in and out, ``--side`` x ``--side``; seeded), converts it to LiteRT in
fp32 and in full int8 (TensorFlow in a child process), and times ``invoke()`` of both on one thread
under XNNPACK, taking turns. The ratio is the most full int8 can gain on this host: with AVX-512 VNNI
(or AVX-VNNI) an int8 multiply-accumulate runs four to a 32-bit lane; with AVX2 alone XNNPACK
widens int8 to 16 bits first, and the product runs little faster than fp32's FMA. Writes
``bench/out/isa.json`` with the CPU's flags.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from bench import results


def build(out_dir: Path, *, side: int, channels: int) -> None:
    """Write conv_fp32.tflite and conv_int8.tflite (TensorFlow is imported here; run in a child)."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((side, side, channels)),
            keras.layers.Conv2D(channels, 3, padding="same", activation="relu"),
        ]
    )
    saved = out_dir / "saved_model"
    signature = tf.TensorSpec((1, side, side, channels), tf.float32)
    model.export(str(saved), format="tf_saved_model", verbose=False, input_signature=[signature])
    rng = np.random.default_rng(0)

    def representative() -> Iterator[list[np.ndarray]]:
        for _ in range(16):
            yield [rng.normal(0, 1, (1, side, side, channels)).astype(np.float32)]

    for mode in ("fp32", "int8"):
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        if mode == "int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = representative
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.float32
            converter.inference_output_type = tf.float32
        (out_dir / f"conv_{mode}.tflite").write_bytes(converter.convert())


def main(argv: Sequence[str] | None = None) -> int:
    """Build the two models in a child, time them here, print and write the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.isa")
    parser.add_argument("command", nargs="?", choices=["build"])
    parser.add_argument("--side", type=int, default=48)
    parser.add_argument("--channels", type=int, default=192)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.out, side=args.side, channels=args.channels)
        return 0

    from dermal_fn.keras.mixed import backbone_ms

    with tempfile.TemporaryDirectory(prefix="dermal-isa-") as tmp:
        folder = Path(tmp)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.isa",
                "build",
                "--out",
                str(folder),
                "--side",
                str(args.side),
                "--channels",
                str(args.channels),
            ],
            check=True,
            capture_output=True,
        )
        models = [(folder / f"conv_{mode}.tflite").read_bytes() for mode in ("fp32", "int8")]
    fp32_ms, int8_ms = backbone_ms(
        models, input_size=(args.side, args.side), channels=args.channels, runs=40, max_seconds=60.0
    )
    macs = args.side * args.side * args.channels * args.channels * 9
    figures = {
        "convolution": f"3x3, {args.channels} -> {args.channels} channels, {args.side}x{args.side}",
        "macs": macs,
        "fp32_ms": round(fp32_ms, 3),
        "int8_ms": round(int8_ms, 3),
        "fp32_gmacs_per_s": round(macs / fp32_ms / 1e6, 1),
        "int8_gmacs_per_s": round(macs / int8_ms / 1e6, 1),
        "int8_speedup": round(fp32_ms / int8_ms, 2),
    }
    results.write("isa", figures)
    print(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
