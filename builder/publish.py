"""publish-cache: resolve and pack when needed, upload the shards the store lacks, manifest last.

A reader never sees a half-published digest: the manifest names only shards that are already
in the store. Shards are content-addressed, so a shard another profile published is not sent
again, and two publishers of one digest at once both succeed.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from builder.errors import IntegrityError, NotPublishedError
from builder.manifest import Manifest, Shard, blob_key, manifest_from_bytes, manifest_to_bytes
from builder.pack import PackResult, default_store_dir, pack
from builder.profile import Profile
from builder.progress import Progress, Step, silent
from builder.resolve import IndexSettings, resolve
from builder.store import FileStore, Store, open_store

UPLOAD_WORKERS = 4


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

    @property
    def fetch_url(self) -> str:
        """What `gpubuild fetch` takes: STORE/PROFILE/DIGEST."""
        return f"{self.store.rstrip('/')}/{self.profile}/{self.digest}"


def missing_shards(store: Store, shards: tuple[Shard, ...]) -> list[Shard]:
    """Shards the store lacks (or holds at the wrong size, which put_blob then repairs)."""
    return [shard for shard in shards if store.has_blob(shard.sha256) != shard.bytes]


def published_manifest(store: Store, profile: str, digest: str) -> Manifest | None:
    """The store's manifest for this digest when it and every shard it names are intact."""
    try:
        data = store.get_manifest(profile, digest)
    except NotPublishedError:
        return None
    manifest = manifest_from_bytes(data, where=store.manifest_url(profile, digest))
    if missing_shards(store, manifest.shards):
        return None
    return manifest


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
                f"uploaded {self.done / 1e6:,.1f} / {self.total / 1e6:,.1f} MB"
                f" ({self.done / elapsed / 1e6:,.1f} MB/s)"
            )


def publish_cache(
    profile: Profile,
    *,
    store_url: str,
    lock_path: Path | None = None,
    settings: IndexSettings | None = None,
    pack_dir: Path | None = None,
    on_progress: Progress = silent,
    repair: bool = False,
) -> PublishResult:
    """Publish the profile's current lock: resolve and pack when needed, upload what is missing.

    `repair`: re-hash what the store holds for this digest (and the local pack) instead of
    trusting sizes, and write again every blob whose bytes differ."""
    report = on_progress
    settings = settings or IndexSettings()
    store = open_store(store_url)
    # Reach the store before spending minutes on resolve and pack: an unreachable store or
    # refused credentials fail here, in seconds.
    store.has_blob("0" * 64)
    lock = resolve(profile, lock_path=lock_path, settings=settings).lock
    digest = lock.digest()
    existing = None if repair else published_manifest(store, profile.name, digest)
    if existing is not None:
        report(f"{profile.name} {digest[:16]} is already published in {store}: nothing to upload")
        return _result(store, existing, uploaded=[], present=len(existing.shards), packed_in=None)

    # A local store is packed into directly; any other store gets what a local pack made.
    local_root = store.root if isinstance(store, FileStore) else (pack_dir or default_store_dir())
    blobs_before = _local_blobs(local_root)
    packed = pack(
        profile, lock_path=lock_path, out_dir=local_root, settings=settings, on_progress=report
    )
    if repair:
        packed = _repair_local_pack(profile, lock_path, local_root, settings, packed, report)
    manifest = packed.manifest
    if isinstance(store, FileStore):
        written = [s for s in manifest.shards if blob_key(s.sha256) not in blobs_before]
        return _result(
            store,
            manifest,
            uploaded=written,
            present=len(manifest.shards) - len(written),
            packed_in=local_root,
            repaired=packed.repaired if repair else (),
        )

    todo = damaged_shards(store, manifest.shards, report) if repair else []
    repaired = tuple(todo)
    todo += [s for s in missing_shards(store, manifest.shards) if s not in todo]
    total = sum(shard.bytes for shard in todo)
    report(
        f"uploading {len(todo)} of {len(manifest.shards)} shard(s), {total / 1e6:,.1f} MB,"
        f" to {store}"
    )
    meter = _Meter(total, report)

    def upload(shard: Shard) -> bool:
        local = local_root / blob_key(shard.sha256)
        return store.put_blob(shard.sha256, local, meter, overwrite=shard in repaired)

    with ThreadPoolExecutor(max_workers=UPLOAD_WORKERS) as pool:
        sent = list(pool.map(upload, todo))
    uploaded = [shard for shard, did in zip(todo, sent, strict=True) if did]
    store.put_manifest(profile.name, digest, manifest_to_bytes(manifest))
    report(
        f"published {profile.name} {digest[:16]}: manifest {store.manifest_url(profile.name, digest)}"
    )
    return _result(
        store,
        manifest,
        uploaded=uploaded,
        present=len(manifest.shards) - len(uploaded),
        packed_in=local_root,
        repaired=repaired,
    )


def damaged_shards(store: Store, shards: tuple[Shard, ...], report: Progress) -> list[Shard]:
    """Shards whose bytes in the store are not their sha256 (missing ones are not listed)."""
    damaged = []
    for number, shard in enumerate(shards, start=1):
        found = store.blob_digest(shard.sha256)
        if found is not None and found != (shard.sha256, shard.bytes):
            damaged.append(shard)
            report(
                f"damaged in {store}: {blob_key(shard.sha256)} ({found[1]:,} bytes, sha256 {found[0][:16]})"
            )
        report(Step(number, len(shards), f"checked {blob_key(shard.sha256)[:24]}..."))
    return damaged


def _repair_local_pack(
    profile: Profile,
    lock_path: Path | None,
    local_root: Path,
    settings: IndexSettings,
    packed: PackResult,
    report: Progress,
) -> PackResult:
    """The local pack with every blob re-hashed; damaged ones are packed again."""
    local = FileStore(local_root)
    damaged = damaged_shards(local, packed.manifest.shards, report)
    if not damaged:
        return packed
    for shard in damaged:
        (local_root / blob_key(shard.sha256)).unlink()
    report(f"packing again: {len(damaged)} damaged local blob(s) in {local_root}")
    repacked = pack(
        profile, lock_path=lock_path, out_dir=local_root, settings=settings, on_progress=report
    )
    still = damaged_shards(local, repacked.manifest.shards, report)
    if still:
        raise IntegrityError(
            f"{local_root}: packing again gave blobs whose bytes are not their names"
            f" ({', '.join(blob_key(s.sha256) for s in still)}); the disk may be failing"
        )
    return dataclasses.replace(repacked, repaired=tuple(damaged))


def _local_blobs(root: Path) -> set[str]:
    try:
        return {f"blobs/{name}" for name in os.listdir(root / "blobs")}
    except FileNotFoundError:
        return set()


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
        "env": result.manifest.env,
    }
