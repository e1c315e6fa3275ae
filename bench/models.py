"""The benchmark's models: Keras EfficientNetV2-S (random, seeded) and tiny ones, exported to bundles.

Built here, never downloaded: random weights cost the same memory and time as trained ones. Every
artifact is cached in the output folder under a name that spells its configuration, so reruns skip
the minute-long exports. TensorFlow is imported in a child process only (``python -m bench.models``
and ``python -m dermal_fn export``), so the benchmark's own process stays small.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

NUM_CLASSES = 7
LABELS = (
    "akiec",
    "bcc",
    "bkl",
    "df",
    "mel",
    "nv",
    "vasc",
)  # HAM10000's seven classes, the original Django app's
QUANTIZATIONS = ("none", "fp16", "int8-dynamic")
CALIBRATION_PHOTOS = 50  # full int8 of a random-weight model: calibrated on generated photos, for speed only
SEED = 0


@dataclass(frozen=True)
class ModelSpec:
    """One Keras model to build: the architecture and its square input side."""

    arch: str  # "effnetv2s" or "tiny"
    size: int

    @property
    def stem(self) -> str:
        """The cache key of the .keras file."""
        return f"{self.arch}_{self.size}"


def build_keras(spec: ModelSpec, out: Path) -> None:
    """Build, seed and save the classifier (TensorFlow is imported here; call in a child process)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    keras.utils.set_random_seed(SEED)
    shape = (spec.size, spec.size, 3)
    if spec.arch == "effnetv2s":
        # Keras 3's EfficientNetV2 rescales raw 0-255 input itself: the bundle default ("raw").
        base = keras.applications.EfficientNetV2S(weights=None, include_top=False, input_shape=shape)
    elif spec.arch == "tiny":
        base = keras.Sequential(
            [
                keras.Input(shape),
                keras.layers.Rescaling(1 / 255.0),
                keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
                keras.layers.Conv2D(16, 3, strides=2),
                keras.layers.BatchNormalization(),
                keras.layers.Activation("swish", name="top_activation"),
            ],
            name="tiny_backbone",
        )
    else:
        raise ValueError(f"expected arch effnetv2s or tiny, found {spec.arch!r}")
    model = keras.Sequential(
        [
            keras.Input(shape),
            base,
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(NUM_CLASSES, activation="softmax"),
        ],
        name=spec.stem,
    )
    tmp = out.with_name(out.name + ".tmp.keras")
    model.save(tmp)
    os.replace(tmp, out)


def keras_path(spec: ModelSpec, out_dir: Path) -> Path:
    """The cached .keras file of ``spec``, built in a child process when missing."""
    path = out_dir / f"{spec.stem}.keras"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "bench.models", "build", spec.arch, str(spec.size), "--out", str(path)],
        check=True,
    )
    logger.info("built %s in %.1f s", path.name, time.perf_counter() - started)
    return path


def bundle_path(spec: ModelSpec, quantize: str, out_dir: Path) -> Path:
    """The cached bundle of ``spec`` at ``quantize``, exported with ``python -m dermal_fn export``."""
    source = keras_path(spec, out_dir)
    path = out_dir / f"{spec.stem}_{quantize}.dermal"
    if path.exists() and path.stat().st_mtime >= source.stat().st_mtime:
        return path
    labels = out_dir / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    extra: list[str] = []
    if quantize != "none":
        # random weights: the quantization gate's figures mean nothing (their feature map is near
        # flat), so its floors are 0 here and the bundle is for speed and memory figures only
        # (bench.trained measures quantization on a trained model)
        extra = ["--min-agreement", "0", "--min-heatmap-r", "0"]
    if quantize == "int8":
        calibration = out_dir / f"calibration_{spec.size}"
        if not calibration.is_dir():
            from dermal_fn.demo import synth

            synth.save_folder(calibration, CALIBRATION_PHOTOS, seed=5, size=spec.size)
        extra += ["--calibration", str(calibration)]
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dermal_fn",
            "export",
            str(source),
            "--out",
            str(path),
            "--labels",
            str(labels),
            "--quantize",
            quantize,
            "--name",
            f"{spec.stem}_{quantize}",
            *extra,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=None if logger.isEnabledFor(logging.DEBUG) else subprocess.DEVNULL,
    )
    logger.info("exported %s in %.1f s", path.name, time.perf_counter() - started)
    return path


def backbone_speed(
    bundles: dict[str, Path], size: int, *, runs: int = 15, max_seconds: float = 20.0
) -> dict[str, float]:
    """Median ms of each bundle's backbone alone on one thread, the backbones taking turns."""
    from dermal_fn.core import bundle as bundle_format
    from dermal_fn.keras.mixed import backbone_ms

    # the flatbuffer opens the bundle file
    flatbuffers = [
        path.read_bytes()[: bundle_format.read(path).manifest.backbone_bytes] for path in bundles.values()
    ]
    times = backbone_ms(flatbuffers, input_size=(size, size), runs=runs, max_seconds=max_seconds)
    return {mode: round(ms, 2) for mode, ms in zip(bundles, times, strict=True)}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.models build ARCH SIZE --out FILE``: build one .keras model."""
    parser = argparse.ArgumentParser(prog="python -m bench.models")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build")
    build.add_argument("arch", choices=["effnetv2s", "tiny"])
    build.add_argument("size", type=int)
    build.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    build_keras(ModelSpec(args.arch, args.size), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
