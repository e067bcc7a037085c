"""Opt-in pruning: files of the installed tree that GPU inference never opens at run time,
removed before packing ([policy] prune in the profile; docs/design.md#pruning).

What a running worker opens: Python modules and data (imports, importlib.resources), shared
libraries (the dynamic loader, dlopen), and, for a JIT compiler, its own headers and libraries
(triton compiles kernels against triton/backends/*/include and links its own runtime). What only
a compiler building against the package opens: C/C++ headers, static archives, CMake package
files. The preset `@dev-files` (builder.profile.PRUNE_PRESETS) removes the latter from the nvidia-* wheels and torch, and never
anything under triton/. It does break what compiles C++ against torch at run time:
`torch.utils.cpp_extension` and torch.compile's C++ (CPU) backend and cpp_wrapper mode; GPU
kernels from torch.compile go through triton and keep working.

Patterns are shell-style (fnmatch): matched against the whole path below the install folder,
where `*` also crosses `/` (`torch/include/*` is everything under torch/include). A
distribution's own metadata (`*.dist-info/`) is never pruned. Every distribution that lost
files gets `GPUBUILD_PRUNED` in its dist-info (listed in its RECORD, so it stays in that
distribution's shard), which `gpubuild doctor` reports in the pod.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from pathlib import Path

from builder.manifest import PrunedFiles
from builder.tree import Distribution, Listing, list_tree, read_distributions

PRUNED_FILE = "GPUBUILD_PRUNED"
UNCLAIMED = "(unclaimed files)"


def is_pruned(path: str, patterns: Sequence[str]) -> bool:
    first = path.split("/", 1)[0]
    if first.endswith(".dist-info"):
        return False
    return any(fnmatchcase(path, pattern) for pattern in patterns)


def plan(listing: Listing, distributions: Iterable[Distribution], patterns: Sequence[str]) -> (
    dict[str, list[str]]
):  # fmt: skip
    """The paths to remove, by owning distribution ("" for files no RECORD claims)."""
    owner = {path: dist.name for dist in distributions for path in dist.paths}
    found: dict[str, list[str]] = {}
    for entry in listing.entries:
        if is_pruned(entry.path, patterns):
            found.setdefault(owner.get(entry.path, ""), []).append(entry.path)
    return found


def prune_tree(tree: Path, patterns: Sequence[str]) -> list[PrunedFiles]:
    """Remove what `patterns` match from the installed tree; keep each RECORD true (the pruned
    lines dropped, GPUBUILD_PRUNED added) and remove folders pruning left empty."""
    if not patterns:
        return []
    listing = list_tree(tree)
    distributions = read_distributions(tree, listing)
    by_name = {dist.name: dist for dist in distributions}
    sizes = {entry.path: entry.size for entry in listing.entries}
    removed = plan(listing, distributions, patterns)
    report: list[PrunedFiles] = []
    for name, paths in sorted(removed.items()):
        for path in paths:
            (tree / path).unlink()
        size = sum(sizes[p] for p in paths)
        report.append(PrunedFiles(name or UNCLAIMED, len(paths), size))
        if name:
            _rewrite_record(tree, by_name[name], set(paths), size, patterns)
    _remove_empty_folders(tree, {p for paths in removed.values() for p in paths})
    return report


def _rewrite_record(
    tree: Path, dist: Distribution, gone: set[str], size: int, patterns: Sequence[str]
) -> None:
    dist_info = tree / dist.dist_info
    record = dist_info / "RECORD"
    parent = os.path.dirname(dist.dist_info)
    rows = list(csv.reader(io.StringIO(record.read_text(encoding="utf-8"))))
    kept = [row for row in rows if row and _tree_path(parent, row[0]) not in gone]
    marker = f"{dist.dist_info}/{PRUNED_FILE}"
    text = (
        "Files removed by gpubuild's [policy] prune: they are not needed to run, only to build"
        " against this package.\n"
        f"files: {len(gone)}\n"
        f"bytes: {size}\n" + "".join(f"pattern: {pattern}\n" for pattern in patterns)
    )
    (tree / marker).write_text(text, encoding="utf-8")
    relative = os.path.relpath(tree / marker, tree / parent) if parent else marker
    kept.append([relative.replace(os.sep, "/"), "", ""])
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(kept)
    record.write_text(out.getvalue(), encoding="utf-8")


def _tree_path(parent: str, recorded: str) -> str:
    joined = (
        os.path.normpath(os.path.join(parent, recorded)) if parent else os.path.normpath(recorded)
    )
    return joined.replace(os.sep, "/")


def _remove_empty_folders(tree: Path, removed: set[str]) -> None:
    folders = {os.path.dirname(path) for path in removed} - {""}
    # Deepest first, and up through parents that become empty in turn.
    candidates: set[str] = set()
    for folder in folders:
        while folder:
            candidates.add(folder)
            folder = os.path.dirname(folder)
    for folder in sorted(candidates, key=lambda f: -f.count("/")):
        path = tree / folder
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
