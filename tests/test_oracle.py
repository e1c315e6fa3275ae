"""Bundles (LiteRT backbone + NumPy head) against tf.GradientTape on the same Keras models.

The oracle is computed independently of the exporter: the keras-io Grad-CAM recipe (a grad model
outputting [feature map, logits], the final activation swapped for linear when the score is the
logit) for functional models, and the nested backbone's feature model followed by the outer layers
for the transfer-learning shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dermal_fn.core.engine import LiteRTEngine
from dermal_fn.core.gradcam import normalise
from dermal_fn.errors import ExportError, UnsupportedLayer
from dermal_fn.keras.export import export_keras, verification_inputs
from dermal_fn.serving.engines import load_engine

SIZE = 40
PROB_TOL = 1e-4
HEAT_TOL = 2e-3
pytestmark = pytest.mark.tensorflow


def conv_trunk(x: Any, *, top: str = "top_activation") -> Any:
    import keras

    L = keras.layers

    x = L.Rescaling(1 / 127.5, offset=-1.0)(x)
    x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = L.Conv2D(12, 3, strides=2, padding="same")(x)
    x = L.BatchNormalization()(x)
    return L.Activation("swish", name=top)(x)


def _randomise_bn(model: Any, seed: int) -> None:
    import keras

    L = keras.layers

    rng = np.random.default_rng(seed)
    for layer in _all_layers(model):
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.2, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.gamma.assign(rng.normal(1, 0.2, n).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.2, n).astype("float32"))


def _all_layers(model: Any) -> list[Any]:
    import keras

    out = []
    for layer in model.layers:
        out.append(layer)
        if isinstance(layer, keras.Model):
            out.extend(_all_layers(layer))
    return out


def functional_softmax() -> Any:
    import keras

    L = keras.layers

    inp = keras.Input((SIZE, SIZE, 3))
    x = conv_trunk(inp)
    x = L.GlobalAveragePooling2D()(x)
    out = L.Dense(4, activation="softmax")(x)
    return keras.Model(inp, out)


def nested_backbone() -> Any:
    import keras

    L = keras.layers

    inner_in = keras.Input((SIZE, SIZE, 3))
    inner = keras.Model(inner_in, conv_trunk(inner_in), name="backbone")
    return keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            inner,
            L.GlobalAveragePooling2D(),
            L.Dropout(0.3),
            L.Dense(7, activation="softmax"),
        ]
    )


def dense_relu_head() -> Any:
    import keras

    L = keras.layers

    inp = keras.Input((SIZE, SIZE, 3))
    x = conv_trunk(inp)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(16, activation="relu")(x)
    x = L.Dropout(0.2)(x)
    out = L.Dense(5, activation="softmax")(x)
    return keras.Model(inp, out)


def global_max_pool_head() -> Any:
    import keras

    L = keras.layers

    inp = keras.Input((SIZE, SIZE, 3))
    x = conv_trunk(inp)
    x = L.GlobalMaxPooling2D()(x)
    out = L.Dense(3, activation="softmax")(x)
    return keras.Model(inp, out)


def binary_sigmoid() -> Any:
    import keras

    L = keras.layers

    inp = keras.Input((SIZE, SIZE, 3))
    x = conv_trunk(inp)
    x = L.GlobalAveragePooling2D()(x)
    out = L.Dense(1, activation="sigmoid")(x)
    return keras.Model(inp, out)


def normalised_gelu_head() -> Any:
    import keras

    L = keras.layers

    inp = keras.Input((SIZE, SIZE, 3))
    x = conv_trunk(inp)
    x = L.Flatten()(x)
    x = L.Dense(10, activation="gelu")(x)
    x = L.LayerNormalization()(x)
    x = L.Dense(8)(x)
    x = L.BatchNormalization()(x)
    x = L.Activation("tanh")(x)
    x = L.Dense(4)(x)
    out = L.Activation("softmax")(x)
    return keras.Model(inp, out)


@dataclass
class Case:
    name: str
    build: Callable[[], Any]
    nested: bool = False


CASES = [
    Case("functional_softmax", functional_softmax),
    Case("nested_backbone", nested_backbone, nested=True),
    Case("dense_relu_head", dense_relu_head),
    Case("global_max_pool_head", global_max_pool_head),
    Case("binary_sigmoid", binary_sigmoid),
    Case("normalised_gelu_head", normalised_gelu_head),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Path, Path]]:
    import keras

    out: dict[str, tuple[Any, Path, Path]] = {}
    root = tmp_path_factory.mktemp("oracle")
    for i, case in enumerate(CASES):
        keras.utils.set_random_seed(100 + i)
        model = case.build()
        _randomise_bn(model, 100 + i)
        keras_path = root / f"{case.name}.keras"
        model.save(keras_path)
        bundle_path = root / f"{case.name}.dermal"
        export_keras(keras_path, bundle_path, input_scale="raw")
        out[case.name] = (model, keras_path, bundle_path)
    return out


def oracle(
    model: Any, case: Case, pixels: np.ndarray, class_index: int, score: str
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, Grad-CAM grid) with tf.GradientTape, keras-io style."""
    import keras
    import tensorflow as tf

    L = keras.layers

    probabilities = model(pixels, training=False).numpy()[0]
    binary = probabilities.shape[0] == 1
    if binary:
        probabilities = np.array([1 - probabilities[0], probabilities[0]])
    final = model.layers[-1]
    if case.nested:
        inner = model.layers[0]
        feature_model = keras.Model(inner.inputs, inner.get_layer("top_activation").output)
        features = tf.convert_to_tensor(feature_model(pixels))
        with tf.GradientTape() as tape:
            tape.watch(features)
            x = features
            for layer in model.layers[1:-1]:
                x = layer(x, training=False)
            logits = tf.matmul(x, final.kernel) + final.bias
            value = logits[0, class_index] if score == "logit" else tf.nn.softmax(logits)[0, class_index]
        grads = tape.gradient(value, features)
    else:
        original = final.activation
        logit_layer_is_activation = isinstance(final, L.Activation)
        grad_model = keras.Model(
            model.inputs[0],
            [
                model.get_layer("top_activation").output,
                model.layers[-2].output if logit_layer_is_activation else model.output,
            ],
        )
        if not logit_layer_is_activation:
            final.activation = keras.activations.linear  # keras-io: score the logit
        try:
            with tf.GradientTape() as tape:
                features, logits = grad_model(pixels, training=False)
                tape.watch(features)
                if binary:
                    z = logits[0, 0]
                    if score == "logit":
                        value = z if class_index == 1 else -z
                    else:
                        p = tf.sigmoid(z)
                        value = p if class_index == 1 else 1 - p
                else:
                    value = (
                        logits[0, class_index] if score == "logit" else tf.nn.softmax(logits)[0, class_index]
                    )
            grads = tape.gradient(value, features)
        finally:
            final.activation = original
    weights = tf.reduce_mean(grads, axis=(0, 1, 2))
    cam = tf.reduce_sum(features[0] * weights, axis=-1).numpy()
    return probabilities, normalise(cam)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("score", ["logit", "probability"])
def test_bundle_matches_gradient_tape(
    exported: dict[str, tuple[Any, Path, Path]], case: Case, score: str
) -> None:
    model, _, bundle_path = exported[case.name]
    engine = LiteRTEngine(bundle_path, sha256="test", num_threads=1)
    n_classes = len(engine.info.labels)
    nontrivial = 0
    for pixels in verification_inputs((SIZE, SIZE), "raw", count=3, seed=42):
        for class_index in range(n_classes):
            ours = engine.run(pixels, class_index=class_index, score=score)  # type: ignore[arg-type]
            ref_probabilities, ref_grid = oracle(model, case, pixels, class_index, score)
            np.testing.assert_allclose(ours.probabilities, ref_probabilities, atol=PROB_TOL)
            assert ours.grid is not None
            assert ours.grid.shape == ref_grid.shape
            np.testing.assert_allclose(ours.grid, ref_grid, atol=HEAT_TOL)
            nontrivial += int(ref_grid.max() == 1.0)
    assert nontrivial >= n_classes, "the oracle maps are mostly empty: the comparison would prove nothing"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tensorflow_backend_matches_litert(exported: dict[str, tuple[Any, Path, Path]], case: Case) -> None:
    _, keras_path, bundle_path = exported[case.name]
    litert = load_engine(bundle_path, sha256="a", num_threads=1)
    reference = load_engine(keras_path, sha256="b")
    assert reference.info.backend == "tensorflow" and litert.info.backend == "litert"
    for pixels in verification_inputs((SIZE, SIZE), "raw", count=2, seed=3):
        for score in ("logit", "probability"):
            a = litert.run(pixels, score=score)
            b = reference.run(pixels, class_index=a.class_index, score=score)
            np.testing.assert_allclose(a.probabilities, b.probabilities, atol=PROB_TOL)
            assert a.grid is not None and b.grid is not None
            np.testing.assert_allclose(a.grid, b.grid, atol=HEAT_TOL)


def test_binary_model_is_served_as_two_classes(exported: dict[str, tuple[Any, Path, Path]]) -> None:
    _, _, bundle_path = exported["binary_sigmoid"]
    engine = LiteRTEngine(bundle_path, sha256="x")
    assert engine.info.labels == ("class_0", "class_1")
    result = engine.run(verification_inputs((SIZE, SIZE), "raw", count=1)[0])
    assert result.probabilities.sum() == pytest.approx(1.0)


def test_default_layer_is_found_inside_the_nested_model(exported: dict[str, tuple[Any, Path, Path]]) -> None:
    _, _, bundle_path = exported["nested_backbone"]
    assert LiteRTEngine(bundle_path, sha256="x").info.layer == "top_activation"


def test_layer_option_picks_an_earlier_layer(tmp_path: Path) -> None:
    import keras

    L = keras.layers

    keras.utils.set_random_seed(5)
    inp = keras.Input((SIZE, SIZE, 3))
    x = L.Conv2D(6, 3, padding="same", activation="relu", name="early")(inp)
    x = L.Activation("relu", name="late")(x)
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, L.Dense(3, activation="softmax")(x))
    model.save(tmp_path / "m.keras")
    export_keras(tmp_path / "m.keras", tmp_path / "m.dermal", layer="early")
    engine = LiteRTEngine(tmp_path / "m.dermal", sha256="x")
    assert engine.info.layer == "early"
    assert engine.head.ops[0].kind == "activation"  # the later relu became part of the head


def test_unsupported_head_layer_is_refused_with_its_name(tmp_path: Path) -> None:
    import keras

    L = keras.layers

    inp = keras.Input((SIZE, SIZE, 3))
    x = L.Conv2D(6, 3, activation="relu")(inp)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Reshape((6, 1))(x)
    x = L.Flatten()(x)
    model = keras.Model(inp, L.Dense(3, activation="softmax")(x))
    model.save(tmp_path / "m.keras")
    with pytest.raises(UnsupportedLayer, match=r"'reshape.*' \(Reshape\)"):
        export_keras(tmp_path / "m.keras", tmp_path / "m.dermal")
    assert not (tmp_path / "m.dermal").exists()


def test_regression_output_is_refused(tmp_path: Path) -> None:
    import keras

    L = keras.layers

    inp = keras.Input((SIZE, SIZE, 3))
    x = L.GlobalAveragePooling2D()(L.Conv2D(4, 3)(inp))
    keras.Model(inp, L.Dense(1)(x)).save(tmp_path / "m.keras")
    with pytest.raises(ExportError, match="sigmoid"):
        export_keras(tmp_path / "m.keras", tmp_path / "m.dermal")


def test_labels_file_and_input_scale_are_recorded(
    tmp_path: Path, exported: dict[str, tuple[Any, Path, Path]]
) -> None:
    _, keras_path, _ = exported["global_max_pool_head"]
    (tmp_path / "labels.txt").write_text("round\nirregular\nnone\n")
    export_keras(
        keras_path, tmp_path / "b.dermal", labels=tmp_path / "labels.txt", input_scale="raw", name="demo"
    )
    engine = LiteRTEngine(tmp_path / "b.dermal", sha256="x")
    assert engine.info.labels == ("round", "irregular", "none")
    assert engine.info.name == "demo"
    (tmp_path / "bad.txt").write_text("a\nb\n")
    with pytest.raises(ExportError, match="expected 3 labels"):
        export_keras(keras_path, tmp_path / "c.dermal", labels=tmp_path / "bad.txt")
    assert not (tmp_path / "c.dermal").exists()
