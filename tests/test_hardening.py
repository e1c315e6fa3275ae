"""Hostile requests against real functions-framework processes: no request and no model file breaks the server.

- a body on a cheap route is refused (413) and never read into memory;
- slow uploads get 408 and never take the threads /health needs;
- a damaged bundle is refused by its CRC; one that kills the worker is reported, not crash-looped;
- small uploads built to expand stay inside a real 512 MiB memory cgroup (skipped, saying why, where
  the machine has none);
- the worker writes no core dumps; a long path is not logged whole.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import hostile_fixtures as hf
from tests.http_fixtures import HOST, ServerProcess, read_response, send_until_answered
from tests.models import rewrite_bundle
from tests.waiting import wait_until

StartServer = Callable[..., ServerProcess]
JPEG = hf.jpeg(size=160, seed=4)
MIB = 2**20


# --- raw HTTP, for what urllib will not send -----------------------------------------------------------


def send_head(port: int, method: str, path: str, headers: dict[str, str]) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=10)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def health_answers(server: ServerProcess, *, within_s: float) -> bool:
    started = time.monotonic()
    try:
        status, _ = server.get_json("/health", timeout_s=within_s)
    except OSError:
        return False
    return status in (200, 503) and time.monotonic() - started < within_s


@pytest.fixture(scope="module")
def server(small_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Served as render.yaml serves it: 12 threads, the default queue; 2 s to send a body."""
    env = {"MODEL_URI": str(small_bundle), "THREADS": "12", "BODY_TIMEOUT_S": "2", "LITERT_THREADS": "1"}
    process = ServerProcess(env, log_path=tmp_path_factory.mktemp("hardening") / "server.log")
    process.start()
    try:
        process.wait_ready(path="/health")
        process.wait_loaded()
        yield process
    finally:
        process.stop()


# --- every route bounded ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [("GET", "/health"), ("GET", "/"), ("GET", "/openapi.json")])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_on_a_cheap_route_is_refused_and_never_read(
    server: ServerProcess, method: str, path: str, framing: str
) -> None:
    (worker,) = server.worker_pids()
    before = server.rss_mb()
    declared = (
        {"Content-Length": str(200 * MIB)}
        if framing == "content-length"
        else {"Transfer-Encoding": "chunked"}
    )
    sock = send_head(server.port, method, path, declared)
    with sock:
        block = b"\0" * MIB
        piece = block if framing == "content-length" else b"%x\r\n%s\r\n" % (len(block), block)
        # the server answers without reading; we stop sending when it does
        sent = send_until_answered(sock, [piece] * 16)
        status, headers, body = read_response(sock)
    assert status == 413, body[:300]
    error = json.loads(body)["error"]
    assert error["code"] == "payload_too_large" and error["message"].startswith("expected no body")
    assert error["request_id"] == headers["x-request-id"]
    assert server.rss_mb() - before < 16, f"sent {sent / MIB:.0f} MB; the worker grew"
    assert server.worker_pids() == [worker]
    assert health_answers(server, within_s=2)


def test_slow_uploads_get_408_and_never_take_the_threads_health_needs(server: ServerProcess) -> None:
    """12 clients dripping a byte every 0.4 s into /predict (THREADS=12, MAX_QUEUE=8): 408 or 503, never a stall."""
    results: list[tuple[int, float]] = []
    connected: list[socket.socket] = []
    lock = threading.Lock()

    def drip() -> None:
        started = time.monotonic()
        sock = send_head(
            server.port, "POST", "/predict", {"Content-Type": "image/jpeg", "Content-Length": "100000"}
        )
        with lock:
            connected.append(sock)
        with sock:
            try:
                for _ in range(40):  # 16 s of dripping at most: the deadline is 2 s
                    sock.sendall(b"\xff")
                    time.sleep(0.4)
            except OSError:
                pass  # refused or timed out: the answer is waiting
            status, _, _ = read_response(sock)
        with lock:
            results.append((status, time.monotonic() - started))

    threads = [threading.Thread(target=drip) for _ in range(12)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(connected) == 12, timeout_s=10, what="all twelve connected and dripping")
    assert all(health_answers(server, within_s=1.5) for _ in range(5))
    for thread in threads:
        thread.join(timeout=30)
    statuses = sorted(status for status, _ in results)
    assert len(statuses) == 12 and set(statuses) <= {408, 503}, statuses
    assert statuses.count(408) >= 1  # the admitted ones ran into the deadline
    assert max(seconds for status, seconds in results if status == 408) < 8
    assert server.post_image("/predict", JPEG)[0] == 200  # and the server serves on


def test_a_long_path_is_answered_and_logged_short(server: ServerProcess) -> None:
    path = "/" + "a" * 3000  # under gunicorn's 4094-byte request line, far over a log line's worth
    status, _, body = server.request("GET", path)
    assert status == 404
    assert "a path of 3001 characters" in json.loads(body)["error"]["message"]
    logged = wait_until(
        lambda: [r for r in server.logs() if r.get("message") == "request" and r.get("status") == 404],
        timeout_s=10,
        what="the 404's log line",
    )
    assert all(len(r["route"]) <= 200 for r in logged)


def test_the_worker_writes_no_core_dumps(server: ServerProcess) -> None:
    for pid in server.worker_pids():
        limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
        (core,) = [line for line in limits if line.startswith("Max core file size")]
        assert core.split()[4:6] == ["0", "0"], core


# --- bundles that must not load ---------------------------------------------------------------------------

# bytes of the committed tiny bundle's flatbuffer whose flipping makes LiteRT 2.3 segfault while loading
CRASHING_FLIPS = (1997, 307, 1660, 1128, 933, 202, 180, 671)


def damaged_bundle(source: Path, target: Path, *, keep_crc: bool) -> Path:
    """``source`` with the CRASHING_FLIPS bytes flipped; without its CRC (as an older bundle) unless ``keep_crc``."""

    def edit(manifest: dict[str, Any]) -> None:
        assert "backbone_crc32" in manifest, (
            "the committed bundles record their backbone's CRC (make test-models)"
        )
        if not keep_crc:
            manifest.pop("backbone_crc32")

    return rewrite_bundle(source, target, edit=edit, flip=CRASHING_FLIPS)


def test_a_damaged_backbone_is_refused_by_its_crc(
    server_factory: StartServer, test_bundle: Path, tmp_path: Path
) -> None:
    bundle = damaged_bundle(test_bundle, tmp_path / "damaged.dermal", keep_crc=True)
    env = {"MODEL_URI": str(bundle), "MODEL_CACHE_DIR": str(tmp_path / "cache"), "API_KEY": "k"}
    server = server_factory(env, wait="/memory")
    started = time.monotonic()
    status, body = server.post_image("/predict", JPEG, headers={"Authorization": "Bearer k"})
    assert status == 503 and time.monotonic() - started < 5
    assert "BundleError" in body["error"]["message"] and "CRC-32" in body["error"]["detail"]
    status, health = server.get_json("/health")
    assert (status, health["model_state"]) == (503, "error")
    assert len(server.worker_pids()) == 1


def test_workers_stopped_while_loading_are_no_evidence_against_the_model(
    server_factory: Callable[..., ServerProcess], small_bundle: Path, tmp_path: Path
) -> None:
    """What two graceful restarts (SIGHUP, a deploy's SIGTERM) or an OOM kill during a load leave behind:
    markers of dead loaders with no crash in them. The next worker loads the model."""
    import hashlib
    import subprocess
    import sys

    from dermal_fn.serving.crash_marker import CRASH_EVIDENCE

    cache = tmp_path / "cache"
    key = hashlib.sha256(small_bundle.read_bytes()).hexdigest()[:32]
    for _ in range(3):
        stopped = subprocess.Popen(
            [sys.executable, "-c", "import signal, sys; from pathlib import Path; "
             "from dermal_fn.serving.crash_marker import CrashMarker; "
             "m = CrashMarker(Path(sys.argv[1]), key=sys.argv[2]).__enter__(); signal.raise_signal(signal.SIGTERM)",
             str(cache / "loading"), key],
            cwd=hf.REPO,
        )  # fmt: skip
        assert stopped.wait(60) < 0
    (marker,) = (cache / "loading").glob(f"{key}.*.loading")  # each loader cleared the one before
    assert CRASH_EVIDENCE not in marker.read_text()
    server = server_factory({"MODEL_URI": str(small_bundle), "MODEL_CACHE_DIR": str(cache)}, wait="/memory")
    assert server.post_image("/predict", JPEG)[0] == 200, server.log_tail()
    assert server.get_json("/health")[1]["model_state"] == "loaded"
    assert list((cache / "loading").glob(f"{key}.*.loading")) == []  # the stale markers are gone


def test_a_bundle_that_kills_the_worker_is_reported_not_crash_looped(
    server_factory: StartServer, test_bundle: Path, tmp_path: Path
) -> None:
    bundle = damaged_bundle(test_bundle, tmp_path / "crashing.dermal", keep_crc=False)
    import subprocess
    import sys

    probe = subprocess.run(  # the oracle: this file really kills a process that loads it
        [sys.executable, "-c", "import sys; from dermal_fn.core.engine import _compiled_model; "
         "_compiled_model(sys.argv[1], num_threads=1, weight_cache=None)", str(bundle)],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert probe.returncode < 0, f"expected the flips to crash LiteRT, found exit {probe.returncode}"

    env = {"MODEL_URI": str(bundle), "MODEL_CACHE_DIR": str(tmp_path / "cache"), "MODEL_RETRY_S": "0.2"}
    server = server_factory(env, wait="/memory")
    workers: set[int] = set()
    health: dict[str, Any] = {}
    status = 0

    def refused() -> bool:
        nonlocal status, health
        workers.update(server.worker_pids())
        try:
            status, health = server.get_json("/health", timeout_s=5)
        except (OSError, http.client.HTTPException):  # the worker died under this request
            return False  # gunicorn starts another
        return health.get("model_state") == "error" and "crashed the worker" in health["error"]["message"]

    wait_until(
        refused,
        timeout_s=60,
        what="the crashed loads to be counted",
        interval_s=0.2,
        describe=server.log_tail,
    )
    assert health.get("model_state") == "error", server.log_tail()
    assert "crashed the worker 2 times" in health["error"]["message"]
    assert status == 503
    assert 2 <= len(workers) <= 4  # two crashed loads, then a worker that refuses: no loop
    pid = server.worker_pids()
    started = time.monotonic()
    status, body = server.post_image("/predict", JPEG)
    assert status == 503 and time.monotonic() - started < 2
    assert body["error"]["code"] == "model_unavailable"
    for _ in range(5):  # and it stays up, request after request
        assert server.get_json("/health")[1]["model_state"] == "error"
        assert server.post_image("/predict", JPEG)[0] == 503
    assert server.worker_pids() == pid


# --- inside a real memory cgroup ----------------------------------------------------------------------------


def test_expanding_uploads_inside_a_512_mib_cgroup(small_bundle: Path, tmp_path: Path) -> None:
    """Each row of the hardening table (docs/deploy.md) against the server in a real 512 MiB cgroup: JSON answers, 0 OOM kills."""
    from bench import cgroup

    try:
        group = cgroup.create(f"dermal-test-{time.time_ns()}", limit_bytes=512 * MIB)
    except cgroup.CgroupUnavailable as exc:
        pytest.skip(f"this machine gives no memory cgroup: {exc}")
    env = {"MODEL_URI": str(small_bundle), "THREADS": "12", "LITERT_THREADS": "1", "MAX_UPLOAD_MB": "10"}
    server = ServerProcess(env, log_path=tmp_path / "server.log", wrap=group.wrap)
    try:
        server.start()
        server.wait_ready(path="/health")
        (worker,) = server.worker_pids()
        answers = {}
        for name, data in hf.expanding_images().items():
            content_type = "image/tiff" if name.endswith("tiff") else f"image/{name.rsplit('_', 1)[1]}"
            status, body = server.post_image("/predict", data, content_type=content_type, timeout_s=60)
            answers[name] = (status, body.get("error", {}).get("code"))
        events = group.events()
        peak = server.peak_rss_mb()
        alive = server.worker_pids() == [worker]
    finally:
        server.stop()
        group.destroy()
    assert answers == {
        "grey16_png": (200, None),
        "rgba_png": (200, None),
        "float_tiff": (200, None),
        "cmyk_jpeg": (413, "image_too_large"),
        "rgb_jpeg": (413, "image_too_large"),
    }
    assert events.get("oom_kill", 0) == 0 and alive
    assert peak < 400, f"worker + master peak {peak:.0f} MB"


# --- framing and limits that gunicorn itself enforces -------------------------------------------------------


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param(b"zz\r\nabc\r\n0\r\n\r\n", id="bad-hex"),
        pytest.param(b"-5\r\nabc\r\n0\r\n\r\n", id="negative-size"),
        pytest.param(b"3\r\nabcXX0\r\n\r\n", id="missing-crlf"),
        pytest.param(b"3;a\x00b\r\nabc\r\n0\r\n\r\n", id="nul-in-extension"),
        pytest.param(b"3\r\nabc\r\n0\r\nX-A: \x00\r\n\r\n", id="nul-in-trailer"),
    ],
)
def test_malformed_chunked_framing_is_a_json_400(server: ServerProcess, chunks: bytes) -> None:
    head = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        sock.sendall(head + chunks)
        status, headers, body = read_response(sock)
    assert status == 400, body
    assert json.loads(body)["error"]["code"] == "invalid_request"
    assert headers["x-content-type-options"] == "nosniff"
    assert "Traceback" not in server.log_text()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(
            b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, id="request-line-over-4094"
        ),
        pytest.param(
            b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, id="header-without-colon"
        ),
        pytest.param(
            b"GET /health HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(150))
            + b"\r\n",
            431,
            id="over-100-header-fields",
        ),
        pytest.param(
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
            431,
            id="header-over-8190",
        ),
    ],
)
def test_the_servers_own_refusals_are_json_and_cheap(
    server: ServerProcess, request_bytes: bytes, status: int
) -> None:
    """gunicorn answers these before our code runs: bounded (functions-framework unbounds the line), in JSON."""
    before = server.cpu_seconds()
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        sock.sendall(request_bytes)
        answered, headers, body = read_response(sock)
    assert answered == status
    assert headers["content-type"] == "application/json" and headers["x-content-type-options"] == "nosniff"
    assert json.loads(body)["error"]["code"] == "invalid_request"
    assert server.cpu_seconds() - before < 1.0  # CPU time, not wall time: an unbounded 8 MiB line cost 7.2 s
    assert server.get_json("/health")[0] == 200  # and it serves on


# --- an in-memory file system counts against the container ---------------------------------------------------


def test_in_memory_files_count_against_the_limit_and_drop_the_heatmap(
    small_bundle: Path, tmp_path: Path
) -> None:
    """Cloud Functions' /tmp is in memory: files there are charged to the container like RSS. A process of
    the server's cgroup writes 340 MiB into /dev/shm (tmpfs); /memory's usage_mb says so while rss_mb does
    not move, and the heatmap is skipped for memory pressure (soft limit 300 MB), though RSS alone is far below it."""
    import subprocess

    from bench import cgroup

    try:
        group = cgroup.create(f"dermal-test-{time.time_ns()}", limit_bytes=512 * MIB)
    except cgroup.CgroupUnavailable as exc:
        pytest.skip(f"this machine gives no memory cgroup: {exc}")
    shm = Path("/dev/shm") / f"dermal-test-{time.time_ns()}"
    env = {"MODEL_URI": str(small_bundle), "LITERT_THREADS": "1", "MEMORY_SOFT_LIMIT_MB": "300"}
    server = ServerProcess(env, log_path=tmp_path / "server.log", wrap=group.wrap)
    try:
        server.start()
        server.wait_ready(path="/memory")
        assert server.post_image("/predict", JPEG)[1]["gradcam"]["status"] == "ok"
        before = server.get_json("/memory")[1]["memory"]
        argv, extra = group.wrap(["dd", "if=/dev/zero", f"of={shm}", "bs=1M", "count=340", "status=none"])
        subprocess.run(argv, env={**os.environ, **extra}, check=True, timeout=60)  # charged to the cgroup
        after = server.get_json("/memory")[1]["memory"]
        status, body = server.post_image("/predict", JPEG)
        events = group.events()
    finally:
        shm.unlink(missing_ok=True)
        server.stop()
        group.destroy()
    assert after["limit_mb"] == 512.0 and after["limit_source"] == "container"
    assert after["usage_mb"] - before["usage_mb"] > 300  # the in-memory file is in the charge
    assert after["rss_mb"] - before["rss_mb"] < 20  # and not in the process's RSS
    assert (
        status == 200
        and body["gradcam"]["status"] == "skipped"
        and body["gradcam"]["reason"] == "memory_pressure"
    )
    assert body["gradcam"]["usage_mb"] > body["gradcam"]["limit_mb"] > body["gradcam"]["rss_mb"]
    assert events.get("oom_kill", 0) == 0
