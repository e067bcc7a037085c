"""Resolve time: gpubuild vs bare `uv pip compile` vs pip-compile, in one run, as ratios.

    .venv/bin/python bench/bench_resolve.py [--profile profiles/onnx-gpu.toml] [--repeat 5]

All three get the same requirements and the same constraints (the base image's pins plus the
profile's policy). gpubuild and bare uv resolve for the profile's target (python 3.10,
manylinux_2_28); pip-compile can only resolve for the host, so it gets the host's python.
Every tool runs once to warm its cache, then `--repeat` times; the table shows medians.
A fourth row times a no-change re-run of `gpubuild resolve` (the lock is already current).
Results go to bench/results/resolve.json.
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder.backends import constraint_lines  # noqa: E402
from builder.profile import load_profile  # noqa: E402
from builder.tools import pip_compile_argv, uv_bin, uv_env  # noqa: E402


def timed(argv: list[str], *, cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:3]} failed:\n{proc.stderr[-2000:]}")
    return elapsed


def measure(name: str, make_argv, repeat: int, *, cwd: Path, env: dict[str, str]) -> dict:
    timed(make_argv(-1), cwd=cwd, env=env)  # warm-up: fills the tool's cache
    times = [timed(make_argv(i), cwd=cwd, env=env) for i in range(repeat)]
    print(f"  {name}: median {statistics.median(times):.3f} s over {repeat}", file=sys.stderr)
    return {"name": name, "median_s": statistics.median(times), "runs_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", type=Path, default=REPO / "profiles" / "onnx-gpu.toml")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "resolve.json")
    args = parser.parse_args()

    profile = load_profile(args.profile)
    snapshot = profile.snapshot
    gpubuild_argv = [sys.executable, "-m", "builder.cli", "resolve", str(profile.path.resolve())]
    if profile.indexes:
        gpubuild_argv += [f"--index={index.name}=default" for index in profile.indexes]
    host = "{}.{}".format(*sys.version_info[:2])
    env = uv_env()
    pip_env = {**env, "PIP_CONFIG_FILE": os.devnull}  # the public index only, like uv

    with tempfile.TemporaryDirectory(prefix="gpubuild-bench-") as tmp:
        work = Path(tmp)
        (work / "requirements.in").write_text("\n".join(profile.heavy) + "\n")
        (work / "constraints.txt").write_text("\n".join(constraint_lines(profile, snapshot)) + "\n")
        target = [
            "--python-version",
            profile.target.python,
            "--python-platform",
            profile.target.platform,
        ]
        print(f"resolving {profile.name} ({len(profile.heavy)} requirements)", file=sys.stderr)
        rows = [
            measure(
                "gpubuild resolve",
                lambda i: [*gpubuild_argv, "-o", str(work / f"gpubuild-{i}.lock")],
                args.repeat,
                cwd=work,
                env=env,
            ),
            measure(
                "uv pip compile (bare)",
                lambda i: [
                    uv_bin(),
                    "pip",
                    "compile",
                    "requirements.in",
                    "-c",
                    "constraints.txt",
                    *target,
                    "--no-build",
                    "--generate-hashes",
                    "--no-python-downloads",
                    "-q",
                    "-o",
                    f"uv-{i}.txt",
                ],
                args.repeat,
                cwd=work,
                env=env,
            ),
            measure(
                f"pip-compile (host python {host})",
                lambda i: [
                    *pip_compile_argv(),
                    "-q",
                    "--generate-hashes",
                    "--no-header",
                    "--pip-args",
                    "--only-binary=:all:",
                    "-c",
                    "constraints.txt",
                    "-o",
                    f"pip-{i}.txt",
                    "requirements.in",
                ],
                max(1, min(args.repeat, 3)),
                cwd=work,
                env=pip_env,
            ),
        ]
        lock = work / "noop.lock"
        timed([*gpubuild_argv, "-o", str(lock)], cwd=work, env=env)
        rows.append(
            measure(
                "gpubuild resolve, nothing changed",
                lambda i: [*gpubuild_argv, "-o", str(lock)],
                args.repeat,
                cwd=work,
                env=env,
            )
        )

    uv_median = rows[1]["median_s"]
    result = {
        "profile": profile.name,
        "machine": f"{os.cpu_count()} cores",
        "rows": rows,
        "gpubuild_over_uv": rows[0]["median_s"] / uv_median,
        "pip_compile_over_gpubuild": rows[2]["median_s"] / rows[0]["median_s"],
        "noop_s": rows[3]["median_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| run | median s | vs bare uv |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {row['name']} | {row['median_s']:.2f} | {row['median_s'] / uv_median:.2f}x |")
    print(
        f"\ngpubuild / bare uv = {result['gpubuild_over_uv']:.2f} (goal <= 1.2); "
        f"no-change re-run {result['noop_s']:.2f} s (goal < 1 s)"
    )


if __name__ == "__main__":
    main()
