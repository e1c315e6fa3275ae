"""What the exporter reads for labels and layers: the file the user named, and errors that help.

An explicit ``--labels`` is the only labels file read (a stray ``labels.txt`` of another model beside
the Keras file used to win); a missing labels file is said before the model is loaded; a wrong
``--layer`` names the layers that could be meant.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dermal_fn.core import bundle as bundle_format
from tests.models import TINY, committed

pytestmark = pytest.mark.tensorflow


def export(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dermal_fn", "export", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The tiny Keras model in a folder that also holds another model's two-line labels.txt."""
    shutil.copy(committed(TINY).keras_path, tmp_path / "model.keras")
    (tmp_path / "labels.txt").write_text("cat\ndog\n", encoding="utf-8")  # another model's
    return tmp_path


def test_explicit_labels_win_over_a_stray_labels_txt(folder: Path) -> None:
    (folder / "labels3.txt").write_text("".join(f"{label}\n" for label in TINY.labels), encoding="utf-8")
    done = export("model.keras", "--out", "out.dermal", "--labels", "labels3.txt", cwd=folder)
    assert done.returncode == 0, done.stderr[-2000:]
    assert bundle_format.read(folder / "out.dermal").manifest.labels == TINY.labels


def test_without_labels_the_stray_file_is_not_read(folder: Path) -> None:
    done = export("model.keras", "--out", "out.dermal", cwd=folder)
    assert done.returncode == 0, done.stderr[-2000:]
    assert bundle_format.read(folder / "out.dermal").manifest.labels == ("class_0", "class_1", "class_2")


def test_a_missing_labels_file_is_named_as_given_and_nothing_is_written(folder: Path) -> None:
    done = export("model.keras", "--out", "out.dermal", "--labels", "typo/labels7.txt", cwd=folder)
    assert done.returncode == 2
    assert "expected a labels file at typo/labels7.txt, found nothing" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (folder / "out.dermal").exists()


def test_a_labels_file_of_the_wrong_length_is_named_as_given(folder: Path) -> None:
    (folder / "labels7.txt").write_text("".join(f"l{i}\n" for i in range(7)), encoding="utf-8")
    done = export("model.keras", "--out", "out.dermal", "--labels", "labels7.txt", cwd=folder)
    assert done.returncode == 2
    assert "expected 3 labels (one per line) in labels7.txt, found 7" in done.stderr


def test_a_wrong_layer_lists_the_nearest_names(folder: Path) -> None:
    done = export("model.keras", "--out", "out.dermal", "--layer", "top_activaton", cwd=folder)
    assert done.returncode == 2
    assert "expected a layer named 'top_activaton' in the model, found none" in done.stderr
    assert "top_activation" in done.stderr.split("found none", 1)[1]
