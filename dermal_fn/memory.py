"""Memory and CPU of this process and its container: RSS from /proc, limits from the cgroup."""

from __future__ import annotations

import math
import os
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED_V1 = 1 << 60  # cgroup v1 writes a huge number for "no limit"


def rss_mb() -> float:
    """Resident set size of this process in MB (from /proc via psutil)."""
    return psutil.Process().memory_info().rss / 1e6


def peak_rss_mb() -> float | None:
    """VmHWM, the peak resident set size of this process in MB, when /proc has it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


def _own_cgroup_dirs(root: Path) -> list[Path]:
    """The cgroup folders of this process (v2 unified path and v1 memory/cpu paths), nearest first."""
    dirs: list[Path] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":
            dirs.append(root / rel)
        for name in controllers.split(","):
            if name in ("memory", "cpu", "cpu,cpuacct", "cpuacct"):
                dirs.append(root / name / rel)
                dirs.append(root / "cpu,cpuacct" / rel)
    dirs.extend([root, root / "memory", root / "cpu", root / "cpu,cpuacct"])
    return dirs


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_memory_limit_mb(root: Path = CGROUP_ROOT) -> float | None:
    """The container's memory limit in MB: v2 ``memory.max`` or v1 ``memory.limit_in_bytes``."""
    limits = []
    for folder in _own_cgroup_dirs(root):
        for name in ("memory.max", "memory.limit_in_bytes"):
            value = _read(folder / name)
            if value is None or value == "max":
                continue
            try:
                number = int(value)
            except ValueError:
                continue
            if 0 < number < _UNLIMITED_V1:
                limits.append(number / 1e6)
    return min(limits) if limits else None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup: v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``."""
    for folder in _own_cgroup_dirs(root):
        value = _read(folder / "cpu.max")
        if value:
            quota, _, period = value.partition(" ")
            if quota != "max":
                try:
                    return int(quota) / int(period or "100000")
                except ValueError:
                    pass
        quota_v1 = _read(folder / "cpu.cfs_quota_us")
        period_v1 = _read(folder / "cpu.cfs_period_us")
        if quota_v1 and period_v1:
            try:
                q, p = int(quota_v1), int(period_v1)
            except ValueError:
                continue
            if q > 0 and p > 0:
                return q / p
    return None


def available_cpus() -> int:
    """Whole CPUs this process may use: the cgroup quota rounded up, the affinity mask, at least 1."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        return max(1, min(affinity, math.ceil(quota)))
    return max(1, affinity)
