"""`gpubuild k8s patch`: the pod snippet (builder/k8s.py) put into one worker group of a
RayService file.

`patch_ray_service` edits the text, not a re-dumped document (builder.yamltext says why): only
the lines that must change are rewritten, in the indentation and quoting the file already uses
at that place. The result is parsed again and compared with the intended document, and
validated against the KubeRay CRD, before it is written (atomically). A group reached through
a YAML alias or merge key is refused: editing it would edit what else shares it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import BadInputError
from builder.files import write_atomically
from builder.k8s import (
    PACKAGES_VOLUME,
    REPLACEABLE_INIT_NAMES,
    SAS_VOLUME,
    PodSnippet,
    schema_errors,
    validate_ray_service,
    validate_snippet,
)
from builder.yamlload import LoadedYaml, load_yaml
from builder.yamltext import (
    QUOTED,
    TextEditor,
    load_documents,
    plain,
    remove_plain,
    unified_diff,
    upsert_plain,
)


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


def _field(node: Mapping[str, Any], key: str) -> Any:
    """A value as plain data: `name: !!str x` reads as a TaggedScalar, equal only to itself."""
    return plain(node.get(key))


def _find_group(documents: list[Any], group: str, where: str) -> tuple[int, Any]:
    found = []
    names = []
    for number, _document, groups in _worker_groups(documents):
        for spec in groups:
            if isinstance(spec, Mapping):
                names.append(str(_field(spec, "groupName")))
                if _field(spec, "groupName") == group:
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


def _path_to_groups(document: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(key path, node) from a document that holds worker groups down to its workerGroupSpecs."""
    spec = document["spec"]
    path = [("spec", spec)]
    if document.get("kind") == "RayService":
        path.append(("spec.rayClusterConfig", spec["rayClusterConfig"]))
    path.append((f"{path[-1][0]}.workerGroupSpecs", path[-1][1]["workerGroupSpecs"]))
    return path


def _reached_twice(root: Any) -> set[int]:
    """ids of the lists and mappings reached more than once from `root`: an alias's target is
    one object in ruamel's data, reached from its anchor and from every alias."""
    seen: set[int] = set()
    twice: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if not isinstance(node, (Mapping, list)):
            continue
        if id(node) in seen:
            twice.add(id(node))
            continue
        seen.add(id(node))
        stack.extend(node.values() if isinstance(node, Mapping) else node)
    return twice


def _alias_of(loaded: LoadedYaml, node: Any) -> tuple[int, str]:
    """(line, description) of an alias naming `node`'s anchor, else of where `node` is."""
    anchor = getattr(getattr(node, "anchor", None), "value", None)
    for site in loaded.sharing:
        if anchor is not None and site.kind == "alias" and site.text == f"*{anchor}":
            return site.line + 1, f"YAML {site}"
    span = loaded.span(node)
    return (span[0][0] + 1 if span else 1), "a YAML anchor and alias"


_WRITE_IT_OUT = (
    "k8s patch edits the text in place, and through an anchor, alias or merge key that text "
    "is shared with other places, which would change too: write {what} out in full (no "
    "&anchors, *aliases or << merge keys) and run again"
)


def _refuse_sharing(
    loaded: LoadedYaml, document: Mapping[str, Any], group_spec: Any, where: str, group: str
) -> None:
    """Refuse to edit through an alias or merge key: the lines the editor would change are
    those of the anchor, so patching one group would silently patch another (and a merged-in
    key has no line of its own in this mapping)."""
    twice = _reached_twice(document)
    for label, node in [*_path_to_groups(document), (f"worker group {group!r}", group_spec)]:
        if id(node) in twice:
            line, alias = _alias_of(loaded, node)
            raise BadInputError(
                f"{where}:{line}: worker group {group!r}: {label} is shared through {alias}; "
                + _WRITE_IT_OUT.format(what=label)
            )
    inside = loaded.sharing_within(group_spec)
    if inside:
        first = inside[0]
        raise BadInputError(
            f"{where}:{first.line + 1}: worker group {group!r} uses the YAML {first}; "
            + _WRITE_IT_OUT.format(what=f"worker group {group!r}")
        )


def _pod_spec(group_spec: Any, where: str, group: str) -> Any:
    template = group_spec.get("template")
    spec = template.get("spec") if isinstance(template, Mapping) else None
    containers = spec.get("containers") if isinstance(spec, Mapping) else None
    if not isinstance(containers, list) or not containers or not isinstance(containers[0], Mapping):
        raise BadInputError(f"{where}: worker group {group!r} has no template.spec.containers")
    assert isinstance(spec, Mapping)  # checked with the containers above
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
        if isinstance(item, Mapping) and isinstance(_field(item, "value"), str):
            values[str(_field(item, "name"))] = _field(item, "value")
    return values


@dataclass(frozen=True)
class _Plan:
    """Every list change for one pod spec; applied to the text and to plain data alike."""

    init: list[tuple[dict[str, Any], Any]]
    volumes: list[tuple[dict[str, Any], Any]]
    mounts: list[tuple[dict[str, Any], Any]]
    env: list[tuple[dict[str, Any], Any]]
    quote_env: bool
    drop_init: Any = None  # a matcher of initContainers to remove (image-volume needs none)

    def applyplain(self, pod: dict[str, Any]) -> dict[str, Any]:
        pod = copy.deepcopy(pod)
        if self.drop_init is not None:
            kept = remove_plain(pod.get("initContainers") or [], self.drop_init)
            if kept:
                pod["initContainers"] = kept
            else:
                pod.pop("initContainers", None)
        else:
            pod["initContainers"] = upsert_plain(
                pod.get("initContainers") or [], self.init, front=True
            )
        pod["volumes"] = upsert_plain(pod.get("volumes") or [], self.volumes)
        main = pod["containers"][0]
        if self.mounts:
            main["volumeMounts"] = upsert_plain(main.get("volumeMounts") or [], self.mounts)
        main["env"] = upsert_plain(main.get("env") or [], self.env)
        return pod

    def apply_text(self, editor: TextEditor, pod: Any) -> None:
        if self.drop_init is not None:
            editor.remove_items(pod, "initContainers", self.drop_init)
        else:
            editor.upsert_items(
                pod, "initContainers", self.init, before_key="containers", front=True
            )
        editor.upsert_items(pod, "volumes", self.volumes)
        main = pod["containers"][0]
        if self.mounts:
            editor.upsert_items(main, "volumeMounts", self.mounts)
        quoted = frozenset({"value"}) if self.quote_env else frozenset()
        editor.upsert_items(main, "env", self.env, always_quote=quoted)


def _volume_item(existing: Mapping[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """Keep a user's volume of another kind (a PVC suits the script too) or a larger sizeLimit.
    An image volume is gpubuild's own (image-volume delivery): replaced."""
    found: dict[str, Any] = plain(existing)
    if "emptyDir" not in wanted or "image" in found:
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


def _replaceable_init(container: Mapping[str, Any]) -> bool:
    return container.get("name") in REPLACEABLE_INIT_NAMES


def patch_text(
    text: str, group: str, snippet: PodSnippet, where: str = "input"
) -> tuple[str, tuple[str, ...]]:
    """The text with `snippet` applied to worker group `group`; pure. Returns (text, warnings)."""
    loaded = load_yaml(text, where)
    documents = loaded.documents
    number, group_spec = _find_group(documents, group, where)
    _refuse_sharing(loaded, documents[number], group_spec, where, group)
    pod = _pod_spec(group_spec, where, group)
    main = pod["containers"][0]
    warnings: list[str] = []

    volume = PACKAGES_VOLUME
    for mount in main.get("volumeMounts") or []:
        if isinstance(mount, Mapping) and _field(mount, "mountPath") == snippet.install_dir:
            volume = str(_field(mount, "name"))
    init = snippet.init_container(volume)
    volumes = snippet.volumes(volume)

    for existing in pod.get("initContainers") or []:
        if isinstance(existing, Mapping) and _field(existing, "name") in REPLACEABLE_INIT_NAMES:
            other = [
                str(_field(m, "name"))
                for m in existing.get("volumeMounts") or []
                if isinstance(m, Mapping) and _field(m, "name") not in (volume, SAS_VOLUME)
            ]
            if other:
                warnings.append(
                    f"replaced initContainer {existing.get('name')!r}, which also used volume(s) "
                    f"{', '.join(other)} (model downloads?): move that work to an initContainer "
                    "of its own"
                )

    final_volumes = []
    leaving_image_volume = False  # the group had image-volume delivery: its mount says readOnly
    for wanted in volumes:
        existing_item = next(
            (
                v
                for v in pod.get("volumes") or []
                if isinstance(v, Mapping) and _field(v, "name") == wanted["name"]
            ),
            None,
        )
        if existing_item is None:
            final_volumes.append(wanted)
            continue
        kind = plain(existing_item)
        if "image" in kind and wanted["name"] == volume:
            leaving_image_volume = True
        elif "emptyDir" in wanted and "emptyDir" not in kind:
            if snippet.delivery == "init-copy":
                raise BadInputError(
                    f"{where}: worker group {group!r} mounts volume {wanted['name']!r} (not an"
                    " emptyDir) at the install folder; --delivery init-copy copies into an"
                    " emptyDir of the pod's own, and a persistent volume is not supported:"
                    " remove that volume, or use --delivery blob (the init script works on any"
                    " volume) or image-volume"
                )
            warnings.append(
                f"kept volume {wanted['name']!r} as it is (not an emptyDir); the script works on "
                "any volume, and a persistent one skips the download when the digest is there"
            )
        final_volumes.append(_volume_item(existing_item, wanted))
    has_mount = any(
        isinstance(m, Mapping) and _field(m, "mountPath") == snippet.install_dir
        for m in main.get("volumeMounts") or []
    )
    mounts = [] if has_mount else [(snippet.mount(volume), lambda m: False)]
    if snippet.delivery == "image-volume" or leaving_image_volume:
        # The mount says readOnly for an image volume (which is), and no longer when the
        # volume becomes one the initContainer writes; the replaced initContainer goes.
        mounts = [(snippet.mount(volume), lambda m: m.get("mountPath") == snippet.install_dir)]
    # Files that quote every env value get ours quoted too.
    values = [e["value"] for e in main.get("env") or [] if isinstance(e, Mapping) and "value" in e]
    replaceable = _replaceable_init
    plan = _Plan(
        init=[(init, replaceable)] if init is not None else [],
        volumes=[(v, lambda e, n=v["name"]: e.get("name") == n) for v in final_volumes],
        mounts=mounts,
        env=[
            (item, lambda e, n=item["name"]: e.get("name") == n)
            for item in snippet.env(_env_values(main))
        ],
        quote_env=bool(values) and all(isinstance(v, QUOTED) for v in values),
        drop_init=replaceable if init is None else None,
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
            g for g in groups if isinstance(g, Mapping) and _field(g, "groupName") == group
        )
        if plain(new_group["template"]["spec"]) != expected_pod:
            raise AssertionError("the patched pod spec is not the planned one")
        _validate_patched(old_plain, new_plain, where)


def _validate_patched(old: Mapping[str, Any], new: Mapping[str, Any], where: str) -> None:
    """A patched document the CRD rejects is our bug (InvalidManifestError), unless the file
    was rejected before the patch too: then it is the user's to fix (BadInputError). The old
    document is only validated then: refusing invalid input up front would refuse files that
    the patch makes valid (a null `env:` becomes a list)."""
    if not schema_errors(new):
        return
    before = schema_errors(old)
    if before:
        raise BadInputError(
            f"{where}: does not validate against the KubeRay CRD as it is, before any change "
            f"(kubectl apply would refuse it too): {'; '.join(before[:5])}"
        )
    validate_ray_service(new, where)


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
