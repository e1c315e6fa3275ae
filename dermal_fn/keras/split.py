"""Split a Keras classifier at its Grad-CAM layer: a backbone model and the head's layer chain.

Used by the exporter and by the TensorFlow backend. Keras is imported inside functions only.
Works for functional and Sequential models and for a nested backbone model (the usual
transfer-learning shape ``Sequential([EfficientNetV2S(include_top=False), GAP, Dropout, Dense])``).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dermal_fn.core.head import ELEMENTWISE_ACTIVATIONS, Head, Op, OutputActivation
from dermal_fn.errors import ExportError, UnsupportedLayer
from dermal_fn.keras.formats import is_model, keras_module, keras_of

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
    return is_model(layer)


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
    keras = keras_of(model)

    for layer in model.layers:
        if layer.name == name and not _is_model(layer):
            return keras.Model(_model_input(model), layer.output, name=f"{model.name}_backbone")
    for layer in model.layers:
        if _is_model(layer) and _contains(layer, name):
            inner = _backbone_to(layer, name)
            for node in reversed(layer._inbound_nodes):
                try:
                    feed = node.input_tensors  # a list in Keras 3, one tensor in tf-keras
                    feeds = list(feed) if isinstance(feed, (list, tuple)) else [feed]
                    probe = keras.Model(_model_input(model), feeds)
                except (ValueError, AttributeError, TypeError):
                    continue
                del probe
                out = inner(feeds[0] if len(feeds) == 1 else feeds)
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
        names = [str(leaf.name) for _, leaf in flat if _output_rank(leaf) == 4]
        near = difflib.get_close_matches(name, names, n=5, cutoff=0.4) or names[-5:]
        raise ExportError(
            f"expected a layer named {name!r} in the model, found none; "
            f"layers with a 4-D output near that name: {', '.join(near) or 'none'}"
        )
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
    """The serialised name of a Keras activation function (of either Keras), and its parameters."""
    serialised = _serialize_activation(fn)
    if isinstance(serialised, dict):
        config = serialised.get("config", {})
        name = config if isinstance(config, str) else serialised.get("class_name", "?")
        return str(name), {}
    name = str(serialised)
    return ("silu" if name == "swish" else name), {}


def _serialize_activation(fn: Any) -> Any:
    """``activations.serialize`` of the Keras the function comes from (Keras 3, or tf-keras)."""
    module = getattr(fn, "__module__", "") or ""
    return keras_module(module.startswith("tf_keras")).activations.serialize(fn)


def _refusal(layer: Any, why: str) -> UnsupportedLayer:
    return UnsupportedLayer(
        f"layer {layer.name!r} ({type(layer).__name__}) cannot be served by the NumPy head: {why}"
    )


def _array(variable: Any) -> np.ndarray:
    return np.asarray(variable.numpy(), dtype=np.float64)


def _checked_activation(layer: Any) -> tuple[str, dict[str, Any]]:
    act, params = activation_name(layer.activation)
    if act not in ELEMENTWISE_ACTIVATIONS and act != "softmax":
        raise _refusal(layer, f"expected a supported activation, found {act!r}")
    return act, params


def _last_axis(layer: Any, axes: Any) -> None:
    rank = len(layer.input.shape)
    if tuple(np.atleast_1d(axes)) not in ((-1,), (rank - 1,)):
        raise _refusal(layer, f"expected normalisation over the last axis, found axis={layer.axis}")


def _identity(layer: Any) -> list[Op]:
    return [Op("identity", layer.name)]


def _global_pool(layer: Any) -> list[Op]:
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise _refusal(layer, "expected data_format channels_last")
    kind = "global_average_pool" if type(layer).__name__ == "GlobalAveragePooling2D" else "global_max_pool"
    return [Op(kind, layer.name, {"keepdims": bool(getattr(layer, "keepdims", False))})]


def _flatten(layer: Any) -> list[Op]:
    return [Op("flatten", layer.name)]


def _dense(layer: Any) -> list[Op]:
    act, params = _checked_activation(layer)
    if getattr(layer, "lora_enabled", False):
        raise _refusal(layer, "expected a plain Dense, found LoRA enabled")
    arrays = {"kernel": _array(layer.kernel)}
    if layer.use_bias:
        arrays["bias"] = _array(layer.bias)
    if act == "softmax":
        return [
            Op("dense", layer.name, {"activation": "linear"}, arrays),
            Op("activation", f"{layer.name}_softmax", {"activation": "softmax"}),
        ]
    return [Op("dense", layer.name, {"activation": act, **params}, arrays)]


def _activation(layer: Any) -> list[Op]:
    act, params = _checked_activation(layer)
    return [Op("activation", layer.name, {"activation": act, **params})]


def _relu(layer: Any) -> list[Op]:
    params = {
        "negative_slope": float(layer.negative_slope),
        "threshold": float(layer.threshold),
        "max_value": None if layer.max_value is None else float(layer.max_value),
    }
    return [Op("activation", layer.name, {"activation": "relu", **params})]


def _leaky_relu(layer: Any) -> list[Op]:
    slope = float(getattr(layer, "negative_slope", getattr(layer, "alpha", 0.3)))
    return [Op("activation", layer.name, {"activation": "leaky_relu", "negative_slope": slope})]


def _softmax(layer: Any) -> list[Op]:
    if tuple(np.atleast_1d(layer.axis)) != (-1,):
        raise _refusal(layer, f"expected softmax over the last axis, found axis={layer.axis}")
    return [Op("activation", layer.name, {"activation": "softmax"})]


def _batch_norm(layer: Any) -> list[Op]:
    _last_axis(layer, layer.axis if isinstance(layer.axis, int) else layer.axis[0])
    mean, var = _array(layer.moving_mean), _array(layer.moving_variance)
    gamma = _array(layer.gamma) if layer.scale else np.ones_like(mean)
    beta = _array(layer.beta) if layer.center else np.zeros_like(mean)
    scale = gamma / np.sqrt(var + float(layer.epsilon))
    return [Op("affine", layer.name, {}, {"scale": scale, "offset": beta - mean * scale})]


def _layer_norm(layer: Any) -> list[Op]:
    _last_axis(layer, layer.axis)
    if getattr(layer, "rms_scaling", False):
        raise _refusal(layer, "expected rms_scaling=False")
    arrays = {}
    if layer.scale:
        arrays["gamma"] = _array(layer.gamma)
    if layer.center:
        arrays["beta"] = _array(layer.beta)
    return [Op("layer_norm", layer.name, {"epsilon": float(layer.epsilon)}, arrays)]


# Keras layer class name -> its NumPy head ops (the head's own ops are tables too: head._FORWARD)
LAYER_TRANSLATORS: dict[str, Callable[[Any], list[Op]]] = {
    **dict.fromkeys(IDENTITY_LAYERS, _identity),
    "GlobalAveragePooling2D": _global_pool,
    "GlobalMaxPooling2D": _global_pool,
    "Flatten": _flatten,
    "Dense": _dense,
    "Activation": _activation,
    "ReLU": _relu,
    "LeakyReLU": _leaky_relu,
    "Softmax": _softmax,
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
}


def layer_to_ops(layer: Any) -> list[Op]:
    """Translate one Keras layer into NumPy head ops, or refuse with UnsupportedLayer."""
    translate = LAYER_TRANSLATORS.get(type(layer).__name__)
    if translate is None:
        supported = ", ".join(sorted(set(LAYER_TRANSLATORS) - IDENTITY_LAYERS))
        raise _refusal(
            layer, f"supported head layers are {supported}, Dropout and other inference-time identities"
        )
    return translate(layer)


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
