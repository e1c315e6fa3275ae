"""The exceptions model_fetch raises, one family.

    FetchError                  base; raised as such for local I/O errors (unreadable file, cache)
    ├── InvalidModelUri         not a local path, file:// URI, gs://bucket/object or https:// URL
    ├── ModelNotFound           no such file, bucket, object, object generation or URL (404)
    ├── ChecksumMismatch        size, crc32c or the sha256 pin disagree (or a hash is missing)
    ├── ModelTooLarge           the model is larger than the caller allows
    └── StorageUnavailable      storage unreachable after retries, over timeout_s, or access denied

Messages say what was expected and what was found. They never contain credentials.
"""

from __future__ import annotations


class FetchError(Exception):
    """Base of every error raised by model_fetch."""


class InvalidModelUri(FetchError):
    """The URI is not a local path, file:// URI, gs://bucket/object or https:// URL (or http:// without a pin)."""


class ModelNotFound(FetchError):
    """No such local file, bucket or object."""


class ChecksumMismatch(FetchError):
    """The bytes are not the ones expected: size, crc32c or the sha256 pin differ."""


class ModelTooLarge(FetchError):
    """The model is larger than the caller's cap (refused before it is downloaded or read)."""


class StorageUnavailable(FetchError):
    """Object storage could not be used: down after retries, too slow, or access denied."""
