"""Pack throughput: gpubuild's sharded writer vs `tar -c | zstd -T0` of the same tree, one run.

    .venv/bin/python bench/bench_pack.py [--profile profiles/onnx-gpu.toml] [--repeat 3]

The profile's lock is resolved into bench/work/pack/ (the repository's lock is left alone) and
materialised and fixed once, exactly as `gpubuild pack` does. Then, alternating, each method
writes the whole tree from the page cache (one warm-up run each first):

- gpubuild: `write_artifact` (reproducible tars, zstd at the pack level, sha256 of tar and shard, shards
  written concurrently, each fsynced and renamed into place);
- tar|zstd: `tar -c -C TREE . | zstd -T0 -LEVEL` (the same level) into one file (no hashing, no fsync).

Throughput is MB/s of the raw tree (the sum of file sizes). The table shows medians and the
ratio gpubuild / tar|zstd (above 1: gpubuild is faster). Results go to bench/results/pack.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import zstandard  # noqa: E402

from builder.install import materialise  # noqa: E402
from builder.pack import ZSTD_LEVEL, write_artifact  # noqa: E402
from builder.profile import load_profile  # noqa: E402
from builder.resolve import ensure_lock  # noqa: E402
from builder.tree import fix_tree, list_tree  # noqa: E402


def prepare_tree(profile_path: Path, work: Path) -> tuple[Path, str]:
    profile = load_profile(profile_path)
    lock = ensure_lock(profile, lock_path=work / f"{profile.name}.lock").lock
    digest = lock.digest()
    tree = work / "tree"
    marker = work / "tree.digest"
    if not (marker.is_file() and marker.read_text() == digest and tree.is_dir()):
        shutil.rmtree(tree, ignore_errors=True)
        print(f"materialising {profile.name} ({len(lock.packages)} packages) ...", file=sys.stderr)
        materialise(
            work / f"{profile.name}.lock",
            lock,
            tree,
            python=lock.python,
            platform=lock.platform,
            on_progress=lambda m: print(f"  {m}", file=sys.stderr),
        )
        fix_tree(tree, profile.target.interpreter)
        marker.write_text(digest)
    return tree, digest


def run_gpubuild(tree: Path, out: Path, digest: str) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    manifest = write_artifact(
        tree,
        out,
        profile="bench",
        digest=digest,
        python="3.10",
        platform="x86_64-manylinux_2_28",
        install_dir="/shared-packages",
    )
    return time.perf_counter() - start, manifest.total_bytes


def run_tar_zstd(tree: Path, out: Path) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    target = out / "tree.tar.zst"
    script = f'tar -c -C "$1" . | zstd -T0 -{ZSTD_LEVEL} -q -o "$2"'
    start = time.perf_counter()
    subprocess.run(
        ["bash", "-o", "pipefail", "-c", script, "-", str(tree), str(target)], check=True
    )
    return time.perf_counter() - start, target.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", type=Path, default=REPO / "profiles" / "onnx-gpu.toml")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "work" / "pack")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pack.json")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    tree, digest = prepare_tree(args.profile, args.work)
    listing = list_tree(tree)
    raw = listing.total_bytes
    print(f"tree: {raw / 1e6:.0f} MB in {len(listing.entries)} files", file=sys.stderr)

    methods = {
        "gpubuild": lambda: run_gpubuild(tree, args.work / "out-gpubuild", digest),
        "tar|zstd": lambda: run_tar_zstd(tree, args.work / "out-tar"),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    sizes: dict[str, int] = {}
    for method in methods.values():
        method()  # warm-up: page cache and allocator
    for _ in range(args.repeat):
        for name, method in methods.items():
            seconds, size = method()
            times[name].append(seconds)
            sizes[name] = size
            print(f"  {name}: {seconds:.2f} s ({raw / 1e6 / seconds:.0f} MB/s)", file=sys.stderr)
    for folder in ("out-gpubuild", "out-tar"):
        shutil.rmtree(args.work / folder)

    rows = []
    for name in methods:
        median = statistics.median(times[name])
        rows.append(
            {
                "name": name,
                "median_s": median,
                "runs_s": times[name],
                "raw_mb_per_s": raw / 1e6 / median,
                "compressed_bytes": sizes[name],
            }
        )
    ratio = rows[1]["median_s"] / rows[0]["median_s"]
    result = {
        "profile": args.profile.stem,
        "tree_bytes": raw,
        "tree_files": len(listing.entries),
        "zstd_level": ZSTD_LEVEL,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "zstandard": zstandard.__version__,
        "zstd_cli": subprocess.run(
            ["zstd", "--version"], capture_output=True, text=True
        ).stdout.strip(),
        "repeat": args.repeat,
        "methods": rows,
        "speed_ratio_gpubuild_over_tar_zstd": ratio,
        "size_ratio_gpubuild_over_tar_zstd": sizes["gpubuild"] / sizes["tar|zstd"],
    }
    print(f"{'method':<10} {'median s':>9} {'MB/s':>7} {'compressed MB':>14}", file=sys.stderr)
    for row in rows:
        print(
            f"{row['name']:<10} {row['median_s']:>9.2f} {row['raw_mb_per_s']:>7.0f}"
            f" {row['compressed_bytes'] / 1e6:>14.1f}",
            file=sys.stderr,
        )
    print(
        f"gpubuild is {ratio:.2f}x the speed of tar|zstd, at"
        f" {result['size_ratio_gpubuild_over_tar_zstd']:.3f}x its size",
        file=sys.stderr,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"-> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
