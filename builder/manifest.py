"""The artifact manifest (DESIGN.md, "Pack: the artifact contract"), read and written in one place."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from builder.errors import IntegrityError

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Shard:
    sha256: str  # of the compressed shard (.tar.zst): its name in the store
    bytes: int
    tar_sha256: str  # of the tar inside (an OCI diff_id)
    raw_bytes: int
    files: int  # regular files and symlinks in the tar
    packages: tuple[str, ...]


@dataclass(frozen=True)
class PackageEntry:
    name: str
    version: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    digest: str
    profile: str
    python: str
    platform: str
    install_dir: str
    shards: tuple[Shard, ...]
    env: dict[str, str]
    packages: tuple[PackageEntry, ...]
    directories: tuple[str, ...] = ()  # every folder of the tree, made before parallel extraction
    format: int = MANIFEST_FORMAT
    notes: tuple[str, ...] = field(default=())  # .pth files, unclaimed files and the like

    @property
    def total_bytes(self) -> int:
        return sum(shard.bytes for shard in self.shards)

    @property
    def total_files(self) -> int:
        return sum(shard.files for shard in self.shards)


def manifest_to_bytes(manifest: Manifest) -> bytes:
    """Canonical JSON: sorted keys, fixed separators, so equal manifests are equal bytes."""
    document = asdict(manifest)
    return (json.dumps(document, sort_keys=True, indent=1) + "\n").encode()


def manifest_from_bytes(data: bytes, *, where: str = "manifest") -> Manifest:
    try:
        document = json.loads(data)
        if document.get("format") != MANIFEST_FORMAT:
            raise IntegrityError(
                f"{where}: manifest format {document.get('format')!r} is not {MANIFEST_FORMAT}"
            )
        return Manifest(
            digest=document["digest"],
            profile=document["profile"],
            python=document["python"],
            platform=document["platform"],
            install_dir=document["install_dir"],
            shards=tuple(
                Shard(**{**shard, "packages": tuple(shard["packages"])})
                for shard in document["shards"]
            ),
            env=dict(document["env"]),
            packages=tuple(PackageEntry(**p) for p in document["packages"]),
            directories=tuple(document.get("directories", ())),
            notes=tuple(document.get("notes", ())),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{where}: not a valid gpubuild manifest ({exc})") from None


def manifest_key(profile: str, digest: str) -> str:
    """Where a manifest lives in a store, relative to the store's root (DESIGN.md, "Stores")."""
    return f"{profile}/{digest}/manifest.json"


def blob_key(sha256: str) -> str:
    return f"blobs/{sha256}.tar.zst"
