"""A store in an OCI registry (`oci://REGISTRY/REPOSITORY`): the heavy set as an image.

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
stream, within a size limit and a deadline. An image is accepted only when it is exactly the
one gpubuild makes of the manifest its config carries (builder.ociimage.check_image).

Layout: every shard is a layer blob under its sha256; the image manifests are tagged
`<profile>-<digest16>` (and `...-copy` for the init-copy image) and always referenced by
their own digest in what gpubuild generates. A manifest is pushed after every blob it names.
A third, tiny manifest tagged `...-published` records when the digest was published (the
images themselves are reproducible, and a registry dates nothing): gc orders digests by it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import urljoin

import requests
import urllib3
import zstandard

import builder
from builder.errors import BadInputError, IntegrityError, NotPublishedError, StoreError
from builder.manifest import Manifest, Shard, manifest_from_bytes, manifest_to_bytes
from builder.ociimage import (
    BUSYBOX_LIMIT,
    IMAGE_MANIFEST,
    LAYER_TAR,
    Blob,
    StaticBusybox,
    TreeEntry,
    build_image,
    check_copier,
    check_image,
    copier_layer,
    image_parts,
    image_tag,
    manifest_in_config,
    oci_architecture,
    read_static_busybox,
    tree_entries,
)
from builder.secrets import register
from builder.stores.base import (
    UNDATED,
    BlobsVanished,
    ProgressCallback,
    Store,
    StoredBlob,
    StoredManifest,
    check_local_blob,
    check_sha256,
    file_size,
)
from builder.stores.registry_auth import (
    RegistryCredentials,
    basic_authorization,
    origin_of,
    parse_challenge,
    printable,
    realm_problem,
    registry_credentials,
    token_problem,
)
from builder.stores.urls import OciLocation, default_store_path

UPLOAD_CHUNK = 4 * 1024 * 1024
_CONNECT_TIMEOUT_S = 10
_READ_TIMEOUT_S = 300  # one wait for an answer (a registry hashes a large blob on commit)
# Whole-body deadlines: a read timeout is per socket read, so a server dripping a byte at a
# time would never meet it. A document (manifest, config, token, tag list, error) has this
# long; a blob this long plus one second per _BLOB_MIN_RATE bytes.
_DOCUMENT_DEADLINE_S = 120.0
_BLOB_GRACE_S = 300.0
_BLOB_MIN_RATE = 32 * 1024
_READ_CHUNK = 1024 * 1024
_SMALL_LIMIT = 64 * 1024  # a token answer, an error body
_MANIFEST_LIMIT = 4 * 1024 * 1024
_CONFIG_LIMIT = 64 * 1024 * 1024
_TAGS_LIMIT = 16 * 1024 * 1024
_COPIER_LIMIT = BUSYBOX_LIMIT + 1024 * 1024
_JSON_DEPTH = 64  # gpubuild's documents nest 5 deep; json.loads alone allows ~1000
_ACCEPT = ", ".join([IMAGE_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json"])
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
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
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
# The publish record: an OCI artifact whose config is the empty descriptor's `{}`.
_EMPTY = Blob("application/vnd.oci.empty.v1+json", b"{}")
_RECORD_TYPE = "application/vnd.gpubuild.published.v1"
_PUBLISHED = "dev.gpubuild.published"
_RECORD_SUFFIX = "-published"
_HEAVY_TAG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*-[0-9a-f]{16}")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


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
            return b"".join(iter(lambda: self.read(_READ_CHUNK), b""))
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


class _Hashing:
    """A reader that hashes and counts what passes through it."""

    def __init__(self, source: BinaryIO) -> None:
        self.source = source
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.source.read(size)
        self.sha256.update(chunk)
        self.bytes += len(chunk)
        return chunk


class OciStore(Store):
    """A repository in an OCI registry. `busybox`: the static busybox for the init-copy image
    (None: only the heavy image is pushed); `busybox_explicit`: the user named it
    (GPUBUILD_BUSYBOX), so one for another architecture than a profile's is an error."""

    keeps_blob_times = False  # the distribution API dates nothing

    def __init__(
        self,
        location: OciLocation,
        credentials: RegistryCredentials,
        *,
        busybox: StaticBusybox | None = None,
        busybox_explicit: bool = False,
    ) -> None:
        self.location = location
        self.credentials = credentials
        self.busybox = busybox
        self.busybox_explicit = busybox_explicit
        self.display_url = location.display_url
        self.base_url = location.display_url  # no plain-HTTP folder: pods pull the image
        self._origin = origin_of(location.api)
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"gpubuild/{builder.__version__}"
        self._authorization: str | None = None
        self._listed: dict[str, StoredManifest | None] = {}  # heavy tag -> what it holds
        # Folders holding local copies of shards (the pack a publish uploads from): the
        # copier's list of entries is read from them rather than downloaded again.
        self._blob_folders: set[Path] = {default_store_path() / "blobs"}
        self._entries: dict[str, tuple[TreeEntry, ...]] = {}  # lock digest -> the tree's

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
        document = _json_or_none(body)
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

    def has_blob(self, sha256: str) -> int | None:
        check_sha256(sha256)
        return self._blob_size(f"sha256:{sha256}")

    def _blob_size(self, digest: str) -> int | None:
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

    def put_blob(
        self,
        sha256: str,
        path: Path,
        on_progress: ProgressCallback | None = None,
        *,
        overwrite: bool = False,
    ) -> bool:
        # A registry checks every blob's digest as it is committed, and keeps the one copy it
        # has of a digest: a damaged copy cannot be replaced by pushing the same digest again.
        self._blob_folders.add(path.parent)
        if overwrite:
            raise StoreError(
                f"{self.display_url}: layer sha256:{sha256[:16]}... is damaged in the registry,"
                " and a registry cannot replace a blob: it keeps one copy per digest and takes"
                " a new upload of that digest as already there. --repair uploads missing layers"
                " only. Delete the images that name it (gpubuild gc, or the registry's own"
                " tools), let the registry's garbage collection remove the blob, then publish"
                " again; for a managed registry (ACR), ask its support"
            )
        size = file_size(path)
        if self.has_blob(sha256) == size:
            return False
        check_local_blob(path, sha256)
        with path.open("rb") as source:
            self._upload(f"sha256:{sha256}", source, size, on_progress)
        return True

    def _put_bytes(self, blob: Blob) -> None:
        if self._blob_size(blob.digest) == len(blob.data):
            return
        self._upload(blob.digest, io.BytesIO(blob.data), len(blob.data), None)

    def _upload(
        self, digest: str, source: BinaryIO, size: int, on_progress: ProgressCallback | None
    ) -> None:
        """POST an upload session, PATCH the bytes in chunks, PUT the digest to commit."""
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

    def open_blob(self, sha256: str) -> BinaryIO:
        check_sha256(sha256)
        response = self._request(
            "GET",
            self._blob_url(f"sha256:{sha256}"),
            allow=(404,),
            action="downloading a blob of",
        )
        if response.status_code == 404:
            _finish(response)
            raise self._missing_blob(sha256)
        length = response.headers.get("Content-Length", "")
        return cast(
            BinaryIO,
            _Body(
                response,
                f"{self.display_url} layer sha256:{sha256[:16]}",
                seconds=_BLOB_GRACE_S,
                min_rate=_BLOB_MIN_RATE,
                expected=int(length) if _LENGTH.fullmatch(length) else 0,
            ),
        )

    def _missing_blob(self, sha256: str) -> StoreError:
        return StoreError(
            f"{self.display_url} has no layer sha256:{sha256}: it was deleted or never"
            " published; publish the profile again"
        )

    def _get_bytes(self, digest: str, *, limit: int) -> bytes:
        response = self._request("GET", self._blob_url(digest), action="downloading a blob of")
        data = _read_limited(response, limit, f"{self.display_url} blob {digest}")
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(f"{self.display_url}: blob {digest} is not its digest")
        return data

    # -- images

    def _manifest_url(self, reference: str) -> str:
        return f"{self.location.api}/manifests/{reference}"

    def _where(self, reference: str) -> str:
        return f"{self.display_url}{'@' if reference.startswith('sha256:') else ':'}{reference}"

    def _get_image(self, reference: str) -> tuple[dict[str, Any], str] | None:
        """The image manifest at a tag or digest, parsed (unchecked), and the digest of its
        bytes; None when there is none."""
        response = self._request(
            "GET",
            self._manifest_url(reference),
            headers={"Accept": _ACCEPT},
            allow=(404,),
            action="reading an image manifest of",
        )
        if response.status_code == 404:
            _finish(response)
            return None
        where = self._where(reference)
        data = _read_limited(response, _MANIFEST_LIMIT, where)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise IntegrityError(f"{where}: the registry served another manifest")
        document = _json_or_none(data)
        if not isinstance(document, dict):
            raise IntegrityError(f"{where}: not an image manifest")
        return document, digest

    def _checked_image(
        self, reference: str, *, copy: bool | None = None, expected: Manifest | None = None
    ) -> tuple[Manifest, str] | None:
        """(the manifest it carries, its digest) of the image at `reference` (None: there is
        none), once it is exactly the image gpubuild makes of that manifest: the heavy image,
        or with `copy` the init-copy image (None: whichever its layers say). `expected`: the
        manifest it must carry (the heavy image's, for the init-copy image)."""
        found = self._get_image(reference)
        if found is None:
            return None
        document, digest = found
        where = f"{self.display_url}@{digest}" + (
            "" if reference.startswith("sha256:") else f" (tag {reference})"
        )
        config_descriptor, layers = image_parts(document, where)
        if config_descriptor.size > _CONFIG_LIMIT:
            raise IntegrityError(f"{where}: its config is larger than gpubuild's are")
        config = _json_or_none(self._get_bytes(config_descriptor.digest, limit=_CONFIG_LIMIT))
        if config is None:
            raise IntegrityError(f"{where}: its config is not JSON gpubuild wrote")
        manifest = manifest_in_config(config, where)
        if expected is not None and manifest != expected:
            raise IntegrityError(f"{where}: it carries another manifest than the heavy image")
        if copy is None:
            copy = len(layers) == len(manifest.shards) + 2
        copier = None
        if copy:
            last = layers[-1] if layers else None
            if last is None or last.media_type != LAYER_TAR or last.size > _COPIER_LIMIT:
                raise IntegrityError(f"{where}: its last layer is not gpubuild's copier")
            data = self._get_bytes(last.digest, limit=_COPIER_LIMIT)
            check_copier(data, manifest, where)
            copier = Blob(LAYER_TAR, data)
        check_image(document, config, manifest, copier, where)
        return manifest, digest

    def manifest_at(self, reference: str) -> tuple[Manifest, str]:
        """The gpubuild manifest an image (tag or digest) carries, and the image's digest."""
        found = self._checked_image(reference)
        if found is None:
            raise NotPublishedError(
                f"{self._where(reference)}: no such image; publish it first (gpubuild"
                f" publish-cache --store {self.display_url})"
            )
        return found

    def get_manifest(self, profile: str, digest: str) -> bytes:
        found = self._checked_image(image_tag(profile, digest), copy=False)
        if found is None:
            raise self._not_published(profile, digest)
        return manifest_to_bytes(found[0])

    def _busybox_for(self, manifest: Manifest) -> StaticBusybox | None:
        """The busybox for this manifest's init-copy image: None when there is none for its
        architecture (only the heavy image goes up)."""
        busybox = self.busybox
        if busybox is None or busybox.architecture == oci_architecture(manifest.platform):
            return busybox
        if self.busybox_explicit:
            raise BadInputError(
                f"GPUBUILD_BUSYBOX={busybox.path} is a static busybox for {busybox.architecture},"
                f" and profile {manifest.profile} runs on {manifest.platform}: give one for"
                " that architecture, or GPUBUILD_BUSYBOX=none for no init-copy image"
            )
        return None

    def complete_manifest(self, profile: str, digest: str) -> Manifest | None:
        """As for every store, and the init-copy image there too when this run can make it
        (a publish from a machine without busybox, then one with it, adds the image). An
        image that is not gpubuild's counts as missing: publishing pushes the right one."""
        manifest = super().complete_manifest(profile, digest)
        if manifest is None or self._busybox_for(manifest) is None:
            return manifest
        try:
            copy = self._checked_image(
                image_tag(profile, digest, copy=True), copy=True, expected=manifest
            )
        except (IntegrityError, BadInputError):
            return None
        return manifest if copy is not None else None

    def put_manifest(self, profile: str, digest: str, data: bytes) -> None:
        manifest = manifest_from_bytes(data, where=f"the manifest for {profile} {digest[:12]}")
        version = builder.__version__
        images = [(image_tag(profile, digest), build_image(manifest, version=version))]
        busybox = self._busybox_for(manifest)
        if busybox is not None:
            copier = copier_layer(manifest, busybox.data, self._tree_entries(manifest))
            images.append(
                (
                    image_tag(profile, digest, copy=True),
                    build_image(manifest, version=version, copier=copier),
                )
            )
        for tag, image in images:
            for blob in image.extra_layers:
                self._put_bytes(blob)
            self._put_bytes(image.config)
            # Last: a reader that finds the tag finds every blob it names.
            self._put_image(tag, image.manifest)
        self._put_bytes(_EMPTY)
        self._put_image(f"{image_tag(profile, digest)}{_RECORD_SUFFIX}", _record(manifest))

    def _tree_entries(self, manifest: Manifest) -> tuple[TreeEntry, ...]:
        """The tree's top-level entries and their file counts, from the shards' tar listings:
        a local copy when there is one (the pack this publish uploads from), else the
        registry's layer; either is hashed as it is read."""
        if manifest.digest not in self._entries:
            members: list[tuple[str, bool]] = []
            for shard in manifest.shards:
                members += self._shard_members(shard)
            self._entries[manifest.digest] = tree_entries(members, manifest.directories)
        return self._entries[manifest.digest]

    def _shard_members(self, shard: Shard) -> list[tuple[str, bool]]:
        """(path, is a file or link) of every member of the shard's tar."""
        local = next(
            (
                path
                for path in (folder / f"{shard.sha256}.tar.zst" for folder in self._blob_folders)
                if path.is_file() and path.stat().st_size == shard.bytes
            ),
            None,
        )
        stream = local.open("rb") if local is not None else self.open_blob(shard.sha256)
        hashing = _Hashing(stream)
        members = []
        try:
            # zstandard and tarfile read any object with read(); their stubs ask for a file.
            source = cast(BinaryIO, hashing)
            with (
                zstandard.ZstdDecompressor().stream_reader(source, read_size=_READ_CHUNK) as tar,
                tarfile.open(fileobj=tar, mode="r|", bufsize=_READ_CHUNK) as archive,
            ):
                for member in archive:
                    members.append((member.name, member.isfile() or member.issym()))
            while hashing.read(_READ_CHUNK):
                pass
        except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
            raise IntegrityError(f"shard {shard.sha256[:16]}: not a tar.zst ({exc})") from None
        finally:
            stream.close()
        if hashing.sha256.hexdigest() != shard.sha256 or hashing.bytes != shard.bytes:
            raise IntegrityError(
                f"shard {shard.sha256[:16]} from {local or self.display_url} is not its digest"
            )
        return members

    def _put_image(self, tag: str, data: bytes) -> None:
        response = self._request(
            "PUT",
            self._manifest_url(tag),
            headers={"Content-Type": IMAGE_MANIFEST},
            data=data,
            expect=(201,),
            allow=(400,),
            action="pushing the image manifest to",
        )
        if response.status_code == 201:
            _finish(response)
            return
        codes = _error_codes(response)
        if "MANIFEST_BLOB_UNKNOWN" in codes or "BLOB_UNKNOWN" in codes:
            # The registry checks every blob a manifest names: one deleted (by gc) after this
            # publish saw it is refused here, and the publisher uploads it again.
            raise BlobsVanished(
                f"{self.display_url}:{tag}: the registry no longer has a blob this image names"
            )
        raise StoreError(
            f"pushing the image manifest to {self.display_url} failed: HTTP 400 {', '.join(codes)}"
        )

    def references(self, profile: str, digest: str) -> dict[str, str]:
        """`REGISTRY/REPOSITORY@sha256:...` of the published images, by what they are for:
        each tag resolved once, and the digest of exactly what was checked."""
        name = f"{self.location.registry}/{self.location.repository}"
        heavy = self._checked_image(image_tag(profile, digest), copy=False)
        if heavy is None:
            return {}
        manifest, heavy_digest = heavy
        if (manifest.profile, manifest.digest) != (profile, digest):
            raise IntegrityError(
                f"{self.display_url}:{image_tag(profile, digest)} carries {manifest.profile}"
                f" {manifest.digest[:12]}, not {profile} {digest[:12]}: publish it again"
            )
        found = {"image": f"{name}@{heavy_digest}"}
        copy = self._checked_image(
            image_tag(profile, digest, copy=True), copy=True, expected=manifest
        )
        if copy is not None:
            found["init-copy image"] = f"{name}@{copy[1]}"
        return found

    # -- maintenance

    def _tags(self) -> list[str]:
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
            document = _json_or_none(data)
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

    def list_manifests(self) -> list[StoredManifest]:
        """One request for the tags, then two for each heavy image not seen before by this
        store object (gc lists again before every delete: that must stay cheap)."""
        tags = self._tags()
        present = set(tags)
        found = []
        for tag in tags:
            if not _HEAVY_TAG.fullmatch(tag):
                continue
            if tag not in self._listed:
                self._listed[tag] = self._stored_manifest(tag, f"{tag}{_RECORD_SUFFIX}" in present)
            entry = self._listed[tag]
            if entry is not None:
                found.append(entry)
        return found

    def _stored_manifest(self, tag: str, recorded: bool) -> StoredManifest | None:
        image = self._get_image(tag)
        annotations = _annotations(image[0] if image else {})
        profile = str(annotations.get("dev.gpubuild.profile", ""))
        digest = str(annotations.get("dev.gpubuild.digest", ""))
        if image_tag(profile, digest) != tag:
            return None  # not gpubuild's, or not the heavy image of what it says it is
        record = self._get_image(f"{tag}{_RECORD_SUFFIX}") if recorded else None
        return StoredManifest(profile, digest, _published_at(record[0] if record else {}))

    def _image_blobs(self, tag: str) -> dict[str, int]:
        """sha256 -> size of the config and every layer of the image at `tag` (none: {})."""
        found = self._get_image(tag)
        blobs: dict[str, int] = {}
        if found is None:
            return blobs
        layers = found[0].get("layers")
        descriptors = [found[0].get("config"), *(layers if isinstance(layers, list) else [])]
        for descriptor in descriptors:
            if not isinstance(descriptor, dict):
                continue
            digest, size = str(descriptor.get("digest", "")), descriptor.get("size")
            if _DIGEST.fullmatch(digest) and isinstance(size, int):
                blobs[digest.removeprefix("sha256:")] = size
        return blobs

    def list_blobs(self) -> list[StoredBlob]:
        blobs: dict[str, int] = {}
        for tag in self._tags():
            if _HEAVY_TAG.fullmatch(tag) or (
                tag.endswith("-copy") and _HEAVY_TAG.fullmatch(tag[:-5])
            ):
                blobs.update(self._image_blobs(tag))
        return [StoredBlob(sha256, size, None) for sha256, size in sorted(blobs.items())]

    def blobs_of(self, manifest: Manifest) -> frozenset[str]:
        heavy = image_tag(manifest.profile, manifest.digest)
        copy = image_tag(manifest.profile, manifest.digest, copy=True)
        return frozenset(
            {*super().blobs_of(manifest), *self._image_blobs(heavy), *self._image_blobs(copy)}
        )

    def refresh_blob(self, sha256: str, *, older_than: datetime) -> bool:
        return self.has_blob(sha256) is not None

    def delete_blob(self, sha256: str, *, unmodified_since: datetime) -> bool:
        # No time to test: gc looks at the tags again right before it calls this.
        check_sha256(sha256)
        return self._delete(self._blob_url(f"sha256:{sha256}"), "deleting a blob of")

    def delete_manifest(self, profile: str, digest: str) -> None:
        tag = image_tag(profile, digest)
        for reference in (f"{tag}{_RECORD_SUFFIX}", image_tag(profile, digest, copy=True), tag):
            response = self._request(
                "HEAD",
                self._manifest_url(reference),
                headers={"Accept": _ACCEPT},
                allow=(404,),
                action="reading an image manifest of",
            )
            _finish(response)
            manifest_digest = response.headers.get("Docker-Content-Digest", "")
            if response.status_code == 404 or not _DIGEST.fullmatch(manifest_digest):
                continue
            # By digest: the API deletes a manifest, and with it the tags that name it.
            self._delete(self._manifest_url(manifest_digest), "deleting an image manifest of")

    def _delete(self, url: str, action: str) -> bool:
        response = self._request("DELETE", url, expect=(202,), allow=(404, 405), action=action)
        _finish(response)
        if response.status_code == 405:
            raise StoreError(
                f"{action} {self.display_url}: the registry does not allow deleting (HTTP 405);"
                " turn it on (the CNCF registry: storage.delete.enabled: true)"
            )
        return response.status_code == 202

    def manifest_url(self, profile: str, digest: str) -> str:
        return f"{self.display_url}:{image_tag(profile, digest)}"

    def blob_url(self, sha256: str) -> str:
        return f"{self.display_url}@sha256:{sha256}"


def _record(manifest: Manifest) -> bytes:
    """The publish record: an empty artifact whose annotation is the time of publishing."""
    document = {
        "schemaVersion": 2,
        "mediaType": IMAGE_MANIFEST,
        "artifactType": _RECORD_TYPE,
        "config": {"mediaType": _EMPTY.media_type, "digest": _EMPTY.digest, "size": 2},
        "layers": [],
        "annotations": {
            "dev.gpubuild.profile": manifest.profile,
            "dev.gpubuild.digest": manifest.digest,
            _PUBLISHED: datetime.now(timezone.utc).strftime(_TIME_FORMAT),
        },
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _published_at(record: dict[str, Any]) -> datetime:
    """The time a publish record holds; UNDATED when it holds none that reads."""
    text = _annotations(record).get(_PUBLISHED)
    try:
        return datetime.strptime(str(text), _TIME_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        return UNDATED


def _annotations(document: dict[str, Any]) -> dict[str, Any]:
    """An image manifest's annotations; none when the registry served something else there."""
    annotations = document.get("annotations")
    return annotations if isinstance(annotations, dict) else {}


def _json_or_none(data: bytes) -> Any:
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
    document = _json_or_none(body)
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
        while chunk := body.read(_READ_CHUNK):
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


def find_busybox(explicit: str | None = None) -> StaticBusybox | None:
    """A static busybox for the init-copy image: $GPUBUILD_BUSYBOX, or Debian's busybox-static.
    GPUBUILD_BUSYBOX=none: no init-copy image, only the heavy one."""
    if explicit == "none":
        return None
    candidates = [Path(explicit)] if explicit else list(BUSYBOX_CANDIDATES)
    for path in candidates:
        found = read_static_busybox(path)
        if found is not None:
            return found
    if explicit:
        raise BadInputError(
            f"GPUBUILD_BUSYBOX={explicit} is not a statically linked busybox (a regular file"
            " of at most 8 MiB, an ELF executable for x86_64 or aarch64 with no interpreter)"
        )
    return None


def open_oci_store(location: OciLocation, environ: dict[str, str] | None = None) -> OciStore:
    env = dict(os.environ) if environ is None else environ
    explicit = env.get("GPUBUILD_BUSYBOX") or None
    return OciStore(
        location,
        registry_credentials(location.registry, env),
        busybox=find_busybox(explicit),
        busybox_explicit=explicit not in (None, "none"),
    )
