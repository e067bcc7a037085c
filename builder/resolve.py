"""Resolution: a conflict-free set for the target, against the base image (docs/design.md,
#resolution-rules). `resolve(profile, job, settings)` is the only resolution: it runs a backend
(backends.py) and splits what it resolved into what is shipped, what the base image provides
and what the policy excludes (`partition`, pure). `ensure_lock` is the lock file's
side: it reuses a current lock (`Lock.staleness`) and resolves and writes one otherwise;
`current_lock` reads the lock that pod-side output must match. `check_locks` is `resolve
--check`: the same freshness rule, read-only, with what changed in words.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
from dataclasses import dataclass, replace
from pathlib import Path

from packaging.version import Version

import builder
from builder.backends import BACKENDS, PROJECT_NAME, Job, compile_requirements
from builder.base import BaseSnapshot
from builder.errors import (
    BadInputError,
    FormatError,
    GpubuildError,
    PolicyViolationError,
    ResolutionError,
)
from builder.files import write_atomically
from builder.indexes import USE_DEFAULT_INDEX, IndexSettings, effective_indexes
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
    source_changes,
)
from builder.profile import Index, Profile, expand_prune
from builder.secrets import redact_url

__all__ = [
    "Job",
    "LockCheck",
    "ResolveResult",
    "check_locks",
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
        # Pruning applies to what pack ships (the heavy set), not to what an image installs.
        prune=expand_prune(profile.policy.prune) if job.set_name == "heavy" else (),
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


# --- resolve --check: is the lock current? Reads, never resolves, writes nothing ----------------


@dataclass(frozen=True)
class LockCheck:
    """One lock as `resolve --check` finds it: current when `reasons` is empty."""

    set_name: str  # "heavy" or "light"
    lock_path: Path
    reasons: tuple[str, ...]
    digest: str | None = None  # the artifact digest, when the lock could be read

    @property
    def current(self) -> bool:
        return not self.reasons


def check_lock(
    profile: Profile, job: Job, settings: IndexSettings, path: Path
) -> tuple[LockCheck, Lock | None]:
    """Whether `resolve` with these settings would leave the lock at `path` as it is (rule 7),
    and if not, what changed, in words. Runs no resolver: the profile, its snapshot and the
    lock are all it reads."""
    if not path.is_file():
        return LockCheck(job.set_name, path, (f"no lock: {path} does not exist",)), None
    try:
        lock = read_lock(path)
    except FormatError as exc:
        what = "lock format" if exc.key == "header.format" else "unreadable lock"
        return LockCheck(job.set_name, path, (f"{what}: {exc}",)), None
    except GpubuildError as exc:
        return LockCheck(job.set_name, path, (f"unreadable lock: {exc}",)), None
    inputs = inputs_digest(profile, job, settings)
    if not lock.staleness(profile, inputs):
        return LockCheck(job.set_name, path, (), lock.digest()), lock
    reasons = [f"target changed: {reason}" for reason in lock.target_changes(profile)]
    if lock.sources != profile.sources:
        details = list(source_changes(lock, profile, job.wanted(profile), job.provided))
        pruned = expand_prune(profile.policy.prune) if job.set_name == "heavy" else ()
        if lock.prune != pruned:
            details.append(
                f"profile edited ({profile.path.name}): [policy] prune is now"
                f" {list(pruned) or 'empty'}, the lock prunes {list(lock.prune) or 'nothing'}"
            )
        reasons += details or [
            f"profile or base snapshot edited: {profile.path.name} or"
            f" {profile.snapshot.path.name if profile.snapshot.path else 'its snapshot'}"
            " changed in a way the lock does not show (a comment, a removed constraint, an"
            " [[index]] table, a base package nothing here uses)"
        ]
    elif not reasons:
        reasons.append(_inputs_change(lock, profile, job, settings))
    return LockCheck(job.set_name, path, tuple(reasons), lock.digest()), lock


def _inputs_change(lock: Lock, profile: Profile, job: Job, settings: IndexSettings) -> str:
    """Same profile and snapshot, other inputs (rule 7): the resolver, the index options or
    gpubuild's version. The lock names its resolver; the others it records only as a digest,
    so they are told apart by trying this run's inputs without the index options."""
    family = "pip-tools" if lock.backend.startswith("pip-tools") else "uv"
    if family != job.backend:
        return f"resolver changed: the lock was resolved with {lock.backend}, this run uses {job.backend}"
    given = _index_options_text(settings) or "none"
    for candidate in _likely_settings(profile):
        if candidate != settings and inputs_digest(profile, job, candidate) == lock.inputs:
            return (
                "index options changed: the lock was resolved with"
                f" {_index_options_text(candidate) or 'no index options'}, this run gives {given}"
            )
    return (
        "index options or gpubuild version changed: the lock was resolved with other"
        f" --index-url/--index options than this run's ({given}) or by a gpubuild"
        f" other than {builder.__version__}; check with the options `resolve` was given"
    )


def _likely_settings(profile: Profile) -> list[IndexSettings]:
    """The index options a lock is most often resolved with: none, or some of the profile's
    [[index]] routes dropped (`--index NAME=default`, for a machine that cannot reach one)."""
    names = [index.name for index in profile.indexes][:4]  # at most 16 digests to try
    return [
        IndexSettings(overrides=tuple((name, USE_DEFAULT_INDEX) for name in chosen))
        for size in range(len(names) + 1)
        for chosen in itertools.combinations(names, size)
    ]


def _index_options_text(settings: IndexSettings) -> str:
    parts = [f"--index-url {redact_url(settings.default_url)}"] if settings.default_url else []
    parts += [
        f"--index {name}={url if url == USE_DEFAULT_INDEX else redact_url(url)}"
        for name, url in settings.overrides
    ]
    return " ".join(parts)


def check_locks(
    profile: Profile,
    *,
    settings: IndexSettings = _NO_SETTINGS,
    lock_path: Path | None = None,
    backend: str = "uv",
) -> tuple[LockCheck, ...]:
    """`resolve --check`: the heavy lock, and the light lock beside it when the profile has a
    [light] set (resolved on top of the heavy pins, so checked only once those are current)."""
    path = lock_path or default_lock_path(profile)
    heavy, lock = check_lock(profile, heavy_job(profile, path, backend), settings, path)
    if not profile.light:
        return (heavy,)
    from builder.light import light_lock_path  # only profiles with a [light] set pay for it

    light_path = light_lock_path(path)
    if lock is None or not heavy.current:
        return heavy, LockCheck("light", light_path, ("the heavy lock it is resolved on is stale",))
    provided = {p.name: p.version for p in lock.packages}
    job = Job(requirements=profile.light, set_name="light", provided=provided)
    light, _ = check_lock(profile, job, settings, light_path)
    return heavy, light


def check_document(checks: tuple[LockCheck, ...]) -> dict[str, object]:
    """The `--json` document of `gpubuild resolve --check`."""
    return {
        "current": all(c.current for c in checks),
        "locks": [
            {
                "set": c.set_name,
                "lock": str(c.lock_path),
                "current": c.current,
                "digest": c.digest,
                "reasons": list(c.reasons),
            }
            for c in checks
        ],
    }


def check_text(profile: Profile, checks: tuple[LockCheck, ...]) -> str:
    lines = []
    for check in checks:
        if check.current:
            assert check.digest is not None
            lines.append(f"{check.lock_path} is current (digest {check.digest[:16]})")
            continue
        lines.append(f"{check.lock_path} is stale for {profile.path}:")
        lines += [f"  - {reason}" for reason in check.reasons]
    if not all(c.current for c in checks):
        lines.append(
            f"run `gpubuild resolve {profile.path}` (with the same options) and commit the lock"
        )
    return "\n".join(lines)
