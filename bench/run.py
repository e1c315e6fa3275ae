"""The benchmark, one command: ``python -m bench.run`` (``--quick`` for the seconds-long smoke version).

Builds EfficientNetV2-S (random weights, seeded) at each size, exports fp32 / fp16 / int8-dynamic
bundles with ``python -m dermal_fn export`` (cached in the output folder), then for every bundle and
for the TensorFlow backend serving the same ``.keras`` starts the real server as render.yaml does and
measures cold start, peak RSS of the whole process tree (VmHWM) and RSS over time, latency and
throughput under 1 and 4 clients posting a 12 MP JPEG, the Grad-CAM overhead, memory growth from a
0.3 MP to a 12 MP upload and the bare interpreter's invoke time. Finally it runs the server inside a
real 512 MiB memory cgroup (and a 1-CPU variant) under 4 clients with Grad-CAM on, and reports OOM
kills, 5xx and errors. Writes ``report.md``, ``results.json`` and ``rss.png``.

Exit status: 0 done; 3 no memory cgroup could be made (unless ``--allow-no-cgroup``); 4 the cgroup
run saw an OOM kill, a 5xx or a connection error.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import cgroup as cgroups
from bench import images, models, report
from bench import results as bench_results
from bench.load import run_load
from bench.plot import rss_plot
from bench.procs import TreeMemory, cpu_seconds, tree_pids
from bench.server import REPO, Server, ServerFailed
from dermal_fn.serving.memory import available_cpus

logger = logging.getLogger("bench")

LIMIT_BYTES = 512 * 1024 * 1024
# outside the cgroup, render.yaml's memory limits would make the TensorFlow backend skip heatmaps
UNLIMITED = ("MEMORY_LIMIT_MB", "MEMORY_SOFT_LIMIT_MB")
# the variants the report reads (what the page asks for: the heatmap alone)
GRADCAM_ON, GRADCAM_OFF, GRADCAM_HEATMAP = report.ON, report.OFF, report.HEATMAP


@dataclass(frozen=True)
class Config:
    """One server configuration: a bundle (LiteRT) or a .keras file (TensorFlow)."""

    name: str
    backend: str  # "litert" or "tensorflow"
    model: Path
    size: int
    quantization: str  # "none", "fp16", "int8-dynamic"; "-" for TensorFlow


@dataclass(frozen=True)
class Photos:
    """The uploads: a 0.3 MP photo and a phone-size one."""

    small: bytes
    large: bytes
    large_path: Path
    large_size: tuple[int, int]


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def prepare(args: argparse.Namespace, out: Path) -> list[Config]:
    """Build the Keras models and export every bundle (cached), exports ``--jobs`` at a time."""
    specs = [models.ModelSpec(args.arch, size) for size in args.sizes]
    wanted: list[tuple[models.ModelSpec, str]] = []
    for index, spec in enumerate(specs):
        quantizations = args.quantizations if index == 0 or args.full_matrix else ["none"]
        wanted.extend((spec, q) for q in quantizations)
    for spec in specs:
        models.keras_path(spec, out)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        paths = list(pool.map(lambda item: models.bundle_path(item[0], item[1], out), wanted))
    configs = [
        Config(f"litert {spec.size}px {_quant_name(q)}", "litert", path, spec.size, q)
        for (spec, q), path in zip(wanted, paths, strict=True)
    ]
    if args.tensorflow:
        spec = specs[0]
        configs.append(
            Config(f"tensorflow {spec.size}px fp32", "tensorflow", out / f"{spec.stem}.keras", spec.size, "-")
        )
    return configs


def _quant_name(quantization: str) -> str:
    return "fp32" if quantization == "none" else quantization


def _post_sequential(server: Server, body: bytes, *, count: int, query: str = GRADCAM_ON) -> list[int]:
    from bench.server import post

    return [post(server.port, body, query=query)[0] for _ in range(count)]


def measure(config: Config, photos: Photos, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Cold start, growth, load phases and peak RSS of one configuration."""
    logger.info("== %s", config.name)
    logs = out / "logs"
    slug = config.name.replace(" ", "_")
    result: dict[str, Any] = {
        "name": config.name,
        "backend": config.backend,
        "size": config.size,
        "quantization": config.quantization,
        "model_file": config.model.name,
        "model_mb": round(config.model.stat().st_size / 1e6, 1),
    }
    server = Server(model_uri=config.model, log_path=logs / f"{slug}.log", without=UNLIMITED).start()
    memory = TreeMemory(server.pid, started=server.spawned_at).start()
    try:
        cold = [server.wait_first_200(photos.small)]
        cold_cpu = [cpu_seconds(tree_pids(server.pid))]
        memory.mark("first 200")
        statuses = _post_sequential(server, photos.small, count=3)
        small_peak = memory.peak_mb()
        statuses += _post_sequential(server, photos.large, count=3)
        large_peak = memory.peak_mb()
        result["growth"] = {
            "peak_after_0.3mp_mb": round(small_peak, 1),
            "peak_after_12mp_mb": round(large_peak, 1),
            "growth_mb": round(large_peak - small_peak, 1),
            "statuses": statuses,
        }
        phases: dict[str, Any] = {}
        for label, clients, variants in (
            ("1 client, Grad-CAM on/off alternating", 1, (GRADCAM_ON, GRADCAM_OFF, GRADCAM_HEATMAP)),
            ("4 clients, Grad-CAM on", 4, (GRADCAM_ON,)),
            ("4 clients, Grad-CAM off", 4, (GRADCAM_OFF,)),
        ):
            memory.mark(label)
            phase = run_load(
                server.port, photos.large, clients=clients, seconds=args.seconds, variants=variants
            )
            phases[label] = phase.summary()
            phases[label]["peak_rss_mb_so_far"] = round(memory.peak_mb(), 1)
            logger.info(
                "   %s: %d ok, p50 %s ms, %.2f req/s, 5xx %d",
                label,
                phase.ok,
                phases[label]["p50_ms"],
                phases[label]["throughput_rps"],
                phase.server_errors,
            )
        result["phases"] = phases
        result["peak_rss_mb"] = round(memory.peak_mb(), 1)
        result["peak_rss_by_process_mb"] = {str(k): round(v, 1) for k, v in memory.peak_by_pid().items()}
        result["max_sampled_rss_mb"] = round(memory.max_sampled_mb(), 1)
        result["max_sampled_pss_mb"] = round(memory.max_pss_mb, 1)
    finally:
        memory.stop()
        server.stop()
    # TensorFlow's cold start is tens of seconds: two of them are enough for a ratio
    repeats = args.cold_starts if config.backend == "litert" else min(args.cold_starts, 2)
    for _ in range(repeats - 1):
        with Server(model_uri=config.model, log_path=logs / f"{slug}.cold.log", without=UNLIMITED) as again:
            cold.append(again.wait_first_200(photos.small))
            cold_cpu.append(cpu_seconds(tree_pids(again.pid)))
    result["cold_start_s"] = {"median": _median(cold), "runs": [round(c, 3) for c in cold]}
    result["cold_start_cpu_s"] = {"median": _median(cold_cpu), "runs": [round(c, 3) for c in cold_cpu]}
    result["rss_series"] = [(round(t, 2), round(mb, 1)) for t, mb in memory.samples]
    result["marks"] = [(round(t, 2), label) for t, label in memory.marks]
    if config.backend == "litert":
        result["bare_invoke"] = bare_invoke(config.model, photos.large_path, args)
    logger.info(
        "   cold start %s s, peak RSS %s MB, growth %s MB",
        result["cold_start_s"]["median"],
        result["peak_rss_mb"],
        result["growth"]["growth_mb"],
    )
    return result


def bare_invoke(bundle: Path, photo: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The LiteRT interpreter alone on the same input with the server's thread count (child process)."""
    threads = available_cpus()
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.invoke",
            str(bundle),
            str(photo),
            "--threads",
            str(threads),
            "--runs",
            str(args.invoke_runs),
            "--max-seconds",
            str(max(args.seconds, 2.0)),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


def cgroup_run(
    config: Config, photos: Photos, *, seconds: float, cpus: float | None, out: Path
) -> dict[str, Any]:
    """The server inside a fresh 512 MiB cgroup (optionally ``cpus`` CPUs) under 4 clients, Grad-CAM on."""
    label = "512 MiB" + (f", {cpus:g} CPU" if cpus is not None else "")
    logger.info("== cgroup %s: %s for %g s", label, config.name, seconds)
    group = cgroups.create(cgroups.unique_name(), limit_bytes=LIMIT_BYTES, cpus=cpus)
    result: dict[str, Any] = {
        "label": label,
        "config": config.name,
        "cgroup_version": group.version,
        "cgroup": str(group.memory_dir),
        "limit_bytes": LIMIT_BYTES,
        "cpus": cpus,
        "seconds": seconds,
    }
    slug = "cgroup" + ("_cpu" if cpus is not None else "")
    server = Server(model_uri=config.model, log_path=out / "logs" / f"{slug}.log", wrap=group.wrap([]))
    try:
        server.start()
        memory = TreeMemory(server.pid, started=server.spawned_at).start()
        try:
            result["cold_start_s"] = round(server.wait_first_200(photos.small), 3)
            result["server_in_cgroup"] = _in_cgroup(server.pid, group.memory_dir.name)
            phase = run_load(server.port, photos.large, clients=4, seconds=seconds, variants=(GRADCAM_ON,))
            result["load"] = phase.summary()
            result["peak_rss_mb"] = round(memory.peak_mb(), 1)
            result["max_sampled_pss_mb"] = round(memory.max_pss_mb, 1)
            result["rss_series"] = [(round(t, 2), round(mb, 1)) for t, mb in memory.samples]
        finally:
            memory.stop()
        result["server_alive"] = server.process is not None and server.process.poll() is None
        events = group.events()
        result["events"] = events
        result["oom_kills"] = events.get("oom_kill", 0)
        result["limit_hits"] = events.get("max", 0)
        result["cgroup_peak_mb"] = round(events["peak_bytes"] / 1e6, 1) if "peak_bytes" in events else None
        result["server_errors"] = result["load"]["server_errors"]
        result["client_errors"] = sum(result["load"]["errors"].values())
        result["ok"] = (
            result["oom_kills"] == 0
            and result["server_errors"] == 0
            and result["client_errors"] == 0
            and result["server_alive"]
            and result["server_in_cgroup"]
        )
    finally:
        server.stop()
        group.destroy()
    logger.info(
        "   %d ok, OOM kills %d, 5xx %d, errors %d, peak RSS %s MB (cgroup peak %s MB)",
        result["load"]["statuses"].get("200", 0),
        result["oom_kills"],
        result["server_errors"],
        result["client_errors"],
        result["peak_rss_mb"],
        result["cgroup_peak_mb"],
    )
    return result


def _in_cgroup(pid: int, name: str) -> bool:
    try:
        return any(name in line for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines())
    except OSError:
        return False


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_total = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        mem_total = 0
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for package in ("ai-edge-litert", "tensorflow-cpu", "keras", "functions-framework", "numpy", "pillow"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "cpus_available": available_cpus(),
        "memory_gb": round(mem_total / 1e9, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "load_average_at_start": os.getloadavg(),
    }


def build_parser() -> argparse.ArgumentParser:
    """Options; ``--quick`` switches every default to the smoke version."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out", help="output folder (cache too)")
    parser.add_argument("--quick", action="store_true", help="smoke version: tiny model, seconds")
    parser.add_argument("--arch", choices=["effnetv2s", "tiny"], help="default effnetv2s (tiny with --quick)")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], help="default 384,300")
    parser.add_argument(
        "--quantizations",
        type=lambda s: s.split(","),
        help="at the first size (others: fp32 only unless --full-matrix); default none,fp16,int8-dynamic",
    )
    parser.add_argument("--full-matrix", action="store_true", help="every quantization at every size")
    parser.add_argument("--seconds", type=float, help="per load phase (default 12; 2 with --quick)")
    parser.add_argument("--cold-starts", type=int, help="cold starts per configuration (median; default 3)")
    parser.add_argument("--invoke-runs", type=int, default=30, help="bare interpreter runs")
    parser.add_argument("--cgroup-seconds", type=float, help="the 512 MiB run (default 120; 3 with --quick)")
    parser.add_argument(
        "--cpu-quota-seconds",
        type=float,
        help="the 512 MiB + 1 CPU run (default 30; 0 skips; 0 with --quick)",
    )
    parser.add_argument("--allow-no-cgroup", action="store_true", help="exit 0 even if no cgroup can be made")
    parser.add_argument("--no-tensorflow", dest="tensorflow", action="store_false", default=None)
    parser.add_argument(
        "--tensorflow", dest="tensorflow", action="store_true", help="default on (off with --quick)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="exports at once")
    parser.add_argument("--plot", type=Path, help="also copy the plot here")
    return parser


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    quick = args.quick
    fill = {
        "arch": "tiny" if quick else "effnetv2s",
        "sizes": [64] if quick else [384, 300],
        "quantizations": ["none"] if quick else ["none", "fp16", "int8-dynamic"],
        "seconds": 2.0 if quick else 12.0,
        "cold_starts": 1 if quick else 3,
        "cgroup_seconds": 3.0 if quick else 120.0,
        "cpu_quota_seconds": 0.0 if quick else 30.0,
        "tensorflow": not quick,
    }
    for key, value in fill.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if quick:
        args.invoke_runs = min(args.invoke_runs, 10)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run everything, write the report, return the exit status."""
    args = _defaults(build_parser().parse_args(argv))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    when = dt.datetime.now(dt.UTC)
    command = "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv)
    configs = prepare(args, out)
    prepared_s = time.perf_counter() - started
    logger.info("models ready in %.0f s", prepared_s)
    large_size = (1600, 1200) if args.quick else images.PHONE_SIZE
    large = images.cached_photo(out, large_size)
    photos = Photos(
        small=images.cached_photo(out, images.SMALL_SIZE),
        large=large,
        large_path=out / f"photo_{large_size[0]}x{large_size[1]}.jpg",
        large_size=large_size,
    )
    results: dict[str, Any] = {
        "date": when.isoformat(timespec="seconds"),
        "command": command,
        "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "plot"},
        "photos": {
            "small": {"size": list(images.SMALL_SIZE), "bytes": len(photos.small)},
            "large": {"size": list(large_size), "bytes": len(photos.large)},
        },
        "configs": [],
        "cgroup_runs": [],
    }
    for config in configs:
        try:
            results["configs"].append(measure(config, photos, args, out))
        except ServerFailed as exc:
            logger.error("%s failed: %s", config.name, exc)
            results["configs"].append({"name": config.name, "backend": config.backend, "failed": str(exc)})
    status = 0
    primary = configs[0]
    cgroup_error: str | None = None
    for seconds, cpus in ((args.cgroup_seconds, None), (args.cpu_quota_seconds, 1.0)):
        if seconds <= 0:
            continue
        try:
            run = cgroup_run(primary, photos, seconds=seconds, cpus=cpus, out=out)
        except cgroups.CgroupUnavailable as exc:
            cgroup_error = str(exc)
            logger.error("NO CGROUP: the 512 MiB run did not happen: %s", exc)
            break
        except ServerFailed as exc:
            run = {"label": "512 MiB", "ok": False, "failed": str(exc)}
            logger.error("the server failed inside the cgroup: %s", exc)
        results["cgroup_runs"].append(run)
        if not run.get("ok"):
            status = 4
    results["cgroup_error"] = cgroup_error
    if cgroup_error is not None and not args.allow_no_cgroup:
        status = 3
    results["targets"] = report.targets(results)
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    results["prepare_s"] = round(prepared_s, 1)
    series = {c["name"]: c["rss_series"] for c in results["configs"] if "rss_series" in c}
    for run in results["cgroup_runs"]:
        if "rss_series" in run:
            series[f"in cgroup {run['label']}"] = run["rss_series"]
    plot = rss_plot(
        series,
        out / "rss.png",
        title=f"RSS of the server process tree (sum of VmRSS, every 100 ms) - {when:%Y-%m-%d}",
        limits={"512 MiB": LIMIT_BYTES / 1e6, "target 300 MB": 300.0},
    )
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        args.plot.write_bytes(plot.read_bytes())
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    bench_results.write("run", results, folder=out)  # with the machine it ran on
    (out / "report.md").write_text(report.markdown(results, plot=plot))
    logger.info(
        "wrote %s, %s and %s in %.0f s", out / "report.md", out / "results.json", plot, results["elapsed_s"]
    )
    sys.stdout.write(report.markdown(results, plot=plot))
    return status


if __name__ == "__main__":
    sys.exit(main())
