"""Resolve a model URI to a verified local file; knows storage and files, not Keras or LiteRT.

    fetched = fetch_model("gs://bucket/models/skin.bundle", expected_sha256=pin)
    fetched.path  # a local file whose size, crc32c and sha256 were checked

URIs: a local path (absolute or relative), a ``file://`` URI, ``gs://bucket/object`` (read with
google-cloud-storage; honours STORAGE_EMULATOR_HOST, anonymously, as the library does), or an
``https://`` URL (``http://`` only with a pin): Hugging Face, GitHub releases, S3/R2, presigned or not.

Exceptions:

    FetchError                  base; raised as such for local I/O errors (unreadable file, cache)
    ├── InvalidModelUri         not a local path, file:// URI, gs://bucket/object or https:// URL
    ├── ModelNotFound           no such file, bucket, object, object generation or URL (404)
    ├── ChecksumMismatch        size, crc32c or the sha256 pin disagree (or a hash is missing)
    ├── ModelTooLarge           over the caller's max_bytes (refused before it is read)
    └── StorageUnavailable      storage unreachable after retries, over timeout_s, or access denied

A bad ``expected_sha256`` (not 64 hex digits) or ``timeout_s`` is a ValueError: a caller's bug.
"""

from __future__ import annotations

from model_fetch.cache import default_cache_dir
from model_fetch.errors import (
    ChecksumMismatch,
    FetchError,
    InvalidModelUri,
    ModelNotFound,
    ModelTooLarge,
    StorageUnavailable,
)
from model_fetch.fetch import fetch_model, prune_cache
from model_fetch.result import FetchedModel
from model_fetch.uri import redact_uri

__all__ = [
    "ChecksumMismatch",
    "FetchError",
    "FetchedModel",
    "InvalidModelUri",
    "ModelNotFound",
    "ModelTooLarge",
    "StorageUnavailable",
    "default_cache_dir",
    "fetch_model",
    "prune_cache",
    "redact_uri",
]
