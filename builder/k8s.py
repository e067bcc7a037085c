"""The Kubernetes side of the initContainer: the pod snippet (initContainer, volumes, mounts,
env) for one published manifest, and validation against KubeRay's RayService CRD.
`gpubuild k8s patch` puts the snippet into a RayService file: builder/k8s_patch.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from builder.errors import BadInputError, GpubuildError
from builder.manifest import Manifest
from builder.yamltext import (
    Style,
    emit_mapping,
)

# The name the deployment guide's `kubectl logs -c install-heavy-deps` already uses.
INIT_CONTAINER_NAME = "install-heavy-deps"
REPLACEABLE_INIT_NAMES = (INIT_CONTAINER_NAME, "gpubuild-init")
PACKAGES_VOLUME = "python-packages"
SAS_VOLUME = "gpubuild-sas"
SAS_MOUNT = "/var/run/gpubuild"
SAS_KEY = "sas"
APP_DIR = "/app"
DEFAULT_IMAGE_REPOSITORY = "gpubuild-init"
_GIB = 1024**3
_MIB = 1024**2
# Room on the volume beyond the tar bytes: file-system blocks of many small files, pip caches
# nobody asked for, a user's scratch files.
_SIZE_HEADROOM = 1.25
_SIZE_EXTRA = 512 * _MIB
_CRD_FILE = "ray.io_rayservices.yaml"


class InvalidManifestError(GpubuildError):
    """A patched document or snippet that the KubeRay CRD schema rejects (a bug, not the user's)."""


# --- the snippet (pure) --------------------------------------------------------------------


def size_limit(manifest: Manifest) -> str:
    """The emptyDir sizeLimit: the unpacked size with headroom, in whole GiB."""
    raw = sum(shard.raw_bytes for shard in manifest.shards)
    return f"{max(1, math.ceil((raw * _SIZE_HEADROOM + _SIZE_EXTRA) / _GIB))}Gi"


def default_image(manifest: Manifest) -> str:
    """The init image is built per digest (the script is inside it): tag it by the digest."""
    return f"{DEFAULT_IMAGE_REPOSITORY}:{manifest.profile}-{manifest.digest[:12]}"


def init_container_spec(
    manifest: Manifest,
    *,
    image: str,
    volume: str = PACKAGES_VOLUME,
    secret: str | None = None,
) -> dict[str, Any]:
    """The initContainer that runs the init image's script into the shared volume."""
    env = [{"name": "GPUBUILD_TARGET", "value": manifest.install_dir}]
    mounts: list[dict[str, Any]] = [{"mountPath": manifest.install_dir, "name": volume}]
    if secret:
        env.append({"name": "GPUBUILD_SAS_FILE", "value": f"{SAS_MOUNT}/{SAS_KEY}"})
        mounts.append({"mountPath": SAS_MOUNT, "name": SAS_VOLUME, "readOnly": True})
    return {
        "name": INIT_CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": env,
        "volumeMounts": mounts,
        "resources": {
            "requests": {"cpu": "1", "memory": "256Mi"},
            # Several zstd streams at once use several cores; memory stays small (streams).
            "limits": {"cpu": "4", "memory": "1Gi"},
        },
    }


def _join_paths(*groups: str) -> str:
    seen: list[str] = []
    for group in groups:
        for item in group.split(":"):
            if item and item not in seen:
                seen.append(item)
    return ":".join(seen)


def worker_env(
    manifest: Manifest, existing: Mapping[str, str] | None = None, *, app_dir: str = APP_DIR
) -> list[dict[str, str]]:
    """PYTHONPATH (install dir first, then /app) and LD_LIBRARY_PATH for the Ray container.

    Values already in the container's env are kept after ours. An env var in the pod spec
    replaces the image's own ENV, so /app (the worker image's PYTHONPATH) is named again.
    """
    existing = existing or {}
    python_path = _join_paths(
        manifest.env.get("PYTHONPATH") or manifest.install_dir,
        existing.get("PYTHONPATH", "") or app_dir,
    )
    env = [{"name": "PYTHONPATH", "value": python_path}]
    libraries = _join_paths(
        manifest.env.get("LD_LIBRARY_PATH", ""), existing.get("LD_LIBRARY_PATH", "")
    )
    if libraries:
        env.append({"name": "LD_LIBRARY_PATH", "value": libraries})
    return env


# How a pod gets the heavy set (docs/design.md#stores):
#   blob          the init script downloads and unpacks the shards (any store; a SAS for Azure)
#   init-copy     an initContainer from the registry's init-copy image copies the tree into an
#                 emptyDir: pulled by the kubelet with the node's identity, cached per node
#   image-volume  the registry's image mounted read-only as a volume: no copy, no container
DELIVERIES = ("blob", "init-copy", "image-volume")


@dataclass(frozen=True)
class PodSnippet:
    """What one worker group's pod template needs: built from a manifest, applied by patch.

    `image`: the init image (blob), the init-copy image or the heavy image (image-volume),
    the last two by digest."""

    install_dir: str
    image: str
    size_limit: str
    manifest: Manifest = field(repr=False)
    secret: str | None = None
    delivery: str = "blob"

    def init_container(self, volume: str = PACKAGES_VOLUME) -> dict[str, Any] | None:
        if self.delivery == "image-volume":
            return None
        if self.delivery == "init-copy":
            return copy_container_spec(self.manifest, image=self.image, volume=volume)
        return init_container_spec(
            self.manifest, image=self.image, volume=volume, secret=self.secret
        )

    def volumes(self, volume: str = PACKAGES_VOLUME) -> list[dict[str, Any]]:
        if self.delivery == "image-volume":
            return [
                {"name": volume, "image": {"reference": self.image, "pullPolicy": "IfNotPresent"}}
            ]
        found: list[dict[str, Any]] = [{"name": volume, "emptyDir": {"sizeLimit": self.size_limit}}]
        if self.secret and self.delivery == "blob":
            found.append(
                {"name": SAS_VOLUME, "secret": {"secretName": self.secret, "defaultMode": 0o400}}
            )
        return found

    def mount(self, volume: str = PACKAGES_VOLUME) -> dict[str, Any]:
        mount: dict[str, Any] = {"mountPath": self.install_dir, "name": volume}
        if self.delivery == "image-volume":
            mount["readOnly"] = True  # an image volume is read-only whatever it says
        return mount

    def env(self, existing: Mapping[str, str] | None = None) -> list[dict[str, str]]:
        return worker_env(self.manifest, existing)


def copy_container_spec(manifest: Manifest, *, image: str, volume: str) -> dict[str, Any]:
    """The initContainer that runs the init-copy image's copy script into the shared volume."""
    return {
        "name": INIT_CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": [{"name": "GPUBUILD_TARGET", "value": manifest.install_dir}],
        "volumeMounts": [{"mountPath": manifest.install_dir, "name": volume}],
        "resources": {
            "requests": {"cpu": "500m", "memory": "128Mi"},
            "limits": {"cpu": "2", "memory": "512Mi"},
        },
    }


# REGISTRY/REPOSITORY@sha256:..., the registry a host name or a bracketed IPv6 address.
_DIGEST_REFERENCE = re.compile(
    r"(?P<registry>(?:[a-z0-9.-]+|\[[0-9a-f:.]+\])(?::[0-9]+)?)/[a-z0-9._/-]+@sha256:[0-9a-f]{64}"
)


def pod_snippet(
    manifest: Manifest,
    *,
    image: str | None = None,
    secret: str | None = None,
    delivery: str = "blob",
) -> PodSnippet:
    if delivery not in DELIVERIES:
        raise BadInputError(f"--delivery {delivery!r}: choose one of {', '.join(DELIVERIES)}")
    if secret is not None and not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", secret):
        raise BadInputError(f"--secret {secret!r} is not a Kubernetes Secret name")
    if delivery != "blob":
        found = _DIGEST_REFERENCE.fullmatch(image or "")
        if found is None:
            raise BadInputError(
                f"--delivery {delivery} names the image by digest (REGISTRY/REPOSITORY@sha256:...),"
                f" got {image!r}: publish to a registry store (oci://...) first"
            )
        registry = found.group("registry")
        if not any(mark in registry for mark in ".:[") and registry != "localhost":
            # The kubelet reads a first part without a dot or port as a Docker Hub namespace.
            raise BadInputError(
                f"--delivery {delivery}: {image!r} starts with {registry!r}, which the kubelet"
                " takes for a namespace on docker.io, not a registry: publish to a registry"
                " named by its full host name (with a dot) or with its port"
            )
        if secret is not None:
            raise BadInputError(
                f"--delivery {delivery} needs no SAS: the kubelet pulls the image with the"
                " node's identity; drop --secret"
            )
    return PodSnippet(
        install_dir=manifest.install_dir,
        image=image or default_image(manifest),
        size_limit=size_limit(manifest),
        manifest=manifest,
        secret=secret,
        delivery=delivery,
    )


def snippet_pod_spec(snippet: PodSnippet, container: str = "ray-worker") -> dict[str, Any]:
    """The snippet as a partial pod spec (what --k8s-out writes and the CRD check validates)."""
    init = snippet.init_container()
    spec: dict[str, Any] = {"initContainers": [init]} if init is not None else {}
    spec["containers"] = [
        {"name": container, "volumeMounts": [snippet.mount()], "env": snippet.env()}
    ]
    spec["volumes"] = snippet.volumes()
    return spec


def render_snippet(snippet: PodSnippet) -> str:
    """The --k8s-out file: a commented, CRD-valid partial pod template."""
    spec = snippet_pod_spec(snippet)
    validate_snippet(snippet)
    manifest = snippet.manifest
    # The blob mode's header is the one published before delivery modes existed: its output
    # stays byte-identical (tests/golden).
    what = "initContainer" if snippet.delivery == "blob" else f"{snippet.delivery} delivery"
    head = [
        f"# gpubuild {what} for profile {manifest.profile}, digest {manifest.digest}.",
        "# Merge into your GPU worker group's template.spec (or let `gpubuild k8s patch` do it):",
    ]
    if snippet.delivery == "image-volume":
        head += [
            "# the image volume, and the ray container's read-only volumeMount and env. Needs",
            "# Kubernetes with image volumes (on by default from 1.35) and a runtime with them.",
        ]
    elif snippet.delivery == "init-copy":
        head += [
            "# the initContainer, the volume, and the ray container's volumeMounts and env.",
            f"# The image {snippet.image} is the heavy set with a copier; the kubelet pulls it",
            "# with the node's identity and keeps it in the node's image cache.",
        ]
    else:
        head += [
            "# the initContainer, the volume, and the ray container's volumeMounts and env.",
            f"# The image {snippet.image} is Dockerfile.init built around the script",
            "# `gpubuild init-script` wrote for this digest.",
        ]
    if snippet.secret:
        head.append(
            f"# The SAS comes from Secret {snippet.secret}, key {SAS_KEY!r}: kubectl create secret "
            f"generic {snippet.secret} --from-file={SAS_KEY}=sas.txt"
        )
    style = Style(indent=2, seq_offset=2, quote='"')
    lines = emit_mapping(spec, 0, style)
    return "\n".join([*head, *lines]) + "\n"


# --- schema validation ---------------------------------------------------------------------


@cache
def rayservice_schema() -> dict[str, Any]:
    """The `v1` openAPIV3Schema of KubeRay's RayService CRD (cached as JSON: the YAML is 1 MB)."""
    text = (resources.files("builder") / "data" / _CRD_FILE).read_bytes()
    digest = hashlib.sha256(text).hexdigest()[:16]
    cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpubuild"
    cached = cache_dir / f"rayservice-v1-{digest}.json"
    try:
        loaded = json.loads(cached.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            return loaded
    except (OSError, ValueError):
        pass
    from ruamel.yaml import YAML

    for document in YAML(typ="safe").load_all(io.BytesIO(text)):
        for version in document["spec"]["versions"]:
            if version["name"] == "v1":
                schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
                try:
                    cache_dir.mkdir(parents=True, exist_ok=True)
                    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(schema), encoding="utf-8")
                    os.replace(tmp, cached)
                except OSError:
                    pass  # no cache: slower next time, nothing worse
                return schema
    raise AssertionError(f"{_CRD_FILE} has no v1 schema")  # pragma: no cover


def schema_errors(document: Mapping[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(rayservice_schema())
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(document)'}: {error.message}"
        for error in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    ]


def validate_ray_service(document: Mapping[str, Any], where: str) -> None:
    errors = schema_errors(document)
    if errors:
        raise InvalidManifestError(
            f"{where}: the patched RayService does not validate against the KubeRay CRD: "
            + "; ".join(errors[:5])
        )


def validate_snippet(snippet: PodSnippet) -> None:
    """The snippet inside a minimal RayService, checked against the CRD."""
    document = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "check"},
        "spec": {
            "rayClusterConfig": {
                "headGroupSpec": {
                    "rayStartParams": {},
                    "template": {"spec": {"containers": [{"name": "ray-head", "image": "x"}]}},
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "check",
                        "minReplicas": 0,
                        "maxReplicas": 1,
                        "rayStartParams": {},
                        "template": {"spec": snippet_pod_spec(snippet)},
                    }
                ],
            }
        },
    }
    errors = schema_errors(document)
    if errors:
        raise InvalidManifestError(
            "the generated snippet does not validate against the KubeRay CRD: " + "; ".join(errors)
        )
