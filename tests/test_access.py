"""Access: optional API_KEY (Bearer) on /predict and /memory, open /health and page; CORS off by default."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import hostile_fixtures as hf

KEY = "s3cret-key-for-tests"
JPEG = hf.jpeg(size=64)


@pytest.fixture
def keyed(small_bundle: Path) -> Iterator[Any]:
    with hf.client_for(hf.settings_for(small_bundle, api_key=KEY)) as client:
        yield client


@pytest.fixture
def open_client(small_bundle: Path) -> Iterator[Any]:
    with hf.client_for(hf.settings_for(small_bundle)) as client:
        yield client


@pytest.fixture
def cors_client(small_bundle: Path) -> Iterator[Any]:
    settings = hf.settings_for(small_bundle, cors_origins=("https://clinic.example",), api_key=KEY)
    with hf.client_for(settings) as client:
        yield client


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong",
        f"Basic {KEY}",
        f"Bearer {KEY}x",
        f"Bearer {KEY[:-1]}",
        KEY,
    ],
    ids=["none", "empty", "scheme_only", "scheme_space", "wrong", "basic", "longer", "shorter", "no_scheme"],
)
@pytest.mark.parametrize("path", ["/predict", "/", "/memory"])
def test_missing_or_wrong_key_is_401(keyed: Any, path: str, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    if path == "/memory":
        response = keyed.get(path, headers=headers)
    else:
        response = keyed.post(path, data=JPEG, content_type="image/jpeg", headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert KEY not in response.get_data(as_text=True)


@pytest.mark.parametrize("authorization", [f"Bearer {KEY}", f"bearer {KEY}", f"Bearer  {KEY} "])
def test_right_key_is_accepted(keyed: Any, authorization: str) -> None:
    predicted = keyed.post(
        "/predict", data=JPEG, content_type="image/jpeg", headers={"Authorization": authorization}
    )
    assert predicted.status_code == 200
    assert predicted.get_json()["predictions"]
    memory = keyed.get("/memory", headers={"Authorization": authorization})
    assert memory.status_code == 200 and memory.get_json()["status"] == "ok"


@pytest.mark.parametrize("path", ["/health", "/health/", "/", "/openapi.json"])
def test_health_page_and_schema_stay_open(keyed: Any, path: str) -> None:
    response = keyed.get(path)
    assert response.status_code == 200


def test_bad_upload_without_key_is_401_not_400(keyed: Any) -> None:
    response = keyed.post("/predict", data=b"not an image", content_type="image/jpeg")
    assert response.status_code == 401  # nothing about the upload is revealed before auth


def test_no_key_configured_means_open(open_client: Any) -> None:
    assert open_client.post("/predict", data=JPEG, content_type="image/jpeg").status_code == 200
    assert open_client.get("/memory").status_code == 200


def test_cors_is_off_by_default(open_client: Any) -> None:
    response = open_client.post(
        "/predict", data=JPEG, content_type="image/jpeg", headers={"Origin": "https://clinic.example"}
    )
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response.headers
    preflight = open_client.options(
        "/predict",
        headers={"Origin": "https://clinic.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 405
    assert "Access-Control-Allow-Origin" not in preflight.headers


def test_cors_allows_listed_origin(cors_client: Any) -> None:
    response = cors_client.post(
        "/predict",
        data=JPEG,
        content_type="image/jpeg",
        headers={"Origin": "https://clinic.example", "Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "https://clinic.example"
    assert "Origin" in response.headers["Vary"]
    exposed = response.headers["Access-Control-Expose-Headers"]
    assert "Retry-After" in exposed and "X-Request-Id" in exposed


def test_cors_preflight_is_204_with_headers_and_needs_no_key(cors_client: Any) -> None:
    preflight = cors_client.options(
        "/predict",
        headers={
            "Origin": "https://clinic.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://clinic.example"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    allowed = preflight.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed


def test_cors_ignores_other_origins(cors_client: Any) -> None:
    response = cors_client.get("/health", headers={"Origin": "https://evil.example"})
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response.headers
    preflight = cors_client.options(
        "/predict", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "Access-Control-Allow-Origin" not in preflight.headers


def test_cors_errors_carry_the_headers_too(cors_client: Any) -> None:
    """A browser can only read a 401 or 413 if the error carries the CORS headers."""
    response = cors_client.post(
        "/predict", data=JPEG, content_type="image/jpeg", headers={"Origin": "https://clinic.example"}
    )
    assert response.status_code == 401
    assert response.headers["Access-Control-Allow-Origin"] == "https://clinic.example"


def test_cors_wildcard(small_bundle: Path) -> None:
    with hf.client_for(hf.settings_for(small_bundle, cors_origins=("*",))) as client:
        response = client.get("/health", headers={"Origin": "https://anywhere.example"})
        assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_anonymous_health_does_not_say_which_model_is_served(keyed: Any, small_bundle: Path) -> None:
    """With API_KEY set, /health stays open for the platform but keeps the model's identity to key holders."""
    import hashlib

    sha256 = hashlib.sha256(small_bundle.read_bytes()).hexdigest()
    assert (
        keyed.post(
            "/predict", data=JPEG, content_type="image/jpeg", headers={"Authorization": f"Bearer {KEY}"}
        ).status_code
        == 200
    )
    anonymous = keyed.get("/health")
    assert anonymous.status_code == 200 and anonymous.get_json()["model_loaded"] is True
    text = anonymous.get_data(as_text=True)
    assert (
        "model" not in anonymous.get_json()
        and sha256 not in text
        and "synthetic-small-test-model" not in text
    )
    trusted = keyed.get("/health", headers={"Authorization": f"Bearer {KEY}"}).get_json()
    assert trusted["model"]["sha256"] == sha256 and trusted["model"]["labels"]
