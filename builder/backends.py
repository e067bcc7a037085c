"""The resolver backends: uv (the default) and pip-compile, run on a throwaway project.

Each gets the requirements of a `Job`, the base image's pins and the profile's constraints as
constraints (rules 1-2), wheels only (rule 3), and routed packages through uv's
`[tool.uv.sources]` (rule 4); a failure is turned into the resolver's own explanation plus
where the clashing requirements come from (rule 6). See docs/design.md#resolution-rules.
"""

from __future__ import annotations

import json
import re
import sys
import sysconfig
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from builder.base import BaseSnapshot
from builder.errors import (
    BackendUnavailableError,
    BadInputError,
    ResolutionError,
    ToolFailedError,
)
from builder.indexes import IndexSettings
from builder.lock import parse_compiled
from builder.profile import Index, Profile
from builder.secrets import scrub
from builder.tools import pip_compile_argv, run_tool, run_uv, uv_env, uv_version

BACKENDS = ("uv", "pip-tools")
PROJECT_NAME = "gpubuild-resolve"


@dataclass(frozen=True)
class Job:
    """What one resolution is asked for: the profile's [heavy] set (requirements None), or
    another set under the same rules, resolved on top of what `provided` already ships (the
    light set on the heavy lock, a requirements file for `split`)."""

    requirements: tuple[str, ...] | None = None
    set_name: str = "heavy"
    provided: Mapping[str, str] = field(default_factory=dict)  # canonical name -> version
    backend: str = "uv"

    def wanted(self, profile: Profile) -> tuple[str, ...]:
        return profile.heavy if self.requirements is None else self.requirements

    @property
    def extra_constraints(self) -> tuple[str, ...]:
        return tuple(f"{name}=={version}" for name, version in sorted(self.provided.items()))


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
        f'name = "{PROJECT_NAME}"',
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
    for shipped, version in sorted((provided or {}).items()):
        if shipped in mentioned:
            notes.append(f"  - {shipped}=={version} is shipped by the heavy set (its lock pins it)")
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


def compile_with_uv(
    profile: Profile,
    snapshot: BaseSnapshot,
    indexes: tuple[Index, ...],
    settings: IndexSettings,
    job: Job,
) -> tuple[str, str]:
    with tempfile.TemporaryDirectory(prefix="gpubuild-resolve-") as tmp:
        work = Path(tmp)
        (work / "pyproject.toml").write_text(
            project_toml(profile, indexes, job.wanted(profile)), encoding="utf-8"
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
        completed = run_uv(args, cwd=work, default_index=settings.default_url)
        if completed.returncode != 0:
            raise _failure(completed.stderr, profile, snapshot, "uv", job)
        compiled = (work / "lock.txt").read_text(encoding="utf-8")
        # uv applies [tool.uv.sources] to direct dependencies only, so a routed package that
        # something else pulls in (torch's nvidia-* say) would come from the default index.
        # Naming it as a direct dependency routes it; the versions stay what they were.
        direct = {canonicalize_name(Requirement(r).name) for r in job.wanted(profile)}
        routed = {package for index in indexes for package in index.packages}
        pulled_in = sorted(
            p.name for p in parse_compiled(compiled) if p.name in routed and p.name not in direct
        )
        if pulled_in:
            (work / "pyproject.toml").write_text(
                project_toml(profile, indexes, (*job.wanted(profile), *pulled_in)), encoding="utf-8"
            )
            completed = run_uv(args, cwd=work, default_index=settings.default_url)
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


def compile_with_pip_tools(
    profile: Profile,
    snapshot: BaseSnapshot,
    indexes: tuple[Index, ...],
    settings: IndexSettings,
    job: Job,
) -> tuple[str, str]:
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
            "-c constraints.txt\n" + "\n".join(job.wanted(profile)) + "\n", encoding="utf-8"
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
        # pip reads PIP_INDEX_URL: the URL (and its credentials) stays out of argv.
        env = uv_env({"PIP_INDEX_URL": settings.default_url} if settings.default_url else None)
        completed = run_tool(argv, cwd=work, env=env)
        if completed.returncode != 0:
            if "No module named piptools" in completed.stderr:
                raise ToolFailedError(
                    "--backend pip-tools needs pip-tools installed (pip install pip-tools)"
                )
            raise _failure(completed.stderr, profile, snapshot, "pip-compile", job)
        version = run_tool([*pip_compile_argv(), "--version"]).stdout.strip()
        return (work / "lock.txt").read_text(encoding="utf-8"), f"pip-tools {version}"


def _failure(
    stderr: str, profile: Profile, snapshot: BaseSnapshot, tool: str, job: Job
) -> Exception:
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


def compile_requirements(
    profile: Profile, job: Job, indexes: tuple[Index, ...], settings: IndexSettings
) -> tuple[str, str]:
    """The backend's compiled requirements (pins with hashes) and its name and version."""
    if job.backend == "uv":
        return compile_with_uv(profile, profile.snapshot, indexes, settings, job)
    if job.backend == "pip-tools":
        return compile_with_pip_tools(profile, profile.snapshot, indexes, settings, job)
    raise BadInputError(f"unknown backend {job.backend!r}; choose one of {', '.join(BACKENDS)}")
