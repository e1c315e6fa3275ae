"""Uploads: a predict request's body, read into memory with a size bound and a deadline, and parsed.

The image comes as multipart field ``image``, as the raw body, or as JSON ``{"image_base64": ...}``;
options come from the query, then form fields or JSON keys. Nothing is spooled to disk or logged.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import flask
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge
from werkzeug.formparser import FormDataParser

try:  # gunicorn serves the function (functions-framework depends on it); a test client has no such errors
    from gunicorn.http.errors import ParseException
except ImportError:  # pragma: no cover

    class ParseException(Exception):  # type: ignore[no-redef]
        """Never raised where gunicorn is absent."""


from dermal_fn import errors
from dermal_fn.serving.options import OPTION_NAMES

IMAGE_TYPES_HINT = "multipart/form-data (field 'image'), image/*, application/dicom, application/octet-stream or application/json"
# the options as the client sent them, before PredictOptions.parse checks them
RawOptions = dict[str, object]
BODY_READ = "dermal_fn.body_read"  # environ key: this request's body was read to its end
# what a client's field name must look like to be echoed in a message
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,40}")


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
        except ParseException as exc:
            # gunicorn's body parser: bad chunk sizes, missing CRLF, NUL in an extension or trailer
            raise errors.InvalidRequest(
                f"expected well-formed chunked framing, found {type(exc).__name__} after {buffer.tell()} bytes"
            ) from None
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

    def __init__(
        self, request: flask.Request, timeout_s: float | None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self.socket: socket.socket | None = request.environ.get("gunicorn.socket")
        self.expired = False
        self._timer: threading.Timer | None = None
        self._started = clock()

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
            f"{self.clock() - self._started:.0f} s"
        )

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _memory_stream(*args: Any, **kwargs: Any) -> io.BytesIO:
    """Werkzeug stream factory that keeps file parts in memory (the default spools to disk)."""
    return io.BytesIO()


def parse_upload(
    request: flask.Request, *, limit: int, timeout_s: float | None = None
) -> tuple[bytes, RawOptions]:
    """The image bytes and the options (query, then form fields or JSON keys) of a predict request."""
    options: RawOptions = {k: v for k, v in request.args.items() if k in OPTION_NAMES}
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
    if mimetype.startswith("image/") or mimetype in ("application/octet-stream", "application/dicom", ""):
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


def _json_image(body: bytes, options: dict[str, Any]) -> tuple[bytes, RawOptions]:
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
