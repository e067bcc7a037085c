"""A store served over HTTP on 127.0.0.1 that misbehaves on purpose, request by request.

`ScriptedStore` serves a store folder (blobs/ and manifests) like a plain web server, with
HTTP Range support, and takes a queue of faults per path: each request for that path takes the
next fault, and requests beyond the queue are served normally. It logs every request (path,
status, range start, bytes sent, time), so tests can assert what was served, not only what the
client did.
"""

from __future__ import annotations

import http.server
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Serve:
    """Serve the file (or `body` instead of it, e.g. hostile bytes) after `delay` seconds."""

    body: bytes | None = None
    delay: float = 0.0


@dataclass(frozen=True)
class Cut:
    """Send `fraction` of the body, then close the connection."""

    fraction: float = 0.5


@dataclass(frozen=True)
class Stall:
    """Send `fraction` of the body, then nothing until the server stops."""

    fraction: float = 0.5


@dataclass(frozen=True)
class Slow:
    """Send the body at about `bytes_per_second` (until the server stops)."""

    bytes_per_second: int = 2_000_000


@dataclass(frozen=True)
class Status:
    """Answer with an HTTP error status (and a Retry-After header when given)."""

    code: int
    retry_after: int | None = None


Fault = Serve | Cut | Stall | Slow | Status


@dataclass(frozen=True)
class Served:
    path: str
    status: int
    range_start: int
    bytes_sent: int
    at: float


@dataclass
class ScriptedStore:
    root: Path
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    log: list[Served] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._release = threading.Event()
        store = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                store._handle(self)

            def do_HEAD(self) -> None:
                store._head(self)

            def log_message(self, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                # A client hanging up on a cut or stalled stream is the point of these tests.
                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)  # type: ignore[arg-type]

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def script(self, path: str, *faults: Fault) -> None:
        """Faults for the next requests of `path` (e.g. "/blobs/<sha>.tar.zst"), in order."""
        with self._lock:
            self.faults.setdefault(path, []).extend(faults)

    def served(self, path: str) -> list[Served]:
        with self._lock:
            return [entry for entry in self.log if entry.path == path]

    def _next_fault(self, path: str) -> Fault | None:
        with self._lock:
            queue = self.faults.get(path)
            return queue.pop(0) if queue else None

    def _record(self, path: str, status: int, start: int, sent: int) -> None:
        with self._lock:
            self.log.append(Served(path, status, start, sent, time.monotonic()))

    def _head(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        """HEAD answers from the file as it is; faults are for the GETs that follow."""
        path = handler.path.split("?", 1)[0]
        file = self.root / path.lstrip("/")
        if file.is_dir():
            file = file / "index.html"
        if not file.is_file():
            handler.send_response(404)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        handler.send_response(200)
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Length", str(file.stat().st_size))
        handler.end_headers()

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0]
        fault = self._next_fault(path)
        if isinstance(fault, Status):
            handler.send_response(fault.code)
            if fault.retry_after is not None:
                handler.send_header("Retry-After", str(fault.retry_after))
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            self._record(path, fault.code, 0, 0)
            return
        file = self.root / path.lstrip("/")
        if file.is_dir():  # a package index's project pages
            file = file / "index.html"
        if isinstance(fault, Serve) and fault.body is not None:
            data = fault.body
        elif file.is_file():
            data = file.read_bytes()
        else:
            handler.send_response(404)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            self._record(path, 404, 0, 0)
            return
        if isinstance(fault, Serve) and fault.delay:
            time.sleep(fault.delay)
        start = _range_start(handler.headers.get("Range"), len(data))
        if start is None:
            handler.send_response(416)
            handler.send_header("Content-Range", f"bytes */{len(data)}")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            self._record(path, 416, 0, 0)
            return
        body = data[start:]
        status = 206 if start else 200
        handler.send_response(status)
        kind = "text/html" if file.name.endswith(".html") else "application/octet-stream"
        handler.send_header("Content-Type", kind)
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if isinstance(fault, Cut | Stall):
            part = body[: int(len(body) * fault.fraction)]
            handler.wfile.write(part)
            handler.wfile.flush()
            self._record(path, status, start, len(part))
            if isinstance(fault, Stall):
                self._release.wait(120)
            handler.close_connection = True
            return
        sent = 0
        step = 64 * 1024 if isinstance(fault, Slow) else 1 << 20
        try:
            for offset in range(0, len(body), step):
                if isinstance(fault, Slow):
                    if self._release.is_set():
                        break
                    time.sleep(step / fault.bytes_per_second)
                chunk = body[offset : offset + step]
                handler.wfile.write(chunk)
                sent += len(chunk)
        finally:
            self._record(path, status, start, sent)

    def __enter__(self) -> ScriptedStore:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()


def _range_start(header: str | None, size: int) -> int | None:
    """The first byte a `Range: bytes=N-` header asks for; 0 without one; None past the end."""
    if not header or not header.startswith("bytes="):
        return 0
    first = header[len("bytes=") :].split("-", 1)[0].strip()
    if not first.isdigit():
        return 0
    start = int(first)
    return start if start < size else None


def blob_path(sha256: str) -> str:
    return f"/blobs/{sha256}.tar.zst"


def served_bytes(entries: Iterator[Served] | list[Served]) -> int:
    return sum(entry.bytes_sent for entry in entries)
