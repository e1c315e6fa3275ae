"""Property tests: random and mutated images and request bodies never give a 5xx or escape the handler.

Through the real function in a test client (an exception escaping ``handle`` would reach Flask and
become its HTML 500, so "always a JSON answer with status < 500 or 503" covers both). Bounded:
max_examples per property, no deadline, derandomized so CI runs are reproducible.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dermal_fn.core import imaging
from dermal_fn.errors import InvalidImage, UnsupportedMediaType
from tests import hostile_fixtures as hf

SEEDS = {
    "jpeg": hf.jpeg(size=64),
    "png": hf.png(size=64),
    "gif": hf.animated("GIF")[0],
    "webp": hf.animated("WEBP")[0],
}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@st.composite
def mutated_image(draw: st.DrawFn) -> bytes:
    """A valid image with byte flips, a truncation, or a splice of another image's header."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 8))):
        index = draw(st.integers(0, len(data) - 1))
        data[index] = draw(st.integers(0, 255))
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "header_ints"]))
    if kind == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif kind == "splice":
        other = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
        cut = draw(st.integers(0, min(len(other), 200)))
        data = bytearray(other[:cut]) + data[cut:]
    elif kind == "header_ints" and len(data) > 40:
        # overwrite a 16-bit field in the header area with an extreme value (dimensions live there)
        index = draw(st.integers(0, min(len(data), 200) - 2))
        data[index : index + 2] = draw(st.sampled_from([b"\xff\xff", b"\x00\x00", b"\x7f\xff", b"\x80\x00"]))
    return bytes(data)


@FUZZ
@given(data=st.one_of(mutated_image(), st.binary(max_size=2048)))
def test_decode_raises_only_its_own_errors(data: bytes) -> None:
    try:
        decoded = imaging.decode(data, max_pixels=4_000_000)
    except (InvalidImage, UnsupportedMediaType):
        return
    assert decoded.rgb.mode == "RGB"


@pytest.fixture(scope="module")
def client(small_bundle: Path) -> Iterator[Any]:
    with hf.client_for(
        hf.settings_for(small_bundle, max_upload_mb=0.25, max_image_megapixels=4.0)
    ) as test_client:
        yield test_client


def assert_json_answer(response: Any) -> None:
    assert response.status_code < 500 or response.status_code == 503, response.get_data(as_text=True)[:300]
    assert response.mimetype == "application/json"
    body = json.loads(response.get_data())
    if response.status_code >= 400:
        assert set(body["error"]) == {"code", "message", "request_id"}


CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            "image/jpeg",
            "image/png",
            "application/octet-stream",
            "application/json",
            "multipart/form-data; boundary=b",
            "multipart/form-data",
            "text/plain",
            "",
            "image/*; q=0.1",
            "application/json; charset=latin-1",
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
)
OPTION_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
QUERY = st.dictionaries(
    st.sampled_from(["top_k", "class", "score", "gradcam", "other"]), st.text(max_size=12), max_size=4
)


@FUZZ
@given(data=st.one_of(mutated_image(), st.binary(max_size=4096)), content_type=CONTENT_TYPES, query=QUERY)
def test_raw_bodies_never_give_a_server_error(
    client: Any, data: bytes, content_type: str, query: dict[str, str]
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    assert_json_answer(client.post("/predict", data=data, headers=headers, query_string=query))


@FUZZ
@given(
    image=st.one_of(mutated_image(), st.binary(max_size=512)),
    options=st.dictionaries(
        st.sampled_from(["top_k", "class", "score", "gradcam"]), OPTION_VALUES, max_size=4
    ),
    encoding=st.sampled_from(["base64", "data_url", "garbage"]),
)
def test_json_bodies_never_give_a_server_error(
    client: Any, image: bytes, options: dict[str, Any], encoding: str
) -> None:
    import base64

    encoded = base64.b64encode(image).decode()
    if encoding == "data_url":
        encoded = "data:image/png;base64," + encoded
    elif encoding == "garbage":
        encoded = encoded[::-1] + "%$"
    body = json.dumps({"image_base64": encoded, **options}, allow_nan=True)
    assert_json_answer(client.post("/predict", data=body, content_type="application/json"))


@FUZZ
@given(
    image=st.one_of(mutated_image(), st.binary(max_size=512)),
    fields=st.lists(
        st.tuples(
            st.sampled_from(["image", "top_k", "class", "score", "gradcam", "x"]), st.binary(max_size=20)
        ),
        max_size=4,
    ),
    cut=st.one_of(st.none(), st.integers(0, 2000)),
)
def test_multipart_bodies_never_give_a_server_error(
    client: Any, image: bytes, fields: list[tuple[str, bytes]], cut: int | None
) -> None:
    parts: list[tuple[str, bytes, str | None]] = [("image", image, "photo.jpg")]
    parts += [(name, value, None) for name, value in fields]
    body, content_type = hf.multipart(parts)
    if cut is not None:
        body = body[:cut]
    assert_json_answer(client.post("/predict", data=body, content_type=content_type))


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    path=st.one_of(
        st.sampled_from(["/", "/predict", "/health", "/health/", "/memory", "/openapi.json", "//predict"]),
        st.text(
            alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="?#"), max_size=30
        ).map(lambda text: "/" + text),
    ),
    headers=st.dictionaries(
        st.sampled_from(["X-Request-Id", "X-Cloud-Trace-Context", "Authorization", "Origin", "Content-Type"]),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80),
        max_size=3,
    ),
)
def test_any_route_method_and_headers_never_give_a_server_error(
    client: Any, method: str, path: str, headers: dict[str, str]
) -> None:
    response = client.open(path, method=method, headers=headers, data=b"")
    assert response.status_code < 500 or response.status_code == 503
    if method != "HEAD" and response.status_code != 204 and response.mimetype == "application/json":
        json.loads(response.get_data())
