"""Model URIs: a local path, ``file://`` URI or ``gs://bucket/object``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from model_fetch.errors import InvalidModelUri

_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
# Bucket names as GCS allows them: 3-63 characters (up to 222 with dots), lowercase letters,
# digits, "-", "_" and ".", starting and ending with a letter or digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_MAX_OBJECT_NAME_BYTES = 1024


@dataclass(frozen=True, slots=True)
class LocalLocation:
    """A file on the local filesystem."""

    path: Path


@dataclass(frozen=True, slots=True)
class GcsLocation:
    """An object in Google Cloud Storage."""

    bucket: str
    name: str

    def __str__(self) -> str:
        return f"gs://{self.bucket}/{self.name}"


def parse_model_uri(uri: str) -> LocalLocation | GcsLocation:
    """Tell a local path, a ``file://`` URI and a ``gs://bucket/object`` URI apart."""
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidModelUri(f"expected a local path, file:// URI or gs://bucket/object, found {uri!r}")
    match = _SCHEME.match(uri)
    if match is None:
        if uri.lower().startswith("gs:"):
            raise InvalidModelUri(f"expected gs://bucket/object, found {uri!r}")
        return LocalLocation(Path(uri))
    scheme = match["scheme"].lower()
    if scheme == "gs":
        return _parse_gcs(uri, uri[match.end() :])
    if scheme == "file":
        return _parse_file(uri)
    raise InvalidModelUri(
        f"expected a local path, file:// URI or gs://bucket/object, found scheme {scheme!r} in {uri!r}"
    )


def _parse_gcs(uri: str, rest: str) -> GcsLocation:
    bucket, slash, name = rest.partition("/")
    if not bucket or not slash or not name:
        raise InvalidModelUri(f"expected gs://bucket/object with both parts, found {uri!r}")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise InvalidModelUri(
            f"expected a bucket name of lowercase letters, digits, '-', '_' and '.', "
            f"found {bucket!r} in {uri!r}"
        )
    if name.endswith("/"):
        raise InvalidModelUri(f"expected an object name, found a folder in {uri!r}")
    if name in {".", ".."} or "\r" in name or "\n" in name or len(name.encode()) > _MAX_OBJECT_NAME_BYTES:
        raise InvalidModelUri(f"expected a valid GCS object name, found {name!r} in {uri!r}")
    return GcsLocation(bucket=bucket, name=name)


def _parse_file(uri: str) -> LocalLocation:
    parts = urlsplit(uri)
    if parts.netloc not in {"", "localhost"}:
        raise InvalidModelUri(
            f"expected a file:// URI on this host (file:///path), found host {parts.netloc!r} in {uri!r}"
        )
    if not parts.path:
        raise InvalidModelUri(f"expected a path after file://, found {uri!r}")
    return LocalLocation(Path(url2pathname(parts.path)))
