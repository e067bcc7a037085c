"""A store in an OCI registry (`oci://REGISTRY/REPOSITORY`): the heavy set as an image.

The distribution API over requests (a well-kept HTTP client, already a dependency of the Azure
SDK) rather than a registry library: gpubuild pushes blobs it already has under their sha256,
one small config and two manifests, and needs exact control of chunking, of which blobs are
skipped after a HEAD, and of the messages (no secret in any); oras-py leaves chunked uploads
off because they were flaky across registries. Blobs go up in chunks of 4 MiB (PATCH with
Content-Range, then PUT ?digest=), as the Azure SDKs' registry clients do: one request body of a
whole multi-GB layer is what registries and the proxies before them refuse (413), and a chunk
that meets an expired token answers the new challenge alone. Authentication follows the
registry's challenge: Basic, or
Bearer with a token from its realm (with the user and password, or an identity token as the
OAuth2 refresh token, which is how `az acr login` leaves ACR credentials).

Layout: every shard is a layer blob under its sha256; the image manifests are tagged
`<profile>-<digest16>` (and `...-copy` for the init-copy image) and always referenced by
their own digest in what gpubuild generates. A manifest is pushed after every blob it names.
A third, tiny manifest tagged `...-published` records when the digest was published (the
images themselves are reproducible, and a registry dates nothing): gc orders digests by it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import urljoin

import requests

import builder
from builder.errors import BadInputError, IntegrityError, NotPublishedError, StoreError
from builder.manifest import Manifest, manifest_from_bytes, manifest_to_bytes
from builder.ociimage import (
    CONFIG_KEY,
    IMAGE_CONFIG,
    IMAGE_MANIFEST,
    Blob,
    Image,
    build_image,
    copier_layer,
    image_tag,
    read_static_busybox,
)
from builder.secrets import register, scrub
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
from builder.stores.registry_auth import RegistryCredentials, registry_credentials
from builder.stores.urls import OciLocation

UPLOAD_CHUNK = 4 * 1024 * 1024
_CONNECT_TIMEOUT_S = 10
_READ_TIMEOUT_S = 300
_ACCEPT = ", ".join([IMAGE_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json"])
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
# The publish record: an OCI artifact whose config is the empty descriptor's `{}`.
_EMPTY = Blob("application/vnd.oci.empty.v1+json", b"{}")
_RECORD_TYPE = "application/vnd.gpubuild.published.v1"
_PUBLISHED = "dev.gpubuild.published"
_RECORD_SUFFIX = "-published"
_HEAVY_TAG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*-[0-9a-f]{16}$")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class OciStore(Store):
    """A repository in an OCI registry. `copier`: a static busybox for the init-copy image
    (None: only the heavy image is pushed)."""

    keeps_blob_times = False  # the distribution API dates nothing

    def __init__(
        self,
        location: OciLocation,
        credentials: RegistryCredentials,
        *,
        copier: bytes | None = None,
    ) -> None:
        self.location = location
        self.credentials = credentials
        self.copier = copier
        self.display_url = location.display_url
        self.base_url = location.display_url  # no plain-HTTP folder: pods pull the image
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"gpubuild/{builder.__version__}"
        self._authorization: str | None = None
        self._listed: dict[str, StoredManifest | None] = {}  # heavy tag -> what it holds

    # -- HTTP, authentication and errors

    def _request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        stream: bool = False,
        expect: tuple[int, ...] = (200,),
        allow: tuple[int, ...] = (),
        action: str = "talking to",
    ) -> requests.Response:
        """One request, with the registry's authentication challenge answered when it comes
        (a token's scope grows from pull to push: a second challenge is answered too)."""
        for attempt in range(3):
            sent = dict(headers or {})
            if self._authorization:
                sent["Authorization"] = self._authorization
            try:
                response = self._session.request(
                    method,
                    url,
                    headers=sent,
                    data=data,
                    stream=stream,
                    timeout=(_CONNECT_TIMEOUT_S, _READ_TIMEOUT_S),
                )
            except requests.RequestException as exc:
                raise StoreError(
                    f"cannot reach the registry at {self.display_url} ({_first_line(exc)});"
                    " check the URL, the network, and that it speaks "
                    f"{self.location.scheme} (oci+http:// is for a plain-HTTP registry)"
                ) from None
            if response.status_code == 401 and attempt < 2:
                challenge = response.headers.get("WWW-Authenticate", "")
                response.close()
                self._authorization = self._answer(challenge)
                continue
            if response.status_code in expect or response.status_code in allow:
                return response
            raise self._refused(response, action)
        raise AssertionError("unreachable")  # pragma: no cover

    def _answer(self, challenge: str) -> str:
        kind, _, rest = challenge.partition(" ")
        creds = self.credentials
        if kind.lower() == "basic":
            if creds.anonymous or creds.password is None:
                raise self._no_credentials()
            pair = f"{creds.username or ''}:{creds.password}".encode()
            return "Basic " + base64.b64encode(pair).decode()
        if kind.lower() != "bearer":
            raise StoreError(
                f"the registry at {self.display_url} asks for {kind or 'an unknown'}"
                " authentication; gpubuild speaks Basic and Bearer"
            )
        params = dict(_CHALLENGE_PARAM.findall(rest))
        realm = params.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise StoreError(f"the registry at {self.display_url} names no token realm")
        params.setdefault("scope", f"repository:{self.location.repository}:pull,push")
        try:
            if creds.identity_token:
                answer = self._session.post(
                    realm,
                    data={
                        "grant_type": "refresh_token",
                        "refresh_token": creds.identity_token,
                        **params,
                    },
                    timeout=(_CONNECT_TIMEOUT_S, 60),
                )
            else:
                auth = (creds.username or "", creds.password) if creds.password else None
                answer = self._session.get(
                    realm, params=params, auth=auth, timeout=(_CONNECT_TIMEOUT_S, 60)
                )
        except requests.RequestException as exc:
            raise StoreError(
                f"cannot reach the token service of {self.display_url} ({_first_line(exc)})"
            ) from None
        if answer.status_code in (401, 403):
            raise self._credentials_refused(answer.status_code)
        try:
            document = answer.json()
            token = str(document.get("token") or document.get("access_token") or "")
        except (ValueError, AttributeError):
            token = ""
        if answer.status_code != 200 or not token:
            raise StoreError(
                f"the token service of {self.display_url} answered HTTP {answer.status_code}"
                " without a token"
            )
        register(token)
        return "Bearer " + token

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
            scrub(
                f"{action} {self.display_url} failed: HTTP {status}{' ' + codes if codes else ''}"
            )
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
        response.close()
        if response.status_code == 404:
            return None
        return int(response.headers.get("Content-Length", "-1"))

    def put_blob(
        self,
        sha256: str,
        path: Path,
        on_progress: ProgressCallback | None = None,
        *,
        overwrite: bool = False,
    ) -> bool:
        # A registry checks every blob's digest as it is committed: one present is intact,
        # unless its storage was damaged since; `overwrite` deletes that copy first.
        size = file_size(path)
        if overwrite:
            self._delete(self._blob_url(f"sha256:{sha256}"), "deleting a blob of")
        elif self.has_blob(sha256) == size:
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
        self._request(
            "PUT",
            f"{location}{joiner}digest={digest}",
            headers={"Content-Length": "0"},
            expect=(201,),
            action="committing a blob to",
        ).close()

    def _next(self, response: requests.Response) -> str:
        location = response.headers.get("Location", "")
        response.close()
        if not location:
            raise StoreError(f"the registry at {self.display_url} gave no upload location")
        return urljoin(response.url, location)

    def open_blob(self, sha256: str) -> BinaryIO:
        check_sha256(sha256)
        response = self._request(
            "GET",
            self._blob_url(f"sha256:{sha256}"),
            stream=True,
            allow=(404,),
            action="downloading a blob of",
        )
        if response.status_code == 404:
            response.close()
            raise self._missing_blob(sha256)
        raw = response.raw
        raw.decode_content = True
        return cast(BinaryIO, raw)

    def _get_bytes(self, digest: str, *, limit: int = 64 * 1024 * 1024) -> bytes:
        response = self._request(
            "GET", self._blob_url(digest), stream=True, action="downloading a blob of"
        )
        data = _read_limited(response, limit, f"{self.display_url} blob {digest}")
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(f"{self.display_url}: blob {digest} is not its digest")
        return data

    # -- images

    def _manifest_url(self, reference: str) -> str:
        return f"{self.location.api}/manifests/{reference}"

    def _get_image(self, reference: str) -> tuple[dict[str, Any], str] | None:
        """The image manifest at a tag or digest, and its digest; None when there is none."""
        response = self._request(
            "GET",
            self._manifest_url(reference),
            headers={"Accept": _ACCEPT},
            stream=True,
            allow=(404,),
            action="reading an image manifest of",
        )
        if response.status_code == 404:
            response.close()
            return None
        data = _read_limited(response, 4 * 1024 * 1024, f"{self.display_url}:{reference}")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise IntegrityError(
                f"{self.display_url}@{reference}: the registry served another manifest"
            )
        try:
            document = json.loads(data)
        except ValueError:
            raise IntegrityError(f"{self.display_url}:{reference}: not an image manifest") from None
        if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
            raise IntegrityError(f"{self.display_url}:{reference}: not an image manifest")
        return document, digest

    def manifest_at(self, reference: str) -> tuple[Manifest, str]:
        """The gpubuild manifest an image (tag or digest) carries, and the image's digest."""
        found = self._get_image(reference)
        where = f"{self.display_url}{'@' if reference.startswith('sha256:') else ':'}{reference}"
        if found is None:
            raise NotPublishedError(
                f"{where}: no such image; publish it first (gpubuild publish-cache --store"
                f" {self.display_url})"
            )
        document, digest = found
        config_digest = str(document["config"].get("digest", ""))
        if document["config"].get("mediaType") != IMAGE_CONFIG or not re.match(
            r"^sha256:[0-9a-f]{64}$", config_digest
        ):
            raise IntegrityError(f"{where}: not a gpubuild image (its config is not one)")
        try:
            config = json.loads(self._get_bytes(config_digest))
            carried = config[CONFIG_KEY]
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"{where}: not a gpubuild image (no gpubuild manifest)") from None
        manifest = manifest_from_bytes(json.dumps(carried).encode(), where=where)
        layers = [
            layer.get("digest") for layer in document.get("layers") or [] if isinstance(layer, dict)
        ]
        for shard in manifest.shards:
            if f"sha256:{shard.sha256}" not in layers:
                raise IntegrityError(
                    f"{where}: its layers do not include shard {shard.sha256[:16]}"
                )
        return manifest, digest

    def get_manifest(self, profile: str, digest: str) -> bytes:
        try:
            manifest, _ = self.manifest_at(image_tag(profile, digest))
        except NotPublishedError:
            raise self._not_published(profile, digest) from None
        return manifest_to_bytes(manifest)

    def complete_manifest(self, profile: str, digest: str) -> Manifest | None:
        """As for every store, and the init-copy image there too when this run can make it
        (a publish from a machine without busybox, then one with it, adds the image)."""
        manifest = super().complete_manifest(profile, digest)
        if manifest is None or self.copier is None:
            return manifest
        return manifest if self._get_image(image_tag(profile, digest, copy=True)) else None

    def put_manifest(self, profile: str, digest: str, data: bytes) -> None:
        manifest = manifest_from_bytes(data, where=f"the manifest for {profile} {digest[:12]}")
        images = [(image_tag(profile, digest), self._image(manifest))]
        if self.copier is not None:
            copier = copier_layer(manifest, self.copier)
            images.append((image_tag(profile, digest, copy=True), self._image(manifest, copier)))
        for tag, image in images:
            for blob in image.extra_layers:
                self._put_bytes(blob)
            self._put_bytes(image.config)
            # Last: a reader that finds the tag finds every blob it names.
            self._put_image(tag, image.manifest)
        self._put_bytes(_EMPTY)
        self._put_image(f"{image_tag(profile, digest)}{_RECORD_SUFFIX}", _record(manifest))

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
            response.close()
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

    def _image(self, manifest: Manifest, copier: Blob | None = None) -> Image:
        return build_image(manifest, version=builder.__version__, copier=copier)

    def references(self, profile: str, digest: str) -> dict[str, str]:
        """`REGISTRY/REPOSITORY@sha256:...` of the published images, by what they are for."""
        found = {}
        for label, copy in (("image", False), ("init-copy image", True)):
            image = self._get_image(image_tag(profile, digest, copy=copy))
            if image is not None:
                found[label] = f"{self.location.registry}/{self.location.repository}@{image[1]}"
        return found

    # -- maintenance

    def _tags(self) -> list[str]:
        """Every tag of the repository, page by page (the registry's Link header)."""
        tags: list[str] = []
        url: str | None = f"{self.location.api}/tags/list?n=1000"
        while url:
            response = self._request(
                "GET", url, stream=True, allow=(404,), action="listing the tags of"
            )
            if response.status_code == 404:  # no such repository yet: nothing published
                response.close()
                return []
            following = response.links.get("next", {}).get("url")
            data = _read_limited(response, 16 * 1024 * 1024, f"{self.display_url} tag list")
            try:
                page = json.loads(data).get("tags") or []
            except (ValueError, AttributeError):
                page = None
            if not isinstance(page, list):
                raise StoreError(f"{self.display_url}: the registry's tag list is not one")
            tags.extend(tag for tag in page if isinstance(tag, str))
            url = urljoin(url, following) if following else None
        return tags

    def list_manifests(self) -> list[StoredManifest]:
        """One request for the tags, then two for each heavy image not seen before by this
        store object (gc lists again before every delete: that must stay cheap)."""
        tags = self._tags()
        present = set(tags)
        found = []
        for tag in tags:
            if not _HEAVY_TAG.match(tag):
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
            if digest.startswith("sha256:") and isinstance(size, int):
                blobs[digest.removeprefix("sha256:")] = size
        return blobs

    def list_blobs(self) -> list[StoredBlob]:
        blobs: dict[str, int] = {}
        for tag in self._tags():
            if _HEAVY_TAG.match(tag) or (tag.endswith("-copy") and _HEAVY_TAG.match(tag[:-5])):
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
            response.close()
            manifest_digest = response.headers.get("Docker-Content-Digest", "")
            if response.status_code == 404 or not manifest_digest.startswith("sha256:"):
                continue
            # By digest: the API deletes a manifest, and with it the tags that name it.
            self._delete(self._manifest_url(manifest_digest), "deleting an image manifest of")

    def _delete(self, url: str, action: str) -> bool:
        response = self._request("DELETE", url, expect=(202,), allow=(404, 405), action=action)
        response.close()
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


def _error_codes(response: requests.Response) -> list[str]:
    """The distribution API's error codes in a refusal (none when the body is not that)."""
    try:
        errors = response.json().get("errors") or []
        return [str(e.get("code")) for e in errors if isinstance(e, dict)]
    except (ValueError, AttributeError, TypeError):
        return []
    finally:
        response.close()


def _read_limited(response: requests.Response, limit: int, what: str) -> bytes:
    chunks: list[bytes] = []
    total = 0
    try:
        for chunk in response.iter_content(1024 * 1024):
            total += len(chunk)
            if total > limit:
                raise IntegrityError(f"{what} is larger than {limit} bytes: not gpubuild's")
            chunks.append(chunk)
    except requests.RequestException as exc:
        raise StoreError(f"{what}: the download broke off ({_first_line(exc)})") from None
    finally:
        response.close()
    return b"".join(chunks)


def _first_line(exc: BaseException) -> str:
    text = scrub(str(exc)).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def find_busybox(explicit: str | None = None) -> bytes | None:
    """A static busybox for the init-copy image: $GPUBUILD_BUSYBOX, or Debian's busybox-static.
    GPUBUILD_BUSYBOX=none: no init-copy image, only the heavy one."""
    if explicit == "none":
        return None
    candidates = [Path(explicit)] if explicit else list(BUSYBOX_CANDIDATES)
    for path in candidates:
        data = read_static_busybox(path)
        if data is not None:
            return data
    if explicit:
        raise BadInputError(f"GPUBUILD_BUSYBOX={explicit} is not a statically linked busybox")
    return None


def open_oci_store(location: OciLocation, environ: dict[str, str] | None = None) -> OciStore:
    env = dict(os.environ) if environ is None else environ
    return OciStore(
        location,
        registry_credentials(location.registry, env),
        copier=find_busybox(env.get("GPUBUILD_BUSYBOX")),
    )
