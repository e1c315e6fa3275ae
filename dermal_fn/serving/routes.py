"""Routes: what each method on each path answers, and who may ask.

Each handler takes the request, the process's service and the request's log record (to which it
adds what the log line should say) and returns a response; errors are raised and mapped to a
status by :mod:`~dermal_fn.serving.responses`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import flask

from dermal_fn import errors
from dermal_fn.serving.options import PredictOptions
from dermal_fn.serving.responses import json_response
from dermal_fn.serving.service import Service
from dermal_fn.serving.status import health_body, memory_body
from dermal_fn.serving.uploads import parse_upload

RequestLog = dict[str, object]  # the fields of a request's log line


def authenticated(request: flask.Request, api_key: str | None) -> bool:
    """True when API_KEY is set and the request shows it (such callers may see error details)."""
    if api_key is None:
        return False
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def authorise(request: flask.Request, api_key: str | None) -> None:
    """Raise Unauthorized when API_KEY is set and the request does not show it."""
    if api_key is not None and not authenticated(request, api_key):
        raise errors.Unauthorized(
            "expected header 'Authorization: Bearer <API_KEY>', found none or a wrong key"
        )


def health(request: flask.Request, service: Service, log: RequestLog) -> flask.Response:
    """GET /health: :func:`~dermal_fn.serving.status.health_body`; 503 once a load has failed."""
    api_key = service.settings.api_key
    body = health_body(service, trusted=api_key is None or authenticated(request, api_key))
    if body["status"] == "error":
        return json_response(body, 503, {"Retry-After": str(body["error"]["retry_after_s"])})
    return json_response(body)


def memory_route(request: flask.Request, service: Service, log: RequestLog) -> flask.Response:
    """GET /memory: the original Django app's shape, with the container's limit and charge."""
    return json_response(memory_body(service))


def model_route(request: flask.Request, service: Service, log: RequestLog) -> flask.Response:
    """GET /model: the model card (loads the model if needed; 503 while it cannot be)."""
    from dermal_fn.serving.card import model_card

    return json_response(model_card(service.holder.get(wait_s=service.settings.queue_timeout_s)))


@functools.cache
def static_text(name: str) -> str:
    """A file of dermal_fn/static, read once per process."""
    return resources.files("dermal_fn").joinpath("static", name).read_text(encoding="utf-8")


@functools.cache
def page_policy() -> str:
    """The page's Content-Security-Policy: its own inline script and style by hash, never framed."""

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", static_text("index.html"), flags=re.S)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()}'"
            for block in blocks
        )

    return (
        f"default-src 'self'; img-src 'self' data: blob:; style-src 'self' {hashes('style')}; "
        f"script-src 'self' {hashes('script')}; connect-src 'self'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'self'"
    )


PAGE_LANGUAGES = ("vi", "en")


def preferred_language(accept_language: str | None, *, default: str = "en") -> str:
    """``vi`` or ``en``, whichever ``Accept-Language`` ranks higher (q-values; ``vi-VN`` counts as ``vi``)."""
    best, best_q = default, 0.0
    for position, part in enumerate((accept_language or "").split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        primary = tag.strip().lower().split("-")[0]
        try:
            q = float(params.strip()[2:]) if params.strip().startswith("q=") else 1.0
        except ValueError:
            q = 0.0
        q -= position * 1e-6  # equal weights: the first listed wins
        if primary in PAGE_LANGUAGES and q > best_q:
            best, best_q = primary, q
    return best


def page(request: flask.Request, service: Service, log: RequestLog) -> flask.Response:
    """The upload page, in Vietnamese or English by ``Accept-Language`` (a switch on the page changes it)."""
    language = preferred_language(request.headers.get("Accept-Language"))
    html = static_text("index.html").replace('<html lang="en">', f'<html lang="{language}">', 1)
    response = flask.Response(html, mimetype="text/html")
    response.headers["Content-Security-Policy"] = page_policy()
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Language"] = language
    response.headers["Vary"] = "Accept-Language"
    return response


def openapi(request: flask.Request, service: Service, log: RequestLog) -> flask.Response:
    """The OpenAPI description of this API."""
    return flask.Response(static_text("openapi.json"), mimetype="application/json")


def predict(request: flask.Request, service: Service, log: RequestLog) -> flask.Response:
    """POST /predict: the 200 body of :mod:`~dermal_fn.serving.shapes`.

    The request holds one of the gate's places from before its body is read until its answer is
    made (``admission``): a full house refuses at once, before the upload is read into memory.
    """
    settings = service.settings
    with service.gate.admission():
        image, raw_options = parse_upload(
            request, limit=settings.max_upload_bytes, timeout_s=settings.body_timeout_s
        )
        options = PredictOptions.parse(raw_options)
        result = service.predict(image, options)
        del image
    log["model_sha256"] = result.body["model"]["sha256"]
    log["timing_ms"] = result.body["timing_ms"]
    log["gradcam"] = result.gradcam_status
    return json_response(result.body)


Handler = Callable[[flask.Request, Service, RequestLog], flask.Response]


@dataclass(frozen=True)
class Route:
    """What a method on a path runs, whether it needs the API key, whether it reads a body."""

    handler: Handler
    authorised: bool = False
    accepts_body: bool = False  # every other route refuses a body (413) instead of buffering it


_PAGE = Route(page)
_PREDICT = Route(predict, authorised=True, accepts_body=True)
# path -> method -> route; HEAD is answered by the GET handler (werkzeug drops the body)
ROUTES: dict[str, dict[str, Route]] = {
    "/": {"GET": _PAGE, "HEAD": _PAGE, "POST": _PREDICT},
    "/predict": {"POST": _PREDICT},
    "/health": {"GET": Route(health), "HEAD": Route(health)},
    "/memory": {"GET": Route(memory_route, authorised=True), "HEAD": Route(memory_route, authorised=True)},
    "/model": {"GET": Route(model_route, authorised=True), "HEAD": Route(model_route, authorised=True)},
    "/openapi.json": {"GET": Route(openapi), "HEAD": Route(openapi)},
}


def show_path(path: str) -> str:
    """A client's path for a message: short plain ones as they are, long ones described."""
    if len(path) <= 64 and path.isprintable():
        return repr(path)
    return f"a path of {len(path)} characters"


def route_for(path: str, method: str, *, cors: bool) -> Route | None:
    """The route for a request; None for a CORS preflight; NotFound / MethodNotAllowed otherwise."""
    methods = ROUTES.get(path)
    if methods is None:
        raise errors.NotFound(f"expected one of {sorted(ROUTES)}, found {show_path(path)}")
    if method == "OPTIONS" and cors:
        return None
    route = methods.get(method)
    if route is None:
        allowed = tuple(methods)
        raise errors.MethodNotAllowed(
            f"expected {' or '.join(allowed)} for {path}, found {method}", allowed=allowed
        )
    return route
