"""The heavy set as an OCI image, assembled from a manifest: pure functions, no I/O.

The layers are the shards themselves (`application/vnd.oci.image.layer.v1.tar+zstd`, digest =
the shard's sha256, diff_id = its `tar_sha256`), after one small uncompressed layer holding the
tree's folders, so that the merged layers are the tree the blob path unpacks, folders and their
modes included, with no whiteouts (shards are disjoint). The gpubuild manifest travels inside
the image config under "gpubuild", so an image alone says what it holds and how to verify it.

Two images share those layers: the heavy image (for an image volume: the tree at its root),
and the init-copy image, which adds one layer with a static busybox, a copy script that puts
the tree into the pod's shared volume, and the tree's top-level entries with their file counts
(docs/design.md#registry-store).

A registry's answer is hostile: `check_image` and `check_copier` hold an image to exactly what
`build_image` makes of the manifest its config carries, layer for layer.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import struct
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.errors import IntegrityError
from builder.fields import STATE_FOLDER, relative_path_problem
from builder.manifest import Manifest, manifest_from_bytes, manifest_to_bytes

LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
IMAGE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG_KEY = "gpubuild"
# The copier layer's folder at the image root: the state folder's name, which no tree may use
# (builder.fields.relative_path_problem), so the copier never shadows or joins a package.
COPIER_DIR = STATE_FOLDER
COPY_TARGET = "/gpubuild-target"  # where the init-copy container mounts the shared volume
FIXED_MTIME = 946_684_800  # the shards' (builder.pack): reproducible layers
_PT_INTERP = 3  # an ELF program header naming the dynamic loader
_ET_EXEC, _ET_DYN = 2, 3  # a fixed-address executable; a position-independent one (static-pie)
# ELF e_machine -> the OCI architecture, and the platform prefix a profile names it by.
_MACHINES = {62: "amd64", 183: "arm64"}
_PLATFORM_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "linux": "amd64"}
BUSYBOX_LIMIT = 8 * 1024 * 1024  # a static busybox is 1-3 MB
COPIER_FILES = ("busybox", "copy.sh", "folders", "entries")
_COUNT = re.compile(r"[0-9]{1,15}")


@dataclass(frozen=True)
class Blob:
    """Bytes the image needs that no store has yet (a small layer, the config)."""

    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class Image:
    """An image's manifest and what it references that is not a shard."""

    manifest: bytes  # canonical JSON, pushed as is: its sha256 is the image's digest
    config: Blob
    extra_layers: tuple[Blob, ...]

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()


def _tar(entries: Sequence[tuple[str, int, bytes | None]]) -> bytes:
    """A reproducible tar of (name, mode, data): data None is a folder."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, mode, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = FIXED_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = mode
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@dataclass(frozen=True)
class TreeEntry:
    """A top-level entry of the tree (a file, a link or a folder) and the files and links in
    it: what the copier copies, and checks one by one."""

    name: str
    files: int


def tree_entries(
    members: Iterable[tuple[str, bool]], directories: Sequence[str]
) -> tuple[TreeEntry, ...]:
    """The tree's top-level entries from its shards' members ((path, counts as a file)) and its
    folders, sorted by name."""
    counts: dict[str, int] = {}
    for directory in directories:
        counts.setdefault(directory.split("/", 1)[0], 0)
    for path, is_file in members:
        top = path.removeprefix("./").split("/", 1)[0]
        counts[top] = counts.get(top, 0) + (1 if is_file else 0)
    return tuple(TreeEntry(name, files) for name, files in sorted(counts.items()))


def entries_text(entries: Sequence[TreeEntry]) -> bytes:
    """`<files><TAB><name>` per line: no tree name holds a control character."""
    return "".join(f"{entry.files}\t{entry.name}\n" for entry in entries).encode()


def read_entries(data: bytes, manifest: Manifest, where: str) -> tuple[TreeEntry, ...]:
    """The copier's list, checked against the manifest: single safe names, every top-level
    folder of the tree, file counts that add up to the manifest's."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise IntegrityError(f"{where}: the copier's entries are not UTF-8") from None
    # Lines end at "\n" only, as the copy script's `read` sees them.
    lines = text.removesuffix("\n").split("\n") if text else []
    entries = []
    for number, line in enumerate(lines, start=1):
        files, tab, name = line.partition("\t")
        if not tab or not _COUNT.fullmatch(files) or "/" in name or relative_path_problem(name):
            raise IntegrityError(f"{where}: line {number} of the copier's entries is not one")
        entries.append(TreeEntry(name, int(files)))
    names = [entry.name for entry in entries]
    if names != sorted(set(names)):
        raise IntegrityError(f"{where}: the copier's entries are not sorted and distinct")
    folders = {directory.split("/", 1)[0] for directory in manifest.directories}
    if not folders <= set(names) or sum(e.files for e in entries) != manifest.total_files:
        raise IntegrityError(
            f"{where}: the copier's entries do not add up to the manifest's tree"
            f" ({sum(e.files for e in entries)} files, {manifest.total_files} expected)"
        )
    return tuple(entries)


def skeleton_layer(manifest: Manifest) -> Blob:
    """Every folder of the tree, mode 0755 (as the init script's mkdir makes them)."""
    folders = sorted(set(manifest.directories))
    return Blob(LAYER_TAR, _tar([(folder, 0o755, None) for folder in folders]))


def copy_script(manifest: Manifest) -> str:
    """What the init-copy container runs (busybox sh): the tree at the image root into the
    shared volume, through a staging folder, each top-level entry counted, then switched in by
    the init script's protocol (builder/data/init.sh.tmpl: lock, `incomplete`, trash).

    The image root holds the tree, /.gpubuild (the copier) and what the runtime adds: mount
    points (/proc, /etc/hosts, the service-account token, the volume itself) and files such as
    /.dockerenv. Only the entries the copier's list names are copied, and none of them may be
    a mount point; a listed folder that holds one is copied entry by entry around it (into
    its subfolders only when the tree has them: the list of folders is in the layer). Each
    entry's file count is checked against the list, whose counts add up to the manifest's.

    The lock is a symlink naming the pod's hostname (busybox-static has no flock applet): init
    containers of one pod run one at a time, so a lock this pod's hostname left is a stopped
    run's, taken over; another pod's means a volume shared by pods, which init-copy refuses."""
    return f"""#!/{COPIER_DIR}/busybox sh
# gpubuild init-copy for profile {manifest.profile}, digest {manifest.digest}.
# Copies the heavy set this image carries into the shared volume mounted at $GPUBUILD_TARGET
# (default {COPY_TARGET}); the kubelet pulled the image by digest, so its bytes are verified.
# Layout of the target T: the live set's entries; T/.gpubuild/installed ("<digest> image"),
# T/.gpubuild/incomplete (while the live set is replaced), T/.gpubuild/copy-lock,
# T/.gpubuild/staging-XXXXXX (this run's copy), T/.gpubuild/trash (the previous set).
set -euf
bb=/{COPIER_DIR}/busybox
list=/{COPIER_DIR}/entries
folders=/{COPIER_DIR}/folders
digest={manifest.digest}
files={manifest.total_files}
target=${{GPUBUILD_TARGET:-{COPY_TARGET}}}
state="$target/.gpubuild"
lock="$state/copy-lock"
mounts="$state/mounts"
tab=$(printf '\\t')
log() {{ echo "[gpubuild-copy] $*" >&2; }}
die() {{ log "ERROR: $*"; exit 1; }}
host=$($bb hostname 2>/dev/null || true)
host=${{host:-unknown-host}}
$bb mkdir -p "$state" 2>/dev/null || die "cannot create $state: is $target mounted and writable?"
while ! $bb ln -s "$host" "$lock" 2>/dev/null; do
  owner=$($bb readlink "$lock" 2>/dev/null || true)
  [ -n "$owner" ] || continue
  [ "$owner" = "$host" ] || die "pod $owner is copying into $target too: init-copy needs an emptyDir of its own per pod"
  log "an earlier run in this pod was stopped while copying; taking over its lock"
  $bb rm -f "$lock"
done
trap '$bb rm -f "$lock"' EXIT
installed=""
if [ -f "$state/installed" ] && [ ! -e "$state/incomplete" ]; then
  read -r installed _ <"$state/installed" || true
fi
if [ "$installed" = "$digest" ]; then
  log "$digest is already installed in $target; nothing to do"
  exit 0
fi
# The target's top-level entries but the state folder: the live set.
move_live_to_trash() {{
  $bb rm -rf "$state/trash"
  $bb mkdir "$state/trash"
  set +f
  for entry in "$target"/* "$target"/.[!.]* "$target"/..?*; do
    [ -e "$entry" ] || [ -L "$entry" ] || continue
    case ${{entry##*/}} in .gpubuild | lost+found) continue ;; esac
    $bb mv "$entry" "$state/trash/" || die "cannot move $entry aside: is $target writable?"
  done
  set -f
}}
has_live_entries() {{
  set +f
  for entry in "$target"/* "$target"/.[!.]* "$target"/..?*; do
    [ -e "$entry" ] || [ -L "$entry" ] || continue
    case ${{entry##*/}} in .gpubuild | lost+found) continue ;; esac
    set -f
    return 0
  done
  set -f
  return 1
}}
$bb rm -rf "$state/trash" "$mounts"
set +f
for path in "$state"/staging-*; do [ -e "$path" ] && $bb rm -rf "$path"; done
set -f
if [ -e "$state/incomplete" ]; then
  log "a previous run was stopped while switching package sets; the live set is incomplete: clearing it"
  move_live_to_trash
  $bb rm -f "$state/installed"
  $bb rm -rf "$state/trash"
  $bb rm -f "$state/incomplete"
fi
if [ ! -f "$state/installed" ] && has_live_entries; then
  die "$target holds files that gpubuild did not install; init-copy needs an empty emptyDir"
fi
# /proc/mounts writes a space as \\040 and a backslash as \\134: paths are compared so written.
$bb awk '{{print $2}}' /proc/mounts >"$mounts" || die "cannot read /proc/mounts"
written() {{ printf '%s' "$1" | $bb sed 's/\\\\/\\\\134/g; s/ /\\\\040/g'; }}
is_mount() {{ $bb grep -qxF -e "$(written "$1")" "$mounts"; }}
holds_mount() {{
  P="$(written "$1")/" $bb awk 'index($0, ENVIRON["P"]) == 1 {{ found = 1; exit }} END {{ exit !found }}' "$mounts"
}}
is_tree_folder() {{ $bb grep -qxF -e "${{1#/}}" "$folders"; }}
# $1: a path in the image, $2: its place in the staging folder.
copy_tree() {{
  local entry
  if [ ! -d "$1" ] || [ -L "$1" ] || ! holds_mount "$1"; then
    $bb cp -a "$1" "$2"
    return
  fi
  $bb mkdir -m 755 "$2"
  set +f
  for entry in "$1"/* "$1"/.[!.]* "$1"/..?*; do
    set -f
    [ -e "$entry" ] || [ -L "$entry" ] || continue
    is_mount "$entry" && continue
    if [ -d "$entry" ] && [ ! -L "$entry" ] && holds_mount "$entry" && ! is_tree_folder "$entry"; then
      continue
    fi
    copy_tree "$entry" "$2/${{entry##*/}}"
  done
  set -f
}}
start=$($bb date +%s)
staging=$($bb mktemp -d "$state/staging-XXXXXX") || die "cannot create a staging folder in $state"
while IFS="$tab" read -r count name; do
  [ -e "/$name" ] || [ -L "/$name" ] || die "the image has no /$name, which its list names"
  is_mount "/$name" && die "the runtime mounted something over /$name, which is part of the set; mount the volume elsewhere (install_dir)"
  copy_tree "/$name" "$staging/$name"
done <"$list"
while IFS="$tab" read -r count name; do
  [ -e "$staging/$name" ] || [ -L "$staging/$name" ] || die "/$name was not copied; nothing was changed in $target"
  found=$($bb find "$staging/$name" \\( -type f -o -type l \\) | $bb wc -l)
  [ "$found" -eq "$count" ] || die "copied $found files of /$name where the image's list says $count; nothing was changed in $target"
done <"$list"
# The switch: from `incomplete` until its removal, a run that finds the target starts afresh.
echo "$digest" >"$state/incomplete.tmp" && $bb mv -f "$state/incomplete.tmp" "$state/incomplete" || die "cannot write $state/incomplete"
$bb rm -f "$state/installed"
move_live_to_trash
while IFS="$tab" read -r count name; do
  $bb mv "$staging/$name" "$target/" || die "cannot move $name into $target"
done <"$list"
$bb rmdir "$staging"
echo "$digest image" >"$state/installed.tmp" && $bb mv -f "$state/installed.tmp" "$state/installed" || die "cannot write $state/installed"
$bb rm -f "$state/incomplete"
$bb rm -rf "$state/trash" "$mounts"
log "done: {manifest.profile} $digest copied into $target: $files files in $(( $($bb date +%s) - start )) s"
"""


def folders_text(manifest: Manifest) -> bytes:
    return "".join(f"{folder}\n" for folder in sorted(set(manifest.directories))).encode()


def copier_layer(manifest: Manifest, busybox: bytes, entries: Sequence[TreeEntry]) -> Blob:
    """The static busybox, the copy script, the tree's folders and its top-level entries,
    under /.gpubuild/ at the image root."""
    return Blob(
        LAYER_TAR,
        _tar(
            [
                (COPIER_DIR, 0o755, None),
                (f"{COPIER_DIR}/busybox", 0o755, busybox),
                (f"{COPIER_DIR}/copy.sh", 0o755, copy_script(manifest).encode()),
                (f"{COPIER_DIR}/folders", 0o644, folders_text(manifest)),
                (f"{COPIER_DIR}/entries", 0o644, entries_text(entries)),
            ]
        ),
    )


def check_copier(data: bytes, manifest: Manifest, where: str) -> tuple[TreeEntry, ...]:
    """A copier layer from a registry, held to what `copier_layer` makes for `manifest`: the
    folder and exactly its four files, the script and folder list equal to this manifest's,
    a static busybox for the manifest's architecture, an entries list that adds up."""
    found: dict[str, bytes | None] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.name in found or not (member.isdir() or member.isfile()):
                    raise IntegrityError(f"{where}: the copier layer holds {member.name[:80]!r}")
                extracted = tar.extractfile(member) if member.isfile() else None
                found[member.name] = extracted.read() if extracted is not None else None
    except (tarfile.TarError, EOFError):
        raise IntegrityError(f"{where}: the copier layer is not a tar") from None
    wanted = {COPIER_DIR, *(f"{COPIER_DIR}/{name}" for name in COPIER_FILES)}
    if set(found) != wanted or found[COPIER_DIR] is not None:
        raise IntegrityError(
            f"{where}: the copier layer holds {', '.join(sorted(found))[:200]}, not"
            f" {COPIER_DIR}/ with {', '.join(COPIER_FILES)}"
        )
    if found[f"{COPIER_DIR}/copy.sh"] != copy_script(manifest).encode():
        raise IntegrityError(f"{where}: its copy.sh is not the one gpubuild writes for it")
    if found[f"{COPIER_DIR}/folders"] != folders_text(manifest):
        raise IntegrityError(f"{where}: its list of folders is not the manifest's")
    busybox = found[f"{COPIER_DIR}/busybox"] or b""
    machine = static_executable_architecture(busybox)
    if machine != oci_architecture(manifest.platform):
        raise IntegrityError(
            f"{where}: its busybox is not a static executable for {manifest.platform}"
        )
    return read_entries(found[f"{COPIER_DIR}/entries"] or b"", manifest, where)


def _descriptor(media_type: str, digest: str, size: int) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest, "size": size}


def _diff_id(blob: Blob) -> str:
    # An uncompressed layer's diff_id is its own digest.
    return blob.digest


def oci_architecture(platform: str) -> str | None:
    """The OCI architecture of a profile's platform (`x86_64-manylinux_2_28` -> amd64,
    `aarch64-...` -> arm64); None for one gpubuild does not know."""
    return _PLATFORM_ARCHITECTURES.get(platform.split("-", 1)[0])


def build_image(manifest: Manifest, *, version: str, copier: Blob | None = None) -> Image:
    """The image whose layers are the skeleton, the shards (in manifest order) and, for the
    init-copy image, the copier. Annotations name the profile, the lock digest and gpubuild's
    version; the config carries the gpubuild manifest and the platform's architecture."""
    architecture = oci_architecture(manifest.platform)
    if architecture is None:
        raise IntegrityError(
            f"{manifest.profile} {manifest.digest[:12]}: platform {manifest.platform!r} has no"
            f" image architecture gpubuild knows ({', '.join(sorted(set(_MACHINES.values())))})"
        )
    skeleton = skeleton_layer(manifest)
    extra = [skeleton, *([copier] if copier else [])]
    layers = [_descriptor(LAYER_TAR, skeleton.digest, len(skeleton.data))]
    diff_ids = [_diff_id(skeleton)]
    for shard in manifest.shards:
        layers.append(_descriptor(LAYER_ZSTD, f"sha256:{shard.sha256}", shard.bytes))
        diff_ids.append(f"sha256:{shard.tar_sha256}")
    if copier is not None:
        layers.append(_descriptor(LAYER_TAR, copier.digest, len(copier.data)))
        diff_ids.append(_diff_id(copier))
    container_config: dict[str, object] = {
        "Env": [f"{key}={value}" for key, value in sorted(manifest.env.items())],
        "Labels": {"dev.gpubuild.profile": manifest.profile},
    }
    if copier is not None:
        container_config["Entrypoint"] = [f"/{COPIER_DIR}/busybox", "sh", f"/{COPIER_DIR}/copy.sh"]
    image_config: dict[str, object] = {
        "architecture": architecture,
        "os": "linux",
        "created": "2000-01-01T00:00:00Z",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": container_config,
        CONFIG_KEY: json.loads(manifest_to_bytes(manifest)),
    }
    config = Blob(IMAGE_CONFIG, _canonical(image_config))
    document = {
        "schemaVersion": 2,
        "mediaType": IMAGE_MANIFEST,
        "config": _descriptor(IMAGE_CONFIG, config.digest, len(config.data)),
        "layers": layers,
        "annotations": {
            "dev.gpubuild.profile": manifest.profile,
            "dev.gpubuild.digest": manifest.digest,
            "dev.gpubuild.version": version,
            "dev.gpubuild.delivery": "init-copy" if copier is not None else "image-volume",
        },
    }
    return Image(_canonical(document), config, tuple(extra))


def _canonical(document: object) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def image_tag(profile: str, digest: str, *, copy: bool = False) -> str:
    """A readable tag: the profile and the lock digest's first 16 hex digits."""
    return f"{profile}-{digest[:16]}" + ("-copy" if copy else "")


# --- images from a registry (hostile until checked) ----------------------------------------


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str  # sha256:<64 hex>
    size: int


def _descriptor_of(value: object, where: str, what: str) -> Descriptor:
    if isinstance(value, Mapping):
        media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
        if (
            isinstance(media_type, str)
            and isinstance(digest, str)
            and digest.startswith("sha256:")
            and len(digest) == 71
            and all(c in "0123456789abcdef" for c in digest[7:])
            and isinstance(size, int)
            and not isinstance(size, bool)
            and size >= 0
        ):
            return Descriptor(media_type, digest, size)
    raise IntegrityError(f"{where}: its {what} is not a content descriptor")


def image_parts(document: object, where: str) -> tuple[Descriptor, tuple[Descriptor, ...]]:
    """The config and layer descriptors of an image manifest, every field's type checked."""
    if not isinstance(document, Mapping) or not isinstance(document.get("layers"), list):
        raise IntegrityError(f"{where}: not an image manifest")
    config = _descriptor_of(document.get("config"), where, "config")
    layers = tuple(
        _descriptor_of(layer, where, f"layer {number}")
        for number, layer in enumerate(document["layers"], start=1)
    )
    return config, layers


def manifest_in_config(config: object, where: str) -> Manifest:
    """The gpubuild manifest an image config carries, read by the one manifest reader."""
    if not isinstance(config, Mapping) or not isinstance(config.get(CONFIG_KEY), Mapping):
        raise IntegrityError(f"{where}: not a gpubuild image (its config has no gpubuild manifest)")
    try:
        data = json.dumps(config[CONFIG_KEY]).encode()
    except (ValueError, RecursionError):
        raise IntegrityError(f"{where}: not a gpubuild image (its manifest is not JSON)") from None
    return manifest_from_bytes(data, where=where)


def check_image(
    document: Mapping[str, Any],
    config: object,
    manifest: Manifest,
    copier: Blob | None,
    where: str,
) -> None:
    """An image from a registry is the one `build_image` makes of `manifest` (and `copier`):
    the same layers, descriptor for descriptor (no extra layer, no foreign URL), the same
    config (diff_ids, architecture, entrypoint, env, manifest), gpubuild's annotations. Only
    the version annotation may differ: the gpubuild that published it."""
    expected = build_image(manifest, version="", copier=copier)
    wanted = json.loads(expected.manifest)
    if document.get("schemaVersion") != 2 or document.get("mediaType") != IMAGE_MANIFEST:
        raise IntegrityError(f"{where}: not an OCI image manifest gpubuild wrote")
    if document.get("layers") != wanted["layers"]:
        kind = "skeleton, shards and copier" if copier is not None else "skeleton and shards"
        raise IntegrityError(
            f"{where}: its layers are not exactly the manifest's {kind}; an image volume or"
            " the init-copy container would get files nobody verified"
        )
    config_descriptor = document.get("config")
    if (
        not isinstance(config_descriptor, Mapping)
        or config_descriptor.get("mediaType") != IMAGE_CONFIG
    ):
        raise IntegrityError(f"{where}: its config is not an image config")
    wanted_config = json.loads(expected.config.data)
    if config != wanted_config:
        found = config if isinstance(config, Mapping) else {}
        differing = sorted(
            str(key)[:40]
            for key in {*wanted_config, *found}
            if found.get(key) != wanted_config.get(key)
        )
        raise IntegrityError(
            f"{where}: its config is not the one gpubuild makes for its manifest"
            f" ({', '.join(differing[:5]) or 'not an object'} differ)"
        )
    annotations = document.get("annotations")
    annotations = annotations if isinstance(annotations, Mapping) else {}
    for key, value in wanted["annotations"].items():
        if key != "dev.gpubuild.version" and annotations.get(key) != value:
            raise IntegrityError(f"{where}: its annotation {key} is not {value!r}")


def static_executable_architecture(data: bytes) -> str | None:
    """The OCI architecture of a statically linked 64-bit little-endian ELF executable (no
    interpreter: it runs in an image with nothing else in it), or None when `data` is not one
    or is larger than a busybox can be."""
    if len(data) < 64 or len(data) > BUSYBOX_LIMIT:
        return None
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    kind, machine = struct.unpack_from("<HH", data, 0x10)
    if kind not in (_ET_EXEC, _ET_DYN) or machine not in _MACHINES:
        return None
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    size, count = struct.unpack_from("<HH", data, 0x36)
    if count == 0 or size < 4:
        return None
    for number in range(count):
        start = phoff + number * size
        if start + 4 > len(data):
            return None
        (segment,) = struct.unpack_from("<I", data, start)
        if segment == _PT_INTERP:
            return None
    return _MACHINES[machine]


@dataclass(frozen=True)
class StaticBusybox:
    path: Path
    data: bytes = field(repr=False)
    architecture: str  # "amd64" or "arm64"


def read_static_busybox(path: Path) -> StaticBusybox | None:
    """A static busybox at `path` (a regular file of at most BUSYBOX_LIMIT bytes, an ELF
    executable for x86_64 or aarch64 with no interpreter), or None when it is not one."""
    try:
        with path.open("rb") as source:
            if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
                return None
            data = source.read(BUSYBOX_LIMIT + 1)
    except OSError:
        return None
    architecture = static_executable_architecture(data)
    return None if architecture is None else StaticBusybox(path, data, architecture)
