"""The committed demo bundle, served as the service serves it: it classifies and it points at the spot."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from dermal_fn.core import imaging
from dermal_fn.core.bundle import read
from dermal_fn.core.engine import LiteRTEngine
from dermal_fn.demo import synth
from dermal_fn.models import DEMO_BUNDLE
from dermal_fn.serving.config import Settings

POINTING_SEED = 2026
N_IMAGES = 200


@pytest.fixture(scope="module")
def engine() -> Iterator[LiteRTEngine]:
    assert DEMO_BUNDLE.is_file(), f"the demo bundle must be committed at {DEMO_BUNDLE} (make demo-model)"
    engine = LiteRTEngine(DEMO_BUNDLE, sha256="demo", num_threads=1)
    yield engine
    engine.close()  # in the teardown, where pytest captures LiteRT's lines, not during its report


def served_input(engine: LiteRTEngine, image: np.ndarray) -> np.ndarray:
    """Preprocess like the service: Pillow image → model input."""
    info = engine.info
    return imaging.model_input(
        Image.fromarray(image, mode="RGB"), size=info.input_size, scale=info.input_scale, resize=info.resize
    )


def test_demo_bundle_is_the_default_small_and_says_synthetic(engine: LiteRTEngine) -> None:
    assert Settings().model_uri == str(DEMO_BUNDLE)
    assert DEMO_BUNDLE.stat().st_size < 1_000_000
    assert "synthetic" in engine.info.name and "not for diagnosis" in engine.info.name
    assert engine.info.labels == synth.LABELS
    assert read(DEMO_BUNDLE).manifest.extra["verification"]["head_max_heatmap_diff"] <= 1e-3


def test_demo_model_classifies_generated_images(engine: LiteRTEngine) -> None:
    size = engine.info.input_size[0]
    batch = synth.generate_batch(N_IMAGES, seed=POINTING_SEED + 1, size=size)
    predicted = [
        int(np.argmax(engine.run(served_input(engine, img), gradcam=False).probabilities))
        for img in batch.images
    ]
    accuracy = float(np.mean(np.array(predicted) == batch.labels))
    assert accuracy >= 0.9, accuracy


def test_heatmap_peak_falls_on_the_drawn_spot(engine: LiteRTEngine) -> None:
    """Pointing game: for ≥ 90 % of 200 spot images, the Grad-CAM peak cell holds spot pixels."""
    size = engine.info.input_size[0]
    rng = np.random.default_rng(POINTING_SEED)
    spot_labels = [i for i, label in enumerate(synth.LABELS) if label != "no_lesion"]
    hits = 0
    for i in range(N_IMAGES):
        sample = synth.generate(rng, size=size, label=spot_labels[i % len(spot_labels)])
        result = engine.run(served_input(engine, sample.image), score="logit")
        assert result.grid is not None
        rows, cols = result.grid.shape
        row, col = np.unravel_index(int(np.argmax(result.grid)), result.grid.shape)
        cell = sample.mask[
            row * size // rows : (row + 1) * size // rows, col * size // cols : (col + 1) * size // cols
        ]
        hits += int(cell.any())
    assert hits / N_IMAGES >= 0.9, f"pointing game {hits}/{N_IMAGES}"
