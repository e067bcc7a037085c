"""The lock: a hashed requirements file plus the resolution report in its header.

`pip install --no-deps --require-hashes -r LOCK` and `uv pip install --require-hashes` accept it.
The header's `# gpubuild:` line holds the report as JSON so that a no-op re-run can print it
without resolving again.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from builder.errors import BadInputError, FormatError
from builder.fields import PACKAGE_NAME, PROFILE_NAME, Fields, install_dir_problem
from builder.profile import Profile, prune_pattern_problem

# 2: the target's interpreter and install folder are part of the lock (and of the digest).
# 3: `sources`, the sha256 of the profile and base snapshot the lock was resolved from.
LOCK_FORMAT = 3
ARTIFACT_FORMAT = 1
_HEADER_KEY = "# gpubuild: "
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(?P<version>[^\s;\\]+)")
_HASH = re.compile(r"--hash=(?P<hash>sha256:[0-9a-f]{64})")


@dataclass(frozen=True)
class LockedPackage:
    name: str
    version: str
    hashes: tuple[str, ...]
    index_url: str | None = None
    required_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class Excluded:
    name: str
    version: str
    required_by: tuple[str, ...]


@dataclass(frozen=True)
class Pinned:
    name: str
    version: str


@dataclass(frozen=True)
class Shadowed:
    name: str
    version: str
    base_version: str


@dataclass(frozen=True)
class Lock:
    profile: str
    python: str
    platform: str
    inputs: str
    backend: str
    packages: tuple[LockedPackage, ...]
    # Shebangs and PYTHONPATH are written into the artifact, so they decide its digest too.
    interpreter: str = ""
    install_dir: str = ""
    # sha256 of the profile file and base snapshot it was resolved from: a stale lock is seen
    # without resolving again (the index settings of that run are not known later).
    sources: str = ""
    provided_by_base: tuple[Pinned, ...] = ()
    excluded: tuple[Excluded, ...] = ()
    shadowed: tuple[Shadowed, ...] = ()
    warnings: tuple[str, ...] = field(default=())
    # [policy] prune, presets expanded: the files pack removes, so part of the digest.
    prune: tuple[str, ...] = ()

    def staleness(self, profile: Profile, inputs: str | None = None) -> tuple[str, ...]:
        """Why this lock is not current for `profile` (empty: it is): the one freshness rule.

        `sources` tells an edited profile or snapshot apart without resolving again; `inputs`,
        when the caller knows this run's (index settings, backend, gpubuild version), also
        tells those apart (rule 7)."""
        reasons = list(self.target_changes(profile))
        if self.sources != profile.sources:
            reasons.append(f"{profile.path.name} or its base snapshot changed since it was written")
        if inputs is not None and not reasons and self.inputs != inputs:
            reasons.append("the index settings, the resolver or gpubuild's version changed")
        return tuple(reasons)

    def target_changes(self, profile: Profile) -> tuple[str, ...]:
        """Why this lock is for another profile or target than `profile`'s (empty: it is not)."""
        target = profile.target
        reasons = []
        if self.profile != profile.name:
            reasons.append(f"it is for profile {self.profile!r}, not {profile.name!r}")
        if (self.python, self.platform) != (target.python, target.platform):
            reasons.append(
                f"it is for python {self.python} on {self.platform}, the profile targets python"
                f" {target.python} on {target.platform}"
            )
        if (self.interpreter, self.install_dir) != (target.interpreter, target.install_dir):
            reasons.append("the profile's interpreter or install folder changed")
        return tuple(reasons)

    def body(self) -> str:
        """The installable part: what the artifact digest covers."""
        lines: list[str] = []
        for package in sorted(self.packages, key=lambda p: p.name):
            lines.append(f"{package.name}=={package.version} \\")
            hashes = sorted(package.hashes)
            for number, digest in enumerate(hashes):
                tail = " \\" if number < len(hashes) - 1 else ""
                lines.append(f"    --hash={digest}{tail}")
            if package.required_by:
                lines.append(f"    # via {', '.join(package.required_by)}")
            if package.index_url:
                lines.append(f"    # index: {package.index_url}")
        return "\n".join(lines) + "\n"

    def digest(self) -> str:
        """Hash of what decides the artifact: lock body, target and format (docs/design.md#lock)."""
        decisive: dict[str, object] = {
            "format": ARTIFACT_FORMAT,
            "python": self.python,
            "platform": self.platform,
            "interpreter": self.interpreter,
            "install_dir": self.install_dir,
            "lock": self.body(),
        }
        if self.prune:  # only when used: every digest published before pruning stays valid
            decisive["prune"] = list(self.prune)
        material = json.dumps(decisive, sort_keys=True)
        return hashlib.sha256(material.encode()).hexdigest()


def render_lock(
    lock: Lock,
    install_dir: str,
    *,
    set_name: str = "heavy",
    provided_by_other_set: frozenset[str] = frozenset(),
) -> str:
    """The lock file's text. A set resolved on top of another (the light set on the heavy one)
    lists what that other set provides apart from what the base image provides."""
    report = {
        "format": LOCK_FORMAT,
        "profile": lock.profile,
        "python": lock.python,
        "platform": lock.platform,
        "interpreter": lock.interpreter,
        "install_dir": lock.install_dir,
        "sources": lock.sources,
        "inputs": lock.inputs,
        "backend": lock.backend,
        "provided_by_base": [asdict(p) for p in lock.provided_by_base],
        "excluded": [asdict(e) for e in lock.excluded],
        "shadowed": [asdict(s) for s in lock.shadowed],
        "warnings": list(lock.warnings),
    }
    if lock.prune:
        report["prune"] = list(lock.prune)
    if set_name == "heavy":
        install_line = f"# Install: pip install --no-deps --require-hashes --target {install_dir} -r <this file>"
    else:
        install_line = f"# Install (the {set_name} set, into the image): pip install --no-deps --require-hashes -r <this file>"
    from_base = [p for p in lock.provided_by_base if p.name not in provided_by_other_set]
    from_other = [p for p in lock.provided_by_base if p.name in provided_by_other_set]
    other_line = (
        [
            "# Provided by the heavy set (not shipped): "
            + (", ".join(f"{p.name}=={p.version}" for p in from_other) or "none")
        ]
        if set_name != "heavy"
        else []
    )
    header = [
        f"# Lock for profile {lock.profile!r}, written by gpubuild resolve; do not edit.",
        f"# Target: python {lock.python} on {lock.platform}. Digest: {lock.digest()}",
        install_line,
        "# Provided by the base image (not shipped): "
        + (", ".join(f"{p.name}=={p.version}" for p in from_base) or "none"),
        *other_line,
        "# Excluded by policy (the base provides them): "
        + (
            ", ".join(f"{e.name} (wanted by {', '.join(e.required_by)})" for e in lock.excluded)
            or "none"
        ),
        _HEADER_KEY + json.dumps(report, sort_keys=True),
        "",
    ]
    return "\n".join(header) + lock.body()


_VERSION_TEXT = re.compile(r"^[A-Za-z0-9.+!_-]{1,64}$")
_HEADER_FIELDS = {
    "format", "profile", "python", "platform", "interpreter", "install_dir", "sources",
    "inputs", "backend", "provided_by_base", "excluded", "shadowed", "warnings", "prune",
}  # fmt: skip


def read_lock(path: Path) -> Lock:
    """The one reader of locks: every header field checked; FormatError (exit 2) naming the
    file and the field otherwise."""
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: cannot read lock: {exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(path, None, f"not UTF-8 text (byte {exc.start}); resolve again") from None
    return parse_lock(text, path)


def parse_lock(text: str, where: object) -> Lock:
    document: object = None
    for line in text.splitlines():
        if line.startswith(_HEADER_KEY):
            try:
                document = json.loads(line[len(_HEADER_KEY) :])
            except (ValueError, RecursionError):
                raise FormatError(
                    where, "header", "damaged gpubuild header; resolve again"
                ) from None
            break
    if document is None:
        raise FormatError(
            where, None, f"not a gpubuild lock (no {_HEADER_KEY.strip()} line); resolve"
        )
    report = Fields(document, str(where), "header")
    version = report.get("format")
    if version != LOCK_FORMAT or isinstance(version, bool):
        raise FormatError(
            where, "header.format", f"{version!r} is not lock format {LOCK_FORMAT}; resolve again"
        )
    install_dir = report.string("install_dir")
    problem = install_dir_problem(install_dir)
    if problem:
        raise report.fail("install_dir", problem)
    report.only(_HEADER_FIELDS)
    try:
        packages = tuple(parse_compiled(text))
    except (ValueError, TypeError) as exc:
        raise FormatError(where, None, f"unreadable pins ({exc}); resolve again") from None
    for package in packages:
        if not package.hashes or not _VERSION_TEXT.match(package.version):
            raise FormatError(
                where,
                f"pin {package.name}",
                "has no --hash=sha256:... or no version; resolve again (pip and uv install"
                " a lock only with every hash)",
            )
    return Lock(
        profile=report.string("profile", pattern=PROFILE_NAME),
        python=report.string("python"),
        platform=report.string("platform"),
        interpreter=report.string("interpreter"),
        install_dir=install_dir,
        sources=report.string("sources", required=False),
        inputs=report.string("inputs"),
        backend=report.string("backend"),
        packages=packages,
        provided_by_base=tuple(
            Pinned(_name(f, "name"), _version(f, "version"))
            for f in report.objects("provided_by_base")
        ),
        excluded=tuple(
            Excluded(
                _name(f, "name"),
                _version(f, "version"),
                tuple(f.strings("required_by")),
            )
            for f in report.objects("excluded")
        ),
        shadowed=tuple(
            Shadowed(_name(f, "name"), _version(f, "version"), _version(f, "base_version"))
            for f in report.objects("shadowed")
        ),
        warnings=tuple(report.strings("warnings", default=[])),
        prune=_prune(report),
    )


def _prune(report: Fields) -> tuple[str, ...]:
    patterns = report.strings("prune", default=[])
    for number, pattern in enumerate(patterns):
        problem = prune_pattern_problem(pattern, presets=False)
        if problem:
            raise report.fail(f"prune[{number}]", f"{pattern[:80]!r} {problem}")
    return tuple(patterns)


def _name(fields: Fields, key: str) -> str:
    return fields.string(key, pattern=PACKAGE_NAME)


def _version(fields: Fields, key: str) -> str:
    return fields.string(key, pattern=_VERSION_TEXT)


@dataclass
class _PinBeingRead:
    name: str
    version: str
    hashes: list[str]
    index: str | None = None
    via: list[str] = field(default_factory=list)

    def package(self) -> LockedPackage:
        return LockedPackage(
            self.name, self.version, tuple(self.hashes), self.index, tuple(self.via)
        )


def parse_compiled(text: str) -> list[LockedPackage]:
    """Parse a compiled requirements file (uv's, pip-compile's, or ours) into pinned packages.

    Understands `--hash` continuation lines, `# via` annotations in their one-line and multi-line
    forms, uv's `# from URL` index annotation and our `# index: URL`.
    """
    packages: list[LockedPackage] = []
    current: _PinBeingRead | None = None
    in_via = False
    for raw in text.splitlines():
        if not raw.strip():
            continue
        if not raw[0].isspace():
            in_via = False
            match = _PIN.match(raw)
            if raw.startswith("#") or raw.startswith("-") or not match:
                continue
            if current is not None:
                packages.append(current.package())
            current = _PinBeingRead(
                canonicalize_name(match["name"]), match["version"], _HASH.findall(raw)
            )
            continue
        if current is None:
            continue
        line = raw.strip()
        if line.startswith("--hash="):
            in_via = False
            current.hashes.extend(_HASH.findall(line))
        elif line.startswith("# via"):
            rest = line[len("# via") :].strip()
            in_via = not rest
            if rest:
                current.via.extend(_via_names(rest))
        elif line.startswith("# from ") or line.startswith("# index: "):
            in_via = False
            current.index = line.split(" ", 2)[2].strip()
        elif in_via and line.startswith("#"):
            current.via.extend(_via_names(line.lstrip("#").strip()))
    if current is not None:
        packages.append(current.package())
    return packages


def _via_names(text: str) -> list[str]:
    names = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("-c "):
            continue  # a constraint narrows versions; it does not want the package
        if part.startswith("-r "):
            names.append("(profile)")
        else:
            names.append(canonicalize_name(part.split()[0]))
    return names


def source_changes(
    lock: Lock,
    profile: Profile,
    requirements: tuple[str, ...],
    provided: Mapping[str, str] | None = None,
) -> tuple[str, ...]:
    """What in the profile or its base snapshot no longer fits `lock`, in words.

    The lock records one sha256 over both files (`sources`), not the files, so the old text
    cannot be compared: this reads the differences off what the lock does record (its pins,
    what the profile asked for, what the base provided, excluded and shadowed). An edit that
    leaves all of that true (a comment, a removed constraint) shows as no reason here.
    `requirements` are the set's own (the [heavy] list for the heavy lock); `provided` what
    the set was resolved on top of besides the base (the heavy pins, for the light lock).
    """
    provided = provided or {}
    snapshot = profile.snapshot
    where = snapshot.path.name if snapshot.path else "the base snapshot"
    edited = f"profile edited ({profile.path.name})"
    changed = f"base snapshot changed ({where})"
    locked: dict[str, str] = {p.name: p.version for p in lock.packages}
    locked.update({p.name: p.version for p in lock.provided_by_base})
    locked.update({e.name: e.version for e in lock.excluded})
    reasons: list[str] = []
    asked: set[str] = set()
    for text in requirements:
        requirement = _requirement(text)
        if requirement is None:
            continue
        name = canonicalize_name(requirement.name)
        asked.add(name)
        if requirement.marker is not None:
            continue  # whether it applies to the target is the resolver's call
        version = locked.get(name)
        if version is None:
            reasons.append(f"{edited}: it asks for {text}, which the lock does not have")
        elif not requirement.specifier.contains(version, prereleases=True):
            reasons.append(f"{edited}: it asks for {text}, the lock has {name} {version}")
    wanted_by_profile = [
        (p.name, p.version) for p in lock.packages if "(profile)" in p.required_by
    ] + [(e.name, e.version) for e in lock.excluded if "(profile)" in e.required_by]
    for wanted, pinned_at in wanted_by_profile:
        if wanted not in asked:
            reasons.append(
                f"{edited}: it no longer asks for {wanted}, which the lock has at {pinned_at}"
                " as the profile's requirement"
            )
    for text in profile.policy.constraints:
        requirement = _requirement(text)
        if requirement is None:
            continue
        name = canonicalize_name(requirement.name)
        version = locked.get(name)
        if version is not None and not requirement.specifier.contains(version, prereleases=True):
            reasons.append(f"{edited}: constraint {text} excludes the locked {name} {version}")
    exclude = set(profile.policy.exclude)
    for package in lock.packages:
        if package.name in exclude:
            reasons.append(
                f"{edited}: it excludes {package.name}, which the lock ships ({package.version})"
            )
    for excluded in lock.excluded:
        if excluded.name not in exclude:
            reasons.append(
                f"{edited}: it no longer excludes {excluded.name}, which the lock leaves out"
            )
    allow_shadow = set(profile.policy.allow_shadow)
    for shadowed in lock.shadowed:
        if shadowed.name not in allow_shadow:
            reasons.append(
                f"{edited}: allow_shadow no longer names {shadowed.name}, which the lock ships"
                f" at {shadowed.version} over the base's {shadowed.base_version}"
            )
    for pinned in lock.provided_by_base:
        if pinned.name in provided:
            continue
        now = snapshot.version_of(pinned.name)
        if now is None:
            reasons.append(
                f"{changed}: it no longer lists {pinned.name}, which the lock leaves to the base"
                f" ({pinned.version})"
            )
        elif now != pinned.version:
            reasons.append(
                f"{changed}: it lists {pinned.name} {now}, the lock leaves {pinned.name}"
                f" {pinned.version} to the base"
            )
    shadowed_base = {s.name: s.base_version for s in lock.shadowed}
    for package in lock.packages:
        now = snapshot.version_of(package.name)
        before = shadowed_base.get(package.name)
        if now is not None and now != before:
            reasons.append(
                f"{changed}: it lists {package.name} {now}, and the lock ships {package.name}"
                f" {package.version}"
                + (f" over the base's {before}" if before else " as if the base lacked it")
            )
        elif now is None and before is not None:
            reasons.append(
                f"{changed}: it no longer lists {package.name}, which the lock ships over the"
                f" base's {before}"
            )
    return tuple(reasons)


def _requirement(text: str) -> Requirement | None:
    try:
        return Requirement(text)
    except InvalidRequirement:
        return None  # the profile reader refuses these; nothing to compare
