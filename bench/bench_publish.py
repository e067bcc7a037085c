"""Re-publishing an unchanged profile: how long gpubuild takes to find there is nothing to do.

    .venv/bin/python bench/bench_publish.py [--profile profiles/onnx-gpu.toml] [--repeat 5]

Publishes the profile once to a local folder store and once to Azurite (started here, on
loopback), then times `gpubuild publish-cache` again on each, as a user runs it (a new process):
the digest is already published and intact, so nothing is packed or uploaded. Also records the
first upload to Azurite (Azurite tops out near 100 MB/s: correctness, not speed).
Goal: a no-op re-publish in about a second. Results go to bench/results/publish.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.services import azurite  # noqa: E402


def publish(profile: Path, store: str, env: dict[str, str]) -> tuple[float, dict]:
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "builder.cli",
            "publish-cache",
            str(profile),
            "--store",
            store,
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"publish-cache failed:\n{proc.stderr[-3000:]}")
    return elapsed, json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", type=Path, default=REPO / "profiles" / "onnx-gpu.toml")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "publish.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpubuild-bench-publish-") as tmp:
        work = Path(tmp)
        env = {**os.environ}
        local = (work / "store").as_uri()
        first_local, document = publish(args.profile, local, env)
        noop_local = [publish(args.profile, local, env)[0] for _ in range(args.repeat)]
        rows.append(
            {
                "store": "local folder",
                "first_s": first_local,
                "noop_s": statistics.median(noop_local),
            }
        )
        with azurite(work / "azurite") as endpoint:
            env["AZURE_STORAGE_CONNECTION_STRING"] = endpoint.connection_string
            env["XDG_CACHE_HOME"] = str(work / "cache")  # packs once more into a fresh local cache
            store = f"az://{endpoint.account}/bench-{uuid.uuid4().hex[:8]}/cache"
            first_az, published = publish(args.profile, store, env)
            noop_az = [publish(args.profile, store, env)[0] for _ in range(args.repeat)]
            rows.append(
                {
                    "store": "Azurite (loopback)",
                    "first_s": first_az,
                    "noop_s": statistics.median(noop_az),
                    "uploaded_bytes": published["bytes_uploaded"],
                }
            )
    result = {
        "profile": document["profile"],
        "digest": document["digest"],
        "bytes": document["bytes"],
        "machine": f"{os.cpu_count()} cores",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| store | first publish (pack + upload) | no-op re-publish (median) |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {row['store']} | {row['first_s']:.1f} s | {row['noop_s']:.2f} s |")


if __name__ == "__main__":
    main()
