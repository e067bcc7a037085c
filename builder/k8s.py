"""The Kubernetes side of the initContainer: the snippet, and `k8s patch` of a RayService file.

`patch_ray_service` edits the text, not a re-dumped document (builder.yamltext says why): only
the lines that must change are rewritten, in the indentation and quoting the file already uses
at that place. The result is parsed again and compared with the intended document, and
validated against the KubeRay CRD, before it is written (atomically).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from builder.errors import BadInputError, GpubuildError
from builder.files import write_atomically
from builder.manifest import Manifest
from builder.yamltext import (
    QUOTED,
    Style,
    TextEditor,
    emit_mapping,
    load_documents,
    plain,
    unified_diff,
    upsert_plain,
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


@dataclass(frozen=True)
class PodSnippet:
    """What one worker group's pod template needs: built from a manifest, applied by patch."""

    install_dir: str
    image: str
    size_limit: str
    manifest: Manifest = field(repr=False)
    secret: str | None = None

    def init_container(self, volume: str = PACKAGES_VOLUME) -> dict[str, Any]:
        return init_container_spec(
            self.manifest, image=self.image, volume=volume, secret=self.secret
        )

    def volumes(self, volume: str = PACKAGES_VOLUME) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = [{"name": volume, "emptyDir": {"sizeLimit": self.size_limit}}]
        if self.secret:
            found.append(
                {"name": SAS_VOLUME, "secret": {"secretName": self.secret, "defaultMode": 0o400}}
            )
        return found

    def mount(self, volume: str = PACKAGES_VOLUME) -> dict[str, Any]:
        return {"mountPath": self.install_dir, "name": volume}

    def env(self, existing: Mapping[str, str] | None = None) -> list[dict[str, str]]:
        return worker_env(self.manifest, existing)


def pod_snippet(
    manifest: Manifest, *, image: str | None = None, secret: str | None = None
) -> PodSnippet:
    if secret is not None and not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", secret):
        raise BadInputError(f"--secret {secret!r} is not a Kubernetes Secret name")
    return PodSnippet(
        install_dir=manifest.install_dir,
        image=image or default_image(manifest),
        size_limit=size_limit(manifest),
        manifest=manifest,
        secret=secret,
    )


def snippet_pod_spec(snippet: PodSnippet, container: str = "ray-worker") -> dict[str, Any]:
    """The snippet as a partial pod spec (what --k8s-out writes and the CRD check validates)."""
    return {
        "initContainers": [snippet.init_container()],
        "containers": [
            {"name": container, "volumeMounts": [snippet.mount()], "env": snippet.env()}
        ],
        "volumes": snippet.volumes(),
    }


def render_snippet(snippet: PodSnippet) -> str:
    """The --k8s-out file: a commented, CRD-valid partial pod template."""
    spec = snippet_pod_spec(snippet)
    validate_snippet(snippet)
    manifest = snippet.manifest
    head = [
        f"# gpubuild initContainer for profile {manifest.profile}, digest {manifest.digest}.",
        "# Merge into your GPU worker group's template.spec (or let `gpubuild k8s patch` do it):",
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
    text = resources.files("builder").joinpath("data", _CRD_FILE).read_bytes()
    digest = hashlib.sha256(text).hexdigest()[:16]
    cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpubuild"
    cached = cache_dir / f"rayservice-v1-{digest}.json"
    try:
        return json.loads(cached.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    from ruamel.yaml import YAML

    for document in YAML(typ="safe").load_all(io.BytesIO(text)):
        for version in document["spec"]["versions"]:
            if version["name"] == "v1":
                schema = version["schema"]["openAPIV3Schema"]
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


# --- the patch --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchResult:
    path: Path
    text: str  # the new text
    diff: str  # unified diff, old -> new
    changed: bool
    warnings: tuple[str, ...] = ()


def _worker_groups(documents: list[Any]) -> Iterator[tuple[int, Any, list[Any]]]:
    """(document index, the document, its workerGroupSpecs) for each RayService / RayCluster."""
    for number, document in enumerate(documents):
        if not isinstance(document, Mapping):
            continue
        spec = document.get("spec")
        if not isinstance(spec, Mapping):
            continue
        if document.get("kind") == "RayService":
            cluster = spec.get("rayClusterConfig")
            groups = cluster.get("workerGroupSpecs") if isinstance(cluster, Mapping) else None
        elif document.get("kind") == "RayCluster":
            groups = spec.get("workerGroupSpecs")
        else:
            continue
        if isinstance(groups, list):
            yield number, document, groups


def _find_group(documents: list[Any], group: str, where: str) -> tuple[int, Any]:
    found = []
    names = []
    for number, _document, groups in _worker_groups(documents):
        for spec in groups:
            if isinstance(spec, Mapping):
                names.append(str(spec.get("groupName")))
                if spec.get("groupName") == group:
                    found.append((number, spec))
    if not names:
        raise BadInputError(f"{where}: holds no RayService (or RayCluster) with workerGroupSpecs")
    if not found:
        raise BadInputError(
            f"{where}: no worker group named {group!r}; its groups are: {', '.join(names)}"
        )
    if len(found) > 1:
        raise BadInputError(f"{where}: {len(found)} worker groups are named {group!r}; rename one")
    return found[0]


def _pod_spec(group_spec: Any, where: str, group: str) -> Any:
    template = group_spec.get("template")
    spec = template.get("spec") if isinstance(template, Mapping) else None
    containers = spec.get("containers") if isinstance(spec, Mapping) else None
    if not isinstance(containers, list) or not containers or not isinstance(containers[0], Mapping):
        raise BadInputError(f"{where}: worker group {group!r} has no template.spec.containers")
    for key in ("initContainers", "volumes"):
        if key in spec and not isinstance(spec[key], list):
            raise BadInputError(f"{where}: {group!r} template.spec.{key} is not a list")
    for key in ("env", "volumeMounts"):
        if key in containers[0] and not isinstance(containers[0][key], list):
            raise BadInputError(f"{where}: {group!r} container {key} is not a list")
    return spec


def _env_values(container: Mapping[str, Any]) -> dict[str, str]:
    values = {}
    for item in container.get("env") or []:
        if isinstance(item, Mapping) and isinstance(item.get("value"), str):
            values[str(item["name"])] = str(item["value"])
    return values


@dataclass(frozen=True)
class _Plan:
    """Every list change for one pod spec; applied to the text and to plain data alike."""

    init: list[tuple[dict[str, Any], Any]]
    volumes: list[tuple[dict[str, Any], Any]]
    mounts: list[tuple[dict[str, Any], Any]]
    env: list[tuple[dict[str, Any], Any]]
    quote_env: bool

    def applyplain(self, pod: dict[str, Any]) -> dict[str, Any]:
        pod = copy.deepcopy(pod)
        pod["initContainers"] = upsert_plain(pod.get("initContainers") or [], self.init, front=True)
        pod["volumes"] = upsert_plain(pod.get("volumes") or [], self.volumes)
        main = pod["containers"][0]
        if self.mounts:
            main["volumeMounts"] = upsert_plain(main.get("volumeMounts") or [], self.mounts)
        main["env"] = upsert_plain(main.get("env") or [], self.env)
        return pod

    def apply_text(self, editor: TextEditor, pod: Any) -> None:
        editor.upsert_items(pod, "initContainers", self.init, before_key="containers", front=True)
        editor.upsert_items(pod, "volumes", self.volumes)
        main = pod["containers"][0]
        if self.mounts:
            editor.upsert_items(main, "volumeMounts", self.mounts)
        quoted = frozenset({"value"}) if self.quote_env else frozenset()
        editor.upsert_items(main, "env", self.env, always_quote=quoted)


def _volume_item(existing: Mapping[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """Keep a user's volume of another kind (a PVC suits the script too) or a larger sizeLimit."""
    found = plain(existing)
    if "emptyDir" not in wanted:
        return wanted
    if "emptyDir" not in found:
        return found
    current = (found.get("emptyDir") or {}).get("sizeLimit")
    if current is not None and parse_quantity(str(current)) >= parse_quantity(
        wanted["emptyDir"]["sizeLimit"]
    ):
        return found
    merged = dict(found)
    merged["emptyDir"] = {
        **(found.get("emptyDir") or {}),
        "sizeLimit": wanted["emptyDir"]["sizeLimit"],
    }
    return merged


_QUANTITY = re.compile(r"^([0-9.]+)([KMGTPE]i?|[mk]?)$")
_UNITS = {
    "": 1,
    "m": 0.001,
    "k": 1e3,
    "K": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def parse_quantity(text: str) -> float:
    """A Kubernetes quantity ("10Gi", "500M", "1e9") in bytes; unknown forms count as 0."""
    text = text.strip()
    match = _QUANTITY.match(text)
    if match:
        return float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return float(text)
    except ValueError:
        return 0.0


def patch_text(
    text: str, group: str, snippet: PodSnippet, where: str = "input"
) -> tuple[str, tuple[str, ...]]:
    """The text with `snippet` applied to worker group `group`; pure. Returns (text, warnings)."""
    documents = load_documents(text, where)
    number, group_spec = _find_group(documents, group, where)
    pod = _pod_spec(group_spec, where, group)
    main = pod["containers"][0]
    warnings: list[str] = []

    volume = PACKAGES_VOLUME
    for mount in main.get("volumeMounts") or []:
        if isinstance(mount, Mapping) and mount.get("mountPath") == snippet.install_dir:
            volume = str(mount.get("name"))
    init = snippet.init_container(volume)
    volumes = snippet.volumes(volume)

    for existing in pod.get("initContainers") or []:
        if isinstance(existing, Mapping) and existing.get("name") in REPLACEABLE_INIT_NAMES:
            other = [
                str(m.get("name"))
                for m in existing.get("volumeMounts") or []
                if isinstance(m, Mapping) and m.get("name") not in (volume, SAS_VOLUME)
            ]
            if other:
                warnings.append(
                    f"replaced initContainer {existing.get('name')!r}, which also used volume(s) "
                    f"{', '.join(other)} (model downloads?): move that work to an initContainer "
                    "of its own"
                )

    final_volumes = []
    for wanted in volumes:
        existing_item = next(
            (
                v
                for v in pod.get("volumes") or []
                if isinstance(v, Mapping) and v.get("name") == wanted["name"]
            ),
            None,
        )
        if existing_item is None:
            final_volumes.append(wanted)
            continue
        if "emptyDir" in wanted and "emptyDir" not in plain(existing_item):
            warnings.append(
                f"kept volume {wanted['name']!r} as it is (not an emptyDir); the script works on "
                "any volume, and a persistent one skips the download when the digest is there"
            )
        final_volumes.append(_volume_item(existing_item, wanted))
    has_mount = any(
        isinstance(m, Mapping) and m.get("mountPath") == snippet.install_dir
        for m in main.get("volumeMounts") or []
    )
    # Files that quote every env value get ours quoted too.
    values = [e["value"] for e in main.get("env") or [] if isinstance(e, Mapping) and "value" in e]
    plan = _Plan(
        init=[(init, lambda c: c.get("name") in REPLACEABLE_INIT_NAMES)],
        volumes=[(v, lambda e, n=v["name"]: e.get("name") == n) for v in final_volumes],
        mounts=[] if has_mount else [(snippet.mount(volume), lambda m: False)],
        env=[
            (item, lambda e, n=item["name"]: e.get("name") == n)
            for item in snippet.env(_env_values(main))
        ],
        quote_env=bool(values) and all(isinstance(v, QUOTED) for v in values),
    )
    editor = TextEditor(text, [main, pod, *pod["containers"]])
    plan.apply_text(editor, pod)
    new_text = editor.apply()
    _check_result(documents, new_text, number, group, where, plan.applyplain(plain(pod)))
    return new_text, tuple(warnings)


def _check_result(
    documents: list[Any], new_text: str, number: int, group: str, where: str, expected_pod: Any
) -> None:
    """The new text must parse to the old documents with only the pod spec changed, as planned."""
    new_documents = load_documents(new_text, f"{where} (patched)")
    if len(new_documents) != len(documents):
        raise AssertionError("the patch changed the number of documents")
    for index, (old, new) in enumerate(zip(documents, new_documents, strict=True)):
        old_plain, new_plain = plain(old), plain(new)
        if index != number:
            if old_plain != new_plain:
                raise AssertionError(f"the patch changed document {index}")
            continue
        _, _, groups = next(_worker_groups([new]))
        new_group = next(
            g for g in groups if isinstance(g, Mapping) and g.get("groupName") == group
        )
        if plain(new_group["template"]["spec"]) != expected_pod:
            raise AssertionError("the patched pod spec is not the planned one")
        validate_ray_service(new_plain, where)


def patch_ray_service(
    path: Path, group: str, snippet: PodSnippet, *, write: bool = True
) -> PatchResult:
    """Insert or update the initContainer, volume, mount and env of `group` in the file at `path`."""
    validate_snippet(snippet)
    try:
        old = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: cannot read: {exc}") from None
    new, warnings = patch_text(old, group, snippet, str(path))
    changed = new != old
    if changed and write:
        write_atomically(path, new)
    return PatchResult(path, new, unified_diff(old, new, path.name), changed, warnings)
