"""A real HTTP(S) file server on loopback for models at a URL: Range, ETag, redirects, and faults on demand.

What a Hugging Face, GitHub release or S3 URL does, closely enough to test against: ``ETag`` and
``Last-Modified``, conditional GETs (``304``), ``Range: bytes=N-`` with ``If-Range`` (``206``),
redirects (``/resolve/...`` → a signed URL), and faults a test asks for: drop the connection after
N bytes, answer 503, refuse (403). With ``tls=True`` it speaks HTTPS with a self-signed certificate
made by ``openssl`` for 127.0.0.1; point ``REQUESTS_CA_BUNDLE`` at :attr:`ModelServer.ca_file`.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.server
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Faults:
    """What the next answers do wrong (each count is used up one answer at a time)."""

    drop_after_bytes: int | None = None  # cut the body after this many bytes ...
    drops: int = 0  # ... this many times
    unavailable: int = 0  # answer 503 this many times
    forbidden: bool = False  # answer 403 (an expired presigned URL)
    ignore_range: bool = False  # answer 200 with the whole file to a Range request


@dataclass
class ModelServer:
    """The running server: its files, its faults, and what it was asked (request lines, as sent)."""

    url: str
    files: dict[str, bytes]
    faults: Faults
    requests: list[dict[str, str]] = field(default_factory=list)
    ca_file: Path | None = None

    def etag(self, path: str) -> str:
        return '"' + hashlib.sha256(self.files[path]).hexdigest()[:32] + '"'

    def gets(self, path: str) -> list[dict[str, str]]:
        """The GET requests for ``path`` (query string left out), oldest first."""
        return [r for r in self.requests if r["method"] == "GET" and r["path"].split("?")[0] == path]


LAST_MODIFIED = email.utils.formatdate(1_700_000_000, usegmt=True)


def _handler(server: ModelServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # the test reads server.requests
            return

        def do_GET(self) -> None:
            server.requests.append(
                {"method": "GET", "path": self.path, **{k.lower(): v for k, v in self.headers.items()}}
            )
            path = self.path.split("?", 1)[0]
            if path.startswith("/resolve/"):  # a Hugging Face resolve link: to the CDN, with a signature
                self._answer(
                    302, b"", {"Location": f"{server.url}/cdn/{path[len('/resolve/') :]}?X-Sig=cdn-secret"}
                )
                return
            if path.startswith("/cdn/"):
                path = "/" + path[len("/cdn/") :]
            if server.faults.forbidden:
                self._answer(403, b"<Error>AccessDenied</Error>", {})
                return
            if server.faults.unavailable > 0:
                server.faults.unavailable -= 1
                self._answer(503, b"try later", {"Retry-After": "1"})
                return
            data = server.files.get(path)
            if data is None:
                self._answer(404, b"not found", {})
                return
            etag = server.etag(path)
            validators = {"ETag": etag, "Last-Modified": LAST_MODIFIED, "Accept-Ranges": "bytes"}
            if self.headers.get("If-None-Match") == etag:
                self._answer(304, b"", validators)
                return
            start = 0
            wanted = self.headers.get("Range", "")
            resumable = self.headers.get("If-Range") in (None, etag, LAST_MODIFIED)
            if wanted.startswith("bytes=") and not server.faults.ignore_range and resumable:
                start = int(wanted[len("bytes=") :].split("-")[0])
            body = data[start:]
            headers = dict(validators)
            status = 200
            if start:
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            if server.faults.drops > 0 and server.faults.drop_after_bytes is not None:
                server.faults.drops -= 1
                self._answer(status, body, headers, cut_after=server.faults.drop_after_bytes)
                return
            self._answer(status, body, headers)

        def _answer(
            self, status: int, body: bytes, headers: dict[str, str], *, cut_after: int | None = None
        ) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if cut_after is not None:
                self.wfile.write(body[:cut_after])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # the connection drops half way
                return
            self.wfile.write(body)

    return Handler


def _self_signed(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return key, cert


@contextmanager
def model_server(files: dict[str, bytes], *, folder: Path, tls: bool = False) -> Iterator[ModelServer]:
    """Serve ``files`` (path -> bytes) on 127.0.0.1 until the block ends."""
    faults = Faults()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    scheme, ca_file = "http", None
    if tls:
        key, cert = _self_signed(folder)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        scheme, ca_file = "https", cert
    server = ModelServer(
        url=f"{scheme}://127.0.0.1:{httpd.server_address[1]}",
        files=dict(files),
        faults=faults,
        ca_file=ca_file,
    )
    httpd.RequestHandlerClass = _handler(server)
    thread = threading.Thread(target=httpd.serve_forever, name="model-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)
