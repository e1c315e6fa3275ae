"""The serving bundle: one file holding the LiteRT backbone, the NumPy head, labels and preprocessing.

Layout (the TFLite-metadata convention of a model file that is also a zip archive):

    [ LiteRT flatbuffer of the backbone: input image -> Grad-CAM feature map ]   offset 0
    [ zip archive, stored (uncompressed):                                    ]
    [   manifest.json   format, version, name, labels, input, layer, head ops ]
    [   head.npz        the head's float32 arrays, keyed "<op index>/<name>"   ]

LiteRT maps the file and reads the flatbuffer at offset 0 (trailing bytes are ignored); Python's
zipfile finds the archive from its end. So the bundle is served by path, without copying the
backbone into Python memory.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dermal_fn.core.head import Head
from dermal_fn.core.imaging import INPUT_SCALES, RESIZE_METHODS, InputScale
from dermal_fn.errors import BundleError

FORMAT = "dermal-fn-bundle"
VERSION = 1
TFLITE_IDENTIFIER = b"TFL3"
MANIFEST = "manifest.json"
HEAD_ARRAYS = "head.npz"
SUFFIX = ".dermal"


@dataclass(frozen=True)
class Manifest:
    """What a bundle says about itself."""

    name: str
    labels: tuple[str, ...]
    input_size: tuple[int, int]  # (height, width)
    input_scale: InputScale
    resize: str
    layer: str
    feature_map_shape: tuple[int, int, int]  # (h, w, c)
    quantization: str
    backbone_bytes: int
    extra: dict[str, Any]

    def to_json(self, head_spec: dict[str, Any]) -> dict[str, Any]:
        """The manifest as JSON data, with the head's description."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "labels": list(self.labels),
            "input": {
                "height": self.input_size[0],
                "width": self.input_size[1],
                "scale": self.input_scale,
                "resize": self.resize,
            },
            "layer": self.layer,
            "feature_map_shape": list(self.feature_map_shape),
            "quantization": self.quantization,
            "backbone_bytes": self.backbone_bytes,
            "head": head_spec,
            **self.extra,
        }


@dataclass(frozen=True)
class Bundle:
    """A bundle read from disk: its manifest and head; the backbone stays in the file."""

    path: Path
    manifest: Manifest
    head: Head


def is_bundle(path: str | Path) -> bool:
    """True when the file starts with a LiteRT flatbuffer (bytes 4..8 are ``TFL3``)."""
    with open(path, "rb") as f:
        return f.read(8)[4:8] == TFLITE_IDENTIFIER


def write(path: str | Path, *, backbone: bytes, manifest: Manifest, head: Head) -> None:
    """Write a bundle file atomically (temp file in the same folder, then rename)."""
    if backbone[4:8] != TFLITE_IDENTIFIER:
        raise BundleError("expected a LiteRT flatbuffer for the backbone, found other bytes")
    head_spec, arrays = head.to_spec()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        z.writestr(MANIFEST, json.dumps(manifest.to_json(head_spec), indent=1, sort_keys=True))
        npz = io.BytesIO()
        np.savez(npz, **arrays)  # type: ignore[arg-type]
        z.writestr(HEAD_ARRAYS, npz.getvalue())
    target = Path(path)
    tmp = target.with_name(f".{target.name}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(backbone)
            f.write(archive.getvalue())
            f.flush()
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def read(path: str | Path) -> Bundle:
    """Read and validate a bundle's manifest and head (the backbone is loaded by the engine).

    Every way a manifest or head can be malformed is a :class:`BundleError`: the head is run once on
    a zero feature map of the manifest's shape, so arrays of the wrong shape are refused here, not on
    every request.
    """
    path = Path(path)
    try:
        if not is_bundle(path):
            raise BundleError(f"expected a dermal-fn bundle (LiteRT + zip), found other bytes in {path.name}")
        with zipfile.ZipFile(path) as z:
            data = json.loads(z.read(MANIFEST))
            with np.load(io.BytesIO(z.read(HEAD_ARRAYS)), allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, EOFError) as exc:
        raise BundleError(f"expected a readable bundle at {path.name}, found {exc}") from exc
    manifest = _parse_manifest(data)
    head = Head.from_spec(data.get("head"), arrays)
    check_head(head, manifest)
    return Bundle(path=path, manifest=manifest, head=head)


def check_head(head: Head, manifest: Manifest) -> None:
    """Run the head on a zero feature map of the manifest's shape; its outputs must match the labels."""
    try:
        probabilities = head.forward(np.zeros((1, *manifest.feature_map_shape))).probabilities
        n_classes = head.n_classes
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise BundleError(
            f"expected head arrays that fit a feature map {manifest.feature_map_shape}, found: {exc}"
        ) from exc
    if n_classes != len(manifest.labels) or np.shape(probabilities) != (len(manifest.labels),):
        raise BundleError(
            f"expected {len(manifest.labels)} outputs for the labels, found the head giving "
            f"{n_classes} ({np.shape(probabilities)})"
        )


def _parse_manifest(data: Any) -> Manifest:
    if not isinstance(data, dict):
        raise BundleError(f"expected the manifest to be a JSON object, found a JSON {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise BundleError(f"expected manifest format {FORMAT!r}, found {data.get('format')!r}")
    if data.get("version") != VERSION:
        raise BundleError(f"expected bundle version {VERSION}, found {data.get('version')!r}")
    try:
        inp = data["input"]
        scale = inp["scale"]
        if scale not in INPUT_SCALES:
            raise BundleError(f"expected input scale in {INPUT_SCALES}, found {scale!r}")
        if inp["resize"] not in RESIZE_METHODS:
            raise BundleError(f"expected resize in {sorted(RESIZE_METHODS)}, found {inp['resize']!r}")
        known = {
            "format", "version", "name", "labels", "input", "layer", "feature_map_shape",
            "quantization", "backbone_bytes", "head",
        }  # fmt: skip
        h, w, c = (int(v) for v in data["feature_map_shape"])
        return Manifest(
            name=str(data["name"]),
            labels=tuple(str(label) for label in data["labels"]),
            input_size=(int(inp["height"]), int(inp["width"])),
            input_scale=scale,
            resize=str(inp["resize"]),
            layer=str(data["layer"]),
            feature_map_shape=(h, w, c),
            quantization=str(data.get("quantization", "none")),
            backbone_bytes=int(data["backbone_bytes"]),
            extra={k: v for k, v in data.items() if k not in known},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"expected a complete manifest, found a problem with {exc}") from exc
