"""Reading a checkout: find the deployment files, parse each into builder.checks.model.

YAML goes through ruamel.yaml's round-trip loader, which keeps every node's line (`.lc`)
and end-of-line comments (the Flux markers). A file that does not parse is a GB001 finding.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from builder.checks.model import (
    Checkout,
    Cluster,
    Command,
    Container,
    Dockerfile,
    EnvVar,
    Finding,
    Group,
    HelmRelease,
    ImageField,
    LockFile,
    ManifestFile,
    Pipeline,
    ProfileFile,
    Requirements,
    Where,
    split_image,
)
from builder.checks.shell import commands_of, logical_lines, scalar_lines
from builder.errors import BadInputError, GpubuildError

_SKIP_DIRS = {".git", ".venv", "node_modules", "__pycache__"}


_MAX_BYTES = 8 * 1024 * 1024  # no deployment file is this big; a data file is not ours


_K8S_KIND = re.compile(r"^kind:\s*[\"']?(RayService|RayCluster|HelmRelease)[\"']?\s*(#.*)?$", re.M)


def walk(paths: Iterable[Path]) -> Iterator[tuple[Path, str]]:
    """Every file under the given paths with its display name (the path as given, joined)."""
    for root in paths:
        if not root.exists():
            raise BadInputError(f"{root}: no such file or folder; give paths to a checkout")
        if root.is_file():
            yield root, str(root)
            continue
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
            for name in sorted(files):
                path = Path(folder) / name
                yield path, str(path)


def classify(path: Path, head: str) -> str | None:
    """The kind of deployment file `path` is, from its name and (for YAML/TOML) its text."""
    name = path.name
    lower = name.lower()
    if name == "Dockerfile" or name.startswith("Dockerfile.") or lower.endswith(".dockerfile"):
        return "dockerfile"
    if re.fullmatch(r"azure-pipelines.*\.ya?ml", lower):
        return "pipeline"
    if lower.endswith(".txt") and "requirements" in lower:
        return "requirements"
    if lower.endswith((".yaml", ".yml")) and _K8S_KIND.search(head):
        return "kubernetes"
    if lower.endswith(".toml") and re.search(r"^\s*\[target\]\s*$", head, re.M):
        return "profile"
    if lower.endswith(".lock") and "# gpubuild: " in head:
        return "lock"
    if name == "manifest.json" and all(f'"{k}"' in head for k in ("format", "digest", "shards")):
        return "manifest"
    return None


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


def _round_trip() -> Any:
    from ruamel.yaml import YAML

    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    return yaml


def _load_yaml(text: str, display: str) -> tuple[list[Any], Finding | None]:
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        return list(_round_trip().load_all(text)), None
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) if isinstance(exc, MarkedYAMLError) else None
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return [], Finding(
            display,
            line,
            "GB001",
            f"not valid YAML: {problem}",
            "fix the YAML (kubectl apply and Flux reject it too): "
            "`python -c 'import yaml,sys; list(yaml.safe_load_all(open(sys.argv[1])))' FILE`",
        )


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
    for key, target in (
        ("containers", group.containers),
        ("initContainers", group.init_containers),
    ):
        items = pod.get(key)
        for index, item in enumerate(_list(items)):
            if isinstance(item, Mapping):
                target.append(
                    _read_container(item, _item_where(items, index, display), raw, display)
                )
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
    checkout.pipelines.append(pipeline)


def _mappings(node: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(node, Mapping):
        yield node
        for value in node.values():
            yield from _mappings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _mappings(value)


def _substitute(text: str, args: Mapping[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2)
        return args.get(name) or (default or "")

    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)", value, text)


def read_dockerfile(text: str, path: Path, display: str) -> Dockerfile:
    dockerfile = Dockerfile(path, display)
    global_args: dict[str, str] = {}
    stages: set[str] = set()
    env: dict[str, tuple[str, Where]] = {}
    seen_from = False
    logical = logical_lines(
        [(line, number) for number, line in enumerate(text.splitlines(), start=1)],
        dockerfile=True,
    )
    for line, pieces in logical:
        number = pieces[0][1]
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        instruction, _, rest = stripped.partition(" ")
        instruction = instruction.upper()
        where = Where(display, number)
        if instruction == "ARG" and not seen_from:
            name, _, default = rest.strip().partition("=")
            global_args[name.strip()] = default.strip().strip("\"'")
        elif instruction == "FROM":
            seen_from = True
            env = {}
            words = [w for w in rest.split() if not w.startswith("--")]
            if not words:
                continue
            image = _substitute(words[0], global_args)
            if len(words) >= 3 and words[1].lower() == "as":
                stages.add(words[2].lower())
            if image.lower() not in stages:
                dockerfile.froms.append((image, where))
        elif instruction == "ENV":
            env.update(_env_instruction(rest, where))
        elif instruction == "RUN" and not rest.lstrip().startswith("["):
            dockerfile.runs += commands_of(rest, pieces, display)
    dockerfile.env = env
    return dockerfile


def _env_instruction(rest: str, where: Where) -> dict[str, tuple[str, Where]]:
    rest = rest.strip()
    first = rest.split(None, 1)[0] if rest else ""
    if "=" not in first:  # legacy form: ENV KEY value with spaces
        key, _, value = rest.partition(" ")
        return {key: (value.strip(), where)} if key else {}
    try:
        words = shlex.split(rest)
    except ValueError:
        words = rest.split()
    found = {}
    for word in words:
        key, eq, value = word.partition("=")
        if eq:
            found[key] = (value, where)
    return found


def read_requirements(text: str, path: Path, display: str) -> Requirements:
    requirements = Requirements(path, display)
    for number, line in enumerate(text.splitlines(), start=1):
        line = re.split(r"(^|\s)#", line, maxsplit=1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(requirement.name) != "ray":
            continue
        pins = [s.version for s in requirement.specifier if s.operator in ("==", "===")]
        version = pins[0] if pins and "*" not in pins[0] else None
        requirements.ray.append((line, version, Where(display, number)))
    return requirements


def _toml_line(text: str, key: str) -> int:
    match = re.search(rf"^\s*{re.escape(key)}\s*=", text, re.M)
    return text.count("\n", 0, match.start()) + 1 if match else 1


def read_profile(text: str, path: Path, display: str, checkout: Checkout) -> None:
    from builder.profile import load_profile

    try:
        profile = load_profile(path)
    except GpubuildError as exc:
        key = getattr(exc, "key", None)
        line = _toml_line(text, key.rsplit(".", 1)[-1]) if key else 1
        match = re.search(r"at line (\d+)", str(exc))
        if match:
            line = int(match.group(1))
        checkout.findings.append(
            Finding(display, line, "GB001", f"not a valid gpubuild profile: {exc}",
                    "fix the profile (DESIGN.md, \"Profile\"); `gpubuild resolve` says the same")
        )  # fmt: skip
        return
    checkout.profiles.append(
        ProfileFile(
            path=path,
            display=display,
            profile=profile,
            base_image_where=Where(display, _toml_line(text, "base_image")),
            python_where=Where(display, _toml_line(text, "python")),
        )
    )


_PIN_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==")


def read_lock_file(path: Path, text: str, display: str, checkout: Checkout) -> None:
    from builder.lock import read_lock

    try:
        lock = read_lock(path)
    except GpubuildError as exc:
        checkout.findings.append(
            Finding(display, 1, "GB001", f"not a valid gpubuild lock: {exc}",
                    "write it again with `gpubuild resolve PROFILE`")
        )  # fmt: skip
        return
    lines = {}
    for number, line in enumerate(text.splitlines(), start=1):
        match = _PIN_LINE.match(line)
        if match:
            lines.setdefault(canonicalize_name(match.group(1)), number)
    checkout.locks.append(LockFile(display, lock, lines))


def read_manifest_file(
    data: bytes, display: str, checkout: Checkout, *, from_store: bool = False
) -> None:
    from builder.manifest import manifest_from_bytes

    try:
        manifest = manifest_from_bytes(data, where=display)
    except GpubuildError as exc:
        line = 1
        try:
            json.loads(data)
        except ValueError as error:
            line = getattr(error, "lineno", 1)
        checkout.findings.append(
            Finding(display, line, "GB001", f"not a valid gpubuild manifest: {exc}",
                    "pack it again with `gpubuild pack PROFILE` or `gpubuild publish-cache`")
        )  # fmt: skip
        return
    lines = {}
    for number, line in enumerate(data.decode(errors="replace").splitlines(), start=1):
        match = re.match(r'^\s*"name":\s*"([^"]+)"', line)
        if match:
            lines.setdefault(canonicalize_name(match.group(1)), number)
    checkout.manifests.append(ManifestFile(display, manifest, lines, from_store))


def read_checkout(paths: Sequence[Path], extra_profiles: Sequence[Path] = ()) -> Checkout:
    checkout = Checkout()
    seen: set[Path] = set()
    for path, display in [*walk(paths), *walk(extra_profiles)]:
        real = path.resolve()
        if real in seen or not path.is_file():
            continue
        seen.add(real)
        try:
            if path.stat().st_size > _MAX_BYTES:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        text = data.decode("utf-8", errors="replace")
        kind = classify(path, text)
        if kind is None:
            continue
        checkout.files.append((display, kind))
        if kind == "kubernetes":
            read_kubernetes(text, display, checkout)
        elif kind == "pipeline":
            read_pipeline(text, path, display, checkout)
        elif kind == "dockerfile":
            checkout.dockerfiles.append(read_dockerfile(text, path, display))
        elif kind == "requirements":
            checkout.requirements.append(read_requirements(text, path, display))
        elif kind == "profile":
            read_profile(text, path, display, checkout)
        elif kind == "lock":
            read_lock_file(path, text, display, checkout)
        elif kind == "manifest":
            read_manifest_file(data, display, checkout)
    return checkout


def read_store(store: str, checkout: Checkout) -> None:
    """Every manifest in a local store folder (PROFILE/DIGEST/manifest.json)."""
    if "://" in store and not store.startswith("file://"):
        raise BadInputError(
            f"--store {store!r}: check reads a local store folder (a path or file://PATH); "
            "for a cloud store, copy its PROFILE/DIGEST/manifest.json files into a folder "
            "with the same layout"
        )
    root = Path(store.removeprefix("file://"))
    if not root.is_dir():
        raise BadInputError(f"--store {store}: no such folder")
    known = {Path(m.display).resolve() for m in checkout.manifests}
    for path in sorted(root.glob("*/*/manifest.json")):
        if path.resolve() not in known:
            checkout.files.append((str(path), "manifest"))
            read_manifest_file(path.read_bytes(), str(path), checkout, from_store=True)
