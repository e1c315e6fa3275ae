"""Models that are already local files."""

from __future__ import annotations

import logging
import stat
import time
from pathlib import Path

from model_fetch.digest import check_sha256_pin, file_digests, folder_sha256
from model_fetch.errors import ChecksumMismatch, FetchError, ModelNotFound, ModelTooLarge
from model_fetch.result import FetchedModel
from model_fetch.uri import LocalLocation

logger = logging.getLogger(__name__)


def fetch_local(
    location: LocalLocation,
    *,
    source: str,
    expected_sha256: str | None,
    started: float,
    max_bytes: int | None = None,
    memo: Path | None = None,
) -> FetchedModel:
    """Check that a local model file exists, is a regular file and matches the pin (digests memoised in ``memo``)."""
    path = location.path.absolute()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise ModelNotFound(f"expected a model file at {path}, found nothing there") from exc
    except OSError as exc:
        raise FetchError(f"expected a readable model file at {path}, found: {exc}") from exc
    if stat.S_ISDIR(mode):
        return _fetch_folder(path, source=source, expected_sha256=expected_sha256, started=started)
    if not stat.S_ISREG(mode):
        raise ModelNotFound(f"expected a regular model file at {path}, found a special file")
    check_size(path.stat().st_size, max_bytes, source=str(path))
    try:
        digests = file_digests(path, memo=memo)
    except OSError as exc:
        raise FetchError(f"expected a readable model file at {path}, found: {exc}") from exc
    check_sha256_pin(digests, expected_sha256, source=str(path))
    seconds = time.monotonic() - started
    logger.info("using local model %s: %d bytes, sha256 %s", path, digests.size, digests.sha256)
    return FetchedModel(
        path=path,
        sha256=digests.sha256,
        size=digests.size,
        source=source,
        generation=None,
        downloaded=False,
        seconds=seconds,
    )


def _fetch_folder(path: Path, *, source: str, expected_sha256: str | None, started: float) -> FetchedModel:
    """A model folder (a Keras 2 SavedModel, for the TensorFlow backend): its files' digest, the pin checked."""
    try:
        sha256 = folder_sha256(path)
        size = sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    except OSError as exc:
        raise FetchError(f"expected a readable model folder at {path}, found: {exc}") from exc
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise ChecksumMismatch(
            f"expected the model folder {path} to have sha256 {expected_sha256} (MODEL_SHA256), found {sha256}"
        )
    logger.info("using local model folder %s: %d bytes, sha256 %s", path, size, sha256)
    return FetchedModel(
        path=path,
        sha256=sha256,
        size=size,
        source=source,
        generation=None,
        downloaded=False,
        seconds=time.monotonic() - started,
    )


def check_size(size: int, max_bytes: int | None, *, source: str) -> None:
    """ModelTooLarge when ``size`` is over the cap."""
    if max_bytes is not None and size > max_bytes:
        raise ModelTooLarge(
            f"expected a model of at most {max_bytes / 2**20:.0f} MB, found {size / 2**20:.0f} MB at {source}"
        )
