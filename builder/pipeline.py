"""The pipeline, stage after stage: profile -> lock -> pack -> store, and the worker image.

Each stage receives what the one before produced and never runs it again; this module is the
only place that chains them, and what the CLI calls (docs/design.md#the-pipeline):

    ensure_lock      the profile's lock, resolved only when it is not current
    pack_profile     ensure_lock, then pack (materialise, fix, shard)
    publish_profile  ensure_lock, then (unless published) pack and publish
    find_published   the current lock's manifest in a store, for pod-side output
    plan_worker      the heavy and light locks, for the worker Dockerfile
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.backends import BACKENDS, Job
from builder.budget import (
    Budget,
    ContextSize,
    human_size,
    measure_context,
    over_budget_error,
    render_budget,
)
from builder.budget import plan_budget as budget_for
from builder.dockerfile import WorkerPlan, context_path, dockerignore_text, plan_dockerfile
from builder.errors import BadInputError, GpubuildError, IntegrityError
from builder.files import write_atomically
from builder.image import engine_or_none, local_image_bytes
from builder.indexes import IndexSettings
from builder.light import (
    DEFAULT_MAX_LIGHT_BYTES,
    LightSet,
    SplitProposal,
    check_light_set,
    check_requirement_names,
    classify,
    light_lock_path,
    measure,
    measured_packages,
    read_requirements,
)
from builder.lock import Lock, parse_lock, read_lock, render_lock
from builder.manifest import Manifest, blob_key
from builder.pack import (
    DEFAULT_SHARD_THRESHOLD,
    PackResult,
    default_store_dir,
    pack,
    reusable_manifest,
)
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


# --- the worker image ---------------------------------------------------------------------


def plan_worker(
    profile: Profile,
    *,
    profile_arg: str,
    context: Path,
    code: tuple[Path, ...] = (),
    lock_path: Path | None = None,
    settings: IndexSettings = _NO_SETTINGS,
    max_light_bytes: int | None = None,
    on_progress: Progress = silent,
) -> WorkerPlan:
    """The heavy lock, the light lock resolved on top of it (checked and measured), and the
    packed manifest when this machine's store has it: everything the Dockerfile needs."""
    heavy = ensure_lock(profile, settings=settings, lock_path=lock_path)
    light: LightSet | None = None
    if profile.light:
        light_path = light_lock_path(heavy.lock_path)
        # Refused before resolving: a GPU package by its name, and a light lock the Dockerfile
        # could not COPY (outside the build context).
        check_requirement_names(profile, profile.light)
        context_path(light_path, context, "the light lock")
        on_progress(f"resolving the light set of {profile.name} on top of the heavy lock")
        provided = {p.name: p.version for p in heavy.lock.packages}
        job = Job(requirements=profile.light, set_name="light", provided=provided)
        light_result = ensure_lock(profile, settings=settings, lock_path=light_path, job=job)
        light = check_light_set(
            profile,
            light_result,
            provided,
            settings=settings,
            max_bytes=max_light_bytes,
            on_progress=on_progress,
        )
    manifest = reusable_manifest(default_store_dir(), profile.name, heavy.lock.digest())
    return plan_dockerfile(
        profile,
        heavy,
        light,
        manifest,
        profile_arg=profile_arg,
        context=context,
        code=code,
        settings=settings,
    )


@dataclass(frozen=True)
class DockerfileResult:
    plan: WorkerPlan
    budget_text: str
    budget: Budget
    output: Path | None
    context: ContextSize
    dockerignore: str  # the .dockerignore that sends only what the Dockerfile copies
    dockerignore_written: Path | None


def generate_dockerfile(
    profile: Profile,
    *,
    profile_arg: str,
    context: Path,
    code: tuple[Path, ...] = (),
    lock_path: Path | None = None,
    settings: IndexSettings = _NO_SETTINGS,
    max_light_bytes: int | None = None,
    budget_bytes: int,
    output: Path | None = None,
    write_dockerignore: bool = False,
    on_progress: Progress = silent,
) -> DockerfileResult:
    """Plan, check the disk budget (as CI builds and pushes it), then write the Dockerfile.

    `write_dockerignore`: write the proposed .dockerignore into the context when it has none
    (the budget then counts the context it sends)."""
    plan = plan_worker(
        profile,
        profile_arg=profile_arg,
        context=context,
        code=code,
        lock_path=lock_path,
        settings=settings,
        max_light_bytes=max_light_bytes,
        on_progress=on_progress,
    )
    proposal = dockerignore_text(plan)
    ignore_path = context / ".dockerignore"
    written = None
    if write_dockerignore and not ignore_path.exists():
        write_atomically(ignore_path, proposal)
        written = ignore_path
    measured = measure_context(context)
    if measured.dockerignore:
        source = f"measured: {context} as docker build sends it (.dockerignore applied)"
    else:
        source = (
            f"measured: {context} as docker build sends it, with no .dockerignore"
            + (f" ({measured.describe()})" if measured.describe() else "")
            + "; one that sends only what the Dockerfile copies would send"
            f" {human_size(plan.copied_bytes)} (--dockerignore writes it)"
        )
    base_image = profile.target.base_image
    budget = budget_for(
        plan.budget_inputs,
        base_image=base_image,
        local_base_bytes=local_image_bytes(engine_or_none(), base_image),
        context_bytes=measured.bytes,
        context_source=source,
        push=True,
        budget_bytes=budget_bytes,
    )
    rendered = render_budget(budget)
    if budget.over:
        raise over_budget_error(budget, rendered)
    if output is not None:
        write_atomically(output, plan.text)
    return DockerfileResult(plan, rendered, budget, output, measured, proposal, written)


def propose_split(
    profile: Profile,
    source: Path,
    *,
    settings: IndexSettings = _NO_SETTINGS,
    max_bytes: int = DEFAULT_MAX_LIGHT_BYTES,
    on_progress: Progress = silent,
) -> SplitProposal:
    """Resolve a whole requirements file for the profile's target, measure it, split it."""
    requirements = read_requirements(source)
    lock = resolve(profile, Job(requirements=requirements, set_name=source.name), settings)
    with tempfile.TemporaryDirectory(prefix="gpubuild-split-") as work:
        lock_path = Path(work) / "split.lock"
        sizes = measure(lock_path, lock, profile, settings, on_progress)
    packages = measured_packages(lock, sizes)
    heavy, light = classify(requirements, packages, max_bytes)
    return SplitProposal(source, heavy, light, packages, lock.provided_by_base, max_bytes)
