"""Mixed precision: full int8 with the layers int8 hurts most kept in float, when full int8 misses the gate.

Step by step (``export --quantize int8 --mixed-precision``, only after the full-int8 bundle missed):

1. **Rank by what each layer does to the feature map** (:class:`LayerRanking`). One calibration;
   for every quantized op, the backbone with *only that op* quantized (every other op kept float)
   runs on a few calibration photos, and its harm is the relative RMS difference of the Grad-CAM
   feature map from the float backbone's: what quantizing this layer alone moves. Most harmful
   first. (TensorFlow Lite's quantization debugger also gives each op's local error, its int8
   output against a float op fed the same int8 inputs; measured on a trained EfficientNetV2-B0,
   that ranking bought almost nothing, because a layer's local error says little about how far it
   travels to the feature map: 32 layers kept float by it moved the mean heatmap r from 0.980 to
   0.988, by the measured harm to 0.996. Beyond :data:`MEASURED_LAYERS` ops, only the ops with the
   largest local errors are measured.)
2. **Keep float and re-gate** (:func:`search`): the top 1, 2, 4, 8, … layers are kept in float
   (the converter's ``denylisted_nodes``: a DEQUANTIZE before and a QUANTIZE after each) and the
   bundle is held to the same gate on the same held-out photos, until it holds or
   ``--max-float-layers`` is reached (then nothing is written).
3. **Say what it cost**: the layers kept float, each try's figures, and the backbone's time on one
   thread beside full int8's (:func:`backbone_ms`), stored in the manifest
   (``verification.quantized.mixed_precision``).

TensorFlow is imported inside :class:`LayerRanking` only.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dermal_fn.errors import ExportError
from dermal_fn.keras.verify import QuantizationReport

logger = logging.getLogger(__name__)

MAX_FLOAT_LAYERS = 32
RANKING_IMAGES = 24  # calibration photos the debugger runs for each op's local error
HARM_IMAGES = 8  # calibration photos each one-op-quantized backbone runs for its harm
MEASURED_LAYERS = 300  # ops whose harm is measured (the largest local errors first, beyond that)


@dataclass(frozen=True)
class LayerHarm:
    """One quantized op of the backbone and how much int8 moves its output."""

    tensor: str  # the op's output tensor: the name the converter keeps in float
    op: str  # CONV_2D, DEPTHWISE_CONV_2D, ADD, ...
    relative_error: float  # RMS(int8 - float) / RMS(float) at this op, from the same int8 inputs
    # RMS(feature map - float's) / RMS(float's) with only this op quantized; None: not measured
    feature_map_error: float | None = None

    @property
    def name(self) -> str:
        """The Keras layer the op came from, as the converter named it (the convolution's, when fused)."""
        if "/" not in self.tensor:  # e.g. "StatefulPartitionedCall_1:0": the converter's name for the output
            return f"output ({self.tensor})"
        parts = [segment.split("/") for segment in self.tensor.split(";")]
        for path in parts:
            if len(path) >= 2 and path[-1] in ("convolution", "depthwise", "MatMul", "Conv2D", "BiasAdd"):
                return path[-2]
        return parts[0][-2] if len(parts[0]) >= 2 else self.tensor

    def as_json(self) -> dict[str, str | float | None]:
        """Plain data for the manifest."""
        return {
            "layer": self.name,
            "op": self.op,
            "feature_map_error": None if self.feature_map_error is None else round(self.feature_map_error, 6),
            "relative_error": round(self.relative_error, 6),
            "tensor": self.tensor,
        }


def _relative_error(
    float_tensor: np.ndarray, quant_tensor: np.ndarray, scale: float, zero_point: int
) -> float:
    """Noise over signal at one op: the int8 output dequantized against the float op's output."""
    dequantized = (quant_tensor.astype(np.float32) - zero_point) * scale
    reference = float_tensor.astype(np.float32)
    signal = float(np.sqrt(np.mean(np.square(reference))))
    noise = float(np.sqrt(np.mean(np.square(dequantized - reference))))
    return noise / max(signal, 1e-12)


class LayerRanking:
    """The calibrated backbone, its layers ranked by harm, and full int8 with any layers kept float."""

    def __init__(self, converter: Any, calibration: Sequence[np.ndarray]) -> None:
        """``converter``: a TFLiteConverter of the float backbone (float32 input and output)."""
        import tensorflow as tf

        samples = list(calibration)
        if not samples:
            raise ExportError("expected calibration images for --mixed-precision, found none")
        ranking_samples = samples[:: max(1, len(samples) // RANKING_IMAGES)][:RANKING_IMAGES]

        def calibration_set() -> Iterator[list[np.ndarray]]:
            for sample in samples:
                yield [sample]

        def ranking_set() -> Iterator[list[np.ndarray]]:
            for sample in ranking_samples:
                yield [sample]

        debugging = tf.lite.experimental
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = calibration_set
        with warnings.catch_warnings():
            # the debugger runs TensorFlow's own interpreter, which warns that it is deprecated
            warnings.filterwarnings(
                "ignore", message=".*(deprecated|preserve_all_tensors)", category=UserWarning
            )
            # one calibration; the debug model (int8 op beside float op) comes from it
            self._debugger = debugging.QuantizationDebugger(
                converter=converter,
                debug_dataset=calibration_set,
                debug_options=debugging.QuantizationDebugOptions(),
            )
            # the same debug model read with every tensor kept, to compare each op's int8 and float outputs
            reader = debugging.QuantizationDebugger(
                quant_debug_model_content=self._debugger.quant_model,
                debug_dataset=ranking_set,
                debug_options=debugging.QuantizationDebugOptions(
                    layer_direct_compare_metrics={"relative_error": _relative_error}
                ),
            )
            reader.run()
        dump = io.StringIO()
        reader.layer_statistics_dump(dump)
        rows = list(csv.DictReader(io.StringIO(dump.getvalue())))
        local = [
            LayerHarm(
                tensor=row["tensor_name"], op=row["op_name"], relative_error=float(row["relative_error"])
            )
            for row in rows
            if row["tensor_name"] and np.isfinite(float(row["relative_error"]))
        ]
        by_local = sorted(local, key=lambda h: -h.relative_error)
        self.measured = min(len(by_local), MEASURED_LAYERS)
        harm_samples = samples[:: max(1, len(samples) // HARM_IMAGES)][:HARM_IMAGES]
        reference = feature_maps(self._debugger.calibrated_model, harm_samples)
        names = [h.tensor for h in local]
        started, measured = time.perf_counter(), []
        for i, layer in enumerate(by_local[: self.measured]):
            alone = self.backbone([name for name in names if name != layer.tensor])
            error = feature_map_error(feature_maps(alone, harm_samples), reference)
            measured.append(dataclasses.replace(layer, feature_map_error=error))
            if (i + 1) % 50 == 0:
                logger.info(
                    "      %d of %d layers measured (%.0f s)",
                    i + 1,
                    self.measured,
                    time.perf_counter() - started,
                )
        measured.sort(key=lambda h: -(h.feature_map_error or 0.0))
        self.layers: tuple[LayerHarm, ...] = (*measured, *by_local[self.measured :])

    def backbone(self, float_layers: Sequence[str]) -> bytes:
        """The int8 backbone with ``float_layers`` (output tensor names) kept in float.

        What the debugger's ``get_nondebug_quantized_model`` runs, without rebuilding its debug
        model for every list: the calibrated model quantized with these nodes denylisted.
        """
        from tensorflow.lite.python import convert

        return bytes(
            convert.mlir_quantize(
                self._debugger.calibrated_model,
                disable_per_channel=False,
                fully_quantize=False,
                enable_numeric_verify=False,
                denylisted_nodes=list(float_layers),
            )
        )


def feature_maps(flatbuffer: bytes, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The backbone's output on each input (two threads)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer, num_threads=2)
    interpreter.allocate_tensors()
    (source,), (sink,) = interpreter.get_input_details(), interpreter.get_output_details()
    out = []
    for pixels in inputs:
        interpreter.set_tensor(int(source["index"]), pixels)
        interpreter.invoke()
        out.append(np.array(interpreter.get_tensor(int(sink["index"]))))
    return out


def feature_map_error(maps: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Mean over the inputs of RMS(map - reference) / RMS(reference)."""
    errors = [
        float(np.sqrt(np.mean(np.square(m - r)))) / max(float(np.sqrt(np.mean(np.square(r)))), 1e-12)
        for m, r in zip(maps, reference, strict=True)
    ]
    return float(np.mean(errors))


@dataclass(frozen=True)
class Attempt:
    """One try: this many layers kept in float, and the gate's figures for it."""

    float_layers: int
    report: QuantizationReport

    def as_json(self) -> dict[str, float | int | bool]:
        """Plain data for the manifest."""
        return {
            "float_layers": self.float_layers,
            "top1_agreement": round(self.report.top1_agreement, 6),
            "heatmap_r_mean": round(self.report.heatmap_r_mean, 6),
            "passed": not self.report.misses,
        }


@dataclass(frozen=True)
class MixedResult:
    """The layers kept float, the backbone that holds the gate with them, and every try."""

    backbone: bytes
    float_layers: tuple[LayerHarm, ...]
    attempts: tuple[Attempt, ...]

    @property
    def report(self) -> QuantizationReport:
        """The passing try's gate."""
        return self.attempts[-1].report


def schedule(max_float_layers: int, available: int) -> list[int]:
    """How many layers each try keeps float: 1, 2, 4, … and the cap itself last."""
    cap = min(max_float_layers, available)
    counts, k = [], 1
    while k < cap:
        counts.append(k)
        k *= 2
    if cap >= 1:
        counts.append(cap)
    return counts


def search(
    ranking: Sequence[LayerHarm],
    build: Callable[[Sequence[str]], bytes],
    gate: Callable[[bytes], QuantizationReport],
    *,
    max_float_layers: int = MAX_FLOAT_LAYERS,
) -> MixedResult:
    """Keep the most harmful layers float, more each try, until the gate holds; ExportError if it never does."""
    attempts: list[Attempt] = []
    for count in schedule(max_float_layers, len(ranking)):
        kept = tuple(ranking[:count])
        started = time.perf_counter()
        backbone = build([layer.tensor for layer in kept])
        report = gate(backbone)
        attempts.append(Attempt(count, report))
        logger.info(
            "      %d layer(s) kept float: top-1 agreement %.3f, mean heatmap r %.3f (%s, %.0f s)",
            count,
            report.top1_agreement,
            report.heatmap_r_mean,
            "holds" if not report.misses else "misses",
            time.perf_counter() - started,
        )
        if not report.misses:
            return MixedResult(backbone=backbone, float_layers=kept, attempts=tuple(attempts))
    tried = ", ".join(
        f"{a.float_layers} float: agreement {a.report.top1_agreement:.3f}, r {a.report.heatmap_r_mean:.3f}"
        for a in attempts
    )
    raise ExportError(
        f"refusing to write the int8 bundle: with up to {min(max_float_layers, len(ranking))} of its "
        f"{len(ranking)} layers kept in float it still misses the gate ({tried or 'no layer to keep float'}); "
        "calibrate on more of your own photos, raise --max-float-layers, or use --quantize int8-dynamic or fp16"
    )


def backbone_ms(
    backbones: Sequence[bytes],
    *,
    input_size: tuple[int, int],
    channels: int = 3,
    runs: int = 15,
    max_seconds: float = 20.0,
) -> list[float]:
    """Median ms of one invoke on one thread for each backbone, the backbones taking turns.

    Up to ``runs`` turns (at least 3) within ``max_seconds``, after one run that packs the weights;
    the input is (1, height, width, ``channels``) uniform noise in 0..255, seeded.
    """
    from ai_edge_litert.interpreter import Interpreter

    pixels = np.random.default_rng(0).uniform(0, 255, (1, *input_size, channels)).astype(np.float32)
    interpreters = []
    for flatbuffer in backbones:
        interpreter = Interpreter(model_content=flatbuffer, num_threads=1)
        interpreter.allocate_tensors()
        interpreter.set_tensor(int(interpreter.get_input_details()[0]["index"]), pixels)
        interpreter.invoke()  # the first run packs the weights
        interpreters.append(interpreter)
    times: list[list[float]] = [[] for _ in interpreters]
    started = time.perf_counter()
    while len(times[0]) < 3 or (len(times[0]) < runs and time.perf_counter() - started < max_seconds):
        for interpreter, series in zip(interpreters, times, strict=True):
            t0 = time.perf_counter()
            interpreter.invoke()
            series.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(series) for series in times]
