"""Reading the YAML of a checkout: RayService/RayCluster and HelmRelease manifests and Azure
pipeline files, parsed into builder.checks.model with every node's line.

YAML goes through ruamel.yaml's round-trip loader, which keeps every node's line (`.lc`) and
end-of-line comments (the Flux markers), by way of builder.yamlload, which bounds nesting and
aliases. A file that does not parse, or passes a bound, is a GB001 finding.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from builder.checks.model import (
    Checkout,
    Cluster,
    Command,
    Container,
    DockerfileEntry,
    EnvVar,
    Finding,
    Group,
    HelmRelease,
    ImageField,
    Pipeline,
    SasUse,
    Where,
    split_image,
)
from builder.checks.shell import commands_of, logical_lines, scalar_lines
from builder.yamlload import MAX_ALIAS_NODES, MAX_DEPTH, YamlError, YamlLimitError, load_yaml


def _key_where(node: Any, key: str, display: str) -> Where:
    try:
        return Where(display, node.lc.key(key)[0] + 1)
    except (AttributeError, KeyError, TypeError):
        return _node_where(node, display)


def _value_where(node: Any, key: str, display: str) -> Where:
    try:
        return Where(display, node.lc.value(key)[0] + 1)
    except (AttributeError, KeyError, TypeError):
        return _key_where(node, key, display)


def _item_where(node: Any, index: int, display: str) -> Where:
    try:
        return Where(display, node.lc.item(index)[0] + 1)
    except (AttributeError, KeyError, TypeError, IndexError):
        return _node_where(node, display)


def _node_where(node: Any, display: str) -> Where:
    try:
        return Where(display, node.lc.line + 1)
    except AttributeError:
        return Where(display, 1)


def _mapping(node: Any, *keys: str) -> Any:
    """node[k1][k2]... when every step is a mapping, else None."""
    for key in keys:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _list(node: Any) -> list[Any]:
    return list(node) if isinstance(node, list) else []


def _str(value: Any) -> str | None:
    if value is None or isinstance(value, (Mapping, list)):
        return None
    return str(value)


def _container_commands(node: Mapping[str, Any], raw: Sequence[str], display: str) -> list[Command]:
    commands: list[Command] = []
    for key in ("command", "args"):
        items = node.get(key)
        if not isinstance(items, list):
            continue
        for index, item in enumerate(items):
            if not isinstance(item, str):
                continue
            start = _item_where(items, index, display).line - 1
            for text, pieces in logical_lines(scalar_lines(item, start, raw)):
                commands += commands_of(text, pieces, display)
    return commands


_SYNTAX_FIX = (
    "fix the YAML (kubectl apply and Flux reject it too): "
    "`python -c 'import yaml,sys; list(yaml.safe_load_all(open(sys.argv[1])))' FILE`"
)
_LIMIT_FIX = (
    f"no deployment file needs {MAX_DEPTH} levels of nesting or {MAX_ALIAS_NODES} nodes behind "
    "aliases: write the repeated parts out, or find what generated this file"
)


def _load_yaml(text: str, display: str) -> tuple[list[Any], Finding | None]:
    """The documents, or a GB001 finding: builder.yamlload bounds nesting and aliases, so a
    hostile file is a finding too, never a RecursionError or minutes of alias expansion."""
    try:
        return load_yaml(text, display).documents, None
    except YamlError as exc:
        fix = _LIMIT_FIX if isinstance(exc, YamlLimitError) else _SYNTAX_FIX
        return [], Finding(display, exc.line, "GB001", exc.problem, fix)


def _read_container(
    node: Mapping[str, Any], where: Where, raw: Sequence[str], display: str
) -> Container:
    container = Container(name=_str(node.get("name")) or "?", where=where)
    if _str(node.get("image")):
        container.image = str(node["image"])
        container.image_where = _value_where(node, "image", display)
    env = node.get("env")
    if isinstance(env, list):
        container.env_where = _key_where(node, "env", display)
        for index, item in enumerate(env):
            name = _str(_mapping(item, "name"))
            if name is None:
                continue
            value = _str(item.get("value"))
            at = (
                _value_where(item, "value", display)
                if "value" in item
                else _item_where(env, index, display)
            )
            container.env[name] = EnvVar(name, value, at)
    resources = node.get("resources")
    if isinstance(resources, Mapping):
        container.resources_where = _key_where(node, "resources", display)
        limits = resources.get("limits")
        if isinstance(limits, Mapping):
            container.limits_where = _key_where(resources, "limits", display)
            container.limits = {str(k): str(v) for k, v in limits.items()}
        requests = resources.get("requests")
        if isinstance(requests, Mapping):
            container.requests = {str(k): str(v) for k, v in requests.items()}
    container.commands = _container_commands(node, raw, display)
    return container


def _read_group(
    node: Mapping[str, Any], head: bool, where: Where, raw: Sequence[str], display: str
) -> Group:
    name = "head" if head else (_str(node.get("groupName")) or "?")
    name_where = _key_where(node, "groupName", display) if "groupName" in node else where
    group = Group(name=name, head=head, where=where, name_where=name_where)
    params = node.get("rayStartParams")
    if isinstance(params, Mapping):
        group.ray_start_params = {str(k): str(v) for k, v in params.items()}
    pod = _mapping(node, "template", "spec")
    if not isinstance(pod, Mapping):
        return group
    volumes = {
        str(item["name"]): (item, _item_where(pod.get("volumes"), index, display).line)
        for index, item in enumerate(_list(pod.get("volumes")))
        if isinstance(item, Mapping) and _str(item.get("name"))
    }
    for key, target in (
        ("containers", group.containers),
        ("initContainers", group.init_containers),
    ):
        items = pod.get(key)
        for index, item in enumerate(_list(items)):
            if isinstance(item, Mapping):
                container = _read_container(item, _item_where(items, index, display), raw, display)
                container.sas = _sas_uses(item, container, volumes, raw, display)
                target.append(container)
    tolerations = pod.get("tolerations")
    if isinstance(tolerations, list):
        group.tolerations_where = _key_where(pod, "tolerations", display)
        for item in tolerations:
            if isinstance(item, Mapping):
                group.tolerations.append((_str(item.get("key")), _str(item.get("operator"))))
    return group


def read_cluster(document: Mapping[str, Any], raw: Sequence[str], display: str) -> Cluster:
    kind = str(document.get("kind"))
    spec = document.get("spec")
    config = _mapping(spec, "rayClusterConfig") if kind == "RayService" else spec
    cluster = Cluster(
        kind=kind,
        name=_str(_mapping(document, "metadata", "name")),
        namespace=_str(_mapping(document, "metadata", "namespace")),
        where=_node_where(document, display),
    )
    if not isinstance(config, Mapping):
        return cluster
    if _str(config.get("rayVersion")):
        cluster.ray_version = (
            str(config["rayVersion"]),
            _value_where(config, "rayVersion", display),
        )
    head = config.get("headGroupSpec")
    if isinstance(head, Mapping):
        cluster.groups.append(
            _read_group(head, True, _key_where(config, "headGroupSpec", display), raw, display)
        )
    workers = config.get("workerGroupSpecs")
    for index, item in enumerate(_list(workers)):
        if isinstance(item, Mapping):
            cluster.groups.append(
                _read_group(item, False, _item_where(workers, index, display), raw, display)
            )
    return cluster


_SAS_VARIABLES = ("GPUBUILD_SAS", "GPUBUILD_SAS_FILE")
_ROTATION_WORDS = re.compile(r"(?i)rotat|renew|expir")


def _sas_uses(
    node: Mapping[str, Any],
    container: Container,
    volumes: Mapping[str, tuple[Any, int]],
    raw: Sequence[str],
    display: str,
) -> list[SasUse]:
    """Where the container gets the init script's SAS from (builder/k8s.py mounts it as the
    file GPUBUILD_SAS_FILE names, on a Secret volume), and whether a comment says how that
    Secret is renewed: in the container's lines, the volume's, the comment lines just above
    either, or anywhere in the file when the comment names the Secret."""
    uses = []
    for item in _list(node.get("env")):
        name = _str(_mapping(item, "name"))
        if name not in _SAS_VARIABLES:
            continue
        variable = container.env[name]
        secret: str | None = None
        source = "other"
        volume_line = None
        if name == "GPUBUILD_SAS" and variable.value is not None:
            source = "literal" if variable.value.strip() else "other"
        elif name == "GPUBUILD_SAS":
            secret = _str(_mapping(item, "valueFrom", "secretKeyRef", "name"))
            source = "secret" if secret else "other"
        else:
            secret, volume_line = _secret_volume(node, variable.value or "", volumes)
            source = "secret" if secret else "other"
        lines = [*_block(raw, container.where.line)]
        if volume_line is not None:
            lines += _block(raw, volume_line)
        noted = any(_ROTATION_WORDS.search(_comment(raw[i - 1])) for i in lines)
        if secret and not noted:
            noted = any(
                secret in _comment(line) and _ROTATION_WORDS.search(_comment(line)) for line in raw
            )
        uses.append(SasUse(name, variable.where, source, secret, noted))
    return uses


def _secret_volume(
    node: Mapping[str, Any], path: str, volumes: Mapping[str, tuple[Any, int]]
) -> tuple[str | None, int | None]:
    """(Secret name, volume line) of the volume the file at `path` is on, when a Secret's."""
    for mount in _list(node.get("volumeMounts")):
        mount_path = (_str(_mapping(mount, "mountPath")) or "").rstrip("/")
        name = _str(_mapping(mount, "name")) or ""
        if (
            not mount_path
            or name not in volumes
            or not (path == mount_path or path.startswith(mount_path + "/"))
        ):
            continue
        volume, line = volumes[name]
        secret = _str(_mapping(volume, "secret", "secretName"))
        for source in _list(_mapping(volume, "projected", "sources")):
            secret = secret or _str(_mapping(source, "secret", "name"))
        return secret, line
    return None, None


def _comment(line: str) -> str:
    """The comment on a YAML line ('#' at its start or after a space; best effort)."""
    match = re.search(r"(?:^|\s)#(.*)$", line)
    return match.group(1) if match else ""


def _block(raw: Sequence[str], first: int) -> range:
    """1-based lines of the YAML block whose first line is `first` (a sequence item or a
    key), with the comment lines right above it."""
    start = first - 1
    if not 0 <= start < len(raw):
        return range(0)
    indent = len(raw[start]) - len(raw[start].lstrip(" "))
    end = start + 1
    while end < len(raw):
        line = raw[end]
        content = line.strip() and not line.lstrip().startswith("#")
        if content and len(line) - len(line.lstrip(" ")) <= indent:
            break
        end += 1
    above = start
    while above > 0 and raw[above - 1].lstrip().startswith("#"):
        above -= 1
    return range(above + 1, end + 1)


_MARKER = re.compile(r"\{\s*\"\$imagepolicy\"\s*:\s*\"([^\"]*)\"\s*\}")


def _eol_comment(node: Any, key: str, raw: Sequence[str], line: int) -> str:
    """The end-of-line comment after `key: value`: ruamel's comment token, else the raw line."""
    try:
        token = node.ca.items.get(key, [None, None, None])[2]
    except AttributeError:
        token = None
    if token is not None and getattr(token, "value", None):
        return str(token.value).split("\n", 1)[0]
    text = raw[line - 1] if 0 < line <= len(raw) else ""
    return text[text.index("#") :] if "#" in text else ""


def read_helm_release(document: Mapping[str, Any], raw: Sequence[str], display: str) -> HelmRelease:
    release = HelmRelease(
        name=_str(_mapping(document, "metadata", "name")),
        display=display,
        where=_node_where(document, display),
    )
    values = _mapping(document, "spec", "values")
    if not isinstance(values, Mapping):
        return release
    image = values.get("image")
    fields: list[tuple[Any, str]] = []
    if isinstance(image, Mapping):
        fields = [(image, key) for key in ("repository", "tag") if _str(image.get(key))]
        release.repository = _str(image.get("repository"))
    elif _str(image):
        fields = [(values, "image")]
        release.repository = split_image(str(image))[0]
    for node, key in fields:
        where = _value_where(node, key, display)
        comment = _eol_comment(node, key, raw, where.line)
        marker = _MARKER.search(comment)
        release.image_fields.append(
            ImageField(key, str(node[key]), where, marker.group(1) if marker else None)
        )
    for text in _strings(values):
        match = re.match(r"^ray://([a-z0-9-]+)(?:\.([a-z0-9-]+))?", text.strip())
        if match and match.group(1).endswith("-head-svc"):
            release.ray_service = (match.group(1).removesuffix("-head-svc"), match.group(2))
            break
    return release


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, Mapping):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def read_kubernetes(text: str, display: str, checkout: Checkout) -> None:
    documents, error = _load_yaml(text, display)
    if error:
        checkout.findings.append(error)
        return
    raw = text.splitlines()
    for document in documents:
        if not isinstance(document, Mapping):
            continue
        kind, api = str(document.get("kind")), str(document.get("apiVersion"))
        if kind in ("RayService", "RayCluster") and api.startswith("ray.io/"):
            checkout.clusters.append(read_cluster(document, raw, display))
        elif kind == "HelmRelease" and api.startswith("helm.toolkit.fluxcd.io/"):
            checkout.helm_releases.append(read_helm_release(document, raw, display))


def read_pipeline(text: str, path: Path, display: str, checkout: Checkout) -> None:
    documents, error = _load_yaml(text, display)
    if error:
        checkout.findings.append(error)
        return
    pipeline = Pipeline(display)
    raw = text.splitlines()
    roots = _source_roots(path)
    for document in documents:
        for node in _mappings(document):
            url, file = _str(node.get("registryUrl")), _str(node.get("file"))
            if not url or not file:
                continue
            file = file.replace("$(Build.SourcesDirectory)", str(path.parent))
            if "$(" in file:
                continue  # a pipeline variable we cannot know
            dockerfile = Path(file) if Path(file).is_absolute() else path.parent / file
            pipeline.builds.append((url.strip().lower(), dockerfile))
        for node in _mappings(document):
            for key, value in node.items():
                if key in _SCRIPT_KEYS and isinstance(value, str):
                    start = _value_where(node, key, display).line - 1
                    for line, pieces in logical_lines(scalar_lines(value, start, raw)):
                        pipeline.commands += commands_of(line, pieces, display)
                elif str(key).lower() == "dockerfiles" and isinstance(value, list):
                    pipeline.dockerfile_entries += _dockerfile_entries(value, roots, display)
    pipeline.commands.sort(key=lambda command: command.where.line)
    checkout.pipelines.append(pipeline)


# Where a pipeline keeps shell text: `script:` and `bash:` steps, a task's `script` input
# (Bash@3, CmdLine@2) and AzureCLI@2's `inlineScript`.
_SCRIPT_KEYS = {"script", "bash", "inlineScript"}


def _source_roots(path: Path) -> tuple[Path, ...]:
    """What $(Build.SourcesDirectory) may be: the pipeline's folder (a pipeline at the
    repository root, as the deployment guide has it) or the git root above it."""
    roots = [path.parent]
    for folder in path.resolve().parents:
        if (folder / ".git").exists():
            roots.append(folder)
            break
    return tuple(roots)


def _dockerfile_entries(
    items: list[Any], roots: tuple[Path, ...], display: str
) -> list[DockerfileEntry]:
    entries = []
    for item in items:
        file = _str(_mapping(item, "file"))
        if file is None:
            continue
        where = _value_where(item, "file", display)
        variable = "$(Build.SourcesDirectory)"
        if "$(" in file.replace(variable, ""):
            continue  # a pipeline variable we cannot know
        if Path(file).is_absolute() and variable not in file:
            candidates: tuple[Path, ...] = (Path(file),)
        else:
            relative = file.replace(variable, "").lstrip("/")
            candidates = tuple(root / relative for root in roots)
        entries.append(DockerfileEntry(file, candidates, where))
    return entries


def _mappings(node: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(node, Mapping):
        yield node
        for value in node.values():
            yield from _mappings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _mappings(value)
