"""`gpubuild dockerfile` and `gpubuild split`: the light set, its checks, the budget, the text.

Real uv against small wheels built here and served on loopback; no Docker engine needed (the
image itself is built in tests/test_image.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.budget import BaseSizes, estimate, render_budget
from builder.dockerfile import CodeCopy, DockerfileSpec, render_dockerfile
from builder.light import LightPackage, gpu_reason, split_findings
from builder.lock import read_lock
from tests.helpers import REPO, run_cli
from tests.support.index import serve_index
from tests.support.wheels import build_wheel

GOLDEN = REPO / "tests" / "golden"
SNAPSHOT = "# test base\npip==23.0.1\npackaging==23.0\n"


def worker_wheels(dest: Path) -> list[Path]:
    """The fixture set shared with tests/test_image.py."""
    blob = random.Random(5).randbytes(2_000_000)  # incompressible, so sizes mean something
    return [
        build_wheel(dest, "heavy-core", "1.0", requires=["shared-dep<2"]),
        build_wheel(dest, "shared-dep", "1.0"),
        build_wheel(dest, "shared-dep", "2.0"),
        build_wheel(dest, "small-util", "0.5"),
        build_wheel(dest, "needs-new-shared", "1.0", requires=["shared-dep>=2"]),
        build_wheel(dest, "packaging", "23.0"),
        build_wheel(dest, "packaging", "24.0"),
        build_wheel(
            dest,
            "light-app",
            "1.0",
            requires=["shared-dep>=1", "small-util", "packaging"],
            files={"light_app/__init__.py": b'VALUE = "light-app 1.0"\n'},
        ),
        build_wheel(
            dest,
            "big-light",
            "1.0",
            files={"big_light/__init__.py": b"", "big_light/blob.bin": blob},
        ),
        build_wheel(dest, "nvidia-cudnn-cu12", "8.9.2.26"),
        build_wheel(dest, "uses-gpu", "1.0", requires=["nvidia-cudnn-cu12"]),
        build_wheel(
            dest,
            "nvidia-fakelib-cu12",
            "1.0",
            files={
                "nvidia/__init__.py": b"",
                "nvidia/fakelib/__init__.py": b"",
                "nvidia/fakelib/lib/libfake.so.1": b"\x7fELF not really\n",
            },
        ),
    ]


def write_worker_profile(
    folder: Path,
    *,
    heavy: list[str],
    light: list[str],
    name: str = "worker",
    snapshot: str = SNAPSHOT,
    target_extra: str = "",
) -> Path:
    (folder / "bases").mkdir(parents=True, exist_ok=True)
    (folder / "bases" / "base.txt").write_text(snapshot)
    path = folder / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\n'
        "[target]\n"
        'base_image = "gpubuild-test/base:bookworm"\n'
        'base_packages = "bases/base.txt"\n'
        'python = "3.11"\n'
        'platform = "x86_64-manylinux_2_28"\n'
        'interpreter = "/usr/bin/python3"\n'
        'install_dir = "/shared-packages"\n'
        f"{target_extra}"
        "[heavy]\n"
        f"requirements = {json.dumps(heavy)}\n"
        "[light]\n"
        f"requirements = {json.dumps(light)}\n"
        "[policy]\n"
        "constraints = []\nexclude = []\nallow_shadow = []\n"
    )
    return path


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    wheels = worker_wheels(tmp_path_factory.mktemp("worker-dists"))
    root = tmp_path_factory.mktemp("worker-index")
    with serve_index(wheels, root) as url:
        yield url


def _env(tmp_path: Path) -> dict[str, str]:
    # A private store (no packed manifest unless a test packs one); uv's cache follows it.
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}


# --- pure rules ---------------------------------------------------------------------------------


def test_gpu_names_extras_and_cuda_builds() -> None:
    assert gpu_reason("nvidia-cudnn-cu12") == "a CUDA/GPU package"
    assert gpu_reason("Torch") == "a CUDA/GPU package"
    assert gpu_reason("onnxruntime_gpu") == "a CUDA/GPU package"
    assert gpu_reason("cupy-cuda12x") == "a CUDA/GPU package"
    assert "extra [cuda12]" in (gpu_reason("jax", None, ["cuda12"]) or "")
    assert "a CUDA build" in (gpu_reason("jaxlib", "0.4.30+cuda12.cudnn89") or "")
    assert gpu_reason("onnxruntime") is None
    assert gpu_reason("scikit-learn", "1.3.2") is None
    assert gpu_reason("jax", None, ["cpu"]) is None


def test_findings_name_size_and_requester() -> None:
    packages = [
        LightPackage("pillow", "10.0", 5_000_000, ("pillow",)),
        LightPackage("scipy", "1.11", 120_000_000, ("scikit-learn",)),
        LightPackage("nvidia-cublas-cu12", "12.1", 500_000_000, ("easyocr",)),
    ]
    findings = split_findings(packages, 100_000_000)
    assert [f.name for f in findings] == ["nvidia-cublas-cu12", "scipy"]
    assert findings[0].reasons[0] == "a CUDA/GPU package"
    assert "120.0 MB installed, above the 100.0 MB light limit" in findings[1].reasons[0]
    assert findings[1].requested_by == ("scikit-learn",)


def test_budget_verdicts() -> None:
    known = BaseSizes(2 * 10**9, "profile", 6 * 10**9, "profile")
    fits = estimate(
        known, context_bytes=10**6, context_source="m", light_bytes=10**8, code_bytes=10**5,
        push=True,
    )  # fmt: skip
    assert fits.verdict == "fits" and fits.known_bytes == 8_201_200_000
    assert [i.label for i in fits.items][-1] == "image export for push"
    over = estimate(
        known, context_bytes=0, context_source="m", light_bytes=3 * 10**9, code_bytes=0,
        push=True,
    )  # fmt: skip
    assert over.verdict == "over" and "OVER BUDGET by 4.00 GB" in render_budget(over)
    unknown = BaseSizes(None, "unknown: record it", 6 * 10**9, "engine")
    partial = estimate(
        unknown, context_bytes=0, context_source="m", light_bytes=0, code_bytes=0, push=False
    )
    text = render_budget(partial)
    assert partial.verdict == "incomplete" and "base image download (compressed)" in text
    assert "unknown" in text and "image export" not in text


def test_render_with_certs_light_and_libraries() -> None:
    spec = DockerfileSpec(
        profile_name="worker",
        command="gpubuild dockerfile worker.toml --code tasks.py",
        profile_sha256="ab" * 32,
        heavy_digest="cd" * 32,
        light_digest="ef" * 32,
        base_image="rayproject/ray:2.52.0-py310-cu121",
        interpreter="/home/ray/anaconda3/bin/python",
        install_dir="/shared-packages",
        light_lock="worker.light.lock",
        light_count=3,
        code=(CodeCopy("src/pkg", "/app/pkg", True), CodeCopy("tasks.py", "/app/tasks.py", False)),
        certs=("certs/proxy-hub-ca-1.crt",),
        python_path="/shared-packages:/app",
        ld_library_path="/shared-packages/nvidia/cudnn/lib",
    )
    text = render_dockerfile(spec)
    assert text == render_dockerfile(spec)
    order = [
        "ARG BASE_IMAGE=rayproject/ray:2.52.0-py310-cu121",
        "FROM ${BASE_IMAGE}",
        "ARG APP_USER=ray",
        "USER root",
        "COPY certs/proxy-hub-ca-1.crt /usr/local/share/ca-certificates/gpubuild/",
        "RUN update-ca-certificates",
        "USER ${APP_USER}",
        "WORKDIR /app",
        "COPY worker.light.lock /opt/gpubuild/light.lock",
        "PIP_CERT=/etc/ssl/certs/ca-certificates.crt /home/ray/anaconda3/bin/python -m pip",
        "--no-deps --require-hashes --no-cache-dir --no-compile",
        "COPY src/pkg/ /app/pkg/",
        "COPY tasks.py /app/tasks.py",
        'PYTHONPATH="/shared-packages:/app"',
        'LD_LIBRARY_PATH="/shared-packages/nvidia/cudnn/lib${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"',
        'OMP_NUM_THREADS="1"',
    ]
    positions = [text.index(piece) for piece in order]
    assert positions == sorted(positions)
    assert "# Regenerate with: gpubuild dockerfile worker.toml --code tasks.py" in text


# --- the real profile: golden file --------------------------------------------------------------


@pytest.mark.network  # a fresh clone has no lock: the heavy set is resolved first
def test_onnx_gpu_dockerfile_matches_golden(tmp_path: Path) -> None:
    """Run where a user would (the repo root as build context), on a copy of profiles/.

    The digests in the header change with the profile's comments and with the index (the
    lock is not committed), so the golden file holds placeholders and they are checked here.
    """
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    (tmp_path / "your_tasks.py").write_text("import onnxruntime\n")
    result = run_cli(
        "dockerfile", "profiles/onnx-gpu.toml", "--code", "your_tasks.py", "-o", "Dockerfile",
        cwd=tmp_path, env=_env(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "Dockerfile").read_text()
    profile_sha = hashlib.sha256((tmp_path / "profiles" / "onnx-gpu.toml").read_bytes()).hexdigest()
    digest = read_lock(tmp_path / "profiles" / "onnx-gpu.lock").digest()
    assert f"# Profile sha256: {profile_sha}\n" in text and f" lock {digest}\n" in text
    normalised = (
        text.replace(profile_sha, "<profile sha256>")
        .replace(digest, "<heavy lock digest>")
        .replace(digest[:16], "<heavy lock digest>")
    )
    golden = GOLDEN / "onnx-gpu.Dockerfile"
    if os.environ.get("GPUBUILD_UPDATE_GOLDEN"):
        golden.write_text(normalised)
    assert normalised == golden.read_text(), "regenerate with GPUBUILD_UPDATE_GOLDEN=1 if intended"
    assert "verdict: incomplete" in result.stderr and "no [light] set" in result.stderr
    # Same inputs, same bytes; and no pip step for a profile without [light].
    again = run_cli(
        "dockerfile", "profiles/onnx-gpu.toml", "--code", "your_tasks.py",
        cwd=tmp_path, env=_env(tmp_path),
    )  # fmt: skip
    assert again.returncode == 0 and again.stdout == text
    assert "pip install" not in text


# --- the light set ------------------------------------------------------------------------------


def test_light_lock_is_resolved_on_top_of_the_heavy_lock(tmp_path: Path, index: str) -> None:
    profile = write_worker_profile(tmp_path, heavy=["heavy-core==1.0"], light=["light-app==1.0"])
    (tmp_path / "tasks.py").write_text("import light_app\n")
    result = run_cli(
        "dockerfile", str(profile), "--code", "tasks.py", "--index-url", index, "--json",
        cwd=tmp_path, env=_env(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = result.json()
    # Unconstrained, light-app would take shared-dep 2.0; the heavy lock holds it at 1.0 and
    # ships it, so the light lock leaves it out instead of repeating it.
    assert {p["name"] for p in document["light"]} == {"light-app", "small-util"}
    assert document["provided_by_heavy"] == [{"name": "shared-dep", "version": "1.0"}]
    assert document["provided_by_base"] == [{"name": "packaging", "version": "23.0"}]
    light_lock = tmp_path / "worker.light.lock"
    assert document["light_lock"] == str(light_lock)
    lock = read_lock(light_lock)
    assert all(p.hashes for p in lock.packages)
    assert {p.name for p in lock.packages} == {"light-app", "small-util"}
    header = light_lock.read_text()
    assert "# Provided by the heavy set (not shipped): shared-dep==1.0" in header
    assert "# Provided by the base image (not shipped): packaging==23.0" in header
    assert "--target" not in header
    text = document["dockerfile_text"]
    assert "COPY worker.light.lock /opt/gpubuild/light.lock" in text
    assert "/usr/bin/python3 -m pip install" in text and "COPY tasks.py /app/tasks.py" in text
    assert f"Light set (installed here): 2 package(s), lock {lock.digest()}" in text
    assert all(p["bytes"] > 0 for p in document["light"])
    assert document["budget"]["verdict"] == "incomplete"  # the base sizes are unknown here


def test_light_requirement_clashing_with_a_heavy_pin_is_explained(
    tmp_path: Path, index: str
) -> None:
    profile = write_worker_profile(tmp_path, heavy=["heavy-core==1.0"], light=["needs-new-shared"])
    result = run_cli(
        "dockerfile", str(profile), "--index-url", index, env=_env(tmp_path), cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr
    assert "cannot resolve the light set of profile 'worker'" in result.stderr
    assert "shared-dep==1.0 is shipped by the heavy set" in result.stderr


def test_gpu_package_under_light_is_refused(tmp_path: Path, index: str) -> None:
    profile = write_worker_profile(
        tmp_path, heavy=["heavy-core==1.0"], light=["nvidia-cudnn-cu12==8.9.2.26"]
    )
    result = run_cli(
        "dockerfile", str(profile), "--index-url", index, env=_env(tmp_path), cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr
    assert "nvidia-cudnn-cu12" in result.stderr and "a CUDA/GPU package" in result.stderr
    assert "to [heavy] requirements" in result.stderr
    assert not (tmp_path / "worker.light.lock").exists()  # refused before resolving


def test_gpu_package_pulled_in_by_a_light_requirement_is_refused(
    tmp_path: Path, index: str
) -> None:
    profile = write_worker_profile(tmp_path, heavy=["heavy-core==1.0"], light=["uses-gpu"])
    out = tmp_path / "Dockerfile"
    result = run_cli(
        "dockerfile", str(profile), "--index-url", index, "-o", str(out),
        env=_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "nvidia-cudnn-cu12==8.9.2.26: a CUDA/GPU package (pulled in by [light] uses-gpu)" in (
        result.stderr
    )
    assert not out.exists()


def test_large_light_package_is_refused(tmp_path: Path, index: str) -> None:
    profile = write_worker_profile(
        tmp_path, heavy=["heavy-core==1.0"], light=["light-app", "big-light"]
    )
    result = run_cli(
        "dockerfile", str(profile), "--index-url", index, "--max-light-mb", "1",
        env=_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "big-light==1.0: 2.0 MB installed, above the 1.0 MB light limit" in result.stderr
    assert "light-app" not in result.stderr.split("belong under [heavy]")[1].split("Move")[0]


def test_over_budget_fails_with_the_breakdown(tmp_path: Path, index: str) -> None:
    profile = write_worker_profile(
        tmp_path,
        heavy=["heavy-core==1.0"],
        light=["light-app", "big-light"],
        target_extra="base_image_download_bytes = 300000\nbase_image_bytes = 600000\n",
    )
    out = tmp_path / "Dockerfile"
    result = run_cli(
        "dockerfile", str(profile), "--index-url", index, "--budget-gb", "0.001",
        "-o", str(out), env=_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    for row in (
        "base image download (compressed)",
        "base image extracted",
        "build context",
        "light layer",
        "copied files",
        "image export for push",
        "total",
        "budget",
    ):
        assert row in result.stderr
    assert "profile [target] base_image_bytes" in result.stderr
    assert "OVER BUDGET" in result.stderr and "1.0 MB" in result.stderr
    assert not out.exists()
    # The same build with the default 10 GB fits, and the verdict is complete.
    fits = run_cli(
        "dockerfile", str(profile), "--index-url", index, "--json", env=_env(tmp_path), cwd=tmp_path
    )
    assert fits.returncode == 0, fits.stderr
    budget = fits.json()["budget"]
    assert budget["verdict"] == "fits" and budget["unknown"] == []
    light = next(i for i in budget["items"] if i["label"] == "light layer")
    assert 2_000_000 < light["bytes"] < 2_100_000


def test_ld_library_path_comes_from_the_packed_manifest(tmp_path: Path, index: str) -> None:
    profile = write_worker_profile(
        tmp_path, heavy=["heavy-core==1.0", "nvidia-fakelib-cu12==1.0"], light=["light-app"]
    )
    env = _env(tmp_path)
    before = run_cli("dockerfile", str(profile), "--index-url", index, env=env, cwd=tmp_path)
    assert before.returncode == 0, before.stderr
    assert "LD_LIBRARY_PATH" not in before.stdout.split("ENV ")[1]
    assert "is not packed in this machine's store" in before.stdout
    packed = run_cli("pack", str(profile), "--index-url", index, env=env)
    assert packed.returncode == 0, packed.stderr
    after = run_cli("dockerfile", str(profile), "--index-url", index, env=env, cwd=tmp_path)
    assert after.returncode == 0, after.stderr
    assert (
        'LD_LIBRARY_PATH="/shared-packages/nvidia/fakelib/lib${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"'
        in after.stdout
    )


def test_code_outside_the_context_is_bad_input(tmp_path: Path, index: str) -> None:
    project = tmp_path / "project"
    project.mkdir()
    profile = write_worker_profile(project, heavy=["heavy-core==1.0"], light=[])
    (tmp_path / "elsewhere.py").write_text("")
    result = run_cli(
        "dockerfile", str(profile), "--index-url", index, "--context", str(project),
        "--code", str(tmp_path / "elsewhere.py"), env=_env(tmp_path),
    )  # fmt: skip
    assert result.returncode == 2
    assert "outside the build context" in result.stderr and "Traceback" not in result.stderr


# --- gpubuild split -----------------------------------------------------------------------------


def test_split_proposes_heavy_and_light(tmp_path: Path, index: str) -> None:
    profile = write_worker_profile(tmp_path, heavy=["heavy-core==1.0"], light=[])
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(
        "# the team's file\nlight-app==1.0\nuses-gpu  # pulls cuDNN\nbig-light\n"
        "nvidia-cudnn-cu12==8.9.2.26\nsmall-util\n"
    )
    result = run_cli(
        "split", str(requirements), "--profile", str(profile), "--index-url", index,
        "--max-light-mb", "1", "--json", env=_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = result.json()
    heavy = {line["requirement"]: line["reasons"] for line in document["heavy"]}
    assert set(heavy) == {"uses-gpu", "big-light", "nvidia-cudnn-cu12==8.9.2.26"}
    assert heavy["uses-gpu"] == ["pulls in nvidia-cudnn-cu12==8.9.2.26: a CUDA/GPU package"]
    assert "above the 1.0 MB light limit" in heavy["big-light"][0]
    assert document["light"] == ["light-app==1.0", "small-util"]
    assert '[heavy]\nrequirements = [\n    "uses-gpu",' in document["toml"]
    text = run_cli(
        "split", str(requirements), "--profile", str(profile), "--index-url", index,
        env=_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert text.returncode == 0, text.stderr
    # The default limit (100 MB) keeps big-light light; the GPU lines stay heavy.
    assert '"big-light",' in text.stdout.split("[light]")[1]
    assert '"uses-gpu",' in text.stdout.split("[light]")[0]


def test_split_refuses_pip_options(tmp_path: Path) -> None:
    profile = write_worker_profile(tmp_path, heavy=["heavy-core==1.0"], light=[])
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("--index-url http://127.0.0.1:9/simple\nlight-app\n")
    result = run_cli("split", str(requirements), "--profile", str(profile))
    assert result.returncode == 2
    assert "requirements.txt:1: pip option '--index-url'" in result.stderr


def test_a_context_without_dockerignore_is_explained_and_one_is_proposed(
    tmp_path: Path, index: str
) -> None:
    """A fresh clone's .venv is most of what docker would send: say so, and write the
    .dockerignore that sends only what the Dockerfile copies when asked."""
    profile = write_worker_profile(tmp_path, heavy=["heavy-core==1.0"], light=["light-app==1.0"])
    (tmp_path / "tasks.py").write_text("import light_app\n")
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "big.so").write_bytes(b"\0" * 3_000_000)
    args = ["dockerfile", str(profile), "--code", "tasks.py", "--index-url", index, "--json"]
    proposed = run_cli(*args, cwd=tmp_path, env=_env(tmp_path))
    assert proposed.returncode == 0, proposed.stderr
    assert "no .dockerignore" in proposed.stderr and "mostly .venv 3.0 MB" in proposed.stderr
    assert "!tasks.py" in proposed.stderr and "!worker.light.lock" in proposed.stderr
    assert proposed.json()["context_bytes"] > 3_000_000
    assert not (tmp_path / ".dockerignore").exists()

    written = run_cli(*args, "--dockerignore", cwd=tmp_path, env=_env(tmp_path))
    assert written.returncode == 0, written.stderr
    ignore = (tmp_path / ".dockerignore").read_text()
    assert ignore.splitlines()[2:] == ["*", "!tasks.py", "!worker.light.lock"]
    document = written.json()
    assert (tmp_path / document["dockerignore"]).resolve() == (tmp_path / ".dockerignore").resolve()
    sent = (tmp_path / "tasks.py").stat().st_size + (tmp_path / "worker.light.lock").stat().st_size
    # docker always sends the .dockerignore itself, so the daemon can apply it.
    assert document["context_bytes"] == sent + len(ignore.encode())
    # An existing .dockerignore is the user's: never overwritten.
    (tmp_path / ".dockerignore").write_text(".venv\n")
    kept = run_cli(*args, "--dockerignore", cwd=tmp_path, env=_env(tmp_path))
    assert kept.returncode == 0 and (tmp_path / ".dockerignore").read_text() == ".venv\n"
