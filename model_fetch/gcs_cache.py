"""The GCS cache's file names, and a pinned copy served from it without asking storage.

Nothing here imports google-cloud-storage: :func:`pinned_cached_copy` is what lets a start whose
model is pinned (``MODEL_SHA256``) and already cached (a worker restart, a build warmed by
``python -m dermal_fn.serving.warm``) skip that library's import (~0.3-0.45 CPU-seconds, ~45 MB of
RSS) and the metadata request. The pin names the bytes to serve; if the cache holds a file with
exactly those bytes, asking storage could only confirm them, or find other bytes the pin refuses.
"""

from __future__ import annotations

import hashlib
import logging
import re
import stat
import time
from pathlib import Path, PurePosixPath

from model_fetch.cache import DIGEST_MEMO, PARTIAL_SUFFIX, private_dir
from model_fetch.digest import file_digests
from model_fetch.errors import FetchError
from model_fetch.local import check_size
from model_fetch.result import FetchedModel
from model_fetch.uri import GcsLocation

logger = logging.getLogger(__name__)

_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")


def cache_file_name(location: GcsLocation, generation: int) -> str:
    """A safe file name, unique per bucket, object and generation, keeping the object's suffix."""
    prefix, suffix = _name_parts(location)
    return f"{prefix}{generation}{suffix}"


def _name_parts(location: GcsLocation) -> tuple[str, str]:
    """What comes before and after the generation in :func:`cache_file_name`."""
    suffix = PurePosixPath(location.name).suffix
    stem = location.name[: len(location.name) - len(suffix)]
    readable = _UNSAFE_CHARACTERS.sub("_", f"{location.bucket}_{stem}")[-80:].strip("._-")
    safe_suffix = _UNSAFE_CHARACTERS.sub("_", suffix)[:16]
    key = hashlib.sha256(f"{location.bucket}/{location.name}".encode()).hexdigest()[:16]
    return f"{readable}.{key}.g", safe_suffix


def cached_generations(location: GcsLocation, cache_dir: Path) -> list[tuple[int, Path]]:
    """The cached copies of ``location`` (any generation) as (generation, path), newest first.

    Only complete files count: a partial download has its own suffix and is never one of these.
    """
    prefix, suffix = _name_parts(location)
    pattern = re.compile(re.escape(prefix) + r"([0-9]+)" + re.escape(suffix) + r"\Z")
    found: list[tuple[int, Path]] = []
    try:
        entries = list(cache_dir.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = pattern.match(entry.name)
        if match is not None and not entry.name.endswith(PARTIAL_SUFFIX):
            found.append((int(match.group(1)), entry))
    return sorted(found, reverse=True)


def remove_other_generations(location: GcsLocation, cache_dir: Path, *, keep: Path) -> list[str]:
    """Delete the cached copies of ``location`` other than ``keep`` (older generations, replaced objects).

    Called once the generation in ``keep`` has loaded: the cache may be in memory (Cloud Functions,
    Cloud Run), where every stale copy costs the container what the model costs.
    """
    removed = []
    for _, path in cached_generations(location, cache_dir):
        if path != keep:
            try:
                path.unlink()
            except OSError:
                continue
            removed.append(path.name)
    return removed


def pinned_cached_copy(
    location: GcsLocation,
    *,
    source: str,
    cache_dir: Path,
    expected_sha256: str,
    started: float,
    max_bytes: int | None = None,
) -> FetchedModel | None:
    """A cached copy of ``location`` whose SHA-256 is the pin, or None (then ask storage as usual).

    The folder must pass :func:`private_dir` first: its digest memo is what spares a restart the hash,
    and only a folder nobody else can write is trusted for that. A new copy of the folder (a deploy) is
    hashed once. Of several matching generations the newest is served.
    """
    try:
        private_dir(cache_dir)
    except FetchError:  # the usual path reports it, with its own error
        return None
    for generation, path in cached_generations(location, cache_dir):
        try:
            status = path.lstat()
            if not stat.S_ISREG(status.st_mode):
                continue
            check_size(status.st_size, max_bytes, source=str(path))
            digests = file_digests(path, memo=cache_dir / DIGEST_MEMO)
        except (OSError, FetchError):  # a copy we cannot read or may not serve: storage decides
            continue
        if digests.sha256 != expected_sha256 or digests.size != status.st_size:
            continue
        logger.info(
            "serving %s generation %d from the cache at %s without asking storage: its sha256 is the MODEL_SHA256 pin",
            source,
            generation,
            path,
        )
        return FetchedModel(
            path=path,
            sha256=digests.sha256,
            size=digests.size,
            source=source,
            generation=generation,
            downloaded=False,
            seconds=time.monotonic() - started,
        )
    return None
