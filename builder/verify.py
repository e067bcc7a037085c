"""Verify a store (`gpubuild verify`): re-hash every blob that published manifests reference,
report the missing and the damaged ones, and upload good copies from a local pack.

Each blob is read once, in a stream (bounded memory, whatever its size), several at a time: the
sha256 and size of the .tar.zst, and, through zstd, the sha256 and size of the tar inside.
Judging what was found against the manifest is pure (`judge`); so is choosing which manifests a
selector names (`select_manifests`). docs/design.md#verify.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from builder.errors import (
    BadInputError,
    FormatError,
    IntegrityError,
    NotPublishedError,
    StoreError,
)
from builder.fields import PROFILE_NAME
from builder.manifest import Manifest, Shard, blob_key, manifest_key
from builder.progress import Progress, Step, silent
from builder.stores import FileStore, Store, StoredManifest
from builder.stores.base import COPY_CHUNK, HashingReader
from builder.units import megabytes, plural

VERIFY_WORKERS = 4
_MIN_PREFIX = 12


@dataclass(frozen=True)
class BlobHashes:
    """What a blob really holds: its sha256 and size, and those of the tar inside (None when
    it does not decompress; `error` says why)."""

    sha256: str
    bytes: int
    tar_sha256: str | None
    raw_bytes: int
    error: str = ""
    blake3: str = ""  # of the .tar.zst


@dataclass(frozen=True)
class BlobVerdict:
    shard: Shard
    state: str  # "ok", "missing", "damaged", or "repaired"
    detail: str
    used_by: tuple[str, ...]  # "profile/digest" of each manifest naming it


@dataclass(frozen=True)
class ManifestVerdict:
    profile: str
    digest: str
    state: str  # "ok", "damaged", or "repaired"
    detail: str = ""


@dataclass(frozen=True)
class VerifyReport:
    store: str
    manifests: tuple[ManifestVerdict, ...]
    blobs: tuple[BlobVerdict, ...]
    repair_from: Path | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        states = [v.state for v in self.manifests] + [v.state for v in self.blobs]
        return all(state in ("ok", "repaired") for state in states)


# --- the pure rules ---------------------------------------------------------------------------


def parse_selector(text: str | None) -> tuple[str | None, str | None]:
    """`PROFILE` or `PROFILE/DIGEST` (a digest prefix of at least 12 hex digits) -> parts."""
    if text is None:
        return None, None
    profile, _, digest = text.partition("/")
    if not PROFILE_NAME.match(profile):
        raise BadInputError(f"{text!r}: expected PROFILE or PROFILE/DIGEST (a profile name)")
    if digest and not (
        _MIN_PREFIX <= len(digest) <= 64 and all(c in "0123456789abcdef" for c in digest)
    ):
        raise BadInputError(
            f"{text!r}: the digest must be lowercase hex, at least {_MIN_PREFIX} digits"
        )
    return profile, digest or None


def select_manifests(
    listed: Iterable[StoredManifest], profile: str | None, digest: str | None
) -> list[StoredManifest]:
    """The listed manifests a selector names, sorted by profile and digest."""
    chosen = [
        m
        for m in listed
        if (profile is None or m.profile == profile)
        and (digest is None or m.digest.startswith(digest))
    ]
    return sorted(chosen, key=lambda m: (m.profile, m.digest))


def judge(shard: Shard, found: BlobHashes | None) -> tuple[str, str]:
    """(state, detail) of a blob against the shard a manifest pins."""
    if found is None:
        return "missing", "the store has no such blob"
    problems = []
    if found.bytes != shard.bytes:
        problems.append(f"{found.bytes:,} bytes, not {shard.bytes:,}")
    if found.sha256 != shard.sha256:
        problems.append(f"its sha256 is {found.sha256[:16]}...")
    elif shard.blake3 and found.blake3 != shard.blake3:
        # The bytes are the ones named, so the manifest's pin is what is wrong: pods whose
        # init image has b3sum would refuse the blob all the same.
        problems.append(
            f"its BLAKE3 is {found.blake3[:16]}..., a manifest pins {shard.blake3[:16]}...:"
            " the bytes are the named ones, so that manifest is wrong; delete its digest from the"
            " store and publish it again"
        )
    if found.tar_sha256 is None:
        problems.append(f"it does not decompress ({found.error})")
    elif (found.tar_sha256, found.raw_bytes) != (shard.tar_sha256, shard.raw_bytes):
        problems.append(
            f"its tar is {found.raw_bytes:,} bytes with sha256 {found.tar_sha256[:16]}...,"
            f" not {shard.raw_bytes:,} bytes with {shard.tar_sha256[:16]}..."
        )
    return ("damaged", "; ".join(problems)) if problems else ("ok", "")


# --- reading blobs ------------------------------------------------------------------------------


def hash_stream(stream: BinaryIO) -> BlobHashes:
    """The hashes of a .tar.zst read once from `stream`, in chunks."""
    outer = HashingReader(stream, with_blake3=True)
    inner = hashlib.sha256()
    raw = 0
    error = ""
    try:
        # zstandard reads any object with read(); its stubs ask for a file.
        source = cast(BinaryIO, outer)
        with zstandard.ZstdDecompressor().stream_reader(source, read_size=COPY_CHUNK) as plain:
            while chunk := plain.read(COPY_CHUNK):
                inner.update(chunk)
                raw += len(chunk)
    except zstandard.ZstdError as exc:
        error = str(exc) or "not zstd"
    while outer.read(COPY_CHUNK):  # bytes after the frame count for the outer sha256 too
        pass
    if raw == 0 and outer.bytes and not error:
        error = "no zstd frame"
    return BlobHashes(
        outer.sha256.hexdigest(),
        outer.bytes,
        None if error else inner.hexdigest(),
        raw,
        error,
        outer.blake3.hexdigest() if outer.blake3 is not None else "",
    )


def hash_blob(store: Store, sha256: str) -> BlobHashes | None:
    """The hashes of blob `sha256` as the store holds it; None when it has none."""
    stream = store.open_blob_if_present(sha256)
    if stream is None:
        return None
    try:
        return hash_stream(stream)
    finally:
        stream.close()


# --- the whole check ----------------------------------------------------------------------------


def verify_store(
    store: Store,
    selector: str | None = None,
    *,
    repair_from: Path | None = None,
    on_progress: Progress = silent,
    workers: int = VERIFY_WORKERS,
) -> VerifyReport:
    """Check every manifest the selector names (all by default) and every blob they reference;
    with `repair_from` (a local pack folder), replace what is missing or damaged there."""
    report = on_progress
    profile, digest = parse_selector(selector)
    local = FileStore(repair_from) if repair_from is not None else None
    chosen = select_manifests(store.list_manifests(), profile, digest)
    if selector is not None and not chosen:
        raise NotPublishedError(
            f"{store.display_url} has no published digest matching {selector}; list them with"
            " `gpubuild gc STORE --dry-run`"
        )
    manifest_verdicts: list[ManifestVerdict] = []
    readable: list[Manifest] = []
    for entry in chosen:
        verdict, manifest = _check_manifest(store, entry, local, report)
        manifest_verdicts.append(verdict)
        if manifest is not None:
            readable.append(manifest)
    users: dict[str, list[str]] = {}
    # A blob shared by several manifests is read once but judged against each distinct pin
    # (one manifest may pin its BLAKE3, another, older, not, or a wrong one).
    pins: dict[str, list[Shard]] = {}
    for manifest in readable:
        for shard in manifest.shards:
            listed = pins.setdefault(shard.sha256, [])
            if shard not in listed:
                listed.append(shard)
            users.setdefault(shard.sha256, []).append(f"{manifest.profile}/{manifest.digest}")
    shards = {sha256: listed[0] for sha256, listed in pins.items()}
    report(
        f"verifying {plural(len(shards), 'blob')} ({megabytes(sum(s.bytes for s in shards.values()))})"
        f" of {plural(len(readable), 'manifest')} in {store}"
    )
    ordered = sorted(shards.values(), key=lambda s: -s.bytes)  # the longest reads start first
    done = 0
    reporting = threading.Lock()

    def check(shard: Shard) -> BlobVerdict:
        nonlocal done
        found = hash_blob(store, shard.sha256)
        judged = shard
        state, detail = "ok", ""
        for pinned in pins[shard.sha256]:
            state, detail = judge(pinned, found)
            if state != "ok":
                judged = pinned
                break
        if state != "ok" and local is not None:
            state, detail = _repair_blob(store, local, judged, state, detail)
        with reporting:
            done += 1
            report(Step(done, len(ordered), f"checked {blob_key(shard.sha256)[:24]}..."))
            if state != "ok":
                report(f"{state}: {blob_key(shard.sha256)}: {detail}")
        return BlobVerdict(shard, state, detail, tuple(users[shard.sha256]))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        blob_verdicts = list(pool.map(check, ordered))
    counts: dict[str, int] = {}
    for state in [v.state for v in manifest_verdicts] + [v.state for v in blob_verdicts]:
        counts[state] = counts.get(state, 0) + 1
    return VerifyReport(
        store.display_url,
        tuple(manifest_verdicts),
        tuple(sorted(blob_verdicts, key=lambda v: v.shard.sha256)),
        repair_from,
        counts,
    )


def _check_manifest(
    store: Store, entry: StoredManifest, local: FileStore | None, report: Progress
) -> tuple[ManifestVerdict, Manifest | None]:
    """A listed manifest read by the one reader; a damaged one replaced from `local` when it
    holds a good copy."""
    try:
        return ManifestVerdict(entry.profile, entry.digest, "ok"), store.manifest(
            entry.profile, entry.digest
        )
    except NotPublishedError:
        return ManifestVerdict(
            entry.profile, entry.digest, "damaged", "deleted while checked"
        ), None
    except (FormatError, IntegrityError) as exc:
        problem = str(exc)
    report(f"damaged: {manifest_key(entry.profile, entry.digest)}: {problem}")
    if local is None:
        return ManifestVerdict(entry.profile, entry.digest, "damaged", problem), None
    try:
        good = local.manifest(entry.profile, entry.digest)
    except (NotPublishedError, FormatError, IntegrityError):
        return ManifestVerdict(
            entry.profile, entry.digest, "damaged", f"{problem}; no good copy in {local.root}"
        ), None
    store.put_manifest(entry.profile, entry.digest, local.get_manifest(entry.profile, entry.digest))
    report(f"repaired: {manifest_key(entry.profile, entry.digest)} from {local.root}")
    return ManifestVerdict(entry.profile, entry.digest, "repaired", problem), good


def _repair_blob(
    store: Store, local: FileStore, shard: Shard, state: str, detail: str
) -> tuple[str, str]:
    """Upload the local copy when it is good, then read the store's copy back."""
    path = local.root / blob_key(shard.sha256)
    mine = hash_blob(local, shard.sha256)
    if judge(shard, mine)[0] != "ok":
        return state, f"{detail}; no good copy in {local.root}"
    try:
        store.put_blob(shard.sha256, path, overwrite=state == "damaged")
    except StoreError as exc:  # a registry cannot replace a damaged blob: it says what can
        return state, f"{detail}; not replaced: {exc}"
    again, why = judge(shard, hash_blob(store, shard.sha256))
    if again != "ok":
        return state, f"{detail}; the copy uploaded from {local.root} reads back wrong: {why}"
    return "repaired", f"{detail}; replaced from {local.root}"


def describe(result: VerifyReport) -> list[str]:
    """Lines for a person."""
    lines = [
        f"{result.store}: {plural(len(result.manifests), 'manifest')} and"
        f" {plural(len(result.blobs), 'blob')} checked: "
        + ", ".join(f"{count} {state}" for state, count in sorted(result.counts.items()))
    ]
    for manifest in result.manifests:
        if manifest.state != "ok":
            lines.append(
                f"  {manifest.state}: {manifest_key(manifest.profile, manifest.digest)}:"
                f" {manifest.detail}"
            )
    for blob in result.blobs:
        if blob.state != "ok":
            lines.append(
                f"  {blob.state}: {blob_key(blob.shard.sha256)} (used by"
                f" {', '.join(blob.used_by)}): {blob.detail}"
            )
    if not result.ok and result.repair_from is None:
        lines.append(
            "  to fix it: verify again with --repair-from DIR (a local pack of those digests),"
            " or publish the profiles again (gpubuild publish-cache --repair)"
        )
    elif not result.ok:
        lines.append(
            f"  to fix it: {result.repair_from} lacks good copies; pack the profiles there"
            " (gpubuild pack --out DIR) and verify again, or publish them again"
            " (gpubuild publish-cache --repair)"
        )
    return lines


def verify_document(result: VerifyReport) -> dict[str, object]:
    """The `--json` document of `gpubuild verify`."""
    return {
        "store": result.store,
        "ok": result.ok,
        "counts": result.counts,
        "manifests": [
            {"profile": m.profile, "digest": m.digest, "state": m.state, "detail": m.detail}
            for m in result.manifests
        ],
        "blobs": [
            {
                "sha256": b.shard.sha256,
                "bytes": b.shard.bytes,
                "state": b.state,
                "detail": b.detail,
                "used_by": list(b.used_by),
            }
            for b in result.blobs
        ],
    }
