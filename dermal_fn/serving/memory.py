"""Memory and CPU of this process and its container: RSS from /proc, limits from the cgroup.

"MB" here means MiB (2**20 bytes), the unit container limits are given in: a 512 MB Render
instance and ``--memory=512Mi`` both have ``memory.max`` = 536870912, reported as 512.0.

The cgroup readers take the cgroup mount point and this process's ``/proc/self/cgroup`` as
arguments, so they can be pointed at a folder tree laid out like ``/sys/fs/cgroup``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import psutil

from dermal_fn.core.units import MIB

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
_UNLIMITED_V1 = 1 << 60  # cgroup v1 writes a huge number (page-rounded 2**63 - 1) for "no limit"
_CONTROLLER_DIRS = {
    "memory": ("memory",),
    "cpu": ("cpu", "cpu,cpuacct", "cpuacct,cpu"),
}


def disable_core_dumps() -> bool:
    """Set this process's core-file limit to 0 (a crash must not write a photo to disk); False if refused."""
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        return False
    return True


# glibc's malloc, tuned for a worker whose request threads take turns at large short-lived buffers
# (a 2 MB upload, decode and model-input arrays): one arena instead of one per thread, and a fixed
# mmap threshold, so a buffer above it goes back to the system when freed (glibc's default threshold
# rises to the largest buffer freed so far, after which such buffers stay in the heap). Measured on
# EfficientNetV2-S @384, 4 clients x 12 MP: peak RSS (master + worker VmHWM) int8-dynamic 217 -> 197-200 MB,
# fp32 273 -> 253 MB (docs/benchmark.md, python -m bench.peak).
M_ARENA_MAX = -8
M_MMAP_THRESHOLD = -3
MALLOC_ARENA_MAX = 1
MALLOC_MMAP_THRESHOLD = 1 * MIB
# glibc's own variables for the same: an operator who sets one keeps it
GLIBC_TUNABLES = {"MALLOC_ARENA_MAX": M_ARENA_MAX, "MALLOC_MMAP_THRESHOLD_": M_MMAP_THRESHOLD}


def tune_allocator(
    *,
    arena_max: int = MALLOC_ARENA_MAX,
    mmap_threshold: int = MALLOC_MMAP_THRESHOLD,
    environ: dict[str, str] | None = None,
) -> dict[str, int]:
    """Set glibc malloc's arena count and mmap threshold for this process; what was set (empty off glibc).

    A parameter whose glibc variable (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``) is in the
    environment is left as the operator set it.
    """
    import ctypes

    env = os.environ if environ is None else environ
    if not glibc():
        return {}
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library Python itself runs on
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    wanted = {M_ARENA_MAX: arena_max, M_MMAP_THRESHOLD: mmap_threshold}
    done = {}
    for variable, param in GLIBC_TUNABLES.items():
        if variable in env:
            continue
        if mallopt(param, wanted[param]) == 1:  # mallopt returns 1 on success
            done[variable] = wanted[param]
    return done


def glibc() -> bool:
    """True when this process runs on glibc (``os.confstr``: no file read, no subprocess)."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):
        return False
    return version is not None and version.startswith("glibc")


def rss_mb() -> float:
    """Resident set size of this process in MB (from /proc via psutil)."""
    return float(psutil.Process().memory_info().rss) / MIB


def peak_rss_mb(status_path: Path = Path("/proc/self/status")) -> float | None:
    """VmHWM, the peak resident set size of a process in MB, when /proc has it."""
    try:
        for line in status_path.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MIB
    except (OSError, ValueError, IndexError):
        return None
    return None


def host_memory_mb() -> float:
    """The machine's total memory in MB (what ``percent`` is relative to without a container limit)."""
    return float(psutil.virtual_memory().total) / MIB


def _ancestors(root: Path, relative: str) -> list[Path]:
    """``root/a/b/c``, ``root/a/b``, ``root/a``: a limit may be set on any ancestor cgroup."""
    parts = [p for p in relative.strip("/").split("/") if p and p != ".."]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), 0, -1)]


def cgroup_dirs(
    controller: str, *, root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP
) -> list[Path]:
    """The folders that may hold ``controller``'s limits for this process, nearest first.

    cgroup v2 (``0::/path`` in /proc/self/cgroup): ``root/path`` and its ancestors, then ``root``
    (inside a container with its own cgroup namespace the path is ``/`` and ``root`` is its cgroup).
    cgroup v1 (``N:memory:/path``): ``root/memory/path`` and its ancestors, then ``root/memory``.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    mounts = _CONTROLLER_DIRS[controller]
    dirs: list[Path] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, relative = parts
        if controllers == "":
            dirs.extend(_ancestors(root, relative))
            dirs.extend(_ancestors(root / "unified", relative))  # hybrid hierarchy
        elif controller in controllers.split(","):
            for mount in mounts:
                dirs.extend(_ancestors(root / mount, relative))
    dirs.append(root)
    dirs.append(root / "unified")
    dirs.extend(root / mount for mount in mounts)
    return list(dict.fromkeys(dirs))  # nearest first, each folder once


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_memory_limit_mb(*, root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The container's memory limit in MB: v2 ``memory.max`` or v1 ``memory.limit_in_bytes``.

    The smallest limit over this process's cgroup and its ancestors; None when none is set
    (``max``, or v1's "unlimited" huge number).
    """
    limits = []
    for folder in cgroup_dirs("memory", root=root, proc_cgroup=proc_cgroup):
        for name in ("memory.max", "memory.limit_in_bytes"):
            value = _read(folder / name)
            if value is None or value == "max":
                continue
            try:
                number = int(value)
            except ValueError:
                continue
            if 0 < number < _UNLIMITED_V1:
                limits.append(number / MIB)
    return min(limits) if limits else None


def cgroup_cpu_quota(*, root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """CPUs the cgroup allows: v2 ``cpu.max`` (``quota period``) or v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``.

    The smallest quota over this process's cgroup and its ancestors; None when unlimited
    (``max`` or ``-1``).
    """
    quotas = []
    for folder in cgroup_dirs("cpu", root=root, proc_cgroup=proc_cgroup):
        value = _read(folder / "cpu.max")
        if value:
            quota, _, period = value.partition(" ")
            try:
                if quota != "max" and int(quota) > 0 and int(period or "100000") > 0:
                    quotas.append(int(quota) / int(period or "100000"))
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
                quotas.append(q / p)
    return min(quotas) if quotas else None


def available_cpus(*, quota: float | None = None, affinity: int | None = None) -> int:
    """Whole CPUs this process may use: the cgroup quota rounded up, within the affinity mask, at least 1.

    ``quota`` and ``affinity`` default to this process's (``cgroup_cpu_quota()``, ``sched_getaffinity``).
    """
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            affinity = os.cpu_count() or 1
    if quota is None:
        quota = cgroup_cpu_quota()
    if quota is not None:
        return max(1, min(affinity, math.ceil(quota)))
    return max(1, affinity)


def cgroup_charge_mb(*, root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """What this process's cgroup is charged for, in MB, less the page cache it could drop.

    v2 ``memory.current`` less ``inactive_file`` of ``memory.stat``; v1 ``memory.usage_in_bytes`` less
    ``total_inactive_file``. Files in an in-memory file system (``/tmp`` on Cloud Functions and
    Cloud Run) are shared memory, not file cache: they stay in the charge, as the kernel's OOM
    killer counts them. None when no cgroup says.
    """
    for folder in cgroup_dirs("memory", root=root, proc_cgroup=proc_cgroup):
        for usage_name, inactive_name in (
            ("memory.current", "inactive_file"),
            ("memory.usage_in_bytes", "total_inactive_file"),
        ):
            usage = _read(folder / usage_name)
            if usage is None:
                continue
            try:
                charged = int(usage)
            except ValueError:
                continue
            stat = _read(folder / "memory.stat") or ""
            for line in stat.splitlines():
                key, _, value = line.partition(" ")
                if key == inactive_name and value.strip().isdigit():
                    charged -= int(value)
            return max(0, charged) / MIB
    return None


def cgroup_oom_kills(*, root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> int | None:
    """How many processes the kernel's OOM killer has killed in this process's memory cgroup.

    v2 ``memory.events`` (``oom_kill N``) or v1 ``memory.oom_control``; None when no cgroup says.
    """
    for folder in cgroup_dirs("memory", root=root, proc_cgroup=proc_cgroup):
        for name in ("memory.events", "memory.oom_control"):
            text = _read(folder / name)
            if text is None:
                continue
            for line in text.splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and value.strip().isdigit():
                    return int(value)
    return None
