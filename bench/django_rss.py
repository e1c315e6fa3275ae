"""The Django app's process serving a real-size model: peak RSS inside a real 512 MiB cgroup.

    .venv/bin/python -m bench.django_rss [--model bench/out/effnetv2s_300_none.dermal] [--requests 8]

The original Django app ran TensorFlow in its web process and ran out of memory on Render's 512 MB
plan. This runs ``examples/django`` as a Render web service would (one process), with dermal-fn
serving EfficientNetV2-S @300 (the original app's model, random weights: the same memory), inside a
512 MiB memory cgroup, and posts 12 MP phone photos through Django's test client (the upload view,
``dermal_fn.predict``, the page). It reports the process's peak RSS (VmHWM), the cgroup's peak charge
and OOM kills. Builds the model with ``bench.models`` if missing. Writes ``bench/out/django_rss.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import cgroup, results
from bench.server import REPO

OUT = REPO / "bench" / "out"


def child(model: str, requests: int) -> dict[str, Any]:
    """In the cgroup: Django set up, ``requests`` uploads of a 12 MP photo, the process's peak."""
    sys.path.insert(0, str(REPO / "examples" / "django"))
    os.environ["DJANGO_SETTINGS_MODULE"] = "skinclinic.settings"
    os.environ["MODEL_URI"] = model
    import django
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.test import Client

    from bench.images import PHONE_SIZE, cached_photo

    django.setup()
    client = Client()
    photo = cached_photo(OUT, PHONE_SIZE)
    statuses, seconds = [], []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.post(
            "/", {"image": SimpleUploadedFile("phone.jpg", photo, content_type="image/jpeg")}
        )
        seconds.append(time.perf_counter() - started)
        statuses.append(response.status_code)
    memory = client.get("/memory/").json()["memory"]
    status = {
        line.split(":")[0]: int(line.split()[1]) / 1024
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith(("VmRSS", "VmHWM"))
    }
    return {
        "statuses": statuses,
        "seconds": seconds,
        "peak_rss_mb": status["VmHWM"],
        "rss_mb": status["VmRSS"],
        "memory": memory,
        "tensorflow_imported": "tensorflow" in sys.modules,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["--child"]:
        sys.stdout.write(json.dumps(child(args_in[1], int(args_in[2]))) + "\n")
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.django_rss", description=__doc__)
    parser.add_argument("--model", type=Path, default=OUT / "effnetv2s_300_none.dermal")
    parser.add_argument("--requests", type=int, default=8)
    args = parser.parse_args(args_in)
    if not args.model.exists():
        from bench import models

        args.model = models.bundle_path(models.ModelSpec("effnetv2s", 300), "none", OUT)
    group = cgroup.create(cgroup.unique_name("dermal-django"), limit_bytes=512 * 1024 * 1024)
    try:
        argv_, extra = group.wrap(
            [sys.executable, "-m", "bench.django_rss", "--child", str(args.model), str(args.requests)]
        )
        done = subprocess.run(
            argv_, cwd=REPO, env={**os.environ, **extra}, capture_output=True, text=True, timeout=1800
        )
        events = group.events()
    finally:
        group.destroy()
    if done.returncode != 0:
        raise SystemExit(
            f"the Django process failed ({done.returncode}): {done.stderr[-2000:]}; cgroup {events}"
        )
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    report = {"model": str(args.model), "limit_mb": 512, "cgroup": events, **measured}
    sys.stdout.write(json.dumps({k: v for k, v in report.items() if k != "seconds"}, indent=1) + "\n")
    results.write("django_rss", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
