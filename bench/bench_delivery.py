"""Delivery modes on one node: the registry (init-copy, image volume) vs the blob init script vs uv.

    .venv/bin/python bench/bench_delivery.py [--profile profiles/onnx-gpu.toml] [--repeats 3]

The profile is packed once and published to a local CNCF registry (oci+http on loopback) and
served as a folder store by nginx on loopback. Then, in one run, `--repeats` times each:

  first pod on a cold node (a fresh containerd, empty page cache, an empty volume):
    - init-copy: containerd pulls the init-copy image by digest, then runs it into the volume
      (what the kubelet does for the initContainer);
    - blob: the generated init script downloads, verifies and unpacks the shards;
    - uv: `uv pip install --target --no-cache` from a loopback index of the same wheels (nginx);
  second pod on the same node (a new empty volume):
    - init-copy: the image is in the node's cache: only the copy runs;
    - blob: the script downloads everything again;
  image volume (stand-in: `ctr images mount`, which is what the runtime does for one):
    - cold: pull the heavy image and mount it; warm: mount the cached image.

Prints a table of medians, writes bench/results/delivery.json and delivery.png. Needs root
(containerd) and Debian's docker-registry, containerd, nginx-light and busybox-static.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_unpack import count_files, download_wheels, drop_caches, nginx_index, run  # noqa: E402

from builder.initscript import render_init_script  # noqa: E402
from builder.lock import read_lock  # noqa: E402
from builder.pipeline import pack_profile, publish_profile  # noqa: E402
from builder.profile import load_profile  # noqa: E402
from builder.tools import uv_bin, uv_env  # noqa: E402
from tests.support.services import Containerd, containerd, nginx_serving, registry  # noqa: E402

# What each figure is, in table order: key, label.
FIGURES = [
    ("cold_init_copy_s", "first pod: registry pull + init-copy"),
    ("cold_pull_s", "  of which the pull (download + unpack)"),
    ("cold_blob_s", "first pod: blob init script"),
    ("cold_uv_s", "first pod: uv pip install --target"),
    ("warm_init_copy_s", "second pod: init-copy from the cached image"),
    ("warm_blob_s", "second pod: blob init script (downloads again)"),
    ("cold_mount_s", "image volume, cold: pull + ctr images mount"),
    ("warm_mount_s", "image volume, cached: ctr images mount"),
]


def tree_files(root: Path) -> int:
    """Files and links of the installed tree, the state folder (.gpubuild) left out."""
    return count_files(root) - (
        count_files(root / ".gpubuild") if (root / ".gpubuild").is_dir() else 0
    )


def timed(node: Containerd, *args: str) -> float:
    start = time.perf_counter()
    node.run(*args, timeout=900)
    return time.perf_counter() - start


def copy_into(node: Containerd, reference: str, volume: Path, name: str) -> float:
    """The init-copy container run as the kubelet would: the volume bind-mounted."""
    volume.mkdir(parents=True)
    return timed(
        node, "run", "--rm",
        "--mount", f"type=bind,src={volume},dst=/shared-packages,options=rbind:rw",
        "--env", "GPUBUILD_TARGET=/shared-packages",
        reference, name,
    )  # fmt: skip


def one_round(
    references: dict[str, str], script: Path, uv_argv: list[str], uv_environ: dict[str, str],
    root: Path, files: int,
) -> dict[str, float]:  # fmt: skip
    row: dict[str, float] = {}
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    copy_image, heavy_image = references["init-copy image"], references["image"]

    drop_caches()
    with containerd() as node:
        row["cold_pull_s"] = timed(node, "images", "pull", "--plain-http", copy_image)
        row["cold_init_copy_s"] = row["cold_pull_s"] + copy_into(
            node, copy_image, root / "copy-1", "pod-1"
        )
        drop_caches()
        row["warm_init_copy_s"] = copy_into(node, copy_image, root / "copy-2", "pod-2")
    for name in ("copy-1", "copy-2"):
        assert tree_files(root / name) == files, f"{name}: file count"

    drop_caches()
    with containerd() as node:
        mountpoint = root / "mounted"
        mountpoint.mkdir()
        pull = timed(node, "images", "pull", "--plain-http", heavy_image)
        row["cold_mount_s"] = pull + timed(node, "images", "mount", heavy_image, str(mountpoint))
        assert count_files(mountpoint) == files, "mounted image: file count"
        node.run("images", "unmount", str(mountpoint))
        drop_caches()
        row["warm_mount_s"] = timed(node, "images", "mount", heavy_image, str(mountpoint))
        node.run("images", "unmount", str(mountpoint))

    for label in ("cold_blob_s", "warm_blob_s"):
        target = root / label
        target.mkdir()
        drop_caches()
        row[label] = run([str(script)], env={**os.environ, "GPUBUILD_TARGET": str(target)})
        assert tree_files(target) == files, f"{label}: file count"

    drop_caches()
    row["cold_uv_s"] = run([*uv_argv, "--target", str(root / "uv")], env=uv_environ)
    shutil.rmtree(root, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", type=Path, default=REPO / "profiles" / "onnx-gpu.toml")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "work")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "delivery.json")
    args = parser.parse_args()
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731

    profile = load_profile(args.profile)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store"
    manifest = pack_profile(profile, out_dir=store).manifest
    lock_path = profile.path.with_suffix(".lock")
    lock = read_lock(lock_path)
    wheels = download_wheels(lock_path, lock.python, work / "wheels")
    log(
        f"{profile.name}: {len(manifest.shards)} shards, {manifest.total_bytes / 1e6:.0f} MB "
        f"compressed, {manifest.total_files} files"
    )

    rows: list[dict[str, float]] = []
    with ExitStack() as stack:
        # A fresh registry: the push is timed whole.
        shutil.rmtree(work / "registry-service", ignore_errors=True)
        address = stack.enter_context(registry(work / "registry-service"))
        start = time.perf_counter()
        published = publish_profile(
            profile, store_url=f"oci+http://{address}/gpubuild/{profile.name}", pack_dir=store
        )
        push_s = time.perf_counter() - start
        log(f"pushed in {push_s:.1f} s: {published.references}")
        start = time.perf_counter()
        again = publish_profile(
            profile, store_url=f"oci+http://{address}/gpubuild/{profile.name}", pack_dir=store
        )
        republish_s = time.perf_counter() - start
        assert again.already_published and again.bytes_uploaded == 0

        index_url = stack.enter_context(nginx_index(wheels, work / "index", work / "nginx-index"))
        store_url = stack.enter_context(nginx_serving(store, work / "nginx"))
        script = work / "init.sh"
        script.write_text(render_init_script(manifest, store_url))
        script.chmod(0o755)
        uv_argv = [
            uv_bin(), "pip", "install", "--quiet", "--no-deps", "--require-hashes", "--no-cache",
            "--python-version", lock.python, "--python-platform", lock.platform,
            "--no-python-downloads", "--index-url", index_url, "-r", str(lock_path),
        ]  # fmt: skip
        for number in range(args.repeats):
            row = one_round(
                published.references, script, uv_argv, uv_env({"UV_NO_CACHE": "1"}),
                work / "delivery-runs", manifest.total_files,
            )  # fmt: skip
            log(f"round {number + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()))
            rows.append(row)

    medians = {key: statistics.median(r[key] for r in rows) for key, _ in FIGURES}
    document = {
        "profile": profile.name,
        "machine": f"{os.cpu_count()} cores",
        "compressed_bytes": manifest.total_bytes,
        "raw_bytes": sum(s.raw_bytes for s in manifest.shards),
        "files": manifest.total_files,
        "push_s": push_s,
        "republish_s": republish_s,
        "medians": medians,
        "rounds": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    uv = medians["cold_uv_s"]
    print("| pod | time | vs uv |")
    print("|---|---:|---:|")
    for key, label in FIGURES:
        print(f"| {label.strip()} | {medians[key]:.1f} s | {uv / medians[key]:.1f}x |")
    print(f"push {push_s:.1f} s; re-publish, nothing changed {republish_s:.2f} s")
    chart(medians, args.out.with_suffix(".png"), document)


def chart(medians: dict[str, float], path: Path, document: dict[str, object]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(key, label) for key, label in FIGURES if not label.startswith(" ")]
    fig, ax = plt.subplots(figsize=(9, 4))
    values = [medians[key] for key, _ in shown]
    bars = ax.barh(range(len(shown)), values, height=0.6)
    ax.bar_label(
        bars,
        labels=[f"{v:.2f} s" if v < 1 else f"{v:.1f} s" for v in values],
        padding=3,
        fontsize=8,
    )
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([label for _, label in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds, median (lower is better)")
    raw = float(document["raw_bytes"])  # type: ignore[arg-type]
    ax.set_title(
        f"{document['profile']}: {raw / 1e9:.1f} GB, {document['files']:,} files, one node "
        f"({document['machine']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
