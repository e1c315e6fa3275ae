"""Settings from the environment, and the cgroup readers against folder trees laid out like /sys/fs/cgroup."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from dermal_fn.errors import ConfigError, ModelUnavailable
from dermal_fn.models import DEMO_BUNDLE
from dermal_fn.serving import memory
from dermal_fn.serving.config import Settings
from dermal_fn.serving.holder import ModelHolder
from dermal_fn.serving.service import Service, get_service, reset_service
from tests.waiting import FakeClock

REPO = Path(__file__).resolve().parents[1]

MIB = 1024 * 1024


def tree(root: Path, files: dict[str, str]) -> Path:
    """Write ``{"relative/path": "content"}`` under root; return root."""
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content + "\n")
    return root


# --- cgroup memory limit ------------------------------------------------------------------------------

V2_PROC = "0::/\n"
V1_PROC = "12:memory:/docker/abc\n11:cpu,cpuacct:/docker/abc\n0::/\n"


@pytest.mark.parametrize(
    ("proc", "files", "expected_mb"),
    [
        # cgroup v2 inside its own namespace: the container's cgroup is the mount root
        (V2_PROC, {"memory.max": str(512 * MIB)}, 512.0),
        (V2_PROC, {"memory.max": "max"}, None),
        # v2 without a namespace: the process's cgroup path, the limit set on an ancestor
        ("0::/system.slice/app.service\n", {"system.slice/memory.max": str(256 * MIB)}, 256.0),
        # the smallest limit along the path wins
        (
            "0::/a/b\n",
            {"a/memory.max": str(1024 * MIB), "a/b/memory.max": str(300 * MIB), "memory.max": "max"},
            300.0,
        ),
        # cgroup v1, the container's cgroup bind-mounted at /sys/fs/cgroup/memory
        (V1_PROC, {"memory/memory.limit_in_bytes": str(2048 * MIB)}, 2048.0),
        # v1 with the full hierarchy visible
        (V1_PROC, {"memory/docker/abc/memory.limit_in_bytes": str(768 * MIB)}, 768.0),
        # v1 "no limit": a huge page-rounded number
        (V1_PROC, {"memory/memory.limit_in_bytes": "9223372036854771712"}, None),
        # hybrid: v1 controllers plus the unified hierarchy
        ("4:memory:/\n0::/\n", {"unified/memory.max": str(128 * MIB)}, 128.0),
        # garbage and nothing at all
        (V2_PROC, {"memory.max": "lots"}, None),
        (V2_PROC, {}, None),
        ("", {}, None),
    ],
)
def test_cgroup_memory_limit(
    tmp_path: Path, proc: str, files: dict[str, str], expected_mb: float | None
) -> None:
    root = tree(tmp_path / "cgroup", files)
    proc_cgroup = tmp_path / "proc-self-cgroup"
    proc_cgroup.write_text(proc)
    assert memory.cgroup_memory_limit_mb(root=root, proc_cgroup=proc_cgroup) == expected_mb


def test_cgroup_dirs_never_leave_the_root(tmp_path: Path) -> None:
    proc_cgroup = tmp_path / "proc"
    proc_cgroup.write_text("0::/../../etc\n")
    root = tmp_path / "cgroup"
    for folder in memory.cgroup_dirs("memory", root=root, proc_cgroup=proc_cgroup):
        assert folder.is_relative_to(root)


# --- cgroup CPU quota and threads ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("proc", "files", "expected"),
    [
        (V2_PROC, {"cpu.max": "50000 100000"}, 0.5),
        (V2_PROC, {"cpu.max": "200000 100000"}, 2.0),
        (V2_PROC, {"cpu.max": "max 100000"}, None),
        ("0::/a/b\n", {"a/cpu.max": "100000 100000", "a/b/cpu.max": "max 100000"}, 1.0),
        (V1_PROC, {"cpu,cpuacct/cpu.cfs_quota_us": "150000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 1.5),
        (V1_PROC, {"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, None),
        ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "33333", "cpu/cpu.cfs_period_us": "100000"}, 0.33333),
        (V2_PROC, {"cpu.max": "garbage"}, None),
        (V2_PROC, {}, None),
    ],
)
def test_cgroup_cpu_quota(tmp_path: Path, proc: str, files: dict[str, str], expected: float | None) -> None:
    root = tree(tmp_path / "cgroup", files)
    proc_cgroup = tmp_path / "proc-self-cgroup"
    proc_cgroup.write_text(proc)
    quota = memory.cgroup_cpu_quota(root=root, proc_cgroup=proc_cgroup)
    assert quota == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize(
    ("quota", "affinity", "expected"),
    [
        (0.333, 8, 1),
        (0.5, 2, 1),
        (1.0, 4, 1),
        (1.5, 4, 2),
        (2.0, 4, 2),
        (8.0, 2, 2),
        (None, 3, 3),
        (None, 0, 1),
    ],
)
def test_available_cpus(quota: float | None, affinity: int, expected: int) -> None:
    assert memory.available_cpus(quota=quota, affinity=affinity) == expected


def test_litert_threads_default_to_the_cpu_quota_and_can_be_overridden() -> None:
    assert Settings.from_env({}).litert_threads == memory.available_cpus()
    assert Settings.from_env({"LITERT_THREADS": "3"}).litert_threads == 3


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "two"])
def test_bad_litert_threads(value: str) -> None:
    with pytest.raises(ConfigError, match="LITERT_THREADS"):
        Settings.from_env({"LITERT_THREADS": value})


# --- process memory -----------------------------------------------------------------------------------


def test_rss_and_peak_are_plausible() -> None:
    rss = memory.rss_mb()
    peak = memory.peak_rss_mb()
    assert peak is not None
    assert 1.0 < rss <= peak + 1.0
    assert rss < memory.host_memory_mb()


def test_peak_rss_parses_vmhwm(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  999 kB\nVmHWM:\t  204800 kB\nVmRSS:\t 1 kB\n")
    assert memory.peak_rss_mb(status) == 200.0
    status.write_text("Name:\tpython\n")
    assert memory.peak_rss_mb(status) is None
    assert memory.peak_rss_mb(tmp_path / "missing") is None


# --- Settings -----------------------------------------------------------------------------------------


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.model_uri == str(DEMO_BUNDLE)
    assert settings.model_sha256 is None
    assert settings.enable_gradcam is True
    assert settings.max_upload_mb == 10.0
    assert settings.max_upload_bytes == 10 * MIB
    assert settings.api_key is None
    assert settings.memory_limit_mb == memory.cgroup_memory_limit_mb()


def test_memory_limit_and_soft_limit() -> None:
    settings = Settings.from_env({"MEMORY_LIMIT_MB": "512"})
    assert settings.memory_limit_mb == 512.0
    assert settings.memory_soft_limit_mb == pytest.approx(460.8)
    settings = Settings.from_env({"MEMORY_LIMIT_MB": "512", "MEMORY_SOFT_LIMIT_MB": "300"})
    assert settings.memory_soft_limit_mb == 300.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MODEL_SHA256", "abc"),
        ("MODEL_SHA256", "g" * 64),
        ("ENABLE_GRADCAM", "maybe"),
        ("MEMORY_LIMIT_MB", "0"),
        ("MEMORY_SOFT_LIMIT_MB", "-5"),
        ("MAX_UPLOAD_MB", "ten"),
        ("MODEL_FETCH_TIMEOUT_S", "0"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


@pytest.mark.parametrize(
    ("value", "expected"), [("true", True), ("FALSE", False), ("0", False), ("on", True)]
)
def test_enable_gradcam_values(value: str, expected: bool) -> None:
    assert Settings.from_env({"ENABLE_GRADCAM": value}).enable_gradcam is expected


def test_sha256_pin_is_lowercased() -> None:
    assert Settings.from_env({"MODEL_SHA256": "AB" * 32}).model_sha256 == "ab" * 32


def test_blank_values_mean_unset() -> None:
    settings = Settings.from_env({"MODEL_URI": "  ", "API_KEY": "", "MODEL_SHA256": " "})
    assert settings.model_uri == str(DEMO_BUNDLE)
    assert settings.api_key is None
    assert settings.model_sha256 is None


# --- the singleton ------------------------------------------------------------------------------------


def test_get_service_is_one_per_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODEL_URI", str(tmp_path / "none.dermal"))
    reset_service()
    try:
        first = get_service()
        assert get_service() is first
        assert first.settings.model_uri == str(tmp_path / "none.dermal")
        first.pid = -1  # as if made in a parent before fork: the child makes its own
        assert get_service() is not first
    finally:
        reset_service()


def test_concurrent_loads_share_one_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers waiting for a failing load get its answer; they do not each try again."""
    from tests.http_fixtures import free_port

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # nothing listens
    holder = ModelHolder(
        Settings.from_env({"MODEL_URI": "gs://bucket/model.dermal", "MODEL_FETCH_TIMEOUT_S": "1"})
    )
    errors: list[str] = []
    barrier = threading.Barrier(6)

    def call() -> None:
        barrier.wait()
        try:
            holder.get()
        except ModelUnavailable as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(errors) == 6
    assert all("StorageUnavailable" in e for e in errors)
    assert holder.state == "error"
    assert holder.attempts == 1  # the five others waited for the first attempt's answer
    assert holder.warm() is False  # a polling health check does not retry at once
    assert 4 < holder.retry_in() <= 5  # the first backoff step
    assert all("127.0.0.1" not in e for e in errors)  # the endpoint is a detail, not a public message


def test_service_memory_status_without_a_container_limit() -> None:
    service = Service(Settings(memory_limit_mb=None, memory_soft_limit_mb=None))
    status = service.memory_status()
    assert status["limit_source"] == "host"
    assert status["limit_mb"] == pytest.approx(memory.host_memory_mb(), abs=0.1)
    assert status["soft_limit_mb"] is None


# --- the field table, the README, the demo on a platform ----------------------------------------------


def test_every_setting_is_one_row_of_the_readme_table() -> None:
    from dermal_fn.serving.config import markdown_table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme, "README's configuration table is config.markdown_table(): paste it"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"RENDER": "true"}, "render"),
        ({"K_SERVICE": "dermal"}, "cloud-run"),
        ({"RENDER": " "}, None),
    ],
)
def test_platform_is_read_from_what_the_platform_sets(env: dict[str, str], expected: str | None) -> None:
    assert Settings.from_env(env).platform == expected


@pytest.mark.parametrize(
    ("env", "refused"),
    [
        ({}, False),  # make serve: the demo, on purpose
        ({"RENDER": "true"}, True),  # a Render deploy with MODEL_URI left empty
        ({"K_SERVICE": "dermal"}, True),
        ({"RENDER": "true", "ALLOW_DEMO_MODEL": "true"}, False),
        ({"RENDER": "true", "MODEL_URI": "gs://bucket/model.dermal"}, False),
    ],
)
def test_the_demo_is_served_on_a_platform_only_on_purpose(env: dict[str, str], refused: bool) -> None:
    assert Settings.from_env(env).demo_refused is refused


def test_a_refused_demo_is_model_unavailable_with_the_fix_in_the_message() -> None:
    holder = ModelHolder(Settings.from_env({"RENDER": "true"}))
    with pytest.raises(ModelUnavailable, match="ConfigError") as refused:
        holder.get()
    assert refused.value.detail is not None and "ALLOW_DEMO_MODEL=true" in refused.value.detail
    assert holder.state == "error"
    assert ModelHolder(Settings.from_env({"RENDER": "true", "ALLOW_DEMO_MODEL": "1"})).get().info.labels


def test_requests_after_a_failed_load_do_not_fetch_again_until_the_backoff_passes(tmp_path: Path) -> None:
    missing = tmp_path / "model.dermal"
    clock = FakeClock()
    holder = ModelHolder(Settings(model_uri=str(missing), model_retry_s=0.3), clock=clock)
    for _ in range(6):
        with pytest.raises(ModelUnavailable) as refused:
            holder.get()
        assert refused.value.retry_after_s == 1
    assert holder.attempts == 1  # six requests, one attempt (a fetch each would hammer storage)
    clock.advance(0.29)
    with pytest.raises(ModelUnavailable):
        holder.get()
    assert holder.attempts == 1  # still inside the backoff
    clock.advance(0.02)
    with pytest.raises(ModelUnavailable):
        holder.get()
    assert holder.attempts == 2 and holder.retry_in() == pytest.approx(0.6)  # the backoff doubled


def test_crash_markers_count_crashed_loaders_only(tmp_path: Path) -> None:
    import subprocess
    import sys

    from dermal_fn.errors import ModelCrashed
    from dermal_fn.serving.crash_marker import CrashMarker

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        (tmp_path / f"abc.{live.pid}.loading").write_text("")  # another server loading it right now
        with CrashMarker(tmp_path, key="abc") as marker:  # not a crash: it loads
            assert marker.crashed == [] and marker.path is not None and marker.path.exists()
        assert marker.path is not None and not marker.path.exists()
        for n in (1, 2, 3):  # stopped gracefully (SIGTERM, SIGHUP) or SIGKILLed while loading: no evidence
            (tmp_path / f"abc.{dead_pid + n * 100_000}.loading").write_text(f"{dead_pid} oom_kills=None\n")
        with CrashMarker(tmp_path, key="abc") as marker:
            assert marker.crashed == []
        assert sorted(p.name for p in tmp_path.glob("abc.*.loading")) == [f"abc.{live.pid}.loading"]
        for n in (1, 2):  # faulthandler wrote into the marker as a crash signal killed the loader
            (tmp_path / f"abc.{dead_pid + n * 100_000}.loading").write_text(
                "1 oom_kills=None\nFatal Python error: Segmentation fault\n"
            )
        with pytest.raises(ModelCrashed, match="crashed the worker 2 times"):
            CrashMarker(tmp_path, key="abc").__enter__()
        assert len(list(tmp_path.glob("abc.*.loading"))) == 3  # the verdict stays
        with CrashMarker(tmp_path, key="other"):  # another model is not affected
            pass
    finally:
        live.kill()
        live.communicate()


CRASHING_LOAD = r"""
import ctypes, sys
from pathlib import Path
from dermal_fn.serving.crash_marker import CrashMarker
with CrashMarker(Path(sys.argv[1]), key="model"):
    if sys.argv[2] == "segfault":
        ctypes.string_at(0)  # what a corrupt flatbuffer does to the runtime
    else:
        import os, signal
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))
"""


@pytest.mark.parametrize(("how", "counted"), [("segfault", True), ("SIGTERM", False), ("SIGKILL", False)])
def test_only_a_crash_signal_leaves_evidence(tmp_path: Path, how: str, counted: bool) -> None:
    from dermal_fn.serving.crash_marker import CRASH_EVIDENCE

    died = subprocess.run(
        [sys.executable, "-c", CRASHING_LOAD, str(tmp_path), how], cwd=REPO, capture_output=True, timeout=60
    )
    assert died.returncode < 0  # killed by the signal
    (marker,) = tmp_path.glob("model.*.loading")
    assert (CRASH_EVIDENCE in marker.read_text()) is counted


def test_an_unwritable_cache_degrades_to_serving_without_it(
    tmp_path: Path, test_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "blocked"  # a file where the folder should be (ENOTDIR: as read-only for us)
    blocked.write_text("not a folder")
    holder = ModelHolder(Settings(model_uri=str(test_bundle), model_cache_dir=str(blocked / "cache")))
    assert holder.get().info.labels
    assert str(blocked / "cache") in caplog.text and "serving without its optional files" in caplog.text
    assert caplog.text.count("cannot be used") == 1  # said once


# --- the allocator ---------------------------------------------------------------------------------

ALLOCATOR_PROBE = r"""
import ctypes, json, os, sys, tempfile, threading
from dermal_fn.serving import memory

done = memory.tune_allocator(environ=json.loads(sys.argv[2])) if sys.argv[1] == "tuned" else {}
libc = ctypes.CDLL(None)
names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in names]
libc.mallinfo2.restype = Mallinfo2
first = bytearray(4 << 20)  # mmapped; once freed, glibc's own threshold rises to its size
del first
before = libc.mallinfo2().hblks
second = bytearray(2 << 20)  # an mmapped chunk of its own only under a fixed threshold below it
mapped = libc.mallinfo2().hblks - before
blocks = []
def allocate():
    blocks.append(bytearray(100_000))
threads = [threading.Thread(target=allocate) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
libc.fclose.argtypes = (ctypes.c_void_p,)
path = os.path.join(tempfile.mkdtemp(), "info.xml")
handle = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, handle)
libc.fclose(handle)
heaps = open(path).read().count("<heap nr=")
print(json.dumps({"done": done, "mapped": mapped, "heaps": heaps}))
"""


def _probe(mode: str, environ: dict[str, str] | None = None) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", ALLOCATOR_PROBE, mode, json.dumps(environ or {})],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(not memory.glibc(), reason="mallopt is glibc's")
def test_tuned_allocator_maps_large_buffers_and_keeps_one_arena() -> None:
    default, tuned = _probe("default"), _probe("tuned")
    assert default["mapped"] == 0 and default["heaps"] > 1  # glibc's own behaviour, the oracle
    assert tuned["done"] == {"MALLOC_ARENA_MAX": 1, "MALLOC_MMAP_THRESHOLD_": memory.MIB}
    assert tuned["mapped"] == 1 and tuned["heaps"] == 1


@pytest.mark.skipif(not memory.glibc(), reason="mallopt is glibc's")
def test_an_operators_glibc_variables_win() -> None:
    tuned = _probe("tuned", {"MALLOC_ARENA_MAX": "4", "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert tuned["done"] == {}
    assert tuned["heaps"] > 1 and tuned["mapped"] == 0


def test_the_service_tunes_its_process() -> None:
    service = Service(Settings())
    if memory.glibc():
        assert platform.libc_ver()[0] == "glibc"  # the slow way agrees
        assert set(service.allocator) <= set(memory.GLIBC_TUNABLES)
    else:
        assert service.allocator == {}


def test_model_load_timeout_abandons_a_load_and_closes_what_it_finishes(test_bundle: Path) -> None:
    """A load past MODEL_LOAD_TIMEOUT_S is a 503 at the bound; the native load cannot be stopped, so when it
    ends its engine is closed, and no second load starts while it runs."""
    from dermal_fn.errors import LoadTimedOut
    from dermal_fn.serving.engines import load_engine

    release = threading.Event()
    opened: list[Any] = []
    closed: list[Any] = []

    def slow_open(*args: Any, **kwargs: Any) -> Any:
        release.wait(60)  # a load held up until the test lets it go
        engine = load_engine(*args, **kwargs)
        close = engine.close

        def counted_close() -> None:
            closed.append(engine)
            close()

        engine.close = counted_close  # type: ignore[method-assign]
        opened.append(engine)
        return engine

    clock = FakeClock()
    settings = Settings(model_uri=str(test_bundle), model_load_timeout_s=0.2, model_retry_s=1.0)
    holder = ModelHolder(settings, clock=clock, open_engine=slow_open)
    with pytest.raises(ModelUnavailable, match="LoadTimedOut") as refused:
        holder.get()
    assert isinstance(refused.value.__cause__, LoadTimedOut)
    assert holder.state == "error" and "MODEL_LOAD_TIMEOUT_S=0.2" in str(holder.error)
    clock.advance(2.0)  # the backoff is over, but the abandoned load still runs: no second one
    with pytest.raises(ModelUnavailable, match="still finishing"):
        holder.get()
    assert holder.attempts == 1
    release.set()
    abandoned = holder._abandoned
    assert abandoned is not None
    abandoned.join(60)
    assert len(opened) == 1 and closed == opened  # finished, then closed: nothing of it stays
    ok = ModelHolder(Settings(model_uri=str(test_bundle), model_load_timeout_s=30), open_engine=load_engine)
    assert ok.get().info.labels  # within the bound: loaded as before
