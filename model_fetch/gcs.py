"""Models in Google Cloud Storage: one verified, streaming download into a local cache.

``bucket.get_blob()`` gives size, crc32c and generation; a cached copy of that generation is reused
when its size and crc32c still match; otherwise ``download_to_file(checksum="crc32c")`` streams the
object into a temporary file in the cache directory while we hash it ourselves too (an emulator or
proxy may send no ``X-Goog-Hash``, and the library then skips its check silently). The file is
renamed into place only after size, crc32c and the sha256 pin all agree; on any failure it is
deleted. Transient errors are retried with google-api-core's backoff until ``timeout_s``.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption
from google.cloud.storage.retry import DEFAULT_RETRY

from model_fetch.cache import DIGEST_MEMO, PARTIAL_SUFFIX, private_dir, remove_stale_partials
from model_fetch.digest import Digests, HashingWriter, check_sha256_pin, file_digests, remember_digests
from model_fetch.errors import (
    ChecksumMismatch,
    FetchError,
    ModelNotFound,
    StorageUnavailable,
)
from model_fetch.gcs_cache import cache_file_name
from model_fetch.local import check_size
from model_fetch.result import FetchedModel
from model_fetch.uri import GcsLocation

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_RETRY_INITIAL_S = 0.25
_RETRY_MAXIMUM_S = 8.0
_RETRY_MULTIPLIER = 2.0


@dataclass(frozen=True, slots=True)
class Deadline:
    """The moment by which fetching ``subject`` must be over."""

    started: float
    timeout_s: float
    subject: str

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return self.started + self.timeout_s - time.monotonic()

    def check(self, progress: str = "") -> None:
        """Raise StorageUnavailable once the time is up."""
        if self.remaining() <= 0:
            found = f"{progress or 'no time left'} after {self.elapsed():.1f} s"
            raise StorageUnavailable(
                f"expected {self.subject} within timeout_s={self.timeout_s:g}, found {found}"
            )

    def request_timeout(self) -> float:
        """Seconds left for one HTTP request (StorageUnavailable when none are)."""
        self.check()
        return self.remaining()


@dataclass(frozen=True, slots=True)
class RemoteObject:
    """What the object's metadata promises: the generation and its size and crc32c."""

    location: GcsLocation
    generation: int
    size: int
    crc32c: str
    content_encoding: str | None

    @classmethod
    def from_blob(cls, blob: Any, location: GcsLocation) -> RemoteObject:
        """Read a ``storage.Blob``'s metadata; a missing hash is an error, not a skipped check."""
        if not blob.crc32c or blob.size is None or blob.generation is None:
            raise ChecksumMismatch(
                f"expected crc32c, size and generation in the metadata of {location}, found "
                f"crc32c={blob.crc32c!r}, size={blob.size!r}, generation={blob.generation!r} "
                f"(a missing hash is an error, not a skipped check)"
            )
        return cls(
            location=location,
            generation=int(blob.generation),
            size=int(blob.size),
            crc32c=str(blob.crc32c),
            content_encoding=blob.content_encoding,
        )

    def __str__(self) -> str:
        return f"{self.location} (generation {self.generation})"


# a partial download older than this (and than twice the fetch timeout) belongs to a killed process
STALE_PARTIAL_S = 600.0


def fetch_gcs(
    location: GcsLocation,
    *,
    source: str,
    cache_dir: Path,
    expected_sha256: str | None,
    timeout_s: float,
    started: float,
    max_bytes: int | None = None,
) -> FetchedModel:
    """Return a verified local copy of a GCS object: the cached one if intact, else a download."""
    deadline = Deadline(started=started, timeout_s=timeout_s, subject=str(location))
    with _translated_errors(deadline):
        bucket = make_client().bucket(location.bucket)
        remote = _stat(bucket, location, deadline=deadline)
        logger.info("fetching %s: %d bytes, generation %d", source, remote.size, remote.generation)
        check_size(remote.size, max_bytes, source=str(remote))
        private_dir(cache_dir)
        remove_stale_partials(cache_dir, older_than_s=max(2 * timeout_s, STALE_PARTIAL_S))
        path = cache_dir / cache_file_name(location, remote.generation)
        digests = _cached_digests(path, remote)
        downloaded = digests is None
        if digests is None:
            digests = _download(bucket, remote, path, deadline=deadline, expected_sha256=expected_sha256)
        else:
            logger.info("cache hit for %s at %s", remote, path)
            check_sha256_pin(digests, expected_sha256, source=f"{remote} cached at {path}")
    return FetchedModel(
        path=path,
        sha256=digests.sha256,
        size=digests.size,
        source=source,
        generation=remote.generation,
        downloaded=downloaded,
        seconds=deadline.elapsed(),
    )


def make_client() -> storage.Client:
    """Anonymous against STORAGE_EMULATOR_HOST, as the library means it; else ADC."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client(credentials=AnonymousCredentials())
    return storage.Client()


def _with_retry(func: Callable[[], _T], *, deadline: Deadline) -> _T:
    """Call ``func``, retrying transient errors (the library's predicate) until the deadline."""
    policy = DEFAULT_RETRY.with_timeout(max(deadline.remaining(), 0.0)).with_delay(
        initial=_RETRY_INITIAL_S, maximum=_RETRY_MAXIMUM_S, multiplier=_RETRY_MULTIPLIER
    )
    on_error = functools.partial(_log_retry, deadline=deadline)
    result: _T = policy(func, on_error=on_error)()
    return result


def _log_retry(exc: Exception, *, deadline: Deadline) -> None:
    logger.warning(
        "transient error fetching %s after %.1f s (retrying within timeout_s=%g): %s",
        deadline.subject,
        deadline.elapsed(),
        deadline.timeout_s,
        exc,
    )


def _stat(bucket: Any, location: GcsLocation, *, deadline: Deadline) -> RemoteObject:
    """The object's current metadata; ModelNotFound naming the bucket and object if absent."""
    blob = _with_retry(
        lambda: bucket.get_blob(location.name, timeout=deadline.request_timeout(), retry=None),
        deadline=deadline,
    )
    if blob is None:
        raise ModelNotFound(_missing_message(bucket, location, deadline=deadline))
    return RemoteObject.from_blob(blob, location)


def _missing_message(bucket: Any, location: GcsLocation, *, deadline: Deadline) -> str:
    """Say whether the bucket or only the object is missing, when we may ask."""
    try:
        bucket_exists = _with_retry(
            lambda: bucket.exists(timeout=deadline.request_timeout(), retry=None),
            deadline=deadline,
        )
    except (api_exceptions.Forbidden, api_exceptions.Unauthorized):
        bucket_exists = None  # object readers often may not read bucket metadata
    if bucket_exists is False:
        return (
            f"expected bucket {location.bucket!r} holding object {location.name!r} "
            f"({location}), found no such bucket"
        )
    return (
        f"expected object {location.name!r} in bucket {location.bucket!r} ({location}), found no such object"
    )


def _cached_digests(path: Path, remote: RemoteObject) -> Digests | None:
    """The digests of an intact cached copy of ``remote``, or None when there is none."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(status.st_mode) or status.st_size != remote.size:
        logger.warning(
            "cached copy %s of %s has %d bytes, expected %d: downloading again",
            path,
            remote,
            status.st_size,
            remote.size,
        )
        return None
    digests = file_digests(path, memo=path.parent / DIGEST_MEMO)
    if digests.crc32c != remote.crc32c:
        logger.warning(
            "cached copy %s of %s has crc32c %s, expected %s: downloading again",
            path,
            remote,
            digests.crc32c,
            remote.crc32c,
        )
        return None
    return digests


def _download(
    bucket: Any,
    remote: RemoteObject,
    path: Path,
    *,
    deadline: Deadline,
    expected_sha256: str | None,
) -> Digests:
    """Stream ``remote`` into a temporary file, verify it, then rename it to ``path``."""
    started = time.monotonic()
    blob = bucket.blob(remote.location.name, generation=remote.generation)
    temporary = tempfile.NamedTemporaryFile(  # noqa: SIM115 - deleted below on failure
        dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, delete=False
    )
    temporary_path = Path(temporary.name)
    try:
        with temporary:
            writer = HashingWriter(
                temporary,
                before_write=lambda received: deadline.check(f"{received} of {remote.size} bytes received"),
            )
            _with_retry(
                functools.partial(_download_once, blob, writer, remote, deadline=deadline),
                deadline=deadline,
            )
            digests = writer.digests()
            _verify(remote, digests)
            check_sha256_pin(digests, expected_sha256, source=str(remote))
            temporary.flush()
            os.fsync(temporary.fileno())
        os.replace(temporary_path, path)
        remember_digests(path, digests, memo=path.parent / DIGEST_MEMO)  # a restart need not hash it again
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise
    seconds = time.monotonic() - started
    logger.info(
        "downloaded %s: %d bytes in %.2f s (%.1f MB/s) to %s",
        remote,
        digests.size,
        seconds,
        digests.size / 1e6 / max(seconds, 1e-9),
        path,
    )
    return digests


def _download_once(blob: Any, writer: HashingWriter, remote: RemoteObject, *, deadline: Deadline) -> None:
    """Download the whole generation into ``writer`` from its first byte (a retry starts over)."""
    writer.restart()
    try:
        blob.download_to_file(writer, checksum="crc32c", retry=None, timeout=deadline.request_timeout())
    except api_exceptions.NotFound as exc:
        raise ModelNotFound(
            f"expected {remote} to be downloadable, found it gone: the object was replaced "
            f"or deleted during the fetch"
        ) from exc


def _verify(remote: RemoteObject, digests: Digests) -> None:
    """Raise ChecksumMismatch unless the received bytes have the metadata's size and crc32c."""
    hint = ""
    if remote.content_encoding not in {None, "", "identity"}:
        hint = (
            f"; the object is stored with Content-Encoding {remote.content_encoding!r}: "
            f"upload the model uncompressed"
        )
    if digests.size != remote.size:
        raise ChecksumMismatch(
            f"expected {remote.size} bytes of {remote} (object metadata), received {digests.size}{hint}"
        )
    if digests.crc32c != remote.crc32c:
        raise ChecksumMismatch(
            f"expected crc32c {remote.crc32c} (object metadata) for {remote}, "
            f"computed {digests.crc32c} over the received bytes{hint}"
        )


@contextmanager
def _translated_errors(deadline: Deadline) -> Iterator[None]:
    """Turn storage, auth, network and file errors into the FetchError family."""
    subject = deadline.subject
    try:
        yield
    except FetchError:
        raise
    except api_exceptions.RetryError as exc:
        raise StorageUnavailable(
            f"expected {subject} to be reachable within timeout_s={deadline.timeout_s:g}, "
            f"found only transient errors for {deadline.elapsed():.1f} s, the last: {exc.cause}"
        ) from exc
    except DataCorruption as exc:
        raise ChecksumMismatch(
            f"expected the bytes of {subject} to match the X-Goog-Hash header, found: "
            f"{' '.join(str(exc).split())}"
        ) from exc
    except (api_exceptions.Unauthorized, api_exceptions.Forbidden) as exc:
        raise StorageUnavailable(
            f"expected read access to {subject}, found HTTP {exc.code}: {exc.message}"
        ) from exc
    except api_exceptions.NotFound as exc:
        raise ModelNotFound(f"expected {subject} to exist, found HTTP 404: {exc.message}") from exc
    except api_exceptions.GoogleAPICallError as exc:
        raise StorageUnavailable(
            f"expected {subject} to be served, found HTTP {exc.code}: {exc.message}"
        ) from exc
    except auth_exceptions.GoogleAuthError as exc:
        raise StorageUnavailable(
            f"expected usable Google credentials to read {subject}, found: {exc}"
        ) from exc
    except requests.RequestException as exc:
        raise StorageUnavailable(f"expected {subject} to be reachable, found: {exc}") from exc
    except OSError as exc:
        raise FetchError(
            f"expected a readable and writable cache directory for {subject}, found: {exc}"
        ) from exc
