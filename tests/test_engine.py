"""Engine invariants: shapes, ranges, no NaN, no mutation, flat memory, and no TensorFlow when serving."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermal_fn.core import bundle as bundle_format
from dermal_fn.core import imaging
from dermal_fn.core.engine import LiteRTEngine
from dermal_fn.errors import BundleError
from dermal_fn.serving.engines import load_engine
from dermal_fn.serving.options import PredictOptions
from tests.conftest import TinyModel

REPO = Path(__file__).resolve().parents[1]


def jpeg_bytes(size: tuple[int, int] = (320, 240), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_grid_invariants_and_input_not_mutated(tiny_model: TinyModel) -> None:
    engine = LiteRTEngine(tiny_model.bundle_path, sha256="x")
    h, w, _ = bundle_format.read(tiny_model.bundle_path).manifest.feature_map_shape
    rng = np.random.default_rng(1)
    for _ in range(5):
        pixels = rng.uniform(0, 255, (1, tiny_model.size, tiny_model.size, 3)).astype(np.float32)
        before = pixels.copy()
        for score in ("logit", "probability"):
            result = engine.run(pixels, score=score)  # type: ignore[arg-type]
            assert result.grid is not None
            assert result.grid.shape == (h, w)
            assert np.isfinite(result.grid).all()
            assert result.grid.min() >= 0.0 and result.grid.max() <= 1.0
            assert result.probabilities.sum() == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_array_equal(pixels, before)


def test_class_by_label_and_index_agree(tiny_model: TinyModel) -> None:
    """Labels are resolved once, by the options; the engine takes the index."""
    engine = LiteRTEngine(tiny_model.bundle_path, sha256="x")
    pixels = np.full((1, tiny_model.size, tiny_model.size, 3), 120.0, dtype=np.float32)
    by_index = engine.run(pixels, class_index=1)
    checked = PredictOptions(class_=tiny_model.labels[1]).checked(tiny_model.labels)
    by_label = engine.run(pixels, class_index=checked.class_index)
    assert by_index.class_index == by_label.class_index == 1
    assert by_index.grid is not None and by_label.grid is not None
    np.testing.assert_array_equal(by_index.grid, by_label.grid)
    with pytest.raises(ValueError, match="expected a class index"):
        engine.run(pixels, class_index=len(tiny_model.labels))


def test_gradcam_off_skips_the_grid(tiny_model: TinyModel) -> None:
    engine = LiteRTEngine(tiny_model.bundle_path, sha256="x")
    pixels = np.zeros((1, tiny_model.size, tiny_model.size, 3), dtype=np.float32)
    assert engine.run(pixels, gradcam=False).grid is None


def test_memory_is_flat_over_100_predictions(tiny_model: TinyModel) -> None:
    """RSS after 100 more predictions stays within a few MB of RSS after warm-up (in a clean process)."""
    script = textwrap.dedent(
        f"""
        import json, dataclasses
        from dermal_fn.serving.config import Settings
        from dermal_fn.serving.options import PredictOptions
        from dermal_fn.serving.service import Service
        from dermal_fn.serving.memory import rss_mb
        from tests.test_engine import jpeg_bytes
        service = Service(dataclasses.replace(Settings(), model_uri={str(tiny_model.bundle_path)!r}, memory_soft_limit_mb=None))
        images = [jpeg_bytes((640, 480), seed=i) for i in range(5)]
        for i in range(20):
            service.predict(images[i % 5], PredictOptions())
        warm = rss_mb()
        for i in range(100):
            service.predict(images[i % 5], PredictOptions())
        print(json.dumps({{"warm": warm, "after": rss_mb()}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["after"] - figures["warm"] < 8.0, figures


def test_serving_a_bundle_imports_no_tensorflow(tiny_model: TinyModel) -> None:
    """The whole request path (function app, decode, LiteRT, head, render) without TensorFlow or Keras."""
    script = textwrap.dedent(
        f"""
        import os, sys, json
        os.environ["MODEL_URI"] = {str(tiny_model.bundle_path)!r}
        import functions_framework
        from tests.test_engine import jpeg_bytes
        app = functions_framework.create_app(target="dermal", source="main.py")
        client = app.test_client()
        response = client.post("/predict", data=jpeg_bytes(), content_type="image/jpeg")
        assert response.status_code == 200, response.get_data(as_text=True)
        assert response.get_json()["gradcam"]["status"] == "ok"
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras"))
        print(json.dumps(heavy))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_load_engine_refuses_other_files(tmp_path: Path) -> None:
    other = tmp_path / "x.bin"
    other.write_bytes(b"\x00" * 64)
    with pytest.raises(BundleError):
        load_engine(other, sha256="x")


def test_truncated_bundle_is_refused(tiny_model: TinyModel, tmp_path: Path) -> None:
    data = tiny_model.bundle_path.read_bytes()
    broken = tmp_path / "broken.dermal"
    broken.write_bytes(data[: len(data) - 100])
    with pytest.raises(BundleError):
        load_engine(broken, sha256="x")


def test_decode_then_model_input_shape(tiny_model: TinyModel) -> None:
    decoded = imaging.decode(jpeg_bytes((1000, 700)))
    pixels = imaging.model_input(decoded.rgb, size=(tiny_model.size, tiny_model.size), scale="raw")
    assert pixels.shape == (1, tiny_model.size, tiny_model.size, 3)
    assert pixels.dtype == np.float32
    assert pixels.min() >= 0.0 and pixels.max() <= 255.0
