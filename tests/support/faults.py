"""A store served over HTTP on 127.0.0.1 that misbehaves on purpose, request by request.

`ScriptedStore` serves a store folder (blobs/ and manifests) like a plain web server, with
HTTP Range support, and takes a queue of faults per path: each request for that path takes the
next fault, and requests beyond the queue are served normally. It logs every request (path,
status, range start, bytes sent, time), so tests can assert what was served, not only what the
client did.

`FaultProxy` stands in front of a real store server (nginx, Azurite) for many clients at once
and misbehaves at random, by shares (`Chaos`): 503 Server Busy with Retry-After, connections
reset mid-body, a cap on concurrent connections, paced bodies. It logs every request by client.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import itertools
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
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
    """Answer with an HTTP error status (and a Retry-After header when given: seconds, or
    the header's text as is, e.g. an HTTP date)."""

    code: int
    retry_after: int | str | None = None


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


# --- a fault-injecting proxy in front of a real store, for many clients at once ------------------


@dataclass(frozen=True)
class Chaos:
    """How a FaultProxy misbehaves, drawn request by request from a seeded random source, like a
    storage account under a crowd: some requests get 503 Server Busy with Retry-After, some
    bodies are cut by a connection reset, and requests beyond `max_connections` at once are
    turned away with 503 too. `bytes_per_second` paces each response (0: no pacing)."""

    busy: float = 0.0
    retry_after: int = 1
    reset: float = 0.0
    max_connections: int = 0
    bytes_per_second: int = 0
    seed: int = 0
    cut_between: tuple[float, float] = (0.2, 0.9)  # where a reset body is cut, as a share
    max_resets: int | None = None  # no more resets than this in all (None: no limit)
    # "reset": a TCP reset (what the client had not read yet is lost, as on a real network);
    # "close": a plain close after the bytes sent (all of them reach the client).
    cut_with: str = "reset"


@dataclass(frozen=True)
class Relayed:
    """One request through the proxy. `client`: the first path segment of the URL the client
    used (the proxy strips it before asking the upstream), so each pod can be told apart."""

    client: str
    method: str
    path: str
    status: int
    range_start: int
    bytes_sent: int
    fault: str  # "", "busy", "capped" or "reset"
    started: float
    ended: float


class FaultProxy:
    """A reverse proxy on 127.0.0.1 in front of `upstream` (nginx serving a folder store, or
    Azurite), misbehaving as `chaos` says and logging every request it answers.

    Clients use `client_url(name)`: `http://127.0.0.1:PORT/<name>`, which maps to the
    upstream's root (for Azurite, add `/ACCOUNT/CONTAINER` as usual)."""

    def __init__(self, upstream: str, chaos: Chaos) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.upstream_path = parts.path.rstrip("/")
        self.chaos = chaos
        self.log: list[Relayed] = []
        self._lock = threading.Lock()
        self._random = random.Random(chaos.seed)
        self._active = 0
        self._resets = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                proxy._relay(self, "GET")

            def do_HEAD(self) -> None:
                proxy._relay(self, "HEAD")

            def log_message(self, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024  # a crowd connects at once: no SYN may be dropped

            def handle_error(self, request: object, client_address: object) -> None:
                if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
                    super().handle_error(request, client_address)  # type: ignore[arg-type]

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def client_url(self, client: str) -> str:
        return f"{self.url}/{client}"

    def _draw(self) -> tuple[bool, float | None]:
        """(answer 503?, where to cut the body as a share of it, or None)."""
        chaos = self.chaos
        with self._lock:
            busy = self._random.random() < chaos.busy
            cut = None
            if self._random.random() < chaos.reset and (
                chaos.max_resets is None or self._resets < chaos.max_resets
            ):
                cut = self._random.uniform(*chaos.cut_between)
        return busy, cut

    def _relay(self, handler: http.server.BaseHTTPRequestHandler, method: str) -> None:
        started = time.monotonic()
        _, client, rest = (
            handler.path.split("/", 2) if handler.path.count("/") >= 2 else ("", "", "")
        )
        path = f"{self.upstream_path}/{rest}"
        range_start = _range_start(handler.headers.get("Range"), 2**62) or 0
        handler.close_connection = True
        with self._lock:
            capped = 0 < self.chaos.max_connections <= self._active
            if not capped:
                self._active += 1
        busy, cut = self._draw()
        if capped or busy:
            self._busy(handler)
            self._note(
                client, method, path, 503, range_start, 0, "capped" if capped else "busy", started
            )
            if not capped:
                with self._lock:
                    self._active -= 1
            return
        try:
            self._forward(
                handler,
                method,
                path,
                client,
                range_start,
                cut if method == "GET" else None,
                started,
            )
        finally:
            with self._lock:
                self._active -= 1

    def _busy(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        body = b"<Error><Code>ServerBusy</Code><Message>The server is busy.</Message></Error>"
        handler.send_response(503, "Server Busy")
        handler.send_header("Retry-After", str(self.chaos.retry_after))
        handler.send_header("x-ms-error-code", "ServerBusy")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        with contextlib.suppress(OSError):
            handler.wfile.write(body)

    def _forward(
        self,
        handler: http.server.BaseHTTPRequestHandler,
        method: str,
        path: str,
        client: str,
        range_start: int,
        cut: float | None,
        started: float,
    ) -> None:
        upstream = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        sent = 0
        fault = ""
        status = 502
        try:
            headers = {
                k: v for k, v in handler.headers.items() if k.lower() not in ("host", "connection")
            }
            upstream.request(method, path, headers=headers)
            answer = upstream.getresponse()
            status = answer.status
            length = int(answer.getheader("Content-Length") or 0)
            handler.send_response(answer.status, answer.reason)
            for key, value in answer.getheaders():
                if key.lower() not in (
                    "connection",
                    "transfer-encoding",
                    "keep-alive",
                    "server",
                    "date",
                ):
                    handler.send_header(key, value)
            handler.send_header("Connection", "close")
            handler.end_headers()
            if method == "HEAD":
                return
            limit = int(length * cut) if cut is not None and status in (200, 206) else None
            pace = self.chaos.bytes_per_second
            step = 64 * 1024
            while chunk := answer.read(step):
                if limit is not None and sent + len(chunk) >= limit:
                    handler.wfile.write(chunk[: limit - sent])
                    handler.wfile.flush()
                    sent = limit
                    fault = "reset"
                    with self._lock:
                        self._resets += 1
                    if self.chaos.cut_with == "reset":
                        _reset(handler.connection)
                    return
                handler.wfile.write(chunk)
                sent += len(chunk)
                if pace:
                    time.sleep(len(chunk) / pace)
        except OSError:
            fault = fault or "client-gone"
        finally:
            upstream.close()
            self._note(client, method, path, status, range_start, sent, fault, started)

    def _note(
        self,
        client: str,
        method: str,
        path: str,
        status: int,
        range_start: int,
        sent: int,
        fault: str,
        started: float,
    ) -> None:
        # Logged without the query: a SAS is no part of what was asked for.
        entry = Relayed(
            client,
            method,
            path.split("?", 1)[0],
            status,
            range_start,
            sent,
            fault,
            started,
            time.monotonic(),
        )
        with self._lock:
            self.log.append(entry)

    def entries(self) -> list[Relayed]:
        with self._lock:
            return list(self.log)

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _reset(connection: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a dropped connection looks to the client."""
    with contextlib.suppress(OSError):
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()


def retry_gaps(entries: list[Relayed]) -> list[tuple[Relayed, Relayed]]:
    """(failed request, the same client's next request for the same path) pairs: every retry
    the log shows, with what it answered."""
    by_key: dict[tuple[str, str], list[Relayed]] = {}
    for entry in sorted(entries, key=lambda e: e.started):
        if entry.method == "GET":
            by_key.setdefault((entry.client, entry.path), []).append(entry)
    pairs = []
    for requests in by_key.values():
        for before, after in itertools.pairwise(requests):
            if before.fault or before.status >= 500:
                pairs.append((before, after))
    return pairs


@dataclass(frozen=True)
class PodRun:
    """One init script run by `run_pods`: its volume, exit status, log and wall time."""

    name: str
    target: Path
    returncode: int
    stderr: str
    seconds: float

    @property
    def retries(self) -> int:
        """What the script's last line reports: "...; N retries)"."""
        for line in reversed(self.stderr.splitlines()):
            if "done:" in line and "retr" in line:
                words = line.rsplit(";", 1)[-1].split()
                return int(words[0]) if words and words[0].isdigit() else -1
        return -1


def run_pods(
    script: Path,
    count: int,
    work: Path,
    store_url: Callable[[str], str],
    env: dict[str, str],
    *,
    timeout: float = 600,
) -> list[PodRun]:
    """Start `count` copies of the init script at once, each with a volume of its own and
    GPUBUILD_STORE_URL=store_url(name) ("pod-000", ...), as a worker group's pods do when
    they start together; wait for all of them (each one's log goes to a file, so that no
    pipe fills up while others are waited for)."""
    running: list[tuple[str, Path, Path, subprocess.Popen[bytes], float]] = []
    for number in range(count):
        name = f"pod-{number:03d}"
        target = work / name / "vol"
        target.mkdir(parents=True)
        tmp = work / name / "tmp"
        tmp.mkdir()
        log = work / name / "stderr.log"
        pod_env = {
            **env,
            "GPUBUILD_TARGET": str(target),
            "GPUBUILD_STORE_URL": store_url(name),
            "TMPDIR": str(tmp),
        }
        with log.open("wb") as err:
            proc = subprocess.Popen(
                ["bash", str(script)], env=pod_env, stdout=subprocess.DEVNULL, stderr=err
            )
        running.append((name, target, log, proc, time.monotonic()))
    ended: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(ended) < len(running) and time.monotonic() < deadline:
        for name, _, _, proc, _ in running:
            if name not in ended and proc.poll() is not None:
                ended[name] = time.monotonic()
        time.sleep(0.05)
    finished = []
    for name, target, log, proc, started in running:
        if name not in ended:
            proc.kill()
            proc.wait()
            ended[name] = time.monotonic()
        text = log.read_text(errors="replace")
        finished.append(PodRun(name, target, proc.returncode, text, ended[name] - started))
    return finished
