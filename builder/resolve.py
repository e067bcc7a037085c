"""Resolution: a conflict-free set for the target, against the base image (docs/design.md,
#resolution-rules). `resolve(profile, job, settings)` is the only resolution: it runs a backend
(backends.py) and splits what it resolved into what is shipped, what the base image provides
and what the policy excludes (`partition`, pure). `ensure_lock` is the lock file's
side: it reuses a current lock (`Lock.staleness`) and resolves and writes one otherwise;
`current_lock` reads the lock that pod-side output must match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from packaging.version import Version

import builder
from builder.backends import BACKENDS, PROJECT_NAME, Job, compile_requirements
from builder.base import BaseSnapshot
from builder.errors import BadInputError, GpubuildError, PolicyViolationError, ResolutionError
from builder.files import write_atomically
from builder.indexes import IndexSettings, effective_indexes
from builder.lock import (
    Excluded,
    Lock,
    LockedPackage,
    Pinned,
    Shadowed,
    parse_compiled,
    parse_lock,
    read_lock,
    render_lock,
)
from builder.profile import Index, Profile
from builder.secrets import redact_url

__all__ = [
    "Job",
    "ResolveResult",
    "current_lock",
    "ensure_lock",
    "heavy_job",
    "inputs_digest",
    "partition",
    "resolve",
]

_NO_SETTINGS = IndexSettings()


@dataclass(frozen=True)
class ResolveResult:
    """A lock as the pipeline has it: where it is and whether this run wrote it."""

    lock: Lock
    lock_path: Path
    rewritten: bool


def default_lock_path(profile: Profile) -> Path:
    return profile.path.with_suffix(".lock")


def inputs_digest(profile: Profile, job: Job, settings: IndexSettings) -> str:
    """What decides the lock; equal digests mean nothing to do (rule 7).

    A job other than the profile's own [heavy] set adds its requirements and what it is
    resolved on top of; the heavy set's digest is what it always was, so its locks stay valid.
    """
    extra: dict[str, object] = {}
    if job.requirements is not None or job.provided:
        extra = {"requirements": list(job.wanted(profile)), "provided": job.extra_constraints}
    material = {
        "gpubuild": builder.__version__,
        "profile": profile.text,
        "base": profile.snapshot.text,
        "default_index": settings.default_url,
        "overrides": sorted(settings.overrides),
        "backend": job.backend,
        **extra,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def partition(
    resolved: list[LockedPackage],
    profile: Profile,
    snapshot: BaseSnapshot,
    indexes: tuple[Index, ...],
) -> tuple[list[LockedPackage], list[Pinned], list[Excluded], list[Shadowed]]:
    """Rules 4 and 5: split the resolved set into shipped, provided by base, excluded."""
    shipped: list[LockedPackage] = []
    provided: list[Pinned] = []
    excluded: list[Excluded] = []
    shadowed: list[Shadowed] = []
    exclude = set(profile.policy.exclude)
    allow_shadow = set(profile.policy.allow_shadow)
    routes = {package: index for index in indexes for package in index.packages}
    for package in resolved:
        package = replace(
            package,
            required_by=tuple(
                "(profile)" if name == PROJECT_NAME else name for name in package.required_by
            ),
            index_url=redact_url(package.index_url).rstrip("/") if package.index_url else None,
        )
        route = routes.get(package.name)
        if (
            route is not None
            and package.index_url
            and package.index_url != redact_url(route.url).rstrip("/")
        ):
            raise PolicyViolationError(
                f"{package.name} came from {package.index_url}, but the profile takes it from"
                f" index {route.name!r} ({redact_url(route.url)}) only"
            )
        if package.name in exclude:
            excluded.append(Excluded(package.name, package.version, package.required_by))
            continue
        base_version = snapshot.version_of(package.name)
        if base_version is not None and Version(base_version) == Version(package.version):
            provided.append(Pinned(package.name, package.version))
            continue
        if base_version is not None:
            if package.name not in allow_shadow:
                raise PolicyViolationError(
                    f"{package.name}=={package.version} would shadow the base image's"
                    f" {package.name}=={base_version}; add it to [policy] allow_shadow in"
                    f" {profile.path} if that is intended"
                )
            shadowed.append(Shadowed(package.name, package.version, base_version))
        if not package.hashes:
            raise ResolutionError(
                f"{package.name}=={package.version} has no hash in the resolver output"
            )
        shipped.append(package)
    return shipped, provided, excluded, shadowed


def resolve(profile: Profile, job: Job, settings: IndexSettings) -> Lock:
    """Resolve `job` for the profile's target under the rules; the Lock it gives.

    What `job.provided` ships (the heavy set, when the light set is resolved) is a hard
    constraint and counts as provided, exactly like the base image's packages, so the second
    set never repeats the first at another version.
    """
    indexes = effective_indexes(profile, settings)
    compiled, backend_label = compile_requirements(profile, job, indexes, settings)
    snapshot = profile.snapshot
    underneath = BaseSnapshot(snapshot.path, {**snapshot.packages, **job.provided}, snapshot.data)
    shipped, pinned, excluded, shadowed = partition(
        parse_compiled(compiled), profile, underneath, indexes
    )
    warnings = tuple(
        f"{e.name} is excluded but the base snapshot does not list it; nothing will provide it"
        for e in excluded
        if snapshot.version_of(e.name) is None
    )
    return Lock(
        profile=profile.name,
        python=profile.target.python,
        platform=profile.target.platform,
        interpreter=profile.target.interpreter,
        install_dir=profile.target.install_dir,
        sources=profile.sources,
        inputs=inputs_digest(profile, job, settings),
        backend=backend_label,
        packages=tuple(sorted(shipped, key=lambda p: p.name)),
        provided_by_base=tuple(sorted(pinned, key=lambda p: p.name)),
        excluded=tuple(sorted(excluded, key=lambda e: e.name)),
        shadowed=tuple(sorted(shadowed, key=lambda s: s.name)),
        warnings=warnings,
    )


def report_document(result: ResolveResult) -> dict[str, object]:
    """The `--json` document of `gpubuild resolve`."""
    lock = result.lock
    return {
        "profile": lock.profile,
        "shipped": [{"name": p.name, "version": p.version} for p in lock.packages],
        "provided_by_base": [{"name": p.name, "version": p.version} for p in lock.provided_by_base],
        "excluded": [
            {"name": e.name, "version": e.version, "required_by": list(e.required_by)}
            for e in lock.excluded
        ],
        "shadowed": [
            {"name": s.name, "version": s.version, "base_version": s.base_version}
            for s in lock.shadowed
        ],
        "warnings": list(lock.warnings),
        "lock": str(result.lock_path),
        "digest": lock.digest(),
        "rewritten": result.rewritten,
        "backend": lock.backend,
    }


def report_text(result: ResolveResult) -> str:
    lock = result.lock
    lines = [
        f"profile {lock.profile}: python {lock.python} on {lock.platform} ({lock.backend})",
        f"shipped ({len(lock.packages)}):",
        *[f"  {p.name}=={p.version}" for p in lock.packages],
        f"provided by the base image, not shipped ({len(lock.provided_by_base)}):",
        *[f"  {p.name}=={p.version}" for p in lock.provided_by_base],
        f"excluded by policy ({len(lock.excluded)}):",
        *[f"  {e.name}=={e.version} (wanted by {', '.join(e.required_by)})" for e in lock.excluded],
    ]
    if lock.shadowed:
        lines.append(f"shadowing base packages, allowed by the profile ({len(lock.shadowed)}):")
        lines += [f"  {s.name}=={s.version} (base has {s.base_version})" for s in lock.shadowed]
    lines += [f"warning: {w}" for w in lock.warnings]
    state = "written" if result.rewritten else "unchanged"
    lines.append(f"lock {state}: {result.lock_path} (digest {lock.digest()[:16]})")
    return "\n".join(lines)


# --- the lock file: read when current, resolved and written when not -----------------------


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
