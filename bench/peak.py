"""Peak memory of the real server under 4 clients posting 12 MP photos with Grad-CAM on, in one line.

    .venv/bin/python -m bench.peak BUNDLE [--seconds 15] [--env NAME=VALUE ...]

The server is started as render.yaml starts it, from the checkout this module runs in (run it from
an older worktree to measure that version), with the memory limits left out so that no heatmap is
skipped. After its first 200, 4 clients post the 12 MP JPEG for ``--seconds``. Prints one JSON line:
the sum of VmHWM over master and worker (the benchmark's "peak RSS"), each process's VmHWM, the
tree's RSS and PSS afterwards, the answers and the CPU-milliseconds per answer. ``bench.run``'s
4-client phase is the same load; this is the quick A/B of one setting against another.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import results
from bench.images import PHONE_SIZE, SMALL_SIZE, cached_photo
from bench.load import run_load
from bench.procs import cpu_seconds, pss_mb, status_mb, tree_pids
from bench.server import REPO, Server

OUT = REPO / "bench" / "out"


def measure(bundle: Path, *, seconds: float, env: dict[str, str]) -> dict[str, object]:
    """Serve ``bundle``, load it with 4 clients x 12 MP for ``seconds``, read the tree's memory."""
    large, small = cached_photo(OUT, PHONE_SIZE), cached_photo(OUT, SMALL_SIZE)
    with tempfile.TemporaryDirectory(prefix="peak-") as tmp:
        work = Path(tmp)
        extra = {"MODEL_CACHE_DIR": str(work / "cache"), "TMPDIR": str(work)} | env
        server = Server(
            model_uri=bundle,
            log_path=work / "server.log",
            env=extra,
            without=("MEMORY_LIMIT_MB", "MEMORY_SOFT_LIMIT_MB"),
        )
        with server:
            server.wait_first_200(small)
            before = cpu_seconds(tree_pids(server.pid))
            load = run_load(server.port, large, clients=4, seconds=seconds, variants=("?gradcam=true",))
            pids = tree_pids(server.pid)
            used = cpu_seconds(pids) - before
            hwm = {pid: status_mb(pid, "VmHWM") or 0.0 for pid in pids}
            rss = sum(status_mb(pid, "VmRSS") or 0.0 for pid in pids)
            pss = sum(pss_mb(pid) or 0.0 for pid in pids)
    return {
        "bundle": bundle.name,
        "env": env,
        "peak_rss_mb": round(sum(hwm.values()), 1),
        "peak_by_process_mb": [round(v, 1) for v in hwm.values()],
        "rss_after_mb": round(rss, 1),
        "pss_after_mb": round(pss, 1),
        "answers": load.ok,
        "server_errors": load.server_errors,
        "cpu_ms_per_answer": round(1e3 * used / max(load.ok, 1), 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Print one JSON line of figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.peak", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server (repeatable)")
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    measured = measure(args.bundle.resolve(), seconds=args.seconds, env=env)
    sys.stdout.write(json.dumps(measured) + "\n")
    results.write("peak", measured)
    return 0


if __name__ == "__main__":
    sys.exit(main())
