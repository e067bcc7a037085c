"""Pack: materialise a lock for its target, fix the tree for its new home, write shards + manifest.

DESIGN.md "Pack: the artifact contract". The order on disk is what makes a half-done run
harmless: shards are written under temporary names and renamed to their sha256 only when
complete, and the manifest, which is what every reader looks for, is written last.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import zstandard
from packaging.version import Version

from builder.base import read_snapshot
from builder.errors import (
    DiskFullError,
    GpubuildError,
    IntegrityError,
    PolicyViolationError,
    ToolFailedError,
)
from builder.files import work_folder, write_atomically
from builder.lock import Lock
from builder.manifest import (
    Manifest,
    PackageEntry,
    Shard,
    blob_key,
    manifest_from_bytes,
    manifest_key,
    manifest_to_bytes,
)
from builder.profile import Profile
from builder.progress import Progress, Step, silent
from builder.resolve import IndexSettings, real_index_urls, resolve
from builder.secrets import redact_url, scrub
from builder.tools import run_uv
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

DEFAULT_SHARD_THRESHOLD = 16 * 2**20
ZSTD_LEVEL = 3  # fast; the shards are written once and unpacked at every pod start
# 2000-01-01: any constant is reproducible, and one after 1980 keeps zipfile (which refuses
# older dates) working on the unpacked files, e.g. when Ray zips a runtime_env folder.
FIXED_MTIME = 946_684_800
_COPY_BUFFER = 2**20

WORK_PREFIX = ".pack-"
# Temporary files an older gpubuild, or a killed store write, left in a store folder.
LEFTOVERS = ("blobs/.shard-*.partial", "blobs/.*.tmp", "*/*/.manifest.json.*.partial")
# uv's lines worth passing on while it installs (it prints them without a terminal too).
_UV_PROGRESS = ("Downloading ", "Downloaded ", "Prepared ", "Installed ")
_DEFAULT_SETTINGS = IndexSettings()


@dataclass(frozen=True)
class PackResult:
    manifest: Manifest
    manifest_path: Path
    out_dir: Path
    reused: bool
    repaired: tuple[Shard, ...] = ()  # damaged blobs that a repair packed again


# --- shards -----------------------------------------------------------------------------------


class _Hashing:
    """A write-only file object that hashes and counts the bytes it passes on."""

    def __init__(self, target: object) -> None:
        self.target = target
        self.sha256 = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.count += len(data)
        self.target.write(data)  # type: ignore[attr-defined]
        return len(data)

    def tell(self) -> int:  # tarfile asks where it is when it opens for writing
        return self.count

    def flush(self) -> None:
        pass


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
            compressed = _Hashing(output)
            compressor = zstandard.ZstdCompressor(
                level=ZSTD_LEVEL, threads=_zstd_threads(), write_checksum=True
            )
            with compressor.stream_writer(compressed, closefd=False) as zstd_stream:
                raw = _Hashing(zstd_stream)
                archive = tarfile.TarFile(
                    fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, copybufsize=_COPY_BUFFER
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
    on_progress: Progress = silent,
    work: Path | None = None,
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
                on_progress=on_progress,
                work=fresh,
            )
    report = on_progress
    listing = list_tree(tree)
    distributions = read_distributions(tree, listing)
    ownership = assign_owners(listing, distributions)
    file_sizes = {entry.path: entry.size for entry in listing.entries}
    plans = plan_shards(ownership, file_sizes, shard_threshold)
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
    )
    path = out_dir / manifest_key(profile, digest)
    try:
        write_atomically(path, manifest_to_bytes(manifest))
    except OSError as exc:
        raise _disk_error(exc, out_dir, "writing the manifest", 0) from None
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
                        raise _disk_error(error, blobs.parent, "writing shards", total) from None
                    raise error
                shard, seconds = future.result()
                shards.append(shard)
                report(
                    Step(
                        len(shards),
                        len(order),
                        f"shard {', '.join(shard.packages) or '(files no distribution claims)'}:"
                        f" {_mb(shard.raw_bytes)} -> {_mb(shard.bytes)} in {seconds:.1f} s"
                        f" ({_rate(shard.raw_bytes, seconds)})",
                    )
                )
    finally:
        # Also on Ctrl-C or SIGTERM: shards not started yet never start.
        pool.shutdown(wait=True, cancel_futures=True)
    seconds = time.monotonic() - started
    raw = sum(s.raw_bytes for s in shards)
    report(
        f"packed {len(shards)} shard{'s' * (len(shards) != 1)}: {_mb(raw)} ->"
        f" {_mb(sum(s.bytes for s in shards))} in {seconds:.1f} s ({_rate(raw, seconds)})"
    )
    return shards


def _timed_shard(
    tree: Path, plan: ShardPlan, entries: Mapping[str, Entry], blobs: Path, work: Path
) -> tuple[Shard, float]:
    started = time.monotonic()
    shard = write_shard(tree, plan, entries, blobs, work)
    return shard, time.monotonic() - started


def _mb(count: int) -> str:
    return f"{count / 1e3:.1f} kB" if count < 100_000 else f"{count / 1e6:.1f} MB"


def _rate(count: int, seconds: float) -> str:
    return f"{count / 1e6 / max(seconds, 1e-6):.0f} MB/s"


def _disk_error(exc: OSError, where: Path, doing: str, needed: int) -> GpubuildError:
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return GpubuildError(f"{doing} in {where} failed: {exc}")
    free = shutil.disk_usage(where).free if where.exists() else 0
    need = (
        f" the tree is {_mb(needed)} installed and its shards need up to that much;"
        if needed
        else ""
    )
    return DiskFullError(
        f"out of disk space in {where} while {doing}:{need} {_mb(free)} free now."
        " Free some space or pack into a folder on a bigger disk (--out DIR)."
        " Nothing half-written was kept: without a manifest the digest counts as not packed."
    )


# --- materialise --------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstallPass:
    index_url: str | None  # None: uv's default index (or the user's uv configuration)
    requirements: str  # name==version --hash=... lines


def install_passes(
    lock: Lock, real_urls: Mapping[str, str] | None = None, default_url: str | None = None
) -> list[InstallPass]:
    """One uv pass per index (DESIGN.md rule 4): each package is fetched from its own index only.

    The lock records redacted URLs; `real_urls` maps them back to the URL with credentials.
    A package the lock names no index for (pip-tools locks) comes from `default_url`, or from
    uv's default when that is None.
    """
    groups: dict[str | None, list[str]] = {}
    for package in sorted(lock.packages, key=lambda p: p.name):
        hashes = " ".join(f"--hash={h}" for h in sorted(package.hashes))
        groups.setdefault(package.index_url, []).append(
            f"{package.name}=={package.version} {hashes}"
        )
    real_urls = real_urls or {}
    return [
        InstallPass(
            real_urls.get(url.rstrip("/"), url) if url else default_url, "\n".join(lines) + "\n"
        )
        for url, lines in sorted(groups.items(), key=lambda item: item[0] or "")
    ]


def materialise(
    lock_path: Path,
    lock: Lock,
    dest: Path,
    *,
    python: str,
    platform: str,
    real_urls: Mapping[str, str] | None = None,
    default_url: str | None = None,
    on_progress: Progress = silent,
) -> None:
    """Install the lock into the empty folder `dest` for the target, without building anything.

    `real_urls` and `default_url` as for `install_passes`.
    """
    report = on_progress
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise GpubuildError(f"{dest} is not empty; uv --target is only safe into an empty folder")
    passes = install_passes(lock, real_urls, default_url)
    with tempfile.TemporaryDirectory(prefix="gpubuild-pack-") as work:
        for number, step in enumerate(passes, start=1):
            requirements = Path(work) / f"pass-{number}.txt"
            requirements.write_text(step.requirements, encoding="utf-8")
            shown = redact_url(step.index_url) if step.index_url else "the default index"
            report(
                f"installing {step.requirements.count(chr(10))} package(s) from {shown}"
                f" (pass {number}/{len(passes)})"
            )
            args = [
                "pip", "install", "--target", str(dest), "--python-version", python,
                "--python-platform", platform, "--no-deps", "--require-hashes", "--no-build",
                "--no-installer-metadata", "--no-compile", "--link-mode", "copy",
                "--no-python-downloads", "-r", str(requirements),
            ]  # fmt: skip
            if step.index_url:
                args += ["--default-index", step.index_url]
            completed = run_uv(args, on_line=lambda line: _uv_line(line, report))
            if completed.returncode != 0:
                raise _install_error(completed.stderr, lock_path, dest, shown)


def _uv_line(line: str, report: Progress) -> None:
    text = line.strip()
    if text.startswith(_UV_PROGRESS):
        report(f"  uv: {text}")


def _install_error(stderr: str, lock_path: Path, dest: Path, index: str) -> GpubuildError:
    text = scrub(stderr.strip())  # never echo credentials
    if "No space left on device" in text or "os error 28" in text:
        used = sum(e.size for e in list_tree(dest).entries) if dest.is_dir() else 0
        free = shutil.disk_usage(dest.parent).free
        cause = [line.strip() for line in text.splitlines() if "os error 28" in line]
        return DiskFullError(
            f"out of disk space while installing {lock_path} into {dest}: a file did not fit"
            f" with {_mb(used)} of the tree installed and {_mb(free)} free. The tree and then"
            " its shards (up to the tree's size again) must fit on that disk: free some space"
            " or pack into a folder on a bigger disk (--out DIR).\nuv: "
            + (cause[0] if cause else text.splitlines()[-1])
        )
    if "hash mismatch" in text.lower():
        return IntegrityError(
            f"a wheel from {index} does not match the hash in {lock_path}; resolve again if the"
            f" index really changed it:\n{text}"
        )
    return ToolFailedError(f"uv could not install {lock_path} from {index}:\n{text}")


# --- fix and check ------------------------------------------------------------------------------


def check_tree(tree: Path, lock: Lock, profile: Profile) -> None:
    """Defensive scan of the finished tree: exactly the lock, nothing the policy forbids."""
    listing = list_tree(tree)
    installed = {d.name: d.version for d in read_distributions(tree, listing)}
    snapshot = read_snapshot(profile.target.base_packages)
    locked = {p.name: p.version for p in lock.packages}
    problems = []

    def same(a: str | None, b: str | None) -> bool:
        return a is not None and b is not None and Version(a) == Version(b)

    for name, version in sorted(installed.items()):
        base_version = snapshot.version_of(name)
        if name in profile.policy.exclude:
            problems.append(f"{name}=={version} is excluded by [policy] exclude")
        elif (
            base_version is not None
            and not same(base_version, version)
            and name not in profile.policy.allow_shadow
        ):
            problems.append(
                f"{name}=={version} would shadow the base image's {name}=={base_version}"
                " (not in [policy] allow_shadow)"
            )
        elif not same(locked.get(name), version):
            problems.append(f"{name}=={version} is not in the lock")
    for name, version in sorted(locked.items()):
        if name not in installed:
            problems.append(f"{name}=={version} is in the lock but was not installed")
    if problems:
        raise PolicyViolationError(
            f"the materialised tree for {profile.name} breaks {profile.path}'s policy or the"
            " lock; nothing was packed:\n  " + "\n  ".join(problems)
        )


# --- the whole stage ----------------------------------------------------------------------------


def reusable_manifest(out_dir: Path, profile: str, digest: str) -> Manifest | None:
    """The packed manifest for this digest when it and every shard it names are complete."""
    path = out_dir / manifest_key(profile, digest)
    try:
        manifest = manifest_from_bytes(path.read_bytes(), where=str(path))
    except (OSError, GpubuildError):  # a damaged local manifest: pack again
        return None
    if manifest.digest != digest or manifest.profile != profile:
        return None
    for shard in manifest.shards:
        blob = out_dir / blob_key(shard.sha256)
        if not blob.is_file() or blob.stat().st_size != shard.bytes:
            return None
    return manifest


def pack(
    profile: Profile,
    *,
    lock_path: Path | None,
    out_dir: Path,
    settings: IndexSettings = _DEFAULT_SETTINGS,
    on_progress: Progress = silent,
    shard_threshold: int = DEFAULT_SHARD_THRESHOLD,
) -> PackResult:
    """Resolve when needed, then materialise, fix, check and write the artifact of the lock."""
    report = on_progress
    resolved = resolve(profile, lock_path=lock_path, settings=settings)
    lock = resolved.lock
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
            raise _disk_error(exc, out_dir, "creating a work folder", 0) from None
        try:
            tree = work / "tree"
            materialise(
                resolved.lock_path,
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
            )
        except OSError as exc:  # fixing the tree; uv and the shard writer report their own
            raise _disk_error(exc, out_dir, "fixing the installed tree", 0) from None
    return PackResult(manifest, manifest_path, out_dir, reused=False)


def default_store_dir() -> Path:
    """The local store folder (`builder.store.default_store_url`) when --out is not given."""
    from builder.store import FileLocation, default_store_url, parse_store_url

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
