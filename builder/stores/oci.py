"""A store in an OCI registry (`oci://REGISTRY/REPOSITORY`): the heavy set as an image.

The registry is spoken to through builder.stores.registry_client (the distribution API, its
authentication, bounded reads and deadlines), and everything it answers is checked here: an
image is accepted only when it is exactly the one gpubuild makes of the manifest its config
carries (builder.ociimage.check_image), a blob or a manifest read by digest only when it is that
digest.

Layout: every shard is a layer blob under its sha256; the image manifests are tagged
`<profile>-<digest16>` (and `...-copy` for the init-copy image) and always referenced by
their own digest in what gpubuild generates. A manifest is pushed after every blob it names.
A third, tiny manifest tagged `...-published` records when the digest was published (the
images themselves are reproducible, and a registry dates nothing): gc orders digests by it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, cast

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
from builder.stores.base import (
    UNDATED,
    BlobsVanished,
    HashingReader,
    ProgressCallback,
    Store,
    StoredBlob,
    StoredManifest,
    check_local_blob,
    check_sha256,
    file_size,
)
from builder.stores.registry_auth import RegistryCredentials, registry_credentials
from builder.stores.registry_client import DIGEST, READ_CHUNK, RegistryClient, json_or_none

# Re-exported for callers (and tests) that know it as the registry store's.
from builder.stores.registry_client import UPLOAD_CHUNK as UPLOAD_CHUNK
from builder.stores.urls import OciLocation, default_store_path

_CONFIG_LIMIT = 64 * 1024 * 1024
_COPIER_LIMIT = BUSYBOX_LIMIT + 1024 * 1024
_ACCEPT = ", ".join([IMAGE_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json"])
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
# The publish record: an OCI artifact whose config is the empty descriptor's `{}`.
_EMPTY = Blob("application/vnd.oci.empty.v1+json", b"{}")
_RECORD_TYPE = "application/vnd.gpubuild.published.v1"
_PUBLISHED = "dev.gpubuild.published"
_RECORD_SUFFIX = "-published"
_HEAVY_TAG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*-[0-9a-f]{16}")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


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
        self.busybox = busybox
        self.busybox_explicit = busybox_explicit
        self.display_url = location.display_url
        self.base_url = location.display_url  # no plain-HTTP folder: pods pull the image
        self._client = RegistryClient(location, credentials)
        self._listed: dict[str, StoredManifest | None] = {}  # heavy tag -> what it holds
        # Folders holding local copies of shards (the pack a publish uploads from): the
        # copier's list of entries is read from them rather than downloaded again.
        self._blob_folders: set[Path] = {default_store_path() / "blobs"}
        self._entries: dict[str, tuple[TreeEntry, ...]] = {}  # lock digest -> the tree's

    # The client answers the registry's challenges: credentials given to the store after it
    # was made are the ones the next challenge gets.
    @property
    def credentials(self) -> RegistryCredentials:
        return self._client.credentials

    @credentials.setter
    def credentials(self, credentials: RegistryCredentials) -> None:
        self._client.credentials = credentials

    # -- blobs

    def has_blob(self, sha256: str) -> int | None:
        check_sha256(sha256)
        return self._client.blob_size(f"sha256:{sha256}")

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
            self._client.upload(f"sha256:{sha256}", source, size, on_progress)
        return True

    def _put_bytes(self, blob: Blob) -> None:
        if self._client.blob_size(blob.digest) == len(blob.data):
            return
        self._client.upload(blob.digest, io.BytesIO(blob.data), len(blob.data), None)

    def open_blob(self, sha256: str) -> BinaryIO:
        check_sha256(sha256)
        stream = self._client.open_blob(f"sha256:{sha256}")
        if stream is None:
            raise self._missing_blob(sha256)
        return stream

    def _missing_blob(self, sha256: str) -> StoreError:
        return StoreError(
            f"{self.display_url} has no layer sha256:{sha256}: it was deleted or never"
            " published; publish the profile again"
        )

    def _get_bytes(self, digest: str, *, limit: int) -> bytes:
        data = self._client.get_blob(digest, limit=limit)
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(f"{self.display_url}: blob {digest} is not its digest")
        return data

    # -- images

    def _get_image(self, reference: str) -> tuple[dict[str, Any], str] | None:
        """The image manifest at a tag or digest, parsed (unchecked), and the digest of its
        bytes; None when there is none."""
        data = self._client.get_manifest(reference, accept=_ACCEPT)
        if data is None:
            return None
        where = self._client.where(reference)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise IntegrityError(f"{where}: the registry served another manifest")
        document = json_or_none(data)
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
        config = json_or_none(self._get_bytes(config_descriptor.digest, limit=_CONFIG_LIMIT))
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
                f"{self._client.where(reference)}: no such image; publish it first (gpubuild"
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
        hashing = HashingReader(stream)
        members = []
        try:
            # zstandard and tarfile read any object with read(); their stubs ask for a file.
            source = cast(BinaryIO, hashing)
            with (
                zstandard.ZstdDecompressor().stream_reader(source, read_size=READ_CHUNK) as tar,
                tarfile.open(fileobj=tar, mode="r|", bufsize=READ_CHUNK) as archive,
            ):
                for member in archive:
                    members.append((member.name, member.isfile() or member.issym()))
            while hashing.read(READ_CHUNK):
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
        codes = self._client.put_manifest(tag, data, media_type=IMAGE_MANIFEST)
        if codes is None:
            return
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

    def list_manifests(self) -> list[StoredManifest]:
        """One request for the tags, then two for each heavy image not seen before by this
        store object (gc lists again before every delete: that must stay cheap)."""
        tags = self._client.tags()
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
            if DIGEST.fullmatch(digest) and isinstance(size, int):
                blobs[digest.removeprefix("sha256:")] = size
        return blobs

    def list_blobs(self) -> list[StoredBlob]:
        blobs: dict[str, int] = {}
        for tag in self._client.tags():
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
        return self._client.delete_blob(f"sha256:{sha256}")

    def delete_manifest(self, profile: str, digest: str) -> None:
        tag = image_tag(profile, digest)
        for reference in (f"{tag}{_RECORD_SUFFIX}", image_tag(profile, digest, copy=True), tag):
            manifest_digest = self._client.manifest_digest(reference, accept=_ACCEPT)
            if manifest_digest is not None:
                self._client.delete_manifest(manifest_digest)

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
