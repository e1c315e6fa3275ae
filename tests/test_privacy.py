"""Privacy: uploads stay in memory, never reach logs or error messages; one JSON log line per request."""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flask
import pytest

from tests import hostile_fixtures as hf
from tests.test_hostile import BAD_REQUESTS

# --- no file is opened for writing while a request is served -----------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | getattr(os, "O_TMPFILE", 0)
_recording = threading.local()
_hook_installed = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    opened = getattr(_recording, "opened", None)
    if opened is None or event != "open":
        return
    path, mode, flags = args
    writes = bool(flags & _WRITE_FLAGS) if isinstance(flags, int) else False
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        writes = True
    opened.append((str(path), writes))


class OpenRecorder:
    """Records every open() / os.open() on this thread (Python audit events) while active."""

    def __init__(self) -> None:
        global _hook_installed
        if not _hook_installed:
            sys.addaudithook(_audit)
            _hook_installed = True
        self.opened: list[tuple[str, bool]] = []

    def __enter__(self) -> OpenRecorder:
        _recording.opened = self.opened
        return self

    def __exit__(self, *exc: object) -> None:
        _recording.opened = None

    def writes(self) -> list[str]:
        return [path for path, writes in self.opened if writes]

    def in_tempdir(self) -> list[str]:
        root = tempfile.gettempdir()
        return [path for path, _ in self.opened if path.startswith(root)]


def five_mb_upload() -> tuple[bytes, str]:
    photo = hf.jpeg(size=128)
    padding = bytes(range(256)) * (5 * 1024 * 1024 // 256)  # after the JPEG end marker: ignored
    return hf.multipart([("image", photo + padding, "big.jpg"), ("top_k", b"2", None)])


def test_werkzeug_default_would_spool_this_upload_to_disk() -> None:
    """The control: werkzeug's default form parsing writes a 5 MB file part to a temp file."""
    body, content_type = five_mb_upload()
    request = flask.Request.from_values(
        "/predict",
        method="POST",
        input_stream=io.BytesIO(body),
        content_type=content_type,
        content_length=len(body),
    )
    with OpenRecorder() as recorder:
        files = request.files
        assert files["image"].stream.read(2) == b"\xff\xd8"
    assert recorder.in_tempdir(), recorder.opened


def test_5mb_multipart_upload_never_touches_disk(small_bundle: Path) -> None:
    body, content_type = five_mb_upload()
    with hf.client_for(hf.settings_for(small_bundle, max_upload_mb=8.0)) as client:
        client.get("/health")
        client.post("/predict", data=hf.jpeg(size=64), content_type="image/jpeg")  # model loaded
        with OpenRecorder() as recorder:
            response = client.post("/predict", data=body, content_type=content_type)
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    assert len(response.get_json()["predictions"]) == 2
    assert recorder.writes() == []
    assert recorder.in_tempdir() == []


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_hostile_requests_open_no_file_for_writing(small_bundle: Path, name: str) -> None:
    kwargs, status, _ = BAD_REQUESTS[name]
    with hf.client_for(hf.settings_for(small_bundle)) as client:
        client.post("/predict", data=hf.jpeg(size=64), content_type="image/jpeg")
        with OpenRecorder() as recorder:
            response = client.post("/predict", **kwargs)
    assert response.status_code == status
    assert recorder.writes() == []


# --- a full run against a real server: logs and messages ----------------------------------------------


def _is_text(data: bytes) -> bool:
    return data.isascii() and data.decode().isprintable()


def fragments(data: bytes) -> list[bytes]:
    """Distinctive pieces of an upload, as they would appear if it were logged raw, as hex or base64."""
    out: list[bytes] = []
    if len(data) < 24:
        return [data] if len(data) >= 8 and not _is_text(data) else []
    encoded = base64.b64encode(data)
    for fraction in (0.3, 0.5, 0.7):
        at = int(len(data) * fraction)
        raw = data[at : at + 16]
        if len(set(raw)) < 4 or _is_text(raw):
            continue  # runs of one byte and multipart header text are not distinctive
        out += [raw, binascii.hexlify(raw), base64.b64encode(raw)]
        at64 = int(len(encoded) * fraction)
        out.append(encoded[at64 : at64 + 24])
    return out


@pytest.fixture(scope="module")
def full_run(small_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every hostile case and normal uploads against a real server; its captured output afterwards."""
    log_path = tmp_path_factory.mktemp("privacy") / "server.log"
    env = {"MODEL_URI": str(small_bundle), "MAX_UPLOAD_MB": "1", "THREADS": "4", "LITERT_THREADS": "1"}
    sent: list[bytes] = []
    answers: list[tuple[str, int, dict[str, Any]]] = []
    secret_text = b"PATIENT-NOTE-7f3a9c: mole on left shoulder, itching since May"
    uploads: list[tuple[str, bytes, str]] = []
    for name, (kwargs, _, _) in sorted(BAD_REQUESTS.items()):
        if len(kwargs.get("data", b"")) > 1024 * 1024:
            continue  # over-limit bodies are covered by test_hostile; their zeros are not distinctive
        uploads.append((name, kwargs.get("data", b""), kwargs.get("content_type", "")))
    for name, data in sorted(hf.odd_valid_images().items()):
        uploads.append((name, data, "application/octet-stream"))
        body, content_type = hf.multipart([("image", data, "photo.bin")])
        uploads.append((f"{name}_multipart", body, content_type))
    photo = hf.jpeg(size=200, seed=21)
    uploads += [
        ("text_secret", secret_text, "image/jpeg"),
        (
            "json_secret",
            json.dumps({"image_base64": base64.b64encode(secret_text).decode()}).encode(),
            "application/json",
        ),
        ("photo_raw", photo, "image/jpeg"),
        (
            "photo_json",
            json.dumps({"image_base64": base64.b64encode(photo).decode()}).encode(),
            "application/json",
        ),
        ("photo_bad_option", photo, "image/jpeg?class=" + "Q" * 100),
    ]
    with hf.running_server(env=env, log_path=log_path) as server:
        for name, data, content_type in uploads:
            path = "/predict"
            if "?" in content_type:
                content_type, _, query = content_type.partition("?")
                path += "?" + query
            headers = {"Content-Type": content_type} if content_type else {}
            status, _, body = server.request("POST", path, body=data, headers=headers)
            answers.append((name, status, json.loads(body)))
            sent.append(data)
        health_status, _, _ = server.request("GET", "/health")
        assert health_status == 200
        request_count = len(uploads) + 1 + 1  # the uploads, this /health, and wait_ready's last /health
        server.stop()
        yield {
            "log": log_path.read_bytes(),
            "sent": sent,
            "secret_text": secret_text,
            "answers": answers,
            "requests": request_count,
        }


def request_lines(log: bytes) -> list[dict[str, Any]]:
    entries = []
    for line in log.decode("utf-8", errors="replace").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("message") == "request":
                entries.append(entry)
    return entries


@pytest.mark.slow
def test_logs_hold_no_image_bytes_or_base64(full_run: dict[str, Any]) -> None:
    log: bytes = full_run["log"]
    assert len(log) > 1000
    checked = 0
    for data in full_run["sent"]:
        for fragment in fragments(data):
            assert fragment not in log
            checked += 1
    overlays = [body["gradcam"]["overlay_png"] for _, status, body in full_run["answers"] if status == 200]
    assert overlays
    for overlay in overlays:
        encoded = overlay.encode()
        assert encoded[len(encoded) // 2 : len(encoded) // 2 + 24] not in log
    assert full_run["secret_text"][:20] not in log
    assert base64.b64encode(full_run["secret_text"])[:20] not in log
    assert checked > 200


@pytest.mark.slow
def test_error_messages_echo_no_body_content(full_run: dict[str, Any]) -> None:
    errors = [(name, body["error"]["message"]) for name, status, body in full_run["answers"] if status != 200]
    assert len(errors) > 40
    secret = full_run["secret_text"].decode()
    for name, message in errors:
        assert secret[:12] not in message, name
        assert "QQQQQQQQ" not in message, name
        for data in full_run["sent"]:
            for fragment in fragments(data):
                assert fragment.decode("latin-1") not in message, name


@pytest.mark.slow
def test_one_json_log_line_per_request_as_cloud_logging_reads_it(full_run: dict[str, Any]) -> None:
    log: bytes = full_run["log"]
    lines = request_lines(log)
    assert len(lines) >= full_run["requests"] - 1  # wait_ready may poll /health several times
    predicts = [entry for entry in lines if entry["route"] == "/predict"]
    assert len(predicts) == len(full_run["sent"])
    for entry in lines:
        assert {"severity", "request_id", "route", "status", "latency_ms", "time"} <= set(entry)
        expected = "INFO" if entry["status"] < 400 else "WARNING" if entry["status"] < 500 else "ERROR"
        assert entry["severity"] == expected
    for entry in predicts:
        if entry["status"] == 200:
            assert len(entry["model_sha256"]) == 64
            assert set(entry["timing_ms"]) == {"decode", "model", "gradcam", "total"}
        else:
            assert entry["error_code"]
    statuses = {entry["status"] for entry in predicts}
    assert {200, 400, 415, 422} <= statuses
    ids = [entry["request_id"] for entry in lines]
    assert len(set(ids)) == len(ids)
    text = log.decode("utf-8", errors="replace")
    assert "Traceback" not in text
    for line in text.splitlines():
        if line.strip() and not line.startswith("{"):
            assert '"route"' not in line and "request_id" not in line  # only LiteRT's start-up notes
