"""``python -m dermal_fn.serving.warm``: the deploy-time load that render.yaml's build runs.

A build warms a cache folder; the platform copies the build into the container (new inodes, new
times); a cold start there must find what the build left: no download, no check inference, no second
weight cache. Real processes: the warm command, fake-gcs-server and a functions-framework server.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.gcs_emulator import FakeGCS
from tests.http_fixtures import REPO_ROOT, SCRUBBED, jpeg_bytes
from tests.test_function_process import OBJECT, StartServer, emulator_downloads, gcs_env, records


def warm(env: dict[str, str]) -> tuple[int, list[dict[str, Any]]]:
    """Run the warm command with ``env`` (and none of this process's settings); its records."""
    base = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    done = subprocess.run(
        [sys.executable, "-m", "dermal_fn.serving.warm"],
        cwd=REPO_ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert all(line.startswith("{") for line in lines), lines  # JSON only, LiteRT's lines included
    return done.returncode, [json.loads(line) for line in lines]


def test_a_warmed_build_cold_starts_without_download_check_or_weight_packing(
    fake_gcs: FakeGCS, server_factory: StartServer, test_bundle: Path, tmp_path: Path
) -> None:
    bucket = fake_gcs.create_bucket()
    fake_gcs.upload(bucket, OBJECT, test_bundle.read_bytes())
    build, deployed = tmp_path / "build" / ".model-cache", tmp_path / "container" / ".model-cache"

    code, logs = warm(gcs_env(fake_gcs, bucket, build))
    assert code == 0, logs
    assert logs[-1]["message"] == "model warmed"
    assert logs[-1]["weight_cache"] is not None
    assert emulator_downloads(fake_gcs, bucket) == 1
    assert [r["severity"] for r in logs if r["severity"] not in ("DEBUG", "INFO")] == []

    shutil.copytree(build, deployed)  # what a deploy does to the build's files: new inodes and ctimes
    server = server_factory(gcs_env(fake_gcs, bucket, deployed), wait="/memory")
    status, body = server.post_image("/predict", jpeg_bytes())
    assert status == 200, server.log_tail()
    (loaded,) = records(server, logger="dermal_fn.serving.holder", message_prefix="model loaded")
    assert loaded["downloaded"] is False  # the generation was checked, the bytes hashed again, not fetched
    assert loaded["load_check"] == "earlier load"  # no CRC-32 read, no check inference
    assert emulator_downloads(fake_gcs, bucket) == 1
    assert sorted(p.name for p in (deployed / "xnnpack").iterdir()) == [logs[-1]["weight_cache"]]
    assert body["model"]["sha256"] == logs[-1]["sha256"]


def test_a_pinned_warmed_build_starts_with_storage_unreachable(
    fresh_fake_gcs: FakeGCS, server_factory: StartServer, test_bundle: Path, tmp_path: Path
) -> None:
    """With MODEL_SHA256, a deployed build's cold start asks storage nothing: the cached bytes are the pin."""
    bucket = fresh_fake_gcs.create_bucket()
    fresh_fake_gcs.upload(bucket, OBJECT, test_bundle.read_bytes())
    pin = hashlib.sha256(test_bundle.read_bytes()).hexdigest()
    build, deployed = tmp_path / "build" / ".model-cache", tmp_path / "container" / ".model-cache"
    code, logs = warm(gcs_env(fresh_fake_gcs, bucket, build, MODEL_SHA256=pin))
    assert code == 0, logs

    fresh_fake_gcs.stop()
    shutil.copytree(build, deployed)
    server = server_factory(gcs_env(fresh_fake_gcs, bucket, deployed, MODEL_SHA256=pin), wait="/memory")
    status, body = server.post_image("/predict", jpeg_bytes())
    assert status == 200, server.log_tail()
    assert body["model"]["sha256"] == pin
    (loaded,) = records(server, logger="dermal_fn.serving.holder", message_prefix="model loaded")
    assert loaded["downloaded"] is False and loaded["load_check"] == "earlier load"
    assert records(server, logger="model_fetch.gcs_cache", message_prefix="serving gs://")


def test_a_model_that_cannot_load_fails_the_build(tmp_path: Path, test_bundle: Path) -> None:
    broken = tmp_path / "broken.dermal"
    data = bytearray(test_bundle.read_bytes())
    broken.write_bytes(bytes(data[: len(data) // 2]))  # a truncated upload
    cache = tmp_path / "cache"

    code, logs = warm({"MODEL_URI": str(broken), "MODEL_CACHE_DIR": str(cache)})
    assert code == 1
    assert logs[-1]["message"] == "model not warmed" and logs[-1]["severity"] == "ERROR"
    assert "bundle" in logs[-1]["error"].lower()
    assert not list(cache.glob("verified/*.ok"))  # nothing claims these bytes ran


def test_a_refused_configuration_fails_the_build(tmp_path: Path) -> None:
    code, logs = warm({"MAX_UPLOAD_MB": "ten", "MODEL_CACHE_DIR": str(tmp_path / "cache")})
    assert code == 2
    assert logs[-1]["message"] == "model not warmed" and "MAX_UPLOAD_MB" in logs[-1]["error"]
    code, logs = warm(
        {"RENDER": "true", "MODEL_CACHE_DIR": str(tmp_path / "cache")}
    )  # no MODEL_URI on Render
    assert code == 1 and "MODEL_URI" in logs[-1]["error"]
