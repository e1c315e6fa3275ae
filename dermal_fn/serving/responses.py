"""Responses: JSON bodies and errors with their status (the table is :mod:`~dermal_fn.serving.error_codes`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import flask

from dermal_fn import errors
from dermal_fn.serving.error_codes import status_for
from dermal_fn.serving.shapes import ErrorBody, ErrorJson


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
    """The API's error body with its status (and Retry-After for 503, Allow for 405).

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
    error = ErrorJson(code=code, message=str(exc))
    if request_id is not None:
        error["request_id"] = request_id
    if show_detail and exc.detail:
        error["detail"] = exc.detail
    return json_response(ErrorBody(error=error), status, headers)
