"""Models at an https:// URL, against a real HTTPS server on loopback (tests/model_server.py).

Downloads that drop half way resume with Range; 503s are retried on a driven clock; the cached copy
is revalidated by ETag or, pinned, used without a request; a wrong pin, a cap or a 404 leave no file;
a presigned URL's query string is in no log line, error, /health or /model; and the real
functions-framework process serves a bundle from a URL, or says why not without a crash loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from model_fetch import (
    ChecksumMismatch,
    InvalidModelUri,
    ModelNotFound,
    ModelTooLarge,
    StorageUnavailable,
    fetch_model,
)
from model_fetch.http import Backoff, fetch_http
from model_fetch.result import FetchedModel
from model_fetch.uri import HttpLocation, parse_model_uri, redact_uri
from tests.http_fixtures import ServerProcess, jpeg_bytes
from tests.model_server import ModelServer, model_server
from tests.waiting import FakeClock

MODEL = bytes(range(256)) * 4096  # 1 MiB, not all alike
SHA = hashlib.sha256(MODEL).hexdigest()
SECRET = "X-Amz-Signature=presigned-secret"


@pytest.fixture
def https(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModelServer]:
    with model_server({"/models/skin.dermal": MODEL}, folder=tmp_path, tls=True) as server:
        assert server.ca_file is not None
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(server.ca_file))
        yield server


def fetch(
    url: str,
    cache: Path,
    *,
    pin: str | None = None,
    clock: FakeClock | None = None,
    pauses: list[float] | None = None,
    max_bytes: int | None = None,
    timeout_s: float = 30.0,
) -> FetchedModel:
    """fetch_http with a driven clock: a pause moves the clock instead of sleeping."""
    clock = clock or FakeClock()
    recorded = pauses if pauses is not None else []

    def pause(seconds: float) -> None:
        recorded.append(seconds)
        clock.advance(seconds)

    location = parse_model_uri(url)
    assert isinstance(location, HttpLocation)
    return fetch_http(
        location, cache_dir=cache, expected_sha256=pin, timeout_s=timeout_s, started=clock(),
        max_bytes=max_bytes, clock=clock, pause=pause, backoff=Backoff(),
    )  # fmt: skip


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.endswith(".part"))


def test_an_https_model_is_downloaded_verified_and_named_without_its_query(
    https: ModelServer, tmp_path: Path
) -> None:
    fetched = fetch(f"{https.url}/models/skin.dermal?{SECRET}", tmp_path / "cache")
    assert fetched.path.read_bytes() == MODEL and fetched.sha256 == SHA and fetched.downloaded
    assert fetched.source == f"{https.url}/models/skin.dermal"
    assert "secret" not in str(fetched)
    assert leftovers(tmp_path / "cache") == []


def test_a_connection_dropped_half_way_is_resumed_with_range(https: ModelServer, tmp_path: Path) -> None:
    https.faults.drop_after_bytes, https.faults.drops = 300_000, 2
    pauses: list[float] = []
    fetched = fetch(f"{https.url}/models/skin.dermal", tmp_path / "cache", pauses=pauses)
    assert fetched.path.read_bytes() == MODEL
    gets = https.gets("/models/skin.dermal")
    assert len(gets) == 3 and gets[0].get("range") is None
    starts = [int(g["range"].removeprefix("bytes=").rstrip("-")) for g in gets[1:]]
    assert 0 < starts[0] <= 300_000 < starts[1] <= starts[0] + 300_000  # each resumed where it was cut
    assert all(g.get("if-range") == https.etag("/models/skin.dermal") for g in gets[1:])
    assert pauses == [0.25, 0.5]  # the backoff, on the driven clock


def test_a_server_that_ignores_range_is_downloaded_from_the_start_again(
    https: ModelServer, tmp_path: Path
) -> None:
    https.faults.drop_after_bytes, https.faults.drops, https.faults.ignore_range = 500_000, 1, True
    fetched = fetch(f"{https.url}/models/skin.dermal", tmp_path / "cache", pin=SHA)
    assert fetched.path.read_bytes() == MODEL


def test_503s_are_retried_with_backoff_until_the_deadline(https: ModelServer, tmp_path: Path) -> None:
    https.faults.unavailable = 2
    pauses: list[float] = []
    assert fetch(f"{https.url}/models/skin.dermal", tmp_path / "a", pauses=pauses).path.read_bytes() == MODEL
    assert pauses == [0.25, 0.5]
    https.faults.unavailable = 10_000
    with pytest.raises(StorageUnavailable, match="within timeout_s=5"):
        fetch(f"{https.url}/models/skin.dermal", tmp_path / "b", timeout_s=5)
    assert leftovers(tmp_path / "b") == []


def test_the_cached_copy_is_revalidated_by_etag_or_used_as_pinned(https: ModelServer, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = fetch(f"{https.url}/models/skin.dermal?{SECRET}", cache)
    again = fetch(
        f"{https.url}/models/skin.dermal?X-Amz-Signature=another", cache
    )  # re-signed URL, same file
    assert again.path == first.path and not again.downloaded
    assert https.gets("/models/skin.dermal")[-1].get("if-none-match") == https.etag("/models/skin.dermal")
    asked = len(https.requests)
    pinned = fetch(f"{https.url}/models/skin.dermal", cache, pin=SHA)
    assert pinned.path == first.path and not pinned.downloaded
    assert len(https.requests) == asked  # the pin names the bytes: no request at all


def test_a_changed_file_is_downloaded_again(https: ModelServer, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    fetch(f"{https.url}/models/skin.dermal", cache)
    https.files["/models/skin.dermal"] = MODEL[::-1]
    assert fetch(f"{https.url}/models/skin.dermal", cache).path.read_bytes() == MODEL[::-1]


@pytest.mark.parametrize(
    ("setup", "error", "message"),
    [
        ("wrong pin", ChecksumMismatch, "the MODEL_SHA256 pin"),
        ("too large", ModelTooLarge, "at most 0 MB"),
        ("missing", ModelNotFound, "HTTP 404"),
        ("forbidden", StorageUnavailable, "presigned URL may have expired"),
    ],
)
def test_refusals_leave_no_file_and_no_secret(
    https: ModelServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    setup: str,
    error: type[Exception],
    message: str,
) -> None:
    path = "/models/other.dermal" if setup == "missing" else "/models/skin.dermal"
    https.faults.forbidden = setup == "forbidden"
    cache = tmp_path / "cache"
    with caplog.at_level(logging.DEBUG), pytest.raises(error, match=message) as raised:
        fetch(
            f"{https.url}{path}?{SECRET}", cache, pin="0" * 64 if setup == "wrong pin" else None,
            max_bytes=1000 if setup == "too large" else None,
        )  # fmt: skip
    assert "secret" not in str(raised.value) and "secret" not in caplog.text
    assert [p.name for p in cache.iterdir() if not p.name.startswith("digests")] == []


def test_a_hugging_face_resolve_link_is_followed_and_its_signature_never_logged(
    https: ModelServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        fetched = fetch(f"{https.url}/resolve/models/skin.dermal?token=hf-secret", tmp_path / "cache")
    assert fetched.path.read_bytes() == MODEL
    assert [r["path"] for r in https.requests] == [
        "/resolve/models/skin.dermal?token=hf-secret",
        "/cdn/models/skin.dermal?X-Sig=cdn-secret",
    ]
    assert "secret" not in caplog.text and "X-Sig" not in caplog.text


def test_plain_http_needs_a_pin(tmp_path: Path) -> None:
    with model_server({"/m.dermal": MODEL}, folder=tmp_path) as server:
        with pytest.raises(InvalidModelUri, match="MODEL_SHA256 pin"):
            fetch_model(f"{server.url}/m.dermal", cache_dir=tmp_path / "cache")
        assert server.requests == []
        fetched = fetch_model(f"{server.url}/m.dermal", cache_dir=tmp_path / "cache", expected_sha256=SHA)
        assert fetched.path.read_bytes() == MODEL


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (
            "https://user:pw@huggingface.co/org/m/resolve/main/m.dermal?download=true#x",
            "https://huggingface.co/org/m/resolve/main/m.dermal",
        ),
        (
            "https://bucket.s3.amazonaws.com/m.dermal?X-Amz-Signature=abc",
            "https://bucket.s3.amazonaws.com/m.dermal",
        ),
        ("gs://bucket/m.dermal", "gs://bucket/m.dermal"),
        ("/srv/m.dermal", "/srv/m.dermal"),
    ],
)
def test_redacted_uris_keep_where_and_drop_secrets(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown


# --- the real server, with MODEL_URI at a URL ------------------------------------------------------------


@pytest.fixture
def bundle_server(test_bundle: Path, tmp_path: Path) -> Iterator[ModelServer]:
    with model_server(
        {"/models/skin.dermal": test_bundle.read_bytes()}, folder=tmp_path / "tls", tls=True
    ) as server:
        yield server


@pytest.mark.slow
def test_the_function_serves_a_bundle_from_a_presigned_url_that_dropped_half_way(
    bundle_server: ModelServer,
    server_factory: Callable[..., ServerProcess],
    test_bundle: Path,
    tmp_path: Path,
) -> None:
    bundle_server.faults.drop_after_bytes, bundle_server.faults.drops = 4000, 1
    assert bundle_server.ca_file is not None
    env = {
        "MODEL_URI": f"{bundle_server.url}/resolve/models/skin.dermal?{SECRET}",
        "REQUESTS_CA_BUNDLE": str(bundle_server.ca_file),
        "MODEL_CACHE_DIR": str(tmp_path / "cache"),
    }
    server = server_factory(env, wait="/memory")
    status, body = server.post_image("/predict", jpeg_bytes(width=160, height=120, seed=2))
    assert status == 200, server.log_tail()
    assert body["model"]["sha256"] == hashlib.sha256(test_bundle.read_bytes()).hexdigest()
    answers = [
        json.dumps(body),
        json.dumps(server.get_json("/health")[1]),
        json.dumps(server.get_json("/model")[1]),
    ]
    assert len(bundle_server.gets("/cdn/models/skin.dermal")) == 2  # dropped, then resumed
    for text in [*answers, server.log_text()]:
        assert "secret" not in text and "X-Sig" not in text


@pytest.mark.slow
def test_a_wrong_pin_is_a_model_error_not_a_crash_loop(
    bundle_server: ModelServer, server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    assert bundle_server.ca_file is not None
    env = {
        "MODEL_URI": f"{bundle_server.url}/models/skin.dermal?{SECRET}",
        "MODEL_SHA256": "0" * 64,
        "REQUESTS_CA_BUNDLE": str(bundle_server.ca_file),
        "MODEL_CACHE_DIR": str(tmp_path / "cache"),
        "MODEL_RETRY_S": "30",
    }
    server = server_factory(env, wait="/memory")
    workers = server.worker_pids()
    status, body = server.post_image("/predict", jpeg_bytes(width=160, height=120, seed=2))
    assert status == 503 and body["error"]["code"] == "model_unavailable"
    status, health = server.get_json("/health")
    assert (
        status == 503
        and health["model_state"] == "error"
        and "ChecksumMismatch" in health["error"]["message"]
    )
    assert server.worker_pids() == workers  # the same worker: refused, not crashed
    assert len(bundle_server.gets("/models/skin.dermal")) == 1  # and not asked again within the backoff
    assert "secret" not in server.log_text() and "secret" not in json.dumps(health)
