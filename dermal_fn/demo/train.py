"""Train the demo model: a small, seeded Keras CNN on synthetic skin images.

    python -m dermal_fn.demo.train --out-dir DIR [--size 128] [--seed 0] [--epochs N] [--train N]

writes DIR/demo_synthetic.keras and DIR/labels.txt (one label per line, in output order). The model
takes raw RGB pixels in [0, 255] as float32 of shape (size, size, 3) and rescales them itself; its
last 4-D layer is `top_activation` (size/8 square, for Grad-CAM), followed by GlobalAveragePooling2D,
Dropout and a softmax Dense named like EfficientNetV2's head (`avg_pool`, `top_dropout`,
`predictions`). TensorFlow and Keras are imported inside functions only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dermal_fn.demo.synth import ALL_TONES, LABELS, SPOT_CLASSES, generate_batch

logger = logging.getLogger(__name__)

MODEL_FILENAME = "demo_synthetic.keras"
LABELS_FILENAME = "labels.txt"
GRADCAM_LAYER = "top_activation"
DEFAULT_SIZE = 128
DEFAULT_SEED = 0
DEFAULT_EPOCHS = 12
DEFAULT_TRAIN_IMAGES = 3000
DEFAULT_VALIDATION_IMAGES = 800
DEFAULT_POINTING_SEED = 2026
BATCH_SIZE = 32
LEARNING_RATE = 3e-3

# Independent data streams derived from the training seed.
_TRAIN_STREAM, _VALIDATION_STREAM = 0, 1
# (filters, kernel, stride, pool after) per block: 128 px -> 64 (stride) -> 32 -> 16 (pools). The
# receptive field of `top_activation` stays small (37 px, a spot is 20-56 px across): deeper or wider
# tops classify as well but put their Grad-CAM peak on a ring just outside the spot's border.
_BLOCKS: tuple[tuple[int, int, int, bool], ...] = (
    (16, 3, 2, False),
    (32, 3, 1, True),
    (48, 3, 1, True),
)
_TOP_FILTERS = 64
_TOP_KERNEL = 3
_BATCH_NORM_MOMENTUM = 0.9


def data_seed(seed: int, stream: int) -> int:
    """A generator seed for one data stream (train, validation) of a training seed."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def build_model(size: int = DEFAULT_SIZE, n_classes: int = len(LABELS), seed: int = DEFAULT_SEED) -> Any:
    """Build the (uncompiled) CNN: raw pixels in, class probabilities out."""
    import keras

    if size % 8 or size < 32:
        raise ValueError(f"expected an input size that is a multiple of 8 and >= 32, found {size}")

    def initializer(offset: int) -> Any:
        return keras.initializers.HeNormal(seed=seed * 1000 + offset)

    image = keras.Input(shape=(size, size, 3), dtype="float32", name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescaling")(image)
    for index, (filters, kernel, stride, pool) in enumerate(_BLOCKS, start=1):
        x = keras.layers.Conv2D(
            filters,
            kernel,
            strides=stride,
            padding="same",
            use_bias=False,
            kernel_initializer=initializer(index),
            name=f"block{index}_conv",
        )(x)
        x = keras.layers.BatchNormalization(momentum=_BATCH_NORM_MOMENTUM, name=f"block{index}_bn")(x)
        x = keras.layers.Activation("relu", name=f"block{index}_activation")(x)
        if pool:
            x = keras.layers.MaxPooling2D(2, name=f"block{index}_pool")(x)
    x = keras.layers.Conv2D(
        _TOP_FILTERS,
        _TOP_KERNEL,
        padding="same",
        use_bias=False,
        kernel_initializer=initializer(0),
        name="top_conv",
    )(x)
    x = keras.layers.BatchNormalization(momentum=_BATCH_NORM_MOMENTUM, name="top_bn")(x)
    x = keras.layers.Activation("relu", name=GRADCAM_LAYER)(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(0.2, seed=seed, name="top_dropout")(x)
    probabilities = keras.layers.Dense(
        n_classes,
        activation="softmax",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed * 1000 + 999),
        name="predictions",
    )(x)
    return keras.Model(image, probabilities, name="demo_synthetic")


def augment(images: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal and vertical flips and a brightness factor in [0.9, 1.1], as uint8."""
    flip_rows = rng.random(len(images)) < 0.5
    flip_cols = rng.random(len(images)) < 0.5
    brightness = rng.uniform(0.9, 1.1, size=len(images)).astype(np.float32)
    augmented = np.empty_like(images)
    for index, image in enumerate(images):
        view = image[::-1] if flip_rows[index] else image
        view = view[:, ::-1] if flip_cols[index] else view
        augmented[index] = np.clip(np.rint(view * brightness[index]), 0, 255)
    return augmented


def train(
    out_dir: Path | str,
    *,
    size: int = DEFAULT_SIZE,
    seed: int = DEFAULT_SEED,
    epochs: int = DEFAULT_EPOCHS,
    n_train: int = DEFAULT_TRAIN_IMAGES,
    n_validation: int = DEFAULT_VALIDATION_IMAGES,
    tones: tuple[float, float] = ALL_TONES,
) -> Path:
    """Train the demo model, write it and labels.txt into `out_dir`, return the model's path.

    ``tones`` limits the training skin (0 very light … 5 dark): the audit's test trains a light-skin-only
    variant and checks that ``evaluate`` finds the gap it has on dark skin."""
    import keras

    started = time.perf_counter()
    # Seeds are enough for the same weights on one machine (checked: model.weights.h5 is
    # byte-identical across runs); tf.config.experimental.enable_op_determinism() is not used
    # because it is process-wide and cannot be undone, which would leak into a caller's tests.
    keras.utils.set_random_seed(seed)

    train_set = generate_batch(n_train, seed=data_seed(seed, _TRAIN_STREAM), size=size, tones=tones)
    validation_set = generate_batch(
        n_validation, seed=data_seed(seed, _VALIDATION_STREAM), size=size, tones=tones
    )
    logger.info(
        "generated data: %d training and %d validation images (%.1f s)",
        n_train,
        n_validation,
        _since(started),
    )

    model = build_model(size, len(LABELS), seed)
    steps_per_epoch = -(-n_train // BATCH_SIZE)
    schedule = keras.optimizers.schedules.CosineDecay(
        LEARNING_RATE, decay_steps=max(1, epochs * steps_per_epoch)
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    logger.info("built model: %d parameters", int(model.count_params()))

    for epoch in range(epochs):
        rng = np.random.default_rng([seed, _TRAIN_STREAM, epoch])
        order = rng.permutation(n_train)
        history = model.fit(
            augment(train_set.images[order], rng=rng),
            train_set.labels[order],
            batch_size=BATCH_SIZE,
            epochs=epoch + 1,
            initial_epoch=epoch,
            shuffle=False,
            verbose=0,
        )
        logger.info(
            "epoch %d/%d: loss %.4f, accuracy %.4f (%.1f s)",
            epoch + 1,
            epochs,
            float(history.history["loss"][-1]),
            float(history.history["accuracy"][-1]),
            _since(started),
        )
    accuracy = _accuracy(model, validation_set.images, validation_set.labels)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / MODEL_FILENAME
    # Saved without optimizer state or training config: a third of the size, nothing to compile.
    inference_model = build_model(size, len(LABELS), seed)
    inference_model.set_weights(model.get_weights())
    inference_model.save(model_path)
    (out / LABELS_FILENAME).write_text("".join(f"{label}\n" for label in LABELS), encoding="utf-8")
    logger.info(
        "trained %s: validation accuracy %.4f (%.1f s)", model_path, round(accuracy, 4), _since(started)
    )
    return model_path


def validation_accuracy(
    model_path: Path | str, *, n: int = DEFAULT_VALIDATION_IMAGES, seed: int = DEFAULT_SEED
) -> float:
    """Top-1 accuracy of a saved model on the validation stream of training seed `seed`."""
    import keras

    model = keras.saving.load_model(model_path, compile=False)
    size = int(model.input_shape[1])
    batch = generate_batch(n, seed=data_seed(seed, _VALIDATION_STREAM), size=size)
    return _accuracy(model, batch.images, batch.labels)


def pointing_game(
    model_path: Path | str,
    *,
    n: int = 200,
    seed: int = DEFAULT_POINTING_SEED,
    margin_cells: int = 0,
) -> float:
    """Share of `n` spot images (no `no_lesion`) whose Grad-CAM peak falls on the drawn spot.

    Grad-CAM as in the keras-io recipe (`gradcam_grids`), for the predicted class with the
    pre-softmax logit as the score, at the resolution of `top_activation`; scored by `peak_on_spot`.
    """
    import keras

    model = keras.saving.load_model(model_path, compile=False)
    size = int(model.input_shape[1])
    batch = generate_batch(n, seed=seed, size=size, classes=SPOT_CLASSES)
    grids = gradcam_grids(model, batch.images.astype(np.float32))
    hits = peak_on_spot(grids, batch.masks, margin_cells=margin_cells)
    return float(hits.mean()) if len(hits) else 0.0


def peak_on_spot(grids: np.ndarray, masks: np.ndarray, *, margin_cells: int = 0) -> np.ndarray:
    """Per image: does the heatmap's peak cell hold a spot pixel (NumPy only, any Grad-CAM).

    `grids` is (n, rows, cols) at feature-map resolution, `masks` (n, size, size) spot pixels with
    size a multiple of rows and cols. A cell is on the spot if any spot pixel lies in it;
    `margin_cells` grows the spot by that many cells in all eight directions. Ties go to the first
    peak in row-major order, as `np.argmax` breaks them.
    """
    n, grid_rows, grid_cols = grids.shape
    if masks.shape[0] != n or masks.shape[1] % grid_rows or masks.shape[2] % grid_cols:
        raise ValueError(
            f"expected masks of shape ({n}, k*{grid_rows}, k*{grid_cols}) for grids of shape "
            f"{grids.shape}, found {masks.shape}"
        )
    cell_rows, cell_cols = masks.shape[1] // grid_rows, masks.shape[2] // grid_cols
    blocks = masks.reshape(n, grid_rows, cell_rows, grid_cols, cell_cols)
    on_spot = np.asarray(blocks.any(axis=(2, 4)))
    for _ in range(margin_cells):
        on_spot = _dilate_one_cell(on_spot)
    peaks = grids.reshape(n, -1).argmax(axis=1)
    return np.asarray(on_spot.reshape(n, -1)[np.arange(n), peaks], dtype=bool)


def gradcam_grids(model: Any, pixels: np.ndarray, *, batch_size: int = 50) -> np.ndarray:
    """Grad-CAM at `top_activation` resolution for each image's predicted class, in [0, 1].

    The keras-io recipe: gradient of the class logit (before softmax) with respect to the feature
    map, pooled over space, weights the channels; ReLU; divided by the maximum (eps guarded).
    """
    import keras
    import tensorflow as tf

    layer_names = [layer.name for layer in model.layers]
    cut = layer_names.index(GRADCAM_LAYER)
    backbone = keras.Model(model.input, model.get_layer(GRADCAM_LAYER).output)
    head_layers = model.layers[cut + 1 :]
    final_dense = head_layers[-1]
    grids = []
    for start in range(0, len(pixels), batch_size):
        feature_map = backbone(pixels[start : start + batch_size], training=False)
        with tf.GradientTape() as tape:
            tape.watch(feature_map)
            features = feature_map
            for layer in head_layers[:-1]:
                features = layer(features, training=False)
            logits = tf.matmul(features, final_dense.kernel) + final_dense.bias
            class_index = tf.argmax(logits, axis=1)
            score = tf.gather(logits, class_index, axis=1, batch_dims=1)
        gradients = tape.gradient(score, feature_map)
        channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(channel_weights * feature_map, axis=-1)).numpy()
        peak = cam.reshape(len(cam), -1).max(axis=1)[:, None, None]
        grids.append(cam / np.maximum(peak, 1e-12))
    return np.concatenate(grids).astype(np.float32)


def _dilate_one_cell(grid: np.ndarray) -> np.ndarray:
    """Grow a boolean (n, rows, cols) grid by one cell in all eight directions."""
    padded = np.pad(grid, ((0, 0), (1, 1), (1, 1)))
    rows, cols = grid.shape[1:]
    grown = np.zeros_like(grid)
    for dr in range(3):
        for dc in range(3):
            grown |= padded[:, dr : dr + rows, dc : dc + cols]
    return grown


def _accuracy(model: Any, pixels: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of `model` on raw pixels."""
    probabilities = model.predict(pixels, batch_size=100, verbose=0)
    return float((probabilities.argmax(axis=1) == labels).mean())


def _since(started: float) -> float:
    """Seconds since `started`, rounded for logs."""
    return round(time.perf_counter() - started, 2)


class _JsonLineFormatter(logging.Formatter):
    """One JSON object per record with a Cloud Logging `severity` field."""

    _RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((key, value) for key, value in record.__dict__.items() if key not in self._RESERVED)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train, then log validation accuracy and the Grad-CAM pointing-game score."""
    parser = argparse.ArgumentParser(prog="python -m dermal_fn.demo.train", description=__doc__)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN_IMAGES, dest="n_train")
    parser.add_argument("--validation", type=int, default=DEFAULT_VALIDATION_IMAGES)
    parser.add_argument("--pointing", type=int, default=200, help="spot images; 0 to skip")
    args = parser.parse_args(argv)

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_JsonLineFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)

    started = time.perf_counter()
    model_path = train(
        args.out_dir,
        size=args.size,
        seed=args.seed,
        epochs=args.epochs,
        n_train=args.n_train,
        n_validation=args.validation,
    )
    summary: dict[str, Any] = {
        "model_path": str(model_path),
        "labels_path": str(model_path.with_name(LABELS_FILENAME)),
        "model_bytes": model_path.stat().st_size,
        "validation_accuracy": round(validation_accuracy(model_path, n=args.validation, seed=args.seed), 4),
    }
    if args.pointing:
        summary["pointing_game"] = round(pointing_game(model_path, n=args.pointing), 4)
    summary["seconds"] = _since(started)
    logger.info("summary: %s", json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
