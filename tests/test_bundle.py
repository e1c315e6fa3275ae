"""The bundle format: every malformed manifest or head is a BundleError at read time, never another error."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dermal_fn.core import bundle as bundle_format
from dermal_fn.errors import BundleError
from tests.models import TinyModel

Manifest = dict[str, Any]
Arrays = dict[str, np.ndarray]


def parts(path: Path) -> tuple[bytes, Manifest, Arrays]:
    """A bundle's backbone bytes, manifest and head arrays, read without validation."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        manifest = json.loads(z.read(bundle_format.MANIFEST))
        with np.load(io.BytesIO(z.read(bundle_format.HEAD_ARRAYS))) as npz:
            arrays = {key: npz[key] for key in npz.files}
    return data[: manifest["backbone_bytes"]], manifest, arrays


def write_raw(path: Path, backbone: bytes, manifest: Any, arrays: Arrays) -> Path:
    """Write a bundle as given, however wrong (bundle.write would refuse some of these)."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        z.writestr(bundle_format.MANIFEST, json.dumps(manifest))
        npz = io.BytesIO()
        np.savez(npz, **arrays)  # type: ignore[arg-type]
        z.writestr(bundle_format.HEAD_ARRAYS, npz.getvalue())
    path.write_bytes(backbone + archive.getvalue())
    return path


def _set(*keys: str, value: Any) -> Callable[[Manifest], Any]:
    def edit(manifest: Manifest) -> Any:
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
        return manifest

    return edit


def _drop(*keys: str) -> Callable[[Manifest], Any]:
    def edit(manifest: Manifest) -> Any:
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
        return manifest

    return edit


MANIFEST_CASES: dict[str, Callable[[Manifest], Any]] = {
    "a JSON list": lambda m: [m],
    "a JSON string": lambda m: "manifest",
    "no format": _drop("format"),
    "another version": _set("version", value=99),
    "no head": _drop("head"),
    "head a list": _set("head", value=[]),
    "head without ops": _drop("head", "ops"),
    "ops not a list": _set("head", "ops", value=7),
    "op without kind": lambda m: (m["head"]["ops"][0].pop("kind"), m)[1],
    "unknown op kind": lambda m: (m["head"]["ops"][0].update(kind="conv3d"), m)[1],
    "op params a list": lambda m: (m["head"]["ops"][0].update(params=[1]), m)[1],
    "bad output activation": _set("head", "output_activation", value="tanh"),
    "no input": _drop("input"),
    "unknown scale": _set("input", "scale", value="hdr"),
    "unknown resize": _set("input", "resize", value="lanczos9"),
    "feature map of two dims": _set("feature_map_shape", value=[4, 4]),
    "feature map not numbers": _set("feature_map_shape", value=["a", "b", "c"]),
    "labels too few": lambda m: (m.update(labels=m["labels"][:-1]), m)[1],
    "feature map channels wrong": lambda m: (m.update(feature_map_shape=[*m["feature_map_shape"][:2], 5]), m)[
        1
    ],
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_malformed_manifest_is_a_bundle_error(tiny_model: TinyModel, tmp_path: Path, case: str) -> None:
    backbone, manifest, arrays = parts(tiny_model.bundle_path)
    broken = write_raw(tmp_path / "broken.dermal", backbone, MANIFEST_CASES[case](manifest), arrays)
    with pytest.raises(BundleError, match="expected"):
        bundle_format.read(broken)


def _kernel_key(arrays: Arrays) -> str:
    return next(key for key in arrays if key.endswith("/kernel"))


ARRAY_CASES: dict[str, Callable[[Arrays], Arrays]] = {
    "kernel missing": lambda a: {k: v for k, v in a.items() if not k.endswith("/kernel")},
    "kernel transposed": lambda a: {**a, _kernel_key(a): a[_kernel_key(a)].T.copy()},
    "kernel a vector": lambda a: {**a, _kernel_key(a): a[_kernel_key(a)].ravel()},
    "kernel one class short": lambda a: {**a, _kernel_key(a): a[_kernel_key(a)][:, :-1].copy()},
}


@pytest.mark.parametrize("case", sorted(ARRAY_CASES))
def test_head_arrays_of_the_wrong_shape_are_refused_at_read(
    tiny_model: TinyModel, tmp_path: Path, case: str
) -> None:
    backbone, manifest, arrays = parts(tiny_model.bundle_path)
    broken = write_raw(tmp_path / "broken.dermal", backbone, manifest, ARRAY_CASES[case](arrays))
    with pytest.raises(BundleError, match="expected"):
        bundle_format.read(broken)


def test_the_rewritten_committed_bundle_reads_back(tiny_model: TinyModel, tmp_path: Path) -> None:
    """The oracle for the cases above: unchanged parts make a bundle that reads."""
    backbone, manifest, arrays = parts(tiny_model.bundle_path)
    same = write_raw(tmp_path / "same.dermal", backbone, manifest, arrays)
    assert bundle_format.read(same).manifest.labels == tiny_model.labels


def test_not_a_zip_after_the_flatbuffer_is_a_bundle_error(tiny_model: TinyModel, tmp_path: Path) -> None:
    backbone, _, _ = parts(tiny_model.bundle_path)
    broken = tmp_path / "broken.dermal"
    broken.write_bytes(backbone + b"not a zip archive" * 10)
    with pytest.raises(BundleError, match="expected a readable bundle"):
        bundle_format.read(broken)
