"""Export a Keras classifier to a serving bundle, verified against the Keras model before writing.

Steps (each a function below): **load** the Keras file, split it at the Grad-CAM layer and turn the
head into NumPy ops; **convert** the backbone to LiteRT (optionally quantized); **verify or refuse**:
write the bundle to a staging file, serve it with the LiteRT engine on a few inputs and compare with
TensorFlow; **write** it into place only when it agrees.
TensorFlow is imported inside these functions only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dermal_fn.core import bundle as bundle_format
from dermal_fn.core.engine import Engine, LiteRTEngine, litert_runtime
from dermal_fn.core.head import Head
from dermal_fn.core.imaging import INPUT_PRESETS, INPUT_SCALES, RESIZE_METHODS, InputScale, Normalization
from dermal_fn.errors import ExportError

logger = logging.getLogger(__name__)

Quantization = Literal["none", "fp16", "int8-dynamic", "int8"]
QUANTIZATIONS: tuple[Quantization, ...] = ("none", "fp16", "int8-dynamic", "int8")


@dataclass(frozen=True)
class InputSpec:
    """What the model expects of its input: the scale, the normalisation after it, the resize."""

    scale: InputScale = "raw"
    normalization: Normalization = field(default_factory=Normalization)
    resize: str = "bilinear"
    preset: str | None = None  # "caffe" or "torch" when it came from one


INPUT_CHOICES = (*INPUT_SCALES, *INPUT_PRESETS)


def input_spec(
    input_scale: str = "raw",
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize: str = "bilinear",
) -> InputSpec:
    """``--input-scale`` (a scale or a preset), then ``--mean``/``--std`` (per channel, after the scale)."""
    if input_scale not in INPUT_CHOICES:
        raise ExportError(f"expected --input-scale in {list(INPUT_CHOICES)}, found {input_scale!r}")
    if resize not in RESIZE_METHODS:
        raise ExportError(f"expected resize in {sorted(RESIZE_METHODS)}, found {resize!r}")
    preset = input_scale if input_scale in INPUT_PRESETS else None
    scale, normalization = INPUT_PRESETS[input_scale] if preset else (input_scale, Normalization())
    for name, values in (("--mean", mean), ("--std", std)):
        if values is not None and (len(values) != 3 or not all(np.isfinite(v) for v in values)):
            raise ExportError(f"expected {name} to be three numbers R,G,B, found {list(values)}")
    if std is not None and not all(v > 0 for v in std):
        raise ExportError(f"expected --std to be positive, found {list(std)}")
    if mean is not None or std is not None:
        normalization = Normalization(
            mean=_triple(mean) if mean is not None else normalization.mean,
            std=_triple(std) if std is not None else normalization.std,
            channels=normalization.channels,
        )
    checked_scale: InputScale = "unit" if scale == "unit" else "symmetric" if scale == "symmetric" else "raw"
    return InputSpec(scale=checked_scale, normalization=normalization, resize=resize, preset=preset)


def _triple(values: Sequence[float]) -> tuple[float, float, float]:
    return float(values[0]), float(values[1]), float(values[2])


# given the model's input (height, width), the int8 calibration inputs
CalibrationSource = Callable[[tuple[int, int]], Sequence[np.ndarray]]

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
    # the LiteRT that ran the bundle here: serving on the same runtime, with the backbone's CRC-32
    # intact, need not run it on a zero image again at load (dermal_fn.core.engine.LiteRTEngine)
    runtime: str = ""

    def as_json(self) -> dict[str, float | int | str]:
        """Plain data for the manifest."""
        return {k: (round(v, 9) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _sha256(path: Path) -> str:
    """A file's SHA-256; for a SavedModel folder, over each file's relative path and SHA-256, sorted."""
    from model_fetch.digest import file_digests, folder_sha256

    return folder_sha256(path) if path.is_dir() else file_digests(path).sha256


def verification_inputs(
    size: tuple[int, int],
    scale: InputScale,
    *,
    count: int = 4,
    seed: int = 0,
    normalization: Normalization | None = None,
) -> list[np.ndarray]:
    """Smooth random images in the model's input range (seeded), shape (1, h, w, 3) float32."""
    from PIL import Image

    from dermal_fn.core.imaging import model_input

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.uint8)
        image = Image.fromarray(coarse, mode="RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 12, size=(size[0], size[1], 3))
        pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        out.append(
            model_input(
                Image.fromarray(pixels, mode="RGB"), size=size, scale=scale, normalization=normalization
            )
        )
    return out


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
        signature = tf.TensorSpec((1, h, w, 3), tf.float32)
        if type(backbone).__module__.startswith("tf_keras"):
            # Keras 2 has no Model.export: convert its inference function, batch 1, training off
            function = tf.function(lambda x: backbone(x, training=False), input_signature=[signature])
            converter = tf.lite.TFLiteConverter.from_concrete_functions(
                [function.get_concrete_function()], backbone
            )
        else:
            saved = os.path.join(tmp, "saved_model")
            backbone.export(saved, format="tf_saved_model", verbose=False, input_signature=[signature])
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

    from dermal_fn.core.gradcam import grad_cam
    from dermal_fn.keras.reference import KerasEngine

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
        runtime=litert_runtime(),
    )


@dataclass(frozen=True)
class Loaded:
    """Step 1: the Keras model read and split, with its labels."""

    keras_engine: Any  # dermal_fn.keras.reference.KerasEngine
    labels: tuple[str, ...]

    @property
    def split(self) -> Any:
        """The model cut at the Grad-CAM layer."""
        return self.keras_engine.split

    @property
    def head(self) -> Head:
        """The NumPy head."""
        return self.keras_engine.head


def load(
    model_path: Path,
    *,
    labels: str | Path | Sequence[str] | None,
    layer: str | None,
    spec: InputSpec,
    custom_objects: str | Path | None = None,
) -> Loaded:
    """Step 1: read the Keras file (with the Keras that wrote it), split it at ``layer``, translate the head."""
    from dermal_fn.keras.formats import custom_objects_from
    from dermal_fn.keras.reference import KerasEngine, read_labels

    if not model_path.exists():
        raise ExportError(f"expected a Keras model at {model_path}, found nothing")
    keras_engine = KerasEngine(
        model_path,
        sha256=_sha256(model_path),
        layer=layer,
        input_scale=spec.scale,
        resize=spec.resize,
        normalization=spec.normalization,
        custom_objects=custom_objects_from(custom_objects),
    )
    n_classes = keras_engine.head.n_classes
    if labels is None or isinstance(labels, (str, Path)):
        label_tuple = read_labels(labels, n_classes)
    else:
        label_tuple = tuple(labels)
        if len(label_tuple) != n_classes:
            raise ExportError(f"expected {n_classes} labels, found {len(label_tuple)}")
    return Loaded(keras_engine=keras_engine, labels=label_tuple)


def manifest_for(
    loaded: Loaded,
    *,
    model_path: Path,
    backbone: bytes,
    quantize: Quantization,
    spec: InputSpec,
    name: str | None,
) -> bundle_format.Manifest:
    """The manifest of the bundle about to be verified (verification figures are added after)."""
    import tensorflow as tf

    from dermal_fn.keras.formats import inspect_file, keras_of

    split_ = loaded.split
    keras = keras_of(loaded.keras_engine.model)
    file = inspect_file(model_path)
    return bundle_format.Manifest(
        name=name or model_path.stem,
        labels=loaded.labels,
        input_size=split_.input_size,
        input_scale=spec.scale,
        resize=spec.resize,
        normalization=spec.normalization,
        preset=spec.preset,
        layer=split_.layer_name,
        feature_map_shape=split_.feature_map_shape,
        quantization=quantize,
        backbone_bytes=len(backbone),
        extra={
            "source": {
                "keras_file": model_path.name,
                "keras_sha256": loaded.keras_engine.info.sha256,
                "kind": file.kind,
                "written_by_keras": file.written_by,
                "tensorflow": tf.__version__,
                "keras": f"{keras.__name__} {keras.__version__}",
                "exported_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
            }
        },
    )


def refusals(report: Verification, *, quantize: Quantization) -> list[str]:
    """Step 3's verdict: why this bundle must not be written (empty: it may)."""
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
    return problems


def verify_or_refuse(
    staging: Path, loaded: Loaded, *, quantize: Quantization, spec: InputSpec, count: int
) -> Verification:
    """Step 3: serve the staged bundle with LiteRT, compare it with Keras; ExportError if it disagrees."""
    split_ = loaded.split
    engine = LiteRTEngine(staging, sha256=_sha256(staging), num_threads=min(os.cpu_count() or 1, 4))
    try:
        inputs = verification_inputs(
            split_.input_size, spec.scale, count=count, normalization=spec.normalization
        )
        report = verify(engine, loaded.keras_engine, inputs)
    finally:
        engine.close()
    logger.info(
        "      max |Δp| %.2e, max |Δheatmap| %.2e, top-1 agreement %.0f%%; head only: |Δp| %.2e, |Δheatmap| %.2e",
        report.max_probability_diff,
        report.max_heatmap_diff,
        100 * report.top1_agreement,
        report.head_max_probability_diff,
        report.head_max_heatmap_diff,
    )
    problems = refusals(report, quantize=quantize)
    if problems:
        raise ExportError("refusing to write the bundle: " + "; ".join(problems))
    return report


def export_keras(
    model_path: str | Path,
    out_path: str | Path,
    *,
    labels: str | Path | Sequence[str] | None = None,
    layer: str | None = None,
    quantize: Quantization = "none",
    calibration: Sequence[np.ndarray] | CalibrationSource = (),
    input_scale: str = "raw",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize: str = "bilinear",
    name: str | None = None,
    custom_objects: str | Path | None = None,
    verify_inputs: int = 4,
) -> Verification:
    """Turn a Keras classifier into one bundle file: load, convert, verify or refuse, write.

    ``calibration``: model inputs for ``--quantize int8``, or a function of the model's input size
    that returns them (the caller reads them, e.g. from a folder with
    :func:`dermal_fn.tools.folders.calibration_images`). ``input_scale``: raw, unit, symmetric, or
    a preset (caffe, torch); ``mean``/``std`` normalise per channel after it. ``model_path``: a
    ``.keras`` or ``.h5`` file or a Keras 2 SavedModel folder, loaded with the Keras that wrote it.
    """
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"expected --quantize in {QUANTIZATIONS}, found {quantize!r}")
    spec = input_spec(input_scale, mean=mean, std=std, resize=resize)
    model_path, out_path = Path(model_path), Path(out_path)
    started = time.perf_counter()

    logger.info("[1/5] loading %s", model_path.name)
    loaded = load(model_path, labels=labels, layer=layer, spec=spec, custom_objects=custom_objects)
    split_, head = loaded.split, loaded.head
    logger.info(
        "[2/5] split at %r: input %s, feature map %s, head %s -> %s",
        split_.layer_name,
        split_.input_size,
        split_.feature_map_shape,
        [op.kind for op in head.ops],
        head.output_activation + (" (binary)" if head.binary else ""),
    )

    samples: Sequence[np.ndarray] = ()
    if quantize == "int8":
        samples = calibration(split_.input_size) if callable(calibration) else calibration
        if not samples:
            raise ExportError("expected calibration images for --quantize int8, found none")
        logger.info("      int8 calibration on %d images", len(samples))
    logger.info("[3/5] converting the backbone to LiteRT (quantization: %s)", quantize)
    t0 = time.perf_counter()
    backbone = convert_backbone(
        split_.backbone, input_size=split_.input_size, quantize=quantize, calibration=samples
    )
    logger.info("      backbone: %.1f MB in %.1f s", len(backbone) / 1e6, time.perf_counter() - t0)
    manifest = manifest_for(
        loaded,
        model_path=model_path,
        backbone=backbone,
        quantize=quantize,
        spec=spec,
        name=name,
    )

    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = out_path.with_name(f".{out_path.name}.verifying")
    try:
        bundle_format.write(staging, backbone=backbone, manifest=manifest, head=head)
        logger.info("[4/5] verifying the bundle against Keras on %d inputs", verify_inputs)
        report = verify_or_refuse(staging, loaded, quantize=quantize, spec=spec, count=verify_inputs)
        final = dataclasses.replace(manifest, extra={**manifest.extra, "verification": report.as_json()})
        bundle_format.write(out_path, backbone=backbone, manifest=final, head=head)
    finally:
        staging.unlink(missing_ok=True)
    logger.info(
        "[5/5] wrote %s (%.1f MB) in %.1f s",
        out_path,
        out_path.stat().st_size / 1e6,
        time.perf_counter() - started,
    )
    return report
