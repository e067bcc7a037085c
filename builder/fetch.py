"""fetch: the init script's download, verification and unpack, in Python, for debugging.

Every shard is streamed from the store through sha256 (of the compressed bytes), zstd, sha256
(of the tar) and tar into a staging folder beside the destination. Only when every shard's
digests and file count match the manifest, and no link in the finished tree leads out of it,
does the staged tree move into place: a tampered or truncated shard leaves nothing unpacked,
and nothing is ever written outside the staging folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import zstandard

from builder.errors import BadInputError, IntegrityError
from builder.fields import SHA256, relative_path_problem
from builder.manifest import Manifest, Shard
from builder.progress import Progress, silent
from builder.stores import Store, open_store
from builder.stores.base import HashingReader
from builder.stores.urls import parse_oci_url
from builder.units import megabytes, plural

_CHUNK = 1 << 20
# Python's own guard too, where it has one (3.10.12+, 3.11.4+); check_member does not rely on it.
_DATA_FILTER: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


@dataclass(frozen=True)
class FetchResult:
    manifest: Manifest
    into: Path
    files: int
    raw_bytes: int  # unpacked
    bytes: int  # downloaded (compressed shards)
    seconds: float


def split_artifact_url(url: str) -> tuple[str, str, str]:
    """`STORE_URL/PROFILE/DIGEST` (or its `/manifest.json`, as publish-cache prints it) ->
    (store URL, profile, digest); a query (SAS) stays on the store URL."""
    base, sep, query = url.partition("?")
    base = base.rstrip("/")
    if base.endswith("/manifest.json"):
        base = base[: -len("/manifest.json")]
    parts = base.rsplit("/", 2)
    if len(parts) != 3 or not SHA256.match(parts[2]) or not parts[1]:
        shown = base if len(base) < 200 else base[:200] + "..."
        raise BadInputError(
            f"{shown!r}: expected STORE_URL/PROFILE/DIGEST or STORE_URL/PROFILE/DIGEST/"
            "manifest.json (a 64-hex-digit digest), as `gpubuild publish-cache` prints it"
        )
    store_url = parts[0] + (sep + query if sep else "")
    return store_url, parts[1], parts[2]


def repair_advice(store: Store, shard: Shard) -> str:
    """What fixes a shard whose bytes in `store` are not its digest, for that kind of store.

    A folder or a container overwrites a blob; a registry keeps one copy per digest and takes
    an upload of the same digest as already there, so only its garbage collection removes it."""
    if store.display_url.startswith(("oci://", "oci+http://")):
        return (
            f"the registry serves other bytes under layer sha256:{shard.sha256[:16]}..., and"
            " a registry cannot replace a blob: delete the images that name it (gpubuild gc,"
            " or the registry's tools), let the registry's garbage collection remove it, then"
            " publish the profile again; or look for a proxy that rewrites downloads"
        )
    return (
        f"delete blobs/{shard.sha256}.tar.zst from the store, then publish the profile again"
        " (gpubuild publish-cache --repair)"
    )


def _damaged(store: Store, shard: Shard, why: str) -> IntegrityError:
    return IntegrityError(
        f"shard {shard.sha256[:16]} is damaged ({why}): {repair_advice(store, shard)}"
    )


def member_problem(member: tarfile.TarInfo) -> str | None:
    """Why a shard may not hold `member`, or None. A shard holds regular files, folders and
    symlinks, by relative names without `..` or whiteouts (`.wh.*`), links that stay inside
    (no absolute target, no `..`). The init script refuses the same; with these rules no
    chain of links can lead out of the tree."""
    name = member.name
    kind = (
        "file"
        if member.isfile()
        else "folder"
        if member.isdir()
        else "link"
        if member.issym()
        else None
    )
    if kind is None:
        return "is neither a file, a folder nor a symlink"
    unsafe = relative_path_problem(name.rstrip("/"))
    if unsafe is not None:
        return f"has an unsafe name ({unsafe})"
    if kind == "link" and (member.linkname.startswith("/") or ".." in member.linkname.split("/")):
        return f"is a link that could lead out of the tree (-> {member.linkname[:80]!r})"
    return None


def check_member(member: tarfile.TarInfo, shard: Shard, store: Store) -> None:
    """Refuse a member of a shard from `store` before it is extracted."""
    problem = member_problem(member)
    if problem:
        raise _damaged(store, shard, f"member {member.name[:80]!r} {problem}")


def download_verified(store: Store, shard: Shard, folder: Path) -> Path:
    """The shard's bytes in a file in `folder`, checked against its sha256 and size before
    anything reads them as an archive."""
    path = folder / f"{shard.sha256}.tar.zst"
    digest, size = hashlib.sha256(), 0
    stream = store.open_blob(shard.sha256)
    try:
        with path.open("wb") as out:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if size > shard.bytes:
                    break
                out.write(chunk)
    finally:
        stream.close()
    if digest.hexdigest() != shard.sha256 or size != shard.bytes:
        path.unlink()
        raise IntegrityError(
            f"shard {shard.sha256[:16]}: got {size} bytes with sha256 {digest.hexdigest()[:16]},"
            f" expected {shard.bytes} bytes with {shard.sha256[:16]}; the copy in the store is"
            f" damaged or was replaced: {repair_advice(store, shard)}"
        )
    return path


def unpack_shard(source: Path, shard: Shard, into: Path, store: Store) -> None:
    """Unpack a verified shard file into `into`, member by member, then check its tar's
    sha256 and file count."""
    files = 0
    try:
        with (
            source.open("rb") as raw,
            zstandard.ZstdDecompressor().stream_reader(raw, read_size=_CHUNK) as plain,
        ):
            tar_bytes = HashingReader(plain)
            # tarfile reads any object with read(); typeshed asks for a full file object.
            stream = cast(BinaryIO, tar_bytes)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    check_member(member, shard, store)
                    if member.isfile() or member.issym():
                        files += 1
                    tar.extract(member, into, **_DATA_FILTER)
            while tar_bytes.read(_CHUNK):  # the tar's zero blocks count for tar_sha256 too
                pass
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
        raise _damaged(store, shard, str(exc)) from None
    if tar_bytes.sha256.hexdigest() != shard.tar_sha256 or files != shard.files:
        raise IntegrityError(
            f"shard {shard.sha256[:16]}: its tar does not match the manifest"
            f" ({files} files, expected {shard.files})"
        )


def links_leaving(root: Path) -> list[str]:
    """Symlinks under `root` that resolve outside it.

    The tar filter judges each link when it is extracted, so a chain (`__ -> .`, then
    `x -> __/../outside`) passes it link by link; only the finished tree tells."""
    real_root = os.path.realpath(root)
    leaving = []
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                continue
            resolved = os.path.realpath(path)
            if resolved != real_root and not resolved.startswith(real_root + os.sep):
                leaving.append(os.path.relpath(path, root))
    return sorted(leaving)


def package_label(packages: tuple[str, ...], limit: int = 3) -> str:
    if not packages:
        return "files no distribution claims"
    shown = ", ".join(packages[:limit])
    return shown if len(packages) <= limit else f"{shown} and {len(packages) - limit} more"


def _published_manifest(url: str, sas: str | None) -> tuple[Store, Manifest]:
    """The store and the manifest `url` names: STORE/PROFILE/DIGEST, or a registry's image
    (oci://REGISTRY/REPOSITORY@sha256:... or :TAG)."""
    if url.lower().startswith(("oci://", "oci+http://", "oci+https://")):
        location, reference = parse_oci_url(url)
        if reference is None:
            raise BadInputError(
                f"{location.display_url}: name the image: oci://REGISTRY/REPOSITORY@sha256:..."
                " (as publish-cache prints it) or :TAG"
            )
        from builder.stores.oci import open_oci_store  # requests: only for a registry

        registry = open_oci_store(location)
        manifest, _ = registry.manifest_at(reference)
        return registry, manifest
    store_url, profile, digest = split_artifact_url(url)
    store = open_store(store_url, sas=sas)
    return store, store.manifest(profile, digest)


def fetch(
    url: str, into: Path, *, sas: str | None = None, on_progress: Progress = silent
) -> FetchResult:
    report = on_progress
    if into.exists() and (not into.is_dir() or any(into.iterdir())):
        raise BadInputError(
            f"{into} exists and is not an empty folder; fetch unpacks into a new one"
        )
    store, manifest = _published_manifest(url, sas)
    into.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    raw_bytes = sum(shard.raw_bytes for shard in manifest.shards)
    with contextlib.ExitStack() as cleanup:
        # Beside `into` (the same file system, so the tree appears by one rename), removed
        # whatever happens: shards wait in `downloads` until their bytes are checked.
        staging = Path(tempfile.mkdtemp(prefix=f".{into.name}.fetch-", dir=into.parent))
        cleanup.callback(shutil.rmtree, staging, True)
        downloads = Path(tempfile.mkdtemp(prefix=f".{into.name}.download-", dir=into.parent))
        cleanup.callback(shutil.rmtree, downloads, True)
        for directory in manifest.directories:  # relative and inside: the reader checked
            (staging / directory).mkdir(parents=True, exist_ok=True)
        for number, shard in enumerate(manifest.shards, start=1):
            verified = download_verified(store, shard, downloads)
            unpack_shard(verified, shard, staging, store)
            verified.unlink()
            elapsed = max(time.monotonic() - start, 1e-6)
            report(
                f"shard {number}/{len(manifest.shards)} ok: {package_label(shard.packages)},"
                f" {megabytes(shard.bytes)} -> {megabytes(shard.raw_bytes)},"
                f" {plural(shard.files, 'file')}; {elapsed:.1f} s"
            )
        leaving = links_leaving(staging)
        if leaving:
            raise IntegrityError(
                f"{store.manifest_url(manifest.profile, manifest.digest)}: the unpacked set has"
                " links that lead"
                f" out of it ({', '.join(leaving[:5])}); nothing was unpacked into {into}."
                " gpubuild never packs such links: do not trust this store"
            )
        # One rename (it replaces an empty folder too): the whole tree appears at once, or not.
        staging.chmod(0o755)
        staging.rename(into)
    seconds = time.monotonic() - start
    report(
        f"unpacked {plural(manifest.total_files, 'file')} ({megabytes(raw_bytes)}, from"
        f" {megabytes(manifest.total_bytes)} of shards) into {into} in {seconds:.1f} s"
    )
    return FetchResult(
        manifest, into, manifest.total_files, raw_bytes, manifest.total_bytes, seconds
    )


def fetch_document(result: FetchResult) -> dict[str, object]:
    """The `--json` document of `gpubuild fetch`."""
    return {
        "profile": result.manifest.profile,
        "digest": result.manifest.digest,
        "into": str(result.into),
        "files": result.files,
        "raw_bytes": result.raw_bytes,
        "bytes": result.bytes,
        "seconds": round(result.seconds, 3),
        "env": result.manifest.env,
    }
