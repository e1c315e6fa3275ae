"""The committed test bundles (tests/data) are what their committed Keras files say, and stay small."""

from __future__ import annotations

import numpy as np
import pytest

from dermal_fn.core import bundle as bundle_format
from dermal_fn.core.engine import LiteRTEngine
from dermal_fn.keras.export import verification_inputs
from tests.models import COMMITTED, TinySpec, committed

IDS = [spec.stem for spec in COMMITTED]


@pytest.mark.parametrize("spec", COMMITTED, ids=IDS)
def test_committed_bundle_is_small_and_says_what_it_is(spec: TinySpec) -> None:
    model = committed(spec)
    assert model.bundle_path.stat().st_size < 64_000
    manifest = bundle_format.read(model.bundle_path).manifest
    assert manifest.name == spec.name
    assert manifest.labels == spec.labels
    assert manifest.input_size == (spec.size, spec.size)


@pytest.mark.tensorflow
@pytest.mark.parametrize("spec", COMMITTED, ids=IDS)
def test_committed_bundle_agrees_with_its_keras_file(spec: TinySpec) -> None:
    """The oracle: the TensorFlow reference backend on the committed .keras file."""
    from dermal_fn.keras.reference import KerasEngine

    model = committed(spec)
    reference = KerasEngine(model.keras_path, sha256="keras", labels=spec.labels)
    engine = LiteRTEngine(model.bundle_path, sha256="bundle")
    for pixels in verification_inputs((spec.size, spec.size), "raw", count=3, seed=5):
        ours = engine.run(pixels)
        theirs = reference.run(pixels, class_index=ours.class_index)
        assert ours.grid is not None and theirs.grid is not None
        np.testing.assert_allclose(ours.probabilities, theirs.probabilities, atol=1e-4)
        np.testing.assert_allclose(ours.grid, theirs.grid, atol=2e-3)
        assert float(theirs.grid.max()) == pytest.approx(1.0)
