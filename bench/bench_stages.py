"""Where the init script's time goes: CPU-seconds per GB of each stage, the whole script on 1
and on 2 cores, and the projection for a big GPU node.

    .venv/bin/python bench/bench_stages.py --profile profiles/torch-cu121.toml \\
        --index pytorch-cu121=default

Each stage runs alone over every shard of the packed profile (cold page cache before each, the
shards read into it first for the stages that read what the script has just downloaded), so
its cost is its own: download (curl from nginx on loopback into a file), hash (the sha256 the
script checks), decompress (zstd to /dev/null), extract (decompress and write the files: GNU tar
behind a zstd pipe, and bsdtar reading the zstd in-process), the folder skeleton, and `cp -a` of
the finished tree (the floor). Then the generated init script itself, pinned with taskset to one
core and to two. CPU-seconds are user + system of the whole process tree.

The projection for a node with C cores and B bytes/s to the store:
    max(compressed / B, script CPU-seconds / C) + the largest shard's own verify and unpack
(a shard is verified only once it is whole, so its unpack follows its download). Written to
bench/results/stages-<profile>.json; the README quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_unpack import count_files, drop_caches  # noqa: E402

from builder.indexes import IndexSettings  # noqa: E402
from builder.initscript import render_init_script  # noqa: E402
from builder.manifest import Manifest, blob_key  # noqa: E402
from builder.pipeline import pack_profile  # noqa: E402
from builder.profile import load_profile  # noqa: E402
from tests.support.services import nginx_serving  # noqa: E402

GB = 1e9


def measured(
    commands: list[str], *, cold: bool = True, hot: list[Path] | None = None
) -> tuple[float, float]:
    """Wall and CPU-seconds of shell commands run one after another (cold cache first; the
    `hot` files read into it before the clock starts, as the script reads a shard it has just
    downloaded)."""
    if cold:
        drop_caches()
    for path in hot or []:
        with path.open("rb") as source:
            while source.read(2**20):
                pass
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    for command in commands:
        subprocess.run(["bash", "-c", "set -o pipefail; " + command], check=True)
    subprocess.run(["sync"], check=True)  # the writes are part of the cost
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def stage_costs(manifest: Manifest, store: Path, store_url: str, work: Path) -> dict[str, dict]:
    blobs = [store / blob_key(s.sha256) for s in manifest.shards]
    compressed = manifest.total_bytes / GB
    raw = sum(s.raw_bytes for s in manifest.shards) / GB
    downloads = work / "downloads"
    tree = work / "tree"
    results: dict[str, dict] = {}

    def record(name: str, per: str, wall_cpu: tuple[float, float]) -> None:
        size = compressed if per == "compressed GB" else raw
        wall, cpu = wall_cpu
        results[name] = {"wall_s": wall, "cpu_s": cpu, "cpu_s_per_gb": cpu / size, "per": per}
        print(f"{name:28s} wall {wall:6.2f} s  cpu {cpu:6.2f} s  {cpu / size:5.2f} s per {per}",
              file=sys.stderr)  # fmt: skip

    for folder in (downloads, tree):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    record("download (curl to file)", "compressed GB", measured([
        f"curl -fsS -o {downloads}/{s.sha256} {store_url}/{blob_key(s.sha256)}"
        for s in manifest.shards
    ]))  # fmt: skip
    record("hash (openssl sha256)", "compressed GB", measured(
        [f"openssl dgst -sha256 -r < {blob} > /dev/null" for blob in blobs], hot=blobs
    ))  # fmt: skip
    if shutil.which("b3sum"):
        # What the script checks where the manifest pins BLAKE3 and the image has b3sum.
        record("hash (b3sum BLAKE3, 1 thread)", "compressed GB", measured(
            [f"b3sum --num-threads 1 --no-names {blob} > /dev/null" for blob in blobs], hot=blobs
        ))  # fmt: skip
    record("decompress (zstd)", "raw GB", measured(
        [f"zstd -d -q -c {blob} > /dev/null" for blob in blobs], hot=blobs
    ))  # fmt: skip
    directories = work / "directories.txt"
    directories.write_text("".join(f"{tree}/{d}\n" for d in manifest.directories))
    record("skeleton (mkdir -p)", "raw GB", measured([f"xargs -d '\\n' mkdir -p < {directories}"]))
    record("extract (zstd | GNU tar)", "raw GB", measured([
        f"zstd -d -q -c {blob} | tar -x -f - -C {tree} --no-same-owner" for blob in blobs
    ], hot=blobs))  # fmt: skip
    files = count_files(tree)
    shutil.rmtree(tree)
    tree.mkdir()
    if shutil.which("bsdtar"):
        record("extract (bsdtar, in-process)", "raw GB", measured([
            f"bsdtar -x -f {blob} -C {tree} --no-same-owner" for blob in blobs
        ], hot=blobs))  # fmt: skip
    record("count files (find)", "raw GB", measured([f"find {tree} -type f -printf x | wc -c"]))
    record("cp -a (floor)", "raw GB", measured([f"cp -a {tree} {work}/tree-copy"]))
    assert files == manifest.total_files, f"extracted {files} files of {manifest.total_files}"
    for folder in (downloads, tree, work / "tree-copy"):
        shutil.rmtree(folder, ignore_errors=True)
    return results


def script_runs(script: Path, work: Path, cores: list[int]) -> dict[str, dict]:
    runs = {}
    for count in cores:
        target = work / f"target-{count}"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        pin = ",".join(str(n) for n in range(count))
        wall, cpu = measured([f"GPUBUILD_TARGET={target} taskset -c {pin} {script} 2>/dev/null"])
        runs[f"{count} core(s)"] = {"wall_s": wall, "cpu_s": cpu}
        print(
            f"init script on {count} core(s): wall {wall:.2f} s, cpu {cpu:.2f} s", file=sys.stderr
        )
        shutil.rmtree(target, ignore_errors=True)
    return runs


def projection(
    manifest: Manifest, stages: dict[str, dict], script_cpu: float, cores: int, bandwidth: float
) -> dict[str, float]:
    extract = stages.get("extract (bsdtar, in-process)", stages["extract (zstd | GNU tar)"])
    largest = max(manifest.shards, key=lambda s: s.raw_bytes)
    # The check the script runs: BLAKE3 where b3sum is there (and the manifest pins it).
    check = stages.get("hash (b3sum BLAKE3, 1 thread)", stages["hash (openssl sha256)"])
    tail = (
        check["cpu_s_per_gb"] * largest.bytes / GB
        + extract["cpu_s_per_gb"] * largest.raw_bytes / GB
    )
    network = manifest.total_bytes / bandwidth
    cpu = script_cpu / cores
    return {
        "cores": cores,
        "bandwidth_gb_s": bandwidth / GB,
        "network_s": network,
        "cpu_s": cpu,
        "largest_shard_tail_s": tail,
        "projected_s": max(network, cpu) + tail,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", type=Path, default=REPO / "profiles" / "torch-cu121.toml")
    parser.add_argument("--index", action="append", default=[], metavar="NAME=URL")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "work")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    pairs = (item.partition("=") for item in args.index)
    settings = IndexSettings(overrides=tuple((name, url) for name, _, url in pairs))
    profile = load_profile(args.profile)
    work = args.work.resolve() / "stages"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store = args.work.resolve() / "store"
    manifest = pack_profile(profile, out_dir=store, settings=settings).manifest
    with ExitStack() as stack:
        store_url = stack.enter_context(nginx_serving(store, work / "nginx"))
        stages = stage_costs(manifest, store, store_url, work)
        script = work / "init.sh"
        script.write_text(render_init_script(manifest, store_url))
        script.chmod(0o755)
        runs = script_runs(script, work, [1, min(2, os.cpu_count() or 1)])
    script_cpu = max(run["cpu_s"] for run in runs.values())
    projections = [
        projection(manifest, stages, script_cpu, 16, bandwidth) for bandwidth in (1 * GB, 0.2 * GB)
    ]
    document = {
        "profile": profile.name,
        "machine": f"{os.cpu_count()} cores",
        "compressed_bytes": manifest.total_bytes,
        "raw_bytes": sum(s.raw_bytes for s in manifest.shards),
        "files": manifest.total_files,
        "largest_shard": {
            "bytes": max(s.bytes for s in manifest.shards),
            "raw_bytes": max(s.raw_bytes for s in manifest.shards),
        },
        "stages": stages,
        "script": runs,
        "projections": projections,
    }
    out = args.out or REPO / "bench" / "results" / f"stages-{profile.name}.json"
    out.write_text(json.dumps(document, indent=2) + "\n")
    print("| stage | CPU-seconds | per GB |")
    print("|---|---:|---:|")
    for name, stage in stages.items():
        print(f"| {name} | {stage['cpu_s']:.2f} | {stage['cpu_s_per_gb']:.2f} per {stage['per']} |")
    for name, run in runs.items():
        print(f"| init script, {name} | {run['cpu_s']:.2f} (wall {run['wall_s']:.2f} s) | |")
    for p in projections:
        print(
            f"projection, {p['cores']} cores at {p['bandwidth_gb_s']:.1f} GB/s:"
            f" max(network {p['network_s']:.1f} s, CPU {script_cpu:.1f} s / {p['cores']}"
            f" = {p['cpu_s']:.1f} s) + largest shard {p['largest_shard_tail_s']:.1f} s"
            f" = {p['projected_s']:.1f} s"
        )


if __name__ == "__main__":
    main()
