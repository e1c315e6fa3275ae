"""The one place that picks an engine for a model file: a bundle → LiteRT, a Keras file → TensorFlow.

The TensorFlow reference (:mod:`dermal_fn.keras.reference`) is imported only when the file is a Keras
model, so serving a bundle never loads TensorFlow (≈530 MB).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import zipfile
from pathlib import Path

from dermal_fn.core import bundle as bundle_format
from dermal_fn.core.engine import Engine, LiteRTEngine, litert_runtime
from dermal_fn.errors import BackendMissing, BundleError

logger = logging.getLogger(__name__)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def is_keras_file(path: str | Path) -> bool:
    """True for what Keras saves a model as: a ``.keras`` zip, an HDF5 ``.h5`` file, a SavedModel folder."""
    path = Path(path)
    if path.is_dir():
        return (path / "saved_model.pb").is_file()
    try:
        with open(path, "rb") as f:
            if f.read(8) == HDF5_SIGNATURE:
                return True
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return "config.json" in names and not bundle_format.is_bundle(path)


def _marker_says(marker: Path | None, runtime: str) -> bool:
    """True when ``marker`` records a load of these bytes on ``runtime``."""
    if marker is None:
        return False
    try:
        return marker.read_text().strip() == runtime
    except OSError:
        return False


def load_engine(
    path: str | Path,
    *,
    sha256: str,
    num_threads: int = 1,
    weight_cache_dir: Path | None = None,
    verified_dir: Path | None = None,
) -> Engine:
    """Open a bundle with LiteRT, or a Keras file with the TensorFlow reference backend.

    ``verified_dir``: where a bundle that loaded once is remembered by its SHA-256, with the runtime
    it ran on; the same bytes on the same runtime later skip the backbone's CRC-32 read and the
    check inference (the SHA-256 already says they are the same bytes, the marker that they ran).
    """
    if Path(path).is_file() and bundle_format.is_bundle(path):
        marker = verified_dir / f"{sha256}.ok" if verified_dir is not None else None
        runtime = litert_runtime()
        engine = LiteRTEngine(  # LiteRT's own stderr lines become records of the engine's logger
            path,
            sha256=sha256,
            num_threads=num_threads,
            weight_cache_dir=weight_cache_dir,
            known_good=_marker_says(marker, runtime),
        )
        if marker is not None and engine.load_check != "earlier load":
            with contextlib.suppress(OSError):
                marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                marker.write_text(f"{runtime}\n")
        return engine
    if is_keras_file(path):
        if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("keras") is None:
            raise BackendMissing(
                "expected TensorFlow and Keras to serve a Keras file, found them not installed on this server; "
                "install dermal-fn[export] (TensorFlow, ~530 MB more memory) or export a bundle: "
                "dermal-fn export MODEL.keras --out MODEL.dermal"
            )
        from dermal_fn.keras.reference import KerasEngine

        return KerasEngine(path, sha256=sha256)
    raise BundleError(
        f"expected a dermal-fn bundle or a Keras model (.keras, .h5, SavedModel), found neither at {Path(path).name}"
    )
