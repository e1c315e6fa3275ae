"""Export a Keras classifier to a serving bundle, verified against the Keras model before writing.

Steps: load the ``.keras`` file; split it at the Grad-CAM layer; convert the backbone to LiteRT
(optionally quantized); turn the head into NumPy ops; write the bundle to a temporary file; serve it
with the LiteRT engine on a few inputs and compare with TensorFlow; only then move it into place.
TensorFlow is imported inside these functions only.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dermal_fn import bundle as bundle_format
from dermal_fn.engine import Engine, LiteRTEngine
from dermal_fn.errors import ExportError
from dermal_fn.imaging import INPUT_SCALES, RESIZE_METHODS, InputScale

logger = logging.getLogger(__name__)

Quantization = Literal["none", "fp16", "int8-dynamic", "int8"]
QUANTIZATIONS: tuple[Quantization, ...] = ("none", "fp16", "int8-dynamic", "int8")

PROBABILITY_TOLERANCE = 1e-4
HEATMAP_TOLERANCE = 1e-3
# probability-score heatmaps are checked against TensorFlow only for min(p, 1 - p) above this
PROBABILITY_SCORE_MIN = 1e-3


@dataclass(frozen=True)
class Verification:
    """How the written bundle compares with TensorFlow on the verification inputs."""

    inputs: int
    max_probability_diff: float  # bundle end to end vs the Keras model
    max_heatmap_diff: float
    top1_agreement: float
    head_max_probability_diff: float  # NumPy head vs Keras head on the bundle's own feature map
    head_max_heatmap_diff: float

    def as_json(self) -> dict[str, float | int]:
        """Plain data for the manifest."""
        return {k: (round(v, 9) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _sha256(path: Path) -> str:
    from model_fetch.digest import file_digests

    return file_digests(path).sha256


def verification_inputs(
    size: tuple[int, int], scale: InputScale, *, count: int = 4, seed: int = 0
) -> list[np.ndarray]:
    """Smooth random images in the model's input range (seeded), shape (1, h, w, 3) float32."""
    from PIL import Image

    from dermal_fn.imaging import model_input

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.uint8)
        image = Image.fromarray(coarse, mode="RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 12, size=(size[0], size[1], 3))
        pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        out.append(model_input(Image.fromarray(pixels, mode="RGB"), size=size, scale=scale))
    return out


MIN_CALIBRATION_IMAGES = 8
MAX_CALIBRATION_FILES = 10_000  # files looked at before giving up on a folder


def calibration_images(
    folder: str | Path | None,
    size: tuple[int, int],
    scale: InputScale,
    *,
    limit: int = 100,
    resize: str = "bilinear",
) -> list[np.ndarray]:
    """Model inputs from a folder of images, for int8 calibration; generated ones when none is given.

    Files that are not decodable images, blank (one colour) images and images under an eighth of the
    model's input side are left out and counted; fewer than ``MIN_CALIBRATION_IMAGES`` usable images
    is an :class:`ExportError` naming what the folder held instead.
    """
    if folder is None:
        logger.warning(
            "no --calibration folder given: calibrating int8 on generated images; "
            "pass a folder of real photos for a faithful int8 model"
        )
        return _generated_calibration(size, scale, count=min(limit, 64))
    root = Path(folder)
    if not root.is_dir():
        found = "nothing" if not root.exists() else "a file"
        raise ExportError(f"expected --calibration to be a folder of images, found {found} at {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ExportError(f"expected --calibration folder {root} to hold images, found an empty folder")
    inputs: list[np.ndarray] = []
    rejected: dict[str, list[str]] = {}  # reason -> file names
    for path in files[:MAX_CALIBRATION_FILES]:
        problem, pixels = _calibration_input(path, size=size, scale=scale, resize=resize)
        if problem is not None:
            rejected.setdefault(problem, []).append(path.name)
            continue
        assert pixels is not None
        inputs.append(pixels)
        if len(inputs) >= limit:
            break
    summary = "; ".join(
        f"{len(names)} {reason} (e.g. {names[0]})" for reason, names in sorted(rejected.items())
    )
    if len(inputs) < MIN_CALIBRATION_IMAGES:
        raise ExportError(
            f"expected at least {MIN_CALIBRATION_IMAGES} usable images in calibration folder {root}, "
            f"found {len(inputs)} of {len(files)} files" + (f": {summary}" if summary else "")
        )
    if rejected:
        logger.warning("calibration: left out %s", summary)
    return inputs


def _calibration_input(
    path: Path, *, size: tuple[int, int], scale: InputScale, resize: str
) -> tuple[str | None, np.ndarray | None]:
    """(None, model input) for a usable calibration image, else (the reason, None)."""
    from dermal_fn.errors import InvalidImage, UnsupportedMediaType
    from dermal_fn.imaging import decode, model_input

    try:
        decoded = decode(path.read_bytes(), min_side=max(size))
    except UnsupportedMediaType:
        return "files of an unsupported image type", None
    except InvalidImage:
        return "files that are not decodable images", None
    except OSError:
        return "unreadable files", None
    rgb = np.asarray(decoded.rgb)
    if min(decoded.rgb.size) < max(1, min(size) // 8):
        return f"images smaller than {max(1, min(size) // 8)} px on a side", None
    if int(rgb.max()) - int(rgb.min()) < 2:
        return "blank (one-colour) images", None
    return None, model_input(decoded.rgb, size=size, scale=scale, resize=resize)


def _generated_calibration(size: tuple[int, int], scale: InputScale, *, count: int) -> list[np.ndarray]:
    from PIL import Image

    from dermal_fn.demo import synth
    from dermal_fn.imaging import model_input

    images, _, _ = synth.generate_batch(count, seed=1234, size=max(size))
    return [model_input(Image.fromarray(img, mode="RGB"), size=size, scale=scale) for img in images]


def convert_backbone(
    backbone: Any,
    *,
    input_size: tuple[int, int],
    quantize: Quantization,
    calibration: Sequence[np.ndarray] = (),
) -> bytes:
    """The backbone as a LiteRT flatbuffer, with batch size 1 and the requested quantization."""
    import tensorflow as tf
    from tensorflow.lite.python.convert import ConverterError

    h, w = input_size
    with tempfile.TemporaryDirectory(prefix="dermal-export-") as tmp:
        saved = os.path.join(tmp, "saved_model")
        backbone.export(
            saved,
            format="tf_saved_model",
            verbose=False,
            input_signature=[tf.TensorSpec((1, h, w, 3), tf.float32)],
        )
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        if quantize == "fp16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif quantize == "int8-dynamic":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        elif quantize == "int8":
            samples = list(calibration)

            def representative() -> Iterator[list[np.ndarray]]:
                for sample in samples:
                    yield [sample]

            if not samples:
                raise ExportError("expected calibration images for --quantize int8, found none")
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = representative
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            # integer inside, float at the edges: the engine feeds float pixels and the head reads floats
            converter.inference_input_type = tf.float32
            converter.inference_output_type = tf.float32
        try:
            flatbuffer = bytes(converter.convert())
        except ConverterError as exc:
            raise ExportError(
                f"expected the backbone to convert with --quantize {quantize}, found: {str(exc).strip()[:500]}"
            ) from exc
    if quantize == "int8":
        check_integer_backbone(flatbuffer)
    return flatbuffer


def check_integer_backbone(flatbuffer: bytes) -> None:
    """Refuse an int8 backbone whose input/output are not float32 or that kept float convolutions."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    edges = [*interpreter.get_input_details(), *interpreter.get_output_details()]
    not_float = [(d["name"], np.dtype(d["dtype"]).name) for d in edges if np.dtype(d["dtype"]) != np.float32]
    if not_float:
        raise ExportError(f"expected float32 input and output on the int8 backbone, found {not_float}")
    float_ops = [
        op["op_name"]
        for op in interpreter._get_ops_details()
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
        and any(interpreter._get_tensor_details(i, 0)["dtype"] == np.float32 for i in op["inputs"] if i >= 0)
    ]
    if float_ops:
        raise ExportError(f"expected an integer-only backbone, found float ops {sorted(set(float_ops))}")


def verify(
    bundle_engine: LiteRTEngine,
    keras_engine: Engine,
    inputs: Sequence[np.ndarray],
) -> Verification:
    """Compare the bundle with TensorFlow: end to end, and head-only on the bundle's feature map."""
    import tensorflow as tf

    from dermal_fn.gradcam import grad_cam
    from dermal_fn.keras_backend import KerasEngine

    assert isinstance(keras_engine, KerasEngine)
    tape_head = keras_engine.tape_head
    max_p = max_h = head_p = head_h = 0.0
    agree = 0
    n_classes = len(bundle_engine.info.labels)
    for pixels in inputs:
        ours = bundle_engine.run(pixels, score="logit")
        ref = keras_engine.run(pixels, class_index=ours.class_index, score="logit")
        assert ours.grid is not None and ref.grid is not None
        max_p = max(max_p, float(np.max(np.abs(ours.probabilities - ref.probabilities))))
        max_h = max(max_h, float(np.max(np.abs(ours.grid - ref.grid))))
        agree += int(np.argmax(ours.probabilities) == np.argmax(ref.probabilities))
        features = bundle_engine.feature_map(pixels)
        for score in ("logit", "probability"):
            for class_index in sorted({ours.class_index, (ours.class_index + 1) % n_classes}):
                mine = bundle_engine.head.forward(features)
                p = float(mine.probabilities[class_index])
                if score == "probability" and min(p, 1.0 - p) < PROBABILITY_SCORE_MIN:
                    # dp/dz = p (1 - p): TensorFlow's float32 1 - p near 0 or 1 is rounding noise
                    # (measured: 0.2 % error on the gradient at p = 0.99999), no reference to check
                    continue
                grad = bundle_engine.head.backward(
                    mine,
                    bundle_engine.head.score_gradient(mine, class_index=class_index, score=score),
                )
                tensor = tf.convert_to_tensor(features)
                with tf.GradientTape() as tape:
                    tape.watch(tensor)
                    logits = tape_head.logits(tensor)
                    probs = tape_head.probabilities(logits)
                    value = tape_head.score(logits, probs, class_index=class_index, score=score)
                tf_grad = tape.gradient(value, tensor).numpy()
                head_p = max(head_p, float(np.max(np.abs(mine.probabilities - probs.numpy()[0]))))
                head_h = max(
                    head_h,
                    float(np.max(np.abs(grad_cam(features, grad) - grad_cam(features, tf_grad)))),
                )
    return Verification(
        inputs=len(inputs),
        max_probability_diff=max_p,
        max_heatmap_diff=max_h,
        top1_agreement=agree / max(len(inputs), 1),
        head_max_probability_diff=head_p,
        head_max_heatmap_diff=head_h,
    )


def export_keras(
    model_path: str | Path,
    out_path: str | Path,
    *,
    labels: str | Path | Sequence[str] | None = None,
    layer: str | None = None,
    quantize: Quantization = "none",
    calibration: str | Path | None = None,
    input_scale: InputScale = "raw",
    resize: str = "bilinear",
    name: str | None = None,
    verify_inputs: int = 4,
) -> Verification:
    """Turn a ``.keras`` classifier into one bundle file; refuse to write one that disagrees."""
    from dermal_fn.keras_backend import KerasEngine, read_labels

    if quantize not in QUANTIZATIONS:
        raise ExportError(f"expected --quantize in {QUANTIZATIONS}, found {quantize!r}")
    if input_scale not in INPUT_SCALES:
        raise ExportError(f"expected --input-scale in {INPUT_SCALES}, found {input_scale!r}")
    if resize not in RESIZE_METHODS:
        raise ExportError(f"expected resize in {sorted(RESIZE_METHODS)}, found {resize!r}")
    model_path = Path(model_path)
    out_path = Path(out_path)
    if not model_path.is_file():
        raise ExportError(f"expected a .keras file at {model_path}, found nothing")
    started = time.perf_counter()

    logger.info("[1/5] loading %s", model_path.name)
    keras_engine = KerasEngine(
        model_path, sha256=_sha256(model_path), layer=layer, input_scale=input_scale, resize=resize
    )
    split_ = keras_engine.split
    head = keras_engine.head
    n_classes = head.n_classes
    if labels is None or isinstance(labels, (str, Path)):
        label_tuple = read_labels(labels, n_classes)
    else:
        label_tuple = tuple(labels)
        if len(label_tuple) != n_classes:
            raise ExportError(f"expected {n_classes} labels, found {len(label_tuple)}")
    logger.info(
        "[2/5] split at %r: input %s, feature map %s, head %s -> %s",
        split_.layer_name,
        split_.input_size,
        split_.feature_map_shape,
        [op.kind for op in head.ops],
        head.output_activation + (" (binary)" if head.binary else ""),
    )

    calibration_inputs: list[np.ndarray] = []
    if quantize == "int8":
        calibration_inputs = calibration_images(calibration, split_.input_size, input_scale, resize=resize)
        logger.info("      int8 calibration on %d images", len(calibration_inputs))
    elif calibration is not None:
        logger.warning("--calibration is used by --quantize int8 only; ignored for %s", quantize)
    logger.info("[3/5] converting the backbone to LiteRT (quantization: %s)", quantize)
    t0 = time.perf_counter()
    backbone = convert_backbone(
        split_.backbone,
        input_size=split_.input_size,
        quantize=quantize,
        calibration=calibration_inputs,
    )
    logger.info("      backbone: %.1f MB in %.1f s", len(backbone) / 1e6, time.perf_counter() - t0)

    import keras
    import tensorflow as tf

    manifest = bundle_format.Manifest(
        name=name or model_path.stem,
        labels=label_tuple,
        input_size=split_.input_size,
        input_scale=input_scale,
        resize=resize,
        layer=split_.layer_name,
        feature_map_shape=split_.feature_map_shape,
        quantization=quantize,
        backbone_bytes=len(backbone),
        extra={
            "source": {
                "keras_file": model_path.name,
                "keras_sha256": keras_engine.info.sha256,
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "exported_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
            }
        },
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = out_path.with_name(f".{out_path.name}.verifying")
    try:
        bundle_format.write(staging, backbone=backbone, manifest=manifest, head=head)
        logger.info("[4/5] verifying the bundle against Keras on %d inputs", verify_inputs)
        engine = LiteRTEngine(staging, sha256=_sha256(staging), num_threads=min(os.cpu_count() or 1, 4))
        inputs = verification_inputs(split_.input_size, input_scale, count=verify_inputs)
        report = verify(engine, keras_engine, inputs)
        engine.close()
        logger.info(
            "      max |Δp| %.2e, max |Δheatmap| %.2e, top-1 agreement %.0f%%; head only: |Δp| %.2e, |Δheatmap| %.2e",
            report.max_probability_diff,
            report.max_heatmap_diff,
            100 * report.top1_agreement,
            report.head_max_probability_diff,
            report.head_max_heatmap_diff,
        )
        problems = []
        if (
            report.head_max_probability_diff > PROBABILITY_TOLERANCE
            or report.head_max_heatmap_diff > HEATMAP_TOLERANCE
        ):
            problems.append(
                f"the NumPy head differs from Keras (|Δp| {report.head_max_probability_diff:.2e}, "
                f"|Δheatmap| {report.head_max_heatmap_diff:.2e})"
            )
        if quantize == "none" and (
            report.max_probability_diff > PROBABILITY_TOLERANCE or report.max_heatmap_diff > HEATMAP_TOLERANCE
        ):
            problems.append(
                f"the bundle differs from Keras end to end (|Δp| {report.max_probability_diff:.2e} > "
                f"{PROBABILITY_TOLERANCE:g} or |Δheatmap| {report.max_heatmap_diff:.2e} > {HEATMAP_TOLERANCE:g})"
            )
        if problems:
            raise ExportError("refusing to write the bundle: " + "; ".join(problems))
        # rewrite with the verification figures recorded, then move into place
        final_manifest = bundle_format.Manifest(
            **{**manifest.__dict__, "extra": {**manifest.extra, "verification": report.as_json()}}
        )
        bundle_format.write(out_path, backbone=backbone, manifest=final_manifest, head=head)
    finally:
        staging.unlink(missing_ok=True)
    logger.info(
        "[5/5] wrote %s (%.1f MB) in %.1f s",
        out_path,
        out_path.stat().st_size / 1e6,
        time.perf_counter() - started,
    )
    return report
