"""Cold install into an empty folder: the generated init script vs pip, uv and cp -a.

    .venv/bin/python bench/bench_unpack.py [--profile profiles/onnx-gpu.toml] [--runs 3]
    .venv/bin/python bench/bench_unpack.py --profile profiles/torch-cu121.toml \\
        --index pytorch-cu121=default --skip-tmpfs
    .venv/bin/python bench/bench_unpack.py --profile profiles/torch-cu121.toml \\
        --index pytorch-cu121=default --skip-tmpfs --prune @dev-files --host-python

All four install the same wheels of the profile's lock, in one run:
  - gpubuild init script reading the published store over loopback HTTP (nginx serving the
    store folder; Azurite is too slow to time);
  - `pip install --target` from a loopback index of the same wheels (the deployment guide's way),
    served by nginx as the store is: a Python server would spend a core of this machine on the
    baselines' bytes (uv took 9% longer from one);
  - `uv pip install --target --no-cache` from the same index;
  - `cp -a` of the finished tree: the floor.
Each runs `--runs` times on disk (and on tmpfs unless --skip-tmpfs), cold page cache before
each; the medians of wall time and of CPU-seconds (user + system of the whole process tree) are
reported, then the script's warm no-op. `--prune` packs a variant of the profile with that
[policy] prune (the baselines install the unpruned wheels: that is what pruning saves);
`--host-python` retargets the variant to this machine's python and, after the runs, imports the
unpacked set and runs a CPU tensor operation and a torchvision transform.

Writes bench/results/unpack-<profile>[-<variant>].json and a chart beside it.
Needs root (tmpfs mount, dropping the page cache) and nginx (Debian's nginx-light).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder.indexes import IndexSettings  # noqa: E402
from builder.initscript import render_init_script  # noqa: E402
from builder.lock import read_lock  # noqa: E402
from builder.manifest import Manifest  # noqa: E402
from builder.pipeline import pack_profile  # noqa: E402
from builder.profile import Profile, load_profile  # noqa: E402
from builder.tools import uv_bin, uv_env  # noqa: E402
from tests.support.index import write_simple_index  # noqa: E402
from tests.support.services import nginx_serving  # noqa: E402

METHODS = ("init", "uv", "pip", "cp")


def run(argv: list[str], *, env: dict[str, str] | None = None) -> float:
    return run_measured(argv, env=env)[0]


def run_measured(argv: list[str], *, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and CPU-seconds (user + system of every process it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def drop_caches() -> None:
    """Cold page cache for reads, so each method reads its input from disk like a fresh pod."""
    subprocess.run(["sync"], check=False)
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


@contextlib.contextmanager
def nginx_index(wheels: Iterable[Path], root: Path, tmp: Path) -> Iterator[str]:
    """The wheels as a simple index under `root`, served by nginx; yields its /simple URL and
    removes the index afterwards. The wheels are hard-linked into it where they can be (the
    torch set is 2.9 GB), copied where not."""
    shutil.rmtree(root, ignore_errors=True)
    try:
        files = root / "files"
        files.mkdir(parents=True)
        for wheel in wheels:
            try:
                os.link(wheel, files / wheel.name)
            except OSError:
                shutil.copyfile(wheel, files / wheel.name)
        # Already in root/files: write_simple_index only writes the pages.
        write_simple_index(sorted(files.iterdir()), root)
        with nginx_serving(root, tmp) as url:
            yield f"{url}/simple"
    finally:
        shutil.rmtree(root, ignore_errors=True)


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
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
            *pip_target_args(python), "-d", str(dest), "-r", str(lock_path),
        ],
        env=env,
    )  # fmt: skip
    return sorted(dest.glob("*.whl"))


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def variant_profile(profile: Path, work: Path, prune: list[str], host_python: bool) -> Path:
    """A copy of the profile (beside its base snapshot's folder) with [policy] prune set and,
    with `host_python`, this machine's python as the target."""
    text = profile.read_text()
    name = re.search(r'^name = "([^"]+)"', text, re.M)
    assert name is not None
    suffix = "-pruned" if prune else ""
    suffix += "-host" if host_python else ""
    new_name = name.group(1) + suffix
    text = text.replace(name.group(0), f'name = "{new_name}"', 1)
    if host_python:
        host = f"{sys.version_info.major}.{sys.version_info.minor}"
        text = re.sub(r'^python = "[^"]+"', f'python = "{host}"', text, count=1, flags=re.M)
    if prune:
        text = text.replace("[policy]\n", f"[policy]\nprune = {json.dumps(prune)}\n", 1)
    path = profile.parent / f".bench-{new_name}.toml"
    path.write_text(text)
    return path


def one_round(
    root: Path, script: Path, index_url: str, lock_path: Path, python: str, platform: str
) -> dict[str, float]:
    """Each method once into an empty folder under root, cold page cache before each."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / "init"
    target.mkdir()
    row: dict[str, float] = {}
    drop_caches()
    row["init_s"], row["init_cpu"] = run_measured(
        [str(script)], env={**os.environ, "GPUBUILD_TARGET": str(target)}
    )
    row["files"] = count_files(target)
    row["noop_s"] = run([str(script)], env={**os.environ, "GPUBUILD_TARGET": str(target)})
    drop_caches()
    row["pip_s"], row["pip_cpu"] = run_measured(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--require-hashes",
            "--no-cache-dir", *pip_target_args(python), "--index-url", index_url,
            "--target", str(root / "pip"), "-r", str(lock_path),
        ],
        env={**os.environ, "PIP_CONFIG_FILE": os.devnull},
    )  # fmt: skip
    shutil.rmtree(root / "pip")  # one finished tree besides the script's at a time
    drop_caches()
    row["uv_s"], row["uv_cpu"] = run_measured(
        [
            uv_bin(), "pip", "install", "--quiet", "--no-deps", "--require-hashes", "--no-cache",
            "--python-version", python, "--python-platform", platform, "--no-python-downloads",
            "--index-url", index_url, "--target", str(root / "uv"), "-r", str(lock_path),
        ],
        env=uv_env({"UV_NO_CACHE": "1"}),
    )  # fmt: skip
    shutil.rmtree(root / "uv")
    drop_caches()
    row["cp_s"], row["cp_cpu"] = run_measured(["cp", "-a", str(target), str(root / "cp")])
    shutil.rmtree(root, ignore_errors=True)
    return row


def import_check(tree: Path, manifest: Manifest) -> str:
    """The unpacked set imported by this machine's python: a CPU tensor op and a transform."""
    code = (
        "import torch, torchvision.transforms as T\n"
        "x = torch.arange(12, dtype=torch.float32).reshape(3, 4)\n"
        "y = (x @ x.T).sum().item()\n"
        "img = T.Resize((8, 8), antialias=True)(torch.rand(3, 32, 32))\n"
        "print(f'torch {torch.__version__}: matmul sum {y:.0f}, resized {tuple(img.shape)}')\n"
    )
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(tree),
        "LD_LIBRARY_PATH": manifest.env.get("LD_LIBRARY_PATH", "").replace(
            manifest.install_dir, str(tree)
        ),
    }
    done = subprocess.run(
        [sys.executable, "-s", "-c", code], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"the unpacked set does not import:\n{done.stderr[-3000:]}")
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", type=Path, default=REPO / "profiles" / "onnx-gpu.toml")
    parser.add_argument("--index", action="append", default=[], metavar="NAME=URL")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "work")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-tmpfs", action="store_true")
    parser.add_argument("--prune", action="append", default=[], metavar="PATTERN")
    parser.add_argument("--host-python", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731

    source = args.profile
    if args.prune or args.host_python:
        source = variant_profile(args.profile, args.work, args.prune, args.host_python)
    profile: Profile = load_profile(source)
    pairs = (item.partition("=") for item in args.index)
    settings = IndexSettings(overrides=tuple((name, url) for name, _, url in pairs))
    work = args.work.resolve()
    shutil.rmtree(work / "runs", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store"
    manifest = pack_profile(profile, out_dir=store, settings=settings).manifest
    lock_path = source.with_suffix(".lock")
    lock = read_lock(lock_path)
    raw_bytes = sum(s.raw_bytes for s in manifest.shards)
    log(
        f"{profile.name}: {len(manifest.shards)} shards, {manifest.total_bytes / 1e6:.0f} MB "
        f"compressed, {raw_bytes / 1e6:.0f} MB, {manifest.total_files} files"
    )
    wheels = download_wheels(lock_path, lock.python, work / f"wheels-{lock.python}")
    places: dict[str, list[dict[str, float]]] = {}
    imported = None
    with ExitStack() as stack:
        index_url = stack.enter_context(nginx_index(wheels, work / "index", work / "nginx-index"))
        store_url = stack.enter_context(nginx_serving(store, work / "nginx"))
        script = work / "init.sh"
        script.write_text(render_init_script(manifest, store_url))
        script.chmod(0o755)
        roots = [("disk", work / "runs")]
        if not args.skip_tmpfs:
            mount = work / "tmpfs"
            mount.mkdir(exist_ok=True)
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=16g", "tmpfs", str(mount)], check=True
            )
            stack.callback(subprocess.run, ["umount", str(mount)], check=False)
            roots.append(("tmpfs", mount / "runs"))
        for place, root in roots:
            for number in range(args.runs):
                row = one_round(root, script, index_url, lock_path, lock.python, lock.platform)
                log(
                    f"{place} run {number + 1}: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in row.items())
                )
                places.setdefault(place, []).append(row)
        if args.host_python:
            tree = work / "import-check"
            shutil.rmtree(tree, ignore_errors=True)
            tree.mkdir()
            run([str(script)], env={**os.environ, "GPUBUILD_TARGET": str(tree)})
            imported = import_check(tree, manifest)
            log(imported)
            shutil.rmtree(tree, ignore_errors=True)

    medians = {
        place: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        for place, rows in places.items()
    }
    document = {
        "profile": profile.name,
        "machine": f"{os.cpu_count()} cores",
        "compressed_bytes": manifest.total_bytes,
        "raw_bytes": raw_bytes,
        "files": manifest.total_files,
        "shards": len(manifest.shards),
        "largest_shard": max(s.bytes for s in manifest.shards),
        "prune": list(manifest.prune),
        "pruned_files": sum(p.files for p in manifest.pruned),
        "pruned_bytes": sum(p.bytes for p in manifest.pruned),
        "import_check": imported,
        "runs": args.runs,
        "medians": medians,
        "rounds": places,
    }
    out = args.out or REPO / "bench" / "results" / f"unpack-{profile.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(
        "| where | init script | uv --target | pip --target | cp -a (floor) | uv/init | pip/init"
        " | init/cp | CPU init/cp | warm no-op |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for place, m in medians.items():
        print(
            f"| {place} | {m['init_s']:.1f} s | {m['uv_s']:.1f} s | {m['pip_s']:.1f} s"
            f" | {m['cp_s']:.1f} s | {m['uv_s'] / m['init_s']:.1f}x | {m['pip_s'] / m['init_s']:.1f}x"
            f" | {m['init_s'] / m['cp_s']:.2f}x | {m['init_cpu'] / m['cp_cpu']:.2f}x"
            f" | {m['noop_s']:.2f} s |"
        )
    chart(medians, out.with_suffix(".png"), document)
    if source != args.profile:
        source.unlink(missing_ok=True)


def chart(medians: dict[str, dict[str, float]], path: Path, document: dict[str, object]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "init_s": "gpubuild init script",
        "uv_s": "uv pip install --target",
        "pip_s": "pip install --target",
        "cp_s": "cp -a (floor)",
    }
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(medians)
    for n, (place, row) in enumerate(medians.items()):
        values = [row[key] for key in labels]
        positions = [i + n * width for i in range(len(labels))]
        bars = ax.barh(positions, values, height=width, label=place)
        ax.bar_label(bars, labels=[f"{v:.1f} s" for v in values], padding=3, fontsize=8)
    ax.set_yticks([i + width * (len(medians) - 1) / 2 for i in range(len(labels))])
    ax.set_yticklabels(list(labels.values()))
    ax.invert_yaxis()
    ax.set_xlabel(f"seconds, median of {document['runs']}, cold, into an empty folder")
    raw = float(document["raw_bytes"])  # type: ignore[arg-type]
    ax.set_title(
        f"{document['profile']}: {raw / 1e9:.1f} GB, {document['files']:,} files "
        f"({document['machine']})"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
