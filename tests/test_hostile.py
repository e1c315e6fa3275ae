"""Hostile and odd input: every bad request gets its exact status and JSON error code; odd images work.

Through the real function (``create_app(...).test_client()``), and a real functions-framework process
where streaming and concurrency matter (chunked 413, a burst of mixed bombs and photos).
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from dermal_fn.models import DEMO_BUNDLE
from dermal_fn.serving.service import get_service
from tests import hostile_fixtures as hf
from tests.http_fixtures import read_response, send_until_answered
from tests.waiting import wait_until

LIMIT_BYTES = 1024 * 1024  # MAX_UPLOAD_MB=1 in these tests
JPEG = hf.jpeg(size=96)
PNG = hf.png(size=96)
B64 = base64.b64encode(JPEG).decode()


@pytest.fixture(scope="module")
def client(small_bundle: Path) -> Iterator[Any]:
    with hf.client_for(hf.settings_for(small_bundle)) as test_client:
        yield test_client


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """The API's error body, exactly: status, JSON, {"error": {"code", "message", "request_id"}}."""
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "request_id"}
    assert body["error"]["request_id"] == response.headers["X-Request-Id"]
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"].startswith("expected")
    return body


def mp(parts: list[tuple[str, bytes, str | None]]) -> dict[str, Any]:
    data, content_type = hf.multipart(parts)
    return {"data": data, "content_type": content_type}


def js(value: Any) -> dict[str, Any]:
    return {"data": json.dumps(value).encode(), "content_type": "application/json"}


BAD_REQUESTS: dict[str, tuple[dict[str, Any], int, str]] = {
    # body and type
    "empty_image_body": ({"data": b"", "content_type": "image/jpeg"}, 400, "invalid_image"),
    "empty_octet_stream": ({"data": b"", "content_type": "application/octet-stream"}, 400, "invalid_image"),
    "empty_no_type": ({"data": b""}, 400, "invalid_image"),
    "text_plain": (
        {"data": b"a photo of my arm", "content_type": "text/plain"},
        415,
        "unsupported_media_type",
    ),
    "text_as_jpeg": ({"data": b"a photo of my arm", "content_type": "image/jpeg"}, 400, "invalid_image"),
    "html_as_png": (
        {"data": b"<html><body>hi</body></html>", "content_type": "image/png"},
        400,
        "invalid_image",
    ),
    "random_as_png": ({"data": bytes(range(256)) * 4, "content_type": "image/png"}, 400, "invalid_image"),
    "form_urlencoded": (
        {"data": b"image=abc", "content_type": "application/x-www-form-urlencoded"},
        415,
        "unsupported_media_type",
    ),
    # damaged and hostile images
    "truncated_jpeg": ({"data": JPEG[: len(JPEG) // 2], "content_type": "image/jpeg"}, 400, "invalid_image"),
    "truncated_jpeg_header": ({"data": JPEG[:300], "content_type": "image/jpeg"}, 400, "invalid_image"),
    "truncated_png": ({"data": PNG[: len(PNG) // 2], "content_type": "image/png"}, 400, "invalid_image"),
    "truncated_png_header": ({"data": PNG[:40], "content_type": "image/png"}, 400, "invalid_image"),
    "png_bomb_30000": ({"data": hf.png_bomb(), "content_type": "image/png"}, 400, "invalid_image"),
    "png_bomb_8000": ({"data": hf.png_bomb(8_000, 8_000), "content_type": "image/png"}, 400, "invalid_image"),
    "jpeg_bomb": ({"data": hf.jpeg_bomb(), "content_type": "image/jpeg"}, 400, "invalid_image"),
    "gif_bomb": ({"data": hf.gif_bomb(), "content_type": "image/gif"}, 400, "invalid_image"),
    "svg": ({"data": hf.SVG, "content_type": "image/svg+xml"}, 415, "unsupported_media_type"),
    "svg_xml_as_octets": (
        {"data": hf.SVG_XML, "content_type": "application/octet-stream"},
        415,
        "unsupported_media_type",
    ),
    "heic_cut_short": ({"data": hf.heic(), "content_type": "image/heic"}, 400, "invalid_image"),
    "heic_cut_short_as_jpeg": ({"data": hf.heic(), "content_type": "image/jpeg"}, 400, "invalid_image"),
    "video": ({"data": hf.mp4(), "content_type": "video/mp4"}, 415, "unsupported_media_type"),
    "avif_cut_short": ({"data": hf.avif(), "content_type": "image/avif"}, 400, "invalid_image"),
    "pdf": ({"data": hf.PDF, "content_type": "application/pdf"}, 415, "unsupported_media_type"),
    "pdf_as_octets": (
        {"data": hf.PDF, "content_type": "application/octet-stream"},
        415,
        "unsupported_media_type",
    ),
    # too large (Content-Length is set by the test client)
    "over_limit_raw": (
        {"data": b"\xff\xd8\xff" + b"\0" * LIMIT_BYTES, "content_type": "image/jpeg"},
        413,
        "payload_too_large",
    ),
    "over_limit_multipart": (mp([("image", b"\0" * (LIMIT_BYTES + 1), "a.jpg")]), 413, "payload_too_large"),
    "over_limit_json": (js({"image_base64": "A" * (LIMIT_BYTES + 4)}), 413, "payload_too_large"),
    # malformed multipart
    "multipart_no_boundary": (
        {"data": mp([("image", JPEG, "a.jpg")])["data"], "content_type": "multipart/form-data"},
        400,
        "invalid_request",
    ),
    "multipart_wrong_boundary": (
        {
            "data": mp([("image", JPEG, "a.jpg")])["data"],
            "content_type": "multipart/form-data; boundary=other",
        },
        400,
        "invalid_request",
    ),
    "multipart_garbage": (
        {"data": b"--b\r\nnonsense\r\n\r\n", "content_type": "multipart/form-data; boundary=b"},
        400,
        "invalid_request",
    ),
    "multipart_truncated": (
        {"data": mp([("image", JPEG, "a.jpg")])["data"][:-40], "content_type": mp([])["content_type"]},
        400,
        "invalid_request",
    ),
    "multipart_empty": (
        {"data": b"", "content_type": "multipart/form-data; boundary=b"},
        400,
        "invalid_request",
    ),
    "multipart_image_as_text": (mp([("image", b"not a file", None)]), 400, "invalid_request"),
    "multipart_wrong_field": (mp([("file", JPEG, "a.jpg")]), 400, "invalid_request"),
    "multipart_empty_file": (mp([("image", b"", "a.jpg")]), 400, "invalid_image"),
    "multipart_too_many_parts": (mp([(f"f{i}", b"x", None) for i in range(300)]), 400, "invalid_request"),
    "multipart_text_file": (mp([("image", b"hello there", "a.jpg")]), 400, "invalid_image"),
    "multipart_svg_file": (mp([("image", hf.SVG, "a.svg")]), 415, "unsupported_media_type"),
    # malformed JSON and base64
    "json_malformed": (
        {"data": b'{"image_base64": ', "content_type": "application/json"},
        400,
        "invalid_request",
    ),
    "json_empty": ({"data": b"", "content_type": "application/json"}, 400, "invalid_request"),
    "json_array": (js([B64]), 400, "invalid_request"),
    "json_string": (js(B64), 400, "invalid_request"),
    "json_no_image": (js({"image": B64}), 400, "invalid_request"),
    "json_image_number": (js({"image_base64": 12}), 400, "invalid_request"),
    "json_image_blank": (js({"image_base64": "  "}), 400, "invalid_request"),
    "json_not_utf8": (
        {"data": b'{"image_base64": "\xff\xfe"}', "content_type": "application/json"},
        400,
        "invalid_request",
    ),
    "json_nested_deeply": (
        {"data": b"[" * 200_000 + b"]" * 200_000, "content_type": "application/json"},
        400,
        "invalid_request",
    ),
    "base64_invalid_chars": (js({"image_base64": "!!!not base64!!!"}), 400, "invalid_request"),
    "base64_bad_padding": (js({"image_base64": B64[:-1] + "=A"}), 400, "invalid_request"),
    "base64_of_text": (js({"image_base64": base64.b64encode(b"just text").decode()}), 400, "invalid_image"),
    "base64_of_bomb": (js({"image_base64": base64.b64encode(hf.png_bomb()).decode()}), 400, "invalid_image"),
    "base64_of_a_video": (
        js({"image_base64": base64.b64encode(hf.mp4()).decode()}),
        415,
        "unsupported_media_type",
    ),
}


@pytest.mark.parametrize(("name"), sorted(BAD_REQUESTS))
def test_bad_request_gets_its_status_and_code(client: Any, name: str) -> None:
    kwargs, status, code = BAD_REQUESTS[name]
    started = time.perf_counter()
    response = client.post("/predict", **kwargs)
    assert_error(response, status, code)
    assert time.perf_counter() - started < 2.0  # every refusal is fast (bombs are not decoded)


def test_bomb_is_refused_in_under_a_second(client: Any) -> None:
    bomb = hf.png_bomb(30_000, 30_000)
    assert len(bomb) < 5_000
    started = time.perf_counter()
    response = client.post("/predict", data=bomb, content_type="image/png")
    elapsed = time.perf_counter() - started
    body = assert_error(response, 400, "invalid_image")
    assert "megapixels" in body["error"]["message"]
    assert elapsed < 1.0


BAD_OPTIONS: list[tuple[str, Any]] = [
    ("top_k", "0"),
    ("top_k", "-1"),
    ("top_k", "99"),
    ("top_k", "abc"),
    ("top_k", "1.5"),
    ("top_k", "²"),
    ("top_k", "9" * 40),
    ("class", "4"),
    ("class", "-1"),
    ("class", "no_such_label"),
    ("class", "³"),
    ("score", "softmax"),
    ("score", "LOGIT "),
    ("gradcam", "maybe"),
    ("gradcam", "2"),
]


@pytest.mark.parametrize(("key", "value"), BAD_OPTIONS)
@pytest.mark.parametrize("where", ["query", "form"])
def test_bad_option_is_422(client: Any, where: str, key: str, value: str) -> None:
    if where == "query":
        response = client.post("/predict", data=JPEG, content_type="image/jpeg", query_string={key: value})
    else:
        response = client.post("/predict", **mp([("image", JPEG, "a.jpg"), (key, value.encode(), None)]))
    body = assert_error(response, 422, "invalid_option")
    assert key in body["error"]["message"]


BAD_JSON_OPTIONS: list[tuple[str, Any]] = [
    ("top_k", 0),
    ("top_k", 1.5),
    ("top_k", True),
    ("top_k", [1]),
    ("top_k", {"n": 1}),
    ("top_k", 1e300),
    ("class", 1.0),
    ("class", False),
    ("class", [0]),
    ("class", 17),
    ("score", 1),
    ("score", ["logit"]),
    ("score", {"kind": "logit"}),
    ("gradcam", 1),
    ("gradcam", "perhaps"),
    ("gradcam", [True]),
]


@pytest.mark.parametrize(("key", "value"), BAD_JSON_OPTIONS)
def test_bad_json_option_is_422(client: Any, key: str, value: Any) -> None:
    response = client.post("/predict", **js({"image_base64": B64, key: value}))
    body = assert_error(response, 422, "invalid_option")
    assert key in body["error"]["message"]


def test_long_option_values_are_described_not_echoed(client: Any) -> None:
    secret = "Z" * 500
    response = client.post("/predict", **js({"image_base64": B64, "class": secret}))
    body = assert_error(response, 422, "invalid_option")
    assert "ZZZZZZZZ" not in body["error"]["message"]
    assert "500 characters" in body["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/predict", 405, "method_not_allowed"),
        ("PUT", "/predict", 405, "method_not_allowed"),
        ("DELETE", "/health", 405, "method_not_allowed"),
        ("POST", "/health", 405, "method_not_allowed"),
        ("GET", "/nope", 404, "not_found"),
        ("POST", "/predict/extra", 404, "not_found"),
    ],
)
def test_wrong_route_or_method(client: Any, method: str, path: str, status: int, code: str) -> None:
    response = client.open(path, method=method, data=JPEG, content_type="image/jpeg")
    assert_error(response, status, code)
    if status == 405:
        assert response.headers["Allow"]


def assert_prediction(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    body = response.get_json()
    assert set(body) == {"model", "predictions", "gradcam", "timing_ms", "assessment"}
    assert len(body["predictions"]) == 3
    assert body["gradcam"]["status"] == "ok"
    return body


@pytest.mark.parametrize("name", sorted(hf.odd_valid_images()))
def test_odd_but_valid_image_gives_200(client: Any, name: str) -> None:
    data = hf.odd_valid_images()[name]
    assert_prediction(client.post("/predict", data=data, content_type="application/octet-stream"))
    assert_prediction(client.post("/predict", **mp([("image", data, "upload.bin")])))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"data": JPEG, "content_type": "image/jpeg"},
        {"data": JPEG},
        {"data": PNG, "content_type": "image/jpeg"},  # the bytes decide, not the declared type
        {"data": JPEG, "content_type": "image/jpeg; charset=binary"},
        mp([("image", JPEG, "a.jpg"), ("top_k", b"3", None)]),
        js({"image_base64": B64}),
        js({"image_base64": "data:image/jpeg;base64," + B64}),
        js({"image_base64": "\n".join(B64[i : i + 76] for i in range(0, len(B64), 76))}),
        js({"image_base64": B64.rstrip("=")}),
        js({"image_base64": B64, "top_k": "3", "class": None, "gradcam": "true"}),
    ],
    ids=[
        "raw_jpeg",
        "raw_no_type",
        "png_declared_jpeg",
        "type_params",
        "multipart",
        "json",
        "json_data_url",
        "json_wrapped_base64",
        "json_unpadded_base64",
        "json_string_options",
    ],
)
def test_valid_uploads_give_200(client: Any, kwargs: dict[str, Any]) -> None:
    assert_prediction(client.post("/predict", **kwargs))


def test_upload_exactly_at_the_limit_is_read(client: Any) -> None:
    data = JPEG + b"\0" * (LIMIT_BYTES - len(JPEG))  # trailing bytes after the JPEG end marker
    assert len(data) == LIMIT_BYTES
    assert_prediction(client.post("/predict", data=data, content_type="image/jpeg"))


def test_malformed_request_ids_are_replaced(client: Any) -> None:
    long_id = client.get("/health", headers={"X-Request-Id": "x" * 5000})
    assert len(long_id.headers["X-Request-Id"]) == 32
    odd = client.get("/health", headers={"X-Request-Id": "<script>"})
    assert odd.headers["X-Request-Id"] != "<script>"
    kept = client.get("/health", headers={"X-Request-Id": "abc-123"})
    assert kept.headers["X-Request-Id"] == "abc-123"


# --- overload --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_queue", "timeout_s"), [(0, 0.0), (1, 0.2)])
def test_full_queue_gives_503_overloaded_and_health_still_answers(
    small_bundle: Path, max_queue: int, timeout_s: float
) -> None:
    settings = hf.settings_for(small_bundle, max_queue=max_queue, queue_timeout_s=timeout_s)
    with hf.client_for(settings) as test_client:
        assert_prediction(test_client.post("/predict", data=JPEG, content_type="image/jpeg"))
        gate = get_service().gate
        with gate:  # the one model slot is busy
            if max_queue:
                waiter = threading.Thread(
                    target=lambda: test_client.post("/predict", data=JPEG, content_type="image/jpeg")
                )
                waiter.start()
                wait_until(
                    lambda: gate.admitted >= 1, timeout_s=5, what="the waiter admitted", interval_s=0.005
                )
            response = test_client.post("/predict", data=JPEG, content_type="image/jpeg")
            body = assert_error(response, 503, "overloaded")
            assert response.headers["Retry-After"] == "2"
            assert "in flight" in body["error"]["message"] or "slot" in body["error"]["message"]
            health = test_client.get("/health")
            assert health.status_code == 200 and health.get_json()["status"] == "ok"
            if max_queue:
                waiter.join(timeout=5)
        assert_prediction(test_client.post("/predict", data=JPEG, content_type="image/jpeg"))


# --- a real functions-framework process --------------------------------------------------------------


@pytest.fixture(scope="module")
def server(small_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[hf.ServerProcess]:
    env = {
        "MODEL_URI": str(small_bundle),
        "MAX_UPLOAD_MB": "1",
        "MAX_QUEUE": "2",
        "QUEUE_TIMEOUT_S": "5",
        "THREADS": "8",
        "LITERT_THREADS": "1",
    }
    log = tmp_path_factory.mktemp("hostile-server") / "server.log"
    with hf.running_server(env=env, log_path=log) as process:
        yield process


def raw_exchange(port: int, head: bytes, body_chunks: Iterator[bytes]) -> tuple[int, bytes, int]:
    """Send a request head, then body chunks until the server answers; (status, body, bytes sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head)
        sent = send_until_answered(sock, body_chunks)
        status, _, body = read_response(sock)
    return status, body, sent


def test_chunked_upload_over_the_limit_is_refused_while_streaming(server: hf.ServerProcess) -> None:
    total = 64 * 1024 * 1024
    chunk = b"\0" * 65536

    def chunks() -> Iterator[bytes]:
        for _ in range(total // len(chunk)):
            yield f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        yield b"0\r\n\r\n"

    head = (
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    status, body, sent = raw_exchange(server.port, head, chunks())
    assert status == 413
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert sent < total // 2  # answered long before the client finished sending


def test_declared_content_length_over_the_limit_is_refused_before_any_body(server: hf.ServerProcess) -> None:
    head = (
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: 52428800\r\n\r\n"
    )
    status, body, sent = raw_exchange(server.port, head, iter(()))
    assert (status, sent) == (413, 0)
    assert json.loads(body)["error"]["code"] == "payload_too_large"


@pytest.mark.slow
def test_burst_of_bombs_and_photos_leaves_the_server_serving(server: hf.ServerProcess) -> None:
    """24 clients at once against 3 places: every bomb is refused, every photo is answered.

    Clients do what a client told 503 does: wait Retry-After and send again. Which requests get
    a place first is up to the scheduler (on a loaded machine the bombs can hold all three while
    every photo is turned away), so the check is on what each client ends with, not on who wins.
    """
    big_photo = hf.encode(hf.photo(size=256, seed=9).resize((1800, 1800)), "JPEG", quality=80)
    big_png = hf.encode(hf.photo(size=128, seed=10).resize((900, 900)), "PNG")
    uploads: list[tuple[bytes, str, int]] = [  # what is sent, and the status it must end with
        (hf.png_bomb(), "image/png", 400),
        (hf.jpeg_bomb(), "image/jpeg", 400),
        (hf.gif_bomb(), "image/gif", 400),
        (big_photo, "image/jpeg", 200),
        (big_png, "image/png", 200),
        (JPEG, "image/jpeg", 200),
    ] * 4
    assert len(uploads) == 24 and len(big_png) < LIMIT_BYTES and len(big_photo) < LIMIT_BYTES
    deadline = time.monotonic() + 120

    def post(data: bytes, content_type: str) -> tuple[int, bytes]:
        """Send until the answer is not 503 (or the deadline has passed): status and body."""
        while True:
            status, headers, body = server.request(
                "POST", "/predict", body=data, headers={"Content-Type": content_type}, timeout_s=60
            )
            if status != 503 or time.monotonic() > deadline:
                return status, body
            assert json.loads(body)["error"]["code"] == "overloaded", body[:300]
            time.sleep(int(headers["Retry-After"]))

    with ThreadPoolExecutor(max_workers=24) as pool:
        futures = [pool.submit(post, data, content_type) for data, content_type, _ in uploads]
        started = time.perf_counter()
        health_status, _, health_body = server.request("GET", "/health", timeout_s=10)
        health_s = time.perf_counter() - started
        answers = [future.result(timeout=180) for future in futures]

    assert health_status == 200 and json.loads(health_body)["status"] == "ok"
    assert health_s < 10
    for (_, _, expected), (status, body) in zip(uploads, answers, strict=True):
        assert status == expected, body[:300]
        payload = json.loads(body)
        if status == 400:
            assert payload["error"]["code"] == "invalid_image"
        else:
            assert payload["predictions"]
    status, _, body = server.request("POST", "/predict", body=JPEG, headers={"Content-Type": "image/jpeg"})
    assert status == 200 and json.loads(body)["predictions"]
    assert server.running


# --- EXIF orientation and the heatmap (needs the trained demo bundle) -----------------------------------


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_heatmap_lands_on_the_lesion_as_shown_for_exif_rotated_photos(orientation: int) -> None:
    import numpy as np
    from PIL import Image

    sample = hf.lesion(size=256, seed=11)
    upright = Image.fromarray(sample.image, mode="RGB")
    rotated = hf.exif_rotated(upright, orientation=orientation, fmt="JPEG")
    with hf.client_for(hf.settings_for(DEMO_BUNDLE, max_upload_mb=4.0)) as demo:
        plain = demo.post("/predict", data=hf.encode(upright, "JPEG", quality=95), content_type="image/jpeg")
        turned = demo.post("/predict", data=rotated, content_type="image/jpeg")
    grids = [np.asarray(r.get_json()["gradcam"]["grid"]) for r in (plain, turned)]
    peaks = [np.unravel_index(np.argmax(grid), grid.shape) for grid in grids]
    assert max(abs(a - b) for a, b in zip(peaks[0], peaks[1], strict=True)) <= 1
    rows, cols = grids[1].shape
    cell_h, cell_w = sample.mask.shape[0] / rows, sample.mask.shape[1] / cols
    row, col = peaks[1]
    window = sample.mask[
        int(max(0, (row - 1) * cell_h)) : int((row + 2) * cell_h),
        int(max(0, (col - 1) * cell_w)) : int((col + 2) * cell_w),
    ]
    assert window.any()  # the peak (within one cell) lies on the lesion as the viewer shows it


def test_a_slow_model_load_never_takes_every_thread_from_health(small_bundle: Path) -> None:
    """12 predicts while the load is under way (MAX_QUEUE 8): 9 are admitted and wait, 3 are refused at once."""
    settings = hf.settings_for(small_bundle, max_queue=8, queue_timeout_s=3.0)
    with hf.client_for(settings) as test_client:
        holder = get_service().holder
        statuses: list[int] = []
        lock = threading.Lock()

        def call() -> None:
            response = test_client.post("/predict", data=JPEG, content_type="image/jpeg")
            with lock:
                statuses.append(response.status_code)

        with holder._lock:  # a load is under way (it holds this lock for its whole length)
            threads = [threading.Thread(target=call) for _ in range(12)]
            for thread in threads:
                thread.start()
            wait_until(lambda: len(statuses) >= 3, timeout_s=5, what="three refusals", interval_s=0.01)
            assert sorted(statuses) == [503, 503, 503]  # refused at once: the house is full
            assert get_service().gate.admitted == 9
            health = test_client.get("/health")
            assert health.status_code == 200 and health.get_json()["model_state"] == "loading"
        for thread in threads:
            thread.join(timeout=10)
        assert sorted(statuses) == [200] * 9 + [503] * 3  # the load finished: the admitted ones are served
