"""Cold install into an empty folder: the generated init script vs pip, uv and cp -a.

    .venv/bin/python bench/bench_unpack.py [--profile profiles/onnx-gpu.toml] [--skip-tmpfs]

All four install the same wheels of the profile's lock, in one run:
  - gpubuild init script reading the published store over loopback HTTP (nginx serving the
    store folder; Azurite is too slow to time);
  - `pip install --target` from a loopback index of the same wheels (the deployment guide's way);
  - `uv pip install --target --no-cache` from the same index;
  - `cp -a` of the finished tree: the floor.
Each runs on disk and on tmpfs, then the script's warm no-op is timed. Prints a table,
writes bench/results/unpack.json and a chart bench/results/unpack.png.
Needs root (tmpfs mount) and nginx (Debian's nginx-light).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder.initscript import render_init_script  # noqa: E402
from builder.lock import read_lock  # noqa: E402
from builder.pipeline import pack_profile  # noqa: E402
from builder.profile import load_profile  # noqa: E402
from builder.tools import uv_bin, uv_env  # noqa: E402
from tests.support.index import serve_index  # noqa: E402
from tests.support.services import nginx_serving  # noqa: E402


def run(argv: list[str], *, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return elapsed


def drop_caches() -> None:
    """Cold page cache for reads, so each method reads its input from disk like a fresh pod."""
    subprocess.run(["sync"], check=False)
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def pip_target_args(python: str) -> list[str]:
    """pip's options for the worker's wheels (binary only, its python, manylinux x86_64)."""
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    args = ["--only-binary=:all:", "--python-version", python]
    for platform in [*platforms, "manylinux1_x86_64"]:
        args += ["--platform", platform]
    return args


def download_wheels(lock_path: Path, python: str, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--require-hashes",
            *pip_target_args(python),
            "-d",
            str(dest),
            "-r",
            str(lock_path),
        ],
        env=env,
    )
    return sorted(dest.glob("*.whl"))


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", type=Path, default=REPO / "profiles" / "onnx-gpu.toml")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "work")
    parser.add_argument("--skip-tmpfs", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "unpack.json")
    args = parser.parse_args()

    profile = load_profile(args.profile)
    work = args.work.resolve()
    shutil.rmtree(work / "runs", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store"
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    packed = pack_profile(profile, out_dir=store)
    manifest = packed.manifest
    lock_path = profile.path.with_suffix(".lock")
    lock = read_lock(lock_path)
    log(
        f"{profile.name}: {len(manifest.shards)} shards, {manifest.total_bytes / 1e6:.0f} MB "
        f"compressed, {sum(s.raw_bytes for s in manifest.shards) / 1e6:.0f} MB, {manifest.total_files} files"
    )
    wheels = download_wheels(lock_path, lock.python, work / "wheels")
    env = uv_env({"UV_NO_CACHE": "1"})
    pip_env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    results: list[dict] = []

    with ExitStack() as stack:
        index_root = work / "index"
        shutil.rmtree(index_root, ignore_errors=True)
        index_url = stack.enter_context(serve_index(wheels, index_root))
        store_url = stack.enter_context(nginx_serving(store, work / "nginx"))
        script = work / "init.sh"
        script.write_text(render_init_script(manifest, store_url))
        script.chmod(0o755)

        places = [("disk", work / "runs")]
        if not args.skip_tmpfs:
            mount = work / "tmpfs"
            mount.mkdir(exist_ok=True)
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=12g", "tmpfs", str(mount)], check=True
            )
            stack.callback(subprocess.run, ["umount", str(mount)], check=False)
            places.append(("tmpfs", mount))

        for place, root in places:
            root.mkdir(parents=True, exist_ok=True)
            target = root / "init"
            target.mkdir()
            drop_caches()
            init_s = run([str(script)], env={**os.environ, "GPUBUILD_TARGET": str(target)})
            files = count_files(target)
            noop_s = run([str(script)], env={**os.environ, "GPUBUILD_TARGET": str(target)})

            drop_caches()
            pip_s = run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--no-deps",
                    "--require-hashes",
                    "--no-cache-dir",
                    *pip_target_args(lock.python),
                    "--index-url",
                    index_url,
                    "--target",
                    str(root / "pip"),
                    "-r",
                    str(lock_path),
                ],
                env=pip_env,
            )
            drop_caches()
            uv_s = run(
                [
                    uv_bin(),
                    "pip",
                    "install",
                    "--quiet",
                    "--no-deps",
                    "--require-hashes",
                    "--no-cache",
                    "--python-version",
                    lock.python,
                    "--python-platform",
                    lock.platform,
                    "--no-python-downloads",
                    "--index-url",
                    index_url,
                    "--target",
                    str(root / "uv"),
                    "-r",
                    str(lock_path),
                ],
                env=env,
            )
            drop_caches()
            cp_s = run(["cp", "-a", str(target), str(root / "cp")])
            row = {
                "place": place,
                "files": files,
                "init_s": init_s,
                "pip_s": pip_s,
                "uv_s": uv_s,
                "cp_s": cp_s,
                "noop_s": noop_s,
            }
            results.append(row)
            log(
                f"{place}: init {init_s:.1f} s, pip {pip_s:.1f} s, uv {uv_s:.1f} s, cp -a {cp_s:.1f} s, "
                f"no-op {noop_s:.2f} s"
            )
            shutil.rmtree(root / "pip", ignore_errors=True)
            shutil.rmtree(root / "uv", ignore_errors=True)
            shutil.rmtree(root / "cp", ignore_errors=True)
            shutil.rmtree(target, ignore_errors=True)

    document = {
        "profile": profile.name,
        "machine": f"{os.cpu_count()} cores",
        "compressed_bytes": manifest.total_bytes,
        "raw_bytes": sum(s.raw_bytes for s in manifest.shards),
        "files": manifest.total_files,
        "shards": len(manifest.shards),
        "rows": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(
        "| where | init script | pip --target | uv --target | cp -a (floor) | pip/init | uv/init | init/cp | warm no-op |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['place']} | {r['init_s']:.1f} s | {r['pip_s']:.1f} s | {r['uv_s']:.1f} s | {r['cp_s']:.1f} s "
            f"| {r['pip_s'] / r['init_s']:.1f}x | {r['uv_s'] / r['init_s']:.1f}x | {r['init_s'] / r['cp_s']:.1f}x "
            f"| {r['noop_s']:.2f} s |"
        )
    chart(results, args.out.with_suffix(".png"), document)


def chart(results: list[dict], path: Path, document: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [
        ("init_s", "gpubuild init script"),
        ("uv_s", "uv pip install --target"),
        ("pip_s", "pip install --target"),
        ("cp_s", "cp -a (floor)"),
    ]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(results)
    for n, row in enumerate(results):
        values = [row[key] for key, _ in methods]
        positions = [i + n * width for i in range(len(methods))]
        bars = ax.barh(positions, values, height=width, label=row["place"])
        ax.bar_label(bars, labels=[f"{v:.1f} s" for v in values], padding=3, fontsize=8)
    ax.set_yticks([i + width * (len(results) - 1) / 2 for i in range(len(methods))])
    ax.set_yticklabels([label for _, label in methods])
    ax.invert_yaxis()
    ax.set_xlabel("seconds, cold install into an empty folder (lower is better)")
    ax.set_title(
        f"{document['profile']}: {document['raw_bytes'] / 1e9:.1f} GB, {document['files']:,} files "
        f"({document['machine']})"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
