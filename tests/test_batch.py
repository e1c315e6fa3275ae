"""``dermal-fn batch`` on Apache Beam's own in-process runner, in Beam's environment (requirements-batch.txt;
collected only where Apache Beam is installed, tests/conftest.py).

Thousands of generated photos plus damaged files, from a local folder, a CSV with labels and the
storage emulator: every file comes out exactly once, the damaged ones as error rows, each row equal to
what the function answers for the same photo (probabilities to 1e-6, grids equal), and the model is
loaded once. No mock: real Beam, real LiteRT, the real emulator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("apache_beam")

from dermal_fn.batch import pipeline
from dermal_fn.demo import synth
from dermal_fn.serving.config import Settings
from dermal_fn.serving.options import PredictOptions
from dermal_fn.serving.service import Service
from tests import hostile_fixtures as hf
from tests.gcs_emulator import FakeGCS

pytestmark = [pytest.mark.batch, pytest.mark.slow]

DAMAGED = {
    "cut-short.jpg": b"\xff\xd8\xff\xe0" + b"\x00" * 200,
    "notes.txt": b"visit notes, not a photo",
    "empty.png": b"",
    "bomb.png": hf.png_bomb(),
}


def rows_of(prefix: Path) -> list[dict[str, Any]]:
    files = sorted(prefix.parent.glob(f"{prefix.name}-*-of-*.jsonl"))
    assert files, f"no output shards at {prefix}"
    return [json.loads(line) for file in files for line in file.read_text().splitlines()]


def direct(bundle: Path, data: bytes) -> dict[str, Any]:
    """What the function answers for one photo, all classes, no overlay (the oracle)."""
    service = Service(Settings(model_uri=str(bundle), litert_threads=1))
    n = len(service.holder.get().info.labels)
    return dict(service.predict(data, PredictOptions(top_k=n, overlay="none")).body)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("batch-in")
    synth.save_folder(folder, 2000, seed=12, size=64)
    for name, data in DAMAGED.items():
        (folder / name).write_bytes(data)
    return folder


def test_a_folder_of_thousands_is_scored_once_each_with_error_rows(
    photos: Path, small_bundle: Path, tmp_path: Path
) -> None:
    summary = pipeline.run(str(small_bundle), str(photos), str(tmp_path / "out" / "rows"))
    rows = rows_of(tmp_path / "out" / "rows")
    inputs = sorted(str(p) for p in photos.iterdir())
    assert sorted(row["image"] for row in rows) == inputs  # every file, exactly once
    errors = {Path(row["image"]).name: row["error"] for row in rows if "error" in row}
    assert set(errors) == set(DAMAGED)
    assert all(error["code"] == "invalid_image" for error in errors.values())
    assert summary.rows == len(inputs) and summary.errors == len(DAMAGED)
    assert summary.model_loads == 1  # loaded once for the whole run
    answered = {row["image"]: row for row in rows if "error" not in row}
    for path in inputs[:: len(inputs) // 20]:
        if path not in answered:
            continue
        expected, got = direct(small_bundle, Path(path).read_bytes()), answered[path]
        assert [p["index"] for p in got["predictions"]] == [p["index"] for p in expected["predictions"]]
        np.testing.assert_allclose(
            [p["probability"] for p in got["predictions"]],
            [p["probability"] for p in expected["predictions"]],
            atol=1e-6,
        )
        assert got["gradcam"]["grid"] == expected["gradcam"]["grid"]
        assert got["assessment"] == expected["assessment"]


def test_a_csv_keeps_its_labels_and_evaluate_reads_the_rows(
    photos: Path, small_bundle: Path, tmp_path: Path
) -> None:
    from dermal_fn.tools.evaluate import evaluate_rows

    listed = sorted(p for p in photos.iterdir() if p.suffix == ".jpg")[:120]
    lines = (
        ["path,label"] + [f"{p.name},{p.stem.split('_', 1)[1]}" for p in listed] + ["missing.jpg,no_lesion"]
    )
    csv_path = photos / "labels.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    try:
        pipeline.run(str(small_bundle), str(csv_path), str(tmp_path / "rows"))
    finally:
        csv_path.unlink()
    rows = rows_of(tmp_path / "rows")
    assert len(rows) == 121 and all("label" in row for row in rows)
    assert [row["error"]["code"] for row in rows if "error" in row] == ["invalid_image"]  # the missing file
    report = evaluate_rows(small_bundle, str(tmp_path / "rows-*.jsonl"))
    assert report["images"] == 120 and report["error_rows"] == 1
    truth = [synth.LABELS.index(row["label"]) for row in rows if "error" not in row]
    predicted = [row["predictions"][0]["index"] for row in rows if "error" not in row]
    assert report["accuracy"] == pytest.approx(np.mean(np.asarray(truth) == np.asarray(predicted)), abs=1e-4)


def test_photos_under_a_gs_prefix_are_read_from_storage(
    small_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeGCS(workdir=tmp_path / "gcs") as gcs:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
        bucket = gcs.create_bucket()
        folder = tmp_path / "local"
        paths = synth.save_folder(folder, 40, seed=3, size=64)
        for path in paths:
            gcs.upload(bucket, f"clinic/2026/{path.name}", path.read_bytes())
        gcs.upload(bucket, "clinic/2026/damaged.jpg", DAMAGED["cut-short.jpg"])
        gcs.upload(bucket, "elsewhere/other.jpg", paths[0].read_bytes())
        summary = pipeline.run(str(small_bundle), f"gs://{bucket}/clinic/", str(tmp_path / "rows"), top_k=2)
    rows = rows_of(tmp_path / "rows")
    assert sorted(row["image"] for row in rows) == sorted(
        [f"gs://{bucket}/clinic/2026/{p.name}" for p in paths] + [f"gs://{bucket}/clinic/2026/damaged.jpg"]
    )
    assert summary.errors == 1 and all(len(row["predictions"]) == 2 for row in rows if "error" not in row)
    first = next(row for row in rows if row["image"].endswith(paths[0].name))
    expected = direct(small_bundle, paths[0].read_bytes())
    assert first["gradcam"]["grid"] == expected["gradcam"]["grid"]


def test_heatmaps_are_written_beside_the_rows(small_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    synth.save_folder(folder, 6, seed=8, size=64)
    pipeline.run(str(small_bundle), str(folder), str(tmp_path / "rows"), heatmaps=str(tmp_path / "heatmaps"))
    rows = rows_of(tmp_path / "rows")
    written = sorted((tmp_path / "heatmaps").glob("*.png"))
    assert len(written) == 6
    assert sorted(row["gradcam"]["overlay_file"] for row in rows) == sorted(str(p) for p in written)
    assert all("overlay_png" not in row["gradcam"] for row in rows)
