"""The real ``functions-framework`` process, cold-starting from fake-gcs-server.

Each test starts the function exactly as render.yaml does (tests/http_fixtures.py) with
``MODEL_URI=gs://...`` and ``STORAGE_EMULATOR_HOST`` pointing at the Go emulator, and proves
what happened from the server's JSON log lines and the emulator's request log.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from dermal_fn.serving import memory
from tests.gcs_emulator import FakeGCS
from tests.http_fixtures import ServerProcess, jpeg_bytes
from tests.waiting import wait_until

OBJECT = "models/skin.dermal"
JPEG = jpeg_bytes(width=160, height=120, seed=5)
StartServer = Callable[..., ServerProcess]


KEY = "process-test-key"
BEARER = {"Authorization": f"Bearer {KEY}"}


def gcs_env(gcs: FakeGCS, bucket: str, cache: Path, **extra: str) -> dict[str, str]:
    return {
        "MODEL_URI": f"gs://{bucket}/{OBJECT}",
        "STORAGE_EMULATOR_HOST": gcs.url,
        "MODEL_CACHE_DIR": str(cache),
        "MODEL_RETRY_S": "1",
        **extra,
    }


def wait_for_retry(server: ServerProcess) -> None:
    """Wait out the failed load's backoff (Retry-After of /health), checking it is short and said.

    /health answers 503 until a load succeeds, retries included: the backoff is over when the
    Retry-After it gives has been reached, which a real server's clock decides.
    """
    status, health = server.get_json("/health")
    assert status == 503 and health["model_state"] == "error"
    retry = health["error"]["retry_after_s"]
    assert 1 <= retry <= 2
    retry_at = time.monotonic() + retry
    wait_until(lambda: time.monotonic() >= retry_at, timeout_s=retry + 1, what="the backoff to pass")


def emulator_downloads(gcs: FakeGCS, bucket: str) -> int:
    """Media downloads of the bucket's object in the emulator's request log."""
    needle = f"GET /download/storage/v1/b/{bucket}/o/"
    return sum(1 for line in gcs.log_path.read_text().splitlines() if needle in line and "alt=media" in line)


def records(server: ServerProcess, *, logger: str, message_prefix: str) -> list[dict[str, Any]]:
    return [
        r
        for r in server.logs()
        if r.get("logger") == logger and str(r.get("message", "")).startswith(message_prefix)
    ]


def test_eight_concurrent_first_requests_download_once(
    fake_gcs: FakeGCS, server_factory: StartServer, test_bundle: Path, tmp_path: Path
) -> None:
    bucket = fake_gcs.create_bucket()
    fake_gcs.upload(bucket, OBJECT, test_bundle.read_bytes())
    cache = tmp_path / "cache"
    # THREADS=16: all eight requests are inside the function at once whatever this machine's CPU count
    # (functions-framework's default is 4 per CPU); wait on /memory, which does not warm the model
    server = server_factory(gcs_env(fake_gcs, bucket, cache, THREADS="16"), wait="/memory")

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: server.post_image("/predict", JPEG), range(8)))

    statuses = [status for status, _ in answers]
    assert statuses == [200] * 8, (statuses, server.log_tail())
    sha256 = hashlib.sha256(test_bundle.read_bytes()).hexdigest()
    assert {body["model"]["sha256"] for _, body in answers} == {sha256}
    assert len({str(body["predictions"]) for _, body in answers}) == 1  # one interpreter, same answer
    assert emulator_downloads(fake_gcs, bucket) == 1
    assert len(records(server, logger="model_fetch.gcs", message_prefix="downloaded ")) == 1
    loaded = records(server, logger="dermal_fn.serving.holder", message_prefix="model loaded")
    assert len(loaded) == 1
    assert loaded[0]["downloaded"] is True
    assert loaded[0]["source"] == f"gs://{bucket}/{OBJECT}"
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] != []
    assert [p.name for p in cache.iterdir() if p.name.endswith(".part")] == []
    status, health = server.get_json("/health")
    assert status == 200
    assert health["model_state"] == "loaded"


def test_first_health_warms_the_instance(
    fake_gcs: FakeGCS, server_factory: StartServer, test_bundle: Path, tmp_path: Path
) -> None:
    bucket = fake_gcs.create_bucket()
    fake_gcs.upload(bucket, OBJECT, test_bundle.read_bytes())
    server = server_factory(gcs_env(fake_gcs, bucket, tmp_path / "cache"), wait=None)
    server.wait_ready(path="/health")  # a platform's health check: the first answer starts loading

    def loaded() -> bool:
        return server.get_json("/health")[1]["model_state"] == "loaded"

    wait_until(loaded, timeout_s=30, what="the model to load after the first /health")
    assert emulator_downloads(fake_gcs, bucket) == 1
    assert records(server, logger="dermal_fn.serving.http", message_prefix="request")[0]["route"] == "/health"
    assert not [r for r in server.logs() if r.get("route") == "/predict"]


def test_missing_object_is_503_then_recovers_once_uploaded(
    fake_gcs: FakeGCS, server_factory: StartServer, test_bundle: Path, tmp_path: Path
) -> None:
    bucket = fake_gcs.create_bucket()
    server = server_factory(gcs_env(fake_gcs, bucket, tmp_path / "cache", API_KEY=KEY), wait="/health")

    status, body = server.post_image("/predict", JPEG, headers=BEARER)
    assert status == 503
    assert body["error"]["code"] == "model_unavailable"
    assert "ModelNotFound" in body["error"]["message"]
    assert f"expected object {OBJECT!r} in bucket {bucket!r}" in body["error"]["detail"]  # the key shown
    status, health = server.get_json("/health")  # anonymous: what failed, not where
    assert status == 503
    assert (health["status"], health["model_state"]) == ("error", "error")
    assert "ModelNotFound" in health["error"]["message"] and "detail" not in health["error"]
    assert bucket not in json.dumps(health) and OBJECT not in json.dumps(health)
    status, health = server.get_json("/health", headers=BEARER)
    assert "no such object" in health["error"]["detail"]

    fake_gcs.upload(bucket, OBJECT, test_bundle.read_bytes())
    status, body = server.post_image("/predict", JPEG, headers=BEARER)  # within the backoff: at once
    assert status == 503 and "next attempt" in body["error"]["message"]
    wait_for_retry(server)
    status, body = server.post_image("/predict", JPEG, headers=BEARER)  # after it: a new attempt
    assert status == 200, (body, server.log_tail())
    status, health = server.get_json("/health")
    assert (status, health["status"], health["model_state"]) == (200, "ok", "loaded")


def test_sha256_mismatch_is_refused_and_leaves_no_file(
    fake_gcs: FakeGCS, server_factory: StartServer, test_bundle: Path, tmp_path: Path
) -> None:
    bucket = fake_gcs.create_bucket()
    fake_gcs.upload(bucket, OBJECT, test_bundle.read_bytes())
    cache = tmp_path / "cache"
    wrong = "0" * 64
    server = server_factory(gcs_env(fake_gcs, bucket, cache, MODEL_SHA256=wrong, API_KEY=KEY), wait="/health")

    status, body = server.post_image("/predict", JPEG, headers=BEARER)
    assert status == 503
    assert body["error"]["code"] == "model_unavailable"
    assert "ChecksumMismatch" in body["error"]["message"]
    assert wrong in body["error"]["detail"]
    assert emulator_downloads(fake_gcs, bucket) == 1  # it was downloaded, checked, and thrown away
    assert not cache.exists() or [p.name for p in cache.iterdir() if p.is_file()] == []
    assert server.get_json("/health")[1]["model_state"] == "error"


def test_right_sha256_pin_is_served(
    fake_gcs: FakeGCS, server_factory: StartServer, test_bundle: Path, tmp_path: Path
) -> None:
    bucket = fake_gcs.create_bucket()
    fake_gcs.upload(bucket, OBJECT, test_bundle.read_bytes())
    sha256 = hashlib.sha256(test_bundle.read_bytes()).hexdigest()
    server = server_factory(gcs_env(fake_gcs, bucket, tmp_path / "cache", MODEL_SHA256=sha256.upper()))
    status, body = server.post_image("/predict", JPEG)
    assert status == 200, body
    assert body["model"]["sha256"] == sha256


def test_emulator_down_at_cold_start_is_503_then_recovers(
    fresh_fake_gcs: FakeGCS, server_factory: StartServer, test_bundle: Path, tmp_path: Path
) -> None:
    bucket = fresh_fake_gcs.create_bucket()
    fresh_fake_gcs.upload(bucket, OBJECT, test_bundle.read_bytes())
    fresh_fake_gcs.stop()
    server = server_factory(gcs_env(fresh_fake_gcs, bucket, tmp_path / "cache", MODEL_FETCH_TIMEOUT_S="2"))

    started = time.monotonic()
    status, body = server.post_image("/predict", JPEG)
    assert status == 503
    assert time.monotonic() - started < 20  # bounded by MODEL_FETCH_TIMEOUT_S, with slack for imports
    assert body["error"]["code"] == "model_unavailable"
    assert "StorageUnavailable" in body["error"]["message"]
    assert server.get_json("/health")[1]["status"] == "error"
    assert records(server, logger="model_fetch.gcs", message_prefix="transient error")  # it retried

    fresh_fake_gcs.start()  # same port, same data
    wait_for_retry(server)
    status, body = server.post_image("/predict", JPEG)
    assert status == 200, (body, server.log_tail())
    assert emulator_downloads(fresh_fake_gcs, bucket) == 1


def test_restarted_server_reuses_the_cached_download(
    fake_gcs: FakeGCS, server_factory: StartServer, test_bundle: Path, tmp_path: Path
) -> None:
    bucket = fake_gcs.create_bucket()
    fake_gcs.upload(bucket, OBJECT, test_bundle.read_bytes())
    env = gcs_env(fake_gcs, bucket, tmp_path / "cache")
    first = server_factory(env)
    assert first.post_image("/predict", JPEG)[0] == 200
    first.stop()
    second = server_factory(env)
    assert second.post_image("/predict", JPEG)[0] == 200
    assert emulator_downloads(fake_gcs, bucket) == 1
    (loaded,) = records(second, logger="dermal_fn.serving.holder", message_prefix="model loaded")
    assert loaded["downloaded"] is False


def test_a_replaced_object_leaves_one_copy_and_one_set_of_packed_weights(
    fake_gcs: FakeGCS, server_factory: StartServer, test_bundle: Path, small_bundle: Path, tmp_path: Path
) -> None:
    """On Cloud Functions the cache is in memory: the generation in use stays, older ones go once it loaded."""
    bucket = fake_gcs.create_bucket()
    fake_gcs.upload(bucket, OBJECT, test_bundle.read_bytes())
    cache = tmp_path / "cache"
    env = gcs_env(fake_gcs, bucket, cache)
    first = server_factory(env)
    assert first.post_image("/predict", JPEG)[0] == 200
    first.stop()

    def copies() -> list[str]:
        return sorted(
            p.name for p in cache.iterdir() if p.is_file() and ".g" in p.name and not p.name.startswith(".")
        )

    (old,) = copies()
    fake_gcs.upload(bucket, OBJECT, small_bundle.read_bytes())  # a new generation of the same object
    second = server_factory(env)
    status, body = second.post_image("/predict", JPEG)
    assert status == 200 and body["model"]["sha256"] == hashlib.sha256(small_bundle.read_bytes()).hexdigest()
    (new,) = copies()
    assert new != old
    assert len(list((cache / "xnnpack").glob("*.xnnpack"))) == 1  # the old model's packed weights went too
    assert records(second, logger="dermal_fn.serving.holder", message_prefix="removed 1 older cached")


def test_stop_kills_master_and_workers(server_factory: StartServer, test_bundle: Path) -> None:
    server = server_factory({"MODEL_URI": str(test_bundle)})
    pids = server.pids()
    assert len(pids) >= 2  # the gunicorn master and its worker
    rss = server.rss_mb()
    assert server.peak_rss_mb() >= rss > 0  # VmHWM read after VmRSS
    server.stop()
    assert all(not Path(f"/proc/{pid}").exists() or _zombie(pid) for pid in pids)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


@pytest.mark.parametrize(("path", "threads"), [("/health", None), ("/memory", "3")])
def test_model_loads_in_the_worker_not_the_master(
    server_factory: StartServer, test_bundle: Path, path: str, threads: str | None
) -> None:
    """Nothing is loaded at import: the master stays small, only the worker loads the model.

    LiteRT's threads follow the CPU quota (this machine's, the same for the server) unless
    LITERT_THREADS says otherwise.
    """
    env = {"MODEL_URI": str(test_bundle)} | ({"LITERT_THREADS": threads} if threads else {})
    server = server_factory(env, wait=path)
    assert server.post_image("/predict", JPEG)[0] == 200
    (loaded,) = records(server, logger="dermal_fn.serving.holder", message_prefix="model loaded")
    assert loaded["threads"] == (int(threads) if threads else memory.available_cpus())
    master = server.process.pid if server.process is not None else -1
    workers = [pid for pid in server.pids() if pid != master]
    assert workers
    assert not _maps_litert(master)
    assert any(_maps_litert(pid) for pid in workers)


def _maps_litert(pid: int) -> bool:
    """True when the process has LiteRT's native library mapped."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
    return "ai_edge_litert" in maps
