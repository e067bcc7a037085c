"""A registry that speaks the Bearer-token challenge, as ACR and Docker Hub do: a small front on
127.0.0.1 before the real CNCF registry. It answers 401 with `WWW-Authenticate: Bearer realm=
...,service=...,scope=...` until a request carries a token from its /token endpoint, which
wants the right user and password (Basic), or a refresh token (grant_type=refresh_token, the
way `az acr login` identity tokens are exchanged); everything else is passed through."""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import secrets
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


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
            body = self._body()
            connection = http.client.HTTPConnection(state.upstream, timeout=60)
            forwarded = {
                k: v for k, v in self.headers.items() if k.lower() not in ("authorization", "host")
            }
            connection.request(self.command, self.path, body=body or None, headers=forwarded)
            answer = connection.getresponse()
            data = answer.read()
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            connection.close()

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
