"""The store interface: where shards (blobs) and manifests live, whatever the kind.

Layout, the same in every kind: `PREFIX/blobs/<sha256>.tar.zst` (shared by every profile) and
`PREFIX/<profile>/<digest>/manifest.json` (docs/design.md#stores). Blobs are content-addressed,
so writing one that is already there is a no-op, and two publishers writing the same blob at
once both succeed. Secrets never reach an exception message, `str(store)` or `display_url`.

Maintenance (`gpubuild gc`, `gpubuild verify`) adds listing and deleting. Deleting a blob is
conditional on its time (`delete_blob(unmodified_since=...)`), and a publisher refreshes the
time of every old blob it reuses (`refresh_blob`) before it writes a manifest: that pair is
what keeps gc from deleting a blob under a concurrent publish (docs/design.md#garbage-collection).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

import blake3

from builder.errors import BadInputError, IntegrityError, NotPublishedError, StoreError
from builder.fields import SHA256
from builder.manifest import Manifest, Shard, blob_key, manifest_from_bytes, manifest_key

ProgressCallback = Callable[[int], None]
"""Called with the number of bytes newly written since the previous call (a delta)."""

COPY_CHUNK = 4 * 1024 * 1024
# The publisher's side of gc's safety rule (docs/design.md#garbage-collection): right before a
# manifest is written, every blob it names has a time no older than BLOB_FRESHNESS (an older one
# is refreshed, a vanished one uploaded again), and the manifest is written within
# MANIFEST_DEADLINE of that check. gc deletes only blobs older than its grace period, which is
# safe while a publisher runs when the grace is at least SAFE_GC_GRACE.
BLOB_FRESHNESS = timedelta(minutes=10)
MANIFEST_DEADLINE = timedelta(minutes=5)
SAFE_GC_GRACE = BLOB_FRESHNESS + MANIFEST_DEADLINE
# The time a store reports for something it cannot date (a registry's images published before
# gpubuild recorded publish times): older than anything, so it is the first to go.
UNDATED = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class StoredManifest:
    """A published digest as a store lists it; `published`: when its manifest was written."""

    profile: str
    digest: str
    published: datetime


@dataclass(frozen=True)
class StoredBlob:
    """A blob as a store lists it; `modified`: its time (written or refreshed), None when the
    store keeps no time for blobs (a registry)."""

    sha256: str
    bytes: int
    modified: datetime | None


class BlobsVanished(StoreError):
    """The store refused a manifest because blobs it names are gone (a registry checks them):
    the publisher uploads them again and retries."""


def check_sha256(sha256: str) -> None:
    if not SHA256.match(sha256):
        raise BadInputError(f"{sha256!r} is not a sha256 digest (64 lowercase hex characters)")


def check_local_blob(path: Path, sha256: str) -> None:
    """Hash the local file before it goes up: a blob damaged after packing must never reach
    the store every pod reads (uploads read it in chunks, some out of order)."""
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(COPY_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise IntegrityError(
            f"{path}: its sha256 is {digest.hexdigest()}, not {sha256}; delete it and pack again"
        )


class Store:
    """Where shards and manifests live. Subclasses: FileStore, AzureStore, OciStore."""

    display_url: str  # for messages: never holds a secret
    base_url: str  # the folder that holds blobs/, as the init script reads it (no secret)
    # Whether blobs carry a time that a conditional delete can test (a registry's do not).
    keeps_blob_times: bool = True

    def __str__(self) -> str:
        return self.display_url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.display_url!r})"

    def has_blob(self, sha256: str) -> int | None:
        """The blob's size in bytes when the store has it, else None."""
        raise NotImplementedError

    def put_blob(
        self,
        sha256: str,
        path: Path,
        on_progress: ProgressCallback | None = None,
        *,
        overwrite: bool = False,
    ) -> bool:
        """Store the file at `path` as blob `sha256`; False when it was already there.

        `overwrite`: replace what the store holds under that name (a damaged copy)."""
        raise NotImplementedError

    def open_blob(self, sha256: str) -> BinaryIO:
        """A streaming reader of the blob (close it when done)."""
        raise NotImplementedError

    def put_manifest(self, profile: str, digest: str, data: bytes) -> None:
        raise NotImplementedError

    def get_manifest(self, profile: str, digest: str) -> bytes:
        """The manifest's bytes; NotPublishedError when the store has none."""
        raise NotImplementedError

    def manifest(self, profile: str, digest: str) -> Manifest:
        """The published manifest of `profile` at `digest`, read by the one manifest reader:
        NotPublishedError when there is none, IntegrityError when it describes another."""
        where = self.manifest_url(profile, digest)
        manifest = manifest_from_bytes(self.get_manifest(profile, digest), where=where)
        if manifest.digest != digest or manifest.profile != profile:
            raise IntegrityError(
                f"{where} describes {manifest.profile} {manifest.digest[:12]}, not {profile}"
                f" {digest[:12]}: publish it again (gpubuild publish-cache --repair)"
            )
        return manifest

    def missing_shards(self, shards: tuple[Shard, ...]) -> list[Shard]:
        """Shards the store lacks or holds at another size (sizes only, so it takes a second;
        `publish-cache --repair` re-hashes)."""
        return [shard for shard in shards if self.has_blob(shard.sha256) != shard.bytes]

    def complete_manifest(self, profile: str, digest: str) -> Manifest | None:
        """The manifest when it and every blob it names are there; None when anything is
        missing or the manifest is damaged (publishing again writes it whole)."""
        try:
            manifest = self.manifest(profile, digest)
        except (NotPublishedError, IntegrityError, BadInputError):
            return None
        return None if self.missing_shards(manifest.shards) else manifest

    def has_manifest(self, profile: str, digest: str) -> bool:
        try:
            self.get_manifest(profile, digest)
        except NotPublishedError:
            return False
        return True

    def open_blob_if_present(self, sha256: str) -> BinaryIO | None:
        """`open_blob`, or None when the store has no such blob (a blob that is there but
        cannot be read still raises)."""
        try:
            return self.open_blob(sha256)
        except StoreError:
            if self.has_blob(sha256) is None:
                return None
            raise

    def blob_digest(self, sha256: str) -> tuple[str, int] | None:
        """(sha256, size) of what the store really holds as blob `sha256`, read in a stream
        (bounded memory); None when it has no such blob."""
        stream = self.open_blob_if_present(sha256)
        if stream is None:
            return None
        digest, size = hashlib.sha256(), 0
        try:
            while chunk := stream.read(COPY_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        finally:
            stream.close()
        return digest.hexdigest(), size

    def references(self, profile: str, digest: str) -> dict[str, str]:
        """What pods name to get this digest other than the store's URL (a registry's image
        references by digest), by what each is for; none for a folder or a container."""
        return {}

    # -- maintenance: listing, refreshing and deleting (gc, verify)

    def list_manifests(self) -> list[StoredManifest]:
        """Every published digest of every profile, with when it was published."""
        raise NotImplementedError

    def list_blobs(self) -> list[StoredBlob]:
        """Every blob the store holds (a registry: every blob its images name)."""
        raise NotImplementedError

    def blobs_of(self, manifest: Manifest) -> frozenset[str]:
        """The sha256 of every blob that the published `manifest` needs in this store."""
        return frozenset(shard.sha256 for shard in manifest.shards)

    def refresh_blob(self, sha256: str, *, older_than: datetime) -> bool:
        """Give the blob a new time when its time is before `older_than`; False when the store
        has no such blob (it was deleted: upload it again)."""
        raise NotImplementedError

    def delete_blob(self, sha256: str, *, unmodified_since: datetime) -> bool:
        """Delete the blob only when its time is still at or before `unmodified_since`, decided
        by the store at the moment of deleting; False when it was refreshed since, or is gone."""
        raise NotImplementedError

    def delete_manifest(self, profile: str, digest: str) -> None:
        """Unpublish a digest; nothing happens when it is already gone."""
        raise NotImplementedError

    def blob_url(self, sha256: str) -> str:
        return f"{self.base_url}/{quote(blob_key(sha256))}"

    def manifest_url(self, profile: str, digest: str) -> str:
        return f"{self.base_url}/{quote(manifest_key(profile, digest))}"

    def _size_to_put(self, sha256: str, path: Path) -> int | None:
        """The file's size when the blob must be written; None when the store has it already.

        A blob present at another size is damaged: refused, never silently overwritten.
        """
        size = file_size(path)
        present = self.has_blob(sha256)
        if present == size:
            return None
        if present is not None:
            raise self._wrong_size(sha256, present, size)
        return size

    def _wrong_size(self, sha256: str, found: int, expected: int) -> StoreError:
        return StoreError(
            f"{self.display_url}/{blob_key(sha256)} holds {found} bytes, not {expected}: the copy "
            "in the store is damaged; publish with --repair to replace it"
        )

    def _missing_blob(self, sha256: str) -> StoreError:
        return StoreError(
            f"{self.display_url} has no {blob_key(sha256)}: it was deleted or never published; "
            "publish the profile again"
        )

    def _not_published(self, profile: str, digest: str) -> NotPublishedError:
        return NotPublishedError(
            f"{self.display_url} has no {manifest_key(profile, digest)}: publish it first "
            "(gpubuild publish-cache) or check the profile name and digest"
        )


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file to publish") from None


class HashingReader:
    """A reader that hashes and counts what passes through it, so that one pass over a stream
    both feeds its consumer and proves its sha256."""

    def __init__(self, source: BinaryIO, *, with_blake3: bool = False) -> None:
        self.source = source
        self.sha256 = hashlib.sha256()
        self.blake3 = blake3.blake3() if with_blake3 else None
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.source.read(size)
        self.sha256.update(chunk)
        if self.blake3 is not None:
            self.blake3.update(chunk)
        self.bytes += len(chunk)
        return chunk
