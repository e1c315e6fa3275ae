"""The cache folder: private to this user (0700, owned by us, not a symlink), cleaned of stale partial files.

A shared ``/tmp`` is writable by everyone; a cache there that is reused on a size + crc32c match
must be a folder nobody else can create, link or write into first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
import time
from pathlib import Path

from model_fetch.errors import FetchError

logger = logging.getLogger(__name__)

PRIVATE_MODE = 0o700
PARTIAL_SUFFIX = ".part"
DIGEST_MEMO = "digests"  # inside the cache folder: file identity -> size, sha256, crc32c


def default_cache_dir() -> Path:
    """Where downloads are kept when no cache dir is given: ``<tmp>/dermal-fn-<uid>/models``."""
    return Path(tempfile.gettempdir()) / f"dermal-fn-{os.geteuid()}" / "models"


def private_dir(path: Path) -> Path:
    """``path`` (and any missing parents) as a folder only this user can use; FetchError if it cannot be.

    Created 0700. An existing folder must be a real folder (not a symlink) owned by this user; if
    others may read or write it, it is made 0700.
    """
    for folder in reversed([path, *path.parents]):
        if folder.exists() or folder.is_symlink():
            continue
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=PRIVATE_MODE)
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise FetchError(f"expected a cache folder at {path}, found: {exc}") from exc
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        found = "a symlink" if stat.S_ISLNK(info.st_mode) else "a file"
        raise FetchError(f"expected the cache at {path} to be a folder of our own, found {found}")
    if info.st_uid != os.geteuid():
        raise FetchError(
            f"expected the cache folder {path} to belong to uid {os.geteuid()}, found uid {info.st_uid}"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, PRIVATE_MODE)
    return path


def remove_stale_partials(folder: Path, *, older_than_s: float) -> list[str]:
    """Delete ``.part`` files left by a download that was killed (older than ``older_than_s``)."""
    removed = []
    now = time.time()
    for entry in folder.glob(f".*{PARTIAL_SUFFIX}"):
        try:
            if entry.is_file() and now - entry.stat().st_mtime > older_than_s:
                entry.unlink()
                removed.append(entry.name)
        except OSError:
            continue
    if removed:
        logger.warning("removed %d stale partial download(s) from %s", len(removed), folder)
    return removed
