"""What `gpubuild check` knows about a deployment: findings, rules, and the parsed files.

Plain dataclasses, filled by builder.checks.read and read by the rule modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ERROR = "error"


WARNING = "warning"


@dataclass(frozen=True)
class Rule:
    code: str
    severity: str
    summary: str


RULES: dict[str, Rule] = {
    rule.code: rule
    for rule in (
        Rule("GB001", ERROR, "a deployment file that cannot be parsed"),
        Rule("GB002", WARNING, "a file that may be a deployment file, skipped for its size"),
        Rule("GB101", ERROR, "Ray version differs from the rest of the deployment"),
        Rule("GB102", WARNING, "a Ray image without a version in its tag (latest, nightly)"),
        Rule("GB103", WARNING, "a ray / ray[client] requirement that is not pinned with =="),
        Rule("GB104", ERROR, "Python version differs from the rest of the Ray deployment"),
        Rule("GB201", ERROR, "LD_LIBRARY_PATH lacks library folders the shared packages need"),
        Rule("GB202", ERROR, "PYTHONPATH lacks the shared packages folder"),
        Rule("GB203", WARNING, "PYTHONPATH names /app before the shared packages folder"),
        Rule("GB301", ERROR, "HelmRelease image line without its Flux $imagepolicy marker"),
        Rule("GB302", ERROR, "Flux $imagepolicy marker that names the wrong field or policy"),
        Rule("GB401", WARNING, "initContainer pip-installs a set that gpubuild has published"),
        Rule("GB402", WARNING, "initContainer deletes protobuf/click by hand (rm -rf)"),
        Rule("GB403", WARNING, "initContainer re-installs numpy<2 by hand"),
        Rule("GB404", WARNING, "pip requirement with an unquoted < or >: the shell redirects"),
        Rule("GB405", WARNING, "SAS Secret mounted with no note on how it is rotated"),
        Rule("GB406", ERROR, "SAS written into the manifest itself"),
        Rule("GB501", ERROR, "lock or manifest ships protobuf>=5 (Ray needs protobuf<5)"),
        Rule("GB502", ERROR, "lock or manifest ships click (Ray's CLI needs its own)"),
        Rule("GB503", ERROR, "lock or manifest ships numpy>=2 (onnxruntime needs numpy<2)"),
        Rule("GB504", ERROR, "lock or manifest shadows a package of the base image"),
        Rule("GB601", ERROR, "GPU worker group without an nvidia.com/gpu limit"),
        Rule("GB602", WARNING, "GPU worker group without the nvidia.com/gpu toleration"),
        Rule("GB701", ERROR, "pipeline runs publish-cache without resolve --check before it"),
        Rule("GB702", ERROR, "pipeline's DockerFiles entry names a Dockerfile that does not exist"),
    )
}


DEFAULT_SHARED = "/shared-packages"


APP_DIR = "/app"


GPU_RESOURCE = "nvidia.com/gpu"


RAY_REPOS = {"ray", "ray-ml", "ray-llm"}


GPU_PACKAGES = {"torch", "onnxruntime-gpu"}


@dataclass(frozen=True, order=True)
class Where:
    path: str
    line: int  # 1-based

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    code: str
    message: str
    fix: str

    @property
    def severity(self) -> str:
        return RULES[self.code].severity

    def text(self) -> str:
        return f"{self.path}:{self.line}: {self.code} {self.message}\n    fix: {self.fix}"

    def document(self) -> dict[str, object]:
        return {
            "path": self.path,
            "line": self.line,
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "fix": self.fix,
        }


def finding(where: Where, code: str, message: str, fix: str) -> Finding:
    return Finding(where.path, where.line, code, message, fix)


@dataclass(frozen=True)
class EnvVar:
    name: str
    value: str | None  # None: valueFrom
    where: Where


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]
    where: Where
    pieces: tuple[tuple[str, int], ...] = ()  # the physical lines of its logical line


@dataclass(frozen=True)
class PipInstall:
    names: tuple[str, ...]  # canonical names of the requirements on the command line
    target: str | None
    upgrade: bool
    where: Where


@dataclass(frozen=True)
class SasUse:
    """How a container gets the init script's SAS (GPUBUILD_SAS or GPUBUILD_SAS_FILE)."""

    variable: str
    where: Where
    # "secret": from a Kubernetes Secret (secretKeyRef, or a file on a Secret volume);
    # "literal": the value written in the manifest; "other": a CSI volume, a ConfigMap, ...
    source: str
    secret: str | None  # the Secret's name, when from one
    rotation_note: bool  # a comment near it (or naming the Secret) says how it is renewed


@dataclass
class Container:
    name: str
    where: Where
    image: str | None = None
    image_where: Where | None = None
    env: dict[str, EnvVar] = field(default_factory=dict)
    env_where: Where | None = None
    limits: dict[str, str] = field(default_factory=dict)
    limits_where: Where | None = None
    requests: dict[str, str] = field(default_factory=dict)
    resources_where: Where | None = None
    commands: list[Command] = field(default_factory=list)
    sas: list[SasUse] = field(default_factory=list)


@dataclass
class Group:
    name: str
    head: bool
    where: Where
    name_where: Where
    ray_start_params: dict[str, str] = field(default_factory=dict)
    containers: list[Container] = field(default_factory=list)
    init_containers: list[Container] = field(default_factory=list)
    tolerations: list[tuple[str | None, str | None]] = field(default_factory=list)  # key, op
    tolerations_where: Where | None = None


@dataclass
class Cluster:
    kind: str
    name: str | None
    namespace: str | None
    where: Where
    ray_version: tuple[str, Where] | None = None
    groups: list[Group] = field(default_factory=list)


@dataclass
class Dockerfile:
    path: Path
    display: str
    froms: list[tuple[str, Where]] = field(default_factory=list)  # images, stages resolved away
    runs: list[Command] = field(default_factory=list)  # RUN instructions in shell form
    env: dict[str, tuple[str, Where]] = field(default_factory=dict)  # the final stage's ENV


@dataclass(frozen=True)
class DockerfileEntry:
    """One item of a template pipeline's `DockerFiles` parameter."""

    written: str  # the `file:` value as the pipeline has it
    candidates: tuple[Path, ...]  # where that is on disk: beside the pipeline, at the git root
    where: Where


@dataclass
class Pipeline:
    display: str
    builds: list[tuple[str, Path]] = field(default_factory=list)  # (image repository, Dockerfile)
    commands: list[Command] = field(default_factory=list)  # its scripts' commands, file order
    dockerfile_entries: list[DockerfileEntry] = field(default_factory=list)


@dataclass
class Requirements:
    path: Path
    display: str
    ray: list[tuple[str, str | None, Where]] = field(default_factory=list)  # text, ==version


@dataclass
class ImageField:
    key: str
    value: str
    where: Where
    marker: str | None  # the $imagepolicy value, e.g. "flux-system:policy:tag"


@dataclass
class HelmRelease:
    name: str | None
    display: str
    where: Where
    image_fields: list[ImageField] = field(default_factory=list)
    repository: str | None = None
    ray_service: tuple[str, str | None] | None = None  # (RayService name, namespace)


@dataclass
class ProfileFile:
    path: Path
    display: str
    profile: Any  # builder.profile.Profile
    base_image_where: Where
    python_where: Where


@dataclass
class LockFile:
    display: str
    lock: Any  # builder.lock.Lock
    lines: dict[str, int]


@dataclass
class ManifestFile:
    display: str
    manifest: Any  # builder.manifest.Manifest
    lines: dict[str, int]
    # Found through --store: used to tie init images and pip sets to a published cache, not
    # checked for what it ships (a store holds every digest ever published, deployed or not).
    from_store: bool = False


@dataclass
class Checkout:
    clusters: list[Cluster] = field(default_factory=list)
    dockerfiles: list[Dockerfile] = field(default_factory=list)
    pipelines: list[Pipeline] = field(default_factory=list)
    requirements: list[Requirements] = field(default_factory=list)
    helm_releases: list[HelmRelease] = field(default_factory=list)
    profiles: list[ProfileFile] = field(default_factory=list)
    locks: list[LockFile] = field(default_factory=list)
    manifests: list[ManifestFile] = field(default_factory=list)
    files: list[tuple[str, str]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)  # GB001, found while reading


def split_image(image: str) -> tuple[str, str | None]:
    """(repository, tag) of an image reference; a digest reference has no tag."""
    image = image.strip()
    if "@" in image:
        return image.split("@", 1)[0], None
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon + 1 :]
    return image, None


def ray_image_versions(image: str) -> tuple[bool, str | None, str | None]:
    """(is a Ray image, Ray version, Python version) from an image reference.

    `rayproject/ray:2.52.0-py310-cu121` -> (True, "2.52.0", "3.10"); ray-ml's
    `2.46.0.0e19ea-py39-cpu` carries a commit after the version; `latest` has neither.
    """
    repository, tag = split_image(image)
    if repository.rsplit("/", 1)[-1] not in RAY_REPOS:
        return False, None, None
    if not tag:
        return True, None, None
    version = re.match(r"^(\d+\.\d+\.\d+)(?=$|[.-])", tag)
    python = re.search(r"(?:^|-)py(\d)(\d{1,2})(?=$|-)", tag)
    return (
        True,
        version.group(1) if version else None,
        f"{python.group(1)}.{python.group(2)}" if python else None,
    )


def python_image_version(image: str) -> str | None:
    """`python:3.10-slim` -> "3.10"."""
    repository, tag = split_image(image)
    if repository.rsplit("/", 1)[-1] != "python" or not tag:
        return None
    match = re.match(r"^(\d+)\.(\d+)(?=$|[.-])", tag)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def path_entries(value: str | None) -> list[str]:
    return [p.rstrip("/") or "/" for p in (value or "").split(":") if p]
