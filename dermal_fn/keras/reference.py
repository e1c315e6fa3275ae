"""The TensorFlow backend: a ``.keras`` file served directly (the reference; slow and big).

The backbone gives the feature map; a ``tf.GradientTape`` runs on the head's Keras layers only,
so the answers match the LiteRT engine's by construction rather than by shared code.
TensorFlow is imported only when this module is used.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dermal_fn.core.engine import Engine, Inference, ModelInfo
from dermal_fn.core.gradcam import grad_cam
from dermal_fn.core.head import Score
from dermal_fn.core.imaging import InputScale, Normalization
from dermal_fn.core.trust import pooled
from dermal_fn.errors import ExportError
from dermal_fn.keras.formats import load_model
from dermal_fn.keras.split import Split, activation_name, build_head, split

logger = logging.getLogger(__name__)


def load_keras_model(path: str | Path, *, custom_objects: Mapping[str, Any] | None = None) -> Any:
    """Load a Keras model (.keras, .h5, SavedModel) for inference, with the Keras that wrote it."""
    return load_model(path, custom_objects=custom_objects)


_INDEXED = re.compile(r"^(\d+)\s+(\S.*)$")


def read_labels(path: str | Path | None, n_classes: int) -> tuple[str, ...]:
    """Labels from a file, or ``class_0``…; the count must match the model.

    One label per line; or, as Teachable Machine writes ``labels.txt``, ``<index> <name>`` lines, read
    as names when every line has that form and the indexes are 0, 1, 2… in order.
    """
    if path is None:
        return tuple(f"class_{i}" for i in range(n_classes))
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    labels = tuple(line for line in lines if line)
    indexed = [_INDEXED.match(label) for label in labels]
    if labels and all(indexed):
        indexes = [int(m.group(1)) for m in indexed if m]
        if indexes != list(range(len(labels))):
            raise ExportError(
                f"expected the indexes of {Path(path).name}'s '<index> <name>' lines to be 0..{len(labels) - 1} "
                f"in order, found {indexes[:10]}"
            )
        labels = tuple(m.group(2).strip() for m in indexed if m)
    if len(labels) != n_classes:
        raise ExportError(f"expected {n_classes} labels (one per line) in {path}, found {len(labels)}")
    if len(set(labels)) != len(labels):
        raise ExportError(f"expected distinct labels in {path}, found duplicates")
    return labels


def find_sidecar_labels(model_path: Path) -> Path | None:
    """``NAME.labels.txt`` or ``labels.txt`` next to a ``.keras`` file, if present."""
    for candidate in (model_path.with_suffix(".labels.txt"), model_path.parent / "labels.txt"):
        if candidate.is_file():
            return candidate
    return None


class TapeHead:
    """The head's Keras layers run under a GradientTape, with the final activation split off."""

    def __init__(self, split_: Split) -> None:
        self.layers = list(split_.head_layers)
        self.final: Any = None  # a Dense whose softmax/sigmoid we apply ourselves
        self.output_activation = "none"
        last = self.layers[-1] if self.layers else None
        if last is not None:
            act = activation_name(last.activation)[0] if hasattr(last, "activation") else None
            if type(last).__name__ == "Dense" and act in ("softmax", "sigmoid"):
                self.final = self.layers.pop()
                self.output_activation = str(act)
            elif type(last).__name__ == "Activation" and act in ("softmax", "sigmoid"):
                self.layers.pop()
                self.output_activation = str(act)
            elif type(last).__name__ == "Softmax":
                self.layers.pop()
                self.output_activation = "softmax"
        self.binary = int(split_.model.outputs[0].shape[-1]) == 1

    def logits(self, features: Any) -> Any:
        """The model's pre-activation outputs for a feature map tensor."""
        import tensorflow as tf

        x = features
        for layer in self.layers:
            x = layer(x, training=False)
        if self.final is not None:
            x = tf.matmul(x, self.final.kernel)
            if self.final.use_bias:
                x = x + self.final.bias
        return x

    def probabilities(self, logits: Any) -> Any:
        """What the model reports (binary: [1 - p, p])."""
        import tensorflow as tf

        if self.binary:
            p = tf.sigmoid(logits[:, 0])
            return tf.stack([1.0 - p, p], axis=-1)
        if self.output_activation == "sigmoid":
            return tf.sigmoid(logits)
        return tf.nn.softmax(logits, axis=-1)

    def score(self, logits: Any, probabilities: Any, *, class_index: int, score: Score) -> Any:
        """The scalar Grad-CAM differentiates."""
        if self.binary and score == "logit":
            return logits[0, 0] if class_index == 1 else -logits[0, 0]
        if score == "logit":
            return logits[0, class_index]
        return probabilities[0, class_index]


class KerasEngine(Engine):
    """A ``.keras`` classifier served with TensorFlow."""

    def __init__(
        self,
        path: str | Path,
        *,
        sha256: str,
        layer: str | None = None,
        labels: tuple[str, ...] | None = None,
        input_scale: InputScale = "raw",
        resize: str = "bilinear",
        normalization: Normalization | None = None,
        custom_objects: Mapping[str, Any] | None = None,
        sidecar_labels: bool = True,
    ) -> None:
        path = Path(path)
        self.model = load_keras_model(path, custom_objects=custom_objects)
        self.split = split(self.model, layer=layer)
        self.head = build_head(self.split)  # also refuses heads the LiteRT path could not serve
        self.tape_head = TapeHead(self.split)
        n_classes = self.head.n_classes
        self.info = ModelInfo(
            name=path.stem,
            sha256=sha256,
            backend="tensorflow",
            labels=labels or read_labels(find_sidecar_labels(path) if sidecar_labels else None, n_classes),
            layer=self.split.layer_name,
            input_size=self.split.input_size,
            input_scale=input_scale,
            resize=resize,
            quantization="none",
            normalization=normalization or Normalization(),
        )
        self._lock = threading.Lock()

    def feature_map(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self.split.backbone(pixels, training=False))

    def run(
        self,
        pixels: np.ndarray,
        *,
        class_index: int | None = None,
        score: Score = "logit",
        gradcam: bool = True,
    ) -> Inference:
        import tensorflow as tf

        with self._lock:
            started = time.perf_counter()
            features = tf.convert_to_tensor(self.split.backbone(pixels, training=False))
            with tf.GradientTape() as tape:
                tape.watch(features)
                logits = self.tape_head.logits(features)
                probabilities = self.tape_head.probabilities(logits)
                target = self.resolve_class(class_index, probabilities.numpy()[0])
                value = self.tape_head.score(logits, probabilities, class_index=target, score=score)
            model_done = time.perf_counter()
            grid = None
            if gradcam:
                gradient = tape.gradient(value, features)
                grid = grad_cam(features.numpy(), gradient.numpy())
            done = time.perf_counter()
        return Inference(
            probabilities=np.asarray(probabilities.numpy()[0], dtype=np.float64),
            logits=np.asarray(logits.numpy()[0], dtype=np.float64),
            pooled=pooled(features.numpy()),
            class_index=target,
            score=score,
            grid=grid,
            model_ms=(model_done - started) * 1e3,
            gradcam_ms=(done - model_done) * 1e3,
        )
