"""Shared fixtures: a tiny seeded Keras classifier and its bundle, built once per test session."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TINY_LABELS = ("round_uniform_spot", "irregular_multicolour_spot", "no_lesion")
TINY_SIZE = 64


@dataclass(frozen=True)
class TinyModel:
    """A small untrained-but-seeded CNN classifier: its .keras file, its bundle and labels."""

    keras_path: Path
    bundle_path: Path
    labels: tuple[str, ...]
    size: int


def build_tiny_model(folder: Path, *, seed: int = 0, size: int = TINY_SIZE) -> TinyModel:
    """Build, save and export a seeded tiny classifier (about two seconds on CPU)."""
    import keras

    from dermal_fn.export import export_keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((size, size, 3))
    x = layers.Rescaling(1 / 255.0)(inputs)
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="top_activation")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    outputs = layers.Dense(len(TINY_LABELS), activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    folder.mkdir(parents=True, exist_ok=True)
    keras_path = folder / "tiny.keras"
    model.save(keras_path)
    bundle_path = folder / "tiny.dermal"
    export_keras(keras_path, bundle_path, labels=TINY_LABELS, name="tiny-test-model")
    return TinyModel(keras_path=keras_path, bundle_path=bundle_path, labels=TINY_LABELS, size=size)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A tiny exported classifier shared by the whole session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
