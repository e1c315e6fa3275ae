"""model_fetch against real files and the real GCS emulator (fake-gcs-server): no mocks."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from google.cloud import storage

from model_fetch import (
    ChecksumMismatch,
    FetchedModel,
    FetchError,
    InvalidModelUri,
    ModelNotFound,
    ModelTooLarge,
    StorageUnavailable,
    fetch_model,
)
from model_fetch.cache import DIGEST_MEMO
from model_fetch.gcs import RemoteObject, cache_file_name
from model_fetch.uri import GcsLocation, LocalLocation, parse_model_uri
from tests.gcs_emulator import FakeGCS

MODEL_BYTES = bytes(range(256)) * 1024 + b"tail"  # 256 KiB and a bit: several HTTP reads


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_in(directory: Path) -> list[str]:
    """Every entry, hidden temp files included (not the digest memo folder, which is the cache's own)."""
    if not directory.exists():
        return []
    return sorted(entry.name for entry in directory.iterdir() if entry.name != DIGEST_MEMO)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.bundle"
    path.write_bytes(MODEL_BYTES)
    return path


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def gs_model(fake_gcs: FakeGCS) -> tuple[str, int]:
    """A model object in a bucket of this test's own: its URI and generation."""
    bucket = fake_gcs.create_bucket()
    generation = fake_gcs.upload(bucket, "models/skin v1.bundle", MODEL_BYTES)
    return f"gs://{bucket}/models/skin v1.bundle", generation


def bucket_and_name(uri: str) -> tuple[str, str]:
    location = parse_model_uri(uri)
    assert isinstance(location, GcsLocation)
    return location.bucket, location.name


# URIs


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "   ",
        "gs://",
        "gs://bucket",
        "gs://bucket/",
        "gs:///object",
        "gs://bucket/folder/",
        "gs://Bad_Bucket/object",
        "gs://-bucket/object",
        "gs:bucket/object",
        "s3://x/y",
        "http://example.com/model.bundle",
        "file://otherhost/model.bundle",
        "file://",
    ],
)
def test_invalid_uri_is_refused(uri: str, cache_dir: Path) -> None:
    with pytest.raises(InvalidModelUri, match="expected"):
        fetch_model(uri, cache_dir=cache_dir)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("gs://bucket/model.bundle", GcsLocation("bucket", "model.bundle")),
        ("gs://my.bucket_1/dir/sub/m v1.tflite", GcsLocation("my.bucket_1", "dir/sub/m v1.tflite")),
        ("GS://bucket/a#b?c", GcsLocation("bucket", "a#b?c")),
        ("/srv/model.bundle", LocalLocation(Path("/srv/model.bundle"))),
        ("models/model.keras", LocalLocation(Path("models/model.keras"))),
        ("file:///srv/my%20model.bundle", LocalLocation(Path("/srv/my model.bundle"))),
        ("file://localhost/srv/model.bundle", LocalLocation(Path("/srv/model.bundle"))),
    ],
)
def test_uri_is_parsed(uri: str, expected: GcsLocation | LocalLocation) -> None:
    assert parse_model_uri(uri) == expected


@pytest.mark.parametrize("pin", ["abc", "g" * 64, "0" * 63, ""])
def test_malformed_pin_is_a_value_error(pin: str, model_file: Path) -> None:
    with pytest.raises(ValueError, match="64 hexadecimal digits"):
        fetch_model(str(model_file), expected_sha256=pin)


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, float("nan")])
def test_non_positive_timeout_is_a_value_error(timeout_s: float, model_file: Path) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        fetch_model(str(model_file), timeout_s=timeout_s)


def test_import_is_light() -> None:
    """google-cloud-storage (~45 MB RSS) is imported by the first gs:// fetch, not by the package."""
    code = "import sys, model_fetch; print('google.cloud.storage' in sys.modules)"
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_exceptions_form_one_family() -> None:
    for error in (InvalidModelUri, ModelNotFound, ChecksumMismatch, StorageUnavailable):
        assert issubclass(error, FetchError)


# Local files


def test_local_absolute_path(model_file: Path) -> None:
    fetched = fetch_model(str(model_file))
    assert fetched == FetchedModel(
        path=model_file,
        sha256=sha256_of(MODEL_BYTES),
        size=len(MODEL_BYTES),
        source=str(model_file),
        generation=None,
        downloaded=False,
        seconds=fetched.seconds,
    )
    assert fetched.seconds >= 0


def test_local_relative_path_becomes_absolute(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(model_file.parent)
    fetched = fetch_model(model_file.name)
    assert fetched.path.is_absolute()
    assert fetched.path == model_file
    assert fetched.source == model_file.name


def test_local_file_uri(tmp_path: Path) -> None:
    path = tmp_path / "my model.bundle"
    path.write_bytes(b"weights")
    fetched = fetch_model(path.as_uri())
    assert fetched.path == path
    assert fetched.sha256 == sha256_of(b"weights")


def test_local_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.bundle"
    with pytest.raises(ModelNotFound, match=r"found nothing there") as caught:
        fetch_model(str(missing))
    assert str(missing) in str(caught.value)


def test_a_local_folder_is_fetched_as_a_whole_with_its_pin(tmp_path: Path) -> None:
    """A Keras 2 SavedModel is a folder: its digest covers every file's path and bytes."""
    folder = tmp_path / "saved"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"graph")
    (folder / "variables" / "variables.index").write_bytes(b"index")
    fetched = fetch_model(str(folder))
    assert fetched.path == folder and fetched.size == 10
    assert fetch_model(str(folder), expected_sha256=fetched.sha256).sha256 == fetched.sha256
    (folder / "variables" / "variables.index").write_bytes(b"indeX")
    with pytest.raises(ChecksumMismatch, match="MODEL_SHA256"):
        fetch_model(str(folder), expected_sha256=fetched.sha256)


@pytest.mark.parametrize("pin", [sha256_of(MODEL_BYTES), sha256_of(MODEL_BYTES).upper()])
def test_local_pin_matches(pin: str, model_file: Path) -> None:
    assert fetch_model(str(model_file), expected_sha256=pin).sha256 == sha256_of(MODEL_BYTES)


def test_local_pin_mismatch_says_expected_and_found(model_file: Path) -> None:
    pin = sha256_of(b"another model")
    with pytest.raises(ChecksumMismatch) as caught:
        fetch_model(str(model_file), expected_sha256=pin)
    assert pin in str(caught.value)
    assert sha256_of(MODEL_BYTES) in str(caught.value)


# Cache file names


@pytest.mark.parametrize(
    "name",
    ["model.bundle", "dir/sub/m v1.keras", "../../etc/passwd", "é/ünïcode.tflite", "x" * 1000, ".hidden"],
)
def test_cache_file_name_is_safe(name: str) -> None:
    file_name = cache_file_name(GcsLocation("bucket", name), 7)
    assert "/" not in file_name and "\\" not in file_name
    assert not file_name.startswith(".")
    assert len(file_name) < 200
    assert ".g7" in file_name


def test_cache_file_name_keeps_the_suffix_and_tells_objects_and_generations_apart() -> None:
    names = {
        cache_file_name(GcsLocation("bucket", "a/b.keras"), 1),
        cache_file_name(GcsLocation("bucket", "a/b.keras"), 2),
        cache_file_name(GcsLocation("bucket", "a_b.keras"), 1),
        cache_file_name(GcsLocation("bucket2", "a/b.keras"), 1),
    }
    assert len(names) == 4
    assert all(name.endswith(".keras") for name in names)


def test_metadata_without_crc32c_is_an_error() -> None:
    bucket = storage.Bucket(client=None, name="bucket")
    blob = storage.Blob("model.bundle", bucket)
    blob._properties.update({"size": "3", "generation": "1"})  # what a listing without hashes gives
    with pytest.raises(ChecksumMismatch, match="missing hash is an error"):
        RemoteObject.from_blob(blob, GcsLocation("bucket", "model.bundle"))


# GCS through the emulator


def test_download_gives_identical_bytes(gs_model: tuple[str, int], cache_dir: Path) -> None:
    uri, generation = gs_model
    fetched = fetch_model(uri, cache_dir=cache_dir, timeout_s=10)
    assert fetched.path.read_bytes() == MODEL_BYTES
    assert fetched.path.parent == cache_dir
    assert fetched.sha256 == sha256_of(MODEL_BYTES)
    assert fetched.size == len(MODEL_BYTES)
    assert fetched.generation == generation
    assert fetched.source == uri
    assert fetched.downloaded is True
    assert fetched.path.suffix == ".bundle"
    assert files_in(cache_dir) == [fetched.path.name]


def test_download_with_matching_pin(gs_model: tuple[str, int], cache_dir: Path) -> None:
    uri, _ = gs_model
    fetched = fetch_model(uri, cache_dir=cache_dir, expected_sha256=sha256_of(MODEL_BYTES), timeout_s=10)
    assert fetched.downloaded


def test_second_fetch_uses_the_cache(gs_model: tuple[str, int], cache_dir: Path) -> None:
    uri, generation = gs_model
    first = fetch_model(uri, cache_dir=cache_dir, timeout_s=10)
    second = fetch_model(uri, cache_dir=cache_dir, timeout_s=10)
    assert (first.downloaded, second.downloaded) == (True, False)
    assert second.path == first.path
    assert second.sha256 == first.sha256
    assert second.generation == generation


def test_new_generation_is_downloaded_again(
    fake_gcs: FakeGCS, gs_model: tuple[str, int], cache_dir: Path
) -> None:
    uri, generation = gs_model
    first = fetch_model(uri, cache_dir=cache_dir, timeout_s=10)
    new_generation = fake_gcs.upload(*bucket_and_name(uri), b"retrained weights")
    second = fetch_model(uri, cache_dir=cache_dir, timeout_s=10)
    assert new_generation != generation
    assert second.downloaded is True
    assert second.generation == new_generation
    assert second.path != first.path
    assert second.path.read_bytes() == b"retrained weights"


def test_missing_object(fake_gcs: FakeGCS, cache_dir: Path) -> None:
    bucket = fake_gcs.create_bucket()
    with pytest.raises(ModelNotFound, match="found no such object") as caught:
        fetch_model(f"gs://{bucket}/nope.bundle", cache_dir=cache_dir, timeout_s=5)
    assert bucket in str(caught.value)
    assert "nope.bundle" in str(caught.value)


def test_deleted_object(fake_gcs: FakeGCS, gs_model: tuple[str, int], cache_dir: Path) -> None:
    uri, _ = gs_model
    fake_gcs.delete(*bucket_and_name(uri))
    with pytest.raises(ModelNotFound, match="found no such object"):
        fetch_model(uri, cache_dir=cache_dir, timeout_s=5)


def test_missing_bucket(fake_gcs: FakeGCS, cache_dir: Path) -> None:
    with pytest.raises(ModelNotFound, match="found no such bucket") as caught:
        fetch_model("gs://no-such-bucket-here/model.bundle", cache_dir=cache_dir, timeout_s=5)
    assert "model.bundle" in str(caught.value)


def test_pin_mismatch_leaves_no_file(gs_model: tuple[str, int], cache_dir: Path) -> None:
    uri, _ = gs_model
    pin = sha256_of(b"the model we meant")
    with pytest.raises(ChecksumMismatch, match="MODEL_SHA256") as caught:
        fetch_model(uri, cache_dir=cache_dir, expected_sha256=pin, timeout_s=10)
    assert pin in str(caught.value)
    assert sha256_of(MODEL_BYTES) in str(caught.value)
    assert files_in(cache_dir) == []


def test_pin_is_checked_on_a_cache_hit(gs_model: tuple[str, int], cache_dir: Path) -> None:
    uri, _ = gs_model
    fetch_model(uri, cache_dir=cache_dir, timeout_s=10)
    with pytest.raises(ChecksumMismatch, match="cached at"):
        fetch_model(uri, cache_dir=cache_dir, expected_sha256=sha256_of(b"other"), timeout_s=10)


# A pin and a cached copy with those bytes: storage is not asked


def test_a_pinned_cached_copy_is_served_with_storage_unreachable(
    fresh_fake_gcs: FakeGCS, cache_dir: Path
) -> None:
    bucket = fresh_fake_gcs.create_bucket()
    generation = fresh_fake_gcs.upload(bucket, "models/skin v1.bundle", MODEL_BYTES)
    uri, pin = f"gs://{bucket}/models/skin v1.bundle", sha256_of(MODEL_BYTES)
    first = fetch_model(uri, cache_dir=cache_dir, expected_sha256=pin, timeout_s=10)
    fresh_fake_gcs.stop()

    again = fetch_model(uri, cache_dir=cache_dir, expected_sha256=pin, timeout_s=2)
    assert (first.downloaded, again.downloaded) == (True, False)
    assert (again.path, again.generation, again.sha256) == (first.path, generation, pin)
    with pytest.raises(StorageUnavailable):  # without the pin, only storage can say which bytes are current
        fetch_model(uri, cache_dir=cache_dir, timeout_s=2)


def test_a_pinned_cached_start_does_not_import_the_storage_library(
    gs_model: tuple[str, int], cache_dir: Path
) -> None:
    """What the fast path saves a restart: google-cloud-storage's import (~0.3 CPU-s, ~45 MB)."""
    uri, _ = gs_model
    pin = sha256_of(MODEL_BYTES)
    fetch_model(uri, cache_dir=cache_dir, expected_sha256=pin, timeout_s=10)
    code = (
        "import sys; from model_fetch import fetch_model; "
        f"f = fetch_model({uri!r}, cache_dir={str(cache_dir)!r}, expected_sha256={pin!r}, timeout_s=2); "
        "print(f.downloaded, 'google.cloud.storage' in sys.modules)"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"}  # nothing listens there
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False", "False"]


def test_a_cached_copy_with_other_bytes_than_the_pin_is_downloaded_again(
    gs_model: tuple[str, int], cache_dir: Path
) -> None:
    uri, _ = gs_model
    pin = sha256_of(MODEL_BYTES)
    first = fetch_model(uri, cache_dir=cache_dir, expected_sha256=pin, timeout_s=10)
    first.path.write_bytes(bytes([MODEL_BYTES[0] ^ 0xFF]) + MODEL_BYTES[1:])  # same size, same name
    second = fetch_model(uri, cache_dir=cache_dir, expected_sha256=pin, timeout_s=10)
    assert second.downloaded is True
    assert second.path.read_bytes() == MODEL_BYTES


def test_the_pin_chooses_among_cached_generations(
    fake_gcs: FakeGCS, gs_model: tuple[str, int], cache_dir: Path
) -> None:
    """A pin names bytes, not "the newest": an object replaced in the bucket while the service is
    pinned to the old bytes keeps serving those (asking storage could only find bytes it refuses)."""
    uri, generation = gs_model
    fetch_model(uri, cache_dir=cache_dir, timeout_s=10)
    newer = fake_gcs.upload(*bucket_and_name(uri), b"retrained weights")
    fetch_model(uri, cache_dir=cache_dir, timeout_s=10)
    old = fetch_model(uri, cache_dir=cache_dir, expected_sha256=sha256_of(MODEL_BYTES), timeout_s=10)
    new = fetch_model(uri, cache_dir=cache_dir, expected_sha256=sha256_of(b"retrained weights"), timeout_s=10)
    assert (old.generation, old.downloaded, old.path.read_bytes()) == (generation, False, MODEL_BYTES)
    assert (new.generation, new.downloaded, new.path.read_bytes()) == (newer, False, b"retrained weights")


def test_a_symlink_in_the_cache_is_not_served_for_a_pin(fresh_fake_gcs: FakeGCS, cache_dir: Path) -> None:
    bucket = fresh_fake_gcs.create_bucket()
    fresh_fake_gcs.upload(bucket, "m.bundle", MODEL_BYTES)
    uri, pin = f"gs://{bucket}/m.bundle", sha256_of(MODEL_BYTES)
    cached = fetch_model(uri, cache_dir=cache_dir, expected_sha256=pin, timeout_s=10).path
    elsewhere = cache_dir.parent / "elsewhere.bundle"
    cached.rename(elsewhere)
    cached.symlink_to(elsewhere)
    fresh_fake_gcs.stop()
    with pytest.raises(StorageUnavailable):
        fetch_model(uri, cache_dir=cache_dir, expected_sha256=pin, timeout_s=2)


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda data: bytes([data[0] ^ 0xFF]) + data[1:], id="flipped-byte"),
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: data + b"junk", id="extended"),
        pytest.param(lambda data: b"", id="empty"),
    ],
)
def test_corrupt_cached_file_is_downloaded_again(
    corrupt: Callable[[bytes], bytes], gs_model: tuple[str, int], cache_dir: Path
) -> None:
    uri, _ = gs_model
    first = fetch_model(uri, cache_dir=cache_dir, timeout_s=10)
    first.path.write_bytes(corrupt(MODEL_BYTES))
    second = fetch_model(uri, cache_dir=cache_dir, timeout_s=10)
    assert second.downloaded is True
    assert second.path == first.path
    assert second.path.read_bytes() == MODEL_BYTES
    assert files_in(cache_dir) == [first.path.name]


def test_corruption_at_rest_is_caught_by_the_hash_header(
    fake_gcs: FakeGCS, gs_model: tuple[str, int], cache_dir: Path
) -> None:
    uri, _ = gs_model
    fake_gcs.stored_path(*bucket_and_name(uri)).write_bytes(b"X" * len(MODEL_BYTES))
    with pytest.raises(ChecksumMismatch, match="X-Goog-Hash"):
        fetch_model(uri, cache_dir=cache_dir, timeout_s=10)
    assert files_in(cache_dir) == []


def test_concurrent_fetches_share_one_verified_file(gs_model: tuple[str, int], cache_dir: Path) -> None:
    uri, _ = gs_model
    threads = 8
    barrier = threading.Barrier(threads)

    def fetch(_: int) -> FetchedModel:
        barrier.wait()
        return fetch_model(uri, cache_dir=cache_dir, expected_sha256=sha256_of(MODEL_BYTES), timeout_s=15)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(fetch, range(threads)))
    assert len({result.path for result in results}) == 1
    assert {result.sha256 for result in results} == {sha256_of(MODEL_BYTES)}
    assert results[0].path.read_bytes() == MODEL_BYTES
    assert files_in(cache_dir) == [results[0].path.name]


def test_default_cache_dir_is_under_the_temp_dir(
    gs_model: tuple[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    uri, _ = gs_model
    fetched = fetch_model(uri, timeout_s=10)
    assert fetched.path.parent == tmp_path / f"dermal-fn-{os.geteuid()}" / "models"
    for folder in (fetched.path.parent, fetched.path.parent.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # private: nobody else may plant a model


def test_a_cache_folder_that_is_a_symlink_is_refused(gs_model: tuple[str, int], tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir()
    link = tmp_path / "cache"
    link.symlink_to(real)
    with pytest.raises(FetchError, match="found a symlink"):
        fetch_model(gs_model[0], cache_dir=link, timeout_s=10)
    assert files_in(real) == []


def test_a_cache_folder_open_to_others_is_made_private(gs_model: tuple[str, int], tmp_path: Path) -> None:
    cache = tmp_path / "shared"
    cache.mkdir(mode=0o777)
    os.chmod(cache, 0o777)
    fetch_model(gs_model[0], cache_dir=cache, timeout_s=10)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700


def test_stale_partial_downloads_are_removed_and_fresh_ones_kept(
    gs_model: tuple[str, int], cache_dir: Path
) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    stale, fresh = cache_dir / ".model.dermal.abc.part", cache_dir / ".model.dermal.def.part"
    for path in (stale, fresh):
        path.write_bytes(b"half a model")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fetched = fetch_model(gs_model[0], cache_dir=cache_dir, timeout_s=10)
    assert not stale.exists() and fresh.exists()
    assert fetched.path.read_bytes() == MODEL_BYTES


def test_a_model_over_the_size_cap_is_refused_before_download(
    gs_model: tuple[str, int], cache_dir: Path, fake_gcs: FakeGCS
) -> None:
    uri, _ = gs_model
    with pytest.raises(ModelTooLarge, match="at most 0 MB, found 0 MB"):
        fetch_model(uri, cache_dir=cache_dir, timeout_s=10, max_bytes=1000)
    assert [name for name in files_in(cache_dir) if not name.startswith(".")] == []


def test_a_local_model_over_the_size_cap_is_refused(model_file: Path) -> None:
    with pytest.raises(ModelTooLarge):
        fetch_model(str(model_file), max_bytes=10)


def test_progress_is_logged(
    gs_model: tuple[str, int], cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri, generation = gs_model
    with caplog.at_level(logging.INFO, logger="model_fetch"):
        fetch_model(uri, cache_dir=cache_dir, timeout_s=10)
        fetch_model(uri, cache_dir=cache_dir, timeout_s=10)
    messages = [record.getMessage() for record in caplog.records if record.name.startswith("model_fetch")]
    assert any(uri in m and str(len(MODEL_BYTES)) in m and str(generation) in m for m in messages)
    assert any("MB/s" in m for m in messages)
    assert any("cache hit" in m for m in messages)


# Faults between client and emulator: a real HTTP proxy in front of it


class _Proxy:
    """A reverse proxy to the emulator that can misbehave like a network or a load balancer.

    ``strip_hash`` drops X-Goog-Hash; ``chunk_delay_s`` sends bodies slowly; the next
    ``failures_left`` object requests get ``fail_status``; the next ``cuts_left`` downloads stop
    halfway. Faults hit object requests only: google-cloud-storage 3.17 also sends a background
    bucket GET from each new client (its bucket-metadata cache), which must not eat a fault.
    """

    def __init__(self, upstream: str) -> None:
        self.strip_hash = False
        self.chunk_delay_s = 0.0
        self.fail_status = 503
        self.failures_left = 0
        self.cuts_left = 0
        self._lock = threading.Lock()
        target = urllib.parse.urlsplit(upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if "/o/" in self.path and proxy._take("failures_left"):
                    self.send_response(proxy.fail_status)
                    self.send_header("Content-Length", "0")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    return
                connection = http.client.HTTPConnection(target.hostname or "", target.port, timeout=10)
                connection.request("GET", self.path, headers={"Accept-Encoding": "identity"})
                response = connection.getresponse()
                body = response.read()
                connection.close()
                dropped = {"content-length", "connection", "transfer-encoding"}
                if proxy.strip_hash:
                    dropped.add("x-goog-hash")
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in dropped:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if "alt=media" in self.path and proxy._take("cuts_left"):
                    body = body[: len(body) // 2]  # then hang up: an incomplete read
                try:
                    for start in range(0, len(body), 4096):
                        self.wfile.write(body[start : start + 4096])
                        self.wfile.flush()
                        time.sleep(proxy.chunk_delay_s)
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client gave up, as it should when over its timeout

            def log_message(self, format: str, *args: object) -> None:
                return  # keep the test output clean

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _take(self, counter: str) -> bool:
        """Decrement a fault counter; whether there was a fault left to inject."""
        with self._lock:
            left: int = getattr(self, counter)
            if left > 0:
                setattr(self, counter, left - 1)
            return left > 0


@pytest.fixture
def proxy(fake_gcs: FakeGCS, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Proxy]:
    """STORAGE_EMULATOR_HOST pointing at a proxy in front of the shared emulator."""
    server = _Proxy(fake_gcs.url)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
    try:
        yield server
    finally:
        server.close()


def retry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "model_fetch.gcs" and r.levelname == "WARNING"
    ]


def test_download_without_hash_header_is_still_verified(
    proxy: _Proxy, gs_model: tuple[str, int], cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri, _ = gs_model
    proxy.strip_hash = True
    with caplog.at_level(logging.INFO):
        fetched = fetch_model(uri, cache_dir=cache_dir, timeout_s=10)
    assert fetched.path.read_bytes() == MODEL_BYTES
    assert any("No CRC32C checksum was returned" in r.getMessage() for r in caplog.records)


def test_corruption_without_hash_header_is_caught_by_our_crc32c(
    fake_gcs: FakeGCS, proxy: _Proxy, gs_model: tuple[str, int], cache_dir: Path
) -> None:
    uri, _ = gs_model
    proxy.strip_hash = True
    fake_gcs.stored_path(*bucket_and_name(uri)).write_bytes(b"X" * len(MODEL_BYTES))
    with pytest.raises(ChecksumMismatch, match=r"computed \S+ over the received bytes"):
        fetch_model(uri, cache_dir=cache_dir, timeout_s=10)
    assert files_in(cache_dir) == []


@pytest.mark.parametrize("status", [429, 500, 503])
def test_transient_http_errors_are_retried(
    status: int,
    proxy: _Proxy,
    gs_model: tuple[str, int],
    cache_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    uri, _ = gs_model
    proxy.fail_status, proxy.failures_left = status, 3
    with caplog.at_level(logging.WARNING, logger="model_fetch"):
        fetched = fetch_model(uri, cache_dir=cache_dir, timeout_s=10)
    assert fetched.path.read_bytes() == MODEL_BYTES
    assert proxy.failures_left == 0
    assert len(retry_warnings(caplog)) == 3


def test_interrupted_download_starts_over_from_an_empty_file(
    proxy: _Proxy, gs_model: tuple[str, int], cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri, _ = gs_model
    proxy.cuts_left = 2
    with caplog.at_level(logging.WARNING, logger="model_fetch"):
        fetched = fetch_model(uri, cache_dir=cache_dir, timeout_s=10)
    assert proxy.cuts_left == 0
    assert len(retry_warnings(caplog)) == 2
    assert fetched.path.read_bytes() == MODEL_BYTES  # not half + half + whole
    assert files_in(cache_dir) == [fetched.path.name]


@pytest.mark.parametrize(("status", "found"), [(401, "credentials"), (403, "read access"), (400, "HTTP 400")])
def test_permanent_http_errors_are_not_retried(
    status: int, found: str, proxy: _Proxy, gs_model: tuple[str, int], cache_dir: Path
) -> None:
    uri, _ = gs_model
    proxy.fail_status, proxy.failures_left = status, 10  # google-auth itself retries a 401 once
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=found):
        fetch_model(uri, cache_dir=cache_dir, timeout_s=10)
    assert time.monotonic() - started < 2.0


def test_slow_download_is_cut_at_the_timeout(
    proxy: _Proxy, gs_model: tuple[str, int], cache_dir: Path
) -> None:
    uri, _ = gs_model
    proxy.chunk_delay_s = 0.05  # 64 chunks: over 3 s for the whole body
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="bytes received") as caught:
        fetch_model(uri, cache_dir=cache_dir, timeout_s=1.0)
    assert time.monotonic() - started < 2.5  # cut: the whole body takes over 3.2 s
    assert "timeout_s=1" in str(caught.value)
    assert files_in(cache_dir) == []


def test_missing_credentials_are_storage_unavailable(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    with pytest.raises(StorageUnavailable, match="credentials"):
        fetch_model("gs://bucket/model.bundle", cache_dir=cache_dir, timeout_s=5)


# The emulator going away and coming back


def test_emulator_down_then_back(fresh_fake_gcs: FakeGCS, cache_dir: Path) -> None:
    bucket = fresh_fake_gcs.create_bucket()
    fresh_fake_gcs.upload(bucket, "model.bundle", MODEL_BYTES)
    fresh_fake_gcs.stop()
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="timeout_s=2") as caught:
        fetch_model(f"gs://{bucket}/model.bundle", cache_dir=cache_dir, timeout_s=2.0)
    assert time.monotonic() - started < 4.0  # the library's own retry deadline is 120 s
    assert "Connection refused" in str(caught.value)
    assert files_in(cache_dir) == []

    fresh_fake_gcs.restart()
    fetched = fetch_model(f"gs://{bucket}/model.bundle", cache_dir=cache_dir, timeout_s=5.0)
    assert fetched.path.read_bytes() == MODEL_BYTES


def test_fetch_rides_out_an_emulator_restart(fresh_fake_gcs: FakeGCS, cache_dir: Path) -> None:
    bucket = fresh_fake_gcs.create_bucket()
    fresh_fake_gcs.upload(bucket, "model.bundle", MODEL_BYTES)
    fresh_fake_gcs.stop()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(fetch_model, f"gs://{bucket}/model.bundle", cache_dir=cache_dir, timeout_s=15.0)
        time.sleep(1.0)
        assert not pending.done()
        fresh_fake_gcs.start()  # from the main thread: the emulator's lifetime is tied to it
        fetched = pending.result(timeout=15)
    assert fetched.downloaded
    assert fetched.seconds >= 1.0
    assert fetched.path.read_bytes() == MODEL_BYTES


# The emulator helper itself


def test_fake_gcs_keeps_port_and_data_across_restart(fresh_fake_gcs: FakeGCS) -> None:
    bucket = fresh_fake_gcs.create_bucket()
    generation = fresh_fake_gcs.upload(bucket, "a/b.bin", b"data")
    url = fresh_fake_gcs.url
    fresh_fake_gcs.restart()
    assert fresh_fake_gcs.url == url
    blob = fresh_fake_gcs.client().bucket(bucket).get_blob("a/b.bin")
    assert blob is not None
    assert blob.generation == generation
    assert blob.download_as_bytes() == b"data"
    assert fresh_fake_gcs.log_path.stat().st_size > 0


def test_fake_gcs_leaves_no_process_or_files() -> None:
    server = FakeGCS()
    with server:
        pid = server.pid
        workdir = server.workdir
        assert pid is not None and server.running
    assert not server.running
    assert not workdir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_digests_are_remembered_per_file_identity(tmp_path: Path) -> None:
    from model_fetch.digest import file_digests

    model = tmp_path / "m.dermal"
    model.write_bytes(MODEL_BYTES)
    memo = tmp_path / "cache" / DIGEST_MEMO
    first = file_digests(model, memo=memo)
    assert first.sha256 == sha256_of(MODEL_BYTES) and len(list(memo.iterdir())) == 1
    assert stat.S_IMODE(memo.stat().st_mode) == 0o700
    entry = next(memo.iterdir())
    entry.write_text(f"{first.size} {'0' * 64} {first.crc32c}\n")  # what a memo hit returns, unread
    assert file_digests(model, memo=memo).sha256 == "0" * 64
    model.write_bytes(MODEL_BYTES[:-1] + b"X")  # rewritten: a new identity (ctime), hashed again
    assert file_digests(model, memo=memo).sha256 == sha256_of(MODEL_BYTES[:-1] + b"X")
