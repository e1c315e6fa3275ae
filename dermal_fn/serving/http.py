"""HTTP: one request from arrival to answer.

:func:`handle` finds the route (:mod:`~dermal_fn.serving.routes`), checks the key and the body,
runs the handler, turns every :class:`~dermal_fn.errors.DermalError` into its JSON error
(:mod:`~dermal_fn.serving.responses`), adds the headers every answer carries (request id,
``nosniff``, CORS), makes sure a body nobody took is never read, and logs one line.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import time
import uuid
from collections.abc import Callable

import flask

from dermal_fn import errors
from dermal_fn.serving.error_codes import ERROR_TABLE, status_for
from dermal_fn.serving.responses import error_response, json_response
from dermal_fn.serving.routes import RequestLog, authenticated, authorise, route_for, show_path
from dermal_fn.serving.service import Service, get_service
from dermal_fn.serving.shapes import ErrorBody, ErrorJson
from dermal_fn.serving.uploads import BODY_READ

logger = logging.getLogger(__name__)

__all__ = ["ERROR_TABLE", "handle", "status_for"]

MAX_LOGGED_PATH = 200  # a logged path is cut here (a 900 KB path is not a log line)
# what a client's request id must look like to be echoed in a header and logged
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")


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
    log: RequestLog = {"request_id": request_id, "route": route[:MAX_LOGGED_PATH], "method": method}
    show_detail = False
    try:
        service = service_factory()
    except errors.ConfigError as exc:
        response = error_response(exc, request_id=request_id)
        response.headers["X-Content-Type-Options"] = "nosniff"
        _finish(request, response, log, started)
        return response
    try:
        target = route_for(route, method, cors=bool(service.settings.cors_origins))
        show_detail = authenticated(request, service.settings.api_key)
        if target is not None and not target.accepts_body and _has_body(request):
            raise errors.PayloadTooLarge(
                f"expected no body for {method} {show_path(route)}, found "
                + (f"{request.content_length} bytes" if request.content_length else "a chunked body")
            )
        if target is None:
            response = flask.Response(status=204)  # CORS preflight
        else:
            if target.authorised:
                authorise(request, service.settings.api_key)
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
        error = ErrorJson(
            code="internal_error",
            message="unexpected server error; it has been logged",
            request_id=request_id,
        )
        response = json_response(ErrorBody(error=error), 500)
    response.headers["X-Request-Id"] = request_id
    response.headers["X-Content-Type-Options"] = "nosniff"
    response = _cors(request, response, service.settings.cors_origins)
    _finish(request, response, log, started)
    return response


def _finish(request: flask.Request, response: flask.Response, log: RequestLog, started: float) -> None:
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


def _log_request(log: RequestLog, status: int, started: float) -> None:
    log["status"] = status
    log["latency_ms"] = round((time.perf_counter() - started) * 1e3, 2)
    level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.INFO
    logger.log(level, "request", extra={"json_fields": log})
