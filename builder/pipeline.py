"""The pipeline, stage after stage: profile -> lock -> pack -> store, and the worker image.

Each stage receives what the one before produced and never runs it again; this module is the
only place that chains them, and what the CLI calls (docs/design.md#the-pipeline). The first
stage, `ensure_lock` (the profile's lock, resolved only when it is not current), lives in
builder/resolve.py so that `gpubuild resolve` imports neither pack nor the stores:

    pack_profile     ensure_lock, then pack (materialise, fix, shard)
    publish_profile  ensure_lock, then (unless published) pack and publish
    find_published   the current lock's manifest in a store, for pod-side output

The worker image's side (the heavy and light locks for the Dockerfile, the budget, `split`)
is builder/worker.py, which builds on this one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import IntegrityError
from builder.indexes import IndexSettings
from builder.manifest import Manifest, blob_key
from builder.pack import DEFAULT_SHARD_THRESHOLD, PackResult, default_store_dir, pack
from builder.profile import Profile
from builder.progress import Progress, silent
from builder.publish import PublishResult, already_published, damaged_shards, publish
from builder.resolve import current_lock, ensure_lock
from builder.stores import FileStore, open_store

_NO_SETTINGS = IndexSettings()


# --- pack and publish ---------------------------------------------------------------------


def pack_profile(
    profile: Profile,
    *,
    out_dir: Path,
    settings: IndexSettings = _NO_SETTINGS,
    lock_path: Path | None = None,
    on_progress: Progress = silent,
    shard_threshold: int = DEFAULT_SHARD_THRESHOLD,
) -> PackResult:
    """The profile's current lock (resolved when needed), packed into `out_dir`."""
    resolved = ensure_lock(profile, settings=settings, lock_path=lock_path)
    return pack(
        resolved.lock,
        profile,
        lock_path=resolved.lock_path,
        out_dir=out_dir,
        settings=settings,
        on_progress=on_progress,
        shard_threshold=shard_threshold,
    )


def publish_profile(
    profile: Profile,
    *,
    store_url: str,
    settings: IndexSettings = _NO_SETTINGS,
    lock_path: Path | None = None,
    pack_dir: Path | None = None,
    repair: bool = False,
    on_progress: Progress = silent,
) -> PublishResult:
    """Resolve (once, when needed), pack when the store lacks the digest, publish.

    `repair`: do not trust sizes: re-hash the local pack and the store's blobs, pack again
    what is damaged locally and upload good copies of what is damaged in the store."""
    report = on_progress
    store = open_store(store_url)
    # Reach the store before spending minutes on resolve and pack: an unreachable store or
    # refused credentials fail here, in seconds.
    store.has_blob("0" * 64)
    resolved = ensure_lock(profile, settings=settings, lock_path=lock_path)
    digest = resolved.lock.digest()
    existing = None if repair else store.complete_manifest(profile.name, digest)
    if existing is not None:
        report(f"{profile.name} {digest[:16]} is already published in {store}: nothing to upload")
        return already_published(store, existing)
    # A local store is packed into directly; any other store gets what a local pack made.
    local_root = store.root if isinstance(store, FileStore) else (pack_dir or default_store_dir())

    def pack_here() -> PackResult:
        return pack(
            resolved.lock,
            profile,
            lock_path=resolved.lock_path,
            out_dir=local_root,
            settings=settings,
            on_progress=report,
        )

    packed = pack_here()
    if repair:
        packed = _repair_local_pack(packed, pack_here, report)
    return publish(packed, store, repair=repair, on_progress=report)


def _repair_local_pack(
    packed: PackResult, pack_again: Callable[[], PackResult], report: Progress
) -> PackResult:
    """The local pack with every blob re-hashed; damaged ones are deleted and packed again."""
    local = FileStore(packed.out_dir)
    damaged = damaged_shards(local, packed.manifest.shards, report)
    if not damaged:
        return packed
    for shard in damaged:
        (packed.out_dir / blob_key(shard.sha256)).unlink()
    report(f"packing again: {len(damaged)} damaged local blob(s) in {packed.out_dir}")
    repacked = pack_again()
    still = damaged_shards(local, repacked.manifest.shards, report)
    if still:
        raise IntegrityError(
            f"{packed.out_dir}: packing again gave blobs whose bytes are not their names"
            f" ({', '.join(blob_key(s.sha256) for s in still)}); the disk may be failing"
        )
    return PackResult(
        repacked.manifest,
        repacked.manifest_path,
        repacked.out_dir,
        reused=False,
        repaired=tuple(damaged),
        written=repacked.written,
    )


@dataclass(frozen=True)
class Published:
    """A profile's current lock and the manifest a store holds for its digest."""

    manifest: Manifest
    lock_text: str
    lock_path: Path
    store_base_url: str
    store_display_url: str
    references: dict[str, str] = field(default_factory=dict)  # a registry's images by digest


def find_published(profile: Profile, store_url: str, lock_path: Path | None = None) -> Published:
    """The manifest of the profile's current lock, read from the store at `store_url`."""
    lock, path, text = current_lock(profile, lock_path)
    store = open_store(store_url)
    manifest = store.manifest(profile.name, lock.digest())
    references = store.references(profile.name, manifest.digest)
    return Published(manifest, text, path, store.base_url, store.display_url, references)
