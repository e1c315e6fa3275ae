"""Digests of model bytes: size, SHA-256 and CRC32C, computed by streaming."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import google_crc32c

from model_fetch.errors import ChecksumMismatch

_READ_BYTES = 1 << 20
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class Digests:
    """Size and hashes of some bytes; ``crc32c`` is base64, as GCS metadata spells it."""

    size: int
    sha256: str
    crc32c: str


class _Hashes:
    """Running size, SHA-256 and CRC32C."""

    def __init__(self) -> None:
        self.size = 0
        self._sha256 = hashlib.sha256()
        self._crc32c = google_crc32c.Checksum()

    def update(self, data: bytes) -> None:
        self.size += len(data)
        self._sha256.update(data)
        self._crc32c.update(data)

    def digests(self) -> Digests:
        crc32c = base64.b64encode(self._crc32c.digest()).decode("ascii")
        return Digests(size=self.size, sha256=self._sha256.hexdigest(), crc32c=crc32c)


def file_digests(path: str | os.PathLike[str], *, memo: Path | None = None) -> Digests:
    """Hash a file by streaming it in 1 MiB reads; with ``memo``, remembered per file identity.

    ``memo`` is a private folder (the model cache's): a file whose inode, size, mtime and ctime are
    those of a file hashed before is not read again (a cold start of an 80 MB bundle saves reading
    and hashing it). ctime cannot be set from user space, so a file rewritten in place, even to the
    same size and mtime, is a new identity.
    """
    entry = _memo_entry(Path(path), memo) if memo is not None else None
    if entry is not None:
        remembered = _read_memo(entry)
        if remembered is not None:
            return remembered
    hashes = _Hashes()
    with open(path, "rb") as file:
        while chunk := file.read(_READ_BYTES):
            hashes.update(chunk)
    digests = hashes.digests()
    if entry is not None:
        _write_memo(entry, digests)
    return digests


def remember_digests(path: str | os.PathLike[str], digests: Digests, *, memo: Path) -> None:
    """Record ``digests`` for the file at ``path`` as it is now (after a verified download)."""
    entry = _memo_entry(Path(path), memo)
    if entry is not None:
        _write_memo(entry, digests)


def _memo_entry(path: Path, memo: Path) -> Path | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    identity = (
        f"{os.path.realpath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    )
    return memo / f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.digest"


def _read_memo(entry: Path) -> Digests | None:
    try:
        size, sha256, crc32c = entry.read_text().split()
        return Digests(size=int(size), sha256=sha256, crc32c=crc32c)
    except (OSError, ValueError):
        return None


def _write_memo(entry: Path, digests: Digests) -> None:
    try:
        entry.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = entry.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(f"{digests.size} {digests.sha256} {digests.crc32c}\n")
        os.replace(partial, entry)
    except OSError:
        pass  # a memo is an optimisation: without it the next start hashes again


class HashingWriter:
    """A write-only file object that hashes and counts what it passes on to ``file``.

    ``before_write(size_so_far)`` runs before each write and may raise to abort the transfer.
    ``restart()`` (or ``seek(0)``) empties the file and the hashes, for a download starting over.
    """

    def __init__(self, file: IO[bytes], *, before_write: Callable[[int], None] | None = None) -> None:
        self._file = file
        self._before_write = before_write
        self._hashes = _Hashes()
        self.restart()

    def write(self, data: bytes) -> int:
        if self._before_write is not None:
            self._before_write(self._hashes.size)
        self._file.write(data)
        self._hashes.update(data)
        return len(data)

    def restart(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._hashes = _Hashes()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if offset != 0 or whence != io.SEEK_SET:
            raise io.UnsupportedOperation("HashingWriter can only seek back to the start")
        self.restart()
        return 0

    def tell(self) -> int:
        return self._hashes.size

    def flush(self) -> None:
        self._file.flush()

    def digests(self) -> Digests:
        return self._hashes.digests()


def normalize_sha256(pin: str | None) -> str | None:
    """Lower-case a hex SHA-256 pin; raise ValueError unless it is 64 hex digits."""
    if pin is None:
        return None
    normalized = pin.strip().lower()
    if not _SHA256_HEX.match(normalized):
        raise ValueError(f"expected_sha256 must be 64 hexadecimal digits, got {pin!r}")
    return normalized


def check_sha256_pin(digests: Digests, expected_sha256: str | None, *, source: str) -> None:
    """Raise ChecksumMismatch when a pin is set and the bytes' SHA-256 differs from it."""
    if expected_sha256 is not None and digests.sha256 != expected_sha256:
        raise ChecksumMismatch(
            f"expected sha256 {expected_sha256} (the MODEL_SHA256 pin) for {source}, "
            f"found {digests.sha256} ({digests.size} bytes)"
        )


def path_sha256(path: Path) -> str:
    """A file's SHA-256; for a folder (a SavedModel), :func:`folder_sha256`."""
    return folder_sha256(path) if path.is_dir() else file_digests(path).sha256


def folder_sha256(folder: Path) -> str:
    """SHA-256 over each file's path relative to ``folder`` and its SHA-256, in sorted order (a SavedModel)."""
    outer = hashlib.sha256()
    for item in sorted(p for p in folder.rglob("*") if p.is_file()):
        outer.update(
            str(item.relative_to(folder)).encode() + b"\0" + bytes.fromhex(file_digests(item).sha256)
        )
    return outer.hexdigest()
