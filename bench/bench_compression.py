"""zstd level (and long-distance matching) against download bytes and decode cost, and the pod
start each would give on a 16-core node at 1 GB/s and at 200 MB/s.

    .venv/bin/python bench/bench_compression.py --profile profiles/torch-cu121.toml \\
        --index pytorch-cu121=default [--levels 1,3,6,9,3L,9L]
    .venv/bin/python bench/bench_compression.py --profile profiles/torch-cu121.toml \\
        --index pytorch-cu121=default --levels 9,F3,lz4-1,lz4-9 \\
        --out bench/results/transports-torch-cu121.json

Every shard's tar (the packed profile's, decompressed once) is compressed with the zstd CLI at
each level ("L": with --long=27; "N": literals stored raw, --no-compress-literals, what pack
writes; "F3": --fast=3; "lz4-N": the lz4 CLI at level N, for the lighter transports a
CPU-capped pod might want), then decompressed to /dev/null on one core (a pod decodes each
shard in one stream) from the page cache, as a pod reads the shard it has just downloaded.
The projection takes the other stages' costs per GB from bench/results/stages-<profile>.json
(run bench_stages.py first): CPU = (receive + hash) x compressed + decode + file writes x raw,
and
    pod start = max(compressed / bandwidth, CPU / 16) + the largest shard's own hash+decode+write.
Writes bench/results/compression-<profile>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder.indexes import IndexSettings  # noqa: E402
from builder.manifest import blob_key  # noqa: E402
from builder.pack import ZSTD_LEVEL  # noqa: E402
from builder.pipeline import pack_profile  # noqa: E402
from builder.profile import load_profile  # noqa: E402

GB = 1e9
CORES = 16


def cpu_of(argv: list[str], **kwargs: object) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, check=True, **kwargs)  # type: ignore[call-overload]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def compress_argv(level: str, source: Path, dest: Path) -> list[str]:
    if level.startswith("lz4-"):
        return ["lz4", "-q", "-f", f"-{level.removeprefix('lz4-')}", str(source), str(dest)]
    if level.startswith("F"):
        options = [f"--fast={level.removeprefix('F')}"]
    else:
        options = [f"-{level.rstrip('LN')}"]
        options += ["--long=27"] if "L" in level else []
        options += ["--no-compress-literals"] if "N" in level else []
    return ["zstd", "-q", "-f", "-T0", *options, str(source), "-o", str(dest)]


def decompress_argv(level: str, packed: Path) -> list[str]:
    if level.startswith("lz4-"):
        return ["lz4", "-d", "-q", "-c", str(packed)]
    return ["zstd", "-d", "-q", "-c", "--long=31", str(packed)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", type=Path, default=REPO / "profiles" / "torch-cu121.toml")
    parser.add_argument("--index", action="append", default=[], metavar="NAME=URL")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "work")
    parser.add_argument("--levels", default="1,3,6,9,3L,9L,3N,9N,12N")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    pairs = (item.partition("=") for item in args.index)
    settings = IndexSettings(overrides=tuple((name, url) for name, _, url in pairs))
    profile = load_profile(args.profile)
    store = args.work.resolve() / "store"
    manifest = pack_profile(profile, out_dir=store, settings=settings).manifest
    stages_file = REPO / "bench" / "results" / f"stages-{profile.name}.json"
    stages = json.loads(stages_file.read_text())["stages"]
    hash_per_gb = stages["hash (openssl sha256)"]["cpu_s_per_gb"]
    receive_per_gb = stages["download (curl to file)"]["cpu_s_per_gb"]
    extract = stages.get("extract (bsdtar, in-process)", stages["extract (zstd | GNU tar)"])
    write_per_gb = max(0.0, extract["cpu_s_per_gb"] - stages["decompress (zstd)"]["cpu_s_per_gb"])
    raw_total = sum(s.raw_bytes for s in manifest.shards)
    largest = max(manifest.shards, key=lambda s: s.raw_bytes)

    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        tars = []
        for shard in manifest.shards:
            tar = Path(scratch) / f"{shard.sha256}.tar"
            with tar.open("wb") as out:
                subprocess.run(["zstd", "-d", "-q", "-c", str(store / blob_key(shard.sha256))],
                               stdout=out, check=True)  # fmt: skip
            tars.append((shard, tar))
        for level in args.levels.split(","):
            compressed = 0
            decode = 0.0
            largest_bytes = largest_decode = 0.0
            start = time.perf_counter()
            for shard, tar in tars:
                packed = tar.with_suffix(".packed")
                subprocess.run(compress_argv(level, tar, packed), check=True)
                size = packed.stat().st_size
                compressed += size
                seconds = cpu_of(decompress_argv(level, packed), stdout=subprocess.DEVNULL)
                decode += seconds
                if shard is largest:
                    largest_bytes, largest_decode = size, seconds
                packed.unlink()
            pack_seconds = time.perf_counter() - start
            cpu = (
                (receive_per_gb + hash_per_gb) * compressed / GB
                + decode
                + write_per_gb * raw_total / GB
            )
            tail = (
                hash_per_gb * largest_bytes / GB
                + largest_decode
                + (write_per_gb * largest.raw_bytes / GB)
            )
            row = {
                "level": level,
                "compressed_bytes": compressed,
                "ratio": raw_total / compressed,
                "compress_s": pack_seconds,
                "decode_cpu_s": decode,
                "decode_gb_s": raw_total / GB / decode,
                "largest_shard_bytes": largest_bytes,
                "pod_cpu_s": cpu,
                "projected_s": {
                    f"{bandwidth / GB:g} GB/s": max(compressed / bandwidth, cpu / CORES) + tail
                    for bandwidth in (1 * GB, 0.2 * GB)
                },
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    document = {
        "profile": profile.name,
        "machine": f"{os.cpu_count()} cores",
        "raw_bytes": raw_total,
        "default_level": f"{ZSTD_LEVEL}N",  # pack stores literals raw
        "hash_cpu_s_per_gb": hash_per_gb,
        "receive_cpu_s_per_gb": receive_per_gb,
        "write_cpu_s_per_raw_gb": write_per_gb,
        "rows": rows,
    }
    out = args.out or REPO / "bench" / "results" / f"compression-{profile.name}.json"
    out.write_text(json.dumps(document, indent=2) + "\n")
    print("| zstd level | download | ratio | decode (1 core) | pack time | pod start, 16 cores"
          " at 1 GB/s | at 200 MB/s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        projected = r["projected_s"]
        print(
            f"| {r['level']} | {r['compressed_bytes'] / GB:.2f} GB | {r['ratio']:.2f} |"
            f" {r['decode_cpu_s']:.1f} s | {r['compress_s']:.0f} s | {projected['1 GB/s']:.1f} s |"
            f" {projected['0.2 GB/s']:.1f} s |"
        )


if __name__ == "__main__":
    main()
