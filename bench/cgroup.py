"""A real memory cgroup (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``) for the server, with an
optional CPU quota.

The server is started through ``/bin/sh``, which writes its own PID into the cgroup's
``cgroup.procs`` and then ``exec``\\ s the server: every byte the server ever allocates is charged
to the cgroup (nothing runs before the move). The cgroup is made inside this process's own cgroup
(nested), so it also stays within whatever limits the machine already has.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
# writes its own PID into every file of $BENCH_CGROUP_PROCS, then becomes the server
WRAPPER = 'for procs in $BENCH_CGROUP_PROCS; do echo $$ > "$procs" || exit 97; done; exec "$@"'


class CgroupUnavailable(RuntimeError):
    """This machine (or user) cannot make a memory cgroup here; the message says why."""


@dataclass(frozen=True)
class Cgroup:
    """A cgroup made for one run: where it lives and how to read its memory events."""

    version: int  # 1 or 2
    memory_dir: Path
    cpu_dir: Path | None  # v1 only: the cpu hierarchy's folder (v2 uses memory_dir for both)
    limit_bytes: int
    cpus: float | None

    @property
    def procs_files(self) -> list[Path]:
        """Every cgroup.procs the server must join."""
        files = [self.memory_dir / "cgroup.procs"]
        if self.cpu_dir is not None:
            files.append(self.cpu_dir / "cgroup.procs")
        return files

    def wrap(self, argv: list[str]) -> tuple[list[str], dict[str, str]]:
        """The command and extra environment that start ``argv`` inside this cgroup."""
        env = {"BENCH_CGROUP_PROCS": " ".join(str(p) for p in self.procs_files)}
        return ["/bin/sh", "-c", WRAPPER, "bench-cgroup-exec", *argv], env

    def events(self) -> dict[str, int]:
        """OOM kills and limit hits so far, and the peak usage the kernel charged (bytes)."""
        out: dict[str, int] = {}
        if self.version == 2:
            out.update(_keyed(self.memory_dir / "memory.events"))
            peak = _read_int(self.memory_dir / "memory.peak")
            if peak is not None:
                out["peak_bytes"] = peak
        else:
            oom = _keyed(self.memory_dir / "memory.oom_control")
            out["oom_kill"] = oom.get("oom_kill", 0)
            out["under_oom"] = oom.get("under_oom", 0)
            out["max"] = _read_int(self.memory_dir / "memory.failcnt") or 0
            peak = _read_int(self.memory_dir / "memory.max_usage_in_bytes")
            if peak is not None:
                out["peak_bytes"] = peak
        stat = _keyed(self.memory_dir / "memory.stat")
        for key in ("anon", "rss", "total_rss", "file", "cache"):
            if key in stat:
                out[f"stat_{key}_bytes"] = stat[key]
        return out

    def cpu_stat(self) -> dict[str, int]:
        """CPU accounting so far: periods, throttled periods, throttled time (µs)."""
        folder = self.memory_dir if self.version == 2 else self.cpu_dir
        stat = _keyed(folder / "cpu.stat") if folder is not None else {}
        return {
            "periods": stat.get("nr_periods", 0),
            "throttled": stat.get("nr_throttled", 0),
            "throttled_us": stat.get("throttled_usec", stat.get("throttled_time", 0) // 1000),
        }

    def destroy(self) -> None:
        """Remove the cgroup folders (their processes must have exited)."""
        for folder in (self.memory_dir, self.cpu_dir):
            if folder is None:
                continue
            for _ in range(50):
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _keyed(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value.strip())
    return out


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupUnavailable(f"expected to write {value!r} to {path}, found {exc}") from exc


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per controller ("" for the v2 unified hierarchy)."""
    paths: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = rel
    return paths


def _v1_mount(controller: str) -> tuple[Path, str] | None:
    """(mount point, mount root) of the v1 hierarchy that carries ``controller``."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, extra = left.split(), right.split()
        if len(extra) >= 3 and extra[0] == "cgroup" and controller in extra[2].split(","):
            return Path(fields[4]), fields[3]
    return None


def _nested(mount: Path, mount_root: str, own: str, name: str) -> Path:
    rel = own
    if mount_root != "/" and rel.startswith(mount_root):
        rel = rel[len(mount_root) :]
    return mount / rel.lstrip("/") / name


def create(name: str, *, limit_bytes: int, cpus: float | None = None) -> Cgroup:
    """Make a cgroup limited to ``limit_bytes`` of memory (no swap) and optionally ``cpus`` CPUs."""
    own = _own_paths()
    unified = ROOT / "cgroup.controllers"
    if unified.exists() and "memory" in unified.read_text().split():
        folder = _nested(ROOT, "/", own.get("", "/"), name)
        parent = folder.parent
        wanted = "+memory" + (" +cpu" if cpus is not None else "")
        enabled = (parent / "cgroup.subtree_control").read_text().split()
        if "memory" not in enabled or (cpus is not None and "cpu" not in enabled):
            _write(parent / "cgroup.subtree_control", wanted)
        _mkdir(folder)
        try:
            _write(folder / "memory.max", str(limit_bytes))
            with contextlib.suppress(CgroupUnavailable):
                _write(folder / "memory.swap.max", "0")
            if cpus is not None:
                _write(folder / "cpu.max", f"{int(cpus * 100_000)} 100000")
        except CgroupUnavailable:
            Cgroup(2, folder, None, limit_bytes, cpus).destroy()
            raise
        return Cgroup(2, folder, None, limit_bytes, cpus)
    memory_mount = _v1_mount("memory")
    if memory_mount is None:
        raise CgroupUnavailable(
            "expected a cgroup v2 hierarchy with the memory controller or a v1 memory hierarchy, found neither "
            f"(see /proc/self/mountinfo; {ROOT} has {sorted(p.name for p in ROOT.iterdir()) if ROOT.exists() else 'nothing'})"
        )
    memory_dir = _nested(*memory_mount, own.get("memory", "/"), name)
    _mkdir(memory_dir)
    cpu_dir: Path | None = None
    made = Cgroup(1, memory_dir, None, limit_bytes, cpus)
    try:
        _write(memory_dir / "memory.limit_in_bytes", str(limit_bytes))
        if (memory_dir / "memory.memsw.limit_in_bytes").exists():
            _write(memory_dir / "memory.memsw.limit_in_bytes", str(limit_bytes))
        if cpus is not None:
            cpu_mount = _v1_mount("cpu")
            if cpu_mount is None:
                raise CgroupUnavailable("expected a v1 cpu hierarchy for the CPU quota, found none")
            cpu_dir = _nested(*cpu_mount, own.get("cpu", "/"), name)
            _mkdir(cpu_dir)
            made = Cgroup(1, memory_dir, cpu_dir, limit_bytes, cpus)
            _write(cpu_dir / "cpu.cfs_period_us", "100000")
            _write(cpu_dir / "cpu.cfs_quota_us", str(int(cpus * 100_000)))
    except CgroupUnavailable:
        made.destroy()
        raise
    return made


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir()
    except FileExistsError:
        pass
    except OSError as exc:
        raise CgroupUnavailable(
            f"expected to create cgroup {folder} (needs root or a delegated cgroup), found {exc}"
        ) from exc


def unique_name(prefix: str = "dermal-bench") -> str:
    """A cgroup name unique to this process and moment."""
    return f"{prefix}-{os.getpid()}-{time.time_ns() % 10**9}"
