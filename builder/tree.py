"""An installed tree: its files, which distribution owns each, how they become shards, and the
fixes it needs for its new home (`fix_tree`).

The planning functions are pure so that the shard layout (which decides what an upgrade
re-uploads) can be tested without any files; pack.py writes the shards.
"""

from __future__ import annotations

import base64
import csv
import email.parser
import hashlib
import io
import os
import posixpath
import re
import shutil
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name

from builder.errors import PolicyViolationError
from builder.fields import WHITEOUT_PREFIX


@dataclass(frozen=True)
class Entry:
    """A regular file or a symlink of the tree (directories are listed apart)."""

    path: str  # relative POSIX path
    size: int  # bytes of a regular file; 0 for a symlink
    executable: bool
    link: str | None = None  # the target of a symlink, as stored


@dataclass(frozen=True)
class Listing:
    directories: tuple[str, ...]  # every folder below the root, parents before children
    entries: tuple[Entry, ...]  # sorted by path

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.entries)


@dataclass(frozen=True)
class Distribution:
    name: str  # canonical
    version: str
    dist_info: str  # its folder, relative to the tree
    paths: frozenset[str]  # the tree paths its RECORD claims (only those that exist)


@dataclass(frozen=True)
class ShardPlan:
    packages: tuple[str, ...]
    paths: tuple[str, ...]  # sorted: the order of the tar members
    raw_size: int  # file bytes (not tar bytes); for scheduling and progress


@dataclass(frozen=True)
class PthFile:
    path: str
    paths: tuple[str, ...]  # the folders a path-list line adds (relative to the tree)
    runs_code: bool  # holds `import` lines, which only site.py would run


def list_tree(root: Path) -> Listing:
    """Walk the tree without following symlinks; a symlink to a folder is an entry, not a folder.

    A name starting `.wh.` is refused (PolicyViolationError): in a registry image, where the
    tree's shards are layers, it is a whiteout that hides files of other layers."""
    directories: list[str] = []
    entries: list[Entry] = []
    pending = [""]
    while pending:
        relative = pending.pop()
        with os.scandir(root / relative if relative else root) as scan:
            for item in scan:
                path = f"{relative}/{item.name}" if relative else item.name
                if item.name.startswith(WHITEOUT_PREFIX):
                    raise PolicyViolationError(
                        f"{root}: the installed set holds {path[:200]!r}; a name starting"
                        f" {WHITEOUT_PREFIX} is an image layer's whiteout, which would hide files"
                        " of other layers in a registry image: gpubuild packs no such file (drop"
                        " or replace the distribution that ships it)"
                    )
                info = item.stat(follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    directories.append(path)
                    pending.append(path)
                elif stat.S_ISLNK(info.st_mode):
                    entries.append(Entry(path, 0, False, os.readlink(item.path)))
                elif stat.S_ISREG(info.st_mode):
                    entries.append(Entry(path, info.st_size, bool(info.st_mode & 0o111)))
                # Sockets, fifos and devices have no place in a package tree: left out.
    return Listing(tuple(sorted(directories)), tuple(sorted(entries, key=lambda e: e.path)))


def record_paths(record: str, dist_parent: str, present: set[str]) -> set[str]:
    """Tree paths a RECORD claims. Paths are relative to the folder holding the .dist-info.

    uv's `--target` RECORD names scripts `bin/tool` (checked with uv 0.13); installers that lay
    out a full scheme write `../../bin/tool` from site-packages. A path that climbs out of the
    tree is matched by what is left after the `..` parts, if the tree has it.
    """
    claimed: set[str] = set()
    for row in csv.reader(io.StringIO(record)):
        if not row or not row[0]:
            continue
        path = posixpath.normpath(posixpath.join(dist_parent, row[0]))
        while path.startswith("../"):
            path = path[3:]
        if path in present:
            claimed.add(path)
    return claimed


def read_distributions(root: Path, listing: Listing) -> list[Distribution]:
    """The distributions installed at the top of the tree, each with the files it claims.

    Only top-level `*.dist-info` folders count: vendored copies inside a package (such as
    setuptools/_vendor/*.dist-info) describe files their host package already claims.
    """
    present = {entry.path for entry in listing.entries}
    found = []
    for folder in listing.directories:
        if "/" in folder or not folder.endswith(".dist-info"):
            continue
        name, version = _name_and_version(root / folder)
        record = root / folder / "RECORD"
        text = record.read_text(encoding="utf-8") if record.is_file() else ""
        paths = record_paths(text, "", present)
        # The .dist-info belongs to its distribution even where RECORD forgets a file.
        paths |= {p for p in present if p.startswith(folder + "/")}
        found.append(Distribution(name, version, folder, frozenset(paths)))
    return sorted(found, key=lambda d: d.name)


def _name_and_version(dist_info: Path) -> tuple[str, str]:
    metadata = dist_info / "METADATA"
    if metadata.is_file():
        headers = email.parser.BytesParser().parsebytes(metadata.read_bytes(), headersonly=True)
        if headers.get("Name") and headers.get("Version"):
            return canonicalize_name(str(headers["Name"])), str(headers["Version"])
    stem = dist_info.name[: -len(".dist-info")]
    name, _, version = stem.partition("-")
    return canonicalize_name(name), version


@dataclass(frozen=True)
class Ownership:
    owned: dict[str, tuple[str, ...]]  # distribution -> the paths only it claims
    shared: dict[str, tuple[str, ...]]  # path claimed by several -> their names
    unclaimed: tuple[str, ...]


def assign_owners(listing: Listing, distributions: Iterable[Distribution]) -> Ownership:
    """Each path belongs to exactly one shard, so parallel extraction never writes a file twice.

    A path several RECORDs claim (every nvidia-* wheel ships nvidia/__init__.py) goes to the
    leftover shard, so that each distribution's shard holds the same bytes in every profile.
    """
    claimants: dict[str, list[str]] = {}
    for dist in distributions:
        for path in dist.paths:
            claimants.setdefault(path, []).append(dist.name)
    owned: dict[str, list[str]] = {}
    shared: dict[str, tuple[str, ...]] = {}
    unclaimed: list[str] = []
    for entry in listing.entries:
        names = claimants.get(entry.path)
        if not names:
            unclaimed.append(entry.path)
        elif len(names) == 1:
            owned.setdefault(names[0], []).append(entry.path)
        else:
            shared[entry.path] = tuple(sorted(names))
    return Ownership({k: tuple(v) for k, v in owned.items()}, shared, tuple(unclaimed))


def plan_shards(
    ownership: Ownership,
    file_sizes: Mapping[str, int],
    threshold: int,
    *,
    split_bytes: int | None = None,
) -> list[ShardPlan]:
    """Shards that follow distributions (docs/design.md#artifact).

    A distribution above `threshold` installed bytes is a shard of its own, or, above
    `split_bytes`, several (`split_paths`): no single stream of one giant wheel is the
    critical path of an unpack. The small ones are
    taken in name order and grouped: a group closes once it reaches `threshold`, or after a name
    whose hash marks it as a boundary (one name in eight). Content-defined boundaries keep an
    upgrade or an added package from reshuffling every later group: a change reaches at most up
    to the next boundary. Files several distributions claim and files none claims form one more
    shard.
    """
    sizes = distribution_sizes(ownership, file_sizes)
    plans: list[ShardPlan] = []
    small: list[str] = []
    for name in sorted(ownership.owned):
        if sizes[name] > threshold:
            paths = sorted(ownership.owned[name])
            parts = split_paths(paths, file_sizes, split_bytes) if split_bytes else [paths]
            for part in parts:
                size = sum(file_sizes[p] for p in part)
                plans.append(ShardPlan((name,), tuple(part), size))
        else:
            small.append(name)
    group: list[str] = []
    group_size = 0
    for number, name in enumerate(small):
        group.append(name)
        group_size += sizes[name]
        if group_size >= threshold or _is_boundary(name) or number == len(small) - 1:
            paths = sorted(p for member in group for p in ownership.owned[member])
            plans.append(ShardPlan(tuple(group), tuple(paths), group_size))
            group, group_size = [], 0
    leftovers = sorted([*ownership.shared, *ownership.unclaimed])
    if leftovers:
        names = sorted({n for names in ownership.shared.values() for n in names})
        size = sum(file_sizes[p] for p in leftovers)
        plans.append(ShardPlan(tuple(names), tuple(leftovers), size))
    return plans


def split_paths(paths: list[str], file_sizes: Mapping[str, int], bound: int) -> list[list[str]]:
    """One distribution's files (sorted) as parts of at most `bound` bytes, by whole files.

    A file above `bound` is a part of its own. The others are cut in path order into parts of
    about equal size (the fewest that fit under `bound`), so the parts depend only on this
    distribution's files: an upgrade of another distribution never moves them."""
    if sum(file_sizes[p] for p in paths) <= bound:
        return [paths]
    alone = [[p] for p in paths if file_sizes[p] > bound]
    rest = [p for p in paths if file_sizes[p] <= bound]
    total = sum(file_sizes[p] for p in rest)
    count = max(1, -(-total // bound))
    target = total / count
    parts: list[list[str]] = []
    part: list[str] = []
    size = 0
    for path in rest:
        full = size + file_sizes[path] > bound
        # The last of the `count` parts takes what is left, down to empty files.
        if part and (full or (size >= target and len(parts) < count - 1)):
            parts.append(part)
            part, size = [], 0
        part.append(path)
        size += file_sizes[path]
    if part:
        parts.append(part)
    return alone + parts


def _is_boundary(name: str) -> bool:
    return hashlib.sha256(name.encode()).digest()[0] < 32


def distribution_sizes(ownership: Ownership, file_sizes: Mapping[str, int]) -> dict[str, int]:
    """Installed bytes of each distribution's own files."""
    return {name: sum(file_sizes[p] for p in paths) for name, paths in ownership.owned.items()}


# A shared library found by its soname: libX.so or libX.so.N[.N...], but not a Python extension
# module (which can also start with "lib": libfoo.cpython-310-x86_64-linux-gnu.so, foo.abi3.so).
_SONAME_FILE = re.compile(r"^lib[^/]*\.so(\.[0-9]+)*$")
_EXTENSION_MODULE = re.compile(r"\.(cpython-[^.]*|abi3|pypy[^.]*)\.so$")


def library_dirs(listing: Listing) -> list[str]:
    """Folders for LD_LIBRARY_PATH, relative to the tree, sorted.

    Rule: a folder is listed when it directly holds a shared library meant to be loaded by its
    soname, that is a file or symlink named `lib*.so` or `lib*.so.N[.N...]` that is not a
    Python extension module. That covers every `nvidia/*/lib` (libcudnn.so.8, libcublas.so.12,
    ...), `torch/lib`, `tensorrt_libs` and onnxruntime/capi (libonnxruntime_providers_*.so).
    Left out: auditwheel's `*.libs` folders (their libraries carry hashed names and are found
    through RPATH, never by soname) and anything inside `*.dist-info` or `*.data`.
    """
    folders: set[str] = set()
    for entry in listing.entries:
        folder, _, name = entry.path.rpartition("/")
        if not _SONAME_FILE.match(name) or _EXTENSION_MODULE.search(name):
            continue
        parts = folder.split("/") if folder else []
        if any(p.endswith((".libs", ".dist-info", ".data")) for p in parts):
            continue
        folders.add(folder)
    return sorted(folders)


def parse_pth(path: str, text: str, directories: set[str]) -> PthFile:
    """What site.py would do with a top-level .pth file that PYTHONPATH never reads.

    Lines starting with `import` run code; other non-comment lines name folders (relative to
    the site folder) that site.py appends to sys.path when they exist.
    """
    added: list[str] = []
    runs_code = False
    for line in text.splitlines():
        line = line.rstrip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("import ", "import\t")):
            runs_code = True
            continue
        folder = posixpath.normpath(line)
        if folder in directories and folder not in added:
            added.append(folder)
    return PthFile(path, tuple(added), runs_code)


def find_pth_files(root: Path, listing: Listing) -> list[PthFile]:
    directories = set(listing.directories)
    found = []
    for entry in listing.entries:
        if "/" not in entry.path and entry.path.endswith(".pth") and entry.link is None:
            text = (root / entry.path).read_text(encoding="utf-8", errors="replace")
            found.append(parse_pth(entry.path, text, directories))
    return found


def pth_note(pth: PthFile) -> str:
    parts = [f"{pth.path}: PYTHONPATH does not read .pth files"]
    if pth.paths:
        parts.append(f"its folders ({', '.join(pth.paths)}) are added to PYTHONPATH instead")
    if pth.runs_code:
        parts.append("its import lines do not run (only site.py runs them)")
    if not pth.paths and not pth.runs_code:
        parts.append("it names no folder of the tree")
    return "; ".join(parts)


# --- fixing the tree for the target -----------------------------------------------------------


@dataclass(frozen=True)
class TreeFixes:
    shebangs: tuple[str, ...]  # scripts now pointing at the target interpreter
    removed: tuple[str, ...]  # __pycache__ folders, .pyc files, uv's lock file
    pth_notes: tuple[str, ...]


_PYTHON_SHEBANG = re.compile(rb"^#![^\n]*python[0-9.]*[^/\n]*\n")
# uv and pip write this instead of a plain shebang when the interpreter path is too long or
# has spaces: a shell line that re-executes the script with that interpreter.
_SH_TRAMPOLINE = re.compile(rb"^#!/bin/sh\n'''exec' [^\n]*python[^\n]*\n' '''\n")


def fix_tree(tree: Path, interpreter: str) -> TreeFixes:
    """Make the tree right for the target: shebangs, no bytecode, uv's lock file gone."""
    removed: list[str] = []
    lock_file = tree / ".lock"  # uv --target leaves an empty lock file at the top
    if lock_file.is_file() and lock_file.stat().st_size == 0:
        lock_file.unlink()
        removed.append(".lock")
    for folder, dirnames, filenames in os.walk(tree):
        here = Path(folder)
        if "__pycache__" in dirnames:
            dirnames.remove("__pycache__")
            shutil.rmtree(here / "__pycache__")
            removed.append(str((here / "__pycache__").relative_to(tree)))
        for name in filenames:
            # A .pyc without its .py is a sourceless module, not a cache: keep it.
            if name.endswith(".pyc") and (here / name[:-1]).exists():
                (here / name).unlink()
                removed.append(str((here / name).relative_to(tree)))
    shebangs = _rewrite_shebangs(tree, interpreter)
    listing = list_tree(tree)
    notes = tuple(pth_note(p) for p in find_pth_files(tree, listing))
    return TreeFixes(tuple(shebangs), tuple(sorted(removed)), notes)


def shebang_for(interpreter: str) -> bytes:
    """A plain shebang, or pip's /bin/sh trampoline where the kernel would not take the path
    (spaces, or longer than the 127 bytes older kernels read)."""
    if " " not in interpreter and len(interpreter) <= 125:
        return f"#!{interpreter}\n".encode()
    return f"#!/bin/sh\n'''exec' \"{interpreter}\" \"$0\" \"$@\"\n' '''\n".encode()


def _rewrite_shebangs(tree: Path, interpreter: str) -> list[str]:
    bin_dir = tree / "bin"
    if not bin_dir.is_dir():
        return []
    new_line = shebang_for(interpreter)
    changed: dict[str, bytes] = {}
    for script in sorted(bin_dir.iterdir()):
        if script.is_symlink() or not script.is_file():
            continue
        data = script.read_bytes()
        match = _SH_TRAMPOLINE.match(data) or _PYTHON_SHEBANG.match(data)
        if match is None or data.startswith(new_line):
            continue
        data = new_line + data[match.end() :]
        script.write_bytes(data)  # in place: keeps the mode
        changed[f"bin/{script.name}"] = data
    if changed:
        _update_records(tree, changed)
    return sorted(changed)


def _update_records(tree: Path, changed: Mapping[str, bytes]) -> None:
    """Keep RECORD true to the rewritten scripts, as pip does when it writes them."""
    for record in tree.glob("*.dist-info/RECORD"):
        lines = record.read_text(encoding="utf-8").splitlines()
        updated = False
        for number, line in enumerate(lines):
            path = line.split(",", 1)[0]
            if path in changed:
                digest = hashlib.sha256(changed[path]).digest()
                encoded = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
                lines[number] = f"{path},sha256={encoded},{len(changed[path])}"
                updated = True
        if updated:
            record.write_text("\n".join(lines) + "\n", encoding="utf-8")
