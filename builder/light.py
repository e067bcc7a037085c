"""The light set: what goes into the slim worker image, and the checks that keep it light.

The light requirements are resolved with the heavy set's rules (`builder.resolve.resolve`) on
top of the heavy lock: every heavy pin is a hard constraint and heavy packages are left out,
so the image never repeats a heavy package at another version. The result is a hashed lock of
its own, `<profile>.light.lock` beside the heavy lock.

Sizes are measured, not guessed: the light lock is installed for the target by uv into a
temporary folder (wheels come from the uv cache after the first time) and each distribution's
installed bytes are summed from its RECORD. `gpubuild split` applies the same checks to an
existing requirements file.
"""

from __future__ import annotations

import fnmatch
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from builder.budget import human_size
from builder.errors import BadInputError, PolicyViolationError
from builder.indexes import IndexSettings, real_index_urls
from builder.install import materialise
from builder.lock import Lock, Pinned
from builder.profile import Profile
from builder.progress import Progress, silent
from builder.resolve import ResolveResult
from builder.tree import list_tree, read_distributions

MB = 10**6
DEFAULT_MAX_LIGHT_BYTES = 100 * MB
_DEFAULT_SETTINGS = IndexSettings()
PROFILE_MARK = "(profile)"  # how a lock's `# via` names a requirement listed in the profile

# Distributions that only make sense next to a GPU: CUDA runtimes and frameworks built on them.
# torch finds its nvidia-* libraries by relative path, so none of these may be split between
# the image and /shared-packages (docs/design.md#the-pipeline). Canonical names, fnmatch patterns.
GPU_PACKAGES = (
    "nvidia-*",
    "torch",
    "torchvision",
    "torchaudio",
    "torch-tensorrt",
    "triton",
    "onnxruntime-gpu",
    "cupy",
    "cupy-*",
    "tensorrt",
    "tensorrt-*",
    "jax-cuda*",
    "paddlepaddle-gpu",
    "tensorflow-gpu",
    "mxnet-cu*",
    "cuda-python",
    "pycuda",
    "xformers",
    "flash-attn",
    "faiss-gpu*",
    "cudf-cu*",
    "cuml-cu*",
    "cugraph-cu*",
    "rmm-cu*",
    "spconv-cu*",
    "dgl-cu*",
)
# Extras that pull CUDA wheels: jax[cuda12], tensorflow[and-cuda].
_GPU_EXTRA = re.compile(r"^(cuda.*|and-cuda|gpu)$")
# Local version labels of CUDA builds: torch 2.3.1+cu121, jaxlib 0.4.30+cuda12.cudnn89.
_GPU_LOCAL = re.compile(r"^cu(da)?\d")


@dataclass(frozen=True)
class LightPackage:
    name: str
    version: str
    bytes: int  # installed size, from RECORD
    requested_by: tuple[str, ...]  # the [light] requirements (by name) that pull it in


@dataclass(frozen=True)
class SplitFinding:
    """A distribution that belongs under [heavy], and why."""

    name: str
    version: str
    reasons: tuple[str, ...]
    requested_by: tuple[str, ...]


@dataclass(frozen=True)
class LightSet:
    lock: Lock
    lock_path: Path
    rewritten: bool
    packages: tuple[LightPackage, ...]  # what the image installs, measured
    provided_by_heavy: tuple[Pinned, ...]
    provided_by_base: tuple[Pinned, ...]

    @property
    def installed_bytes(self) -> int:
        return sum(p.bytes for p in self.packages)


# --- pure rules ---------------------------------------------------------------------------------


def gpu_reason(name: str, version: str | None = None, extras: Iterable[str] = ()) -> str | None:
    """Why a distribution (or a requirement with extras) is a CUDA/GPU package, or None."""
    canonical = canonicalize_name(name)
    for pattern in GPU_PACKAGES:
        if fnmatch.fnmatchcase(canonical, pattern):
            return "a CUDA/GPU package"
    gpu_extras = sorted(e for e in extras if _GPU_EXTRA.match(canonicalize_name(e)))
    if gpu_extras:
        return f"asks for CUDA wheels (extra [{','.join(gpu_extras)}])"
    if version:
        try:
            local = Version(version).local
        except InvalidVersion:
            local = None
        if local and _GPU_LOCAL.match(local):
            return f"a CUDA build ({version})"
    return None


def requested_by(lock: Lock, name: str) -> tuple[str, ...]:
    """The requirements listed in the profile (or file) that pull `name` in, walking `# via`."""
    parents = {p.name: p.required_by for p in lock.packages}
    found: set[str] = set()
    seen: set[str] = set()
    pending = [name]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for parent in parents.get(current, ()):
            if parent == PROFILE_MARK:
                found.add(current)
            else:
                pending.append(parent)
    return tuple(sorted(found))


def split_findings(packages: Iterable[LightPackage], max_bytes: int | None) -> list[SplitFinding]:
    """Light packages that are GPU packages or larger than `max_bytes` installed."""
    findings = []
    for package in sorted(packages, key=lambda p: p.name):
        reasons = []
        gpu = gpu_reason(package.name, package.version)
        if gpu:
            reasons.append(gpu)
        if max_bytes is not None and package.bytes > max_bytes:
            reasons.append(
                f"{package.bytes / MB:,.1f} MB installed, above the {max_bytes / MB:,.1f} MB"
                " light limit"
            )
        if reasons:
            findings.append(
                SplitFinding(package.name, package.version, tuple(reasons), package.requested_by)
            )
    return findings


def split_error(profile: Profile, findings: list[SplitFinding], where: str) -> PolicyViolationError:
    lines = []
    for finding in findings:
        via = ", ".join(finding.requested_by)
        wanted = f" (pulled in by [light] {via})" if via and via != finding.name else ""
        lines.append(f"  {finding.name}=={finding.version}: {'; '.join(finding.reasons)}{wanted}")
    return PolicyViolationError(
        f"the light set of profile {profile.name!r} holds packages that belong under [heavy]"
        f" ({where}):\n"
        + "\n".join(lines)
        + f"\nMove them (or the [light] requirements that pull them in) to [heavy] requirements"
        f" in {profile.path}: the slim image must stay small, and CUDA libraries must sit with"
        " the rest of the heavy set in /shared-packages. A size limit can be raised with"
        " --max-light-mb."
    )


def check_requirement_names(profile: Profile, requirements: Iterable[str]) -> None:
    """The cheap check first: GPU names among the [light] requirements themselves."""
    findings = []
    for text in requirements:
        requirement = Requirement(text)
        reason = gpu_reason(requirement.name, None, requirement.extras)
        if reason:
            name = canonicalize_name(requirement.name)
            findings.append(SplitFinding(name, str(requirement.specifier) or "*", (reason,), ()))
    if findings:
        raise split_error(profile, findings, "listed under [light]")


def light_lock_path(heavy_lock_path: Path) -> Path:
    """`<profile>.light.lock` beside the heavy lock `<profile>.lock`."""
    stem = heavy_lock_path.name
    stem = stem[: -len(".lock")] if stem.endswith(".lock") else stem
    return heavy_lock_path.with_name(f"{stem}.light.lock")


# --- edges: resolve, install, measure -----------------------------------------------------------


def measure(
    lock_path: Path,
    lock: Lock,
    profile: Profile,
    settings: IndexSettings,
    on_progress: Progress = silent,
) -> dict[str, int]:
    """Installed bytes of each distribution of the lock, installed for the target by uv."""
    if not lock.packages:
        return {}
    with tempfile.TemporaryDirectory(prefix="gpubuild-light-") as work:
        tree = Path(work) / "tree"
        materialise(
            lock_path,
            lock,
            tree,
            python=lock.python,
            platform=lock.platform,
            real_urls=real_index_urls(profile, settings),
            on_progress=on_progress,
        )
        listing = list_tree(tree)
        sizes = {entry.path: entry.size for entry in listing.entries}
        return {
            dist.name: sum(sizes[path] for path in dist.paths)
            for dist in read_distributions(tree, listing)
        }


def measured_packages(lock: Lock, sizes: Mapping[str, int]) -> tuple[LightPackage, ...]:
    return tuple(
        LightPackage(p.name, p.version, sizes.get(p.name, 0), requested_by(lock, p.name))
        for p in sorted(lock.packages, key=lambda p: p.name)
    )


def check_light_set(
    profile: Profile,
    resolved: ResolveResult,
    provided: Mapping[str, str],
    *,
    settings: IndexSettings = _DEFAULT_SETTINGS,
    max_bytes: int | None = DEFAULT_MAX_LIGHT_BYTES,
    on_progress: Progress = silent,
) -> LightSet:
    """Check and measure the light set's lock (resolved on top of the heavy set, whose pins are
    `provided`); PolicyViolationError when a GPU package or a big one is in it."""
    report = on_progress
    check_requirement_names(profile, profile.light)
    lock = resolved.lock
    unmeasured = tuple(
        LightPackage(p.name, p.version, 0, requested_by(lock, p.name)) for p in lock.packages
    )
    gpu = split_findings(unmeasured, None)
    if gpu:
        raise split_error(profile, gpu, f"resolved into {resolved.lock_path}")
    report(f"measuring the light set: installing {len(lock.packages)} package(s) for the target")
    sizes = measure(resolved.lock_path, lock, profile, settings, report)
    packages = measured_packages(lock, sizes)
    large = split_findings(packages, max_bytes)
    if large:
        raise split_error(profile, large, f"measured from {resolved.lock_path}")
    from_heavy = tuple(p for p in lock.provided_by_base if p.name in provided)
    from_base = tuple(p for p in lock.provided_by_base if p.name not in provided)
    return LightSet(lock, resolved.lock_path, resolved.rewritten, packages, from_heavy, from_base)


# --- gpubuild split -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitLine:
    requirement: str
    reasons: tuple[str, ...]  # empty for a light line


@dataclass(frozen=True)
class SplitProposal:
    source: Path
    heavy: tuple[SplitLine, ...]
    light: tuple[SplitLine, ...]
    packages: tuple[LightPackage, ...]  # every shipped distribution, measured
    provided_by_base: tuple[Pinned, ...]
    max_bytes: int


def read_requirements(path: Path) -> tuple[str, ...]:
    """Requirement lines of a requirements file; pip options are refused, not ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read: {exc}") from None
    requirements = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        if line.startswith("-"):
            raise BadInputError(
                f"{path}:{number}: pip option {line.split()[0]!r} is not supported by split;"
                " indexes belong in the profile ([[index]]) or --index-url"
            )
        try:
            requirement = Requirement(line)
        except InvalidRequirement as exc:
            raise BadInputError(f"{path}:{number}: {line!r} is not a requirement: {exc}") from None
        if requirement.url:
            raise BadInputError(f"{path}:{number}: direct URL requirements cannot be verified")
        requirements.append(str(requirement))
    if not requirements:
        raise BadInputError(f"{path}: no requirement found")
    return tuple(requirements)


def classify(
    requirements: tuple[str, ...], packages: tuple[LightPackage, ...], max_bytes: int
) -> tuple[tuple[SplitLine, ...], tuple[SplitLine, ...]]:
    """A requirement goes heavy when it, or anything it pulls in, is a GPU or large package."""
    findings = split_findings(packages, max_bytes)
    by_requester: dict[str, list[str]] = {}
    for finding in findings:
        for requester in finding.requested_by:
            if requester == finding.name:
                by_requester.setdefault(requester, []).extend(finding.reasons)
            else:
                by_requester.setdefault(requester, []).append(
                    f"pulls in {finding.name}=={finding.version}: {'; '.join(finding.reasons)}"
                )
    heavy: list[SplitLine] = []
    light: list[SplitLine] = []
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        reasons = list(by_requester.get(name, ()))
        extra = gpu_reason(name, None, requirement.extras)
        if extra and extra not in reasons:
            reasons.insert(0, extra)
        if reasons:
            heavy.append(SplitLine(text, tuple(reasons)))
        else:
            light.append(SplitLine(text, ()))
    return tuple(heavy), tuple(light)


def render_toml_lists(heavy: Iterable[str], light: Iterable[str]) -> str:
    import json

    def array(items: Iterable[str]) -> str:
        values = [f"    {json.dumps(item)}," for item in items]
        return "[\n" + "\n".join(values) + "\n]" if values else "[]"

    return f"[heavy]\nrequirements = {array(heavy)}\n\n[light]\nrequirements = {array(light)}\n"


def split_text(proposal: SplitProposal) -> str:
    lines = [
        f"{proposal.source}: {len(proposal.heavy)} heavy, {len(proposal.light)} light"
        f" (light limit {proposal.max_bytes / MB:,.1f} MB installed per distribution)",
        "heavy (to /shared-packages through the cache):",
    ]
    for line in proposal.heavy:
        lines.append(f"  {line.requirement}")
        lines += [f"      {reason}" for reason in line.reasons]
    lines.append("light (into the slim image):")
    lines += [f"  {line.requirement}" for line in proposal.light]
    if proposal.provided_by_base:
        lines.append(
            "provided by the base image already: "
            + ", ".join(f"{p.name}=={p.version}" for p in proposal.provided_by_base)
        )
    lines.append("installed sizes:")
    lines += [
        f"  {p.name}=={p.version}: {human_size(p.bytes)}"
        for p in sorted(proposal.packages, key=lambda p: (-p.bytes, p.name))
    ]
    return "\n".join(lines)


def split_document(proposal: SplitProposal) -> dict[str, object]:
    return {
        "source": str(proposal.source),
        "max_light_bytes": proposal.max_bytes,
        "heavy": [
            {"requirement": line.requirement, "reasons": list(line.reasons)}
            for line in proposal.heavy
        ],
        "light": [line.requirement for line in proposal.light],
        "packages": [
            {
                "name": p.name,
                "version": p.version,
                "bytes": p.bytes,
                "requested_by": list(p.requested_by),
                "gpu": gpu_reason(p.name, p.version) is not None,
            }
            for p in proposal.packages
        ],
        "provided_by_base": [
            {"name": p.name, "version": p.version} for p in proposal.provided_by_base
        ],
        "toml": render_toml_lists(
            [line.requirement for line in proposal.heavy],
            [line.requirement for line in proposal.light],
        ),
    }
