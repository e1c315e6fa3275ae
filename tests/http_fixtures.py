"""Shared helpers for HTTP tests: test images, the function's test client, and a real server process.

- ``START_COMMAND``: the one start command (render.yaml, the Makefile, the README, Cloud Functions).
- ``jpeg_bytes`` / ``png_bytes``: a seeded synthetic skin photo of any size, encoded.
- ``ServerProcess``: ``functions-framework --target=dermal --source=main.py --port=N`` started from
  the repository root with the environment you give it, in its own process group, bound to
  127.0.0.1 on a free port, stderr (the JSON log lines) collected to a file. ``stop()`` kills the
  whole group (gunicorn master and worker); ``logs()`` parses the JSON lines; ``rss_mb()`` and
  ``peak_rss_mb()`` sum RSS / VmHWM over the group's processes from /proc.
- ``send_until_answered``: send a body the way a client that honours an early answer does;
  ``read_response``: the answer's status, headers and body.
- ``SCRUBBED``: the variables a test server never inherits from the test process.

The fixtures built on these (``server_factory``, ``dermal_app``, ``configure``) are in
``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.procs import cpu_seconds
from bench.server import LOOPBACK, free_port, stop_group
from bench.server import start_argv as bench_start_argv
from dermal_fn.serving.config import environment_variables
from tests.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
HOST = LOOPBACK
_PR_SET_DEATHSIG = 1
# environment variables a test server never inherits from the test process (they would change it)
# every variable Settings reads (its field table), and what the platforms and the library read
SCRUBBED = (*environment_variables(), "STORAGE_EMULATOR_HOST", "RENDER", "K_SERVICE", "PORT")


# --- images ----------------------------------------------------------------------------------------


def photo(*, width: int = 160, height: int = 120, seed: int = 0, label: int | None = 2) -> Image.Image:
    """A seeded synthetic skin photo (dermal_fn.demo.synth) cropped/resized to width x height."""
    from dermal_fn.demo import synth

    side = max(width, height, 64)
    sample = synth.generate(np.random.default_rng(seed), size=side, label=label, hair=False)
    image = Image.fromarray(sample.image)
    return image.crop((0, 0, width, height)) if width <= side and height <= side else image


def jpeg_bytes(*, width: int = 160, height: int = 120, seed: int = 0) -> bytes:
    """A synthetic photo as JPEG bytes."""
    buffer = io.BytesIO()
    photo(width=width, height=height, seed=seed).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png_bytes(*, width: int = 160, height: int = 120, seed: int = 0) -> bytes:
    """A synthetic photo as PNG bytes."""
    buffer = io.BytesIO()
    photo(width=width, height=height, seed=seed).save(buffer, "PNG")
    return buffer.getvalue()


# --- a client that listens while it sends ----------------------------------------------------------


def send_until_answered(sock: socket.socket, pieces: Iterable[bytes], *, within_s: float = 60.0) -> int:
    """Send ``pieces`` on ``sock`` until they run out, the server answers, or it closes; the bytes sent.

    What an HTTP client that honours an early answer does (RFC 9112 section 9.5): it waits for the
    socket to be writable *or* readable, so an answer (a 413 half way through an upload) stops the
    upload even when the server has stopped reading and the kernel's buffers are full. A blocking
    ``sendall`` cannot see that answer; it waits for buffer space that may never come. TimeoutError
    when neither happens within ``within_s``. The socket is left blocking, the answer unread.
    """
    deadline = time.monotonic() + within_s
    sent = 0
    pending = b""
    chunks = iter(pieces)
    sock.setblocking(False)
    try:
        while True:
            if not pending:
                pending = next(chunks, b"")
                if not pending:
                    return sent
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"expected the server to read the body or answer within {within_s:g} s, "
                    f"found neither after {sent} bytes"
                )
            readable, writable, _ = select.select([sock], [sock], [], left)
            if readable:
                return sent  # an answer, or the connection closed: either way, stop sending
            if writable:
                try:
                    count = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    return sent
                pending = pending[count:]
                sent += count
    finally:
        sock.setblocking(True)


def read_response(sock: socket.socket, *, timeout_s: float = 15.0) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response on ``sock``."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"expected a response, found the connection closed after {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body[:length]


# --- a real functions-framework process --------------------------------------------------------------


def start_argv(port: int) -> list[str]:
    """START_COMMAND for ``port``, plus ``--host=127.0.0.1`` (tests never listen on all interfaces)."""
    return bench_start_argv(port, host=HOST)


def _die_with_parent() -> Callable[[], None] | None:
    """preexec_fn: the kernel SIGKILLs the server if the test process dies (Linux, main thread only)."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(_PR_SET_DEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return set_death_signal


class ServerProcess:
    """One ``functions-framework`` server of the function, in its own process group."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        log_path: Path,
        port: int | None = None,
        inherit_env: bool = True,
        wrap: Callable[[list[str]], tuple[list[str], dict[str, str]]] | None = None,
    ) -> None:
        """``wrap``: turns the start command into another (and extra variables), e.g. a cgroup's ``wrap``."""
        self.port = port if port is not None else free_port()
        self.wrap = wrap
        self.log_path = Path(log_path)
        base = dict(os.environ) if inherit_env else {}
        for name in SCRUBBED:
            base.pop(name, None)
        self.env = {
            **base,
            "PATH": f"{VENV_BIN}{os.pathsep}{base.get('PATH', os.defpath)}",
            "PYTHONUNBUFFERED": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            **env,
            "PORT": str(self.port),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None  # time.monotonic() at spawn

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> ServerProcess:
        """Spawn the server (it answers once ``wait_ready`` returns)."""
        if self.running:
            raise RuntimeError(f"expected a stopped server, found one running at {self.url}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv, extra = start_argv(self.port), dict[str, str]()
        if self.wrap is not None:
            argv, extra = self.wrap(argv)
        with open(self.log_path, "ab") as log:
            self.started_at = time.monotonic()
            self.process = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env={**self.env, **extra},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its own process group: stop() kills master and workers
                preexec_fn=_die_with_parent(),
            )
        return self

    def wait_ready(self, *, path: str = "/health", timeout_s: float = 60.0) -> None:
        """Poll ``GET path`` until it answers (any HTTP status); RuntimeError with the log if not.

        ``/health`` starts loading the model; poll ``/memory`` (or ``/openapi.json``) to wait for
        the server without warming it.
        """

        def answers() -> bool:
            if not self.running:
                code = self.process.returncode if self.process is not None else None
                raise RuntimeError(
                    f"expected the server to answer on {self.url}, found it exited with code {code}; "
                    f"log:\n{self.log_tail()}"
                )
            try:
                self.request("GET", path, timeout_s=2.0)
            except OSError:
                return False
            return True

        wait_until(answers, timeout_s=timeout_s, what=f"an answer to GET {path}", describe=self.log_tail)

    def wait_loaded(self, *, timeout_s: float = 60.0) -> None:
        """Poll ``/health`` (which starts the load) until the model is loaded."""
        wait_until(
            lambda: self.get_json("/health", timeout_s=5.0)[1].get("model_loaded"),
            timeout_s=timeout_s,
            what="the model to load",
            describe=self.log_tail,
        )

    def stop(self) -> None:
        """Stop the server's whole process group (SIGTERM: gunicorn's graceful stop; SIGKILL after 5 s)."""
        process, self.process = self.process, None
        if process is not None:
            stop_group(process, grace_s=5.0)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- talking to it ---

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 60.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request (no proxies): status, headers, body. HTTP errors are answers, not raised."""
        request = urllib.request.Request(
            self.url + path, data=body, method=method, headers=dict(headers or {})
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=timeout_s) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, dict(error.headers), error.read()

    def get_json(
        self, path: str, *, headers: Mapping[str, str] | None = None, timeout_s: float = 60.0
    ) -> tuple[int, Any]:
        """``GET path``: status and parsed JSON body."""
        status, _, body = self.request("GET", path, headers=headers, timeout_s=timeout_s)
        return status, json.loads(body)

    def post_image(
        self,
        path: str,
        image: bytes,
        *,
        content_type: str = "image/jpeg",
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 60.0,
    ) -> tuple[int, Any]:
        """``POST path`` with a raw image body: status and parsed JSON body."""
        status, _, body = self.request(
            "POST",
            path,
            body=image,
            headers={"Content-Type": content_type, **(headers or {})},
            timeout_s=timeout_s,
        )
        return status, json.loads(body)

    def worker_pids(self) -> list[int]:
        """The gunicorn workers: the group's processes but the master."""
        master = self.process.pid if self.process is not None else -1
        return [pid for pid in self.pids() if pid != master]

    # --- what it did ---

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log records the server wrote so far (other lines skipped)."""
        records = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    records.append(json.loads(line))
        return records

    def pids(self) -> list[int]:
        """The processes of the server's group (gunicorn master and workers)."""
        if self.process is None:
            return []
        return process_group_pids(self.process.pid)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) spent so far by the server's processes, from /proc/<pid>/stat."""
        return cpu_seconds(self.pids())

    def rss_mb(self) -> float:
        """Current RSS summed over the server's processes, in MiB."""
        return sum(_status_kib(pid, "VmRSS:") for pid in self.pids()) / 1024

    def peak_rss_mb(self) -> float:
        """Peak RSS (VmHWM) summed over the server's processes, in MiB."""
        return sum(_status_kib(pid, "VmHWM:") for pid in self.pids()) / 1024


def process_group_pids(pgid: int) -> list[int]:
    """PIDs whose process group is ``pgid`` (from /proc/<pid>/stat)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return sorted(pids)


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0
