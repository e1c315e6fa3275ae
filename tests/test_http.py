"""The HTTP contract through ``functions_framework.create_app(target="dermal", source="main.py")``.

Request forms, every option from query, form and JSON, the 200 body's exact shape, /health,
/memory, ENABLE_GRADCAM, the memory-pressure skip, 405s, and the original Django app's Python function.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flask
import numpy as np
import pytest
from PIL import Image

import dermal_fn
from dermal_fn.core import bundle as bundle_format
from dermal_fn.serving.config import Settings
from dermal_fn.serving.service import reset_service
from tests.http_fixtures import jpeg_bytes, png_bytes
from tests.waiting import FakeClock, wait_until

PHOTO_W, PHOTO_H = 200, 120  # not square: the overlay must keep the photo's aspect
JPEG = jpeg_bytes(width=PHOTO_W, height=PHOTO_H, seed=3)

Client = Any  # flask.testing.FlaskClient
Configure = Callable[..., None]


@pytest.fixture
def client(dermal_app: flask.Flask) -> Client:
    return dermal_app.test_client()


@pytest.fixture
def served(configure: Configure, test_bundle: Path) -> Path:
    """The service configured with the test bundle and defaults."""
    configure(MODEL_URI=str(test_bundle))
    return test_bundle


def labels_of(bundle: Path) -> tuple[str, ...]:
    return bundle_format.read(bundle).manifest.labels


def feature_grid_shape(bundle: Path) -> tuple[int, int]:
    h, w, _ = bundle_format.read(bundle).manifest.feature_map_shape
    return h, w


def post_raw(client: Client, data: bytes, content_type: str = "image/jpeg", query: str = "") -> Any:
    return client.post(f"/predict{query}", data=data, content_type=content_type)


def post_multipart(client: Client, data: bytes, fields: dict[str, str] | None = None, query: str = "") -> Any:
    form: dict[str, Any] = {"image": (io.BytesIO(data), "photo.jpg", "image/jpeg"), **(fields or {})}
    return client.post(f"/predict{query}", data=form, content_type="multipart/form-data")


def post_json(client: Client, data: bytes, keys: dict[str, Any] | None = None, query: str = "") -> Any:
    body = {"image_base64": base64.b64encode(data).decode(), **(keys or {})}
    return client.post(f"/predict{query}", data=json.dumps(body), content_type="application/json")


def check_body(body: dict[str, Any], bundle: Path, *, top_k: int = 3) -> None:
    """The 200 body of POST /predict, exactly."""
    labels = labels_of(bundle)
    assert set(body) == {"model", "predictions", "gradcam", "timing_ms", "assessment"}
    assert body["model"] == {
        "name": "tiny-test-model",
        "sha256": hashlib.sha256(bundle.read_bytes()).hexdigest(),
        "backend": "litert",
        "labels": list(labels),
        "calibrated": False,
    }
    assessment = body["assessment"]
    assert set(assessment) == {"quality", "distribution", "confidence"}
    assert assessment["distribution"] == {"status": "unknown", "score": None, "threshold": None}
    assert assessment["quality"]["status"] in ("ok", "poor")
    confidence = assessment["confidence"]
    assert confidence["max_probability"] == pytest.approx(body["predictions"][0]["probability"], abs=1e-6)
    assert confidence["status"] == (
        "confident" if confidence["max_probability"] >= confidence["threshold"] else "uncertain"
    )
    predictions = body["predictions"]
    assert len(predictions) == top_k
    for p in predictions:
        assert set(p) == {"index", "label", "probability"}
        assert p["label"] == labels[p["index"]]
        assert 0.0 <= p["probability"] <= 1.0
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    assert len({p["index"] for p in predictions}) == top_k
    assert set(body["timing_ms"]) == {"decode", "model", "gradcam", "total"}
    assert all(isinstance(v, float) and v >= 0.0 for v in body["timing_ms"].values())
    assert body["timing_ms"]["total"] >= body["timing_ms"]["model"]


def check_gradcam(
    gradcam: dict[str, Any], bundle: Path, *, aspect: tuple[int, int] = (PHOTO_W, PHOTO_H)
) -> None:
    """An ``ok`` heatmap: grid at the feature map's resolution in [0, 1], a PNG of the photo's aspect."""
    assert set(gradcam) == {"status", "class_index", "label", "layer", "score", "grid", "overlay_png"}
    assert gradcam["status"] == "ok"
    assert gradcam["label"] == labels_of(bundle)[gradcam["class_index"]]
    assert gradcam["layer"] == bundle_format.read(bundle).manifest.layer
    grid = np.asarray(gradcam["grid"], dtype=np.float64)
    assert grid.shape == feature_grid_shape(bundle)
    assert np.isfinite(grid).all()
    assert grid.min() >= 0.0
    assert grid.max() <= 1.0
    assert grid.max() == pytest.approx(1.0, abs=1e-3) or grid.max() == 0.0
    overlay = Image.open(io.BytesIO(base64.b64decode(gradcam["overlay_png"], validate=True)))
    assert overlay.format == "PNG"
    overlay.load()
    width, height = overlay.size
    assert abs(width / height - aspect[0] / aspect[1]) < 0.02


# --- request forms ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "content_type"),
    [
        ("multipart", "multipart/form-data"),
        ("raw", "image/jpeg"),
        ("raw", "image/png"),
        ("raw", "application/octet-stream"),
        ("json", "application/json"),
        ("json-data-url", "application/json"),
    ],
)
def test_every_request_form_answers_the_same(
    client: Client, served: Path, form: str, content_type: str
) -> None:
    image = png_bytes(width=PHOTO_W, height=PHOTO_H, seed=3) if content_type == "image/png" else JPEG
    if form == "multipart":
        response = post_multipart(client, image)
    elif form == "raw":
        response = post_raw(client, image, content_type)
    elif form == "json":
        response = post_json(client, image)
    else:
        data_url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
        response = client.post(
            "/predict", data=json.dumps({"image_base64": data_url}), content_type=content_type
        )
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    check_body(body, served)
    check_gradcam(body["gradcam"], served)
    if content_type != "image/png":  # the same JPEG bytes: the same answer whatever the envelope
        reference = post_raw(client, JPEG).get_json()
        assert body["predictions"] == reference["predictions"]
        assert body["gradcam"]["grid"] == reference["gradcam"]["grid"]


def test_post_root_is_predict(client: Client, served: Path) -> None:
    response = client.post("/", data=JPEG, content_type="image/jpeg")
    assert response.status_code == 200
    assert response.get_json()["predictions"] == post_raw(client, JPEG).get_json()["predictions"]


# --- options from query, form and JSON ---------------------------------------------------------------

SOURCES = ("query", "form", "json")


def send(client: Client, source: str, options: dict[str, Any]) -> Any:
    """POST the photo with ``options`` given as query parameters, multipart fields or JSON keys."""
    if source == "query":
        query = "?" + "&".join(f"{k}={v}" for k, v in options.items())
        return post_raw(client, JPEG, query=query)
    if source == "form":
        return post_multipart(client, JPEG, {k: str(v) for k, v in options.items()})
    return post_json(client, JPEG, options)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k(client: Client, served: Path, source: str, top_k: int) -> None:
    response = send(client, source, {"top_k": top_k})
    assert response.status_code == 200, response.get_data(as_text=True)
    check_body(response.get_json(), served, top_k=top_k)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("by", ["index", "label"])
def test_class_by_index_and_label(client: Client, served: Path, source: str, by: str) -> None:
    labels = labels_of(served)
    top = post_raw(client, JPEG).get_json()["predictions"][0]["index"]
    wanted = (top + 1) % len(labels)  # not the default class
    value: int | str = wanted if by == "index" else labels[wanted]
    response = send(client, source, {"class": value})
    assert response.status_code == 200, response.get_data(as_text=True)
    gradcam = response.get_json()["gradcam"]
    check_gradcam(gradcam, served)
    assert gradcam["class_index"] == wanted
    assert gradcam["label"] == labels[wanted]


def test_default_class_is_the_top_prediction(client: Client, served: Path) -> None:
    body = post_raw(client, JPEG).get_json()
    assert body["gradcam"]["class_index"] == body["predictions"][0]["index"]
    assert body["gradcam"]["score"] == "logit"


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("score", ["logit", "probability"])
def test_score(client: Client, served: Path, source: str, score: str) -> None:
    response = send(client, source, {"score": score, "class": 1})
    assert response.status_code == 200, response.get_data(as_text=True)
    gradcam = response.get_json()["gradcam"]
    check_gradcam(gradcam, served)
    assert gradcam["score"] == score


def test_score_changes_the_heatmap_of_a_non_top_class(client: Client, served: Path) -> None:
    """d p_c / d A differs from d logit_c / d A (a cross-term for other classes): the option is used."""
    top = post_raw(client, JPEG).get_json()["predictions"][0]["index"]
    other = (top + 1) % len(labels_of(served))
    logit = post_raw(client, JPEG, query=f"?class={other}&score=logit").get_json()["gradcam"]["grid"]
    prob = post_raw(client, JPEG, query=f"?class={other}&score=probability").get_json()["gradcam"]["grid"]
    assert not np.allclose(logit, prob, atol=1e-3)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(("value", "status"), [("false", "disabled"), ("true", "ok"), ("0", "disabled")])
def test_gradcam_option(client: Client, served: Path, source: str, value: str, status: str) -> None:
    options: dict[str, Any] = {"gradcam": value}
    if source == "json":
        options = {"gradcam": value not in ("false", "0")}
    response = send(client, source, options)
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    check_body(body, served)
    if status == "disabled":
        assert body["gradcam"] == {"status": "disabled", "by": "request"}
        assert body["timing_ms"]["gradcam"] == 0.0
    else:
        check_gradcam(body["gradcam"], served)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("overlay", ["png", "heatmap", "none", ""])
def test_overlay_option(client: Client, served: Path, source: str, overlay: str) -> None:
    """``overlay`` picks the picture: the blended photo (default), the heatmap alone, or none."""
    options: dict[str, Any] = {"overlay": overlay, "class": 1}
    response = send(client, source, options)
    assert response.status_code == 200, response.get_data(as_text=True)
    gradcam = response.get_json()["gradcam"]
    reference = post_raw(client, JPEG, query="?class=1").get_json()["gradcam"]
    assert gradcam["grid"] == reference["grid"]
    if overlay in ("png", ""):
        check_gradcam(gradcam, served)
        return
    expected = {"status", "class_index", "label", "layer", "score", "grid"}
    if overlay == "none":
        assert set(gradcam) == expected
        return
    assert set(gradcam) == expected | {"heatmap_png"}
    heat = Image.open(io.BytesIO(base64.b64decode(gradcam["heatmap_png"], validate=True)))
    assert heat.format == "PNG"
    assert heat.mode == "P"
    assert "transparency" in heat.info
    photo = Image.open(io.BytesIO(base64.b64decode(reference["overlay_png"], validate=True)))
    assert heat.size == photo.size


def test_heatmap_over_the_photo_is_the_overlay() -> None:
    """Laying ``heatmap_png`` over the photo ("source over", as a browser draws it) gives ``overlay_png``."""
    from dermal_fn.core import render

    rng = np.random.default_rng(3)
    grid = rng.random((5, 7)).astype(np.float32)
    grid[2, 3] = 0.0
    photo = Image.fromarray(rng.integers(0, 256, (90, 160, 3), dtype=np.uint8), mode="RGB")
    heat = Image.open(io.BytesIO(base64.b64decode(render.heatmap_png_base64(grid, photo.size))))
    laid = Image.alpha_composite(photo.convert("RGBA"), heat.convert("RGBA")).convert("RGB")
    drawn = Image.open(io.BytesIO(base64.b64decode(render.overlay_png_base64(photo, grid))))
    assert np.array_equal(np.asarray(laid), np.asarray(drawn.convert("RGB")))
    assert not np.array_equal(np.asarray(laid), np.asarray(photo))


def test_query_and_body_options_combine(client: Client, served: Path) -> None:
    """Query parameters and JSON keys both count; the body's value wins for the same key."""
    labels = labels_of(served)
    body = post_json(
        client, JPEG, {"top_k": 2, "class": labels[0]}, query="?score=probability&top_k=1"
    ).get_json()
    assert len(body["predictions"]) == 2
    assert body["gradcam"]["class_index"] == 0
    assert body["gradcam"]["score"] == "probability"


@pytest.mark.parametrize(
    "query",
    [
        "?top_k=0",
        "?top_k=abc",
        "?top_k=99",
        "?class=99",
        "?class=no_such_label",
        "?score=softmax",
        "?gradcam=maybe",
        "?overlay=jpeg",
        "?overlay=PNG",
    ],
)
def test_bad_option_is_422(client: Client, served: Path, query: str) -> None:
    response = post_raw(client, JPEG, query=query)
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "invalid_option"
    assert error["message"].startswith("expected ")


# --- ENABLE_GRADCAM and memory pressure --------------------------------------------------------------


def test_enable_gradcam_false_disables_heatmaps(
    client: Client, configure: Configure, test_bundle: Path
) -> None:
    configure(MODEL_URI=str(test_bundle), ENABLE_GRADCAM="false")
    for response in (post_raw(client, JPEG), post_raw(client, JPEG, query="?gradcam=true")):
        assert response.status_code == 200
        body = response.get_json()
        check_body(body, test_bundle)
        # a client cannot turn on what the operator turned off
        assert body["gradcam"] == {"status": "disabled", "by": "operator"}
    assert client.get("/memory").get_json()["gradcam_enabled"] is False
    assert client.get("/health").get_json()["gradcam_enabled"] is False


def test_memory_pressure_skips_the_heatmap(client: Client, configure: Configure, test_bundle: Path) -> None:
    configure(MODEL_URI=str(test_bundle), MEMORY_SOFT_LIMIT_MB="1")
    response = post_raw(client, JPEG)
    assert response.status_code == 200
    body = response.get_json()
    check_body(body, test_bundle)
    gradcam = body["gradcam"]
    assert set(gradcam) == {"status", "reason", "rss_mb", "usage_mb", "limit_mb"}
    assert gradcam["status"] == "skipped"
    assert gradcam["reason"] == "memory_pressure"
    assert gradcam["rss_mb"] > 1.0
    assert gradcam["limit_mb"] == 1.0
    # gradcam=false still says disabled: the client did not want one
    assert post_raw(client, JPEG, query="?gradcam=false").get_json()["gradcam"] == {
        "status": "disabled",
        "by": "request",
    }


def test_soft_limit_defaults_to_90_percent_of_the_limit(
    client: Client, configure: Configure, test_bundle: Path
) -> None:
    configure(MODEL_URI=str(test_bundle), MEMORY_LIMIT_MB="100000")
    memory = client.get("/memory").get_json()["memory"]
    assert memory["limit_mb"] == 100000.0
    assert memory["limit_source"] == "container"
    assert memory["soft_limit_mb"] == 90000.0
    assert memory["percent"] == pytest.approx(100.0 * memory["rss_mb"] / 100000.0, abs=0.01)
    assert post_raw(client, JPEG).get_json()["gradcam"]["status"] == "ok"


# --- /health and /memory -----------------------------------------------------------------------------


def wait_for_state(client: Client, wanted: str, *, timeout_s: float = 30.0) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get("/health").get_json()
        return body if body["model_state"] == wanted else None

    return wait_until(reached, timeout_s=timeout_s, what=f"model_state {wanted!r}", interval_s=0.02)


@pytest.mark.parametrize("path", ["/health", "/health/"])
def test_first_health_loads_the_model_in_the_background(client: Client, served: Path, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    first = response.get_json()
    assert first["status"] == "ok"
    # the answer does not wait for the load; a tiny model may be loaded by the time it is written
    assert first["model_state"] in ("loading", "loaded")
    assert first["model_loaded"] is (first["model_state"] == "loaded")
    assert first.get("loading", False) is (first["model_state"] == "loading")
    body = wait_for_state(client, "loaded")  # no /predict was made: the health check warmed it
    assert body["model_state"] == "loaded"
    assert body["model_loaded"] is True
    assert body["status"] == "ok"
    assert body["gradcam_enabled"] is True
    model = body["model"]
    assert model["sha256"] == hashlib.sha256(served.read_bytes()).hexdigest()
    assert model["backend"] == "litert"
    assert model["labels"] == list(labels_of(served))
    assert model["quantization"] == "none"
    assert body["load_seconds"] >= 0.0


def test_health_reports_a_failed_load_and_predict_retries(
    client: Client, configure: Configure, tmp_path: Path, test_bundle: Path
) -> None:
    missing = tmp_path / "later.dermal"
    configure(MODEL_URI=str(missing), MODEL_RETRY_S="0.5")
    clock = FakeClock()
    reset_service(Settings.from_env(), clock=clock)
    response = post_raw(client, JPEG)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"  # the backoff, rounded up
    error = response.get_json()["error"]
    assert error["code"] == "model_unavailable"
    assert "ModelNotFound" in error["message"]
    assert "later.dermal" not in json.dumps(error)  # a path is a detail: logs and API-key holders only
    health = client.get("/health")
    assert health.status_code == 503
    body = health.get_json()
    assert body["status"] == "error"
    assert body["model_state"] == "error"
    assert body["model_loaded"] is False
    assert body["error"]["code"] == "model_unavailable"
    assert body["error"]["retry_after_s"] == 1
    missing.write_bytes(test_bundle.read_bytes())  # the model appears
    assert post_raw(client, JPEG).status_code == 503  # still within the backoff: answered at once
    clock.advance(0.6)
    assert post_raw(client, JPEG).status_code == 200  # after it, the next request tries again
    assert client.get("/health").get_json()["model_state"] == "loaded"


@pytest.mark.parametrize("path", ["/memory", "/memory/"])
def test_memory_shape(client: Client, served: Path, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"status", "memory", "model_loaded", "gradcam_enabled"}
    assert body["status"] == "ok"
    assert body["model_loaded"] is False  # /memory does not load the model
    assert body["gradcam_enabled"] is True
    memory = body["memory"]
    assert {"rss_mb", "percent", "limit_mb"} <= set(memory)
    assert all(isinstance(memory[k], float) for k in ("rss_mb", "percent", "limit_mb"))
    assert 0.0 < memory["rss_mb"] < memory["limit_mb"]
    assert 0.0 < memory["percent"] < 100.0
    post_raw(client, JPEG)
    assert client.get(path).get_json()["model_loaded"] is True


# --- methods -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/predict", "POST"),
        ("PUT", "/predict", "POST"),
        ("DELETE", "/predict/", "POST"),
        ("POST", "/health", "GET, HEAD"),
        ("PUT", "/health/", "GET, HEAD"),
        ("POST", "/memory", "GET, HEAD"),
        ("DELETE", "/memory/", "GET, HEAD"),
        ("PATCH", "/", "GET, HEAD, POST"),
    ],
)
def test_wrong_method_is_405_with_allow(
    client: Client, served: Path, method: str, path: str, allowed: str
) -> None:
    response = client.open(path, method=method)
    assert response.status_code == 405
    assert response.headers["Allow"] == allowed
    error = response.get_json()["error"]
    assert error["code"] == "method_not_allowed"
    assert method in error["message"]


def test_get_root_is_html(client: Client, served: Path) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"


def test_unknown_route_is_404_json(client: Client, served: Path) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


# --- the original Django app's Python function -------------------------------------------------------


def test_predict_skin_with_explanation_has_the_original_shape(
    configure: Configure, test_bundle: Path
) -> None:
    configure(MODEL_URI=str(test_bundle))
    labels = labels_of(test_bundle)
    results, heatmap = dermal_fn.predict_skin_with_explanation(JPEG)  # top_k=7 > 3 classes: all of them
    assert len(results) == len(labels)
    assert [set(r) for r in results] == [{"class", "probability"}] * len(labels)
    assert {r["class"] for r in results} == set(labels)
    percents = [float(r["probability"]) for r in results]  # type: ignore[arg-type]
    assert percents == sorted(percents, reverse=True)
    assert sum(percents) == pytest.approx(100.0, abs=0.05)
    assert isinstance(heatmap, str)
    assert Image.open(io.BytesIO(base64.b64decode(heatmap))).format == "PNG"

    top_one, _ = dermal_fn.predict_skin_with_explanation(JPEG, top_k=1)
    assert top_one == results[:1]
    _, none = dermal_fn.predict_skin_with_explanation(JPEG, enable_gradcam=False)
    assert none is None


def test_predict_skin_with_explanation_follows_enable_gradcam(
    configure: Configure, test_bundle: Path
) -> None:
    configure(MODEL_URI=str(test_bundle), ENABLE_GRADCAM="false")
    _, heatmap = dermal_fn.predict_skin_with_explanation(JPEG)
    assert heatmap is None
    _, forced = dermal_fn.predict_skin_with_explanation(
        JPEG, enable_gradcam=True
    )  # the caller is the operator
    assert isinstance(forced, str)


# --- the whole answer from Python: dermal_fn.predict, health, memory --------------------------------------


def test_predict_from_python_is_the_http_body(client: Client, configure: Configure) -> None:
    configure()  # the calibrated demo bundle: the assessment says in or out
    over_http = post_raw(client, JPEG, query="?top_k=2").get_json()
    from_python = dermal_fn.predict(JPEG, top_k=2)
    assert (
        set(from_python) == set(over_http) == {"model", "predictions", "gradcam", "timing_ms", "assessment"}
    )
    for key in ("model", "predictions", "assessment"):
        assert from_python[key] == over_http[key], key
    assert from_python["gradcam"]["grid"] == over_http["gradcam"]["grid"]
    assert from_python["assessment"]["distribution"]["status"] in ("in", "out")  # calibrated: said


@pytest.mark.parametrize(
    ("options", "check"),
    [
        ({"gradcam": False}, lambda body: body["gradcam"] == {"status": "disabled", "by": "request"}),
        ({"assess": "false"}, lambda body: "assessment" not in body),
        ({"class_": 1}, lambda body: body["gradcam"]["class_index"] == 1),
        ({"class": "round_uniform_spot"}, lambda body: body["gradcam"]["label"] == "round_uniform_spot"),
        ({"overlay": "none"}, lambda body: "overlay_png" not in body["gradcam"]),
    ],
)
def test_predict_from_python_takes_the_http_options(
    configure: Configure, small_bundle: Path, options: dict[str, Any], check: Callable[[Any], bool]
) -> None:
    configure(MODEL_URI=str(small_bundle))
    assert check(dermal_fn.predict(JPEG, **options))


@pytest.mark.parametrize(
    ("image", "options", "error"),
    [
        (b"not an image", {}, "InvalidImage"),
        (JPEG, {"top_k": 0}, "InvalidOption"),
        (JPEG, {"class": "no_such_label"}, "InvalidOption"),
        (JPEG, {"colour": "red"}, "InvalidOption"),
    ],
)
def test_predict_from_python_raises_the_http_errors(
    configure: Configure, small_bundle: Path, image: bytes, options: dict[str, Any], error: str
) -> None:
    configure(MODEL_URI=str(small_bundle))
    with pytest.raises(dermal_fn.errors.DermalError) as raised:
        dermal_fn.predict(image, **options)
    assert type(raised.value).__name__ == error


def test_health_and_memory_from_python_have_the_http_shapes(
    client: Client, configure: Configure, small_bundle: Path
) -> None:
    configure(MODEL_URI=str(small_bundle))
    wait_for_state(client, "loaded")
    assert set(dermal_fn.health()) == set(client.get("/health").get_json())
    assert set(dermal_fn.memory()["memory"]) == set(client.get("/memory").get_json()["memory"])


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None, reason="needs a server without TensorFlow"
)
def test_a_keras_model_uri_without_tensorflow_says_why(
    client: Client, configure: Configure, tiny_model: Any
) -> None:
    configure(MODEL_URI=str(tiny_model.keras_path))
    response = post_raw(client, JPEG)
    assert response.status_code == 503
    message = response.get_json()["error"]["message"]
    assert "BackendMissing" in message and "install dermal-fn[export]" in message
    health = client.get("/health")
    assert health.status_code == 503 and "dermal-fn export" in health.get_json()["error"]["message"]


def test_health_stays_503_while_a_failed_load_is_retried(
    client: Client, configure: Configure, tmp_path: Path
) -> None:
    """A platform's health check must not see 200 "loading" between the retries of a load that keeps failing."""
    configure(MODEL_URI=str(tmp_path / "absent.dermal"), MODEL_RETRY_S="1")
    clock = FakeClock()
    service = reset_service(Settings.from_env(), clock=clock)
    assert service is not None
    assert post_raw(client, JPEG).status_code == 503
    clock.advance(1.5)  # the backoff is over: the next look starts a retry
    with service.holder._lock:  # a retry is under way (the load holds this lock throughout)
        health = client.get("/health")
        body = health.get_json()
        assert health.status_code == 503 and health.headers["Retry-After"]
        assert body["status"] == "error" and body["model_state"] == "loading"
        assert "ModelNotFound" in body["error"]["message"]
