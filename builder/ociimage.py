"""The heavy set as an OCI image, assembled from a manifest: pure functions, no I/O.

The layers are the shards themselves (`application/vnd.oci.image.layer.v1.tar+zstd`, digest =
the shard's sha256, diff_id = its `tar_sha256`), after one small uncompressed layer holding the
tree's folders, so that the merged layers are the tree the blob path unpacks, folders and their
modes included, with no whiteouts (shards are disjoint). The gpubuild manifest travels inside
the image config under "gpubuild", so an image alone says what it holds and how to verify it.

Two images share those layers: the heavy image (for an image volume: the tree at its root),
and the init-copy image, which adds one layer with a static busybox and a copy script that puts
the tree into the pod's shared volume and checks its file count (docs/design.md#stores).
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.fields import STATE_FOLDER
from builder.manifest import Manifest, manifest_to_bytes

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


def skeleton_layer(manifest: Manifest) -> Blob:
    """Every folder of the tree, mode 0755 (as the init script's mkdir makes them)."""
    folders = sorted(set(manifest.directories))
    return Blob(LAYER_TAR, _tar([(folder, 0o755, None) for folder in folders]))


def copy_script(manifest: Manifest) -> str:
    """What the init-copy container runs (busybox sh): the tree at the image root into the
    shared volume, through a staging folder, its file count checked, then marked installed.

    The image root holds the tree, /.gpubuild (the copier) and what the runtime mounts there:
    /proc, /dev, /sys, /etc/hosts, /etc/resolv.conf, the service-account token under /var/run,
    the volume itself. Mount points are never copied; a folder that holds one is copied entry by
    entry when the tree has that folder (the list of the tree's folders is in the layer) and
    left out when only the runtime made it. The file count catches anything missed."""
    return f"""#!/{COPIER_DIR}/busybox sh
# gpubuild init-copy for profile {manifest.profile}, digest {manifest.digest}.
# Copies the heavy set this image carries into the shared volume mounted at $GPUBUILD_TARGET
# (default {COPY_TARGET}); the kubelet pulled the image by digest, so its bytes are verified.
set -eu
bb=/{COPIER_DIR}/busybox
folders=/{COPIER_DIR}/folders
digest={manifest.digest}
files={manifest.total_files}
target=${{GPUBUILD_TARGET:-{COPY_TARGET}}}
state="$target/.gpubuild"
log() {{ echo "[gpubuild-copy] $*" >&2; }}
installed=$($bb cat "$state/installed" 2>/dev/null || true)
if [ "${{installed%% *}}" = "$digest" ]; then
  log "$digest is already installed in $target; nothing to do"
  exit 0
fi
$bb mkdir -p "$state"
staging="$state/staging-$digest"
$bb rm -rf "$staging"
$bb mkdir -p "$staging"
start=$($bb date +%s)
IFS='
'
mounts=$($bb awk '{{print $2}}' /proc/mounts)
is_mount() {{
  for m in $mounts; do [ "$m" = "$1" ] && return 0; done
  return 1
}}
holds_mount() {{
  for m in $mounts; do case "$m" in "$1"/*) return 0 ;; esac; done
  return 1
}}
copy_folder() {{
  local entry
  for entry in "$1"/* "$1"/.[!.]* "$1"/..?*; do
    [ -e "$entry" ] || [ -L "$entry" ] || continue
    [ "$entry" = /{COPIER_DIR} ] && continue
    is_mount "$entry" && continue
    if holds_mount "$entry"; then
      if [ -d "$entry" ] && [ ! -L "$entry" ] && $bb grep -qxF "${{entry#/}}" "$folders"; then
        $bb mkdir -m 755 "$staging$entry"
        copy_folder "$entry"
      fi
      continue
    fi
    $bb cp -a "$entry" "$staging$entry"
  done
}}
copy_folder ""
count=$($bb find "$staging" -type f -o -type l | $bb wc -l)
if [ "$count" -ne "$files" ]; then
  log "ERROR: copied $count files where the manifest says $files; nothing was changed in $target"
  $bb rm -rf "$staging"
  exit 1
fi
for entry in "$staging"/* "$staging"/.[!.]* "$staging"/..?*; do
  [ -e "$entry" ] || [ -L "$entry" ] || continue
  $bb rm -rf "$target/${{entry##*/}}"
  $bb mv "$entry" "$target/"
done
$bb rmdir "$staging"
echo "$digest image" > "$state/installed.tmp"
$bb mv "$state/installed.tmp" "$state/installed"
log "done: {manifest.profile} $digest copied into $target: $files files in $(( $($bb date +%s) - start )) s"
"""


def copier_layer(manifest: Manifest, busybox: bytes) -> Blob:
    """The static busybox and the copy script, under /gpubuild/ at the image root."""
    script = copy_script(manifest).encode()
    folders = "".join(f"{folder}\n" for folder in sorted(set(manifest.directories))).encode()
    return Blob(
        LAYER_TAR,
        _tar(
            [
                (COPIER_DIR, 0o755, None),
                (f"{COPIER_DIR}/busybox", 0o755, busybox),
                (f"{COPIER_DIR}/copy.sh", 0o755, script),
                (f"{COPIER_DIR}/folders", 0o644, folders),
            ]
        ),
    )


def _descriptor(media_type: str, digest: str, size: int) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest, "size": size}


def _diff_id(blob: Blob) -> str:
    # An uncompressed layer's diff_id is its own digest.
    return blob.digest


def build_image(
    manifest: Manifest,
    *,
    version: str,
    architecture: str = "amd64",
    copier: Blob | None = None,
) -> Image:
    """The image whose layers are the skeleton, the shards (in manifest order) and, for the
    init-copy image, the copier. Annotations name the profile, the lock digest and gpubuild's
    version; the config carries the gpubuild manifest."""
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


def read_static_busybox(path: Path) -> bytes | None:
    """A statically linked 64-bit busybox (no ELF interpreter: it runs in an image with nothing
    else in it), or None when `path` is not one."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    size, count = struct.unpack_from("<HH", data, 0x36)
    for number in range(count):
        start = phoff + number * size
        if start + 4 > len(data):
            return None
        (kind,) = struct.unpack_from("<I", data, start)
        if kind == _PT_INTERP:
            return None
    return data
