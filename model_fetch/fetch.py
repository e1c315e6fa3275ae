"""fetch_model: a model URI in, a verified local file out."""

from __future__ import annotations

import os
import time
from pathlib import Path

from model_fetch.cache import DIGEST_MEMO, default_cache_dir
from model_fetch.digest import normalize_sha256
from model_fetch.errors import InvalidModelUri
from model_fetch.gcs_cache import pinned_cached_copy
from model_fetch.local import fetch_local
from model_fetch.result import FetchedModel
from model_fetch.uri import GcsLocation, HttpLocation, LocalLocation, parse_model_uri


def prune_cache(uri: str, cache_dir: str | os.PathLike[str], *, keep: Path) -> list[str]:
    """After ``keep`` (fetched from ``uri``) has loaded: delete the cache's other copies of the same
    object (older GCS generations; a URL's copy is replaced in place). The names removed."""
    location = parse_model_uri(uri)
    if isinstance(location, GcsLocation):
        from model_fetch.gcs_cache import remove_other_generations

        return remove_other_generations(location, Path(cache_dir), keep=keep)
    return []


def fetch_model(
    uri: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    expected_sha256: str | None = None,
    timeout_s: float = 120.0,
    max_bytes: int | None = None,
) -> FetchedModel:
    """Resolve a local path, ``file://``, ``gs://bucket/object`` or ``https://`` URI to a verified local file.

    URLs (``https://``, or ``http://`` with ``expected_sha256``) are downloaded into ``cache_dir``,
    resumed when a connection drops and revalidated by ETag/Last-Modified (:mod:`model_fetch.http`).

    Local files are used in place; GCS objects are downloaded into ``cache_dir`` (reused while
    the generation, size and crc32c still match; with ``expected_sha256``, a cached copy whose
    bytes are the pin is used without asking storage at all). A file's digests are remembered per file identity in
    ``cache_dir/digests``, so a restart does not hash it again. ``expected_sha256`` pins the bytes; GCS work
    is retried on transient errors and bounded by ``timeout_s``; a model over ``max_bytes`` is refused
    before it is read (ModelTooLarge). The cache folder is made private (0700, ours, no symlink) and
    cleaned of partial files a killed download left. Raises a FetchError subclass.
    """
    started = time.monotonic()
    location = parse_model_uri(uri)
    pin = normalize_sha256(expected_sha256)
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if isinstance(location, LocalLocation):
        memo = Path(cache_dir) / DIGEST_MEMO if cache_dir is not None else None
        return fetch_local(
            location, source=uri, expected_sha256=pin, started=started, max_bytes=max_bytes, memo=memo
        )
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if isinstance(location, HttpLocation):
        if location.scheme == "http" and pin is None:
            raise InvalidModelUri(
                f"expected https:// or a MODEL_SHA256 pin with http:// (nothing else protects plain HTTP), "
                f"found {location} without a pin"
            )
        from model_fetch.http import fetch_http

        return fetch_http(
            location,
            cache_dir=directory,
            expected_sha256=pin,
            timeout_s=timeout_s,
            started=started,
            max_bytes=max_bytes,
        )
    if pin is not None:
        cached = pinned_cached_copy(
            location,
            source=uri,
            cache_dir=directory,
            expected_sha256=pin,
            started=started,
            max_bytes=max_bytes,
        )
        if cached is not None:
            return cached
    from model_fetch.gcs import fetch_gcs  # google-cloud-storage: ~45 MB RSS, only when needed

    return fetch_gcs(
        location,
        source=uri,
        cache_dir=directory,
        expected_sha256=pin,
        timeout_s=timeout_s,
        started=started,
        max_bytes=max_bytes,
    )
