"""The OCI distribution API for one repository of one registry: blobs (their size, a chunked
upload, a download), manifests by tag or digest, the tag list and deletes, with the registry's
authentication. What gpubuild keeps there, and what the bytes must be, is builder.stores.oci's.

The distribution API over requests (a well-kept HTTP client, already a dependency of the Azure
SDK) rather than a registry library: gpubuild pushes blobs it already has under their sha256,
one small config and two manifests, and needs exact control of chunking, of which blobs are
skipped after a HEAD, and of the messages (no secret in any); oras-py leaves chunked uploads
off because they were flaky across registries. Blobs go up in chunks of 4 MiB (PATCH with
Content-Range, then PUT ?digest=), as the Azure SDKs' registry clients do: one request body of a
whole multi-GB layer is what registries and the proxies before them refuse (413), and a chunk
that meets an expired token answers the new challenge alone. Authentication follows the
registry's challenge: Basic, or Bearer with a token from its realm (with the user and password,
or an identity token as the OAuth2 refresh token, which is how `az acr login` leaves ACR
credentials).

Everything a registry answers is hostile until checked. The Authorization header goes to the
registry's own origin only (scheme, host, port), and only its challenges are answered; a blob
download the registry redirects to its storage goes there without it. Every body is read in a
stream, within a size limit and a deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, cast
from urllib.parse import urljoin

import requests
import urllib3

import builder
from builder.errors import IntegrityError, StoreError
from builder.secrets import register
from builder.stores.registry_auth import (
    RegistryCredentials,
    basic_authorization,
    origin_of,
    parse_challenge,
    printable,
    realm_problem,
    token_problem,
)
from builder.stores.urls import OciLocation

UPLOAD_CHUNK = 4 * 1024 * 1024
_CONNECT_TIMEOUT_S = 10
_READ_TIMEOUT_S = 300  # one wait for an answer (a registry hashes a large blob on commit)
# Whole-body deadlines: a read timeout is per socket read, so a server dripping a byte at a
# time would never meet it. A document (manifest, config, token, tag list, error) has this
# long; a blob this long plus one second per _BLOB_MIN_RATE bytes.
_DOCUMENT_DEADLINE_S = 120.0
_BLOB_GRACE_S = 300.0
_BLOB_MIN_RATE = 32 * 1024
READ_CHUNK = 1024 * 1024
_SMALL_LIMIT = 64 * 1024  # a token answer, an error body
_MANIFEST_LIMIT = 4 * 1024 * 1024
_TAGS_LIMIT = 16 * 1024 * 1024
_JSON_DEPTH = 64  # gpubuild's documents nest 5 deep; json.loads alone allows ~1000
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_LENGTH = re.compile(r"[0-9]{1,19}")
_ERROR_CODE = re.compile(r"[A-Z_]{1,40}")
_MAX_ERROR_CODES = 5
# What breaks a connection mid-body: urllib3's own errors (ProtocolError, IncompleteRead,
# ReadTimeoutError, DecodeError), http.client's, and the socket's.
_STREAM_ERRORS = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)


class _Body:
    """A response's body, read in a stream: a broken connection is a StoreError, and the whole
    read has a deadline, `seconds` plus one second per `min_rate` bytes of `expected` (its
    Content-Length) or of what came, whichever is more."""

    def __init__(
        self,
        response: requests.Response,
        what: str,
        *,
        seconds: float,
        min_rate: int = 0,
        expected: int = 0,
    ) -> None:
        self._response = response
        self._what = what
        self._seconds = seconds
        self._min_rate = min_rate
        self._expected = expected
        self._start = time.monotonic()
        self.received = 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(READ_CHUNK), b""))
        if size == 0:
            return b""
        try:
            # read1: what has come, not `size` bytes, so the deadline is checked between drips.
            data: bytes = self._response.raw.read1(size, decode_content=True)
        except _STREAM_ERRORS as exc:
            self.close()
            raise StoreError(f"{self._what}: the download broke off ({_first_line(exc)})") from None
        self.received += len(data)
        elapsed = time.monotonic() - self._start
        paced = max(self._expected, self.received) / self._min_rate if self._min_rate else 0
        if elapsed > self._seconds + paced:
            self.close()
            raise StoreError(
                f"{self._what}: too slow ({self.received:,} bytes in {elapsed:.0f} s); the"
                " registry or the network is failing: try again later"
            )
        return data

    def close(self) -> None:
        self._response.close()


class RegistryClient:
    """One repository of one registry through the distribution API, with these credentials.
    Blobs are named by digest (`sha256:...`), manifests by tag or digest (a reference)."""

    def __init__(self, location: OciLocation, credentials: RegistryCredentials) -> None:
        self.location = location
        self.credentials = credentials
        self.display_url = location.display_url
        self._origin = origin_of(location.api)
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"gpubuild/{builder.__version__}"
        self._authorization: str | None = None

    # -- HTTP, authentication and errors

    def _request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        expect: tuple[int, ...] = (200,),
        allow: tuple[int, ...] = (),
        action: str = "talking to",
    ) -> requests.Response:
        """One request, its body left unread, with the registry's challenge answered when it
        comes (a token's scope grows from pull to push: a second challenge is answered too).

        The Authorization header goes to the registry's own origin only. GET and HEAD follow
        redirects (registries send blob downloads to their storage), and requests drops the
        header when one leaves the origin; a challenge from another origin is refused."""
        for attempt in range(3):
            sent = dict(headers or {})
            if self._authorization and origin_of(url) == self._origin:
                sent["Authorization"] = self._authorization
            try:
                response = self._session.request(
                    method,
                    url,
                    headers=sent,
                    data=data,
                    stream=True,
                    allow_redirects=method in ("GET", "HEAD"),
                    timeout=(_CONNECT_TIMEOUT_S, _READ_TIMEOUT_S),
                )
            except requests.RequestException as exc:
                raise StoreError(
                    f"cannot reach the registry at {self.display_url} ({_first_line(exc)});"
                    " check the URL, the network, and that it speaks "
                    f"{self.location.scheme} (oci+http:// is for a plain-HTTP registry)"
                ) from None
            if response.status_code == 401 and attempt < 2:
                answered_by = origin_of(response.url)
                challenge = response.headers.get("WWW-Authenticate", "")
                _finish(response)
                if answered_by != self._origin:
                    raise StoreError(
                        f"{action} {self.display_url}: the registry sent the request on to"
                        f" {printable(f'{answered_by[1]}:{answered_by[2]}', 100)}, which asks"
                        " for credentials;"
                        " gpubuild sends credentials to the registry's own address only"
                    )
                self._authorization = self._answer(challenge)
                continue
            if response.status_code in expect or response.status_code in allow:
                return response
            raise self._refused(response, action)
        raise AssertionError("unreachable")  # pragma: no cover

    def _answer(self, header: str) -> str:
        """The Authorization header that answers the registry's challenge."""
        challenge = parse_challenge(header)
        creds = self.credentials
        if challenge.scheme == "basic":
            if creds.password:
                return basic_authorization(creds.username or "", creds.password)
            if creds.identity_token:
                raise StoreError(
                    f"the registry at {self.display_url} asks for Basic authentication, and"
                    f" the credentials from {creds.source} are an identity token, which"
                    " only a Bearer token service takes: log in with a user and password"
                )
            raise self._no_credentials()
        if challenge.scheme != "bearer":
            raise StoreError(
                f"the registry at {self.display_url} asks for {challenge.scheme}"
                " authentication; gpubuild speaks Basic and Bearer"
            )
        problem = realm_problem(
            challenge.realm,
            self._origin,
            creds,
            registry_is_http=self.location.scheme == "http",
        )
        if problem is not None:
            raise StoreError(f"the registry at {self.display_url}: {printable(problem, 400)}")
        return "Bearer " + self._token(challenge.realm, challenge.service, challenge.scope)

    def _token(self, realm: str, service: str | None, scope: str | None) -> str:
        """A token from the realm the registry's challenge named, for these credentials."""
        creds = self.credentials
        params = {
            "scope": scope or f"repository:{self.location.repository}:pull,push",
            **({"service": service} if service else {}),
        }
        headers: dict[str, str] = {}
        form: dict[str, str] | None = None
        if creds.identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token, **params}
        elif creds.password:
            headers["Authorization"] = basic_authorization(creds.username or "", creds.password)
        try:
            answer = self._session.request(
                "POST" if form else "GET",
                realm,
                params=None if form else params,
                data=form,
                headers=headers,
                stream=True,
                allow_redirects=False,
                timeout=(_CONNECT_TIMEOUT_S, 60),
            )
        except requests.RequestException as exc:
            raise StoreError(
                f"cannot reach the token service of {self.display_url} ({_first_line(exc)})"
            ) from None
        if answer.status_code in (401, 403):
            answer.close()
            raise self._credentials_refused(answer.status_code)
        what = f"the token service of {self.display_url}"
        body = _read_limited(answer, _SMALL_LIMIT, what)
        document = json_or_none(body)
        token = ""
        if isinstance(document, Mapping):
            found = document.get("token") or document.get("access_token")
            token = found if isinstance(found, str) else ""
        problem = "no token" if answer.status_code != 200 else token_problem(token)
        if problem is not None:
            raise StoreError(f"{what} answered HTTP {answer.status_code} with {problem}")
        register(token)
        return token

    def _no_credentials(self) -> StoreError:
        return StoreError(
            f"the registry at {self.display_url} wants credentials and none were found: run"
            " `docker login` (or `az acr login`) for it, or set GPUBUILD_REGISTRY_USERNAME and"
            " GPUBUILD_REGISTRY_PASSWORD"
        )

    def _credentials_refused(self, status: int) -> StoreError:
        if self.credentials.anonymous:
            return self._no_credentials()
        return StoreError(
            f"the registry at {self.display_url} refused the credentials from"
            f" {self.credentials.source} (HTTP {status}): log in again (`docker login`,"
            " `az acr login`), or check that they may push to and pull from this repository"
        )

    def _refused(self, response: requests.Response, action: str) -> StoreError:
        status = response.status_code
        codes = ", ".join(_error_codes(response))
        if status == 401:
            return self._credentials_refused(status)
        if status == 403:
            return StoreError(
                f"{action} {self.display_url}: forbidden (HTTP 403"
                f"{', ' + codes if codes else ''}); the credentials from"
                f" {self.credentials.source} lack the permission"
            )
        return StoreError(
            f"{action} {self.display_url} failed: HTTP {status}{' ' + codes if codes else ''}"
        )

    # -- blobs

    def _blob_url(self, digest: str) -> str:
        return f"{self.location.api}/blobs/{digest}"

    def blob_size(self, digest: str) -> int | None:
        """The size the registry has for a blob; None when it has none."""
        response = self._request(
            "HEAD", self._blob_url(digest), allow=(404,), action="reading a blob of"
        )
        _finish(response)
        if response.status_code == 404:
            return None
        length = response.headers.get("Content-Length", "")
        if not _LENGTH.fullmatch(length):
            raise StoreError(
                f"{self.display_url}: the registry answered a size for blob {digest[:23]} that"
                " is not a number"
            )
        return int(length)

    def upload(
        self,
        digest: str,
        source: BinaryIO,
        size: int,
        on_progress: Callable[[int], None] | None,
    ) -> None:
        """POST an upload session, PATCH the bytes in chunks, PUT the digest to commit.
        `on_progress` is called with each chunk's size once the registry took it."""
        started = self._request(
            "POST",
            f"{self.location.api}/blobs/uploads/",
            headers={"Content-Length": "0"},
            expect=(202,),
            action="starting an upload to",
        )
        location = self._next(started)
        offset = 0
        while offset < size:
            chunk = source.read(UPLOAD_CHUNK)
            if not chunk:
                raise IntegrityError(f"the file for {digest} ended at byte {offset} of {size}")
            answer = self._request(
                "PATCH",
                location,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                    "Content-Length": str(len(chunk)),
                },
                data=chunk,
                expect=(202,),
                action="uploading to",
            )
            location = self._next(answer)
            offset += len(chunk)
            if on_progress:
                on_progress(len(chunk))
        joiner = "&" if "?" in location else "?"
        committed = self._request(
            "PUT",
            f"{location}{joiner}digest={digest}",
            headers={"Content-Length": "0"},
            expect=(201,),
            action="committing a blob to",
        )
        _finish(committed)

    def _next(self, response: requests.Response) -> str:
        """Where the upload goes on: the registry's Location, on the registry's own origin."""
        location = response.headers.get("Location", "")
        _finish(response)
        if not location:
            raise StoreError(f"the registry at {self.display_url} gave no upload location")
        joined = urljoin(response.url, location)
        if origin_of(joined) != self._origin:
            scheme, host, port = origin_of(joined)
            raise StoreError(
                f"the registry at {self.display_url} sent the upload to another address"
                f" ({printable(f'{scheme}://{host}:{port}', 100)}); gpubuild uploads to, and sends"
                " credentials to, the registry's own address only"
            )
        return joined

    def open_blob(self, digest: str) -> BinaryIO | None:
        """A layer blob's bytes as they come, within the blob deadline (unchecked: the caller
        hashes them); None when the registry has no such blob."""
        response = self._request(
            "GET",
            self._blob_url(digest),
            allow=(404,),
            action="downloading a blob of",
        )
        if response.status_code == 404:
            _finish(response)
            return None
        length = response.headers.get("Content-Length", "")
        return cast(
            BinaryIO,
            _Body(
                response,
                f"{self.display_url} layer {digest[:23]}",
                seconds=_BLOB_GRACE_S,
                min_rate=_BLOB_MIN_RATE,
                expected=int(length) if _LENGTH.fullmatch(length) else 0,
            ),
        )

    def get_blob(self, digest: str, *, limit: int) -> bytes:
        """A small blob, whole: at most `limit` bytes (unchecked against its digest)."""
        response = self._request("GET", self._blob_url(digest), action="downloading a blob of")
        return _read_limited(response, limit, f"{self.display_url} blob {digest}")

    def delete_blob(self, digest: str) -> bool:
        """False when the registry had no such blob."""
        return self._delete(self._blob_url(digest), "deleting a blob of")

    # -- manifests and tags

    def _manifest_url(self, reference: str) -> str:
        return f"{self.location.api}/manifests/{reference}"

    def where(self, reference: str) -> str:
        """A manifest's reference as messages show it."""
        return f"{self.display_url}{'@' if reference.startswith('sha256:') else ':'}{reference}"

    def get_manifest(self, reference: str, *, accept: str) -> bytes | None:
        """The bytes of the manifest at a tag or digest, of one of the media types `accept`
        names (unchecked: not even against a digest reference); None when there is none."""
        response = self._request(
            "GET",
            self._manifest_url(reference),
            headers={"Accept": accept},
            allow=(404,),
            action="reading an image manifest of",
        )
        if response.status_code == 404:
            _finish(response)
            return None
        return _read_limited(response, _MANIFEST_LIMIT, self.where(reference))

    def manifest_digest(self, reference: str, *, accept: str) -> str | None:
        """The digest of the manifest at a tag or digest, as the registry names it; None when
        there is none, or the registry names no digest."""
        response = self._request(
            "HEAD",
            self._manifest_url(reference),
            headers={"Accept": accept},
            allow=(404,),
            action="reading an image manifest of",
        )
        _finish(response)
        digest = response.headers.get("Docker-Content-Digest", "")
        if response.status_code == 404 or not DIGEST.fullmatch(digest):
            return None
        return digest

    def put_manifest(self, reference: str, data: bytes, *, media_type: str) -> list[str] | None:
        """None once the registry has stored it. When the registry refuses it as invalid
        (HTTP 400), the distribution API's error codes it gave: only the caller knows what a
        missing blob (MANIFEST_BLOB_UNKNOWN) means for it."""
        response = self._request(
            "PUT",
            self._manifest_url(reference),
            headers={"Content-Type": media_type},
            data=data,
            expect=(201,),
            allow=(400,),
            action="pushing the image manifest to",
        )
        if response.status_code == 201:
            _finish(response)
            return None
        return _error_codes(response)

    def delete_manifest(self, digest: str) -> bool:
        """By digest: the API deletes a manifest, and with it the tags that name it. False
        when the registry had no such manifest."""
        return self._delete(self._manifest_url(digest), "deleting an image manifest of")

    def tags(self) -> list[str]:
        """Every tag of the repository, page by page (the registry's Link header, followed on
        the registry's own origin only)."""
        tags: list[str] = []
        url: str | None = f"{self.location.api}/tags/list?n=1000"
        while url:
            response = self._request("GET", url, allow=(404,), action="listing the tags of")
            if response.status_code == 404:  # no such repository yet: nothing published
                _finish(response)
                return []
            following = response.links.get("next", {}).get("url")
            data = _read_limited(response, _TAGS_LIMIT, f"{self.display_url} tag list")
            document = json_or_none(data)
            page = document.get("tags") if isinstance(document, Mapping) else None
            if page is None and isinstance(document, Mapping):
                page = []
            if not isinstance(page, list):
                raise StoreError(f"{self.display_url}: the registry's tag list is not one")
            tags.extend(tag for tag in page if isinstance(tag, str))
            url = urljoin(url, following) if following else None
            if url is not None and origin_of(url) != self._origin:
                raise StoreError(
                    f"{self.display_url}: the registry's tag list goes on at another address"
                )
        return tags

    def _delete(self, url: str, action: str) -> bool:
        response = self._request("DELETE", url, expect=(202,), allow=(404, 405), action=action)
        _finish(response)
        if response.status_code == 405:
            raise StoreError(
                f"{action} {self.display_url}: the registry does not allow deleting (HTTP 405);"
                " turn it on (the CNCF registry: storage.delete.enabled: true)"
            )
        return response.status_code == 202


def json_or_none(data: bytes) -> Any:
    """JSON from a registry, or None when it is not JSON or nests deeper than gpubuild's
    documents do (json.loads would recurse until Python's limit)."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return None
    pending: list[tuple[Any, int]] = [(document, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, (dict, list)):
            if depth > _JSON_DEPTH:
                return None
            items = value.values() if isinstance(value, dict) else value
            pending.extend((item, depth + 1) for item in items)
    return document


def _error_codes(response: requests.Response) -> list[str]:
    """The distribution API's error codes in a refusal (none when the body is not that):
    only code-shaped ones, at most five (they go into messages)."""
    try:
        body = _read_limited(response, _SMALL_LIMIT, "an error")
    except (StoreError, IntegrityError):
        return []
    document = json_or_none(body)
    errors = document.get("errors") if isinstance(document, dict) else None
    if not isinstance(errors, list):
        return []
    codes = [error.get("code") for error in errors[:50] if isinstance(error, dict)]
    valid = [code for code in codes if isinstance(code, str) and _ERROR_CODE.fullmatch(code)]
    return valid[:_MAX_ERROR_CODES]


def _finish(response: requests.Response) -> None:
    """Read what is left of an answer whose body is not needed, so that its connection goes
    back to the pool: closing a streamed answer with bytes unread closes the connection, and
    every request (each 4 MiB chunk of an upload) would open a new one, TLS and all."""
    # A large or broken body: the connection is closed with it.
    with contextlib.suppress(StoreError, IntegrityError):
        _read_limited(response, _SMALL_LIMIT, "an answer")


def _read_limited(response: requests.Response, limit: int, what: str) -> bytes:
    """A whole (small) body: at most `limit` bytes, within the document deadline."""
    body = _Body(response, what, seconds=_DOCUMENT_DEADLINE_S)
    chunks: list[bytes] = []
    total = 0
    try:
        while chunk := body.read(READ_CHUNK):
            total += len(chunk)
            if total > limit:
                raise IntegrityError(f"{what} is larger than {limit} bytes: not gpubuild's")
            chunks.append(chunk)
    finally:
        body.close()
    return b"".join(chunks)


def _first_line(exc: BaseException) -> str:
    text = printable(str(exc), 100_000).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
