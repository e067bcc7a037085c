"""fetch: the init script's download, verification and unpack, in Python, for debugging.

Every shard is streamed from the store through sha256 (of the compressed bytes), zstd, sha256
(of the tar) and tar into a staging folder beside the destination. Only when every shard's
digests and file count match the manifest, and no link in the finished tree leads out of it,
does the staged tree move into place: a tampered or truncated shard leaves nothing unpacked,
and nothing is ever written outside the staging folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from builder.errors import BadInputError, IntegrityError
from builder.fields import SHA256
from builder.manifest import Manifest, Shard, manifest_from_bytes
from builder.store import Store, open_store

Progress = Callable[[str], None]
_CHUNK = 1 << 20


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


class _HashingReader:
    """Reads from `source`, hashing and counting what passes."""

    def __init__(self, source: BinaryIO) -> None:
        self.source = source
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data


def _damaged(shard: Shard, why: str) -> IntegrityError:
    return IntegrityError(
        f"shard {shard.sha256[:16]} is damaged ({why}): delete blobs/{shard.sha256}.tar.zst"
        " from the store, then publish the profile again (gpubuild publish-cache --repair)"
    )


def unpack_shard(stream: BinaryIO, shard: Shard, into: Path) -> None:
    """Stream one shard into `into`, then check both digests and the file count."""
    compressed = _HashingReader(stream)
    files = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(compressed, read_size=_CHUNK) as plain:
            tar_bytes = _HashingReader(plain)  # type: ignore[arg-type]
            with tarfile.open(fileobj=tar_bytes, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    if member.isfile() or member.issym():
                        files += 1
                    tar.extract(member, into, **_safe_filter())
            while tar_bytes.read(_CHUNK):  # the tar's zero blocks count for tar_sha256 too
                pass
        while compressed.read(_CHUNK):
            pass
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
        raise _damaged(shard, str(exc)) from None
    if compressed.sha256.hexdigest() != shard.sha256 or compressed.bytes != shard.bytes:
        raise IntegrityError(
            f"shard {shard.sha256[:16]}: got {compressed.bytes} bytes with sha256"
            f" {compressed.sha256.hexdigest()[:16]}, expected {shard.bytes} bytes with"
            f" {shard.sha256[:16]}; the copy in the store is damaged or was replaced: delete"
            f" blobs/{shard.sha256}.tar.zst from the store, then publish the profile again"
            " (gpubuild publish-cache --repair)"
        )
    if tar_bytes.sha256.hexdigest() != shard.tar_sha256 or files != shard.files:
        raise IntegrityError(
            f"shard {shard.sha256[:16]}: its tar does not match the manifest"
            f" ({files} files, expected {shard.files})"
        )


def _safe_filter() -> dict[str, object]:
    # The "data" filter refuses absolute paths, links out of the tree and device files.
    return {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


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


def plural(count: int, word: str) -> str:
    return f"{count:,} {word}" if count == 1 else f"{count:,} {word}s"


def megabytes(count: int) -> str:
    """Decimal MB with enough digits that a small amount is not shown as 0.0 MB."""
    if count < 100_000:
        return f"{count / 1e3:,.1f} kB"
    return f"{count / 1e6:,.1f} MB"


def fetch(
    url: str, into: Path, *, sas: str | None = None, on_progress: Progress | None = None
) -> FetchResult:
    report = on_progress or (lambda message: None)
    store_url, profile, digest = split_artifact_url(url)
    if into.exists() and (not into.is_dir() or any(into.iterdir())):
        raise BadInputError(
            f"{into} exists and is not an empty folder; fetch unpacks into a new one"
        )
    store = open_store(store_url, sas=sas)
    manifest = manifest_from_bytes(
        store.get_manifest(profile, digest), where=store.manifest_url(profile, digest)
    )
    if manifest.digest != digest or manifest.profile != profile:
        raise IntegrityError(
            f"{store.manifest_url(profile, digest)} describes {manifest.profile}"
            f" {manifest.digest}, not {profile} {digest}"
        )
    into.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{into.name}.fetch-", dir=into.parent))
    start = time.monotonic()
    raw_bytes = sum(shard.raw_bytes for shard in manifest.shards)
    try:
        for directory in manifest.directories:  # relative and inside: the reader checked
            (staging / directory).mkdir(parents=True, exist_ok=True)
        for number, shard in enumerate(manifest.shards, start=1):
            _fetch_shard(store, shard, staging)
            elapsed = max(time.monotonic() - start, 1e-6)
            report(
                f"shard {number}/{len(manifest.shards)} ok: {package_label(shard.packages)},"
                f" {megabytes(shard.bytes)} -> {megabytes(shard.raw_bytes)},"
                f" {plural(shard.files, 'file')}; {elapsed:.1f} s"
            )
        leaving = links_leaving(staging)
        if leaving:
            raise IntegrityError(
                f"{store.manifest_url(profile, digest)}: the unpacked set has links that lead"
                f" out of it ({', '.join(leaving[:5])}); nothing was unpacked into {into}."
                " gpubuild never packs such links: do not trust this store"
            )
        # One rename (it replaces an empty folder too): the whole tree appears at once, or not.
        staging.chmod(0o755)
        staging.rename(into)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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


def _fetch_shard(store: Store, shard: Shard, staging: Path) -> None:
    stream = store.open_blob(shard.sha256)
    try:
        unpack_shard(stream, shard, staging)
    finally:
        stream.close()
