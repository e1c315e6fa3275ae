"""Every line the server writes is one JSON object: LiteRT's native lines are captured and re-emitted."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dermal_fn.core.engine import litert_runtime
from dermal_fn.core.native_log import native_output_as_records
from dermal_fn.serving.logs import JsonFormatter
from tests.http_fixtures import ServerProcess, jpeg_bytes
from tests.models import with_runtime_record

NATIVE = (
    "INFO: [environment.cc:36] Creating LiteRT environment with options\n"
    "WARNING: [compiler_plugin.cc:312] Failed to load plugin at: /x/libLiteRtCompilerPlugin_IntelOpenvino.so with error: ERROR: [a.cc:1]\n"
    "\u2514 Could not load shared library libopenvino.so.2631: cannot open shared object file\n"
    "WARNING: [npu_registry.cc:34] NPU accelerator could not be loaded and registered: kLiteRtStatusErrorNotFound.\n"
    "WARNING: [model.cc:9] something the operator should see\n"
    "ERROR: [model.cc:10] and something worse\n"
)


def test_native_lines_become_records_with_their_severity(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("dermal_fn.test_native")
    with caplog.at_level(logging.DEBUG, logger="dermal_fn.test_native"), native_output_as_records(logger):
        os.write(2, NATIVE.encode())  # as native code writes: straight to the file descriptor
    records = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "dermal_fn.test_native"]
    assert records == [
        ("DEBUG", "[environment.cc:36] Creating LiteRT environment with options"),
        (
            "DEBUG",  # a vendor plugin that is not installed: expected, not a warning
            "[compiler_plugin.cc:312] Failed to load plugin at: /x/libLiteRtCompilerPlugin_IntelOpenvino.so with "
            "error: ERROR: [a.cc:1] Could not load shared library libopenvino.so.2631: cannot open shared object file",
        ),
        (
            "DEBUG",
            "[npu_registry.cc:34] NPU accelerator could not be loaded and registered: kLiteRtStatusErrorNotFound.",
        ),
        ("WARNING", "[model.cc:9] something the operator should see"),
        ("ERROR", "[model.cc:10] and something worse"),
    ]
    assert all(getattr(r, "json_fields", {}).get("source") == "litert" for r in caplog.records)


def test_nothing_is_lost_when_nothing_is_written(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("dermal_fn.test_native")
    with caplog.at_level(logging.DEBUG, logger="dermal_fn.test_native"), native_output_as_records(logger):
        pass
    assert [r for r in caplog.records if r.name == "dermal_fn.test_native"] == []
    os.write(2, b"")  # fd 2 is back


def test_captures_in_two_threads_take_turns_and_fd_2_comes_back(caplog: pytest.LogCaptureFixture) -> None:
    """A load in one thread while another engine closes in another: both keep their lines, fd 2 is restored."""
    logger = logging.getLogger("dermal_fn.test_native")
    before = os.fstat(2)
    second_started = threading.Event()

    def second() -> None:
        second_started.set()
        with native_output_as_records(logger):
            os.write(2, b"INFO: [b.cc:1] from the second thread\n")

    with caplog.at_level(logging.DEBUG, logger="dermal_fn.test_native"):
        with native_output_as_records(logger):
            thread = threading.Thread(target=second)
            thread.start()
            second_started.wait(5)
            time.sleep(0.2)  # the second capture would begin here, inside the first, if nothing stopped it
            os.write(2, b"INFO: [a.cc:1] from the first thread\n")
        thread.join(10)
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    messages = [r.getMessage() for r in caplog.records if r.name == "dermal_fn.test_native"]
    assert messages == ["[a.cc:1] from the first thread", "[b.cc:1] from the second thread"]


COMPARE = (sys.executable, "-m", "dermal_fn", "compare")


@pytest.mark.parametrize("other", ["tiny", "not a model"])
def test_the_command_line_writes_no_native_line(tiny_model: Any, tmp_path: Path, other: str) -> None:
    """``python -m dermal_fn compare``: LiteRT's lines at load, at close and at exit are records, not console text."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg_bytes(seed=1))
    other_path = tiny_model.bundle_path
    if other != "tiny":
        other_path = tmp_path / "broken.dermal"
        other_path.write_text(other, encoding="utf-8")
    done = subprocess.run(
        [*COMPARE, str(tiny_model.bundle_path), str(other_path), "--images", str(images)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == (0 if other == "tiny" else 2), done.stderr[-2000:]
    native = [line for line in done.stderr.splitlines() if re.match(r"^(INFO|WARNING|ERROR): \[", line)]
    assert native == [], done.stderr[-2000:]
    if other != "tiny":
        assert done.stderr.startswith("error: expected a dermal-fn bundle"), done.stderr[-2000:]


def test_formatter_writes_one_json_object_per_record() -> None:
    record = logging.LogRecord("dermal_fn.x", logging.WARNING, __file__, 1, "line one\nline two", None, None)
    line = JsonFormatter().format(record)
    assert "\n" not in line and json.loads(line)["severity"] == "WARNING"


@pytest.mark.parametrize("load_check", ["zero-image inference", "exporter", "earlier load"])
def test_a_real_server_writes_only_json_lines(
    server_factory: Callable[..., ServerProcess], test_bundle: Path, tmp_path: Path, load_check: str
) -> None:
    """On each way a bundle can load: LiteRT's lines at the load, the first request and exit are JSON."""
    bundle = test_bundle
    if load_check == "exporter":  # the exporter verified these bytes on this runtime
        bundle = with_runtime_record(test_bundle, tmp_path / "verified.dermal", runtime=litert_runtime())
    env = {"MODEL_URI": str(bundle), "MODEL_CACHE_DIR": str(tmp_path / "cache")}
    if load_check == "earlier load":  # the same bytes loaded in this cache before: a worker restart
        first = server_factory(env, wait="/health")
        assert first.post_image("/predict", jpeg_bytes())[0] == 200
        first.stop()
    server = server_factory(env, wait="/health")
    assert server.post_image("/predict", jpeg_bytes())[0] == 200
    assert server.get_json("/health")[1]["model_state"] == "loaded"
    server.stop()
    lines = [line for line in server.log_text().splitlines() if line.strip()]
    assert lines and all(isinstance(json.loads(line), dict) for line in lines), [
        line for line in lines if not line.startswith("{")
    ][:5]
    assert all("severity" in json.loads(line) for line in lines)
    # a healthy start and a good request: nothing that looks like a problem to whoever reads the log
    alarming = [json.loads(line) for line in lines if json.loads(line)["severity"] not in ("DEBUG", "INFO")]
    assert alarming == [], alarming
    (loaded,) = [json.loads(line) for line in lines if json.loads(line).get("message") == "model loaded"]
    assert loaded["load_check"] == load_check
