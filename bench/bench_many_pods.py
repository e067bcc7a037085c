"""A worker group starting at once: N init scripts against one store, calm and throttled.

    .venv/bin/python bench/bench_many_pods.py [--pods 32 128] [--shard-kb 1500 800 400]

A set of a few shards (random bytes: they do not compress) is packed into a folder that nginx
serves on loopback, behind the fault-injecting proxy of the tests (tests/support/faults.py).
For each N, two runs start N copies of the generated init script at once, each into a volume
of its own:

  calm:      the proxy passes everything on (no faults, no cap, no pacing);
  throttled: 15% of requests answered 503 Server Busy with Retry-After: 1, 10% of bodies reset
             mid-way, at most 16 connections at once (more are answered 503), 2 MB/s per body.

Every pod must end with the complete verified set. Prints, and writes to
bench/results/many_pods.json: the wall time until the last pod is done, the pods' median, 95th
percentile and longest time, the bytes the store served against the bytes needed, the requests
and the failed ones by kind, and the retries the pods report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder.initscript import render_init_script  # noqa: E402
from builder.manifest import Manifest, blob_key  # noqa: E402
from builder.pack import write_artifact  # noqa: E402
from builder.tools import run_uv  # noqa: E402
from tests.support.faults import Chaos, FaultProxy, run_pods  # noqa: E402
from tests.support.services import nginx_serving  # noqa: E402
from tests.support.users import nonroot_folder  # noqa: E402
from tests.support.wheels import build_wheel  # noqa: E402

RESULTS = REPO / "bench" / "results" / "many_pods.json"
CALM = Chaos()
THROTTLED = Chaos(
    busy=0.15, retry_after=1, reset=0.1, max_connections=16, bytes_per_second=2_000_000, seed=7
)
RETRIES = 10


def make_store(work: Path, store: Path, shard_kb: list[int]) -> Manifest:
    noise = random.Random(1)
    wheels = [
        build_wheel(
            work / "wheels",
            f"part-{index}",
            "1.0",
            files={f"part_{index}/blob.bin": noise.randbytes(kb * 1000)},
        )
        for index, kb in enumerate(shard_kb)
    ]
    wheels.append(
        build_wheel(
            work / "wheels",
            "many-files",
            "1.0",
            files={f"many_files/m{i}.py": f"X = {i}\n".encode() for i in range(300)},
        )
    )
    tree = work / "tree"
    done = run_uv(["pip", "install", "--target", str(tree), "--no-deps", *map(str, wheels)])
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    manifest = write_artifact(
        tree,
        store,
        profile="crowd",
        digest=hashlib.sha256(b"bench-crowd").hexdigest(),
        python="3.11",
        platform="x86_64-manylinux_2_28",
        install_dir="/shared-packages",
        shard_threshold=100_000,
    )
    for path in [store, *store.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return manifest


def one_run(
    upstream: str, manifest: Manifest, pods: int, chaos: Chaos, work: Path
) -> dict[str, object]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "GPUBUILD_RETRIES": str(RETRIES),
        "GPUBUILD_PARALLEL": "2",
    }
    with FaultProxy(upstream, chaos) as proxy:
        script = work / "init.sh"
        script.write_text(render_init_script(manifest, proxy.url))
        script.chmod(0o755)
        started = time.monotonic()
        runs = run_pods(script, pods, work / "pods", proxy.client_url, env, timeout=1800)
        wall = time.monotonic() - started
        entries = proxy.entries()
    failed_pods = [run.name for run in runs if run.returncode != 0]
    for run in runs:
        if run.returncode != 0:
            print(f"{run.name} failed:\n{run.stderr[-2000:]}", file=sys.stderr)
    blobs = tuple(f"/{blob_key(s.sha256)}" for s in manifest.shards)
    gets = [e for e in entries if e.method == "GET" and e.path.endswith(blobs)]
    failed = Counter(e.fault or str(e.status) for e in gets if e.status >= 500 or e.fault)
    seconds = sorted(run.seconds for run in runs)
    return {
        "pods": pods,
        "failed_pods": failed_pods,
        "wall_s": round(wall, 2),
        "pod_median_s": round(statistics.median(seconds), 2),
        "pod_p95_s": round(seconds[max(0, int(len(seconds) * 0.95) - 1)], 2),
        "pod_max_s": round(seconds[-1], 2),
        "bytes_needed": pods * manifest.total_bytes,
        "bytes_served": sum(e.bytes_sent for e in gets if e.status in (200, 206)),
        "requests": len(gets),
        "failed_requests": dict(failed),
        "retries_reported": sum(max(run.retries, 0) for run in runs),
        "max_requests_per_pod_and_shard": max(Counter((e.client, e.path) for e in gets).values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pods", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--shard-kb", type=int, nargs="+", default=[1500, 800, 400])
    args = parser.parse_args()
    document: dict[str, object] = {
        "machine": f"{os.cpu_count()} cores",
        "throttled": {
            "busy": THROTTLED.busy,
            "retry_after_s": THROTTLED.retry_after,
            "reset": THROTTLED.reset,
            "max_connections": THROTTLED.max_connections,
            "bytes_per_second_per_body": THROTTLED.bytes_per_second,
        },
        "retries": RETRIES,
        "runs": [],
    }
    runs: list[dict[str, object]] = []
    with nonroot_folder("gpubuild-bench-crowd-") as home, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest = make_store(work, home / "store", args.shard_kb)
        document["set_bytes"] = manifest.total_bytes
        document["shards"] = len(manifest.shards)
        with nginx_serving(home / "store", work / "nginx") as upstream:
            for pods in args.pods:
                for label, chaos in (("calm", CALM), ("throttled", THROTTLED)):
                    folder = work / f"{label}-{pods}"
                    folder.mkdir()
                    result = {"mode": label, **one_run(upstream, manifest, pods, chaos, folder)}
                    runs.append(result)
                    print(json.dumps(result), flush=True)
    document["runs"] = runs
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\n{'run':<16} {'wall':>7} {'median':>7} {'p95':>7} {'max':>7} {'MB':>9} {'retries':>8}")
    for run in runs:
        served = run["bytes_served"]
        assert isinstance(served, int)
        print(
            f"{run['mode']:<10}{run['pods']:>5}  {run['wall_s']:>6}s {run['pod_median_s']:>6}s"
            f" {run['pod_p95_s']:>6}s {run['pod_max_s']:>6}s {served / 1e6:>8.1f}"
            f" {run['retries_reported']:>8}"
        )
    print(f"written {RESULTS}")
    if any(run["failed_pods"] for run in runs):
        raise SystemExit("some pods failed")


if __name__ == "__main__":
    main()
