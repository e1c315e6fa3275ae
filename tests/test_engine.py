"""Engine invariants: shapes, ranges, no NaN, no mutation, flat memory, and no TensorFlow when serving."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermal_fn.core import bundle as bundle_format
from dermal_fn.core import imaging
from dermal_fn.core.engine import LiteRTEngine, cpu_identity, litert_runtime, xnnpack_weight_cache_path
from dermal_fn.errors import BundleError
from dermal_fn.serving.engines import load_engine
from dermal_fn.serving.options import PredictOptions
from tests.conftest import TinyModel
from tests.models import with_runtime_record

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
            result = engine.run(pixels, score=score)
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


# --- the load check: a zero-image inference unless these bytes are proven to run here ----------------


@pytest.mark.parametrize(
    ("runtime", "crc", "expected"),
    [
        ("this", True, "exporter"),  # the exporter ran these very bytes on this runtime
        ("ai-edge-litert 0.0.1", True, "zero-image inference"),  # another runtime
        ("this", False, "zero-image inference"),  # no CRC: the bytes may not be the exporter's
        (None, True, "zero-image inference"),  # no verification record
    ],
)
def test_check_inference_is_skipped_only_for_bytes_proven_to_run_here(
    tiny_model: TinyModel, tmp_path: Path, runtime: str | None, crc: bool, expected: str
) -> None:
    claimed = litert_runtime() if runtime == "this" else runtime
    path = with_runtime_record(tiny_model.bundle_path, tmp_path / "b.dermal", runtime=claimed, crc=crc)
    engine = LiteRTEngine(path, sha256="x")
    assert engine.load_check == expected
    reference = LiteRTEngine(tiny_model.bundle_path, sha256="x")
    pixels = np.random.default_rng(3).uniform(0, 255, (1, tiny_model.size, tiny_model.size, 3))
    mine, theirs = engine.run(pixels.astype(np.float32)), reference.run(pixels.astype(np.float32))
    np.testing.assert_array_equal(mine.probabilities, theirs.probabilities)
    assert mine.grid is not None and theirs.grid is not None
    np.testing.assert_array_equal(mine.grid, theirs.grid)


def test_a_runtime_claim_never_skips_the_crc(tiny_model: TinyModel, tmp_path: Path) -> None:
    path = with_runtime_record(
        tiny_model.bundle_path, tmp_path / "b.dermal", runtime=litert_runtime(), flip=(500, 501)
    )
    with pytest.raises(BundleError, match="CRC-32"):
        LiteRTEngine(path, sha256="x")


def test_a_load_is_remembered_per_runtime(tiny_model: TinyModel, tmp_path: Path) -> None:
    verified = tmp_path / "verified"
    first = load_engine(tiny_model.bundle_path, sha256="ab" * 32, verified_dir=verified)
    assert first.load_check == "zero-image inference"  # the committed bundle has no runtime record
    marker = verified / f"{'ab' * 32}.ok"
    assert marker.read_text().strip() == litert_runtime()
    again = load_engine(tiny_model.bundle_path, sha256="ab" * 32, verified_dir=verified)
    assert again.load_check == "earlier load"
    marker.write_text("ai-edge-litert 0.0.1\n")  # a runtime upgrade with the cache kept
    upgraded = load_engine(tiny_model.bundle_path, sha256="ab" * 32, verified_dir=verified)
    assert upgraded.load_check == "zero-image inference"
    assert marker.read_text().strip() == litert_runtime()
    other = load_engine(tiny_model.bundle_path, sha256="cd" * 32, verified_dir=verified)
    assert other.load_check == "zero-image inference"  # another SHA-256: other bytes


def test_a_request_imports_nothing_lazily_that_costs_a_cold_start(tiny_model: TinyModel) -> None:
    """The first request pays any module it imports late: numpy.ma (via np.percentile) cost 0.1 CPU-s."""
    script = textwrap.dedent(
        f"""
        import json, sys
        from dermal_fn.serving.config import Settings
        from dermal_fn.serving.options import PredictOptions
        from dermal_fn.serving.service import Service
        from tests.test_engine import jpeg_bytes
        service = Service(Settings.from_env({{"MODEL_URI": {str(tiny_model.bundle_path)!r}}}))
        service.holder.get()
        photo = jpeg_bytes((640, 480))
        before = set(sys.modules)
        service.predict(photo, PredictOptions())
        print(json.dumps(sorted(set(sys.modules) - before)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    late = json.loads(out.stdout.strip().splitlines()[-1])
    assert "numpy.ma" not in late, f"modules the first request imported: {late}"


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
cpu MHz\t\t: {mhz}
core id\t\t: 0
flags\t\t: fpu sse sse2 avx avx2 {extra}

processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: something else entirely
"""


def test_cpu_identity_follows_the_instruction_sets_not_the_clock(tmp_path: Path) -> None:
    def identity(**fields: str) -> str:
        path = tmp_path / f"cpuinfo-{len(list(tmp_path.iterdir()))}"
        path.write_text(CPUINFO.format(**fields))
        return cpu_identity(str(path))

    base = identity(mhz="2445.404", extra="fma")
    assert identity(mhz="3100.000", extra="fma") == base  # the clock, core ids, later processors: not kernels
    assert identity(mhz="2445.404", extra="fma avx512f avx512vnni") != base  # other kernels, other packing
    assert cpu_identity(str(tmp_path / "missing")) != base  # no cpuinfo: the machine name alone
    assert cpu_identity() == cpu_identity("/proc/cpuinfo")


def test_the_weight_cache_is_found_again_after_the_model_is_copied(
    tiny_model: TinyModel, tmp_path: Path
) -> None:
    """A deploy copies the build's files (new inodes, new times): the packed weights are still the same."""
    build, deploy = tmp_path / "build", tmp_path / "deploy"
    build.mkdir()
    model = build / "m.dermal"
    shutil.copyfile(tiny_model.bundle_path, model)
    first = LiteRTEngine(model, sha256="ab" * 32, weight_cache_dir=build / "xnnpack")
    assert first.weight_cache is not None and first.weight_cache.is_file()
    first.close()
    shutil.copytree(build, deploy)
    os.utime(deploy / "m.dermal", (1, 1))
    again = LiteRTEngine(deploy / "m.dermal", sha256="ab" * 32, weight_cache_dir=deploy / "xnnpack")
    assert again.weight_cache == deploy / "xnnpack" / first.weight_cache.name
    assert [p.name for p in (deploy / "xnnpack").iterdir()] == [first.weight_cache.name]  # not built again
    pixels = np.random.default_rng(0).random((1, tiny_model.size, tiny_model.size, 3), dtype=np.float32)
    reference = LiteRTEngine(tiny_model.bundle_path, sha256="ab" * 32)
    np.testing.assert_allclose(again.feature_map(pixels), reference.feature_map(pixels), rtol=1e-5, atol=1e-6)
    other = xnnpack_weight_cache_path(model, sha256="cd" * 32, folder=build / "xnnpack")
    assert other != first.weight_cache  # other bytes, another cache
