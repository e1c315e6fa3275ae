"""Where every benchmark's figures go: ``bench/out/<name>.json``, with the machine they were measured on.

Figures differ between hosts (an AVX2-only AMD EPYC runs int8-dynamic no faster than fp32; an Intel
Xeon with AVX-512 VNNI runs it 2x faster), so each file records the CPU, its relevant instruction
sets, the cores this process may use, the runtime versions and the command that made it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
# the instruction sets that decide which kernels XNNPACK runs
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU's model and relevant flags, the usable cores, and the versions that change the figures."""
    model, flags = platform.processor() or platform.machine(), set[str]()
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            if name.strip() in ("flags", "Features"):
                flags = set(value.split())
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    versions = {}
    for package in ("ai-edge-litert", "numpy", "pillow", "tensorflow-cpu"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:  # not installed in this environment
            continue
    return {
        "cpu": model,
        "flags": [flag for flag in FLAGS if flag in flags],
        "cores": cores,
        "python": platform.python_version(),
        "versions": versions,
    }


def write(name: str, results: Any, *, also: Path | None = None, folder: Path = OUT) -> Path:
    """Write ``<folder>/<name>.json`` (``bench/out`` by default; and ``also``, when given); its path."""
    payload = {
        "name": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "results": results,
    }
    text = json.dumps(payload, indent=1) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(text)
    if also is not None:
        also.parent.mkdir(parents=True, exist_ok=True)
        also.write_text(text)
    return path
