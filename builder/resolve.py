"""Resolution: a conflict-free heavy set for the target, against the base image (DESIGN.md rules).

The pure core (`plan_inputs`, `partition`, `explain_conflict`) is separate from the edges that
run uv or pip-compile and write the lock.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import sysconfig
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import builder
from builder.base import BaseSnapshot, read_snapshot
from builder.errors import (
    BackendUnavailableError,
    BadInputError,
    PolicyViolationError,
    ResolutionError,
    ToolFailedError,
)
from builder.files import write_atomically
from builder.lock import (
    Excluded,
    Lock,
    LockedPackage,
    Pinned,
    Shadowed,
    parse_compiled,
    read_lock,
    render_lock,
)
from builder.profile import Index, Profile
from builder.secrets import redact_url, scrub
from builder.tools import pip_compile_argv, run_tool, run_uv, uv_version

BACKENDS = ("uv", "pip-tools")
USE_DEFAULT_INDEX = "default"
_PROJECT_NAME = "gpubuild-resolve"


@dataclass(frozen=True)
class IndexSettings:
    """Where packages come from for this run: the default index and the routed ones."""

    default_url: str | None = None
    overrides: tuple[tuple[str, str], ...] = ()  # (index name, URL or "default")


@dataclass(frozen=True)
class ResolveResult:
    lock: Lock
    lock_path: Path
    rewritten: bool


def default_lock_path(profile: Profile) -> Path:
    return profile.path.with_suffix(".lock")


def effective_indexes(profile: Profile, settings: IndexSettings) -> tuple[Index, ...]:
    """The profile's [[index]] tables after command-line overrides; "default" drops the routing."""
    known = {index.name for index in profile.indexes}
    overrides = dict(settings.overrides)
    for name in overrides:
        if name not in known:
            raise BadInputError(
                f"--index {name}=...: the profile {profile.path} has no [[index]] named {name!r}"
                f" (it has: {', '.join(sorted(known)) or 'none'})"
            )
    result = []
    for index in profile.indexes:
        url = overrides.get(index.name, index.url)
        if url == USE_DEFAULT_INDEX:
            continue
        result.append(replace(index, url=url.rstrip("/")))
    return tuple(result)


def real_index_urls(profile: Profile, settings: IndexSettings) -> dict[str, str]:
    """Locks record index URLs without credentials; map them back to the URLs to install from."""
    urls = [index.url for index in effective_indexes(profile, settings)]
    if settings.default_url:
        urls.append(settings.default_url)
    return {redact_url(url).rstrip("/"): url for url in urls}


def sources_digest(profile: Profile) -> str:
    """sha256 of the profile file and its base snapshot: what a lock was resolved from."""
    material = profile.path.read_bytes() + b"\0" + profile.target.base_packages.read_bytes()
    return hashlib.sha256(material).hexdigest()


def inputs_digest(
    profile: Profile,
    snapshot_text: str,
    settings: IndexSettings,
    backend: str,
    extra: Mapping[str, object] | None = None,
) -> str:
    """What decides the lock; equal digests mean nothing to do (rule 7).

    `extra` holds what a resolution of another requirement set adds (see `resolve`); without it
    the digest is what it always was, so existing heavy locks stay valid.
    """
    material = {
        "gpubuild": builder.__version__,
        "profile": profile.path.read_text(encoding="utf-8"),
        "base": snapshot_text,
        "default_index": settings.default_url,
        "overrides": sorted(settings.overrides),
        "backend": backend,
        **(extra or {}),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def constraint_lines(profile: Profile, snapshot: BaseSnapshot) -> list[str]:
    """Base pins (rule 1) then the profile's own constraints (rule 2)."""
    allowed = set(profile.policy.allow_shadow)
    lines = [
        f"{name}=={version}"
        for name, version in sorted(snapshot.packages.items())
        if name not in allowed
    ]
    return lines + list(profile.policy.constraints)


def project_toml(
    profile: Profile, indexes: tuple[Index, ...], requirements: tuple[str, ...] | None = None
) -> str:
    """A throwaway pyproject: uv pins a package to one index only through [tool.uv.sources]."""
    requirements = profile.heavy if requirements is None else requirements
    lines = [
        "[project]",
        f'name = "{_PROJECT_NAME}"',
        'version = "0"',
        f'requires-python = ">={profile.target.python}"',
        "dependencies = [",
        *[f"    {json.dumps(r)}," for r in requirements],
        "]",
        "",
    ]
    for index in indexes:
        lines += [
            "[[tool.uv.index]]",
            f"name = {json.dumps(index.name)}",
            f"url = {json.dumps(index.url)}",
            "explicit = true",
            "",
        ]
    if indexes:
        lines.append("[tool.uv.sources]")
        for index in indexes:
            for package in index.packages:
                lines.append(f"{json.dumps(package)} = {{ index = {json.dumps(index.name)} }}")
    return "\n".join(lines) + "\n"


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
                "(profile)" if name == _PROJECT_NAME else name for name in package.required_by
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


def explain_conflict(
    tool_output: str,
    profile: Profile,
    snapshot: BaseSnapshot,
    *,
    set_name: str = "heavy",
    provided: Mapping[str, str] | None = None,
) -> str:
    """Rule 6: the resolver's own explanation plus which of the clashing names the base pins."""
    text = tool_output.strip()
    mentioned = {
        canonicalize_name(word)
        for word in re.findall(r"\b([A-Za-z0-9][A-Za-z0-9._-]*)(?=[<>=!~ ]|\b)", text)
    }
    notes = []
    allow = set(profile.policy.allow_shadow)
    for name in sorted(mentioned):
        version = snapshot.version_of(name)
        if version is not None and name not in allow:
            notes.append(
                f"  - {name}=={version} is pinned by the base image"
                f" ({snapshot.path.name if snapshot.path else 'base snapshot'})"
            )
    for name, version in sorted((provided or {}).items()):
        if name in mentioned:
            notes.append(f"  - {name}=={version} is shipped by the heavy set (its lock pins it)")
    for constraint in profile.policy.constraints:
        if canonicalize_name(Requirement(constraint).name) in mentioned:
            notes.append(f"  - {constraint} comes from [policy] constraints in {profile.path}")
    no_wheel = re.findall(
        r"(?:\b|^)([A-Za-z0-9][A-Za-z0-9._-]*)(?:==\S+)? has no usable wheels?", text
    )
    no_wheel += re.findall(
        r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:==\S+)? (?:is only available as|has no wheels with a matching)",
        text,
    )
    message = [f"cannot resolve the {set_name} set of profile {profile.name!r}:", text]
    if notes:
        message += ["Where the clashing requirements come from:", *notes]
    if no_wheel:
        names = ", ".join(sorted({canonicalize_name(n) for n in no_wheel}))
        message.append(
            f"No wheel for python {profile.target.python} on {profile.target.platform}: {names}."
            " gpubuild never builds from source; pick a version that ships such a wheel."
        )
    return "\n".join(message)


def resolve(
    profile: Profile,
    *,
    lock_path: Path | None = None,
    settings: IndexSettings = IndexSettings(),
    backend: str | None = None,
    requirements: tuple[str, ...] | None = None,
    provided: Mapping[str, str] | None = None,
    set_name: str = "heavy",
) -> ResolveResult:
    """Resolve the profile's heavy set, or `requirements` under the same rules, into a lock.

    `requirements` (default: [heavy] requirements) and `provided` (canonical name -> version of
    what another lock already ships, such as the heavy set when the light set is resolved) let
    one set be resolved on top of another: provided versions are hard constraints, and
    provided names are left out of the shipped set and listed with the base-provided ones, so
    the second set never repeats the first at another version. `set_name` names the set in
    messages. `backend` None keeps the backend of an existing lock (uv for a new one), so that
    pack or publish-cache never re-resolve a pip-tools lock with uv behind the user's back.
    """
    lock_path = lock_path or default_lock_path(profile)
    if backend is None:
        backend = _existing_backend(lock_path)
    if backend not in BACKENDS:
        raise BadInputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    snapshot_text = profile.target.base_packages.read_text(encoding="utf-8")
    snapshot = read_snapshot(profile.target.base_packages)
    indexes = effective_indexes(profile, settings)
    provided = dict(provided or {})
    extra_constraints = tuple(f"{name}=={version}" for name, version in sorted(provided.items()))
    extra: dict[str, object] | None = None
    if requirements is not None or provided:
        extra = {"requirements": list(requirements or profile.heavy), "provided": extra_constraints}
    digest = inputs_digest(profile, snapshot_text, settings, backend, extra)
    if lock_path.is_file():
        try:
            existing = read_lock(lock_path)
        except BadInputError:
            existing = None
        if existing is not None and existing.inputs == digest:
            return ResolveResult(existing, lock_path, rewritten=False)
    job = _Job(requirements or profile.heavy, extra_constraints, set_name, provided)
    if backend == "uv":
        compiled, backend_label = _compile_with_uv(profile, snapshot, indexes, settings, job)
    else:
        compiled, backend_label = _compile_with_pip_tools(profile, snapshot, indexes, settings, job)
    # What the other set ships counts as provided, exactly like the base image's packages.
    underneath = BaseSnapshot(snapshot.path, {**snapshot.packages, **provided})
    shipped, pinned, excluded, shadowed = partition(
        parse_compiled(compiled), profile, underneath, indexes
    )
    warnings = tuple(
        f"{e.name} is excluded but the base snapshot does not list it; nothing will provide it"
        for e in excluded
        if snapshot.version_of(e.name) is None
    )
    lock = Lock(
        profile=profile.name,
        python=profile.target.python,
        platform=profile.target.platform,
        interpreter=profile.target.interpreter,
        install_dir=profile.target.install_dir,
        sources=sources_digest(profile),
        inputs=digest,
        backend=backend_label,
        packages=tuple(sorted(shipped, key=lambda p: p.name)),
        provided_by_base=tuple(sorted(pinned, key=lambda p: p.name)),
        excluded=tuple(sorted(excluded, key=lambda e: e.name)),
        shadowed=tuple(sorted(shadowed, key=lambda s: s.name)),
        warnings=warnings,
    )
    text = render_lock(
        lock,
        profile.target.install_dir,
        set_name=set_name,
        provided_by_other_set=frozenset(provided),
    )
    rewritten = not (lock_path.is_file() and lock_path.read_text(encoding="utf-8") == text)
    if rewritten:
        write_atomically(lock_path, text)
    return ResolveResult(lock, lock_path, rewritten)


def _existing_backend(lock_path: Path) -> str:
    try:
        label = read_lock(lock_path).backend
    except BadInputError:
        return "uv"
    return "pip-tools" if label.startswith("pip-tools") else "uv"


@dataclass(frozen=True)
class _Job:
    """What one resolution is asked for (see `resolve`)."""

    requirements: tuple[str, ...]
    extra_constraints: tuple[str, ...] = ()
    set_name: str = "heavy"
    provided: Mapping[str, str] | None = None


def _compile_with_uv(
    profile: Profile,
    snapshot: BaseSnapshot,
    indexes: tuple[Index, ...],
    settings: IndexSettings,
    job: _Job | None = None,
) -> tuple[str, str]:
    job = job or _Job(profile.heavy)
    with tempfile.TemporaryDirectory(prefix="gpubuild-resolve-") as tmp:
        work = Path(tmp)
        (work / "pyproject.toml").write_text(
            project_toml(profile, indexes, job.requirements), encoding="utf-8"
        )
        (work / "constraints.txt").write_text(
            "\n".join([*constraint_lines(profile, snapshot), *job.extra_constraints]) + "\n",
            encoding="utf-8",
        )
        args = [
            "pip",
            "compile",
            "pyproject.toml",
            "--constraint",
            "constraints.txt",
            "--python-version",
            profile.target.python,
            "--python-platform",
            profile.target.platform,
            "--no-build",
            "--generate-hashes",
            "--emit-index-annotation",
            "--no-header",
            "--no-python-downloads",
            "--quiet",
            "--output-file",
            "lock.txt",
        ]
        if settings.default_url:
            args += ["--default-index", settings.default_url]
        completed = run_uv(args, cwd=work)
        if completed.returncode != 0:
            raise _failure(completed.stderr, profile, snapshot, "uv", job)
        compiled = (work / "lock.txt").read_text(encoding="utf-8")
        # uv applies [tool.uv.sources] to direct dependencies only, so a routed package that
        # something else pulls in (torch's nvidia-* say) would come from the default index.
        # Naming it as a direct dependency routes it; the versions stay what they were.
        direct = {canonicalize_name(Requirement(r).name) for r in job.requirements}
        routed = {package for index in indexes for package in index.packages}
        pulled_in = sorted(
            p.name for p in parse_compiled(compiled) if p.name in routed and p.name not in direct
        )
        if pulled_in:
            (work / "pyproject.toml").write_text(
                project_toml(profile, indexes, (*job.requirements, *pulled_in)), encoding="utf-8"
            )
            completed = run_uv(args, cwd=work)
            if completed.returncode != 0:
                raise _failure(completed.stderr, profile, snapshot, "uv", job)
            compiled = (work / "lock.txt").read_text(encoding="utf-8")
        return compiled, uv_version()


def host_matches_target(profile: Profile) -> bool:
    """pip-compile resolves for the running interpreter only."""
    host_python = "{}.{}".format(*sys.version_info[:2])
    if host_python != profile.target.python:
        return False
    arch, _, flavour = profile.target.platform.partition("-")
    if profile.target.platform == "linux":
        arch, flavour = sysconfig.get_platform().split("-")[-1], "unknown-linux-gnu"
    if not sysconfig.get_platform().endswith(arch):
        return False
    if flavour.startswith("manylinux_"):
        from packaging.tags import sys_tags

        wanted = f"{flavour}_{arch}"
        return any(tag.platform == wanted for tag in sys_tags())
    return True


def _compile_with_pip_tools(
    profile: Profile,
    snapshot: BaseSnapshot,
    indexes: tuple[Index, ...],
    settings: IndexSettings,
    job: _Job | None = None,
) -> tuple[str, str]:
    job = job or _Job(profile.heavy)
    if not host_matches_target(profile):
        raise BackendUnavailableError(
            f"--backend pip-tools resolves only for this machine (python"
            f" {sys.version_info[0]}.{sys.version_info[1]}, {sysconfig.get_platform()}), but profile"
            f" {profile.name!r} targets python {profile.target.python} on"
            f" {profile.target.platform}; use --backend uv"
        )
    if indexes:
        raise BackendUnavailableError(
            "--backend pip-tools cannot take a package from one index only ([[index]] "
            f"{', '.join(i.name for i in indexes)}); use --backend uv"
        )
    with tempfile.TemporaryDirectory(prefix="gpubuild-resolve-") as tmp:
        work = Path(tmp)
        (work / "constraints.txt").write_text(
            "\n".join([*constraint_lines(profile, snapshot), *job.extra_constraints]) + "\n",
            encoding="utf-8",
        )
        (work / "requirements.in").write_text(
            "-c constraints.txt\n" + "\n".join(job.requirements) + "\n", encoding="utf-8"
        )
        argv = [
            *pip_compile_argv(),
            "--quiet",
            "--generate-hashes",
            "--no-header",
            "--no-emit-index-url",
            "--no-strip-extras",
            "--pip-args",
            "--only-binary=:all:",
            "--output-file",
            "lock.txt",
            "requirements.in",
        ]
        if settings.default_url:
            argv[-1:-1] = ["--index-url", settings.default_url]
        completed = run_tool(argv, cwd=work)
        if completed.returncode != 0:
            if "No module named piptools" in completed.stderr:
                raise ToolFailedError(
                    "--backend pip-tools needs pip-tools installed (pip install pip-tools)"
                )
            raise _failure(completed.stderr, profile, snapshot, "pip-compile", job)
        version = run_tool([*pip_compile_argv(), "--version"]).stdout.strip()
        return (work / "lock.txt").read_text(encoding="utf-8"), f"pip-tools {version}"


def _failure(
    stderr: str, profile: Profile, snapshot: BaseSnapshot, tool: str, job: _Job | None = None
) -> Exception:
    job = job or _Job(profile.heavy)
    stderr = scrub(stderr)
    if (
        re.search(
            r"No solution found|ResolutionImpossible|Could not find a version|conflict",
            stderr,
            re.I,
        )
        or "wheel" in stderr
    ):
        return ResolutionError(
            explain_conflict(
                stderr, profile, snapshot, set_name=job.set_name, provided=job.provided
            )
        )
    return ToolFailedError(f"{tool} failed:\n{stderr.strip()}")


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
