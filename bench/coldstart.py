"""Cold start and memory of the real server: process start → first 200 on POST /predict, idle and peak RSS.

    .venv/bin/python -m bench.coldstart [--model BUNDLE] [--runs 3] [--json OUT.json] [--restart] [--warmed] [--pin] [--render-free]

For each source (``local``: MODEL_URI is the file; ``gcs``: MODEL_URI is ``gs://`` on a
fake-gcs-server on 127.0.0.1) and each run (as in a new container: an empty MODEL_CACHE_DIR and TMPDIR,
so every ``gs://`` run downloads and every run builds LiteRT's XNNPACK weight cache) it
starts ``functions-framework --target=dermal --source=main.py --port=N`` (tests/http_fixtures.py)
with render.yaml's environment,
polls ``GET /memory`` until the server answers (RSS then: the idle server, no model), then
``POST /predict`` until the first 200 (cold start = spawn → that 200), sends a burst of 8 concurrent
requests with a 1600x1200 photo, and reads RSS and VmHWM summed over the server's processes
(gunicorn master + worker) from /proc. Prints the medians over ``--runs``; the kinds of start
(new, ``--restart``, ``--warmed``) take turns, round by round, so that they are compared at the same moments.

``--render-free`` adds the same start inside a real cgroup of 512 MiB and 0.1 CPU (Render's free
plan): wall and CPU-seconds to the first 200, and the next requests' time there.

``--warmed`` adds new containers of a warmed build, as render.yaml deploys one: the warm command
(``python -m dermal_fn.serving.warm``) loads the model once into a build folder; each run starts from
a fresh copy of that folder, model file and cache (a deploy copies the build: new inodes and times).

The model defaults to the bundled demo model, else a tiny seeded one built on the spot.

The idle RSS is a regression guard: each source's median is compared with the committed figure in
``bench/baseline.json`` (plus its tolerance) and the report says ``ok`` or ``regressed``; with
``--guard`` a regression is exit status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from bench import results
from bench.server import render_env
from tests.http_fixtures import ServerProcess, jpeg_bytes

BASELINE = Path(__file__).resolve().parent / "baseline.json"
RENDER_FREE_CPUS = 0.1  # Render's free plan
DEMO = Path(__file__).resolve().parent.parent / "dermal_fn" / "models" / "synthetic_demo.dermal"
SMALL_PHOTO = jpeg_bytes(width=640, height=480, seed=1)
LARGE_PHOTO = jpeg_bytes(width=1600, height=1200, seed=2)


def default_model(workdir: Path) -> Path:
    """The demo bundle if present, else the tests' committed tiny bundle."""
    if DEMO.is_file():
        return DEMO
    from tests.models import TINY, committed

    return committed(TINY).bundle_path


PIN = False  # --pin: every start also gets MODEL_SHA256, as docs/deploy.md recommends


def model_env(model: Path, source: str, gcs: Any) -> dict[str, str]:
    """MODEL_URI (and the emulator) for ``source``: the file itself, or a new bucket holding it;
    MODEL_SHA256 too with ``--pin``."""
    pin = {"MODEL_SHA256": hashlib.sha256(model.read_bytes()).hexdigest()} if PIN else {}
    if source == "gcs":
        bucket = gcs.create_bucket()
        gcs.upload(bucket, "models/model.dermal", model.read_bytes())
        return {"MODEL_URI": f"gs://{bucket}/models/model.dermal", "STORAGE_EMULATOR_HOST": gcs.url} | pin
    return {"MODEL_URI": str(model)} | pin


def one_run(
    model: Path,
    source: str,
    workdir: Path,
    gcs: Any,
    *,
    cache: str | None = None,
    uri: dict[str, str] | None = None,
) -> dict[str, float]:
    """Start a server, time its cold start (wall and CPU), measure its memory, stop it.

    ``cache``: a model cache folder kept from an earlier run (a worker restart in the same
    container) or copied from a warmed build; None is a new container: empty model cache, empty
    temp dir. ``uri``: the model's variables (default: :func:`model_env`).
    """
    env = server_env(
        MODEL_CACHE_DIR=cache or tempfile.mkdtemp(dir=workdir, prefix="cache-"),
        TMPDIR=tempfile.mkdtemp(dir=workdir, prefix="tmp-"),
    )
    env |= uri if uri is not None else model_env(model, source, gcs)
    server = ServerProcess(env, log_path=workdir / f"server-{source}-{time.monotonic_ns()}.log")
    with server:
        server.wait_ready(path="/memory", timeout_s=120)
        idle_rss = server.rss_mb()
        cold_s, cold_cpu_s = first_answer(server)
        loaded_rss = server.rss_mb()
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: server.post_image("/predict", LARGE_PHOTO)[0], range(8)))
        if statuses != [200] * 8:
            raise RuntimeError(f"expected eight 200s, found {statuses}; log:\n{server.log_tail()}")
        time.sleep(0.5)
        return {
            "cold_start_s": cold_s,
            "cold_start_cpu_s": cold_cpu_s,
            "idle_rss_mb": idle_rss,
            "loaded_rss_mb": loaded_rss,
            "rss_after_burst_mb": server.rss_mb(),
            "peak_rss_mb": server.peak_rss_mb(),
        }


def first_answer(server: ServerProcess) -> tuple[float, float]:
    """POST the small photo until the first 200 (503 while loading is fine): (seconds, CPU-seconds) since spawn."""
    status = 0
    while status != 200:
        status, body = server.post_image("/predict", SMALL_PHOTO, timeout_s=300)
        if status != 200 and status != 503:
            raise RuntimeError(f"expected 200 from /predict, found {status}: {body!r}")
    assert server.started_at is not None
    return time.monotonic() - server.started_at, server.cpu_seconds()


def server_env(**values: str) -> dict[str, str]:
    """render.yaml's environment (as the platform gives it) with ``values`` on top."""
    return {key: value for key, value in render_env().items() if key != "PYTHON_VERSION"} | values


class WarmedBuild:
    """A build folder warmed once by ``python -m dermal_fn.serving.warm``; ``deploy()`` copies it for a run.

    The folder holds the model file (for ``local``; a ``gs://`` model lives in the bucket) and the
    cache, as a project folder on Render does after its build command.
    """

    def __init__(self, model: Path, source: str, workdir: Path, gcs: Any) -> None:
        import subprocess

        self.source = source
        self.workdir = workdir
        self.build = Path(tempfile.mkdtemp(dir=workdir, prefix="build-"))
        self.uri = model_env(model, source, gcs)
        if source == "local":
            shutil.copyfile(model, self.build / "model.dermal")
            self.uri["MODEL_URI"] = str(self.build / "model.dermal")
        env = server_env(MODEL_CACHE_DIR=str(self.build / ".model-cache"), TMPDIR=str(self.build)) | self.uri
        done = subprocess.run(
            [sys.executable, "-m", "dermal_fn.serving.warm"],
            cwd=Path(__file__).resolve().parent.parent,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"expected the warm command to load the model, found:\n{done.stderr[-4000:]}")

    def deploy(self) -> tuple[str, dict[str, str]]:
        """A fresh copy of the build (new inodes and ctimes): its cache folder and the model's variables."""
        container = Path(tempfile.mkdtemp(dir=self.workdir, prefix="container-"))
        shutil.copytree(self.build, container, dirs_exist_ok=True)
        uri = dict(self.uri)
        if self.source == "local":
            uri["MODEL_URI"] = str(container / "model.dermal")
        return str(container / ".model-cache"), uri


def render_free_run(
    model: Path,
    workdir: Path,
    *,
    cpus: float = RENDER_FREE_CPUS,
    cache: str | None = None,
    uri: dict[str, str] | None = None,
) -> dict[str, float]:
    """A cold start inside a real cgroup of 512 MiB and ``cpus`` CPUs (Render's free plan: 0.1).

    Spawn to the first 200 (wall and CPU-seconds), then the wall time of three more 0.3 MP
    predictions; the worker sizes its LiteRT threads from the quota, as it would there.
    """
    from bench import cgroup as cgroups

    env = server_env(
        MODEL_CACHE_DIR=cache or tempfile.mkdtemp(dir=workdir, prefix="cache-"),
        TMPDIR=tempfile.mkdtemp(dir=workdir, prefix="tmp-"),
    ) | (uri or model_env(model, "local", None))
    group = cgroups.create(cgroups.unique_name(), limit_bytes=512 * 2**20, cpus=cpus)
    try:
        server = ServerProcess(
            env, log_path=workdir / f"server-quota-{time.monotonic_ns()}.log", wrap=group.wrap
        )
        with server:
            server.wait_ready(path="/memory", timeout_s=300)
            cold_s, cold_cpu_s = first_answer(server)
            latencies = []
            for _ in range(3):
                t0 = time.monotonic()
                status, body = server.post_image("/predict", SMALL_PHOTO, timeout_s=300)
                if status != 200:
                    raise RuntimeError(f"expected 200 from /predict, found {status}: {body}")
                latencies.append(time.monotonic() - t0)
        oom = group.events().get("oom_kill", 0)
    finally:
        group.destroy()
    return {
        "cold_start_s": cold_s,
        "cold_start_cpu_s": cold_cpu_s,
        "request_s": statistics.median(latencies),
        "oom_kills": float(oom),
    }


def _deployed(build: WarmedBuild) -> dict[str, Any]:
    cache, uri = build.deploy()
    return {"cache": cache, "uri": uri}


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {
        key: round(statistics.median(run[key] for run in runs), 3 if key.endswith("_s") else 1)
        for key in runs[0]
    } | {"runs": len(runs)}


def _guard(measured: float, committed: float, tolerance: float, unit: str) -> dict[str, Any]:
    """``ok`` when ``measured`` is within ``tolerance`` (a fraction) above ``committed``, else ``regressed``."""
    limit = committed * (1.0 + tolerance)
    return {
        f"committed_{unit}": committed,
        f"measured_{unit}": round(measured, 2),
        f"limit_{unit}": round(limit, 2),
        "verdict": "ok" if measured <= limit else "regressed",
    }


def idle_rss_guard(measured_mb: float, baseline: dict[str, Any]) -> dict[str, Any]:
    """The idle server's RSS against the committed figure: ``ok`` within the tolerance, else ``regressed``."""
    return _guard(measured_mb, float(baseline["idle_rss_mb"]), float(baseline["tolerance"]), "mb")


def restart_cpu_guard(measured_s: float, baseline: dict[str, Any]) -> dict[str, Any]:
    """CPU-seconds of a worker restart's cold start against the committed figure (a wide tolerance:
    CPU time is noisy on a shared machine; what it catches is an import that costs ml-dtypes 0.7's 0.7 s)."""
    return _guard(measured_s, float(baseline["restart_cpu_s"]), float(baseline["restart_cpu_tolerance"]), "s")


def _from_build(build: WarmedBuild, start: Callable[..., dict[str, float]]) -> dict[str, float]:
    """One start of a fresh deploy of ``build``."""
    return start(**_deployed(build))


def _interleaved(starts: dict[str, Callable[[], dict[str, float]]], runs: int) -> dict[str, Any]:
    """Medians per kind of start, the kinds taken in turn (new, restart, warmed, new, …): this
    machine's load drifts over minutes, so kinds run in blocks would compare moments, not starts."""
    figures: dict[str, list[dict[str, float]]] = {name: [] for name in starts}
    for _ in range(runs):
        for name, start in starts.items():
            figures[name].append(start())
    return {name: _medians(found) for name, found in figures.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a bundle (default: the demo model, else a tiny one)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sources", default="local,gcs", help="comma-separated: local, gcs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--guard", action="store_true", help="exit 1 when the idle RSS regressed")
    parser.add_argument(
        "--restart",
        action="store_true",
        help="also runs that keep the model cache (a worker restart in one container)",
    )
    parser.add_argument(
        "--render-free",
        action="store_true",
        help=f"also start inside a 512 MiB, {RENDER_FREE_CPUS:g}-CPU cgroup (Render's free plan), local model",
    )
    parser.add_argument(
        "--warmed",
        action="store_true",
        help="also new containers of a build warmed by `python -m dermal_fn.serving.warm` (render.yaml's build)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="set MODEL_SHA256 (a pinned gs:// restart or warmed deploy then asks storage nothing)",
    )
    args = parser.parse_args(argv)
    global PIN
    PIN = args.pin

    from tests.gcs_emulator import FakeGCS

    with tempfile.TemporaryDirectory(prefix="coldstart-") as tmp, FakeGCS() as gcs:
        workdir = Path(tmp)
        model = args.model or default_model(workdir)
        report: dict[str, Any] = {"model": str(model), "model_mb": round(model.stat().st_size / 2**20, 2)}
        for source in args.sources.split(","):
            starts: dict[str, Callable[[], dict[str, float]]] = {
                source: partial(one_run, model, source, workdir, gcs)
            }
            if args.restart:
                kept = tempfile.mkdtemp(dir=workdir, prefix="kept-cache-")
                uri = model_env(model, source, gcs)  # one object: a restart finds its generation cached
                one_run(model, source, workdir, gcs, cache=kept, uri=uri)  # fills the cache
                starts[f"{source}_restart"] = partial(
                    one_run, model, source, workdir, gcs, cache=kept, uri=uri
                )
            if args.warmed:
                build = WarmedBuild(model, source, workdir, gcs)
                starts[f"{source}_warmed"] = partial(
                    _from_build, build, partial(one_run, model, source, workdir, gcs)
                )
            report |= _interleaved(starts, args.runs)
        if args.render_free:
            from bench.cgroup import CgroupUnavailable

            try:
                starts = {"render_free": partial(render_free_run, model, workdir)}
                if args.restart:
                    kept_free = tempfile.mkdtemp(dir=workdir, prefix="kept-cache-")
                    render_free_run(model, workdir, cache=kept_free)
                    starts["render_free_restart"] = partial(render_free_run, model, workdir, cache=kept_free)
                if args.warmed:
                    free_build = WarmedBuild(model, "local", workdir, gcs)
                    starts["render_free_warmed"] = partial(
                        _from_build, free_build, partial(render_free_run, model, workdir)
                    )
                report |= _interleaved(starts, args.runs)
            except CgroupUnavailable as exc:  # said in the report; the other figures stand
                report["render_free"] = {"error": f"no cgroup: {exc}"}
    baseline = json.loads(BASELINE.read_text())
    guards = {
        source: idle_rss_guard(figures["idle_rss_mb"], baseline)
        for source, figures in report.items()
        if isinstance(figures, dict) and "idle_rss_mb" in figures
    }
    report["idle_rss_guard"] = guards
    if "local_restart" in report:
        cpu_guard = restart_cpu_guard(report["local_restart"]["cold_start_cpu_s"], baseline)
        report["restart_cpu_guard"] = cpu_guard
        guards = guards | {"restart_cpu": cpu_guard}
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    results.write("coldstart", report, also=args.json)
    regressed = [source for source, guard in guards.items() if guard["verdict"] != "ok"]
    return 1 if args.guard and regressed else 0


if __name__ == "__main__":
    raise SystemExit(main())
