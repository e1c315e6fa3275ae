"""Models that are already local files."""

from __future__ import annotations

import logging
import stat
import time

from model_fetch.digest import check_sha256_pin, file_digests
from model_fetch.errors import FetchError, ModelNotFound, ModelTooLarge
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
) -> FetchedModel:
    """Check that a local model file exists, is a regular file and matches the pin."""
    path = location.path.absolute()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise ModelNotFound(f"expected a model file at {path}, found nothing there") from exc
    except OSError as exc:
        raise FetchError(f"expected a readable model file at {path}, found: {exc}") from exc
    if not stat.S_ISREG(mode):
        found = "a directory" if stat.S_ISDIR(mode) else "a special file"
        raise ModelNotFound(f"expected a regular model file at {path}, found {found}")
    check_size(path.stat().st_size, max_bytes, source=str(path))
    try:
        digests = file_digests(path)
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


def check_size(size: int, max_bytes: int | None, *, source: str) -> None:
    """ModelTooLarge when ``size`` is over the cap."""
    if max_bytes is not None and size > max_bytes:
        raise ModelTooLarge(
            f"expected a model of at most {max_bytes / 2**20:.0f} MB, found {size / 2**20:.0f} MB at {source}"
        )
