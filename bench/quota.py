"""Render free's tenth of a CPU, end to end: a 12 MP photo with Grad-CAM, fp32 against full int8.

    .venv/bin/python -m bench.quota [--size 384] [--requests 6] [--cpus 0.1] [--modes none int8]

Each mode's EfficientNetV2-S bundle (``bench.models``; random weights, which cost the same time as
trained ones) is served as render.yaml serves it, each inside its own real cgroup of 512 MiB and
``--cpus`` CPUs. After the first answer, the modes take turns sending the same 12 MP JPEG to
``POST /predict`` with Grad-CAM on, once for each ``--overlays``: ``png`` (the photo blended, the
default answer) and ``heatmap`` (the palette PNG the upload page asks for). Per request it reads:

- the wall time the client waited;
- the CPU-seconds the server's processes spent (from /proc): the work. ``work / cpus`` is the floor
  a quota allows, and ``wall - work / cpus`` what the quota costs beyond it (throttling granularity,
  threads waking, anything not arithmetic);
- the answer's ``timing_ms`` (decode, model, gradcam: wall inside the worker);
- the cgroup's throttled periods.

Beside it, where the work goes: each mode's service in a child process on one thread, without a
quota, its steps timed with the process's CPU clock (``Service.predict(timer=time.process_time)``:
decode, model, Grad-CAM with the overlay), and the backbones alone on one thread, interleaved in
this process (the int8 / fp32 speed ratio that decides how far int8 can go on this CPU; hosts
differ: record the flags). Writes ``bench/out/quota.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import results
from bench.coldstart import first_answer, server_env
from bench.images import cached_photo
from bench.models import ModelSpec, backbone_speed, bundle_path
from bench.server import REPO
from tests.http_fixtures import ServerProcess

OUT = REPO / "bench" / "out"
PHOTO_SIZE = (4000, 3000)  # 12 MP, a phone's photo


def stages(bundle: Path, photo: Path, *, overlay: str, runs: int) -> dict[str, float]:
    """Median CPU ms of each step of one prediction (one LiteRT thread; call in a child process)."""
    import dataclasses

    from dermal_fn.serving.config import Settings
    from dermal_fn.serving.options import PredictOptions
    from dermal_fn.serving.service import Service

    settings = dataclasses.replace(Settings.from_env(), model_uri=str(bundle), litert_threads=1)
    service = Service(settings)
    options = PredictOptions.parse({"overlay": overlay})
    image = photo.read_bytes()
    service.predict(image, options)  # the load and the first run's weight packing
    steps: dict[str, list[float]] = {"decode": [], "model": [], "gradcam": [], "total": []}
    for _ in range(runs):
        timing = service.predict(image, options, timer=time.process_time).body["timing_ms"]
        for key, series in steps.items():
            series.append(float(timing[key]))  # type: ignore[literal-required]
    return {key: round(statistics.median(series), 1) for key, series in steps.items()}


def stages_in_child(bundle: Path, photo: Path, *, overlay: str, runs: int = 7) -> dict[str, float]:
    """:func:`stages` in a fresh process (its own service, one model)."""
    import json
    import subprocess

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.quota",
            "--stages",
            str(bundle),
            "--overlays",
            overlay,
            "--requests",
            str(runs),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "LITERT_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    )
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    """Serve each mode in its own quota, send the 12 MP photo in turns, print and write the figures."""
    from bench import cgroup as cgroups

    parser = argparse.ArgumentParser(prog="python -m bench.quota")
    parser.add_argument("--stages", type=Path, help=argparse.SUPPRESS)  # the child of stages_in_child
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--cpus", type=float, default=0.1)
    parser.add_argument("--memory-mib", type=int, default=512)
    parser.add_argument("--modes", nargs="+", default=["none", "int8"])
    parser.add_argument(
        "--overlays",
        nargs="+",
        default=["png", "heatmap"],
        help="png: the photo blended (the default answer); heatmap: the palette PNG the upload page asks for",
    )
    args = parser.parse_args(argv)
    photo = cached_photo(OUT, PHOTO_SIZE)
    photo_path = OUT / f"photo_{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}.jpg"  # where cached_photo keeps it
    if args.stages is not None:
        print(json.dumps(stages(args.stages, photo_path, overlay=args.overlays[0], runs=args.requests)))
        return 0

    spec = ModelSpec("effnetv2s", args.size)
    bundles = {mode: bundle_path(spec, mode, OUT) for mode in args.modes}
    speed = backbone_speed(bundles, args.size, max_seconds=40.0)
    print(f"backbone alone, one thread: {speed}", flush=True)
    cpu_steps = {
        f"{mode} overlay={overlay}": stages_in_child(bundles[mode], photo_path, overlay=overlay)
        for mode in args.modes
        for overlay in args.overlays
    }
    print(f"CPU ms per step, one thread, no quota: {cpu_steps}", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="dermal-quota-"))
    variants = [(mode, overlay) for mode in args.modes for overlay in args.overlays]
    rows: dict[str, list[dict[str, float]]] = {f"{mode} overlay={overlay}": [] for mode, overlay in variants}
    cold: dict[str, dict[str, float]] = {}
    oom: dict[str, int] = {}
    with ExitStack() as stack:
        servers: dict[str, tuple[ServerProcess, Any]] = {}
        for mode, bundle in bundles.items():
            group = cgroups.create(cgroups.unique_name(), limit_bytes=args.memory_mib * 2**20, cpus=args.cpus)
            stack.callback(group.destroy)
            env = server_env(
                MODEL_URI=str(bundle),
                MODEL_CACHE_DIR=tempfile.mkdtemp(dir=workdir, prefix="cache-"),
                TMPDIR=tempfile.mkdtemp(dir=workdir, prefix="tmp-"),
            )
            server = ServerProcess(env, log_path=workdir / f"server-{mode}.log", wrap=group.wrap)
            stack.enter_context(server)
            servers[mode] = (server, group)
        for mode, (server, _) in servers.items():
            server.wait_ready(path="/memory", timeout_s=600)
            cold_s, cold_cpu = first_answer(server)
            cold[mode] = {"cold_start_s": round(cold_s, 2), "cold_start_cpu_s": round(cold_cpu, 2)}
            print(f"{mode}: first answer after {cold_s:.1f} s ({cold_cpu:.2f} CPU-s)", flush=True)
        for i in range(args.requests):
            for mode, overlay in variants:
                server, group = servers[mode]
                name = f"{mode} overlay={overlay}"
                cpu0, stat0, t0 = server.cpu_seconds(), group.cpu_stat(), time.monotonic()
                status, body = server.post_image(f"/predict?overlay={overlay}", photo, timeout_s=600)
                wall = time.monotonic() - t0
                cpu, stat1 = server.cpu_seconds() - cpu0, group.cpu_stat()
                if status != 200:
                    raise RuntimeError(f"expected 200 from {name}, found {status}: {body}")
                if not {"overlay_png", "heatmap_png"} & set(body.get("gradcam") or {}):
                    raise RuntimeError(f"expected Grad-CAM in {name}'s answer, found {body.get('gradcam')}")
                timing = body["timing_ms"]
                rows[name].append(
                    {
                        "wall_s": wall,
                        "cpu_s": cpu,
                        "decode_ms": timing["decode"],
                        "model_ms": timing["model"],
                        "gradcam_ms": timing.get("gradcam", 0.0),
                        "throttled_periods": stat1["throttled"] - stat0["throttled"],
                    }
                )
                print(f"{name} #{i + 1}: {wall:.2f} s wall, {cpu:.3f} CPU-s, timing_ms {timing}", flush=True)
        for mode, (_, group) in servers.items():
            oom[mode] = group.events().get("oom_kill", 0)

    figures: dict[str, Any] = {}
    for name, measured in rows.items():
        mode = name.split()[0]
        median = {key: statistics.median(row[key] for row in measured) for key in measured[0]}
        floor = median["cpu_s"] / args.cpus
        figures[name] = {
            **cold[mode],
            "request_wall_s": round(median["wall_s"], 3),
            "request_cpu_s": round(median["cpu_s"], 4),
            "quota_floor_s": round(floor, 3),
            "beyond_floor_s": round(median["wall_s"] - floor, 3),
            "timing_ms": {k: round(median[f"{k}_ms"], 1) for k in ("decode", "model", "gradcam")},
            "throttled_periods": median["throttled_periods"],
            "backbone_ms_one_thread": speed[mode],
            "cpu_ms_per_step_no_quota": cpu_steps[name],
            "oom_kills": oom[mode],
            "requests": len(measured),
        }
    if "none" in speed and "int8" in speed:
        figures["int8_speedup_backbone_one_thread"] = round(speed["none"] / speed["int8"], 2)
    for overlay in args.overlays:
        fp32, int8 = figures.get(f"none overlay={overlay}"), figures.get(f"int8 overlay={overlay}")
        if fp32 and int8:
            figures[f"int8_speedup_request overlay={overlay}"] = round(
                fp32["request_wall_s"] / int8["request_wall_s"], 2
            )
    payload = {
        "model": f"EfficientNetV2-S @{args.size} (random weights: time only)",
        "photo": f"{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEG, Grad-CAM on",
        "cpus": args.cpus,
        "memory_mib": args.memory_mib,
        **figures,
    }
    results.write("quota", payload)
    print(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
