"""Every shared fixture of the tests, in one place.

- Models: ``tiny_model`` / ``test_bundle`` (64 px, three labels) and ``small_bundle`` (48 px, the
  synthetic generator's four labels, nested backbone): committed in ``tests/data`` by the one
  builder, ``tests/models.py``, so serving tests need no TensorFlow.
- Servers: ``server_factory`` (real ``functions-framework`` processes, all stopped at teardown),
  ``dermal_app`` (``functions_framework.create_app`` for a test client) and ``configure`` (set
  environment variables, reset the service singleton).
- Storage: ``fake_gcs`` (the session's fake-gcs-server, with ``STORAGE_EMULATOR_HOST`` set) and
  ``fresh_fake_gcs`` (an emulator of the test's own, free to stop and restart).

Tests that need TensorFlow carry the marker ``tensorflow``; ``pytest -m "not tensorflow"`` runs the
rest in ``requirements-test.txt``'s environment.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import flask
import pytest

from dermal_fn.serving.logs import close_quietly_at_exit
from tests.gcs_emulator import FakeGCS, shared_fake_gcs
from tests.http_fixtures import REPO_ROOT, SCRUBBED, ServerProcess
from tests.models import SMALL, TINY, TinyModel, committed

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_unconfigure(config: pytest.Config) -> None:
    """After pytest's summary: what LiteRT's process-wide environments print as C++ destroys them at
    exit goes where the server sends it (``close_quietly_at_exit``), not under the summary."""
    if "ai_edge_litert" in sys.modules:
        close_quietly_at_exit(logging.getLogger("tests.litert"))


# the Beam tests need Beam's own environment (requirements-batch.txt): elsewhere they are not collected
collect_ignore = [] if importlib.util.find_spec("apache_beam") else ["test_batch.py"]

# fixtures that start real processes: a test that uses one is ``slow`` (and bounded like every test)
PROCESS_FIXTURES = frozenset({"server_factory", "page_servers", "fake_gcs", "fresh_fake_gcs", "server"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that starts a real server or the storage emulator ``slow``."""
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# --- models ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model() -> TinyModel:
    """The committed tiny classifier (64 px, three labels): Keras file and bundle."""
    return committed(TINY)


@pytest.fixture(scope="session")
def test_bundle(tiny_model: TinyModel) -> Path:
    """The committed tiny bundle."""
    return tiny_model.bundle_path


@pytest.fixture(scope="session")
def small_bundle() -> Path:
    """The committed 48 px four-label bundle (synthetic labels, nested backbone)."""
    return committed(SMALL).bundle_path


# --- servers ---------------------------------------------------------------------------------------


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start function servers: ``server_factory(env, wait="/health" | "/memory" | None)``; all stopped at teardown.

    Each server's log is ``tmp_path/server-N.log``; on failure it is in the pytest report via the
    assertion messages that print ``server.log_tail()``.
    """
    servers: list[ServerProcess] = []

    def start(
        env: Mapping[str, str], *, wait: str | None = "/memory", timeout_s: float = 60.0
    ) -> ServerProcess:
        server = ServerProcess(env, log_path=tmp_path / f"server-{len(servers)}.log")
        servers.append(server)
        server.start()
        if wait is not None:
            server.wait_ready(path=wait, timeout_s=timeout_s)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def dermal_app() -> flask.Flask:
    """The function as functions-framework serves it: ``create_app(target="dermal", source=main.py)``."""
    import functions_framework

    app: flask.Flask = functions_framework.create_app(target="dermal", source=str(REPO_ROOT / "main.py"))
    return app


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """``configure(MODEL_URI=..., ENABLE_GRADCAM="false", ...)``: set env vars, reset the service singleton.

    Every variable the service reads and the test does not give is removed, so tests do not leak settings into each
    other; the singleton is reset again at teardown.
    """
    from dermal_fn.serving.service import reset_service

    def apply(**env: str) -> None:
        for name in SCRUBBED:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        reset_service()

    try:
        yield apply
    finally:
        reset_service()


# --- storage ---------------------------------------------------------------------------------------


@pytest.fixture
def fake_gcs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> FakeGCS:
    """The session's shared emulator, running, with STORAGE_EMULATOR_HOST pointing at it."""
    server = shared_fake_gcs(request)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
    return server


@pytest.fixture
def fresh_fake_gcs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGCS]:
    """An emulator of this test's own (free to stop and restart), with STORAGE_EMULATOR_HOST."""
    server = FakeGCS(workdir=tmp_path / "fake-gcs")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
    try:
        yield server
    finally:
        server.close()
