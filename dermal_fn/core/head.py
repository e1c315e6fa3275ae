"""The classifier head in NumPy: forward to logits and probabilities, backward to the feature map.

A head is the chain of layers after the Grad-CAM layer (pooling, dropout, dense, normalisation,
activations). Each op is a small pure function pair: ``forward(x) -> (y, cache)`` and
``backward(grad_y, cache) -> grad_x``. The final activation (softmax or sigmoid) is kept apart as the
``output`` so the class score can be the logit (pre-activation, the Grad-CAM paper's choice) or the
probability.

The spec of a head is plain data (JSON-able ops plus named arrays), written into the bundle by
:mod:`dermal_fn.keras.export` and read back by :func:`Head.from_spec`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from dermal_fn.errors import BundleError

Array = np.ndarray
Score = Literal["logit", "probability"]
SCORES: tuple[Score, ...] = ("logit", "probability")

_ERF = np.frompyfunc(math.erf, 1, 1)


def _erf(x: Array) -> Array:
    return np.asarray(_ERF(x), dtype=np.float64)


# --- activations: value and derivative (elementwise, except softmax) -------------------------------


def _sigmoid(x: Array) -> Array:
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def _softmax(x: Array) -> Array:
    shifted = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=-1, keepdims=True)


def _gelu(x: Array, approximate: bool) -> tuple[Array, Array]:
    if approximate:
        c = math.sqrt(2.0 / math.pi)
        inner = c * (x + 0.044715 * x**3)
        t = np.tanh(inner)
        y = 0.5 * x * (1.0 + t)
        dy = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * c * (1.0 + 3 * 0.044715 * x**2)
        return y, dy
    cdf = 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * x**2) / math.sqrt(2.0 * math.pi)
    return x * cdf, cdf + x * pdf


def activation_forward(name: str, x: Array, params: Mapping[str, Any]) -> tuple[Array, Array]:
    """Apply an elementwise activation; return the value and its derivative (same shape)."""
    if name == "linear":
        return x, np.ones_like(x)
    if name == "relu":
        slope = float(params.get("negative_slope", 0.0))
        threshold = float(params.get("threshold", 0.0))
        max_value = params.get("max_value")
        y = np.where(x > threshold, x, slope * (x - threshold))
        dy = np.where(x > threshold, 1.0, slope)
        if max_value is not None:
            over = x >= float(max_value)
            y = np.where(over, float(max_value), y)
            dy = np.where(over, 0.0, dy)
        return y, dy
    if name == "relu6":
        return np.clip(x, 0.0, 6.0), ((x > 0) & (x < 6)).astype(x.dtype)
    if name == "leaky_relu":
        slope = float(params.get("negative_slope", 0.2))
        return np.where(x > 0, x, slope * x), np.where(x > 0, 1.0, slope)
    if name == "sigmoid":
        s = _sigmoid(x)
        return s, s * (1.0 - s)
    if name == "tanh":
        t = np.tanh(x)
        return t, 1.0 - t**2
    if name in ("silu", "swish"):
        s = _sigmoid(x)
        return x * s, s * (1.0 + x * (1.0 - s))
    if name == "gelu":
        return _gelu(x, bool(params.get("approximate", False)))
    if name == "elu":
        alpha = float(params.get("alpha", 1.0))
        neg = alpha * (np.exp(np.minimum(x, 0.0)) - 1.0)
        return np.where(x > 0, x, neg), np.where(x > 0, 1.0, neg + alpha)
    if name == "softplus":
        return np.logaddexp(0.0, x), _sigmoid(x)
    raise BundleError(f"expected a known activation, found {name!r}")


ELEMENTWISE_ACTIVATIONS = frozenset(
    {
        "linear",
        "relu",
        "relu6",
        "leaky_relu",
        "sigmoid",
        "tanh",
        "silu",
        "swish",
        "gelu",
        "elu",
        "softplus",
    }
)


# --- ops -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One head layer: its kind, its parameters and its arrays."""

    kind: str
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    arrays: Mapping[str, Array] = field(default_factory=dict)

    def forward(self, x: Array) -> tuple[Array, Any]:
        """Compute the output and what the backward pass needs."""
        return _FORWARD[self.kind](self, x)

    def backward(self, grad_y: Array, cache: Any) -> Array:
        """Gradient of the score with respect to this op's input."""
        return _BACKWARD[self.kind](self, grad_y, cache)


def _identity_fwd(op: Op, x: Array) -> tuple[Array, Any]:
    return x, None


def _identity_bwd(op: Op, g: Array, cache: Any) -> Array:
    return g


def _gap_fwd(op: Op, x: Array) -> tuple[Array, Any]:
    y = np.mean(x, axis=(1, 2), keepdims=bool(op.params.get("keepdims", False)))
    return y, x.shape


def _gap_bwd(op: Op, g: Array, shape: tuple[int, ...]) -> Array:
    n, h, w, c = shape
    g = g.reshape(n, 1, 1, c)
    return np.broadcast_to(g / (h * w), shape).copy()


def _gmp_fwd(op: Op, x: Array) -> tuple[Array, Any]:
    y = np.max(x, axis=(1, 2), keepdims=True)
    mask = (x == y).astype(x.dtype)
    mask /= np.sum(mask, axis=(1, 2), keepdims=True)
    if not op.params.get("keepdims", False):
        y = y[:, 0, 0, :]
    return y, mask


def _gmp_bwd(op: Op, g: Array, mask: Array) -> Array:
    n, _, _, c = mask.shape
    return mask * g.reshape(n, 1, 1, c)


def _flatten_fwd(op: Op, x: Array) -> tuple[Array, Any]:
    return x.reshape(x.shape[0], -1), x.shape


def _flatten_bwd(op: Op, g: Array, shape: tuple[int, ...]) -> Array:
    return g.reshape(shape)


def _dense_fwd(op: Op, x: Array) -> tuple[Array, Any]:
    z = x @ op.arrays["kernel"]
    if "bias" in op.arrays:
        z = z + op.arrays["bias"]
    y, dy = activation_forward(str(op.params.get("activation", "linear")), z, op.params)
    return y, dy


def _dense_bwd(op: Op, g: Array, dy: Array) -> Array:
    return np.asarray((g * dy) @ op.arrays["kernel"].T)


def _activation_fwd(op: Op, x: Array) -> tuple[Array, Any]:
    name = str(op.params["activation"])
    if name == "softmax":
        s = _softmax(x)
        return s, s
    return activation_forward(name, x, op.params)


def _activation_bwd(op: Op, g: Array, cache: Array) -> Array:
    if op.params["activation"] == "softmax":
        s = cache
        return np.asarray(s * (g - np.sum(g * s, axis=-1, keepdims=True)))
    return np.asarray(g * cache)


def _affine_fwd(op: Op, x: Array) -> tuple[Array, Any]:
    # BatchNormalization at inference, folded to scale and offset on the last axis
    return x * op.arrays["scale"] + op.arrays["offset"], None


def _affine_bwd(op: Op, g: Array, cache: Any) -> Array:
    return np.asarray(g * op.arrays["scale"])


def _layernorm_fwd(op: Op, x: Array) -> tuple[Array, Any]:
    eps = float(op.params["epsilon"])
    mean = np.mean(x, axis=-1, keepdims=True)
    var = np.mean((x - mean) ** 2, axis=-1, keepdims=True)
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = (x - mean) * inv_std
    y = x_hat
    if "gamma" in op.arrays:
        y = y * op.arrays["gamma"]
    if "beta" in op.arrays:
        y = y + op.arrays["beta"]
    return y, (x_hat, inv_std)


def _layernorm_bwd(op: Op, g: Array, cache: tuple[Array, Array]) -> Array:
    x_hat, inv_std = cache
    g_hat = g * op.arrays["gamma"] if "gamma" in op.arrays else g
    mean_g = np.mean(g_hat, axis=-1, keepdims=True)
    mean_gx = np.mean(g_hat * x_hat, axis=-1, keepdims=True)
    return np.asarray(inv_std * (g_hat - mean_g - x_hat * mean_gx))


_FORWARD: dict[str, Callable[[Op, Array], tuple[Array, Any]]] = {
    "identity": _identity_fwd,
    "global_average_pool": _gap_fwd,
    "global_max_pool": _gmp_fwd,
    "flatten": _flatten_fwd,
    "dense": _dense_fwd,
    "activation": _activation_fwd,
    "affine": _affine_fwd,
    "layer_norm": _layernorm_fwd,
}
_BACKWARD: dict[str, Callable[[Op, Array, Any], Array]] = {
    "identity": _identity_bwd,
    "global_average_pool": _gap_bwd,
    "global_max_pool": _gmp_bwd,
    "flatten": _flatten_bwd,
    "dense": _dense_bwd,
    "activation": _activation_bwd,
    "affine": _affine_bwd,
    "layer_norm": _layernorm_bwd,
}
OP_KINDS = frozenset(_FORWARD)

OutputActivation = Literal["softmax", "sigmoid", "none"]


@dataclass(frozen=True)
class HeadResult:
    """What one forward pass of the head gives: logits, probabilities, and the caches."""

    logits: Array  # (n_logits,) pre-activation outputs of the model
    probabilities: Array  # (n_classes,) what the model reports (binary: [1-p, p])
    caches: tuple[Any, ...]


@dataclass(frozen=True)
class Head:
    """The head after the Grad-CAM layer, run in float64 for exact gradients."""

    ops: tuple[Op, ...]
    output_activation: OutputActivation
    binary: bool

    @property
    def n_classes(self) -> int:
        """How many classes the head reports (a single sigmoid unit counts as two)."""
        last = [op for op in self.ops if op.kind == "dense"]
        units = int(last[-1].arrays["kernel"].shape[1]) if last else -1
        return 2 if self.binary else units

    def forward(self, feature_map: Array) -> HeadResult:
        """Run the head on one feature map of shape (h, w, c) or (1, h, w, c)."""
        x = np.asarray(feature_map, dtype=np.float64)
        if x.ndim == 3:
            x = x[np.newaxis]
        caches = []
        for op in self.ops:
            x, cache = op.forward(x)
            caches.append(cache)
        logits = x.reshape(-1)
        if self.binary:
            p = float(_sigmoid(logits)[0])
            probabilities = np.array([1.0 - p, p])
        elif self.output_activation == "sigmoid":
            probabilities = _sigmoid(logits)
        else:
            # softmax, or a model that outputs raw logits: report softmax probabilities
            probabilities = _softmax(logits)
        return HeadResult(logits=logits, probabilities=probabilities, caches=tuple(caches))

    def score_gradient(self, result: HeadResult, *, class_index: int, score: Score) -> Array:
        """d(score of class_index)/d(logits) for the logit or the probability score."""
        n = result.logits.shape[0]
        grad = np.zeros(n)
        if self.binary:
            sign = 1.0 if class_index == 1 else -1.0
            if score == "logit":
                grad[0] = sign
            else:
                p = result.probabilities[1]
                grad[0] = sign * p * (1.0 - p)
            return grad
        if score == "logit":
            grad[class_index] = 1.0
            return grad
        p = result.probabilities
        if self.output_activation == "sigmoid":
            grad[class_index] = p[class_index] * (1.0 - p[class_index])
            return grad
        onehot = np.zeros(n)
        onehot[class_index] = 1.0
        return np.asarray(p[class_index] * (onehot - p))

    def backward(self, result: HeadResult, grad_logits: Array) -> Array:
        """Backpropagate a gradient on the logits to the feature map: shape (1, h, w, c)."""
        g: Array = grad_logits.reshape(1, -1)
        for op, cache in zip(reversed(self.ops), reversed(result.caches), strict=True):
            g = op.backward(g, cache)
        return g

    def class_score(self, result: HeadResult, *, class_index: int, score: Score) -> float:
        """The scalar whose gradient Grad-CAM uses."""
        if self.binary:
            sign = 1.0 if class_index == 1 else -1.0
            if score == "logit":
                return float(sign * result.logits[0])
            return float(result.probabilities[class_index])
        if score == "logit":
            return float(result.logits[class_index])
        return float(result.probabilities[class_index])

    # --- serialisation ------------------------------------------------------------------------

    def to_spec(self) -> tuple[dict[str, Any], dict[str, Array]]:
        """Plain data for the bundle: a JSON-able description and a flat dict of arrays."""
        ops = []
        arrays: dict[str, Array] = {}
        for i, op in enumerate(self.ops):
            ops.append({"kind": op.kind, "name": op.name, "params": dict(op.params)})
            for key, value in op.arrays.items():
                arrays[f"{i}/{key}"] = np.asarray(value, dtype=np.float32)
        spec = {"ops": ops, "output_activation": self.output_activation, "binary": self.binary}
        return spec, arrays

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], arrays: Mapping[str, Array]) -> Head:
        """Rebuild a head from :meth:`to_spec`'s output, checking every op kind."""
        ops = []
        if not isinstance(spec, Mapping):
            raise BundleError(f"expected a head spec (a JSON object), found {type(spec).__name__}")
        try:
            for i, entry in enumerate(spec["ops"]):
                kind = entry["kind"]
                if kind not in OP_KINDS:
                    raise BundleError(f"expected head op kinds {sorted(OP_KINDS)}, found {kind!r}")
                prefix = f"{i}/"
                op_arrays = {
                    key[len(prefix) :]: np.asarray(value, dtype=np.float64)
                    for key, value in arrays.items()
                    if key.startswith(prefix)
                }
                ops.append(Op(kind, entry.get("name", kind), dict(entry.get("params", {})), op_arrays))
            output = spec["output_activation"]
            binary = bool(spec["binary"])
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise BundleError(f"expected a head spec with ops and output_activation, found {exc!r}") from exc
        if output not in ("softmax", "sigmoid", "none"):
            raise BundleError(f"expected output activation softmax, sigmoid or none, found {output!r}")
        return cls(ops=tuple(ops), output_activation=output, binary=binary)
