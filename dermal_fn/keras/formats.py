"""Which Keras wrote a model file, and loading it with that Keras.

| file | how the writer is told | loaded with |
|---|---|---|
| ``.keras`` (zip) | ``metadata.json``'s ``keras_version`` (Keras 3, and Keras 2.13+) | Keras 3, or tf-keras for 2.x |
| ``.h5`` (HDF5) | the root attribute ``keras_version`` (none: an old Keras 2) | tf-keras for 2.x, Keras 3 for 3.x |
| SavedModel folder | ``keras_metadata.pb`` (written by Keras 2 only) | tf-keras |

Keras 3 cannot read most Keras 2 configurations (``DepthwiseConv2D(groups=1)``, ``RandomFlip(rng_type=...)``,
``Functional``...), so a Keras 2 file goes to ``tf-keras``, the maintained Keras 2 for TensorFlow 2.16+.
``--custom-objects module.py`` imports a user's module first (its ``register_keras_serializable``
classes register themselves) and passes its layer classes by name. Every failure is an ExportError of
a line or two: what was expected, what was found.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from dermal_fn.errors import ExportError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
Kind = Literal["keras", "h5", "savedmodel"]


@dataclass(frozen=True)
class KerasFile:
    """A Keras model on disk: its kind and the Keras version that wrote it (None when it does not say)."""

    path: Path
    kind: Kind
    written_by: str | None

    @property
    def keras2(self) -> bool:
        """True when Keras 2 wrote it (an .h5 that does not say is an old Keras 2 file)."""
        if self.kind == "savedmodel":
            return True
        if self.written_by is None:
            return self.kind == "h5"
        return self.written_by.split(".")[0] == "2"


def inspect_file(path: str | Path) -> KerasFile:
    """Tell what kind of Keras file ``path`` is and who wrote it; ExportError for anything else."""
    path = Path(path)
    if path.is_dir():
        if (path / "keras_metadata.pb").is_file():
            return KerasFile(path, "savedmodel", None)
        if (path / "saved_model.pb").is_file():
            raise ExportError(
                f"expected a SavedModel written by Keras 2 (with keras_metadata.pb) at {path.name}, found one "
                "without a Keras model in it (Keras 3's model.export is for serving only); export the .keras file"
            )
        raise ExportError(
            f"expected a Keras model (.keras, .h5 or a SavedModel folder), found a folder {path.name}"
        )
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ExportError(f"expected a readable Keras model at {path}, found: {exc.strerror or exc}") from exc
    if head == HDF5_SIGNATURE:
        return KerasFile(path, "h5", _h5_version(path))
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
                metadata = json.loads(archive.read("metadata.json")) if "metadata.json" in names else {}
        except (zipfile.BadZipFile, ValueError, KeyError) as exc:
            raise ExportError(
                f"expected a .keras archive at {path.name}, found a damaged zip ({exc})"
            ) from exc
        if "config.json" not in names:
            raise ExportError(
                f"expected a .keras archive (config.json in a zip) at {path.name}, found another zip"
            )
        version = metadata.get("keras_version") if isinstance(metadata, dict) else None
        return KerasFile(path, "keras", str(version) if version else None)
    raise ExportError(
        f"expected a Keras model (.keras zip, .h5 HDF5 or a SavedModel folder) at {path.name}, found other bytes"
    )


def _h5_version(path: Path) -> str | None:
    import h5py  # installed with TensorFlow and Keras

    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get("keras_version")
    except OSError as exc:
        raise ExportError(f"expected a readable HDF5 file at {path.name}, found: {exc}") from exc
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def keras_module(keras2: bool) -> ModuleType:
    """``tf_keras`` for Keras 2 files, ``keras`` (3) otherwise; ExportError when it is not installed."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    name = "tf_keras" if keras2 else "keras"
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ExportError(
            f"expected {'tf-keras (pip install tf-keras==2.21.0) to load a Keras 2 file' if keras2 else 'Keras 3'}, "
            f"found it not installed"
        ) from exc


def keras_of(obj: Any) -> ModuleType:
    """The Keras a model or layer belongs to (``tf_keras`` or ``keras``), from its class's module."""
    module = type(obj).__module__ or ""
    return keras_module(module.startswith("tf_keras"))


def is_model(obj: Any) -> bool:
    """True for a Keras model of either Keras (a nested backbone, a Sequential...)."""
    return bool(isinstance(obj, keras_of(obj).Model))


def custom_objects_from(module_path: str | Path | None) -> dict[str, Any]:
    """Import a user's module by path (its registrations run); its classes by name, for ``custom_objects``."""
    if module_path is None:
        return {}
    path = Path(module_path)
    if not path.is_file():
        raise ExportError(f"expected --custom-objects to be a Python file, found nothing at {path}")
    name = re.sub(r"\W", "_", f"dermal_custom_{path.stem}")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ExportError(f"expected --custom-objects to be an importable Python file, found {path.name}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a user's module: any error is theirs to see, in one line
        raise ExportError(
            f"expected --custom-objects {path.name} to import, found {type(exc).__name__}: {exc}"
        ) from exc
    return {
        key: value
        for key, value in vars(module).items()
        if inspect.isclass(value) and value.__module__ == name
    }


_UNKNOWN = re.compile(
    r"(?:Unknown (?:layer|object|activation)[^'\"]*|Could not locate (?:class|function))\s*[:]?\s*['\"]?([\w.]+)"
)


def load_model(path: str | Path, *, custom_objects: Mapping[str, Any] | None = None) -> Any:
    """Load ``path`` for inference with the Keras that wrote it; ExportError (a line or two) on failure."""
    file = inspect_file(path)
    keras = keras_module(file.keras2)
    objects = dict(custom_objects or {})
    try:
        if file.keras2:
            return keras.models.load_model(str(file.path), compile=False, custom_objects=objects or None)
        return keras.saving.load_model(str(file.path), compile=False, custom_objects=objects or None)
    except Exception as exc:  # Keras raises anything from ValueError to TypeError for a bad file
        text = str(exc).strip()
        unknown = _UNKNOWN.search(text)
        if unknown:
            raise ExportError(
                f"expected every class in {file.path.name} to be known, found {unknown.group(1)!r} unknown: "
                "pass the module that defines it with --custom-objects module.py"
            ) from exc
        writer = f"Keras {file.written_by}" if file.written_by else ("Keras 2" if file.keras2 else "Keras 3")
        first = text.splitlines()[0][:300] if text else type(exc).__name__
        raise ExportError(
            f"expected {keras.__name__} {keras.__version__} to load {file.path.name} (written by {writer}), "
            f"found {type(exc).__name__}: {first}"
        ) from exc
