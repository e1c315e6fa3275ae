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

import dataclasses
import io
import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dermal_fn.core.head import Head
from dermal_fn.core.imaging import INPUT_SCALES, RESIZE_METHODS, InputScale, Normalization
from dermal_fn.core.trust import Calibration
from dermal_fn.core.units import MIB
from dermal_fn.errors import BundleError

FORMAT = "dermal-fn-bundle"
VERSION = 1
TFLITE_IDENTIFIER = b"TFL3"
MANIFEST = "manifest.json"
HEAD_ARRAYS = "head.npz"
CALIBRATION_ARRAYS = "calibration.npz"  # present in calibrated bundles only
MAX_MANIFEST_BYTES = 1 * MIB
MAX_HEAD_BYTES = 256 * MIB  # a Dense over a 12x12x1280 Flatten is 150 MB in float64


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
    backbone_crc32: str | None = None  # zlib CRC-32 of the flatbuffer, 8 hex digits (older bundles: none)
    normalization: Normalization = field(default_factory=Normalization)  # after the scale (older: none)
    preset: str | None = None  # the --input-scale preset it came from ("caffe", "torch"), for the card

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
                **(self.normalization.as_json() if not self.normalization.identity else {}),
                **({"preset": self.preset} if self.preset else {}),
            },
            "layer": self.layer,
            "feature_map_shape": list(self.feature_map_shape),
            "quantization": self.quantization,
            "backbone_bytes": self.backbone_bytes,
            **({"backbone_crc32": self.backbone_crc32} if self.backbone_crc32 else {}),
            "head": head_spec,
            **self.extra,
        }


@dataclass(frozen=True)
class Bundle:
    """A bundle read from disk: its manifest, head and calibration; the backbone stays in the file."""

    path: Path
    manifest: Manifest
    head: Head
    calibration: Calibration | None = None


def is_bundle(path: str | Path) -> bool:
    """True when the file starts with a LiteRT flatbuffer (bytes 4..8 are ``TFL3``)."""
    with open(path, "rb") as f:
        return f.read(8)[4:8] == TFLITE_IDENTIFIER


def write(
    path: str | Path,
    *,
    backbone: bytes,
    manifest: Manifest,
    head: Head,
    calibration: Calibration | None = None,
) -> None:
    """Write a bundle file atomically (temp file in the same folder, then rename)."""
    if backbone[4:8] != TFLITE_IDENTIFIER:
        raise BundleError("expected a LiteRT flatbuffer for the backbone, found other bytes")
    head_spec, arrays = head.to_spec()
    manifest = dataclasses.replace(manifest, backbone_bytes=len(backbone), backbone_crc32=crc32_hex(backbone))
    document = manifest.to_json(head_spec)
    document.pop("calibration", None)  # only the calibration given here, with its arrays
    if calibration is not None:
        document["calibration"] = dict(calibration.section)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        z.writestr(MANIFEST, json.dumps(document, indent=1, sort_keys=True))
        z.writestr(HEAD_ARRAYS, _npz(arrays))
        if calibration is not None and calibration.distribution is not None:
            z.writestr(CALIBRATION_ARRAYS, _npz(calibration.distribution.to_arrays()))
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


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    """An .npz's arrays; its members are checked like the bundle's (stored, bounded) first."""
    with zipfile.ZipFile(io.BytesIO(data)) as npz_zip:  # an .npz is a zip too: same rules
        for info in npz_zip.infolist():
            _check_member(info, MAX_HEAD_BYTES)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


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
            data = json.loads(_member(z, MANIFEST, MAX_MANIFEST_BYTES))
            arrays = _load_npz(_member(z, HEAD_ARRAYS, MAX_HEAD_BYTES))
            names = set(z.namelist())
            calibration_arrays = (
                _load_npz(_member(z, CALIBRATION_ARRAYS, MAX_HEAD_BYTES))
                if CALIBRATION_ARRAYS in names
                else None
            )
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, EOFError) as exc:
        raise BundleError(f"expected a readable bundle at {path.name}, found {exc}") from exc
    manifest = _parse_manifest(data)
    head = Head.from_spec(data.get("head"), arrays)
    check_head(head, manifest)
    calibration = None
    if manifest.extra.get("calibration") is not None:
        calibration = _parse_calibration(manifest, calibration_arrays)
    return Bundle(path=path, manifest=manifest, head=head, calibration=calibration)


def _parse_calibration(manifest: Manifest, arrays: dict[str, np.ndarray] | None) -> Calibration:
    """The calibration section and arrays, checked against the labels and the feature map's channels."""
    try:
        calibration = Calibration.from_manifest(manifest.extra["calibration"], arrays)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"expected a complete calibration section, found a problem with {exc}") from exc
    model = calibration.distribution
    if model is not None and model.means.shape != (len(manifest.labels), manifest.feature_map_shape[2]):
        raise BundleError(
            f"expected calibration means of shape ({len(manifest.labels)}, {manifest.feature_map_shape[2]}), "
            f"found {model.means.shape}"
        )
    return calibration


def _check_member(info: zipfile.ZipInfo, limit: int) -> None:
    """A member must be stored (a compressed one could be a bomb) and at most ``limit`` bytes."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise BundleError(f"expected stored (uncompressed) members, found {info.filename} compressed")
    if info.file_size > limit:
        raise BundleError(
            f"expected {info.filename} to hold at most {limit / MIB:.0f} MB, found {info.file_size / MIB:.0f} MB"
        )


def _member(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """A member's bytes, its kind and size checked from the directory before anything is read."""
    info = archive.getinfo(name)
    _check_member(info, limit)
    return archive.read(info)


def crc32_hex(data: bytes) -> str:
    """zlib's CRC-32 of ``data`` as 8 hex digits."""
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def verify_backbone(path: str | Path, manifest: Manifest, *, chunk: int = 1 << 20) -> None:
    """The flatbuffer's bytes against the manifest's size and CRC-32 (a flipped byte can crash LiteRT).

    Bundles written before the CRC was recorded are checked for size only.
    """
    crc = 0
    with open(path, "rb") as f:
        remaining = manifest.backbone_bytes
        while remaining > 0:
            block = f.read(min(chunk, remaining))
            if not block:
                raise BundleError(
                    f"expected a backbone of {manifest.backbone_bytes} bytes, found the file shorter"
                )
            crc = zlib.crc32(block, crc)
            remaining -= len(block)
    found = f"{crc & 0xFFFFFFFF:08x}"
    if manifest.backbone_crc32 is not None and found != manifest.backbone_crc32:
        raise BundleError(
            f"expected the backbone's CRC-32 {manifest.backbone_crc32} (from the manifest), found {found}: "
            "the file is damaged"
        )


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


def _normalization(inp: dict[str, Any]) -> Normalization:
    """The input's mean, std and channel order (defaults: none)."""
    mean = tuple(float(v) for v in inp.get("mean", (0.0, 0.0, 0.0)))
    std = tuple(float(v) for v in inp.get("std", (1.0, 1.0, 1.0)))
    channels = inp.get("channels", "RGB")
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std) or channels not in ("RGB", "BGR"):
        raise BundleError(
            f"expected 3 means, 3 positive stds and RGB or BGR, found {mean}, {std}, {channels!r}"
        )
    return Normalization(mean=(mean[0], mean[1], mean[2]), std=(std[0], std[1], std[2]), channels=channels)


def _crc_field(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).lower()
    if len(text) != 8 or any(c not in "0123456789abcdef" for c in text):
        raise BundleError(f"expected backbone_crc32 to be 8 hex digits, found {value!r}")
    return text


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
            "quantization", "backbone_bytes", "backbone_crc32", "head",
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
            backbone_crc32=_crc_field(data.get("backbone_crc32")),
            normalization=_normalization(inp),
            preset=str(inp["preset"]) if inp.get("preset") else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"expected a complete manifest, found a problem with {exc}") from exc


def copy_with(
    source: str | Path,
    target: str | Path,
    *,
    extra: dict[str, Any] | None = None,
    calibration: Calibration | None = None,
) -> Bundle:
    """``source`` written to ``target`` with manifest sections added (``extra``) or a new calibration;
    the backbone and head are the same bytes. The new bundle, read back."""
    loaded = read(source)
    with open(source, "rb") as f:
        backbone = f.read(loaded.manifest.backbone_bytes)
    manifest = loaded.manifest
    if extra:
        manifest = dataclasses.replace(manifest, extra={**manifest.extra, **extra})
    write(
        target,
        backbone=backbone,
        manifest=manifest,
        head=loaded.head,
        calibration=calibration or loaded.calibration,
    )
    return read(target)
