"""The one tiny-model builder of the tests, and the small bundles committed from it.

Two seeded classifiers, seconds to train-free build on CPU:

- ``TINY``: 64 px, three labels, functional (Conv → Conv "top_activation" → GAP → Dropout → Dense).
- ``SMALL``: 48 px, the synthetic generator's four labels, a nested backbone
  (``Sequential([Sequential([... "top_activation"]), GAP, Dense])``), named as synthetic.

Their ``.keras`` files and bundles are committed in ``tests/data/`` so that every test that only
serves a bundle runs without TensorFlow. ``python -m tests.models`` rebuilds them (with TensorFlow);
``tests/test_models.py`` checks each committed bundle against its committed Keras file.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
TINY_LABELS = ("round_uniform_spot", "irregular_multicolour_spot", "no_lesion")
SYNTH_LABELS = ("no_lesion", "round_uniform_spot", "irregular_multicolour_spot", "oval_spot_with_halo")


@dataclass(frozen=True)
class TinySpec:
    """What a tiny test classifier is: its name in the bundle, labels, input side, seed and shape."""

    stem: str
    name: str
    labels: tuple[str, ...]
    size: int
    seed: int
    nested: bool


TINY = TinySpec("tiny", "tiny-test-model", TINY_LABELS, 64, 0, nested=False)
SMALL = TinySpec("small", "synthetic-small-test-model", SYNTH_LABELS, 48, 7, nested=True)
COMMITTED = (TINY, SMALL)


@dataclass(frozen=True)
class TinyModel:
    """A tiny classifier: its Keras file, its bundle, labels and input side."""

    keras_path: Path
    bundle_path: Path
    labels: tuple[str, ...]
    size: int
    name: str


def committed(spec: TinySpec) -> TinyModel:
    """The committed files of ``spec`` (no TensorFlow needed to serve the bundle)."""
    return TinyModel(
        keras_path=DATA / f"{spec.stem}.keras",
        bundle_path=DATA / f"{spec.stem}.dermal",
        labels=spec.labels,
        size=spec.size,
        name=spec.name,
    )


def keras_model(spec: TinySpec) -> Any:
    """The seeded, untrained Keras classifier of ``spec`` (needs Keras)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(spec.seed)
    layers = keras.layers
    size = spec.size
    if spec.nested:
        inner = keras.Sequential(
            [
                keras.Input((size, size, 3)),
                layers.Rescaling(1 / 255.0),
                layers.Conv2D(8, 3, strides=2, activation="relu"),
                layers.Conv2D(16, 3, strides=2, name="c2"),
                layers.Activation("swish", name="top_activation"),
            ],
            name="inner",
        )
        return keras.Sequential(
            [
                keras.Input((size, size, 3)),
                inner,
                layers.GlobalAveragePooling2D(),
                layers.Dense(len(spec.labels), activation="softmax"),
            ]
        )
    inputs = keras.Input((size, size, 3))
    x = layers.Rescaling(1 / 255.0)(inputs)
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="top_activation")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    outputs = layers.Dense(len(spec.labels), activation="softmax")(x)
    return keras.Model(inputs, outputs)


def build(spec: TinySpec, folder: Path) -> TinyModel:
    """Save ``spec``'s Keras model in ``folder`` and export it to a bundle there (needs TensorFlow)."""
    from dermal_fn.keras.export import export_keras

    folder.mkdir(parents=True, exist_ok=True)
    keras_path = folder / f"{spec.stem}.keras"
    keras_model(spec).save(keras_path)
    bundle_path = folder / f"{spec.stem}.dermal"
    export_keras(keras_path, bundle_path, labels=spec.labels, name=spec.name)
    return TinyModel(keras_path, bundle_path, spec.labels, spec.size, spec.name)


def rewrite_bundle(
    source: Path,
    target: Path,
    *,
    edit: Callable[[dict[str, Any]], None] | None = None,
    flip: Sequence[int] = (),
) -> Path:
    """``source`` rewritten to ``target``: its manifest changed by ``edit`` (in place), the backbone
    bytes at ``flip`` inverted. Nothing is recomputed (the CRC stays as ``edit`` leaves it)."""
    data = source.read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        manifest = json.loads(z.read("manifest.json"))
        head = z.read("head.npz")
    backbone = bytearray(data[: manifest["backbone_bytes"]])
    for index in flip:
        backbone[index] ^= 0xFF
    if edit is not None:
        edit(manifest)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        z.writestr("manifest.json", json.dumps(manifest))
        z.writestr("head.npz", head)
    target.write_bytes(bytes(backbone) + archive.getvalue())
    return target


def with_runtime_record(
    source: Path, target: Path, *, runtime: str | None, crc: bool = True, flip: Sequence[int] = ()
) -> Path:
    """``source`` with ``verification.runtime`` set (None: no verification record), its CRC kept or
    dropped, and the backbone bytes at ``flip`` inverted (the manifest's CRC left as it was)."""

    def edit(manifest: dict[str, Any]) -> None:
        if runtime is None:
            manifest.pop("verification", None)
        else:
            manifest["verification"] = {**manifest.get("verification", {}), "runtime": runtime}
        if not crc:
            manifest.pop("backbone_crc32")

    return rewrite_bundle(source, target, edit=edit, flip=flip)


def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild the committed test models in ``tests/data``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DATA)
    args = parser.parse_args(argv)
    for spec in COMMITTED:
        model = build(spec, args.out)
        sys.stderr.write(f"{model.bundle_path} ({model.bundle_path.stat().st_size} bytes)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --- Keras 2 files (tf-keras), as the classifiers people have were saved -------------------------------

KERAS2_KINDS = ("effnet_h5", "augmented_h5", "mobilenet_keras", "savedmodel", "teachable_machine")


def keras2_file(kind: str, folder: Path, *, seed: int = 0) -> Path:
    """Build and save a seeded Keras 2 classifier of ``kind`` with tf-keras; the path it was saved at.

    - ``effnet_h5``: EfficientNetV2-B0 (random weights) at 64 px + GAP + Dropout + Dense, as ``.h5``;
    - ``augmented_h5``: RandomFlip/RandomRotation/Rescaling in the model, a small CNN, as ``.h5``;
    - ``mobilenet_keras``: ``Sequential([MobileNetV2(alpha=0.35), GAP, Dense])`` nested, as ``.keras``;
    - ``savedmodel``: a small functional CNN as a Keras 2 SavedModel folder;
    - ``teachable_machine``: Teachable Machine's shape (MobileNet alpha 0.25 base and a Dense(100)
      head, each in its own Sequential) as ``keras_model.h5`` with ``labels.txt`` lines ``0 Mole``.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tf_keras as k

    k.utils.set_random_seed(seed)
    layers = k.layers
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "effnet_h5":
        base = k.applications.EfficientNetV2B0(include_top=False, weights=None, input_shape=(64, 64, 3))
        x = layers.Dropout(0.2)(layers.GlobalAveragePooling2D()(base.output))
        model = k.Model(base.input, layers.Dense(3, activation="softmax")(x))
        path = folder / "effnet.h5"
    elif kind == "augmented_h5":
        model = k.Sequential(
            [
                layers.Input((48, 48, 3)),
                layers.RandomFlip("horizontal"),
                layers.RandomRotation(0.1),
                layers.Rescaling(1 / 255.0),
                layers.Conv2D(8, 3, strides=2, activation="relu"),
                layers.Conv2D(16, 3, strides=2, activation="relu", name="top_activation"),
                layers.GlobalAveragePooling2D(),
                layers.Dense(3, activation="softmax"),
            ]
        )
        path = folder / "augmented.h5"
    elif kind == "mobilenet_keras":
        base = k.applications.MobileNetV2(
            include_top=False, weights=None, alpha=0.35, input_shape=(48, 48, 3)
        )
        model = k.Sequential([base, layers.GlobalAveragePooling2D(), layers.Dense(3, activation="softmax")])
        path = folder / "mobilenet.keras"
    elif kind == "savedmodel":
        inputs = k.Input((40, 40, 3))
        x = layers.Conv2D(8, 3, strides=2, activation="relu")(layers.Rescaling(1 / 127.5, offset=-1)(inputs))
        x = layers.Conv2D(12, 3, activation="swish", name="top_activation")(x)
        model = k.Model(inputs, layers.Dense(3, activation="softmax")(layers.GlobalAveragePooling2D()(x)))
        path = folder / "saved_model_dir"
    elif kind == "teachable_machine":
        mobilenet = k.applications.MobileNet(
            include_top=False, weights=None, alpha=0.25, input_shape=(96, 96, 3)
        )
        base = k.Sequential([mobilenet, layers.GlobalAveragePooling2D()], name="sequential_1")
        head = k.Sequential(
            [
                layers.Dense(100, activation="relu", name="dense_Dense1"),
                layers.Dense(2, activation="softmax", name="dense_Dense2"),
            ],
            name="sequential_3",
        )
        model = k.Sequential([k.Input((96, 96, 3)), base, head])
        path = folder / "keras_model.h5"
        (folder / "labels.txt").write_text("0 Mole\n1 Freckle\n")
    else:
        raise ValueError(f"expected one of {KERAS2_KINDS}, found {kind!r}")
    _randomise_batch_norm(model, np.random.default_rng(seed), k)
    model.save(path) if kind != "savedmodel" else model.save(path, save_format="tf")
    return path


def _randomise_batch_norm(model: Any, rng: Any, keras: Any) -> None:
    """Random BatchNorm statistics, so an untrained network gives varied, non-degenerate answers."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _randomise_batch_norm(layer, rng, keras)
        elif isinstance(layer, keras.layers.BatchNormalization):
            n = int(layer.moving_mean.shape[0])
            layer.moving_mean.assign(rng.normal(0, 0.1, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.8, 1.2, n).astype("float32"))
            layer.gamma.assign(rng.normal(1, 0.1, n).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.2, n).astype("float32"))
