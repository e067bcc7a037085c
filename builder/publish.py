"""Publish: a packed digest's shards uploaded to a store (only those it lacks), manifest last.

A reader never sees a half-published digest: the manifest names only shards that are already
in the store. Shards are content-addressed, so a shard another profile published is not sent
again, and two publishers of one digest at once both succeed. This stage never packs: it
receives what pack produced (builder.pipeline runs the stages in order).

Right before the manifest goes up, every blob it names is refreshed (an old one gets a new
time, a vanished one is uploaded again): the publisher's half of the rule that keeps
`gpubuild gc` from deleting a reused blob under a running publish (builder/gc.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from builder.errors import StoreError
from builder.manifest import Manifest, Shard, blob_key, manifest_to_bytes
from builder.pack import PackResult
from builder.progress import Progress, Step, silent
from builder.stores import BlobsVanished, FileStore, Store
from builder.stores.base import BLOB_FRESHNESS, MANIFEST_DEADLINE
from builder.units import megabytes

UPLOAD_WORKERS = 4
_MANIFEST_ATTEMPTS = 3


@dataclass(frozen=True)
class PublishResult:
    profile: str
    digest: str
    store: str  # display URL, no secret
    manifest_url: str
    bytes_total: int
    bytes_uploaded: int
    shards_uploaded: int
    shards_present: int
    already_published: bool
    packed_in: Path | None
    manifest: Manifest
    repaired: tuple[Shard, ...] = ()  # blobs whose damaged copies --repair replaced
    references: dict[str, str] = field(default_factory=dict)  # a registry's images by digest

    @property
    def fetch_url(self) -> str:
        """What `gpubuild fetch` takes: STORE/PROFILE/DIGEST, or a registry's image by digest."""
        image = self.references.get("image")
        if image is not None:
            return f"{self.store}@{image.split('@', 1)[1]}"
        return f"{self.store.rstrip('/')}/{self.profile}/{self.digest}"


def damaged_shards(store: Store, shards: tuple[Shard, ...], report: Progress) -> list[Shard]:
    """Shards whose bytes in the store are not their sha256, found by hashing each blob in a
    stream (missing ones are not listed: `Store.missing_shards` finds those)."""
    damaged = []
    for number, shard in enumerate(shards, start=1):
        found = store.blob_digest(shard.sha256)
        if found is not None and found != (shard.sha256, shard.bytes):
            damaged.append(shard)
            report(
                f"damaged in {store}: {blob_key(shard.sha256)}"
                f" ({found[1]:,} bytes, sha256 {found[0][:16]})"
            )
        report(Step(number, len(shards), f"checked {blob_key(shard.sha256)[:24]}..."))
    return damaged


class _Meter:
    """Bytes-uploaded progress lines (MB, MB/s), at most one every half second."""

    def __init__(self, total: int, report: Progress) -> None:
        self.total = total
        self.done = 0
        self.report = report
        self.start = time.monotonic()
        self.last = 0.0
        self.lock = threading.Lock()

    def __call__(self, delta: int) -> None:
        with self.lock:
            self.done += delta
            now = time.monotonic()
            if now - self.last < 0.5 and self.done < self.total:
                return
            self.last = now
            elapsed = max(now - self.start, 1e-6)
            self.report(
                f"uploaded {megabytes(self.done)} of {megabytes(self.total)}"
                f" ({self.done / elapsed / 1e6:,.1f} MB/s)"
            )


def already_published(store: Store, manifest: Manifest) -> PublishResult:
    """The result for a digest the store holds whole: nothing uploaded."""
    return _result(store, manifest, uploaded=[], present=len(manifest.shards), packed_in=None)


def publish(
    packed: PackResult,
    store: Store,
    *,
    repair: bool = False,
    on_progress: Progress = silent,
    blob_freshness: timedelta = BLOB_FRESHNESS,
) -> PublishResult:
    """Upload what `store` lacks of `packed` (a local pack), then the manifest.

    `repair`: also re-hash what the store holds and replace blobs whose bytes differ. A store
    that is the pack's own folder only reports what the pack wrote (pack writes every shard
    anew right before its manifest). `blob_freshness`: how recent every blob's time must be
    when the manifest goes up (gc's grace must exceed it; tests shorten both)."""
    report = on_progress
    manifest = packed.manifest
    local_root = packed.out_dir
    if isinstance(store, FileStore) and store.root.resolve() == local_root.resolve():
        written = [] if packed.reused else list(packed.written)
        return _result(
            store,
            manifest,
            uploaded=written,
            present=len(manifest.shards) - len(written),
            packed_in=local_root,
            repaired=packed.repaired,
        )
    repaired = tuple(damaged_shards(store, manifest.shards, report)) if repair else ()
    todo = [*repaired, *(s for s in store.missing_shards(manifest.shards) if s not in repaired)]
    total = sum(shard.bytes for shard in todo)
    report(
        f"uploading {len(todo)} of {len(manifest.shards)} shard(s), {megabytes(total)}, to {store}"
    )
    meter = _Meter(total, report)

    def upload(shard: Shard) -> bool:
        local = local_root / blob_key(shard.sha256)
        return store.put_blob(shard.sha256, local, meter, overwrite=shard in repaired)

    with ThreadPoolExecutor(max_workers=UPLOAD_WORKERS) as pool:
        sent = list(pool.map(upload, todo))
        uploaded = [shard for shard, did in zip(todo, sent, strict=True) if did]
        again = write_manifest(store, manifest, upload, pool, blob_freshness, report)
    uploaded += [shard for shard in again if shard not in uploaded]
    report(
        f"published {manifest.profile} {manifest.digest[:16]}:"
        f" manifest {store.manifest_url(manifest.profile, manifest.digest)}"
    )
    return _result(
        store,
        manifest,
        uploaded=uploaded,
        present=len(manifest.shards) - len(uploaded),
        packed_in=local_root,
        repaired=repaired,
    )


def write_manifest(
    store: Store,
    manifest: Manifest,
    upload: Callable[[Shard], bool],
    pool: ThreadPoolExecutor,
    blob_freshness: timedelta,
    report: Progress,
) -> list[Shard]:
    """Refresh every blob the manifest names, upload again those that vanished (a gc deleted
    them after this publish saw them), then write the manifest within MANIFEST_DEADLINE of
    the refresh. Returns the shards uploaded again."""
    shards = manifest.shards
    again: list[Shard] = []
    for _attempt in range(_MANIFEST_ATTEMPTS):
        started = time.monotonic()
        vanished = _refresh(store, shards, datetime.now(timezone.utc) - blob_freshness, pool)
        if vanished:
            report(
                f"{len(vanished)} blob(s) vanished from {store} while publishing: uploading again"
            )
            list(pool.map(upload, vanished))
            again += vanished
        if time.monotonic() - started > MANIFEST_DEADLINE.total_seconds():
            continue  # too slow: a gc may count the refreshed times as old already
        try:
            store.put_manifest(manifest.profile, manifest.digest, manifest_to_bytes(manifest))
        except BlobsVanished:
            continue  # a registry checks the blobs itself; the next round uploads them again
        if not store.keeps_blob_times:
            # A registry dates no blob, so its gc cannot tell a reused one from an old one:
            # one deleted between this publish's check and the tag is put back here.
            late = store.missing_shards(shards)
            list(pool.map(upload, late))
            again += late
        return again
    raise StoreError(
        f"blobs of {manifest.profile} {manifest.digest[:16]} kept vanishing from {store} while"
        " it was being published: is a `gpubuild gc` running with a short --grace? Publish again"
    )


def _refresh(
    store: Store, shards: tuple[Shard, ...], older_than: datetime, pool: ThreadPoolExecutor
) -> list[Shard]:
    """Give every blob older than `older_than` a new time; the shards whose blobs are gone."""
    found = pool.map(lambda shard: store.refresh_blob(shard.sha256, older_than=older_than), shards)
    return [shard for shard, there in zip(shards, found, strict=True) if not there]


def _result(
    store: Store,
    manifest: Manifest,
    *,
    uploaded: list[Shard],
    present: int,
    packed_in: Path | None,
    repaired: tuple[Shard, ...] = (),
) -> PublishResult:
    return PublishResult(
        profile=manifest.profile,
        digest=manifest.digest,
        store=store.display_url,
        manifest_url=store.manifest_url(manifest.profile, manifest.digest),
        bytes_total=manifest.total_bytes,
        bytes_uploaded=sum(shard.bytes for shard in uploaded),
        shards_uploaded=len(uploaded),
        shards_present=present,
        already_published=packed_in is None,
        packed_in=packed_in,
        manifest=manifest,
        repaired=repaired,
        references=store.references(manifest.profile, manifest.digest),
    )


def publish_document(result: PublishResult) -> dict[str, object]:
    """The `--json` document of `gpubuild publish-cache`."""
    return {
        "profile": result.profile,
        "digest": result.digest,
        "store": result.store,
        "manifest_url": result.manifest_url,
        "fetch_url": result.fetch_url,
        "bytes": result.bytes_total,
        "bytes_uploaded": result.bytes_uploaded,
        "shards": len(result.manifest.shards),
        "shards_uploaded": result.shards_uploaded,
        "already_published": result.already_published,
        "repaired": [shard.sha256 for shard in result.repaired],
        "references": result.references,
        "env": result.manifest.env,
    }
