"""The pipeline, stage after stage: profile -> lock -> pack -> store, and the worker image.

Each stage receives what the one before produced and never runs it again; this module is the
only place that chains them, and what the CLI calls (docs/design.md#the-pipeline):

    ensure_lock      the profile's lock, resolved only when it is not current
    pack_profile     ensure_lock, then pack (materialise, fix, shard)
    publish_profile  ensure_lock, then (unless published) pack and publish
    find_published   the current lock's manifest in a store, for pod-side output

The worker image's side (the heavy and light locks for the Dockerfile, the budget, `split`)
is builder/worker.py, which builds on this one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.backends import BACKENDS, Job
from builder.errors import BadInputError, GpubuildError, IntegrityError
from builder.files import write_atomically
from builder.indexes import IndexSettings
from builder.lock import Lock, parse_lock, read_lock, render_lock
from builder.manifest import Manifest, blob_key
from builder.pack import DEFAULT_SHARD_THRESHOLD, PackResult, default_store_dir, pack
from builder.profile import Profile
from builder.progress import Progress, silent
from builder.publish import PublishResult, already_published, damaged_shards, publish
from builder.resolve import ResolveResult, default_lock_path, inputs_digest, resolve
from builder.stores import FileStore, open_store

_NO_SETTINGS = IndexSettings()


# --- the lock -----------------------------------------------------------------------------


def _existing_lock(path: Path) -> Lock | None:
    """The lock at `path`, or None when there is none or it cannot be read (resolve again)."""
    if not path.is_file():
        return None
    with contextlib.suppress(GpubuildError, OSError):
        return read_lock(path)
    return None


def heavy_job(profile: Profile, lock_path: Path, backend: str | None = None) -> Job:
    """The profile's [heavy] set. `backend` None keeps the backend of an existing lock (uv for
    a new one), so that pack or publish-cache never re-resolve a pip-tools lock with uv."""
    if backend is None:
        existing = _existing_lock(lock_path)
        label = existing.backend if existing else "uv"
        backend = "pip-tools" if label.startswith("pip-tools") else "uv"
    if backend not in BACKENDS:
        raise BadInputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return Job(backend=backend)


def ensure_lock(
    profile: Profile,
    *,
    settings: IndexSettings = _NO_SETTINGS,
    lock_path: Path | None = None,
    job: Job | None = None,
    backend: str | None = None,
) -> ResolveResult:
    """The lock at `lock_path` (default `<profile>.lock`) for `job` (default the heavy set):
    reused when it is current (rule 7: nothing changed, nothing rewritten, no resolver run),
    resolved and written atomically otherwise."""
    path = lock_path or default_lock_path(profile)
    job = job or heavy_job(profile, path, backend)
    existing = _existing_lock(path)
    if existing is not None and not existing.staleness(
        profile, inputs_digest(profile, job, settings)
    ):
        return ResolveResult(existing, path, rewritten=False)
    lock = resolve(profile, job, settings)
    text = render_lock(
        lock,
        profile.target.install_dir,
        set_name=job.set_name,
        provided_by_other_set=frozenset(job.provided),
    )
    rewritten = not (path.is_file() and path.read_text(encoding="utf-8") == text)
    if rewritten:
        write_atomically(path, text)
    return ResolveResult(lock, path, rewritten)


def current_lock(profile: Profile, lock_path: Path | None = None) -> tuple[Lock, Path, str]:
    """The profile's lock as it is on disk, for output that goes to a pod (which must match
    what was published): an error that says what to run when it is missing or stale.
    Returns the lock, its path and its text."""
    path = lock_path or default_lock_path(profile)
    if not path.is_file():
        raise BadInputError(
            f"{path}: no lock yet; run `gpubuild publish-cache {profile.path}` (or resolve) first"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: cannot read lock: {exc}") from None
    lock = parse_lock(text, path)
    reasons = lock.staleness(profile)
    if reasons:
        raise BadInputError(
            f"{path} is stale: {'; '.join(reasons)}; run `gpubuild publish-cache"
            f" {profile.path}` again (it resolves, packs and publishes the new set)"
        )
    return lock, path, text


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


def find_published(profile: Profile, store_url: str, lock_path: Path | None = None) -> Published:
    """The manifest of the profile's current lock, read from the store at `store_url`."""
    lock, path, text = current_lock(profile, lock_path)
    store = open_store(store_url)
    manifest = store.manifest(profile.name, lock.digest())
    return Published(manifest, text, path, store.base_url, store.display_url)
