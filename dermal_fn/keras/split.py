"""Split a Keras classifier at its Grad-CAM layer: a backbone model and the head's layer chain.

Used by the exporter and by the TensorFlow backend. Keras is imported inside functions only.
Works for functional and Sequential models and for a nested backbone model (the usual
transfer-learning shape ``Sequential([EfficientNetV2S(include_top=False), GAP, Dropout, Dense])``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from dermal_fn.core.head import ELEMENTWISE_ACTIVATIONS, Head, Op, OutputActivation
from dermal_fn.errors import ExportError, UnsupportedLayer

logger = logging.getLogger(__name__)

IDENTITY_LAYERS = frozenset(
    {
        "Dropout",
        "SpatialDropout1D",
        "SpatialDropout2D",
        "SpatialDropout3D",
        "GaussianNoise",
        "GaussianDropout",
        "AlphaDropout",
        "ActivityRegularization",
        "InputLayer",
    }
)


@dataclass
class Split:
    """A model cut at the Grad-CAM layer."""

    model: Any  # keras.Model
    backbone: Any  # keras.Model: input image -> feature map
    layer_name: str
    head_layers: list[Any]  # keras layers after the Grad-CAM layer, in order
    input_size: tuple[int, int]
    feature_map_shape: tuple[int, int, int]


def _is_model(layer: Any) -> bool:
    import keras

    return isinstance(layer, keras.Model)


def _flat_layers(model: Any) -> list[tuple[tuple[Any, ...], Any]]:
    """Every leaf layer with the chain of models that contains it, in model order."""
    out: list[tuple[tuple[Any, ...], Any]] = []
    for layer in model.layers:
        if _is_model(layer):
            out.extend(((model, *path), leaf) for path, leaf in _flat_layers(layer))
        else:
            out.append(((model,), layer))
    return out


def _output_rank(layer: Any) -> int | None:
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):
        return None
    return len(shape)


def default_layer_name(model: Any) -> str:
    """The last layer whose output is 4-D, looking inside nested models."""
    candidates = [leaf for _, leaf in _flat_layers(model) if _output_rank(leaf) == 4]
    if not candidates:
        raise ExportError("expected a layer with a 4-D output (a convolutional feature map), found none")
    return str(candidates[-1].name)


def _model_input(model: Any) -> Any:
    inputs = model.inputs
    if len(inputs) != 1:
        raise ExportError(f"expected a model with one image input, found {len(inputs)} inputs")
    return inputs[0]


def _backbone_to(model: Any, name: str) -> Any:
    """A keras.Model from model's input to the output of the layer called name (maybe nested)."""
    import keras

    for layer in model.layers:
        if layer.name == name and not _is_model(layer):
            return keras.Model(_model_input(model), layer.output, name=f"{model.name}_backbone")
    for layer in model.layers:
        if _is_model(layer) and _contains(layer, name):
            inner = _backbone_to(layer, name)
            for node in reversed(layer._inbound_nodes):
                try:
                    feed = node.input_tensors
                    probe = keras.Model(_model_input(model), feed)
                except (ValueError, AttributeError, TypeError):
                    continue
                del probe
                out = inner(feed[0] if len(feed) == 1 else feed)
                return keras.Model(_model_input(model), out, name=f"{model.name}_backbone")
            raise ExportError(f"expected nested model {layer.name!r} to be called once in {model.name!r}")
    raise ExportError(f"expected a layer named {name!r}, found none (use --layer with a layer name)")


def _contains(model: Any, name: str) -> bool:
    return any(leaf.name == name for _, leaf in _flat_layers(model))


def split(model: Any, *, layer: str | None = None) -> Split:
    """Cut the model after ``layer`` (default: the last 4-D output, inside nested models too)."""
    name = layer or default_layer_name(model)
    flat = _flat_layers(model)
    positions = [i for i, (_, leaf) in enumerate(flat) if leaf.name == name]
    if not positions:
        raise ExportError(f"expected a layer named {name!r} in the model, found none")
    target = flat[positions[-1]][1]
    if _output_rank(target) != 4:
        raise ExportError(
            f"expected layer {name!r} to output a 4-D feature map, found rank {_output_rank(target)}"
        )
    head_layers = [leaf for _, leaf in flat[positions[-1] + 1 :] if type(leaf).__name__ != "InputLayer"]
    backbone = _backbone_to(model, name)
    in_shape = tuple(model.inputs[0].shape)
    if len(in_shape) != 4 or in_shape[1] is None or in_shape[2] is None or in_shape[3] != 3:
        raise ExportError(f"expected an RGB image input of fixed size (None, h, w, 3), found {in_shape}")
    out_shape = tuple(backbone.outputs[0].shape)
    return Split(
        model=model,
        backbone=backbone,
        layer_name=name,
        head_layers=head_layers,
        input_size=(int(in_shape[1]), int(in_shape[2])),
        feature_map_shape=(int(out_shape[1]), int(out_shape[2]), int(out_shape[3])),
    )


# --- Keras layers -> NumPy head ops ----------------------------------------------------------------


def activation_name(fn: Any) -> tuple[str, dict[str, Any]]:
    """The serialised name of a Keras activation function, and its parameters."""
    import keras

    serialised = keras.activations.serialize(fn)
    if isinstance(serialised, dict):
        config = serialised.get("config", {})
        name = config if isinstance(config, str) else serialised.get("class_name", "?")
        return str(name), {}
    name = str(serialised)
    return ("silu" if name == "swish" else name), {}


def layer_to_ops(layer: Any) -> list[Op]:
    """Translate one Keras layer into NumPy head ops, or refuse with UnsupportedLayer."""
    kind = type(layer).__name__
    name = str(layer.name)

    def refuse(why: str) -> UnsupportedLayer:
        return UnsupportedLayer(f"layer {name!r} ({kind}) cannot be served by the NumPy head: {why}")

    if kind in IDENTITY_LAYERS:
        return [Op("identity", name)]
    if kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            raise refuse("expected data_format channels_last")
        op = "global_average_pool" if kind == "GlobalAveragePooling2D" else "global_max_pool"
        return [Op(op, name, {"keepdims": bool(getattr(layer, "keepdims", False))})]
    if kind == "Flatten":
        return [Op("flatten", name)]
    if kind == "Dense":
        act, params = activation_name(layer.activation)
        if act not in ELEMENTWISE_ACTIVATIONS and act != "softmax":
            raise refuse(f"expected a supported activation, found {act!r}")
        arrays = {"kernel": np.asarray(layer.kernel.numpy(), dtype=np.float64)}
        if layer.use_bias:
            arrays["bias"] = np.asarray(layer.bias.numpy(), dtype=np.float64)
        if getattr(layer, "lora_enabled", False):
            raise refuse("expected a plain Dense, found LoRA enabled")
        if act == "softmax":
            return [
                Op("dense", name, {"activation": "linear"}, arrays),
                Op("activation", f"{name}_softmax", {"activation": "softmax"}),
            ]
        return [Op("dense", name, {"activation": act, **params}, arrays)]
    if kind == "Activation":
        act, params = activation_name(layer.activation)
        if act not in ELEMENTWISE_ACTIVATIONS and act != "softmax":
            raise refuse(f"expected a supported activation, found {act!r}")
        return [Op("activation", name, {"activation": act, **params})]
    if kind == "ReLU":
        params = {
            "negative_slope": float(layer.negative_slope),
            "threshold": float(layer.threshold),
            "max_value": None if layer.max_value is None else float(layer.max_value),
        }
        return [Op("activation", name, {"activation": "relu", **params})]
    if kind == "LeakyReLU":
        return [
            Op(
                "activation",
                name,
                {"activation": "leaky_relu", "negative_slope": float(layer.negative_slope)},
            )
        ]
    if kind == "Softmax":
        if tuple(np.atleast_1d(layer.axis)) not in ((-1,),):
            raise refuse(f"expected softmax over the last axis, found axis={layer.axis}")
        return [Op("activation", name, {"activation": "softmax"})]
    if kind == "BatchNormalization":
        axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
        rank = len(layer.input.shape)
        if axis not in (-1, rank - 1):
            raise refuse(f"expected normalisation over the last axis, found axis={layer.axis}")
        mean = np.asarray(layer.moving_mean.numpy(), dtype=np.float64)
        var = np.asarray(layer.moving_variance.numpy(), dtype=np.float64)
        gamma = np.asarray(layer.gamma.numpy(), dtype=np.float64) if layer.scale else np.ones_like(mean)
        beta = np.asarray(layer.beta.numpy(), dtype=np.float64) if layer.center else np.zeros_like(mean)
        scale = gamma / np.sqrt(var + float(layer.epsilon))
        return [Op("affine", name, {}, {"scale": scale, "offset": beta - mean * scale})]
    if kind == "LayerNormalization":
        axes = tuple(np.atleast_1d(layer.axis))
        rank = len(layer.input.shape)
        if axes not in ((-1,), (rank - 1,)):
            raise refuse(f"expected normalisation over the last axis, found axis={layer.axis}")
        if getattr(layer, "rms_scaling", False):
            raise refuse("expected rms_scaling=False")
        arrays = {}
        if layer.scale:
            arrays["gamma"] = np.asarray(layer.gamma.numpy(), dtype=np.float64)
        if layer.center:
            arrays["beta"] = np.asarray(layer.beta.numpy(), dtype=np.float64)
        return [Op("layer_norm", name, {"epsilon": float(layer.epsilon)}, arrays)]
    raise refuse(
        "supported head layers are GlobalAveragePooling2D, GlobalMaxPooling2D, Flatten, Dropout, Dense, "
        "Activation, ReLU, LeakyReLU, Softmax, BatchNormalization and LayerNormalization"
    )


def build_head(split_: Split) -> Head:
    """The NumPy head for a split model, with the final softmax/sigmoid kept as the output."""
    ops: list[Op] = []
    for layer in split_.head_layers:
        ops.extend(layer_to_ops(layer))
    output: OutputActivation = "none"
    if ops and ops[-1].kind == "activation" and ops[-1].params["activation"] in ("softmax", "sigmoid"):
        output = ops[-1].params["activation"]
        ops.pop()
    elif ops and ops[-1].kind == "dense" and ops[-1].params.get("activation") in ("softmax", "sigmoid"):
        last = ops.pop()
        output = last.params["activation"]
        ops.append(Op("dense", last.name, {"activation": "linear"}, last.arrays))
    dense = [op for op in ops if op.kind == "dense"]
    if not dense:
        raise ExportError("expected a Dense classification layer in the head, found none")
    units = int(dense[-1].arrays["kernel"].shape[1])
    out_shape = tuple(split_.model.outputs[0].shape)
    if len(out_shape) != 2 or out_shape[1] != units:
        raise ExportError(
            f"expected the head's last Dense ({units} units) to produce the model output, found output {out_shape}"
        )
    if units == 1 and output != "sigmoid":
        raise ExportError("expected a single-unit output to end in sigmoid (binary classifier), found none")
    return Head(ops=tuple(ops), output_activation=output, binary=units == 1)
