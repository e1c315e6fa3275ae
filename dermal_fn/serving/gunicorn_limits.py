"""The HTTP server's own limits and its own error answers, as the HTTP API promises them.

functions-framework 3.x starts gunicorn with ``limit_request_line=0``: no bound on a request line,
whose parsing is quadratic in gunicorn's pure-Python parser (an 8 MiB line cost 7.2 CPU-seconds
and 30 MB). :func:`install` restores gunicorn's own bounds (a 4094-byte request line, 100 header
fields of at most 8190 bytes; ``LIMIT_REQUEST_LINE``, ``LIMIT_REQUEST_FIELDS`` and
``LIMIT_REQUEST_FIELD_SIZE`` change them) and makes the errors gunicorn answers itself (a bad
request line or header, before our code runs) JSON with ``nosniff`` instead of an HTML page.

It runs where functions-framework imports the function's source (``main.py`` or
:mod:`dermal_fn.serving.function`), in the master before gunicorn reads its configuration.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

# gunicorn's defaults, which functions-framework overrides for the request line only
LIMITS = {"limit_request_line": 4094, "limit_request_fields": 100, "limit_request_field_size": 8190}
_ENV = {
    "limit_request_line": "LIMIT_REQUEST_LINE",
    "limit_request_fields": "LIMIT_REQUEST_FIELDS",
    "limit_request_field_size": "LIMIT_REQUEST_FIELD_SIZE",
}
MAX_MESSAGE_CHARS = 200


def limits(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """The bounds to configure: gunicorn's defaults, or whole numbers from the environment."""
    env = os.environ if environ is None else environ
    out = dict(LIMITS)
    for key, variable in _ENV.items():
        raw = (env.get(variable) or "").strip()
        if raw.isdigit() and int(raw) > 0:
            out[key] = int(raw)
    return out


def json_error(status_int: int, reason: str, mesg: str) -> bytes:
    """A whole HTTP/1.1 error answer with the API's JSON body (the message cut, never the raw bytes)."""
    message = " ".join(str(mesg).split())[:MAX_MESSAGE_CHARS]
    body = json.dumps(
        {
            "error": {
                "code": "invalid_request",
                "message": f"expected a well-formed HTTP request, found: {message}",
            }
        }
    )
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"X-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return (head + body).encode("latin-1", "replace")


def install() -> bool:
    """Bound request lines and headers and answer gunicorn's own errors in JSON; False without gunicorn."""
    try:
        import gunicorn.util
        from functions_framework._http import gunicorn as ff_gunicorn
    except ImportError:  # not served by gunicorn (a test client, Windows): nothing to bound here
        return False
    application = ff_gunicorn.GunicornApplication
    if not getattr(application, "_dermal_limits", False):
        original = application.load_config

        def load_config(self: Any) -> None:
            original(self)
            for key, value in limits().items():
                self.cfg.set(key, value)

        application.load_config = load_config  # type: ignore[method-assign]
        application._dermal_limits = True

        def write_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
            gunicorn.util.write_nonblock(sock, json_error(status_int, reason, mesg))

        gunicorn.util.write_error = write_error
    return True
