"""The Keras classifiers people have — Keras 2 files, Teachable Machine, ImageNet preprocessing.

Every file is built here with tf-keras (seeded, small, BatchNorm statistics randomised so the answers
vary), exported through the real command line in a fresh process, and the bundle is checked against
the same Keras that wrote the file: probabilities against ``model.predict`` (<= 1e-4), heatmaps
against a ``tf.GradientTape`` on that Keras's layers (<= 2e-3).
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dermal_fn.core.engine import LiteRTEngine
from dermal_fn.core.imaging import INPUT_PRESETS, model_input
from tests.models import KERAS2_KINDS, keras2_file

pytestmark = pytest.mark.tensorflow

REPO = Path(__file__).resolve().parent.parent
PROB_TOL, HEAT_TOL = 1e-4, 2e-3


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m dermal_fn ARGS`` in a fresh process (a fresh Keras registry), as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "dermal_fn", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def our_lines(stderr: str) -> list[str]:
    """What dermal_fn said on stderr (LiteRT's and TensorFlow's native lines left out)."""
    noise = ("INFO: ", "WARNING: ", "└", "I0000", "W0000", "E0000", "  ")
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(noise)]


def manifest(bundle: Path) -> dict[str, Any]:
    with zipfile.ZipFile(bundle) as archive:
        document: dict[str, Any] = json.loads(archive.read("manifest.json"))
    return document


@pytest.fixture(scope="module")
def keras2_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keras2")
    return {kind: keras2_file(kind, root / kind, seed=3) for kind in KERAS2_KINDS}


def reference_checks(source: Path, bundle: Path, *, scale: str = "raw") -> None:
    """The bundle against the Keras that wrote ``source``: predict() and a GradientTape."""
    from dermal_fn.keras.formats import load_model
    from dermal_fn.keras.reference import KerasEngine

    model = load_model(source)
    assert type(model).__module__.startswith("tf_keras")
    engine = LiteRTEngine(bundle, sha256="b")
    reference = KerasEngine(source, sha256="k", input_scale=engine.info.input_scale)
    h, w = engine.info.input_size
    rng = np.random.default_rng(8)
    nontrivial = 0
    for _ in range(3):
        from PIL import Image

        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        pixels = engine.info.model_input(image)
        ours = engine.run(pixels)
        expected = np.asarray(model.predict(pixels, verbose=0))[0]
        np.testing.assert_allclose(ours.probabilities, expected, atol=PROB_TOL)
        tape = reference.run(pixels, class_index=ours.class_index)
        assert ours.grid is not None and tape.grid is not None
        np.testing.assert_allclose(ours.grid, tape.grid, atol=HEAT_TOL)
        nontrivial += int(float(tape.grid.max()) == pytest.approx(1.0) and float(tape.grid.min()) < 0.99)
    assert nontrivial >= 1  # the oracle's maps are not all flat


@pytest.mark.parametrize("kind", ["effnet_h5", "augmented_h5", "mobilenet_keras", "savedmodel"])
def test_a_keras2_file_exports_and_agrees_with_its_keras(
    keras2_files: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    source = keras2_files[kind]
    bundle = tmp_path / f"{kind}.dermal"
    done = run_cli("export", str(source), "--out", str(bundle))
    assert done.returncode == 0, "\n".join(our_lines(done.stderr))[-2000:]
    source_info = manifest(bundle)["source"]
    assert source_info["keras"].startswith("tf_keras 2.")
    assert (
        source_info["kind"]
        == {"effnet_h5": "h5", "augmented_h5": "h5", "mobilenet_keras": "keras", "savedmodel": "savedmodel"}[
            kind
        ]
    )
    assert (
        source_info["written_by_keras"] is None
        if kind == "savedmodel"
        else source_info["written_by_keras"].startswith("2.")
    )
    reference_checks(source, bundle)


def test_teachable_machine_export_needs_only_the_input_scale(
    keras2_files: dict[str, Path], tmp_path: Path
) -> None:
    source = keras2_files["teachable_machine"]
    bundle = tmp_path / "tm.dermal"
    done = run_cli(
        "export",
        str(source),
        "--out",
        str(bundle),
        "--labels",
        str(source.parent / "labels.txt"),
        "--input-scale",
        "symmetric",
    )
    assert done.returncode == 0, "\n".join(our_lines(done.stderr))[-2000:]
    document = manifest(bundle)
    assert document["labels"] == ["Mole", "Freckle"]  # "0 Mole" lines read as names
    assert document["input"]["scale"] == "symmetric"
    reference_checks(source, bundle)


def test_indexed_labels_must_count_from_zero_in_order(tmp_path: Path) -> None:
    from dermal_fn.errors import ExportError
    from dermal_fn.keras.reference import read_labels

    path = tmp_path / "labels.txt"
    path.write_text("0 Mole\n1 Freckle\n")
    assert read_labels(path, 2) == ("Mole", "Freckle")
    path.write_text("1 Mole\n0 Freckle\n")
    with pytest.raises(ExportError, match=r"0\.\.1 in order"):
        read_labels(path, 2)
    path.write_text("nevus\n2 spots\n")  # not every line indexed: plain labels
    assert read_labels(path, 2) == ("nevus", "2 spots")


@pytest.mark.parametrize("mode", ["caffe", "torch"])
def test_presets_are_keras_applications_preprocess_input(mode: str) -> None:
    """The oracle: keras.applications' own preprocess_input, on the same pixels."""
    import tf_keras as k
    from PIL import Image

    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8))
    scale, normalization = INPUT_PRESETS[mode]
    ours = model_input(image, size=(32, 40), scale=scale, normalization=normalization)
    theirs = k.applications.imagenet_utils.preprocess_input(
        np.asarray(image, dtype=np.float32)[None], mode=mode
    )
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_caffe_model_exported_with_its_preprocessing_answers_as_keras_does(tmp_path: Path) -> None:
    """A ResNet-style model that expects preprocess_input outside it: the bundle applies it at serving."""
    import tf_keras as k
    from PIL import Image

    k.utils.set_random_seed(2)
    inputs = k.Input((40, 40, 3))
    x = k.layers.Conv2D(8, 3, strides=2, activation="relu", name="top_activation")(inputs)
    model = k.Model(inputs, k.layers.Dense(3, activation="softmax")(k.layers.GlobalAveragePooling2D()(x)))
    source = tmp_path / "resnetish.h5"
    model.save(source)
    bundle = tmp_path / "resnetish.dermal"
    done = run_cli("export", str(source), "--out", str(bundle), "--input-scale", "caffe")
    assert done.returncode == 0, "\n".join(our_lines(done.stderr))[-2000:]
    document = manifest(bundle)["input"]
    assert document["preset"] == "caffe" and document["channels"] == "BGR" and document["scale"] == "raw"
    engine = LiteRTEngine(bundle, sha256="b")
    from dermal_fn.serving.card import model_card

    card_input = model_card(engine)["input"]
    assert card_input["preset"] == "caffe" and card_input["channels"] == "BGR"  # the card says it too
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    served = engine.run(engine.info.model_input(image), gradcam=False).probabilities
    keras_way = k.applications.resnet50.preprocess_input(np.asarray(image, dtype=np.float32)[None])
    np.testing.assert_allclose(served, model.predict(keras_way, verbose=0)[0], atol=PROB_TOL)


def test_mean_and_std_are_stored_and_applied(keras2_files: dict[str, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "normalised.dermal"
    done = run_cli(
        "export",
        str(keras2_files["augmented_h5"]),
        "--out",
        str(bundle),
        "--input-scale",
        "unit",
        "--mean",
        "0.5,0.4,0.3",
        "--std",
        "0.25,0.2,0.5",
    )
    assert done.returncode == 0, "\n".join(our_lines(done.stderr))[-2000:]
    document = manifest(bundle)["input"]
    assert document["mean"] == [0.5, 0.4, 0.3] and document["std"] == [0.25, 0.2, 0.5]
    from PIL import Image

    engine = LiteRTEngine(bundle, sha256="b")
    image = Image.fromarray(np.full((48, 48, 3), 200, dtype=np.uint8))
    np.testing.assert_allclose(
        engine.info.model_input(image)[0, 0, 0],
        (200 / 255 - np.array([0.5, 0.4, 0.3])) / np.array([0.25, 0.2, 0.5]),
        rtol=1e-6,
    )


CUSTOM_MODULE = """
import keras


@keras.saving.register_keras_serializable(package="clinic")
class Gain(keras.layers.Layer):
    def __init__(self, factor=1.5, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}
"""


@pytest.fixture(scope="module")
def custom_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Keras 3 model with a registered custom layer in its backbone, and one with it in its head."""
    import importlib.util

    import keras

    root = tmp_path_factory.mktemp("custom")
    module_path = root / "clinic_layers.py"
    module_path.write_text(CUSTOM_MODULE)
    spec = importlib.util.spec_from_file_location("clinic_layers_build", module_path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    keras.utils.set_random_seed(1)
    inputs = keras.Input((32, 32, 3))
    x = module.Gain(0.01)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="top_activation")(x)
    backbone_model = keras.Model(
        inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    )
    y = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="top_activation")(inputs)
    y = module.Gain(2.0, name="gain")(keras.layers.GlobalAveragePooling2D()(y))
    head_model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(y))
    files = {"module": module_path, "backbone": root / "backbone.keras", "head": root / "head.keras"}
    backbone_model.save(files["backbone"])
    head_model.save(files["head"])
    return files


def test_a_custom_layer_needs_its_module_and_then_exports(
    custom_files: dict[str, Path], tmp_path: Path
) -> None:
    bundle = tmp_path / "custom.dermal"
    refused = run_cli("export", str(custom_files["backbone"]), "--out", str(bundle))
    assert refused.returncode == 2 and not bundle.exists()
    lines = our_lines(refused.stderr)
    assert len(lines) <= 2 and "Traceback" not in refused.stderr, lines
    assert "--custom-objects" in lines[-1] and "Gain" in lines[-1]
    done = run_cli(
        "export",
        str(custom_files["backbone"]),
        "--out",
        str(bundle),
        "--custom-objects",
        str(custom_files["module"]),
    )
    assert done.returncode == 0, "\n".join(our_lines(done.stderr))[-2000:]
    assert manifest(bundle)["source"]["keras"].startswith("keras 3.")


def test_a_custom_layer_in_the_head_is_refused_by_name(custom_files: dict[str, Path], tmp_path: Path) -> None:
    done = run_cli(
        "export",
        str(custom_files["head"]),
        "--out",
        str(tmp_path / "h.dermal"),
        "--custom-objects",
        str(custom_files["module"]),
    )
    assert done.returncode == 2
    assert "layer 'gain' (Gain) cannot be served by the NumPy head" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("what", ["text", "keras3_savedmodel", "missing"])
def test_what_cannot_be_read_is_one_or_two_lines(tmp_path: Path, what: str) -> None:
    if what == "text":
        target = tmp_path / "model.h5"
        target.write_text("not a model")
        expected = "found other bytes"
    elif what == "keras3_savedmodel":
        import keras

        inputs = keras.Input((16, 16, 3))
        model = keras.Model(
            inputs,
            keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))),
        )
        target = tmp_path / "exported"
        model.export(str(target), verbose=False)
        expected = "without a Keras model in it"
    else:
        target = tmp_path / "absent.keras"
        expected = "found nothing"
    done = run_cli("export", str(target), "--out", str(tmp_path / "o.dermal"))
    lines = our_lines(done.stderr)
    assert done.returncode == 2 and 1 <= len(lines) <= 2, lines
    assert expected in lines[-1] and "Traceback" not in done.stderr
    verbose = run_cli("-v", "export", str(target), "--out", str(tmp_path / "o.dermal"))
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr  # -v shows it


def test_the_tensorflow_backend_serves_a_keras2_file(keras2_files: dict[str, Path]) -> None:
    from dermal_fn.serving.engines import load_engine

    engine = load_engine(keras2_files["augmented_h5"], sha256="k")
    assert engine.info.backend == "tensorflow"
    result = engine.run(np.zeros((1, 48, 48, 3), dtype=np.float32))
    assert result.probabilities.shape == (3,) and result.grid is not None
