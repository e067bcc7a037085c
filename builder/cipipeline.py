"""`gpubuild ci azure-pipelines`: an Azure Pipelines file that checks the locks, publishes the
heavy sets and hands the init snippets to the manifests repository (docs/design.md,
#in-azure-pipelines).

`plan_pipeline` turns loaded profiles and the command's options into a `PipelineSpec` (paths
relative to the repository root, store URLs checked to hold no secret); `render_azure_pipeline`
(builder/cipipeline_yaml.py) writes the YAML text from it, deterministically, with no I/O. The file is a pipeline of its own
(`azure-pipelines.gpubuild.yaml`): a repository's template pipeline (`extends: template:
project-pipelines.yml@template`, the deployment guide's) stays as it is.

What the YAML promises, and the tests check (tests/test_ci_pipeline.py): it validates against
the Azure Pipelines schema (builder/data/azure-pipelines/service-schema.json); every bash step
runs as the agent runs it; values a user chooses are `parameters`, passed to scripts through
`env:` (never pasted into script text, so a value is never read as shell); no key, SAS or token
is written in it: the store and an Azure Container Registry are reached through an `AzureCLI@2`
service connection's sign-in.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from builder.errors import BadInputError
from builder.indexes import USE_DEFAULT_INDEX, IndexSettings
from builder.profile import Profile
from builder.secrets import has_credentials, redact_url
from builder.stores.urls import AzureLocation, FileLocation, OciLocation, parse_store_url

DEFAULT_PIPELINE_FILE = "azure-pipelines.gpubuild.yaml"
BRANCHES = ("main", "dev")
REGISTRY_DELIVERIES = ("image-volume", "init-copy")
# The agent's Python for gpubuild itself (the workers' Python is the profile's target, which uv
# installs for without needing it on the agent).
AGENT_PYTHON = "3.11"
DEFAULT_VM_IMAGE = "ubuntu-24.04"
DEFAULT_CONNECTION = "gpubuild"
DEFAULT_SECRET = "gpubuild-sas"
DEFAULT_BUDGET_GB = 10.0
ARTIFACT = "gpubuild"

# Characters Azure Pipelines path filters read as wildcards, and anything a YAML scalar or a
# shell word would need escaping for beyond plain quoting: refused in repository paths.
_UNSAFE_PATH = re.compile(r"[*?\[\]!\x00-\x1f\x7f'\"`$\\]")
_SERVICE_CONNECTION = re.compile(r"^[^\x00-\x1f\x7f'\"$`\\]{1,200}$")
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_VM_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class CiProfile:
    """One profile as the pipeline names it: paths relative to the repository root."""

    name: str
    profile: str
    lock: str
    light_lock: str | None
    snapshot: str
    index_args: tuple[str, ...]  # `resolve`'s index options, the same for every command


@dataclass(frozen=True)
class PipelineSpec:
    profiles: tuple[CiProfile, ...]
    pipeline_file: str | None  # relative to the root: a change to it triggers a run too
    store: str | None  # a blob store (file:// or Azure): the init script's `blob` delivery
    registry: str | None  # an oci:// registry store: image-volume or init-copy
    registry_delivery: str
    azure: bool  # the store or the registry is Azure's: publish through AzureCLI@2
    service_connection: str
    secret: str  # the Kubernetes Secret holding the pods' read-only SAS
    code: tuple[str, ...]  # `dockerfile --code`, relative to the root
    budget_gb: float
    gpubuild_package: str  # the pip requirement that installs gpubuild
    version: str  # gpubuild's version, which the locks' inputs digest names
    vm_image: str
    command: str  # the command that regenerates the file


def plan_pipeline(
    profiles: Sequence[Profile],
    *,
    root: Path,
    output: Path,
    store: str | None,
    registry: str | None,
    registry_delivery: str,
    service_connection: str,
    secret: str,
    code: Sequence[Path],
    budget_gb: float,
    gpubuild_package: str | None,
    settings: IndexSettings,
    version: str,
    vm_image: str = DEFAULT_VM_IMAGE,
) -> PipelineSpec:
    """The pipeline for `profiles` in the repository at `root` (the agent's working folder),
    written to `output`. Refuses (exit 2) what the file could not carry safely: a path outside
    the root or with wildcard or quote characters, a store URL with credentials, a registry
    that is not `oci://`."""
    if not profiles:
        raise BadInputError("give at least one profile to publish")
    if store is None and registry is None:
        raise BadInputError(
            "give --store (az://ACCOUNT/CONTAINER/PREFIX, a blob URL or file://PATH) and/or"
            " --registry (oci://REGISTRY/REPOSITORY): where the pipeline publishes"
        )
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise BadInputError(f"two profiles named alike: {', '.join(sorted(names))}")
    # Absolute, not resolved: a profile is named by the path it was given, through any link.
    root = Path(os.path.abspath(root))
    # A file written outside the repository (to look at it first) triggers nothing itself.
    inside = Path(os.path.abspath(output)).is_relative_to(root)
    pipeline_file = _relative(output, root, "-o") if inside else None
    store_location = _location(store, "--store") if store else None
    if isinstance(store_location, OciLocation):
        raise BadInputError(f"--store {store}: a registry goes in --registry")
    registry_location = _location(registry, "--registry") if registry else None
    if registry is not None and not isinstance(registry_location, OciLocation):
        raise BadInputError(
            f"--registry {redact_url(registry)}: expected oci://REGISTRY/REPOSITORY"
        )
    if registry_delivery not in REGISTRY_DELIVERIES:
        raise BadInputError(
            f"--delivery {registry_delivery!r}: a registry is delivered by"
            f" {' or '.join(REGISTRY_DELIVERIES)}"
        )
    if not _SERVICE_CONNECTION.match(service_connection):
        raise BadInputError(f"--service-connection {service_connection!r}: not a usable name")
    if not _SECRET_NAME.match(secret) or len(secret) > 253:
        raise BadInputError(f"--secret {secret!r}: not a Kubernetes Secret name")
    if not _VM_IMAGE.match(vm_image):
        raise BadInputError(f"--vm-image {vm_image!r}: not an agent image name")
    package = gpubuild_package or f"gpubuild=={version}"
    if has_credentials(package) or any(c in package for c in "\n\r\"'`$\\|"):
        raise BadInputError(
            f"--gpubuild-package {redact_url(package)!r}: a requirement without credentials or"
            " quotes; a private feed authenticates on the agent (PipAuthenticate@1), not here"
        )
    ci_profiles = tuple(_ci_profile(p, root, settings) for p in profiles)
    azure = isinstance(store_location, AzureLocation) or (
        isinstance(registry_location, OciLocation)
        and registry_location.registry.endswith(".azurecr.io")
    )
    spec = PipelineSpec(
        profiles=ci_profiles,
        pipeline_file=pipeline_file,
        store=store,
        registry=registry,
        registry_delivery=registry_delivery,
        azure=azure,
        service_connection=service_connection,
        secret=secret,
        code=tuple(_relative(path, root, "--code") for path in code),
        budget_gb=budget_gb,
        gpubuild_package=package,
        version=version,
        vm_image=vm_image,
        command="",
    )
    return replace(spec, command=_command(spec))


def _location(url: str, option: str) -> FileLocation | AzureLocation | OciLocation:
    if has_credentials(url):
        raise BadInputError(
            f"{option} {redact_url(url)}: the URL holds credentials (a SAS, a password), which"
            " everyone who can read the repository would read in the pipeline file; the"
            " pipeline signs in through the Azure service connection instead"
        )
    if any(ord(c) < 0x20 or c in "'\"`$\\" for c in url):
        raise BadInputError(f"{option} {url!r}: quotes and control characters are not allowed")
    location = parse_store_url(url)
    if isinstance(location, FileLocation) and not url.startswith("file://"):
        raise BadInputError(f"{option} {url}: write a folder as file:///absolute/path")
    return location


def _relative(path: Path, root: Path, option: str) -> str:
    """`path` relative to the repository root, in the form the pipeline writes it."""
    absolute = Path(os.path.abspath(path))
    try:
        relative = absolute.relative_to(root)
    except ValueError:
        raise BadInputError(
            f"{option} {path}: outside the repository root {root} (run gpubuild from the"
            " root, or give --root): the agent sees the repository only"
        ) from None
    text = PurePosixPath(*relative.parts).as_posix() if relative.parts else "."
    if _UNSAFE_PATH.search(text) or text.startswith("-") or text == ".":
        raise BadInputError(
            f"{option} {path}: {text!r} holds a character a pipeline path filter or a shell"
            " word would read differently (wildcards, quotes, $, \\, control characters)"
        )
    return text


def _ci_profile(profile: Profile, root: Path, settings: IndexSettings) -> CiProfile:
    from builder.light import light_lock_path  # the light set's lock name, one definition

    lock = profile.path.with_suffix(".lock")
    snapshot = profile.snapshot.path or profile.target.base_packages
    known = {index.name for index in profile.indexes}
    index_args: list[str] = []
    if settings.default_url:
        index_args += ["--index-url", _index_url(settings.default_url)]
    for name, url in settings.overrides:
        if name in known:
            index_args += [
                "--index",
                f"{name}={url if url == USE_DEFAULT_INDEX else _index_url(url)}",
            ]
    return CiProfile(
        name=profile.name,
        profile=_relative(profile.path, root, "PROFILE"),
        lock=_relative(lock, root, "the lock"),
        light_lock=_relative(light_lock_path(lock), root, "the light lock") if profile.light else None,
        snapshot=_relative(snapshot, root, "the base snapshot"),
        index_args=tuple(index_args),
    )  # fmt: skip


def _index_url(url: str) -> str:
    if has_credentials(url) or any(c in url for c in "'\"`$\\ "):
        raise BadInputError(
            f"index URL {redact_url(url)}: the pipeline file would show its credentials; give"
            " them on the agent (uv's UV_INDEX_<NAME>_USERNAME/_PASSWORD from a secret variable)"
        )
    return url


def check_index_names(profiles: Sequence[Profile], settings: IndexSettings) -> None:
    """Every `--index NAME=...` must name an [[index]] of at least one profile."""
    known = {index.name for profile in profiles for index in profile.indexes}
    for name, _ in settings.overrides:
        if name not in known:
            raise BadInputError(
                f"--index {name}=...: no profile given has an [[index]] named {name!r}"
                f" (they have: {', '.join(sorted(known)) or 'none'})"
            )


def _command(spec: PipelineSpec) -> str:
    """The command line that writes this file again: every option that is not the default."""
    words = ["gpubuild", "ci", "azure-pipelines", *(p.profile for p in spec.profiles)]
    if spec.store:
        words += ["--store", spec.store]
    if spec.registry:
        words += ["--registry", spec.registry]
        if spec.registry_delivery != REGISTRY_DELIVERIES[0]:
            words += ["--delivery", spec.registry_delivery]
    for path in spec.code:
        words += ["--code", path]
    for option, value in sorted({a for p in spec.profiles for a in _pairs(p.index_args)}):
        words += [option, value]
    defaults = {
        "--service-connection": (spec.service_connection if spec.azure else DEFAULT_CONNECTION),
        "--secret": spec.secret if spec.store else DEFAULT_SECRET,
        "--budget-gb": number_text(spec.budget_gb),
        "--gpubuild-package": spec.gpubuild_package,
        "--vm-image": spec.vm_image,
    }
    standard = {
        "--service-connection": DEFAULT_CONNECTION,
        "--secret": DEFAULT_SECRET,
        "--budget-gb": number_text(DEFAULT_BUDGET_GB),
        "--gpubuild-package": f"gpubuild=={spec.version}",
        "--vm-image": DEFAULT_VM_IMAGE,
    }
    for option, value in defaults.items():
        if value != standard[option]:
            words += [option, value]
    words += ["-o", spec.pipeline_file or DEFAULT_PIPELINE_FILE]
    return " ".join(shlex.quote(word) for word in words)


def _pairs(args: tuple[str, ...]) -> list[tuple[str, str]]:
    return list(zip(args[::2], args[1::2], strict=True))


def number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def spec_document(spec: PipelineSpec, output: Path) -> dict[str, object]:
    """The `--json` document of `gpubuild ci azure-pipelines`."""
    return {
        "pipeline": str(output),
        "profiles": [p.profile for p in spec.profiles],
        "triggers": {"branches": list(BRANCHES)},
        "store": spec.store,
        "registry": spec.registry,
        "azure_service_connection": spec.service_connection if spec.azure else None,
        "gpubuild_package": spec.gpubuild_package,
        "command": spec.command,
    }


__all__ = [
    "AGENT_PYTHON",
    "ARTIFACT",
    "BRANCHES",
    "DEFAULT_BUDGET_GB",
    "DEFAULT_CONNECTION",
    "DEFAULT_PIPELINE_FILE",
    "DEFAULT_SECRET",
    "DEFAULT_VM_IMAGE",
    "REGISTRY_DELIVERIES",
    "CiProfile",
    "PipelineSpec",
    "check_index_names",
    "number_text",
    "plan_pipeline",
    "spec_document",
]
