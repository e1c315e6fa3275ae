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
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
