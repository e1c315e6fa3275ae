"""The real server, started exactly as render.yaml starts it, and timed from spawn to its first 200.

The one launcher of the project: ``START_COMMAND`` (render.yaml's, the README's, Cloud Functions'),
:func:`start_argv`, :func:`free_port` and :func:`stop_group` are what the tests' servers
(``tests/http_fixtures.py``) are started and stopped with too.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
START_COMMAND = "functions-framework --target=dermal --source=main.py --port=$PORT"
LOOPBACK = "127.0.0.1"


def start_argv(port: int, *, host: str | None = None) -> list[str]:
    """START_COMMAND for ``port`` (and ``--host``, when given); run with this environment's bin on PATH."""
    argv = shlex.split(START_COMMAND.replace("$PORT", str(port)))
    return [*argv, f"--host={host}"] if host else argv


def stop_group(process: subprocess.Popen[bytes], *, grace_s: float = 10.0) -> int:
    """Stop a server's whole process group: SIGTERM (gunicorn's graceful stop), SIGKILL after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):  # workers left behind, if any
        os.killpg(process.pid, signal.SIGKILL)
    return process.wait()


def render_env(path: Path = REPO / "render.yaml") -> dict[str, str]:
    """The fixed environment render.yaml gives the web service (``sync: false`` entries are not values)."""
    import yaml

    try:
        blueprint = yaml.safe_load(path.read_text())
    except OSError:
        return {}
    env: dict[str, str] = {}
    for service in blueprint.get("services", []):
        for item in service.get("envVars", []):
            if "value" in item:
                env[str(item["key"])] = str(item["value"])
    return env


class ServerFailed(RuntimeError):
    """The server exited or never answered 200; the message holds the tail of its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def post(
    port: int, body: bytes, *, query: str = "", timeout_s: float = 120.0, content_type: str = "image/jpeg"
) -> tuple[int, bytes]:
    """POST ``body`` to /predict on a fresh connection; (status, response body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("POST", "/predict" + query, body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Server:
    """``functions-framework --target=dermal --source=main.py --port=$PORT`` with render.yaml's environment.

    ``without`` drops some of render.yaml's variables (e.g. the memory limits, so that every
    configuration outside the cgroup does the same work: heatmaps are never skipped).
    """

    def __init__(
        self,
        *,
        model_uri: str | Path,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        wrap: tuple[list[str], dict[str, str]] | None = None,
        without: tuple[str, ...] = (),
        repo: Path = REPO,
    ) -> None:
        """``repo``: the checkout whose main.py is served (another one to measure an older version)."""
        self.repo = repo
        self.model_uri = str(model_uri)
        self.log_path = log_path
        self.extra_env = dict(env or {})
        self.wrap = wrap
        self.without = without
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0

    @property
    def argv(self) -> list[str]:
        """The command line (render.yaml's startCommand, with $PORT filled in)."""
        return start_argv(self.port)

    @property
    def pid(self) -> int:
        """The PID of the process tree's root."""
        if self.process is None:
            raise ServerFailed("expected a started server, found none")
        return self.process.pid

    def start(self) -> Server:
        """Spawn the server (returns at once; see :meth:`wait_first_200`)."""
        ours = ("MODEL_", "LITERT_", "MEMORY_", "THREADS", "WORKERS", "ENABLE_GRADCAM", "MAX_", "API_KEY")
        env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
        env.update({k: v for k, v in render_env().items() if k not in self.without and k != "PYTHON_VERSION"})
        env.update(
            {
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                "PORT": str(self.port),
                "MODEL_URI": self.model_uri,
                "PYTHONUNBUFFERED": "1",
                "TF_CPP_MIN_LOG_LEVEL": "2",
            }
        )
        env.update(self.extra_env)
        argv = self.argv
        if self.wrap is not None:
            argv, wrap_env = self.wrap[0] + argv, self.wrap[1]
            env.update(wrap_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 (closed with the process)
        self.spawned_at = time.perf_counter()
        self.process = subprocess.Popen(
            argv, cwd=self.repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return self

    def wait_first_200(self, body: bytes, *, timeout_s: float = 300.0) -> float:
        """POST ``body`` until the first 200; seconds from spawn to that answer (the cold start)."""
        deadline = self.spawned_at + timeout_s
        last = "no answer"
        while time.perf_counter() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerFailed(f"server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                status, answer = post(self.port, body, timeout_s=timeout_s)
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                last = type(exc).__name__
                time.sleep(0.01)
                continue
            if status == 200:
                return time.perf_counter() - self.spawned_at
            last = f"{status} {answer[:200]!r}"
            time.sleep(0.05)
        raise ServerFailed(f"expected a 200 within {timeout_s:g} s, found {last}: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        """Stop the whole process group (TERM, then KILL); returns the exit status."""
        process = self.process
        if process is None:
            return None
        return stop_group(process)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
