"""Photos in object storage or on disk, for batch scoring: list what a source names, read one file.

A source is a local folder (every file below it, hidden ones left out), a local glob (``**``
recursive), ``gs://bucket/prefix/`` (every object under it) or a ``gs://`` glob
(``gs://bucket/photos/*.jpg``). google-cloud-storage is imported only for ``gs://`` and honours
``STORAGE_EMULATOR_HOST`` anonymously, as :mod:`model_fetch.gcs` does. Reading is bounded: a file
over ``max_bytes`` is refused before it is read.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import os
from pathlib import Path
from typing import Any

from model_fetch.errors import FetchError, InvalidModelUri, ModelNotFound, ModelTooLarge

_WILDCARDS = frozenset("*?[")


def list_files(source: str) -> list[str]:
    """The files ``source`` names, sorted: local paths or ``gs://bucket/object`` URIs."""
    if source.startswith("gs://"):
        return _list_gcs(source)
    if any(c in source for c in _WILDCARDS):
        return sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
    folder = Path(source)
    if folder.is_file():
        return [str(folder)]
    if not folder.is_dir():
        raise ModelNotFound(f"expected a folder, glob or gs:// prefix of photos, found nothing at {source}")
    return sorted(
        str(p)
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def read_file(uri: str, *, max_bytes: int) -> bytes:
    """The bytes of a local file or ``gs://`` object; ModelTooLarge over ``max_bytes``, ModelNotFound if absent."""
    if uri.startswith("gs://"):
        bucket, _, name = uri[len("gs://") :].partition("/")
        blob = _client().bucket(bucket).get_blob(name)
        if blob is None:
            raise ModelNotFound(f"expected an object at {uri}, found none")
        if blob.size is not None and blob.size > max_bytes:
            raise ModelTooLarge(f"expected at most {max_bytes} bytes, found {blob.size} at {uri}")
        data: bytes = blob.download_as_bytes(checksum="crc32c")
        return data
    try:
        size = os.path.getsize(uri)
        if size > max_bytes:
            raise ModelTooLarge(f"expected at most {max_bytes} bytes, found {size} at {uri}")
        with open(uri, "rb") as f:
            return f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ModelNotFound(f"expected a file at {uri}, found none") from None
    except OSError as exc:
        raise FetchError(f"expected a readable file at {uri}, found: {exc.strerror}") from None


def _list_gcs(source: str) -> list[str]:
    rest = source[len("gs://") :]
    bucket, _, pattern = rest.partition("/")
    if not bucket:
        raise InvalidModelUri(f"expected gs://bucket/prefix or a gs:// glob, found {source!r}")
    wild = next((i for i, c in enumerate(pattern) if c in _WILDCARDS), None)
    prefix = pattern if wild is None else pattern[:wild]
    names = [blob.name for blob in _client().list_blobs(bucket, prefix=prefix)]
    if wild is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return sorted(f"gs://{bucket}/{n}" for n in names if not n.endswith("/"))


@functools.cache
def _client() -> Any:
    """One storage client per process, made as :mod:`model_fetch.gcs` makes it (the library loads here)."""
    from model_fetch.gcs import make_client

    return make_client()
