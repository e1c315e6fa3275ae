"""Converting a Keras backbone to a LiteRT flatbuffer: fp32, fp16, int8-dynamic or full int8.

TensorFlow is imported inside :func:`float_converter` and :func:`convert_backbone` only. A full-int8
backbone is checked to be integer throughout, with float32 input and output, except for the layers
mixed precision kept in float on purpose (:func:`check_integer_backbone`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import numpy as np

from dermal_fn.errors import ExportError
from dermal_fn.keras.verify import Quantization

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def float_converter(backbone: Any, *, input_size: tuple[int, int]) -> Iterator[Any]:
    """A TFLiteConverter of the backbone's inference function, batch size 1, no optimization yet."""
    import tensorflow as tf

    h, w = input_size
    with tempfile.TemporaryDirectory(prefix="dermal-export-") as tmp:
        signature = tf.TensorSpec((1, h, w, 3), tf.float32)
        if type(backbone).__module__.startswith("tf_keras"):
            # Keras 2 has no Model.export: convert its inference function, batch 1, training off
            function = tf.function(lambda x: backbone(x, training=False), input_signature=[signature])
            yield tf.lite.TFLiteConverter.from_concrete_functions(
                [function.get_concrete_function()], backbone
            )
        else:
            saved = os.path.join(tmp, "saved_model")
            backbone.export(saved, format="tf_saved_model", verbose=False, input_signature=[signature])
            yield tf.lite.TFLiteConverter.from_saved_model(saved)


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

    with float_converter(backbone, input_size=input_size) as converter:
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


def float_op_outputs(flatbuffer: bytes | Any) -> list[tuple[str, str]]:
    """(op, output tensor name) of every convolution or dense op that runs in float.

    ``flatbuffer``: the model, or a LiteRT Interpreter already made of it.
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer) if isinstance(flatbuffer, bytes) else flatbuffer
    found = []
    for op in interpreter._get_ops_details():
        if op["op_name"] not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        inputs = [interpreter._get_tensor_details(i, 0) for i in op["inputs"] if i >= 0]
        if any(d["dtype"] == np.float32 for d in inputs):
            found.append(
                (str(op["op_name"]), str(interpreter._get_tensor_details(op["outputs"][0], 0)["name"]))
            )
    return found


def check_integer_backbone(flatbuffer: bytes, *, float_layers: Collection[str] = ()) -> None:
    """Refuse an int8 backbone whose input/output are not float32 or that kept float convolutions
    other than ``float_layers`` (output tensor names mixed precision kept float on purpose)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    edges = [*interpreter.get_input_details(), *interpreter.get_output_details()]
    not_float = [(d["name"], np.dtype(d["dtype"]).name) for d in edges if np.dtype(d["dtype"]) != np.float32]
    if not_float:
        raise ExportError(f"expected float32 input and output on the int8 backbone, found {not_float}")
    allowed = set(float_layers)
    float_ops = [op for op, tensor in float_op_outputs(interpreter) if tensor not in allowed]
    if float_ops:
        raise ExportError(f"expected an integer-only backbone, found float ops {sorted(set(float_ops))}")
