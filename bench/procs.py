"""Memory of a process tree from /proc: VmRSS now, VmHWM (peak), and a sampler of RSS over time."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil


def status_mb(pid: int, key: str) -> float | None:
    """A ``kB`` field of /proc/<pid>/status (``VmRSS``, ``VmHWM``) in MB, or None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    return None


def pss_mb(pid: int) -> float | None:
    """Proportional set size (shared pages split between their users) from smaps_rollup, in MB."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024 / 1e6
    return None


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system, all threads) the processes have used so far, from /proc/<pid>/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now."""
    try:
        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.Error:
        return []


@dataclass
class TreeMemory:
    """Samples one process tree: total RSS over time and the peak (VmHWM) of every process seen."""

    pid: int
    interval_s: float = 0.1
    started: float = field(default_factory=time.perf_counter)
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, RSS MB)
    max_pss_mb: float = 0.0  # the largest sampled tree PSS: shared pages (master/worker) counted once
    hwm_mb: dict[int, float] = field(default_factory=dict)  # latest VmHWM per pid
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _marks: list[tuple[float, str]] = field(default_factory=list)

    def sample(self) -> float:
        """Read every process of the tree once; returns the tree's RSS in MB."""
        total = pss = 0.0
        for pid in tree_pids(self.pid):
            rss = status_mb(pid, "VmRSS")
            hwm = status_mb(pid, "VmHWM")
            if rss is not None:
                total += rss
            pss += pss_mb(pid) or 0.0
            if hwm is not None:
                self.hwm_mb[pid] = max(hwm, self.hwm_mb.get(pid, 0.0))
        self.samples.append((time.perf_counter() - self.started, total))
        self.max_pss_mb = max(self.max_pss_mb, pss)
        return total

    def peak_mb(self) -> float:
        """Sum over the tree's processes of each one's peak RSS (VmHWM), as read so far."""
        self.sample()
        return sum(self.hwm_mb.values())

    def peak_by_pid(self) -> dict[int, float]:
        """Each process's VmHWM in MB."""
        return dict(self.hwm_mb)

    def max_sampled_mb(self, since: float = 0.0) -> float:
        """The largest sampled tree RSS at or after ``since`` seconds."""
        values = [rss for t, rss in self.samples if t >= since]
        return max(values, default=0.0)

    def now(self) -> float:
        """Seconds since sampling started."""
        return time.perf_counter() - self.started

    def mark(self, label: str) -> float:
        """Note a phase boundary on the time axis; returns its time."""
        t = self.now()
        self._marks.append((t, label))
        return t

    @property
    def marks(self) -> list[tuple[float, str]]:
        """Phase boundaries (seconds, label)."""
        return list(self._marks)

    def start(self) -> TreeMemory:
        """Sample in a background thread every ``interval_s``."""
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def stop(self) -> None:
        """Stop the sampler (the samples and peaks stay)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
