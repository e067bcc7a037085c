"""fetch: the init script's download, verification and unpack, in Python, for debugging.

Every shard is streamed from the store through sha256 (of the compressed bytes), zstd, sha256
(of the tar) and tar into a staging folder beside the destination. Only when every shard's
digests and file count match the manifest does the staged tree move into place, so a tampered
or truncated shard leaves nothing unpacked.
"""

from __future__ import annotations

import hashlib
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
from builder.manifest import Manifest, Shard, manifest_from_bytes
from builder.store import Store, open_store

Progress = Callable[[str], None]
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FetchResult:
    manifest: Manifest
    into: Path
    files: int
    bytes: int
    seconds: float


def split_artifact_url(url: str) -> tuple[str, str, str]:
    """`STORE_URL/PROFILE/DIGEST` -> (store URL, profile, digest); a query (SAS) stays on the store."""
    base, sep, query = url.partition("?")
    parts = base.rstrip("/").rsplit("/", 2)
    if len(parts) != 3 or len(parts[2]) != 64 or not all(c in "0123456789abcdef" for c in parts[2]):
        raise BadInputError(
            f"{base!r}: expected STORE_URL/PROFILE/DIGEST (a 64-hex-digit digest at the end)"
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


def unpack_shard(stream: BinaryIO, shard: Shard, into: Path) -> None:
    """Stream one shard into `into`, then check both digests and the file count."""
    compressed = _HashingReader(stream)
    with zstandard.ZstdDecompressor().stream_reader(compressed, read_size=_CHUNK) as plain:
        tar_bytes = _HashingReader(plain)  # type: ignore[arg-type]
        files = 0
        try:
            with tarfile.open(fileobj=tar_bytes, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    if member.isfile() or member.issym():
                        files += 1
                    tar.extract(member, into, **_safe_filter())
        except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
            raise IntegrityError(
                f"shard {shard.sha256[:16]} is damaged ({exc}): delete"
                f" blobs/{shard.sha256}.tar.zst from the store, then publish the profile again"
            ) from None
        while tar_bytes.read(_CHUNK):  # the tar's zero blocks count for tar_sha256 too
            pass
    while compressed.read(_CHUNK):
        pass
    if compressed.sha256.hexdigest() != shard.sha256 or compressed.bytes != shard.bytes:
        raise IntegrityError(
            f"shard {shard.sha256[:16]}: got {compressed.bytes} bytes with sha256"
            f" {compressed.sha256.hexdigest()[:16]}, expected {shard.bytes} bytes with"
            f" {shard.sha256[:16]}; the copy in the store is damaged or was replaced: delete"
            f" blobs/{shard.sha256}.tar.zst from the store, then publish the profile again"
        )
    if tar_bytes.sha256.hexdigest() != shard.tar_sha256 or files != shard.files:
        raise IntegrityError(
            f"shard {shard.sha256[:16]}: its tar does not match the manifest"
            f" ({files} files, expected {shard.files})"
        )


def _safe_filter() -> dict[str, object]:
    # The "data" filter refuses absolute paths, links out of the tree and device files.
    return {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


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
    if manifest.digest != digest:
        raise IntegrityError(
            f"{store.manifest_url(profile, digest)} describes digest {manifest.digest}"
        )
    into.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{into.name}.fetch-", dir=into.parent))
    start = time.monotonic()
    try:
        for directory in manifest.directories:
            (staging / directory).mkdir(parents=True, exist_ok=True)
        for number, shard in enumerate(manifest.shards, start=1):
            _fetch_shard(store, shard, staging)
            elapsed = max(time.monotonic() - start, 1e-6)
            report(
                f"shard {number}/{len(manifest.shards)} ok: {shard.bytes / 1e6:,.1f} MB,"
                f" {shard.files} files ({', '.join(shard.packages)[:60]}); {elapsed:.1f} s"
            )
        # One rename (it replaces an empty folder too): the whole tree appears at once, or not.
        staging.chmod(0o755)
        staging.rename(into)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.monotonic() - start
    report(
        f"unpacked {manifest.total_files} files ({manifest.total_bytes / 1e6:,.1f} MB) into {into} in {seconds:.1f} s"
    )
    return FetchResult(manifest, into, manifest.total_files, manifest.total_bytes, seconds)


def _fetch_shard(store: Store, shard: Shard, staging: Path) -> None:
    stream = store.open_blob(shard.sha256)
    try:
        unpack_shard(stream, shard, staging)
    finally:
        stream.close()
