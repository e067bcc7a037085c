"""Registries that test the registry store's client, on 127.0.0.1.

`token_registry`: a registry that speaks the Bearer-token challenge, as ACR and Docker Hub do, a
small front before the real CNCF registry. It answers 401 with `WWW-Authenticate: Bearer realm=
...,service=...,scope=...` until a request carries a token from its /token endpoint, which
wants the right user and password (Basic), or a refresh token (grant_type=refresh_token, the
way `az acr login` identity tokens are exchanged); everything else is passed through.

`scripted_registry`: a hostile one. A test's script answers each request (a status, headers,
and a body of bytes or of chunks sent with pauses, cut short when the script says so), or
passes it on to a real registry; every request is recorded with its Authorization header, so
a test can assert what reached which server. Optionally over TLS, with a certificate made
for 127.0.0.1 (`self_signed`).
"""

from __future__ import annotations

import base64
import datetime
import http.client
import http.server
import ipaddress
import json
import secrets
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TokenRegistry:
    upstream: str  # 127.0.0.1:PORT of the real registry
    user: str
    password: str
    refresh_token: str
    url: str = ""
    tokens_issued: list[str] = field(default_factory=list)
    scopes_asked: list[str] = field(default_factory=list)


@contextmanager
def token_registry(
    upstream: str, user: str, password: str, refresh_token: str
) -> Iterator[TokenRegistry]:
    state = TokenRegistry(upstream, user, password, refresh_token)
    valid: set[str] = set()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(
            self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
        ) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)

        def _token(self) -> None:
            query = urllib.parse.urlsplit(self.path).query
            form = dict(urllib.parse.parse_qsl(query))
            if self.command == "POST":
                form.update(urllib.parse.parse_qsl(self._body().decode()))
            state.scopes_asked.append(form.get("scope", ""))
            granted = False
            if form.get("grant_type") == "refresh_token":
                granted = form.get("refresh_token") == state.refresh_token
            else:
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    granted = (user, password) == (state.user, state.password)
            if not granted:
                self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}')
                return
            token = secrets.token_hex(16)
            valid.add(token)
            state.tokens_issued.append(token)
            body = json.dumps({"token": token, "access_token": token}).encode()
            self._send(200, body, {"Content-Type": "application/json"})

        def _proxy(self) -> None:
            if self.path.startswith("/token"):
                self._token()
                return
            header = self.headers.get("Authorization", "")
            if not (header.startswith("Bearer ") and header[7:] in valid):
                self._body()
                realm = f"{state.url}/token"
                scope = (
                    "repository:"
                    + self.path.split("/v2/", 1)[-1].split("/blobs", 1)[0].split("/manifests", 1)[0]
                    + ":pull,push"
                )
                self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {
                    "WWW-Authenticate": f'Bearer realm="{realm}",service="gpubuild-test",scope="{scope}"',
                })  # fmt: skip
                return
            forward(self, state.upstream, self._body())

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _proxy

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def forward(handler: http.server.BaseHTTPRequestHandler, upstream: str, body: bytes) -> None:
    """Pass a request on to the registry at `upstream` (127.0.0.1:PORT) and its answer back.
    The Host header goes on, as a reverse proxy's does: the registry writes upload Locations
    for the address the client used (the client refuses any other)."""
    connection = http.client.HTTPConnection(upstream, timeout=60)
    forwarded = {k: v for k, v in handler.headers.items() if k.lower() != "authorization"}
    connection.request(handler.command, handler.path, body=body or None, headers=forwarded)
    answer = connection.getresponse()
    data = answer.read()
    handler.send_response(answer.status)
    for key, value in answer.getheaders():
        if key.lower() not in ("transfer-encoding", "connection", "content-length"):
            handler.send_header(key, value)
    # A HEAD's length is that of the body it would have: the blob's size.
    length = answer.getheader("Content-Length") if handler.command == "HEAD" else None
    handler.send_header("Content-Length", length or str(len(data)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(data)
    connection.close()


@dataclass(frozen=True)
class Request:
    """One request a scripted server received."""

    server: str  # the server's name
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass(frozen=True)
class Reply:
    """An answer: `body` bytes, or chunks sent one by one `pause` seconds apart; `cut` closes
    the connection after the chunks, whatever Content-Length said."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | Iterable[bytes] = b""
    pause: float = 0.0
    cut: bool = False


PASS = None  # a script's answer that passes the request on to the upstream registry
Script = Callable[[Request], Reply | None]


@dataclass
class Scripted:
    name: str
    url: str = ""  # http(s)://127.0.0.1:PORT
    received: list[Request] = field(default_factory=list)
    connections: int = 0  # TCP connections accepted

    @property
    def address(self) -> str:
        return self.url.split("://", 1)[1]

    def requests_to(self, fragment: str) -> list[Request]:
        return [r for r in self.received if fragment in r.path]


@contextmanager
def scripted_registry(
    script: Script,
    *,
    name: str = "registry",
    upstream: str | None = None,
    tls: tuple[Path, Path] | None = None,
) -> Iterator[Scripted]:
    """A server whose every answer comes from `script` (None: passed on to `upstream`, or 404
    without one). `tls`: (certificate, key) files to serve https with."""
    state = Scripted(name)
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def setup(self) -> None:
            super().setup()
            with lock:
                state.connections += 1

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            request = Request(
                name, self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body
            )
            with lock:
                state.received.append(request)
            reply = script(request)
            if reply is None:
                if upstream is None:
                    reply = Reply(404)
                else:
                    forward(self, upstream, body)
                    return
            self._send(reply)

        def _send(self, reply: Reply) -> None:
            self.send_response(reply.status)
            headers = {k.lower(): v for k, v in reply.headers.items()}
            for key, value in reply.headers.items():
                self.send_header(key, value)
            if isinstance(reply.body, bytes):
                if "content-length" not in headers:
                    self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                chunks: Iterable[bytes] = [reply.body] if self.command != "HEAD" else []
            else:
                if "content-length" not in headers:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                chunks = reply.body
            try:
                for chunk in chunks:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    if reply.pause:
                        time.sleep(reply.pause)
            except OSError:
                return  # the client gave up: what the test wanted to see
            if reply.cut:
                self.close_connection = True
                self.connection.shutdown(2)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    scheme = "http"
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    state.url = f"{scheme}://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost and its key, written into `folder`; a client
    trusts it with REQUESTS_CA_BUNDLE=<certificate>."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpubuild test registry")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "registry.crt", folder / "registry.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
