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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dermal_fn.core import bundle as bundle_format
from dermal_fn.core.engine import Inference, LiteRTEngine
from dermal_fn.core.head import Head
from dermal_fn.core.imaging import INPUT_PRESETS, INPUT_SCALES, RESIZE_METHODS, InputScale, Normalization
from dermal_fn.errors import ExportError
from dermal_fn.keras.convert import convert_backbone
from dermal_fn.keras.mixed import MAX_FLOAT_LAYERS
from dermal_fn.keras.verify import (
    MIN_AGREEMENT,
    MIN_HEATMAP_R,
    QUANTIZATIONS,
    Quantization,
    QuantizationReport,
    Verification,
    compare_quantized,
    fp32_references,
    refusals,
    verification_inputs,
    verify,
)
from model_fetch.digest import path_sha256

logger = logging.getLogger(__name__)


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
    if isinstance(labels, (str, Path)) and not Path(labels).is_file():  # said before the slow model load
        raise ExportError(f"expected a labels file at {labels}, found nothing")
    keras_engine = KerasEngine(
        model_path,
        sha256=path_sha256(model_path),
        layer=layer,
        input_scale=spec.scale,
        resize=spec.resize,
        normalization=spec.normalization,
        custom_objects=custom_objects_from(custom_objects),
        sidecar_labels=False,  # the labels are --labels or class_0…; no other file is read
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


def verify_or_refuse(
    staging: Path, loaded: Loaded, *, quantize: Quantization, spec: InputSpec, count: int
) -> Verification:
    """Step 3: serve the staged bundle with LiteRT, compare it with Keras; ExportError if it disagrees."""
    split_ = loaded.split
    engine = LiteRTEngine(staging, sha256=path_sha256(staging), num_threads=min(os.cpu_count() or 1, 4))
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


GENERATED_GATE_IMAGES = 24


def gate_inputs(
    loaded: Loaded,
    *,
    spec: InputSpec,
    held_out: Sequence[np.ndarray] | CalibrationSource | None,
    source: str,
) -> tuple[list[np.ndarray], str]:
    """The held-out images the gate compares on, and where they came from (generated ones if none)."""
    split_ = loaded.split
    inputs = list(held_out(split_.input_size) if callable(held_out) else (held_out or ()))
    if inputs:
        return inputs, source
    generated = verification_inputs(
        split_.input_size, spec.scale, count=GENERATED_GATE_IMAGES, seed=7, normalization=spec.normalization
    )
    return (
        generated,
        "generated images (no photos were given: pass --verify DIR or --calibration DIR of your own)",
    )


def measure_gate(
    staging: Path,
    loaded: Loaded,
    inputs: Sequence[np.ndarray],
    *,
    source: str,
    min_agreement: float,
    min_heatmap_r: float,
    references: Sequence[Inference] | None = None,
) -> QuantizationReport:
    """Step 4b: the staged quantized bundle against the fp32 model on held-out images."""
    engine = LiteRTEngine(staging, sha256=path_sha256(staging), num_threads=min(os.cpu_count() or 1, 4))
    try:
        gate = compare_quantized(
            engine,
            loaded.keras_engine,
            inputs,
            source=source,
            min_agreement=min_agreement,
            min_heatmap_r=min_heatmap_r,
            references=references,
        )
    finally:
        engine.close()
    logger.info(
        "      against fp32 on %d %s: top-1 agreement %.3f, mean heatmap r %.3f (min %.3f), top-20%% IoU %.3f, "
        "max |Δp| %.3f",
        gate.images,
        source,
        gate.top1_agreement,
        gate.heatmap_r_mean,
        gate.heatmap_r_min,
        gate.top_region_iou_mean,
        gate.max_probability_diff,
    )
    return gate


def refuse_below_gate(gate: QuantizationReport, *, quantize: Quantization) -> None:
    """ExportError naming the figures that missed and what to try; nothing when the gate holds."""
    if not gate.misses:
        return
    hint = (
        "calibrate on more of your own photos (--calibration DIR, 100 or more), add --mixed-precision to keep "
        "the layers int8 hurts most in float, or use --quantize int8-dynamic or fp16"
        if quantize == "int8"
        else "use --quantize fp16 or none"
    )
    raise ExportError(
        f"refusing to write the {quantize} bundle: against the fp32 model on {gate.images} {gate.source}, "
        + "; ".join(gate.misses)
        + f"; {hint}"
    )


def mixed_precision(
    staging: Path,
    loaded: Loaded,
    *,
    full_int8: bytes,
    full_gate: QuantizationReport,
    calibration: Sequence[np.ndarray],
    inputs: Sequence[np.ndarray],
    write_staged: Callable[[bytes], None],
    max_float_layers: int,
) -> tuple[bytes, QuantizationReport, dict[str, object]]:
    """Step 4c, after full int8 missed: keep its most harmful layers float until the gate holds.

    Returns the backbone, its gate and the manifest's ``mixed_precision`` section (the layers kept
    float, every try, the backbone's time on one thread against full int8); ExportError if no
    try within ``max_float_layers`` holds.
    """
    from dermal_fn.keras import mixed
    from dermal_fn.keras.convert import check_integer_backbone, float_converter

    split_ = loaded.split
    logger.info("      mixed precision: measuring how far quantizing each layer alone moves the feature map")
    t0 = time.perf_counter()
    with float_converter(split_.backbone, input_size=split_.input_size) as converter:
        ranking = mixed.LayerRanking(converter, calibration)
    logger.info(
        "      %d quantized layers (%d measured) ranked in %.0f s; most harmful: %s",
        len(ranking.layers),
        ranking.measured,
        time.perf_counter() - t0,
        ", ".join(f"{h.name} ({h.feature_map_error or 0.0:.3f})" for h in ranking.layers[:3]),
    )

    references = fp32_references(loaded.keras_engine, inputs)  # the same for every try

    def gate(backbone: bytes) -> QuantizationReport:
        write_staged(backbone)
        return measure_gate(
            staging,
            loaded,
            inputs,
            source=full_gate.source,
            min_agreement=full_gate.min_agreement,
            min_heatmap_r=full_gate.min_heatmap_r,
            references=references,
        )

    result = mixed.search(ranking.layers, ranking.backbone, gate, max_float_layers=max_float_layers)
    kept = [h.tensor for h in result.float_layers]
    check_integer_backbone(result.backbone, float_layers=kept)
    int8_ms, mixed_ms = mixed.backbone_ms([full_int8, result.backbone], input_size=split_.input_size)
    logger.info(
        "      %d layer(s) kept float; backbone on one thread %.1f ms against full int8's %.1f ms (%.2fx)",
        len(kept),
        mixed_ms,
        int8_ms,
        mixed_ms / int8_ms,
    )
    section: dict[str, object] = {
        "float_layers": [h.as_json() for h in result.float_layers],
        "quantized_layers": len(ranking.layers),
        "ranking": "feature_map_error: RMS(feature map - float's) / RMS(float's) with only that layer "
        f"quantized, on {min(len(calibration), mixed.HARM_IMAGES)} calibration photos, for {ranking.measured} "
        "layers (the largest local errors first); relative_error: the layer's own int8 output against a "
        "float op fed the same int8 inputs",
        "full_int8": {
            "top1_agreement": round(full_gate.top1_agreement, 6),
            "heatmap_r_mean": round(full_gate.heatmap_r_mean, 6),
            "passed": False,
        },
        "tries": [attempt.as_json() for attempt in result.attempts],
        "backbone_ms_one_thread": {"int8": round(int8_ms, 3), "mixed": round(mixed_ms, 3)},
        "slowdown_vs_int8": round(mixed_ms / int8_ms, 3),
    }
    return result.backbone, result.report, section


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
    held_out: Sequence[np.ndarray] | CalibrationSource | None = None,
    held_out_source: str = "held-out photos",
    min_agreement: float = MIN_AGREEMENT,
    min_heatmap_r: float = MIN_HEATMAP_R,
    mixed: bool = False,
    max_float_layers: int = MAX_FLOAT_LAYERS,
) -> Verification:
    """Turn a Keras classifier into one bundle file: load, convert, verify or refuse, write.

    A quantized bundle is also held to the fp32 model on ``held_out`` images (model inputs, or a
    function of the input size; ``held_out_source`` says where they came from): below
    ``min_agreement`` top-1 agreement or ``min_heatmap_r`` mean heatmap correlation nothing is
    written (ExportError). Without images it is held to generated ones, and says so. With ``mixed``,
    a full-int8 bundle that misses keeps its most harmful layers (up to ``max_float_layers``) in
    float until it holds (:mod:`dermal_fn.keras.mixed`), and the manifest says which and what it cost.

    ``calibration``: model inputs for ``--quantize int8``, or a function of the model's input size
    that returns them (the caller reads them, e.g. from a folder with
    :func:`dermal_fn.tools.folders.calibration_images`). ``input_scale``: raw, unit, symmetric, or
    a preset (caffe, torch); ``mean``/``std`` normalise per channel after it. ``model_path``: a
    ``.keras`` or ``.h5`` file or a Keras 2 SavedModel folder, loaded with the Keras that wrote it.
    """
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"expected --quantize in {QUANTIZATIONS}, found {quantize!r}")
    if mixed and quantize != "int8":
        raise ExportError(f"expected --quantize int8 with --mixed-precision, found --quantize {quantize}")
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
        verification: dict[str, object] = dict(report.as_json())
        if quantize != "none":
            inputs, source = gate_inputs(loaded, spec=spec, held_out=held_out, source=held_out_source)
            gate = measure_gate(
                staging,
                loaded,
                inputs,
                source=source,
                min_agreement=min_agreement,
                min_heatmap_r=min_heatmap_r,
            )
            quantized: dict[str, object] = {}
            if gate.misses and mixed and quantize == "int8":
                logger.info("      full int8 misses the gate (%s)", "; ".join(gate.misses))

                def write_staged(candidate: bytes) -> None:
                    staged = dataclasses.replace(manifest, backbone_bytes=len(candidate))
                    bundle_format.write(staging, backbone=candidate, manifest=staged, head=head)

                backbone, gate, quantized["mixed_precision"] = mixed_precision(
                    staging,
                    loaded,
                    full_int8=backbone,
                    full_gate=gate,
                    calibration=samples,
                    inputs=inputs,
                    write_staged=write_staged,
                    max_float_layers=max_float_layers,
                )
                manifest = dataclasses.replace(manifest, backbone_bytes=len(backbone))
                # the staged bundle is the passing one: its end-to-end figures replace full int8's
                report = verify_or_refuse(staging, loaded, quantize=quantize, spec=spec, count=verify_inputs)
                verification = dict(report.as_json())
            refuse_below_gate(gate, quantize=quantize)
            verification["quantized"] = {**gate.as_json(), **quantized}
        final = dataclasses.replace(manifest, extra={**manifest.extra, "verification": verification})
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
