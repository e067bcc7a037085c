"""Worker image size: the real image vs gpubuild's estimate, for the test build.

    .venv/bin/python bench/bench_image.py [--real]

Builds the worker image of tests/test_image.py (the local bookworm base, a light set of
wheels built here and served on loopback: light-app, small-util and big-light, 2 MB of
incompressible data) through `builder.image.build_image`, exactly as `gpubuild build-image`
does, and records:

- the image size `docker images` reports vs the estimate (base extracted + light layer +
  code layer), and the error (measured - estimate) / measured;
- the new layers alone (from the image history) vs their estimate, and that error.

`--real` adds a second case with real wheels (Pillow, requests, PyYAML and their
dependencies), where pip's own layout (console scripts, metadata files) is what the estimate
has to match. The light set is resolved and measured from the public index through uv as
usual; its wheels are then fetched once with `pip download` on this machine and served on
loopback to the build (so the build needs no route out, nor this machine's proxy CA). A
Docker engine is started for the run when none answers, as the tests do. Results go to
bench/results/image.json; scratch files to bench/work/image/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder.base import render_snapshot, snapshot_image  # noqa: E402
from builder.budget import render_budget  # noqa: E402
from builder.image import build_image  # noqa: E402
from builder.indexes import IndexSettings  # noqa: E402
from builder.lock import Lock  # noqa: E402
from builder.profile import load_profile  # noqa: E402
from builder.worker import plan_worker  # noqa: E402
from tests.support import services  # noqa: E402
from tests.support.index import serve_index  # noqa: E402
from tests.test_dockerfile import worker_wheels, write_worker_profile  # noqa: E402

CASES = {
    "test-build": {
        "heavy": ["heavy-core==1.0"],
        "light": ["light-app==1.0", "big-light"],
    },
    "real-wheels": {
        "heavy": ["numpy<2"],
        "light": ["Pillow==10.4.0", "requests==2.32.3", "PyYAML==6.0.2"],
    },
}


@contextlib.contextmanager
def mirror(lock: Lock, folder: Path) -> Iterator[str]:
    """The lock's wheels for python 3.11 on manylinux x86_64, served on loopback."""
    folder.mkdir(parents=True, exist_ok=True)
    pins = [f"{p.name}=={p.version}" for p in lock.packages]
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
         "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
         *[arg for p in platforms for arg in ("--platform", p)], "-d", str(folder), *pins],
        check=True,
    )  # fmt: skip
    root = folder.parent / f"{folder.name}-index"
    shutil.rmtree(root, ignore_errors=True)
    with serve_index(sorted(folder.glob("*.whl")), root) as url:
        yield url


def run_case(
    name: str, client: object, base: str, snapshot: str, index_url: str | None, work: Path
) -> dict[str, object]:
    project = work / name
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    case = CASES[name]
    profile_path = write_worker_profile(
        project, heavy=case["heavy"], light=case["light"], snapshot=snapshot
    )
    (project / "app_tasks.py").write_text("RESULT = 1\n")
    settings = IndexSettings(default_url=index_url)
    plan = plan_worker(
        load_profile(profile_path),
        profile_arg=profile_path.name,
        context=project,
        code=(project / "app_tasks.py",),
        settings=settings,
        on_progress=lambda m: print(f"  {m}", file=sys.stderr),
    )
    tag = f"gpubuild-bench/worker-{name}:latest"
    buildargs = {"BASE_IMAGE": base, "APP_USER": "root"}
    with contextlib.ExitStack() as stack:
        if index_url is None and plan.light is not None:
            index_url = stack.enter_context(mirror(plan.light.lock, work / f"{name}-wheels"))
        if index_url:
            buildargs["PIP_INDEX_URL"] = index_url
        started = time.perf_counter()
        result = build_image(
            plan,
            client=client,
            tag=tag,
            buildargs=buildargs,
            push_image=False,
            on_line=lambda line: None,
            render_budget=render_budget,
        )
        seconds = time.perf_counter() - started
    client.images.remove(tag, force=True)  # type: ignore[attr-defined]
    return {
        "light": case["light"],
        "light_packages": len(plan.light.packages) if plan.light else 0,
        "light_bytes": plan.light_bytes,
        "image_bytes": result.image_bytes,
        "estimated_image_bytes": result.estimated_image_bytes,
        "image_error": result.image_error,
        "new_layers_bytes": result.new_bytes,
        "estimated_new_layers_bytes": result.estimated_new_bytes,
        "new_layers_error": result.new_layers_error,
        "build_seconds": round(seconds, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", action="store_true", help="Also build with real wheels.")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "image.json")
    args = parser.parse_args()
    work = REPO / "bench" / "work" / "image"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="gpubuild-bench-") as tmp:
        scratch = Path(tmp)
        with services.dockerd(scratch / "dockerd") as client:
            base = services.local_base_image(client)
            interpreter, packages = snapshot_image(client, base)
            snapshot = render_snapshot(base, interpreter, packages)
            root = scratch / "index"
            with serve_index(worker_wheels(scratch / "dists"), root) as url:
                results["test-build"] = run_case("test-build", client, base, snapshot, url, work)
            if args.real:
                results["real-wheels"] = run_case("real-wheels", client, base, snapshot, None, work)
            engine = client.version()  # type: ignore[attr-defined]
            driver = client.info().get("Driver")  # type: ignore[attr-defined]
            base_bytes = client.images.get(base).attrs["Size"]  # type: ignore[attr-defined]
    document = {
        "benchmark": "worker image size vs estimate",
        "base_image": base,
        "base_image_bytes": base_bytes,
        "docker": engine.get("Version"),
        "storage": driver,
        "python": platform.python_version(),
        "cases": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    for name, case in results.items():
        print(
            f"{name}: image {case['image_bytes'] / 1e6:.2f} MB measured,"
            f" {case['estimated_image_bytes'] / 1e6:.2f} MB estimated"
            f" (error {case['image_error'] * 100:+.2f}%); new layers"
            f" {case['new_layers_bytes'] / 1e6:.3f} MB measured,"
            f" {case['estimated_new_layers_bytes'] / 1e6:.3f} MB estimated"
            f" (error {case['new_layers_error'] * 100:+.1f}%)"
        )
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
