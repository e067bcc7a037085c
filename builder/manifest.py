"""The artifact manifest (docs/design.md#manifest), read and written in one place."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from builder.errors import FormatError
from builder.fields import (
    PACKAGE_NAME,
    PROFILE_NAME,
    SHA256,
    Fields,
    install_dir_problem,
    relative_path_problem,
)

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Shard:
    sha256: str  # of the compressed shard (.tar.zst): its name in the store
    bytes: int
    tar_sha256: str  # of the tar inside (an OCI diff_id)
    raw_bytes: int
    files: int  # regular files and symlinks in the tar
    packages: tuple[str, ...]
    # BLAKE3 of the compressed shard: what the init script checks when its image has b3sum
    # (a third of OpenSSL's sha256 CPU); "" in manifests packed before it was recorded.
    blake3: str = ""


@dataclass(frozen=True)
class PackageEntry:
    name: str
    version: str
    bytes: int


@dataclass(frozen=True)
class PrunedFiles:
    """What [policy] prune removed from one distribution before packing."""

    name: str
    files: int
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
    prune: tuple[str, ...] = ()  # the lock's prune patterns
    pruned: tuple[PrunedFiles, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(shard.bytes for shard in self.shards)

    @property
    def total_files(self) -> int:
        return sum(shard.files for shard in self.shards)


def manifest_to_bytes(manifest: Manifest) -> bytes:
    """Canonical JSON: sorted keys, fixed separators, so equal manifests are equal bytes."""
    document = asdict(manifest)
    # Written only when used: a manifest without pruning stays readable by older readers.
    for key in ("prune", "pruned"):
        if not document[key]:
            del document[key]
    for shard in document["shards"]:
        if not shard["blake3"]:
            del shard["blake3"]
    return (json.dumps(document, sort_keys=True, indent=1) + "\n").encode()


_MANIFEST_FIELDS = {
    "format", "digest", "profile", "python", "platform", "install_dir", "shards", "env",
    "packages", "directories", "notes", "prune", "pruned",
}  # fmt: skip
_PRUNED_FIELDS = {"name", "files", "bytes"}
_PRUNED_NAME = re.compile(r"^([a-z0-9]([a-z0-9._-]*[a-z0-9])?|\(unclaimed files\))$")
_SHARD_FIELDS = {"sha256", "bytes", "tar_sha256", "raw_bytes", "files", "packages", "blake3"}
_PACKAGE_FIELDS = {"name", "version", "bytes"}
_PYTHON = re.compile(r"^3\.\d{1,2}$")
_PLATFORM = re.compile(r"^[a-z0-9_]+(-[a-z0-9_]+)*$")
_VERSION = re.compile(r"^[A-Za-z0-9.+!_-]{1,64}$")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def manifest_from_bytes(data: bytes, *, where: str = "manifest") -> Manifest:
    """The one reader of manifests: every field checked, a FormatError (exit 2) naming `where`
    and the field otherwise. Paths in it can never lead out of the install folder."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise FormatError(where, None, f"not a gpubuild manifest: not JSON ({exc})") from None
    top = Fields(document, where)
    version = top.get("format")
    if version != MANIFEST_FORMAT or isinstance(version, bool):
        raise top.fail("format", f"{version!r} is not {MANIFEST_FORMAT}; gpubuild reads format 1")
    top.only(_MANIFEST_FIELDS)
    install_dir = top.string("install_dir")
    problem = install_dir_problem(install_dir)
    if problem:
        raise top.fail("install_dir", problem)
    env = top.get("env")
    if not isinstance(env, dict):
        raise top.fail("env", "must be an object of strings")
    env_fields = Fields(env, where, "env")
    for key in env:
        if not _ENV_NAME.match(key):
            raise top.fail(f"env.{key[:40]}", "is not an environment variable name")
        env_fields.string(key)
    directories = top.strings("directories", default=[])
    for number, directory in enumerate(directories):
        problem = relative_path_problem(directory)
        if problem:
            raise top.fail(f"directories[{number}]", f"{directory[:80]!r}: {problem}")
    return Manifest(
        digest=top.string("digest", pattern=SHA256),
        profile=top.string("profile", pattern=PROFILE_NAME),
        python=top.string("python", pattern=_PYTHON),
        platform=top.string("platform", pattern=_PLATFORM),
        install_dir=install_dir,
        shards=tuple(_shard(fields) for fields in top.objects("shards")),
        env={key: str(value) for key, value in env.items()},
        packages=tuple(_package(fields) for fields in top.objects("packages")),
        directories=tuple(directories),
        notes=tuple(top.strings("notes", default=[])),
        prune=tuple(top.strings("prune", default=[])),
        pruned=tuple(_pruned(fields) for fields in top.objects("pruned", default=[])),
    )


def _pruned(fields: Fields) -> PrunedFiles:
    fields.only(_PRUNED_FIELDS)
    return PrunedFiles(
        name=fields.string("name", pattern=_PRUNED_NAME),
        files=fields.integer("files"),
        bytes=fields.integer("bytes"),
    )


def _shard(fields: Fields) -> Shard:
    fields.only(_SHARD_FIELDS)
    return Shard(
        sha256=fields.string("sha256", pattern=SHA256),
        bytes=fields.integer("bytes"),
        tar_sha256=fields.string("tar_sha256", pattern=SHA256),
        raw_bytes=fields.integer("raw_bytes"),
        files=fields.integer("files"),
        packages=tuple(fields.strings("packages", pattern=PACKAGE_NAME)),
        # Absent in older manifests; when present (even null) it must be a digest.
        blake3=fields.string("blake3", pattern=SHA256) if "blake3" in fields.data else "",
    )


def _package(fields: Fields) -> PackageEntry:
    fields.only(_PACKAGE_FIELDS)
    return PackageEntry(
        name=fields.string("name", pattern=PACKAGE_NAME),
        version=fields.string("version", pattern=_VERSION),
        bytes=fields.integer("bytes"),
    )


def manifest_key(profile: str, digest: str) -> str:
    """Where a manifest lives in a store, relative to the store's root (docs/design.md#stores)."""
    return f"{profile}/{digest}/manifest.json"


def blob_key(sha256: str) -> str:
    return f"blobs/{sha256}.tar.zst"
