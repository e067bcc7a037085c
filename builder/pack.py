"""Pack: a lock materialised for its target (install.py), the tree fixed for its new home
(tree.py), written as reproducible, content-addressed shards and a manifest, last.

docs/design.md#artifact. The order on disk is what makes a half-done run harmless: shards are
written in this run's locked work folder and renamed to their sha256 only when complete, and
the manifest, which is what every reader looks for, is written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import tarfile
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import blake3
import zstandard

from builder.errors import ToolFailedError
from builder.files import work_folder, write_atomically
from builder.indexes import IndexSettings, real_index_urls
from builder.install import check_tree, disk_error, materialise
from builder.lock import Lock
from builder.manifest import (
    Manifest,
    PackageEntry,
    PrunedFiles,
    Shard,
    blob_key,
    manifest_key,
    manifest_to_bytes,
)
from builder.profile import Profile
from builder.progress import Progress, Step, silent
from builder.prune import prune_tree
from builder.stores import FileLocation, FileStore, default_store_url, parse_store_url
from builder.tree import (
    Entry,
    Listing,
    ShardPlan,
    assign_owners,
    distribution_sizes,
    find_pth_files,
    fix_tree,
    library_dirs,
    list_tree,
    plan_shards,
    pth_note,
    read_distributions,
)
from builder.units import megabytes, plural, rate

DEFAULT_SHARD_THRESHOLD = 16 * 2**20
# A distribution above this many installed bytes is split into shards by whole files: the
# largest shard is the critical path of an unpack on a big node, and decompressing and writing
# cost by installed bytes (a compressed shard is smaller still).
DEFAULT_SPLIT_BYTES = 256 * 2**20
# Level 9 with its literals stored raw (not Huffman-coded): the shards are written once and
# downloaded and unpacked at every pod start, where decoding is the largest cost. On the
# torch-cu121 set raw literals send 11% more bytes than level 9's default and cut the pod's CPU
# by 15% (its decoding by 28%): the shortest projected pod start at 1 GB/s and under the
# generated `limits.cpu: 4`, 5% longer at 200 MB/s (bench/bench_compression.py, README).
ZSTD_LEVEL = 9
# 2000-01-01: any constant is reproducible, and one after 1980 keeps zipfile (which refuses
# older dates) working on the unpacked files, e.g. when Ray zips a runtime_env folder.
FIXED_MTIME = 946_684_800
_COPY_BUFFER = 2**20

WORK_PREFIX = ".pack-"
# Temporary files an older gpubuild, or a killed store write, left in a store folder.
LEFTOVERS = ("blobs/.shard-*.partial", "blobs/.*.tmp", "*/*/.manifest.json.*.partial")
_DEFAULT_SETTINGS = IndexSettings()


@dataclass(frozen=True)
class PackResult:
    manifest: Manifest
    manifest_path: Path
    out_dir: Path
    reused: bool
    repaired: tuple[Shard, ...] = ()  # damaged blobs that a repair packed again
    written: tuple[Shard, ...] = ()  # shards whose blobs this pack added to out_dir


# --- shards -----------------------------------------------------------------------------------


class _Hashing(io.RawIOBase):
    """A write-only stream that hashes and counts the bytes it passes on to `target`."""

    def __init__(self, target: BinaryIO, *, with_blake3: bool = False) -> None:
        super().__init__()
        self.target = target
        self.sha256 = hashlib.sha256()
        self.blake3 = blake3.blake3() if with_blake3 else None
        self.count = 0

    def writable(self) -> bool:
        return True

    # typeshed spells the argument ReadableBuffer, a name only a stub has: this is the same.
    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data)
        self.sha256.update(view)
        if self.blake3 is not None:
            self.blake3.update(view)
        self.count += view.nbytes
        self.target.write(view)
        return view.nbytes

    def tell(self) -> int:  # tarfile asks where it is when it opens for writing
        return self.count


def _tar_info(entry: Entry, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.path)
    info.mtime = FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.link is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = entry.link
        info.mode = 0o777
    else:
        info.size = size
        info.mode = 0o755 if entry.executable else 0o644
    return info


def _zstd_threads() -> int:
    # Never 0: zstd's single-threaded mode writes other bytes than its multithreaded mode, whose
    # output is the same for any number of workers >= 1 (so every machine packs equal shards).
    return max(1, (os.cpu_count() or 1) // 2)


def shard_compressor() -> zstandard.ZstdCompressor:
    """Level ZSTD_LEVEL, literals stored raw, no frame checksum, the same bytes on any machine.

    python-zstandard's C backend does not offer zstd's literal compression mode; its cffi
    backend, the same library built from the same sources, reaches it on the compressor's
    context (which every stream keeps: a new stream resets the session, not the parameters)."""
    try:
        # Untyped (cffi), hence Any.
        backend_cffi: Any = importlib.import_module("zstandard.backend_cffi")
    except ImportError as exc:
        raise ToolFailedError(
            f"python-zstandard's cffi backend is not importable ({exc}): install the cffi package"
        ) from exc
    # No zstd frame checksum: the sha256 of the shard (checked before unpacking) and of its
    # tar cover the bytes, and every decoder would spend a pass on XXH64 for nothing.
    parameters = backend_cffi.ZstdCompressionParameters.from_level(
        ZSTD_LEVEL, threads=_zstd_threads(), write_checksum=0
    )
    compressor = backend_cffi.ZstdCompressor(compression_params=parameters)
    context = getattr(compressor, "_cctx", None)
    lib: Any = getattr(backend_cffi, "lib", None)
    if context is None or not hasattr(lib, "ZSTD_c_literalCompressionMode"):
        raise ToolFailedError(
            f"python-zstandard {zstandard.__version__} does not expose zstd's literal compression"
            " mode the way gpubuild reaches it (0.25 does)"
        )
    result = lib.ZSTD_CCtx_setParameter(
        context, lib.ZSTD_c_literalCompressionMode, lib.ZSTD_ps_disable
    )
    if lib.ZSTD_isError(result):
        name = backend_cffi.ffi.string(lib.ZSTD_getErrorName(result)).decode()
        raise ToolFailedError(f"zstd refused to store literals raw: {name}")
    return cast(zstandard.ZstdCompressor, compressor)


def write_shard(
    tree: Path, plan: ShardPlan, entries: Mapping[str, Entry], blobs: Path, work: Path
) -> Shard:
    """Stream one reproducible tar through zstd into blobs/, hashing both; no temporary tar.

    The bytes go to a file in `work` (this run's locked work folder, on the same file system)
    and are renamed into blobs/ when complete: a killed run leaves nothing in blobs/."""
    fd, temp_name = tempfile.mkstemp(dir=work, prefix=".shard-", suffix=".partial")
    temp = Path(temp_name)
    try:
        # mkstemp makes 0600; a store folder is read by other users (a non-root init
        # container, a web server's workers), so blobs are world-readable like manifests.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb", buffering=_COPY_BUFFER) as output:
            compressed = _Hashing(output, with_blake3=True)
            # zstandard and tarfile ask for a file object; _Hashing is one (a raw writer).
            compressed_io = cast(BinaryIO, compressed)
            compressor = shard_compressor()
            with compressor.stream_writer(compressed_io, closefd=False) as zstd_stream:
                raw = _Hashing(cast(BinaryIO, zstd_stream))
                archive = tarfile.TarFile(
                    fileobj=cast(BinaryIO, raw),
                    mode="w",
                    format=tarfile.PAX_FORMAT,
                    copybufsize=_COPY_BUFFER,
                )
                for path in plan.paths:
                    entry = entries[path]
                    if entry.link is not None:
                        archive.addfile(_tar_info(entry, 0))
                        continue
                    with open(tree / path, "rb") as source:
                        size = os.fstat(source.fileno()).st_size
                        archive.addfile(_tar_info(entry, size), source)
                archive.close()
            output.flush()
            os.fsync(output.fileno())
        sha256 = compressed.sha256.hexdigest()
        # Always replace: the bytes just written are known good, while a blob already there
        # with the same name may have been damaged since (a size check cannot tell).
        os.replace(temp, blobs.parent / blob_key(sha256))
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return Shard(
        sha256=sha256,
        bytes=compressed.count,
        tar_sha256=raw.sha256.hexdigest(),
        raw_bytes=raw.count,
        files=len(plan.paths),
        packages=plan.packages,
        blake3=compressed.blake3.hexdigest() if compressed.blake3 is not None else "",
    )


def environment(
    install_dir: str, listing: Listing, extra_python_paths: list[str]
) -> dict[str, str]:
    """PYTHONPATH (the install folder, then folders .pth files name) and LD_LIBRARY_PATH.

    LD_LIBRARY_PATH follows `builder.tree.library_dirs`; it is "" when the tree has none.
    """
    root = install_dir.rstrip("/")
    python_path = [root, *(f"{root}/{p}" for p in extra_python_paths)]
    return {
        "PYTHONPATH": ":".join(python_path),
        "LD_LIBRARY_PATH": ":".join(f"{root}/{d}" for d in library_dirs(listing)),
    }


def write_artifact(
    tree: Path,
    out_dir: Path,
    *,
    profile: str,
    digest: str,
    python: str,
    platform: str,
    install_dir: str,
    packages: list[PackageEntry] | None = None,
    shard_threshold: int = DEFAULT_SHARD_THRESHOLD,
    split_bytes: int = DEFAULT_SPLIT_BYTES,
    on_progress: Progress = silent,
    work: Path | None = None,
    prune: tuple[str, ...] = (),
    pruned: tuple[PrunedFiles, ...] = (),
) -> Manifest:
    """Write the shards of an installed tree into out_dir/blobs and its manifest, last.

    `work`: a locked work folder in out_dir for partial shards (one is made when None)."""
    if work is None:
        with work_folder(out_dir, WORK_PREFIX, patterns=LEFTOVERS) as fresh:
            return write_artifact(
                tree,
                out_dir,
                profile=profile,
                digest=digest,
                python=python,
                platform=platform,
                install_dir=install_dir,
                packages=packages,
                shard_threshold=shard_threshold,
                split_bytes=split_bytes,
                on_progress=on_progress,
                work=fresh,
                prune=prune,
                pruned=pruned,
            )
    report = on_progress
    listing = list_tree(tree)
    distributions = read_distributions(tree, listing)
    ownership = assign_owners(listing, distributions)
    file_sizes = {entry.path: entry.size for entry in listing.entries}
    plans = plan_shards(ownership, file_sizes, shard_threshold, split_bytes=split_bytes)
    if packages is None:
        sizes = distribution_sizes(ownership, file_sizes)
        packages = [PackageEntry(d.name, d.version, sizes.get(d.name, 0)) for d in distributions]
    pth_files = find_pth_files(tree, listing)
    notes = [pth_note(p) for p in pth_files]
    if ownership.unclaimed:
        notes.append(
            f"{len(ownership.unclaimed)} file(s) that no RECORD claims are packed in a shard of"
            f" their own: {', '.join(ownership.unclaimed[:10])}"
            + (" ..." if len(ownership.unclaimed) > 10 else "")
        )
    if ownership.shared:
        notes.append(
            f"{len(ownership.shared)} file(s) claimed by several distributions are packed once,"
            f" in the leftover shard: {', '.join(sorted(ownership.shared)[:10])}"
            + (" ..." if len(ownership.shared) > 10 else "")
        )
    blobs = out_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    entries = {entry.path: entry for entry in listing.entries}
    shards = _write_shards(tree, plans, entries, blobs, work, listing.total_bytes, report)
    manifest = Manifest(
        digest=digest,
        profile=profile,
        python=python,
        platform=platform,
        install_dir=install_dir,
        # Largest first: an unpacker that starts them in order keeps every core busy longest.
        shards=tuple(sorted(shards, key=lambda s: (-s.raw_bytes, s.sha256))),
        env=environment(install_dir, listing, [d for p in pth_files for d in p.paths]),
        packages=tuple(sorted(packages, key=lambda p: p.name)),
        directories=listing.directories,
        notes=tuple(notes),
        prune=prune,
        pruned=pruned,
    )
    path = out_dir / manifest_key(profile, digest)
    try:
        write_atomically(path, manifest_to_bytes(manifest))
    except OSError as exc:
        raise disk_error(exc, out_dir, "writing the manifest", 0) from None
    return manifest


def _write_shards(
    tree: Path,
    plans: list[ShardPlan],
    entries: Mapping[str, Entry],
    blobs: Path,
    work: Path,
    total: int,
    report: Progress,
) -> list[Shard]:
    # Several shards at once (zstandard and hashlib release the GIL); largest first so the
    # biggest shard does not start last and finish alone.
    order = sorted(plans, key=lambda plan: -plan.raw_size)
    workers = max(1, min(len(order), max(2, (os.cpu_count() or 1) // 4)))
    started = time.monotonic()
    shards: list[Shard] = []
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard")
    try:
        pending = {pool.submit(_timed_shard, tree, plan, entries, blobs, work) for plan in order}
        while pending:
            # Each shard is reported when it is done, not when the last one is.
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                error = future.exception()
                if error is not None:
                    # Running shards remove their own temporary files; wait for them first.
                    pool.shutdown(wait=True, cancel_futures=True)
                    if isinstance(error, OSError):
                        raise disk_error(error, blobs.parent, "writing shards", total) from None
                    raise error
                shard, seconds = future.result()
                shards.append(shard)
                report(
                    Step(
                        len(shards),
                        len(order),
                        f"shard {', '.join(shard.packages) or '(files no distribution claims)'}:"
                        f" {megabytes(shard.raw_bytes)} -> {megabytes(shard.bytes)} in {seconds:.1f} s"
                        f" ({rate(shard.raw_bytes, seconds)})",
                    )
                )
    finally:
        # Also on Ctrl-C or SIGTERM: shards not started yet never start.
        pool.shutdown(wait=True, cancel_futures=True)
    seconds = time.monotonic() - started
    raw = sum(s.raw_bytes for s in shards)
    report(
        f"packed {len(shards)} shard{'s' * (len(shards) != 1)}: {megabytes(raw)} ->"
        f" {megabytes(sum(s.bytes for s in shards))} in {seconds:.1f} s ({rate(raw, seconds)})"
    )
    return shards


def _timed_shard(
    tree: Path, plan: ShardPlan, entries: Mapping[str, Entry], blobs: Path, work: Path
) -> tuple[Shard, float]:
    started = time.monotonic()
    shard = write_shard(tree, plan, entries, blobs, work)
    return shard, time.monotonic() - started


# --- the whole stage ----------------------------------------------------------------------------


def reusable_manifest(out_dir: Path, profile: str, digest: str) -> Manifest | None:
    """The packed manifest for this digest when it and every shard it names are complete."""
    return FileStore(out_dir).complete_manifest(profile, digest)


def pack(
    lock: Lock,
    profile: Profile,
    *,
    lock_path: Path,
    out_dir: Path,
    settings: IndexSettings = _DEFAULT_SETTINGS,
    on_progress: Progress = silent,
    shard_threshold: int = DEFAULT_SHARD_THRESHOLD,
) -> PackResult:
    """Materialise `lock` for the profile's target, fix and check the tree, write the artifact.

    Never resolves: the lock comes from the stage before (builder.pipeline). `profile` gives
    the target and the policy the tree is checked against; `settings` the index URLs with
    their credentials (the lock records them without)."""
    report = on_progress
    digest = lock.digest()
    manifest_path = out_dir / manifest_key(profile.name, digest)
    existing = reusable_manifest(out_dir, profile.name, digest)
    if existing is not None:
        report(f"{profile.name} {digest[:16]} is already packed in {out_dir}")
        return PackResult(existing, manifest_path, out_dir, reused=True)
    with contextlib.ExitStack() as stack:
        try:
            # Inside out_dir: the same filesystem, so the tree is never copied across disks.
            # The folder is locked while this run lives; a killed run's is swept by the next.
            work = stack.enter_context(work_folder(out_dir, WORK_PREFIX, patterns=LEFTOVERS))
        except OSError as exc:
            raise disk_error(exc, out_dir, "creating a work folder", 0) from None
        blobs = out_dir / "blobs"
        present = set(os.listdir(blobs)) if blobs.is_dir() else set()
        try:
            tree = work / "tree"
            materialise(
                lock_path,
                lock,
                tree,
                python=lock.python,
                platform=lock.platform,
                real_urls=real_index_urls(profile, settings),
                default_url=settings.default_url,
                on_progress=report,
            )
            fixes = fix_tree(tree, profile.target.interpreter)
            report(
                f"fixed the tree: {len(fixes.shebangs)} shebang(s) rewritten,"
                f" {len(fixes.removed)} cache file(s)/folder(s) removed"
            )
            for note in fixes.pth_notes:
                report(f"note: {note}")
            pruned = prune_tree(tree, lock.prune)
            if pruned:
                report(
                    f"pruned {plural(sum(p.files for p in pruned), 'file')}"
                    f" ({megabytes(sum(p.bytes for p in pruned))}) of"
                    f" {len(pruned)} distribution(s) by [policy] prune"
                )
            check_tree(tree, lock, profile)
            manifest = write_artifact(
                tree,
                out_dir,
                profile=profile.name,
                digest=digest,
                python=lock.python,
                platform=lock.platform,
                install_dir=profile.target.install_dir,
                shard_threshold=shard_threshold,
                on_progress=report,
                work=work,
                prune=lock.prune,
                pruned=tuple(pruned),
            )
        except OSError as exc:  # fixing the tree; uv and the shard writer report their own
            raise disk_error(exc, out_dir, "fixing the installed tree", 0) from None
    written = tuple(s for s in manifest.shards if f"{s.sha256}.tar.zst" not in present)
    return PackResult(manifest, manifest_path, out_dir, reused=False, written=written)


def default_store_dir() -> Path:
    """The local store folder (`builder.stores.default_store_url`) when --out is not given."""
    location = parse_store_url(default_store_url())
    assert isinstance(location, FileLocation)
    return location.root


def manifest_document(result: PackResult) -> dict[str, object]:
    """The `--json` document of `gpubuild pack`."""
    manifest = result.manifest
    return {
        "profile": manifest.profile,
        "digest": manifest.digest,
        "manifest": str(result.manifest_path),
        "reused": result.reused,
        "shards": [
            {
                "sha256": s.sha256,
                "bytes": s.bytes,
                "raw_bytes": s.raw_bytes,
                "files": s.files,
                "packages": list(s.packages),
            }
            for s in manifest.shards
        ],
        "bytes": manifest.total_bytes,
        "raw_bytes": sum(s.raw_bytes for s in manifest.shards),
        "files": manifest.total_files,
        "env": manifest.env,
        "notes": list(manifest.notes),
    }
