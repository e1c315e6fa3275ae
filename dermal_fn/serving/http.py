"""HTTP: routes, request parsing, responses, and the one table from errors to statuses.

Uploads are read into memory with a hard size bound (never spooled to disk, never logged).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hmac
import io
import json
import logging
import math
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import flask
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge
from werkzeug.formparser import FormDataParser

from dermal_fn import errors
from dermal_fn.serving.options import OPTION_NAMES, PredictOptions
from dermal_fn.serving.service import Service, get_service

logger = logging.getLogger(__name__)

# error class -> (status, code); looked up along the class's MRO, most specific first
ERROR_TABLE: dict[type[errors.DermalError], tuple[int, str]] = {
    errors.InvalidRequest: (400, "invalid_request"),
    errors.InvalidImage: (400, "invalid_image"),
    errors.Unauthorized: (401, "unauthorized"),
    errors.RequestTimeout: (408, "request_timeout"),
    errors.NotFound: (404, "not_found"),
    errors.MethodNotAllowed: (405, "method_not_allowed"),
    errors.ImageTooLarge: (413, "image_too_large"),
    errors.PayloadTooLarge: (413, "payload_too_large"),
    errors.UnsupportedMediaType: (415, "unsupported_media_type"),
    errors.InvalidOption: (422, "invalid_option"),
    errors.RequestError: (400, "invalid_request"),
    errors.ModelUnavailable: (503, "model_unavailable"),
    errors.Overloaded: (503, "overloaded"),
    errors.InsufficientMemory: (503, "insufficient_memory"),
    errors.ServiceUnavailable: (503, "unavailable"),
    errors.ConfigError: (503, "misconfigured"),
    errors.DermalError: (500, "internal_error"),
}

IMAGE_TYPES_HINT = (
    "multipart/form-data (field 'image'), image/*, application/octet-stream or application/json"
)
# what a client-chosen name or id must look like to be echoed in a message, header or log
MAX_LOGGED_PATH = 200  # a logged path is cut here (a 900 KB path is not a log line)
BODY_READ = "dermal_fn.body_read"  # environ key: this request's body was read to its end
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,40}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")


def status_for(exc: errors.DermalError) -> tuple[int, str]:
    """The HTTP status and error code for an exception, from ERROR_TABLE."""
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return 500, "internal_error"


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> flask.Response:
    """A JSON response with no caching (answers are about private photos)."""
    response = flask.Response(json.dumps(body, allow_nan=False), status=status, mimetype="application/json")
    response.headers["Cache-Control"] = "no-store"
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def error_response(
    exc: errors.DermalError, *, request_id: str | None = None, show_detail: bool = False
) -> flask.Response:
    """The contract's error body with its status (and Retry-After for 503, Allow for 405).

    The body carries the code, the public message and the request id; ``exc.detail`` (storage paths,
    endpoints, the cause's text) only for a caller who showed the API key, never to anonymous ones.
    """
    status, code = status_for(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, errors.ServiceUnavailable):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, errors.MethodNotAllowed) and exc.allowed:
        headers["Allow"] = ", ".join(exc.allowed)
    if isinstance(exc, errors.Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="dermal-fn"'
    error: dict[str, Any] = {"code": code, "message": str(exc)}
    if request_id is not None:
        error["request_id"] = request_id
    if show_detail and exc.detail:
        error["detail"] = exc.detail
    return json_response({"error": error}, status, headers)


# --- request parsing -------------------------------------------------------------------------------


def read_body(request: flask.Request, *, limit: int, timeout_s: float | None = None) -> bytes:
    """The whole body, refusing (413) from Content-Length or while streaming past ``limit`` bytes.

    A body still arriving after ``timeout_s`` gets 408: under gunicorn the socket's read side is shut
    down at the deadline (``BodyDeadline``), which ends a read blocked on a client that sends a byte
    now and then.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise errors.PayloadTooLarge(
            f"expected a body of at most {limit / 1048576:.3g} MB, found Content-Length {declared / 1048576:.1f} MB"
        )
    buffer = io.BytesIO()
    stream = request.stream
    with BodyDeadline(request, timeout_s) as deadline:
        try:
            while True:
                chunk = stream.read(min(1 << 16, limit + 1 - buffer.tell()))
                if not chunk:
                    break
                buffer.write(chunk)
                if buffer.tell() > limit:
                    raise errors.PayloadTooLarge(
                        f"expected a body of at most {limit / 1048576:.3g} MB, found more"
                    )
        except (ClientDisconnected, RequestEntityTooLarge, OSError) as exc:
            if deadline.expired:
                raise deadline.error(buffer.tell()) from exc
            raise errors.InvalidRequest(
                f"expected a complete body, found the upload cut short ({type(exc).__name__})"
            ) from exc
        if deadline.expired:
            raise deadline.error(buffer.tell())
    if declared is not None and buffer.tell() < declared:
        raise errors.InvalidRequest(
            f"expected a body of {declared} bytes (Content-Length), found the upload cut short at {buffer.tell()}"
        )
    request.environ[BODY_READ] = True
    return buffer.getvalue()


class BodyDeadline:
    """Shut the connection's read side when ``timeout_s`` passes (gunicorn only: ``gunicorn.socket``)."""

    def __init__(self, request: flask.Request, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self.socket: socket.socket | None = request.environ.get("gunicorn.socket")
        self.expired = False
        self._timer: threading.Timer | None = None
        self._started = time.monotonic()

    def __enter__(self) -> BodyDeadline:
        if self.timeout_s is not None and self.socket is not None:
            self._timer = threading.Timer(self.timeout_s, self._expire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def _expire(self) -> None:
        self.expired = True
        if self.socket is not None:
            with contextlib.suppress(OSError):
                self.socket.shutdown(socket.SHUT_RD)

    def error(self, received: int) -> errors.RequestTimeout:
        """The 408 for a body that did not arrive in time."""
        return errors.RequestTimeout(
            f"expected the body within {self.timeout_s:g} s, found {received} bytes after "
            f"{time.monotonic() - self._started:.0f} s"
        )

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _memory_stream(*args: Any, **kwargs: Any) -> io.BytesIO:
    """Werkzeug stream factory that keeps file parts in memory (the default spools to disk)."""
    return io.BytesIO()


def parse_upload(
    request: flask.Request, *, limit: int, timeout_s: float | None = None
) -> tuple[bytes, dict[str, Any]]:
    """The image bytes and the options (query, then form fields or JSON keys) of a predict request."""
    options: dict[str, Any] = {k: v for k, v in request.args.items() if k in OPTION_NAMES}
    mimetype = (request.mimetype or "").lower()
    body = read_body(request, limit=limit, timeout_s=timeout_s)
    if mimetype == "multipart/form-data":
        parser = FormDataParser(
            stream_factory=_memory_stream,
            max_form_memory_size=limit,
            max_content_length=limit,
            max_form_parts=100,
        )
        try:
            _, form, files = parser.parse(
                io.BytesIO(body), mimetype, len(body), dict(request.mimetype_params)
            )
        except (ValueError, HTTPException) as exc:
            raise errors.InvalidRequest(
                f"expected a well-formed multipart/form-data body, found: {_describe(exc)}"
            ) from exc
        options.update({k: v for k, v in form.items() if k in OPTION_NAMES})
        return _multipart_image(form, files), options
    if mimetype == "application/json":
        return _json_image(body, options)
    if mimetype.startswith("image/") or mimetype in ("application/octet-stream", ""):
        if not body:
            raise errors.InvalidImage("expected image bytes in the body, found an empty body")
        return body, options
    raise errors.UnsupportedMediaType(f"expected {IMAGE_TYPES_HINT}, found Content-Type {mimetype!r}")


def _multipart_image(form: MultiDict[str, str], files: MultiDict[str, Any]) -> bytes:
    storage = files.get("image")
    if storage is not None:
        data = storage.stream.read()
        storage.stream.close()
        if not data:
            raise errors.InvalidImage("expected image bytes in multipart field 'image', found an empty file")
        return bytes(data)
    if "image" in form:
        raise errors.InvalidRequest(
            "expected multipart field 'image' to be a file upload, found a text field"
        )
    names = sorted(set(files) | set(form))
    shown = [name for name in names if _PLAIN_NAME.fullmatch(name)][:10]
    raise errors.InvalidRequest(
        f"expected a multipart file field 'image', found {len(names)} other field(s) {shown}"
    )


def _json_image(body: bytes, options: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    if not body:
        raise errors.InvalidRequest('expected a JSON object {"image_base64": "..."}, found an empty body')
    try:
        data = json.loads(body)
    except UnicodeDecodeError as exc:
        raise errors.InvalidRequest(
            'expected a JSON object {"image_base64": "..."} in UTF-8, found bytes that are not UTF-8 text'
        ) from exc
    except RecursionError as exc:
        raise errors.InvalidRequest(
            'expected a JSON object {"image_base64": "..."}, found JSON nested too deeply'
        ) from exc
    except ValueError as exc:
        raise errors.InvalidRequest(
            f'expected a JSON object {{"image_base64": "..."}}, found invalid JSON ({_describe(exc)})'
        ) from exc
    if not isinstance(data, dict):
        raise errors.InvalidRequest(
            f'expected a JSON object {{"image_base64": "..."}}, found a JSON {type(data).__name__}'
        )
    encoded = data.get("image_base64")
    if not isinstance(encoded, str) or not encoded.strip():
        raise errors.InvalidRequest(
            'expected a non-empty string "image_base64" in the JSON object, found none'
        )
    options.update({k: data[k] for k in OPTION_NAMES if k in data})
    text = encoded.strip()
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    text = "".join(text.split())
    try:
        image = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise errors.InvalidRequest(
            "expected standard base64 in image_base64, found invalid characters or padding"
        ) from exc
    if not image:
        raise errors.InvalidImage("expected image bytes in image_base64, found nothing")
    return image, options


def _describe(exc: BaseException) -> str:
    text = getattr(exc, "description", None) or str(exc) or type(exc).__name__
    text = str(text).splitlines()[0] if text else type(exc).__name__
    return text[:200]


# --- routes --------------------------------------------------------------------------------------


def _authenticated(request: flask.Request, api_key: str | None) -> bool:
    """True when API_KEY is set and the request shows it (such callers may see error details)."""
    if api_key is None:
        return False
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def _authorised(request: flask.Request, api_key: str | None) -> None:
    if api_key is not None and not _authenticated(request, api_key):
        raise errors.Unauthorized(
            "expected header 'Authorization: Bearer <API_KEY>', found none or a wrong key"
        )


def health(request: flask.Request, service: Service, log: dict[str, Any]) -> flask.Response:
    """Liveness and model state (``model_state``: idle, loading, loaded or error).

    The first call starts loading the model in the background, so a platform's health check warms
    the instance. A failed load answers 503 with ``"status": "error"``, what failed (the error's
    class) and when the next attempt is; the cause itself only to a caller with the API key.
    """
    holder = service.holder
    warming = holder.engine is None and holder.warm()
    state = holder.state
    engine, error = holder.engine, holder.error  # read after state: a load may finish meanwhile
    if engine is not None:
        state = "loaded"
    elif state == "idle" and warming:
        state = "loading"  # the load just started in the background
    body: dict[str, Any] = {"status": "ok", "model_loaded": engine is not None, "model_state": state}
    status, headers = 200, {}
    if engine is not None:
        body["model"] = {**engine.info.as_json(), "quantization": engine.info.quantization}
        body["load_seconds"] = round(holder.load_seconds or 0.0, 3)
    elif state == "error" and error is not None:
        retry_after = max(1, math.ceil(holder.retry_in()))
        body["status"] = "error"
        body["error"] = {"code": "model_unavailable", "message": str(error), "retry_after_s": retry_after}
        if error.detail and _authenticated(request, service.settings.api_key):
            body["error"]["detail"] = error.detail
        status, headers = 503, {"Retry-After": str(retry_after)}
    else:
        body["loading"] = True
    body["gradcam_enabled"] = service.settings.enable_gradcam
    return json_response(body, status, headers)


def memory_route(request: flask.Request, service: Service, log: dict[str, Any]) -> flask.Response:
    """The seed's /memory shape, with the container limit."""
    return json_response(
        {
            "status": "ok",
            "memory": service.memory_status(),
            "model_loaded": service.holder.engine is not None,
            "gradcam_enabled": service.settings.enable_gradcam,
        }
    )


def model_route(request: flask.Request, service: Service, log: dict[str, Any]) -> flask.Response:
    """GET /model: the model card (loads the model if needed; 503 while it cannot be)."""
    from dermal_fn.serving.card import model_card

    return json_response(model_card(service.holder.get(wait_s=service.settings.queue_timeout_s)))


@functools.cache
def _static_text(name: str) -> str:
    """A file of dermal_fn/static, read once per process."""
    return resources.files("dermal_fn").joinpath("static", name).read_text(encoding="utf-8")


def page(request: flask.Request, service: Service, log: dict[str, Any]) -> flask.Response:
    """The upload page."""
    response = flask.Response(_static_text("index.html"), mimetype="text/html")
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
        "script-src 'self' 'unsafe-inline'; connect-src 'self'"
    )
    return response


def openapi(request: flask.Request, service: Service, log: dict[str, Any]) -> flask.Response:
    """The OpenAPI description of this API."""
    return flask.Response(_static_text("openapi.json"), mimetype="application/json")


def predict(request: flask.Request, service: Service, log: dict[str, Any]) -> flask.Response:
    """POST /predict: the contract's 200 body.

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


Handler = Callable[[flask.Request, Service, dict[str, Any]], flask.Response]


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


def route_for(path: str, method: str, *, cors: bool) -> Route | None:
    """The route for a request; None for a CORS preflight; NotFound / MethodNotAllowed otherwise."""
    methods = ROUTES.get(path)
    if methods is None:
        raise errors.NotFound(f"expected one of {sorted(ROUTES)}, found {_show_path(path)}")
    if method == "OPTIONS" and cors:
        return None
    route = methods.get(method)
    if route is None:
        allowed = tuple(methods)
        raise errors.MethodNotAllowed(
            f"expected {' or '.join(allowed)} for {path}, found {method}", allowed=allowed
        )
    return route


def _cors(request: flask.Request, response: flask.Response, origins: tuple[str, ...]) -> flask.Response:
    origin = request.headers.get("Origin")
    if origin and (origin in origins or "*" in origins):
        response.headers["Access-Control-Allow-Origin"] = origin if "*" not in origins else "*"
        response.headers["Vary"] = "Origin"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Expose-Headers"] = "Retry-After, X-Request-Id"
        response.headers["Access-Control-Max-Age"] = "600"
    return response


def handle(request: flask.Request, *, service_factory: Callable[[], Service] = get_service) -> flask.Response:
    """Route one request. Every client mistake becomes a JSON error; nothing here logs image data."""
    started = time.perf_counter()
    route = "/" + request.path.strip("/")
    method = request.method.upper()
    request_id = _request_id(request)
    log: dict[str, Any] = {"request_id": request_id, "route": route[:MAX_LOGGED_PATH], "method": method}
    show_detail = False
    try:
        service = service_factory()
    except errors.ConfigError as exc:
        response = error_response(exc, request_id=request_id)
        _finish(request, response, log, started)
        return response
    try:
        target = route_for(route, method, cors=bool(service.settings.cors_origins))
        show_detail = _authenticated(request, service.settings.api_key)
        if target is not None and not target.accepts_body and _has_body(request):
            raise errors.PayloadTooLarge(
                f"expected no body for {method} {_show_path(route)}, found "
                + (f"{request.content_length} bytes" if request.content_length else "a chunked body")
            )
        if target is None:
            response = flask.Response(status=204)  # CORS preflight
        else:
            if target.authorised:
                _authorised(request, service.settings.api_key)
            response = target.handler(request, service, log)
    except errors.DermalError as exc:
        response = error_response(exc, request_id=request_id, show_detail=show_detail)
        if response.status_code >= 500:
            log["error"] = str(exc)
            if exc.detail:
                log["detail"] = exc.detail
        else:
            log["error_code"] = status_for(exc)[1]
    except Exception:
        logger.exception(
            "unexpected error", extra={"json_fields": {"request_id": request_id, "route": log["route"]}}
        )
        response = json_response(
            {
                "error": {
                    "code": "internal_error",
                    "message": "unexpected server error; it has been logged",
                    "request_id": request_id,
                }
            },
            500,
        )
    response.headers["X-Request-Id"] = request_id
    response = _cors(request, response, service.settings.cors_origins)
    _finish(request, response, log, started)
    return response


def _finish(request: flask.Request, response: flask.Response, log: dict[str, Any], started: float) -> None:
    """Never read or hold a body the route did not take; log the request."""
    unread = _has_body(request) and not request.environ.get(BODY_READ)
    if response.status_code >= 400 or unread:
        _skip_body_drain(response)
    if unread:
        _stop_reading(request)
    _log_request(log, response.status_code, started)


def _has_body(request: flask.Request) -> bool:
    """A declared body: Content-Length above 0, or chunked transfer encoding."""
    if request.content_length:
        return True
    return "chunked" in (request.headers.get("Transfer-Encoding") or "").lower()


def _stop_reading(request: flask.Request) -> None:
    """Shut the read side of the connection (gunicorn): the rest of the body is discarded by the kernel,
    not read by the server, and the connection closes after this answer."""
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RD)


def _show_path(path: str) -> str:
    """A client's path for a message: short plain ones as they are, long ones described."""
    if len(path) <= 64 and path.isprintable():
        return repr(path)
    return f"a path of {len(path)} characters"


def _skip_body_drain(response: flask.Response) -> None:
    """Keep functions-framework from reading an unread body into memory after an error.

    Its after-request hook calls ``request.get_data()`` (the whole remaining body, unbounded) unless
    the response is streamed; a refused upload (413, 401, 404 ...) must not be held. The body is
    sent as a one-item iterator; Content-Length stays set.
    """
    data = response.get_data()
    response.response = iter([data])


def _request_id(request: flask.Request) -> str:
    """X-Request-Id or the Cloud trace id when well-formed (they are echoed and logged), else a new one."""
    trace = (request.headers.get("X-Cloud-Trace-Context") or "").split("/", 1)[0]
    for candidate in (request.headers.get("X-Request-Id", ""), trace):
        if _REQUEST_ID.fullmatch(candidate):
            return candidate
    return uuid.uuid4().hex


def _log_request(log: dict[str, Any], status: int, started: float) -> None:
    log["status"] = status
    log["latency_ms"] = round((time.perf_counter() - started) * 1e3, 2)
    level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.INFO
    logger.log(level, "request", extra={"json_fields": log})
