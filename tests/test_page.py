"""The upload page at ``GET /``, driven in Debian's Chromium by Playwright against real servers.

Every server here is a real ``functions-framework --target=dermal`` process on a free 127.0.0.1
port serving the committed small bundle (``tests/models.py``: labels from ``dermal_fn.demo.synth``,
a model name that says "synthetic"). Expected values come from the same server: each uploaded file is
also POSTed by the test (multipart, as the page sends it), and the page must show what that JSON says. Screenshots go to
``artifacts/screenshots/``. ``make test`` installs Chromium (``scripts/ensure_chromium.sh``); without
it these tests fail, saying so.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import re
import signal
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from dermal_fn.demo import synth
from tests.http_fixtures import ServerProcess
from tests.models import SMALL

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO / "artifacts" / "screenshots"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MODEL_NAME = SMALL.name  # the committed small bundle: named as synthetic
API_KEY = "page-test-key-6b1f"
SMALL_UPLOAD_MB = 0.05
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
DONE = "#results[data-state=done]"
FAILED = "#results[data-state=error]"

pytestmark = pytest.mark.browser


# --- the model, the images --------------------------------------------------------------------------


def jpeg_bytes(pixels: np.ndarray, *, quality: int = 92, exif: Image.Exif | None = None) -> bytes:
    """Pixels as JPEG bytes (with an EXIF block when given)."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality, exif=exif or Image.Exif())
    return out.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small synthetic JPEG, a 12 MP EXIF-rotated 'phone photo', a larger JPEG and a text file."""
    folder = tmp_path_factory.mktemp("page-photos")
    rng = np.random.default_rng(11)
    small = synth.generate(rng, size=384, label=synth.ROUND_UNIFORM, hair=False).image
    medium = synth.generate(rng, size=640, label=synth.IRREGULAR_MULTICOLOUR, hair=True).image
    # a phone photo: 4032 x 3024 stored landscape, EXIF orientation 6 (display rotated 90° clockwise)
    base = synth.generate(rng, size=512, label=synth.OVAL_WITH_HALO, hair=True).image
    landscape = Image.fromarray(base).resize((4032, 3024), Image.Resampling.BICUBIC)
    grain = rng.normal(0.0, 3.0, size=(3024, 4032, 1)).astype(np.float32)
    phone = np.clip(np.asarray(landscape, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        "small.jpg": jpeg_bytes(small),
        "medium.jpg": jpeg_bytes(medium, quality=97),
        "phone.jpg": jpeg_bytes(phone, quality=85, exif=exif),
        "notes.txt": b"visit notes: not an image\n",
    }
    paths = {}
    for name, data in files.items():
        path = folder / name
        path.write_bytes(data)
        paths[name] = path
    return paths


# --- servers -----------------------------------------------------------------------------------------


def post_multipart(
    server: ServerProcess, path: Path, *, api_key: str | None = None, overlay: str | None = None
) -> tuple[int, Any]:
    """POST a file to /predict as multipart field 'image' (as the page does): status and JSON body."""
    boundary = uuid.uuid4().hex
    field = (
        b""
        if overlay is None
        else f'--{boundary}\r\nContent-Disposition: form-data; name="overlay"\r\n\r\n{overlay}\r\n'.encode()
    )
    body = field + (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    status, _, answer = server.request("POST", "/predict", body=body, headers=headers)
    return status, json.loads(answer)


@pytest.fixture(scope="module")
def page_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers shared by this module's tests (tests.http_fixtures.ServerProcess); all stopped at the end."""
    log_dir = tmp_path_factory.mktemp("page-servers")
    servers: list[ServerProcess] = []

    def start(env: Mapping[str, str], *, wait_for_model: bool = True) -> ServerProcess:
        server = ServerProcess(env, log_path=log_dir / f"server-{len(servers)}.log")
        servers.append(server)
        server.start()
        server.wait_ready(path="/health")  # the first /health starts loading the model
        if wait_for_model:
            server.wait_loaded()
        return server

    try:
        yield start
    finally:
        # SIGTERM (gunicorn's graceful stop, ~2 s) to all groups at once; stop() then reaps each one.
        # stop()'s own SIGINT goes unanswered here and would cost its full 5 s timeout per server.
        for server in servers:
            if server.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.process.pid, signal.SIGTERM)
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def server(page_servers: Callable[..., ServerProcess], small_bundle: Path) -> ServerProcess:
    """Defaults: heatmaps on, 10 MB uploads, no API key."""
    return page_servers({"MODEL_URI": str(small_bundle)})


@pytest.fixture(scope="module")
def limited_server(page_servers: Callable[..., ServerProcess], small_bundle: Path) -> ServerProcess:
    """Heatmaps off and a tiny upload limit."""
    return page_servers(
        {"MODEL_URI": str(small_bundle), "ENABLE_GRADCAM": "false", "MAX_UPLOAD_MB": str(SMALL_UPLOAD_MB)}
    )


@pytest.fixture(scope="module")
def keyed_server(page_servers: Callable[..., ServerProcess], small_bundle: Path) -> ServerProcess:
    """An API key, and a soft memory limit every process exceeds (heatmaps always skipped)."""
    return page_servers({"MODEL_URI": str(small_bundle), "API_KEY": API_KEY, "MEMORY_SOFT_LIMIT_MB": "1"})


@pytest.fixture(scope="module")
def broken_server(
    page_servers: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    """A model URI that points at nothing: the model is unavailable."""
    missing = tmp_path_factory.mktemp("page-missing") / "absent.dermal"
    return page_servers({"MODEL_URI": str(missing)}, wait_for_model=False)


# --- the browser -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, launched by Playwright (never a downloaded browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class Tab:
    """One page in a fresh browser context, with everything it logged."""

    page: Any
    console: list[tuple[str, str]]
    requests: list[str]  # network requests the page made (data: and blob: URLs excluded)

    def errors(self, *, expected_status: int | None = None) -> list[str]:
        """Console errors and uncaught exceptions, except the browser's own line for an expected HTTP error."""
        allowed = (
            f"Failed to load resource: the server responded with a status of {expected_status}"
            if expected_status is not None
            else None
        )
        return [
            text
            for kind, text in self.console
            if kind in ("error", "pageerror") and not (allowed and text.startswith(allowed))
        ]

    def screenshot(self, name: str) -> Path:
        """Save a full-page screenshot as artifacts/screenshots/<name>.png."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def open_tab(browser: Any) -> Iterator[Any]:
    """Open the page of a server in a fresh context at a viewport size; closed after the test."""
    contexts: list[Any] = []

    def open_(server: ServerProcess, *, viewport: Mapping[str, int] = DESKTOP, locale: str = "en-US") -> Tab:
        context = browser.new_context(viewport=dict(viewport), locale=locale)  # Accept-Language follows it
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(30_000)
        console: list[tuple[str, str]] = []
        page.on("console", lambda message: console.append((message.type, message.text)))
        page.on("pageerror", lambda error: console.append(("pageerror", str(error))))
        requests: list[str] = []
        page.on(
            "request",
            lambda request: (
                requests.append(request.url) if not request.url.startswith(("data:", "blob:")) else None
            ),
        )
        page.goto(server.url + "/")
        page.wait_for_selector("#model-status:not([data-state=unknown]):not([data-state=loading])")
        return Tab(page=page, console=console, requests=requests)

    yield open_
    for context in contexts:
        context.close()


def js_percent(probability: float) -> str:
    """What ``(p * 100).toFixed(1) + "%"`` gives in JavaScript (half up on the exact double)."""
    value = Decimal(probability * 100).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
    return f"{value}%"


def shown_predictions(tab: Tab) -> list[dict[str, Any]]:
    """Label, percentage text and bar width (fraction of its track) of each prediction row."""
    return list(
        tab.page.eval_on_selector_all(
            "#predictions li",
            """items => items.map(item => ({
                label: item.dataset.label,
                text: item.querySelector('.pred-label').textContent,
                percent: item.querySelector('.pred-pct').textContent,
                bar: item.querySelector('.fill').getBoundingClientRect().width /
                     item.querySelector('.track').getBoundingClientRect().width,
            }))""",
        )
    )


def assert_matches_json(tab: Tab, body: dict[str, Any]) -> None:
    """The prediction rows show exactly the labels and percentages of the JSON body."""
    rows = shown_predictions(tab)
    expected = body["predictions"]
    assert [row["label"] for row in rows] == [p["label"] for p in expected]
    assert [row["percent"] for row in rows] == [js_percent(p["probability"]) for p in expected]
    for row, prediction in zip(rows, expected, strict=True):
        assert row["text"].lower() == prediction["label"].replace("_", " ").lower()
        assert row["bar"] == pytest.approx(prediction["probability"], abs=0.01)


def wait_for_overlay(tab: Tab) -> tuple[int, int]:
    """Wait until the heatmap overlay has decoded; its natural (width, height)."""
    overlay = tab.page.locator("#overlay")
    overlay.wait_for(state="visible")
    tab.page.wait_for_function(
        "() => { const img = document.getElementById('overlay'); return img.complete && img.naturalWidth > 0; }"
    )
    size = overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    return int(size[0]), int(size[1])


# --- tests -------------------------------------------------------------------------------------------


def test_upload_shows_predictions_and_heatmap_as_the_json_says(
    server: ServerProcess, open_tab: Any, photos: dict[str, Path]
) -> None:
    tab = open_tab(server)
    page = tab.page
    assert MODEL_NAME in page.locator("#model-status").inner_text()
    assert page.locator("#disclaimer").is_visible()
    assert "Not a diagnosis" in page.locator("#disclaimer").inner_text()
    assert page.locator("#synthetic-note").is_visible()

    page.set_input_files("#file", photos["small.jpg"])
    page.wait_for_selector(DONE)
    assert page.locator("#original").evaluate("img => img.complete && img.naturalWidth") == 384
    assert page.locator("#file-info").inner_text().startswith("small.jpg")
    overlay_size = wait_for_overlay(tab)

    # the page has the photo, so it asks for the heatmap alone and lays it over the photo
    status, body = post_multipart(server, photos["small.jpg"], overlay="heatmap")
    assert status == 200
    assert_matches_json(tab, body)
    assert (
        page.locator("#overlay").get_attribute("src")
        == "data:image/png;base64," + body["gradcam"]["heatmap_png"]
    )
    assert overlay_size == (384, 384)
    caption = page.locator("#heat-caption").inner_text()
    assert body["gradcam"]["label"].replace("_", " ").lower() in caption.lower()
    assert body["model"]["name"] in page.locator("#meta").inner_text()
    assert not page.locator("#gradcam-note").is_visible()
    assert not page.locator("#message").is_visible()

    page.locator("#opacity").fill("40")
    assert page.locator("#overlay").evaluate("img => img.style.opacity") == "0.4"
    assert page.locator("#opacity-value").inner_text() == "40%"
    page.locator("#toggle").click()
    assert page.locator("#overlay").evaluate("img => img.style.opacity") == "0"
    assert page.locator("#toggle").get_attribute("aria-pressed") == "true"
    assert page.locator("#toggle").inner_text() == "Show heatmap"
    page.locator("#toggle").click()
    assert page.locator("#overlay").evaluate("img => img.style.opacity") == "0.4"
    page.locator("#opacity").fill("100")
    tab.screenshot("desktop-result")
    assert tab.errors() == []
    # self-contained: every request went to this server (nothing from a CDN, no web fonts)
    assert tab.requests and all(url.startswith(server.url + "/") for url in tab.requests), tab.requests


def test_phone_width_keyboard_upload_without_horizontal_overflow(
    server: ServerProcess, open_tab: Any, photos: dict[str, Path]
) -> None:
    tab = open_tab(server, viewport=PHONE)
    page = tab.page
    tab.screenshot("phone-start")
    # the file input is reachable with the keyboard, first stop on the page
    for _ in range(5):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement && document.activeElement.id") == "file":
            break
    assert page.evaluate("document.activeElement.id") == "file"
    assert page.locator("label[for=file]").is_visible()

    page.set_input_files("#file", photos["medium.jpg"])
    page.wait_for_selector(DONE)
    wait_for_overlay(tab)
    status, body = post_multipart(server, photos["medium.jpg"])
    assert status == 200
    assert_matches_json(tab, body)
    assert page.evaluate("document.scrollingElement.scrollWidth") <= PHONE["width"]
    for selector in ("#predictions", "#overlay", "#opacity", "#toggle", "#disclaimer"):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], selector
    tab.screenshot("phone-result")
    assert tab.errors() == []


def test_drag_and_drop(server: ServerProcess, open_tab: Any, photos: dict[str, Path]) -> None:
    tab = open_tab(server)
    page = tab.page
    data_transfer = page.evaluate_handle(
        """b64 => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], 'dropped.jpg', {type: 'image/jpeg'}));
            return transfer;
        }""",
        base64.b64encode(photos["small.jpg"].read_bytes()).decode(),
    )
    page.dispatch_event("#dropzone", "dragenter", {"dataTransfer": data_transfer})
    assert "drag" in (page.locator("#dropzone").get_attribute("class") or "")
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": data_transfer})
    page.wait_for_selector(DONE)
    assert "drag" not in (page.locator("#dropzone").get_attribute("class") or "")
    assert page.locator("#file-info").inner_text().startswith("dropped.jpg")
    wait_for_overlay(tab)
    status, body = post_multipart(server, photos["small.jpg"])
    assert status == 200
    assert_matches_json(tab, body)
    assert tab.errors() == []


def test_twelve_megapixel_exif_rotated_phone_photo(
    server: ServerProcess, open_tab: Any, photos: dict[str, Path]
) -> None:
    assert photos["phone.jpg"].stat().st_size > 1_000_000
    tab = open_tab(server)
    page = tab.page
    page.set_input_files("#file", photos["phone.jpg"])
    page.wait_for_selector(DONE, timeout=60_000)
    width, height = wait_for_overlay(tab)
    assert height > width  # stored landscape, EXIF says portrait: the server turned it upright
    preview = page.locator("#original").evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert preview == [3024, 4032]  # and the browser's preview agrees
    status, body = post_multipart(server, photos["phone.jpg"])
    assert status == 200
    assert_matches_json(tab, body)
    tab.screenshot("desktop-phone-photo")
    assert tab.errors() == []


def test_non_image_shows_the_servers_error_message(
    server: ServerProcess, open_tab: Any, photos: dict[str, Path]
) -> None:
    tab = open_tab(server, viewport=PHONE)
    page = tab.page
    page.set_input_files("#file", photos["notes.txt"])
    page.wait_for_selector(FAILED, state="attached")
    status, body = post_multipart(server, photos["notes.txt"])
    assert status == 400
    message = page.locator("#message")
    assert message.is_visible()
    text = message.inner_text()
    assert body["error"]["message"] in text
    assert "HTTP 400" in text and body["error"]["code"] in text
    assert page.locator("#predictions li").count() == 0
    assert not page.locator("#overlay").is_visible()
    assert page.evaluate("document.scrollingElement.scrollWidth") <= PHONE["width"]
    tab.screenshot("phone-error-not-an-image")
    assert tab.errors(expected_status=400) == []


def test_oversized_upload_shows_the_413_message(
    limited_server: ServerProcess, open_tab: Any, photos: dict[str, Path]
) -> None:
    big = photos["medium.jpg"]
    assert big.stat().st_size > SMALL_UPLOAD_MB * 1024 * 1024
    tab = open_tab(limited_server)
    page = tab.page
    page.set_input_files("#file", big)
    page.wait_for_selector(FAILED, state="attached")
    status, body = post_multipart(limited_server, big)
    assert status == 413
    text = page.locator("#message").inner_text()
    assert "too large" in text
    assert body["error"]["message"] in text
    assert "HTTP 413" in text
    tab.screenshot("desktop-error-too-large")
    assert tab.errors(expected_status=413) == []


def test_disabled_heatmap_is_said_plainly(
    limited_server: ServerProcess, open_tab: Any, photos: dict[str, Path]
) -> None:
    small = photos["small.jpg"]
    assert small.stat().st_size < SMALL_UPLOAD_MB * 1024 * 1024
    tab = open_tab(limited_server)
    page = tab.page
    assert "heatmaps off" in page.locator("#model-status").inner_text()
    page.set_input_files("#file", small)
    page.wait_for_selector(DONE)
    status, body = post_multipart(limited_server, small)
    assert status == 200 and body["gradcam"] == {"status": "disabled", "by": "operator"}
    assert_matches_json(tab, body)
    note = page.locator("#gradcam-note")
    assert note.is_visible()
    assert "Heatmaps are turned off" in note.inner_text()
    assert not page.locator("#overlay").is_visible()
    assert not page.locator("#opacity").is_visible()
    tab.screenshot("desktop-heatmap-disabled")
    assert tab.errors() == []


def test_api_key_prompt_then_memory_pressure_note(
    keyed_server: ServerProcess, open_tab: Any, photos: dict[str, Path]
) -> None:
    tab = open_tab(keyed_server)
    page = tab.page
    page.set_input_files("#file", photos["small.jpg"])
    page.wait_for_selector("#results[data-state=auth]", state="attached")
    assert page.locator("#api-key").is_visible()
    assert page.evaluate("document.activeElement.id") == "api-key"
    assert "API key" in page.locator("#message").inner_text()
    tab.screenshot("desktop-api-key-prompt")

    page.locator("#api-key").fill("not-the-key")
    page.locator("#auth-send").click()
    page.wait_for_selector("#results[data-state=auth]", state="attached")
    assert "not accepted" in page.locator("#auth-hint").inner_text()

    page.locator("#api-key").fill(API_KEY)
    with page.expect_response(lambda response: response.url.endswith("/predict")) as answer:
        page.locator("#auth-send").click()
    assert answer.value.request.headers["authorization"] == f"Bearer {API_KEY}"
    seen = answer.value.json()  # memory figures change between requests: read the page's own answer
    page.wait_for_selector(DONE)
    assert not page.locator("#auth").is_visible()
    assert not page.locator("#message").is_visible()
    status, body = post_multipart(keyed_server, photos["small.jpg"], api_key=API_KEY)
    assert status == 200
    assert_matches_json(tab, body)
    gradcam = body["gradcam"]
    assert gradcam["status"] == "skipped" and gradcam["reason"] == "memory_pressure"
    note = page.locator("#gradcam-note").inner_text()
    assert "short of memory" in note
    shown = seen["gradcam"]
    assert shown["status"] == "skipped"

    def js_round(x: float) -> int:  # the page's Math.round: halves go up (Python's :.0f goes to even)
        return math.floor(x + 0.5)

    assert f"using {js_round(shown['usage_mb'])} MB of its {js_round(shown['limit_mb'])} MB limit" in note
    assert not page.locator("#overlay").is_visible()
    tab.screenshot("desktop-heatmap-skipped")
    assert tab.errors(expected_status=401) == []


def without_countdown(message: str) -> str:
    """A message with its retry countdowns ("the next attempt is in 4 s") as N."""
    return re.sub(r"\bin \d+ s\b", "in N s", message)


def test_unavailable_model_is_reported_on_load_and_on_upload(
    broken_server: ServerProcess, open_tab: Any, photos: dict[str, Path]
) -> None:
    tab = open_tab(broken_server)
    page = tab.page
    page.wait_for_selector("#model-status[data-state=error]")
    assert "Model unavailable" in page.locator("#model-status").inner_text()
    status, health = broken_server.get_json("/health")
    assert status == 503
    assert health["status"] == "error"
    said = without_countdown(page.locator("#message").inner_text())
    assert without_countdown(health["error"]["message"]) in said  # said before any upload
    page.set_input_files("#file", photos["small.jpg"])
    page.wait_for_selector(FAILED, state="attached")
    status, body = post_multipart(broken_server, photos["small.jpg"])
    assert status == 503
    text = page.locator("#message").inner_text()
    assert "model is unavailable" in text
    # the page's answer came a moment before ours: the same words, its countdown perhaps a second longer
    assert without_countdown(body["error"]["message"]) in without_countdown(text)
    assert "HTTP 503" in text
    tab.screenshot("desktop-error-model-unavailable")
    assert tab.errors(expected_status=503) == []


# --- the assessment beside the answer ---------------------------------------------------------


@pytest.fixture(scope="module")
def demo_server(page_servers: Callable[..., ServerProcess]) -> ServerProcess:
    """The committed demo bundle: calibrated on generated images."""
    from dermal_fn.models import DEMO_BUNDLE

    return page_servers({"MODEL_URI": str(DEMO_BUNDLE)})


@pytest.fixture(scope="module")
def assessed_photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A generated skin photo, a page of text, and the skin photo blurred and darkened."""
    from PIL import ImageEnhance, ImageFilter

    from dermal_fn.demo import unlike

    folder = tmp_path_factory.mktemp("assessed")
    rng = np.random.default_rng(31)
    skin = Image.fromarray(synth.generate(rng, size=512, hair=False).image)
    poor = ImageEnhance.Brightness(skin.filter(ImageFilter.GaussianBlur(6))).enhance(0.2)
    files = {"skin.png": skin, "text.png": unlike.text(rng, 512), "poor.png": poor}
    for name, image in files.items():
        image.save(folder / name, format="PNG")
    return {name: folder / name for name in files}


def shown_assessment(tab: Tab) -> dict[str, str]:
    """The assessment sentences on the page, by kind."""
    items = tab.page.eval_on_selector_all(
        "#assessment li", "items => items.map(item => [item.dataset.kind, item.textContent])"
    )
    return {kind: text for kind, text in items}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("skin.png", {"fine": "The photo looks usable"}),
        (
            "text.png",
            {"distribution": "unlike the images the model was calibrated on: treat the result with caution"},
        ),
        ("poor.png", {"quality": "This photo looks blurry and too dark — retake it"}),
    ],
)
def test_the_assessment_is_said_in_plain_words_beside_the_result(
    demo_server: ServerProcess,
    open_tab: Any,
    assessed_photos: dict[str, Path],
    name: str,
    expected: dict[str, str],
) -> None:
    tab = open_tab(demo_server)
    tab.page.set_input_files("#file", str(assessed_photos[name]))
    tab.page.wait_for_selector(DONE)
    status, body = post_multipart(demo_server, assessed_photos[name])
    assert status == 200
    assert_matches_json(tab, body)
    shown = shown_assessment(tab)
    for kind, words in expected.items():
        assert kind in shown and words in shown[kind], shown
    if name != "skin.png":
        assert "fine" not in shown
    assert tab.page.locator("#predictions li").count() == 3  # said beside the answer, not instead of it
    tab.screenshot(f"desktop-assessment-{name.removesuffix('.png')}")
    assert tab.errors() == []


def test_the_page_links_the_model_card(demo_server: ServerProcess, open_tab: Any) -> None:
    tab = open_tab(demo_server)
    link = tab.page.locator("#model-link")
    assert link.inner_text() == "model card"
    href = link.evaluate("a => a.href")  # absolute, as the browser resolves it
    assert href == demo_server.url + "/model"
    response = tab.page.request.get(href)
    assert response.status == 200 and response.json()["intended_use"]["summary"].startswith("Research")


# --- Vietnamese and English ---------------------------------------------------------------------------------


def test_a_vietnamese_browser_gets_the_page_and_its_answers_in_vietnamese(
    server: ServerProcess, open_tab: Callable[..., Tab], photos: dict[str, Path]
) -> None:
    tab = open_tab(server, locale="vi-VN")
    page = tab.page
    assert page.evaluate("document.documentElement.lang") == "vi"
    assert page.locator("#upload-title").text_content() == "Ảnh"
    assert "Không phải chẩn đoán." in page.locator("#disclaimer").inner_text()
    assert "sẵn sàng" in page.locator("#model-status-text").inner_text()
    page.set_input_files("#file", str(photos["small.jpg"]))
    page.wait_for_selector("#results[data-state=done]")
    sentences = page.locator("#assessment li").all_inner_texts()
    assert sentences and all(text and not text.startswith("The ") for text in sentences)
    assert "Vùng mô hình chú ý khi dự đoán" in page.locator("#heat-caption").inner_text()
    assert "top_activation" in (
        page.locator("#heat-caption").get_attribute("title") or ""
    )  # the detail, on hover
    legend = page.locator("#legend")
    assert legend.is_visible() and "ảnh hưởng nhiều nhất" in legend.inner_text()
    assert page.locator("#toggle").inner_text() == "Hiện ảnh gốc"
    tab.screenshot("desktop-vi-result")
    assert tab.errors() == []


def test_the_switch_changes_the_language_and_keeps_the_answer(
    server: ServerProcess, open_tab: Callable[..., Tab], photos: dict[str, Path]
) -> None:
    tab = open_tab(server)
    page = tab.page
    assert page.evaluate("document.documentElement.lang") == "en"
    page.set_input_files("#file", str(photos["small.jpg"]))
    page.wait_for_selector("#results[data-state=done]")
    english = page.locator("#predictions li").all_inner_texts()
    assert page.locator("#lang").inner_text() == "Tiếng Việt"
    page.click("#lang")
    assert page.evaluate("document.documentElement.lang") == "vi"
    assert page.locator("#upload-title").text_content() == "Ảnh"
    assert (
        page.locator("#predictions li").all_inner_texts() == english
    )  # the same answer, relabelled around it
    assert "Vùng mô hình chú ý" in page.locator("#heat-caption").inner_text()
    assert page.locator("#lang").inner_text() == "English"
    tab.screenshot("desktop-switched-to-vi")
    page.reload()  # the choice is remembered in this browser
    page.wait_for_selector("#model-status:not([data-state=unknown]):not([data-state=loading])")
    assert page.evaluate("document.documentElement.lang") == "vi"
    page.click("#lang")
    assert page.locator("#upload-title").text_content() == "Photo"
    assert tab.errors() == []


def test_the_page_cannot_be_framed_and_runs_no_script_it_did_not_ship(server: ServerProcess) -> None:
    status, headers, body = server.request("GET", "/", headers={"Accept-Language": "vi-VN,vi;q=0.9,en;q=0.8"})
    assert status == 200 and b'<html lang="vi">' in body
    policy = headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in policy and "'unsafe-inline'" not in policy
    assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Language"] == "vi" and "Accept-Language" in headers["Vary"]
    _, english, _ = server.request("GET", "/", headers={"Accept-Language": "en-GB,en;q=0.9,vi;q=0.5"})
    assert english["Content-Language"] == "en"


@pytest.fixture(scope="module")
def audited_server(
    page_servers: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    """The demo bundle with its audit stored (evaluate --write), served."""
    from tests.test_audit import audited_demo

    out = audited_demo(tmp_path_factory.mktemp("audited"), audit_images=2)
    return page_servers({"MODEL_URI": str(out)})


def test_the_model_card_shows_the_skin_tone_table_in_vietnamese(
    audited_server: ServerProcess, open_tab: Callable[..., Tab]
) -> None:
    tab = open_tab(audited_server, locale="vi-VN")
    page = tab.page
    page.wait_for_selector("#card:not([hidden])")
    page.click("#card-details summary")
    rows = page.locator("#card-body tr[data-band]")
    assert rows.count() == 6
    assert rows.first.locator("td").first.inner_text() == "rất sáng"
    text = page.locator("#card-body").inner_text()
    assert "Không phải thiết bị y tế" in text and "Kết quả theo màu da" in text
    if page.locator("#card-body tr.thin").count():
        assert "quá ít để đánh giá" in text  # thin bands are said to be thin
    tab.screenshot("desktop-vi-model-card")
    page.click("#lang")
    assert rows.first.locator("td").first.inner_text() == "very light"
    assert tab.errors() == []


@pytest.fixture(scope="module")
def mixed_server(
    page_servers: Callable[..., ServerProcess], small_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    """A bundle whose manifest carries a mixed-precision gate (as export --mixed-precision writes it), served."""
    from tests.models import rewrite_bundle

    def add_gate(manifest: dict[str, Any]) -> None:
        manifest.setdefault("verification", {})["quantized"] = {
            "images": 100,
            "source": "photos of the --verify folder",
            "top1_agreement": 0.99,
            "heatmap_r_mean": 0.991,
            "passed": True,
            "mixed_precision": {
                "float_layers": [
                    {
                        "layer": name,
                        "op": "CONV_2D",
                        "relative_error": error,
                        "tensor": f"backbone/{name}/convolution",
                    }
                    for name, error in (("stem_conv", 0.21), ("block6a_expand_conv", 0.12))
                ],
                "quantized_layers": 120,
                "backbone_ms_one_thread": {"int8": 10.0, "mixed": 11.5},
                "slowdown_vs_int8": 1.15,
            },
        }

    out = rewrite_bundle(small_bundle, tmp_path_factory.mktemp("mixed") / "mixed.dermal", edit=add_gate)
    return page_servers({"MODEL_URI": str(out)})


def test_the_model_card_says_which_layers_stayed_float_and_what_it_cost(
    mixed_server: ServerProcess, open_tab: Callable[..., Tab]
) -> None:
    tab = open_tab(mixed_server)
    page = tab.page
    page.wait_for_selector("#card:not([hidden])")
    page.click("#card-details summary")
    text = page.locator("#card-body").inner_text()
    assert "against its full-precision model on 100 photos, top-1 agreement 0.990" in text
    assert "2 of its 120 layers kept in full precision" in text and "1.15× the time of full int8" in text
    page.click("#lang")
    assert "giữ 2 trên 120 lớp" in page.locator("#card-body").inner_text()
    assert tab.errors() == []
