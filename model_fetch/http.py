"""Models at an ``https://`` URL (or ``http://`` with a SHA-256 pin): a resumable, verified download.

Hugging Face ``resolve`` links, GitHub release assets, S3/R2 objects (public or presigned): one
``GET`` streams the file into a temporary file in the cache folder while it is hashed; a connection
dropped half way is resumed with ``Range`` (``If-Range`` on the validator, so a file replaced
meanwhile starts over); 5xx, 429 and dropped connections are retried with backoff until
``timeout_s``; the size is checked against ``max_bytes`` from ``Content-Length`` before the body is
read, and while it streams. The file is fsynced and renamed into place only once complete and equal
to the pin; on failure it is deleted. The cached copy is revalidated with ``If-None-Match`` /
``If-Modified-Since`` (a ``304`` reuses it), or, when its bytes are the pin, used without a request.

A URL's query string (signatures, tokens) and credentials never reach a log line or an error: both
speak of :func:`redact_url`'s form. The clock and the pause between attempts are parameters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from model_fetch.cache import DIGEST_MEMO, PARTIAL_SUFFIX, private_dir, remove_stale_partials
from model_fetch.digest import Digests, HashingWriter, check_sha256_pin, file_digests, remember_digests
from model_fetch.errors import ChecksumMismatch, FetchError, ModelNotFound, StorageUnavailable
from model_fetch.local import check_size
from model_fetch.result import FetchedModel
from model_fetch.uri import HttpLocation

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 16  # a dropped connection loses at most this much of what arrived
MAX_REDIRECTS = 5  # a Hugging Face resolve link redirects once or twice, to its CDN
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0  # one stalled read; the whole download is bounded by timeout_s
STALE_PARTIAL_S = 600.0
_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")


class RedactQueries(logging.Filter):
    """Cut the query string off the URLs in a record's arguments (urllib3 logs each request line at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_cut_query(arg) for arg in record.args)
        return True


def _cut_query(value: object) -> object:
    return value.split("?", 1)[0] + "?…" if isinstance(value, str) and "?" in value else value


# a presigned URL's signature must not reach a log line, even with DEBUG on
logging.getLogger("urllib3.connectionpool").addFilter(RedactQueries())


@dataclass(frozen=True)
class Backoff:
    """Waits between attempts: ``initial_s``, times ``multiplier`` each time, at most ``maximum_s``."""

    initial_s: float = 0.25
    maximum_s: float = 8.0
    multiplier: float = 2.0

    def delay(self, attempt: int) -> float:
        """The wait after the ``attempt``-th failed attempt (1-based)."""
        return float(min(self.maximum_s, self.initial_s * self.multiplier ** min(attempt - 1, 32)))


class _Dropped(Exception):
    """The body ended before Content-Length said it would (resume from what arrived)."""


class _Retryable(Exception):
    """An answer worth another attempt (5xx, 429)."""


@dataclass
class _Download:
    """One download's state across attempts: bytes so far, the expected total, the validator."""

    writer: HashingWriter
    total: int | None = None
    validator: str | None = None  # ETag (strong) or Last-Modified of the first answer
    etag: str | None = None
    last_modified: str | None = None
    attempts: int = 0
    resumed: int = 0


def cache_file_name(location: HttpLocation) -> str:
    """A safe file name per URL (its query left out: a presigned URL's signature changes, the file does not)."""
    path = PurePosixPath(location.path or "/model")
    suffix = _UNSAFE_CHARACTERS.sub("_", path.suffix)[:16]
    readable = _UNSAFE_CHARACTERS.sub("_", f"{location.host}_{path.stem}")[-80:].strip("._-")
    key = hashlib.sha256(location.redacted.encode()).hexdigest()[:16]
    return f"{readable}.{key}.http{suffix}"


def fetch_http(
    location: HttpLocation,
    *,
    cache_dir: Path,
    expected_sha256: str | None,
    timeout_s: float,
    started: float,
    max_bytes: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    pause: Callable[[float], None] = time.sleep,
    backoff: Backoff = Backoff(),
) -> FetchedModel:
    """Download ``location`` into ``cache_dir`` (or reuse the cached copy), verified; a FetchError otherwise."""
    import requests  # google-cloud-storage's HTTP library: imported only for URLs

    directory = private_dir(cache_dir)
    remove_stale_partials(directory, older_than_s=max(STALE_PARTIAL_S, 2 * timeout_s))
    final = directory / cache_file_name(location)
    meta_path = final.with_name(f".{final.name}.json")
    memo = directory / DIGEST_MEMO
    cached = _cached(final, meta_path, memo=memo, max_bytes=max_bytes)
    if cached is not None and expected_sha256 is not None and cached[0].sha256 == expected_sha256:
        logger.info("serving %s from the cache at %s: its sha256 is the MODEL_SHA256 pin", location, final)
        return _result(final, cached[0], location, downloaded=False, started=started, clock=clock)
    deadline = started + timeout_s

    def check_deadline(progress: str) -> None:
        if clock() >= deadline:
            raise StorageUnavailable(
                f"expected {location} within timeout_s={timeout_s:g}, found {progress} after {clock() - started:.1f} s"
            )

    session = requests.Session()
    session.max_redirects = MAX_REDIRECTS
    session.trust_env = True  # HTTPS_PROXY, REQUESTS_CA_BUNDLE as requests reads them
    temporary = tempfile.NamedTemporaryFile(  # noqa: SIM115 - deleted below on failure
        dir=directory, prefix=f".{final.name}.", suffix=PARTIAL_SUFFIX, delete=False
    )
    temporary_path = Path(temporary.name)
    try:
        with session, temporary:

            def before_write(received: int) -> None:
                check_deadline(f"{received} bytes received")
                check_size(received, max_bytes, source=str(location))

            state = _Download(writer=HashingWriter(temporary, before_write=before_write))
            revalidate = _conditional_headers(cached[1]) if cached is not None else {}
            while True:
                check_deadline(f"{state.writer.tell()} bytes received")
                state.attempts += 1
                try:
                    outcome = _attempt(
                        session,
                        location,
                        state,
                        revalidate=revalidate,
                        max_bytes=max_bytes,
                        deadline_s=deadline - clock(),
                    )
                except (_Dropped, _Retryable, requests.ConnectionError, requests.Timeout) as exc:
                    wait = backoff.delay(state.attempts)
                    logger.warning(
                        "fetching %s: %s after %d bytes (attempt %d); retrying in %.2f s",
                        location,
                        _describe(exc),
                        state.writer.tell(),
                        state.attempts,
                        wait,
                    )
                    check_deadline(f"{_describe(exc)} after {state.attempts} attempt(s)")
                    pause(min(wait, max(0.0, deadline - clock())))
                    continue
                except requests.RequestException as exc:  # too many redirects, a bad URL: not worth a retry
                    raise StorageUnavailable(
                        f"expected {location} to be downloadable, found {_describe(exc)}"
                    ) from None
                break
            if outcome == "not modified":
                assert cached is not None
                logger.info("%s is unchanged (HTTP 304): using the cached copy %s", location, final)
                check_sha256_pin(cached[0], expected_sha256, source=str(location))
                temporary_path.unlink(missing_ok=True)
                return _result(final, cached[0], location, downloaded=False, started=started, clock=clock)
            digests = state.writer.digests()
            if state.total is not None and digests.size != state.total:
                raise ChecksumMismatch(f"expected {state.total} bytes from {location}, found {digests.size}")
            check_sha256_pin(digests, expected_sha256, source=str(location))
            temporary.flush()
            os.fsync(temporary.fileno())
        os.replace(temporary_path, final)
        remember_digests(final, digests, memo=memo)
        _write_meta(
            meta_path, {"etag": state.etag, "last_modified": state.last_modified, "sha256": digests.sha256}
        )
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise
    seconds = clock() - started
    logger.info(
        "downloaded %s: %d bytes in %.2f s (%d attempt(s), %d resumed) to %s",
        location,
        digests.size,
        seconds,
        state.attempts,
        state.resumed,
        final,
    )
    return _result(final, digests, location, downloaded=True, started=started, clock=clock)


def _attempt(
    session: Any,
    location: HttpLocation,
    state: _Download,
    *,
    revalidate: dict[str, str],
    max_bytes: int | None,
    deadline_s: float,
) -> str:
    """One GET: ``not modified``, or ``complete`` with the body in ``state.writer``; raises to retry."""
    received = state.writer.tell()
    headers = {"Accept-Encoding": "identity"}  # the bytes as stored: the pin is over them
    if received > 0 and state.validator is not None:
        headers["Range"] = f"bytes={received}-"
        headers["If-Range"] = state.validator
    elif received == 0:
        headers.update(revalidate)
    read_timeout = max(0.1, min(READ_TIMEOUT_S, deadline_s))
    with session.get(
        location.url,
        headers=headers,
        stream=True,
        timeout=(min(CONNECT_TIMEOUT_S, read_timeout), read_timeout),
    ) as response:
        status = response.status_code
        if status == 304 and revalidate and received == 0:
            return "not modified"
        if status in (404, 410):
            raise ModelNotFound(f"expected a model at {location}, found HTTP {status}")
        if status in (401, 403):
            raise StorageUnavailable(
                f"expected {location} to be readable, found HTTP {status} (access denied; a presigned URL may have expired)"
            )
        if status in RETRY_STATUSES:
            raise _Retryable(f"HTTP {status}")
        if status == 206 and received > 0 and _range_start(response) == received:
            state.resumed += 1
        elif status == 200:
            if received:
                state.writer.restart()  # the server ignored the range (or the file changed): start over
            state.total = _content_length(response)
            state.etag = response.headers.get("ETag")
            state.last_modified = response.headers.get("Last-Modified")
            strong = state.etag if state.etag and not state.etag.startswith("W/") else None
            state.validator = strong or state.last_modified
        else:
            raise StorageUnavailable(f"expected HTTP 200 from {location}, found HTTP {status}")
        if state.total is not None:
            check_size(state.total, max_bytes, source=str(location))  # before a byte of the body is read
        try:
            for chunk in response.iter_content(CHUNK_BYTES):
                state.writer.write(chunk)
        except Exception as exc:
            if isinstance(exc, FetchError):
                raise
            raise _Dropped(_describe(exc)) from None
    if state.total is not None and state.writer.tell() < state.total:
        raise _Dropped(f"the body ended at {state.writer.tell()} of {state.total} bytes")
    return "complete"


def _content_length(response: Any) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


def _range_start(response: Any) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _conditional_headers(meta: dict[str, Any]) -> dict[str, str]:
    headers = {}
    if meta.get("etag"):
        headers["If-None-Match"] = str(meta["etag"])
    if meta.get("last_modified"):
        headers["If-Modified-Since"] = str(meta["last_modified"])
    return headers


def _cached(
    final: Path, meta_path: Path, *, memo: Path, max_bytes: int | None
) -> tuple[Digests, dict[str, Any]] | None:
    """The cached copy's digests and validators, when both are there and agree."""
    try:
        meta = json.loads(meta_path.read_text())
        check_size(final.stat().st_size, max_bytes, source=str(final))
        digests = file_digests(final, memo=memo)
    except (OSError, ValueError, FetchError):
        return None
    if not isinstance(meta, dict) or meta.get("sha256") != digests.sha256:
        return None  # changed since it was written: not ours to trust
    return digests, meta


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + PARTIAL_SUFFIX)
    temporary.write_text(json.dumps(meta))
    os.replace(temporary, path)


def _result(
    path: Path,
    digests: Digests,
    location: HttpLocation,
    *,
    downloaded: bool,
    started: float,
    clock: Callable[[], float],
) -> FetchedModel:
    return FetchedModel(
        path=path,
        sha256=digests.sha256,
        size=digests.size,
        source=location.redacted,
        generation=None,
        downloaded=downloaded,
        seconds=clock() - started,
    )


def _describe(exc: BaseException) -> str:
    """An exception in words without its text: requests puts the full URL, query included, in messages."""
    if isinstance(exc, (_Dropped, _Retryable)):
        return str(exc)
    return type(exc).__name__
