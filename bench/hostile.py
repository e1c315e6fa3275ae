"""The hardening table against EfficientNetV2-S @384, served as render.yaml serves it, in a real 512 MiB cgroup.

    python -m bench.hostile [--model bench/out/effnetv2s_384_none.dermal] [--repeat 3] [--json OUT] [--repo DIR]

For each upload built to expand (tests/hostile_fixtures.expanding_images: 16-bit, RGBA, float32 TIFF
6000x4000; CMYK and RGB JPEG 65500x729), a 200 MB body sent to ``GET /health``, and a 12 MP phone
photo before and after: the answers (status and error code), the cgroup's OOM kills, whether the
worker is still the same process, and the worker's peak RSS (VmHWM from /proc). Then a copy of the
bundle with bytes flipped in its flatbuffer: what /health and /predict answer. Markdown on stdout.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import socket
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import cgroup, results
from bench.server import REPO, Server, post

MIB = 2**20
DEFAULT_MODEL = REPO / "bench" / "out" / "effnetv2s_384_none.dermal"


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _health(port: int) -> tuple[int, dict[str, Any], dict[str, str]]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        return response.status, json.loads(response.read()), dict(response.getheaders())
    finally:
        conn.close()


def body_on_health(port: int, megabytes: int = 200) -> int:
    """GET /health declaring a ``megabytes`` body, sending what the server takes; the status it answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = f"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: {megabytes * MIB}\r\n\r\n"
        sock.sendall(head.encode())
        try:
            for _ in range(megabytes):
                sock.sendall(b"\0" * MIB)
        except OSError:
            pass
        data = sock.recv(4096)
    return int(data.split()[1]) if data.startswith(b"HTTP/") else 0


def damaged_copy(bundle: Path, out: Path) -> Path:
    """``bundle`` with 8 bytes flipped in its flatbuffer (its CRC left as it was: the damage is detectable)."""
    data = bytearray(bundle.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        size = json.loads(z.read("manifest.json"))["backbone_bytes"]
    for index in range(size // 3, size // 3 + 8 * 4099, 4099):
        data[index] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


def run(model: Path, *, repeat: int, out_dir: Path, repo: Path = REPO) -> dict[str, Any]:
    """Serve ``model`` in a 512 MiB cgroup and send it the table; the answers and the memory figures."""
    sys.path.insert(0, str(REPO))
    from bench.images import PHONE_SIZE, photo_jpeg
    from tests import hostile_fixtures as hf

    photo = photo_jpeg(PHONE_SIZE)
    uploads = hf.expanding_images()
    group = cgroup.create(f"dermal-hostile-{time.time_ns()}", limit_bytes=512 * MIB)
    result: dict[str, Any] = {
        "model": model.name,
        "cgroup_version": group.version,
        "rows": {},
        "repo": str(repo),
    }
    server = Server(model_uri=model, log_path=out_dir / "hostile-server.log", wrap=group.wrap([]), repo=repo)
    try:
        server.start()
        result["cold_start_s"] = round(server.wait_first_200(photo), 2)
        (worker,) = _children(server.pid)
        for name, data in uploads.items():
            kind = "tiff" if name.endswith("tiff") else name.rsplit("_", 1)[1]
            answers = []
            for _ in range(repeat):
                started = time.perf_counter()
                try:
                    status, body = post(server.port, data, content_type=f"image/{kind}")
                    code = json.loads(body).get("error", {}).get("code") if status != 200 else None
                except (OSError, http.client.HTTPException, ValueError) as exc:  # e.g. the worker was killed
                    status, code = 0, type(exc).__name__
                    time.sleep(2.0)  # gunicorn starts another worker
                answers.append(
                    {"status": status, "code": code, "ms": round((time.perf_counter() - started) * 1e3)}
                )
            result["rows"][name] = {"bytes": len(data), "answers": answers}
        result["rows"]["health_200mb_body"] = {
            "bytes": 200 * MIB,
            "answers": [{"status": body_on_health(server.port)}],
        }
        status, _ = post(server.port, photo)
        result["photo_after"] = status
        result["worker_same"] = _children(server.pid) == [worker]
        result["worker_peak_mb"] = round(
            max(_status_kb(pid, "VmHWM:") for pid in _children(server.pid)) / 1024, 1
        )
        result["master_peak_mb"] = round(_status_kb(server.pid, "VmHWM:") / 1024, 1)
        result["cgroup"] = group.events()
    finally:
        server.stop()
    damaged = damaged_copy(model, out_dir / "damaged.dermal")
    broken = Server(
        model_uri=damaged, log_path=out_dir / "hostile-damaged.log", wrap=group.wrap([]), repo=repo
    )
    try:
        broken.start()
        deadline = time.monotonic() + 60
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                status, state, headers = _health(broken.port)
            except OSError:
                time.sleep(0.1)
                continue
            if state.get("model_state") in ("error", "loaded"):
                break
            time.sleep(0.1)
        started = time.perf_counter()
        predict_status, _ = post(broken.port, photo)
        result["damaged"] = {
            "health_status": status,
            "model_state": state.get("model_state"),
            "message": state.get("error", {}).get("message"),
            "retry_after": headers.get("Retry-After"),
            "predict_status": predict_status,
            "predict_ms": round((time.perf_counter() - started) * 1e3),
            "workers_seen": len(_children(broken.pid)),
        }
        result["cgroup_after_damaged"] = group.events()
    finally:
        broken.stop()
        group.destroy()
    return result


def markdown(result: dict[str, Any]) -> str:
    """The table of docs/benchmark.md."""
    lines = [
        f"{result['model']}, 512 MiB cgroup (v{result['cgroup_version']}), served as render.yaml serves it; "
        f"cold start {result['cold_start_s']} s",
        "",
        "| upload | size | answers |",
        "|---|---:|---|",
    ]
    for name, row in result["rows"].items():
        answers = ", ".join(
            f"{a['status']}"
            + (f" {a['code']}" if a.get("code") else "")
            + (f" ({a['ms']} ms)" if "ms" in a else "")
            for a in row["answers"]
        )
        lines.append(f"| {name} | {row['bytes'] / 1024:.0f} KB | {answers} |")
    cg = result["cgroup"]
    lines += [
        "",
        f"12 MP photo after them: {result['photo_after']}; same worker throughout: {result['worker_same']}; "
        f"OOM kills: {cg.get('oom_kill', 0)}; worker peak RSS (VmHWM) {result['worker_peak_mb']} MB "
        f"(master {result['master_peak_mb']} MB)",
        "",
        f"Damaged bundle (8 bytes flipped in the flatbuffer): /health {result['damaged']['health_status']} "
        f"model_state {result['damaged']['model_state']!r} ({result['damaged']['message']}), Retry-After "
        f"{result['damaged']['retry_after']}; /predict {result['damaged']['predict_status']} in "
        f"{result['damaged']['predict_ms']} ms; OOM kills {result['cgroup_after_damaged'].get('oom_kill', 0)}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--repo", type=Path, default=REPO, help="serve this checkout's main.py (an older version)"
    )
    args = parser.parse_args(argv)
    out_dir = REPO / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = run(args.model, repeat=args.repeat, out_dir=out_dir, repo=args.repo.resolve())
    results.write("hostile", result, also=args.json)
    sys.stdout.write(markdown(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
