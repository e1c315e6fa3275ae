"""Model URIs: a local path, ``file://`` URI, ``gs://bucket/object``, or an ``https://`` (``http://``) URL."""

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


@dataclass(frozen=True, slots=True)
class HttpLocation:
    """A file at an ``https://`` (or ``http://``) URL. ``str()`` is the URL without query or credentials."""

    url: str
    scheme: str
    host: str
    path: str

    @property
    def redacted(self) -> str:
        """The URL as logs and answers may show it: no query string, fragment or user:password."""
        return f"{self.scheme}://{self.host}{self.path}"

    def __str__(self) -> str:
        return self.redacted


Location = LocalLocation | GcsLocation | HttpLocation
EXPECTED = "a local path, file:// URI, gs://bucket/object or https:// URL"


def redact_uri(uri: str) -> str:
    """A model URI as a log line may show it: a URL's query string and credentials left out."""
    match = _SCHEME.match(uri or "")
    if match is None or match["scheme"].lower() not in ("http", "https"):
        return uri
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


def parse_model_uri(uri: str) -> Location:
    """Tell a local path, a ``file://`` URI, a ``gs://bucket/object`` URI and an ``http(s)://`` URL apart."""
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidModelUri(f"expected {EXPECTED}, found {uri!r}")
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
    if scheme in ("http", "https"):
        return _parse_http(uri)
    raise InvalidModelUri(f"expected {EXPECTED}, found scheme {scheme!r} in {redact_uri(uri)!r}")


def _parse_http(uri: str) -> HttpLocation:
    parts = urlsplit(uri)
    try:
        port = parts.port
    except ValueError:
        raise InvalidModelUri(f"expected a URL with a valid port, found {redact_uri(uri)!r}") from None
    if not parts.hostname:
        raise InvalidModelUri(f"expected a host in the URL, found {redact_uri(uri)!r}")
    if any(c in uri for c in "\r\n\t ") or not uri.isprintable():
        raise InvalidModelUri("expected a URL without spaces or control characters, found some")
    host = parts.hostname + (f":{port}" if port else "")
    return HttpLocation(url=uri, scheme=parts.scheme.lower(), host=host, path=parts.path or "/")


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
