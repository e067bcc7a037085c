"""`gpubuild check` on the deployment guide's own files: clean, then one mistake at a time.

The fixture repo (tests/fixtures/deploy-repo, see its README) must give no finding. Each case
copies it, makes one edit, and expects exactly the listed findings: file, line and code. Lines
are found by searching the edited file for the line the mistake is on, never written down.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import pytest

from builder.check import check
from builder.checks.model import Finding, ray_image_versions
from builder.checks.shell import shell_commands
from builder.errors import BadInputError
from tests.helpers import run_cli

FIXTURES = Path(__file__).parent / "fixtures"
REPO = FIXTURES / "deploy-repo"
SAMPLES = Path(__file__).parent / "data" / "kuberay-samples"  # shared with test_k8s.py

RAY_SERVICE = "draft-deployment/dev/ray-service.yaml"
HELM_RELEASE = "draft-deployment/dev/your-api-service.yaml"
GPU_DOCKERFILE = "your-gpu-service/Dockerfile"
API_DOCKERFILE = "your-api-service/Dockerfile"
REQUIREMENTS = "your-api-service/requirements.txt"
PROFILE = "your-gpu-service/gpubuild/torch-cu121.toml"
LOCK = "your-gpu-service/gpubuild/torch-cu121.lock"
MANIFEST = next(REPO.glob("store/torch-cu121/*/manifest.json")).relative_to(REPO).as_posix()

# The folders builder.tree.library_dirs finds in the torch-cu121 set: the manifest's
# LD_LIBRARY_PATH, and the clean RayService's.
LIBRARY_DIRS = (
    *(f"nvidia/{n}/lib" for n in ("cublas", "cuda_cupti", "cuda_nvrtc", "cuda_runtime", "cudnn")),
    *(f"nvidia/{n}/lib" for n in ("cufft", "curand", "cusolver", "cusparse", "nccl")),
    *(f"nvidia/{n}/lib" for n in ("nvjitlink", "nvtx")),
    "onnxruntime/capi",
    "torch/lib",
)
INIT_TAG = re.compile(r"(gpubuild-init:torch-cu121-)[0-9a-f]{12}")
STALE = (
    "the fixture's gpubuild lock or manifest is not what today's builder.lock and "
    "builder.manifest write: `.venv/bin/python -m tests.test_check` rewrites them"
)


def render_gpubuild_files(repo: Path) -> tuple[str, bytes, str]:
    """(lock text, manifest bytes, digest) of the fixture, as gpubuild writes them today.

    The packages are the fixture lock's own (a real resolution of profiles/torch-cu121.toml,
    without its `# index:` annotations), the target the fixture profile's. The manifest's
    shard digests are made up: nothing is ever fetched from this store.
    """
    import hashlib

    from builder.lock import Lock, Pinned, parse_compiled, render_lock
    from builder.manifest import Manifest, PackageEntry, Shard, manifest_to_bytes
    from builder.profile import load_profile

    profile = load_profile(repo / PROFILE)
    target = profile.target
    text = (repo / LOCK).read_text()
    header: dict[str, Any] = next(
        (json.loads(line.split(": ", 1)[1]) for line in text.splitlines()
         if line.startswith("# gpubuild: ")),
        {},
    )  # fmt: skip
    packages = tuple(replace(p, index_url=None) for p in parse_compiled(text))
    values = {
        "profile": profile.name, "python": target.python, "platform": target.platform,
        "interpreter": target.interpreter, "install_dir": target.install_dir,
        "inputs": header.get("inputs", ""), "backend": header.get("backend", "fixture"),
        "packages": packages,
        "provided_by_base": tuple(Pinned(**p) for p in header.get("provided_by_base", ())),
    }  # fmt: skip
    lock = Lock(**{k: v for k, v in values.items() if k in {f.name for f in fields(Lock)}})
    digest = lock.digest()

    def fake(*parts: str) -> str:
        return hashlib.sha256("/".join(parts).encode()).hexdigest()

    big = [p for p in packages if p.name.startswith(("nvidia-", "torch", "onnxruntime", "triton"))]
    small = [p for p in packages if p not in big]
    shards = [
        Shard(fake("zst", p.name), 1000 + i, fake("tar", p.name), 5000 + i, 10 + i, (p.name,))
        for i, p in enumerate(big)
    ]
    shards.append(
        Shard(
            fake("zst", "small"), 999, fake("tar", "small"), 4999, 99, tuple(p.name for p in small)
        )
    )
    root = target.install_dir
    manifest = Manifest(
        digest=digest,
        profile=profile.name,
        python=target.python,
        platform=target.platform,
        install_dir=root,
        shards=tuple(sorted(shards, key=lambda shard: shard.sha256)),
        env={
            "PYTHONPATH": root,
            "LD_LIBRARY_PATH": ":".join(f"{root}/{d}" for d in LIBRARY_DIRS),
        },
        packages=tuple(PackageEntry(p.name, p.version, 1234) for p in packages),
    )
    return render_lock(lock, root), manifest_to_bytes(manifest), digest


def write_gpubuild_files(repo: Path) -> None:
    """Rewrite the fixture's lock, its published manifest and the init image tag naming it."""
    lock_text, manifest, digest = render_gpubuild_files(repo)
    (repo / LOCK).write_text(lock_text)
    published = repo / "store" / "torch-cu121"
    shutil.rmtree(published, ignore_errors=True)
    (published / digest).mkdir(parents=True)
    (published / digest / "manifest.json").write_bytes(manifest)
    service = repo / RAY_SERVICE
    service.write_text(INIT_TAG.sub(rf"\g<1>{digest[:12]}", service.read_text()))


# The deployment guide's GPU initContainer (Pattern 1, Step 5), verbatim but for the PyTorch
# index URL: no package index host is written into this repository.
GUIDE_INIT = """\
              - name: install-heavy-deps
                image: rayproject/ray:2.52.0-py310-cu121
                command: ["/bin/bash", "-c"]
                args:
                  - |
                    set -e
                    # Install your heavy ML dependencies
                    pip install --target=/shared-packages --no-cache-dir \\
                      torch torchvision --index-url "$TORCH_INDEX_URL"
                    pip install --target=/shared-packages --no-cache-dir \\
                      onnxruntime-gpu nvidia-cudnn-cu12 "numpy<2"
                    # Add more packages as needed...

                    # Fix numpy (OpenCV/other packages may install numpy 2.x)
                    pip install --target=/shared-packages --no-cache-dir --upgrade "numpy<2"

                    # Remove packages that conflict with Ray
                    rm -rf /shared-packages/protobuf* /shared-packages/google/protobuf* 2>/dev/null || true
                    rm -rf /shared-packages/click* 2>/dev/null || true
                volumeMounts:
                  - mountPath: /shared-packages
                    name: python-packages
"""


def _gpubuild_init(text: str) -> tuple[int, int]:
    start = text.index("              # gpubuild: unpacks")
    return start, text.index("              - name: fetch-models")


def _with_guide_init(text: str) -> str:
    start, end = _gpubuild_init(text)
    return text[:start] + GUIDE_INIT + text[end:]


@dataclass(frozen=True)
class Expect:
    file: str
    marker: str  # text on the line the finding must point at
    code: str
    after: str | None = None  # the marker's first line after this one (when not unique)


@dataclass(frozen=True)
class Mistake:
    id: str
    file: str
    old: str
    new: str
    expect: tuple[Expect, ...]


LD_VALUE = 'value: "/shared-packages/nvidia/cublas/lib'
LD_ITEM = """\
                  - name: LD_LIBRARY_PATH
                    value: "/shared-packages/nvidia/cublas/lib:"""
NVIDIA_TOLERATION = """\
              - key: "nvidia.com/gpu"
                operator: "Exists"
                effect: "NoSchedule"
"""
# The CPU worker's image line, told apart from the head's (same image) by what follows it.
CPU_WORKER_IMAGE = (
    "                image: rayproject/ray:2.52.0-py310\n"
    "                resources:\n"
    '                  limits: { cpu: "4"'
)
FAKE_HASH = "    --hash=sha256:" + "0" * 64

MISTAKES = [
    Mistake(
        "head-image-ray-version",
        RAY_SERVICE,
        "- name: ray-head\n              image: rayproject/ray:2.52.0-py310",
        "- name: ray-head\n              image: rayproject/ray:2.51.0-py310",
        (Expect(RAY_SERVICE, "image: rayproject/ray:2.51.0-py310", "GB101"),),
    ),
    Mistake(
        "cpu-worker-ray-version",
        RAY_SERVICE,
        CPU_WORKER_IMAGE,
        CPU_WORKER_IMAGE.replace("2.52.0", "2.51.0"),
        (Expect(RAY_SERVICE, "image: rayproject/ray:2.51.0-py310", "GB101"),),
    ),
    Mistake(
        "gpu-dockerfile-from",
        GPU_DOCKERFILE,
        "FROM rayproject/ray:2.52.0-py310-cu121",
        "FROM rayproject/ray:2.51.0-py310-cu121",
        (Expect(GPU_DOCKERFILE, "FROM rayproject/ray:2.51.0", "GB101"),),
    ),
    Mistake(
        "init-container-image",
        RAY_SERVICE,
        "                image: rayproject/ray:2.52.0-py310-cu121",
        "                image: rayproject/ray:2.51.0-py310-cu121",
        (Expect(RAY_SERVICE, "image: rayproject/ray:2.51.0-py310-cu121", "GB101"),),
    ),
    Mistake(
        "ray-client-pin",
        REQUIREMENTS,
        "ray[client]==2.52.0",
        "ray[client]==2.51.0",
        (Expect(REQUIREMENTS, "ray[client]==2.51.0", "GB101"),),
    ),
    Mistake(
        "profile-base-image",
        PROFILE,
        'base_image = "rayproject/ray:2.52.0-py310-cu121"',
        'base_image = "rayproject/ray:2.51.0-py310-cu121"',
        (Expect(PROFILE, "base_image =", "GB101"),),
    ),
    Mistake(
        "ray-version-field",
        RAY_SERVICE,
        'rayVersion: "2.52.0"',
        'rayVersion: "2.51.0"',
        (Expect(RAY_SERVICE, "rayVersion:", "GB101"),),
    ),
    Mistake(
        "cpu-worker-python",
        RAY_SERVICE,
        CPU_WORKER_IMAGE,
        CPU_WORKER_IMAGE.replace("py310", "py311"),
        (Expect(RAY_SERVICE, "image: rayproject/ray:2.52.0-py311", "GB104"),),
    ),
    Mistake(
        "api-service-python",
        API_DOCKERFILE,
        "FROM python:3.10-slim",
        "FROM python:3.11-slim",
        (Expect(API_DOCKERFILE, "FROM python:3.11-slim", "GB104"),),
    ),
    Mistake(
        "head-image-unversioned",
        RAY_SERVICE,
        "- name: ray-head\n              image: rayproject/ray:2.52.0-py310",
        "- name: ray-head\n              image: rayproject/ray:latest",
        (Expect(RAY_SERVICE, "image: rayproject/ray:latest", "GB102"),),
    ),
    Mistake(
        "ray-client-unpinned",
        REQUIREMENTS,
        "ray[client]==2.52.0",
        "ray[client]>=2.52",
        (Expect(REQUIREMENTS, "ray[client]>=2.52", "GB103"),),
    ),
    Mistake(
        "ld-library-path-without-cudnn",
        RAY_SERVICE,
        "/shared-packages/nvidia/cudnn/lib:",
        "",
        (Expect(RAY_SERVICE, LD_VALUE, "GB201"),),
    ),
    Mistake(
        "ld-library-path-unset",
        RAY_SERVICE,
        LD_ITEM,
        "                  - name: UNRELATED\n                    value: ",
        (Expect(RAY_SERVICE, "env:", "GB201", after="your-gpu-service:dev"),),
    ),
    Mistake(
        "pythonpath-without-shared",
        RAY_SERVICE,
        'value: "/shared-packages:/app"',
        'value: "/app"',
        (Expect(RAY_SERVICE, 'value: "/app"', "GB202"),),
    ),
    Mistake(
        "pythonpath-app-first",
        RAY_SERVICE,
        'value: "/shared-packages:/app"',
        'value: "/app:/shared-packages"',
        (Expect(RAY_SERVICE, 'value: "/app:/shared-packages"', "GB203"),),
    ),
    Mistake(
        "flux-marker-tag",
        HELM_RELEASE,
        'tag: latest # {"$imagepolicy": "flux-system:your-api-service-image-policy:tag"}',
        "tag: latest",
        (Expect(HELM_RELEASE, "tag: latest", "GB301"),),
    ),
    Mistake(
        "flux-marker-repository",
        HELM_RELEASE,
        ' # {"$imagepolicy": "flux-system:your-api-service-image-policy:name"}',
        "",
        (Expect(HELM_RELEASE, "repository: cybersmartstg", "GB301"),),
    ),
    Mistake(
        "flux-marker-wrong-field",
        HELM_RELEASE,
        'tag: latest # {"$imagepolicy": "flux-system:your-api-service-image-policy:tag"}',
        'tag: latest # {"$imagepolicy": "flux-system:your-api-service-image-policy:name"}',
        (Expect(HELM_RELEASE, "tag: latest", "GB302"),),
    ),
    Mistake(
        "unquoted-requirement-in-dockerfile",
        GPU_DOCKERFILE,
        '"numpy>=1.24.0"',
        "numpy>=1.24.0",
        (Expect(GPU_DOCKERFILE, "    numpy>=1.24.0 \\", "GB404"),),
    ),
    Mistake(
        "lock-ships-protobuf-5",
        LOCK,
        "pillow==12.3.0 \\\n",
        f"protobuf==5.27.2 \\\n{FAKE_HASH}\npillow==12.3.0 \\\n",
        (Expect(LOCK, "protobuf==5.27.2", "GB501"),),
    ),
    Mistake(
        "lock-ships-click",
        LOCK,
        "pillow==12.3.0 \\\n",
        f"click==8.1.7 \\\n{FAKE_HASH}\npillow==12.3.0 \\\n",
        (Expect(LOCK, "click==8.1.7", "GB502"),),
    ),
    Mistake(
        "manifest-ships-numpy-2",
        MANIFEST,
        '"name": "mpmath",\n   "version": "1.3.0"',
        '"name": "numpy",\n   "version": "2.0.1"',
        (Expect(MANIFEST, '"name": "numpy"', "GB503"),),
    ),
    Mistake(
        "lock-shadows-base-package",
        LOCK,
        "coloredlogs==15.0.1 \\",
        "grpcio==1.66.0 \\",
        (Expect(LOCK, "grpcio==1.66.0", "GB504"),),
    ),
    Mistake(
        "gpu-group-without-limit",
        RAY_SERVICE,
        'limits: { cpu: "6", memory: "12Gi", nvidia.com/gpu: 1 }',
        'limits: { cpu: "6", memory: "12Gi" }',
        (Expect(RAY_SERVICE, 'limits: { cpu: "6", memory: "12Gi" }', "GB601"),),
    ),
    Mistake(
        "gpu-request-in-cpu-group",
        RAY_SERVICE,
        'requests: { cpu: "2", memory: "4Gi" }',
        'requests: { cpu: "2", memory: "4Gi", nvidia.com/gpu: 1 }',
        (
            Expect(RAY_SERVICE, 'limits: { cpu: "4", memory: "8Gi" }', "GB601"),
            Expect(RAY_SERVICE, "groupName: cpu-worker-group", "GB602"),
        ),
    ),
    Mistake(
        "gpu-group-without-toleration",
        RAY_SERVICE,
        NVIDIA_TOLERATION,
        "",
        (Expect(RAY_SERVICE, "tolerations:", "GB602"),),
    ),
    Mistake(
        "helm-release-not-yaml",
        HELM_RELEASE,
        "      tag: latest # {",
        "      tag: latest: oops # {",
        (Expect(HELM_RELEASE, "tag: latest: oops", "GB001"),),
    ),
    Mistake(
        "profile-not-toml",
        PROFILE,
        'name = "torch-cu121"',
        'name = "torch-cu121',
        (Expect(PROFILE, 'name = "torch-cu121', "GB001"),),
    ),
]


def _copy_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo)
    return repo


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not one unique place in {path}"
    path.write_text(text.replace(old, new))


def _line_of(path: Path, marker: str, after: str | None = None) -> int:
    lines = path.read_text().splitlines()
    start = 0
    if after is not None:
        start = next(i for i, line in enumerate(lines) if after in line) + 1
    hits = [i + 1 for i, line in enumerate(lines) if i >= start and marker in line]
    assert hits, f"{marker!r} not in {path}"
    if after is None:
        assert len(hits) == 1, f"{marker!r} is on lines {hits} of {path}"
    return hits[0]


def _found(repo: Path, result: object) -> set[tuple[str, int, str]]:
    return {
        (Path(f.path).relative_to(repo).as_posix(), f.line, f.code)
        for f in result.findings  # type: ignore[attr-defined]
    }


def _expected(repo: Path, expects: tuple[Expect, ...]) -> set[tuple[str, int, str]]:
    return {(e.file, _line_of(repo / e.file, e.marker, e.after), e.code) for e in expects}


def test_fixture_gpubuild_files_are_what_gpubuild_writes_today() -> None:
    lock_text, manifest, digest = render_gpubuild_files(REPO)
    assert (REPO / LOCK).read_text() == lock_text, STALE
    assert (REPO / "store" / "torch-cu121" / digest / "manifest.json").read_bytes() == manifest, (
        STALE
    )
    assert f"gpubuild-init:torch-cu121-{digest[:12]}" in (REPO / RAY_SERVICE).read_text(), STALE
    assert (
        ":".join(f"/shared-packages/{d}" for d in LIBRARY_DIRS) in (REPO / RAY_SERVICE).read_text()
    )


def test_fixture_repo_is_clean() -> None:
    result = check([REPO])
    assert result.findings == (), "\n".join(f.text() for f in result.findings)
    assert result.exit_code == 0
    kinds = sorted(kind for _, kind in result.files)
    assert kinds == [
        "dockerfile", "dockerfile", "kubernetes", "kubernetes", "lock", "manifest",
        "pipeline", "pipeline", "profile", "requirements",
    ]  # fmt: skip


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.id for m in MISTAKES])
def test_one_mistake_is_found_where_it_is(tmp_path: Path, mistake: Mistake) -> None:
    repo = _copy_repo(tmp_path)
    _edit(repo / mistake.file, mistake.old, mistake.new)
    result = check([repo])
    assert _found(repo, result) == _expected(repo, mistake.expect), "\n".join(
        f.text() for f in result.findings
    )
    for finding in result.findings:
        assert finding.fix and "\n" not in finding.fix and "\n" not in finding.message
    errors = any(f.severity == "error" for f in result.findings)
    assert result.exit_code == (1 if errors else 0)


def test_guide_init_container_with_a_published_cache(tmp_path: Path) -> None:
    """The guide's pip initContainer, back in place of gpubuild's: GB401, GB403, GB402 twice."""
    repo = _copy_repo(tmp_path)
    service = repo / RAY_SERVICE
    service.write_text(_with_guide_init(service.read_text()))
    result = check([repo])
    assert _found(repo, result) == _expected(
        repo,
        (
            Expect(RAY_SERVICE, "pip install --target", "GB401", after="heavy ML dependencies"),
            Expect(RAY_SERVICE, '--upgrade "numpy<2"', "GB403"),
            Expect(RAY_SERVICE, "rm -rf /shared-packages/protobuf*", "GB402"),
            Expect(RAY_SERVICE, "rm -rf /shared-packages/click*", "GB402"),
        ),
    )
    gb401 = next(f for f in result.findings if f.code == "GB401")
    assert "torch-cu121" in gb401.message and "gpubuild init-script" in gb401.fix
    assert result.exit_code == 0  # the guide's setup works; it is slow and patched by hand


def test_published_cache_found_through_store_option(tmp_path: Path) -> None:
    """Only the deployment folder checked; the profile and store named by options."""
    repo = _copy_repo(tmp_path)
    service = repo / RAY_SERVICE
    service.write_text(_with_guide_init(service.read_text()))
    bare = check([repo / "draft-deployment"])
    assert "GB401" not in {f.code for f in bare.findings}
    result = check(
        [repo / "draft-deployment"], profiles=[repo / PROFILE], store=f"file://{repo / 'store'}"
    )
    assert "GB401" in {f.code for f in result.findings}
    assert any(kind == "manifest" for _, kind in result.files)


def test_init_image_finds_its_manifest_in_the_store(tmp_path: Path) -> None:
    """gpubuild-init:PROFILE-DIGEST12 names its manifest; --store supplies it, and only the
    folders it lists are asked for (here nccl's, which the pod env lost)."""
    repo = _copy_repo(tmp_path)
    _edit(repo / RAY_SERVICE, "/shared-packages/nvidia/nccl/lib:", "")
    _edit(
        repo / MANIFEST,
        '"name": "mpmath",\n   "version": "1.3.0"',
        '"name": "numpy",\n   "version": "2.0.1"',
    )
    store = tmp_path / "store"
    shutil.move(repo / "store", store)
    alone = check([repo / "draft-deployment"])
    assert alone.findings == ()  # which libraries the init image brings is unknown without it
    stored = check([repo / "draft-deployment"], store=f"file://{store}")
    assert _found(repo, stored) == {(RAY_SERVICE, _line_of(repo / RAY_SERVICE, LD_VALUE), "GB201")}
    [gb201] = stored.findings
    assert "lacks /shared-packages/nvidia/nccl/lib (needed per manifest" in gb201.message
    # A store holds every digest ever published: what they ship is not this checkout's finding.
    assert "GB503" not in {f.code for f in stored.findings}
    with pytest.raises(BadInputError, match="local store folder"):
        check([repo], store="az://account/container/prefix")


def test_without_a_manifest_the_guide_minimum_for_onnxruntime(tmp_path: Path) -> None:
    """No profile, no manifest: onnxruntime-gpu needs cuDNN's folder on LD_LIBRARY_PATH."""
    repo = _copy_repo(tmp_path)
    service = repo / RAY_SERVICE
    service.write_text(_with_guide_init(service.read_text()))
    _edit(service, "/shared-packages/nvidia/cudnn/lib:", "")
    alone = check([service])
    gb201 = [f for f in alone.findings if f.code == "GB201"]
    assert [(f.line) for f in gb201] == [_line_of(service, LD_VALUE)]
    assert "/shared-packages/nvidia/cudnn/lib" in gb201[0].message
    assert "deployment guide" in gb201[0].message
    assert alone.exit_code == 1


def test_dockerfile_env_counts_when_the_pod_sets_nothing(tmp_path: Path) -> None:
    """The worker image's own ENV PYTHONPATH="/app" is what the pod gets without an env entry."""
    repo = _copy_repo(tmp_path)
    _edit(
        repo / RAY_SERVICE,
        '                  - name: PYTHONPATH\n                    value: "/shared-packages:/app"\n',
        "",
    )
    result = check([repo])
    gb202 = [f for f in result.findings if f.code == "GB202"]
    assert (
        len(gb202) == 1
        and "'/app' (the image's ENV, " in gb202[0].message
        and "Dockerfile" in gb202[0].message
    )
    assert gb202[0].line == _line_of(repo / RAY_SERVICE, "env:", after="your-gpu-service:dev")


def test_kuberay_samples_no_crash_no_false_version_mismatch() -> None:
    """Five clusters at Ray 2.52.0, 2.46.0 and 2.49.2, each consistent within itself.

    What is really there: the three GPU groups (llm-serve, stable-diffusion, text-summarizer)
    have an nvidia.com/gpu limit but no nvidia.com/gpu toleration (llm-serve has no
    tolerations at all; the other two tolerate only ray.io/node-type).
    """
    samples = sorted(SAMPLES.glob("*.yaml"))
    assert len(samples) == 6
    expected = {
        (name, _line_of(SAMPLES / name, marker), "GB602")
        for name, marker in (
            ("ray-service.llm-serve.yaml", "groupName: gpu-group"),
            ("ray-service.stable-diffusion.yaml", "tolerations:"),
            ("ray-service.text-summarizer.yaml", "tolerations:"),
        )
    }
    together = check([SAMPLES])
    assert _found(SAMPLES, together) == expected
    assert together.exit_code == 0
    assert sorted(kind for _, kind in together.files) == ["kubernetes"] * 6
    for sample in samples:
        alone = check([sample])
        assert {(sample.name, f.line, f.code) for f in alone.findings} == {
            e for e in expected if e[0] == sample.name
        }


def test_sample_versions_are_read_as_they_are() -> None:
    assert ray_image_versions("rayproject/ray-ml:2.46.0.0e19ea-py39-cpu") == (True, "2.46.0", "3.9")
    assert ray_image_versions("rayproject/ray-ml:2.49.2.deprecated-py311-gpu") == (
        True, "2.49.2", "3.11",
    )  # fmt: skip
    assert ray_image_versions("rayproject/ray-llm:2.52.0-py311-cu128") == (True, "2.52.0", "3.11")
    assert ray_image_versions("rayproject/ray:2.52.0") == (True, "2.52.0", None)
    assert ray_image_versions("rayproject/ray:nightly") == (True, None, None)
    assert ray_image_versions("redis:7.4.0") == (False, None, None)
    assert ray_image_versions("cybersmartstg.azurecr.io/data-ai/your-gpu-service:dev")[0] is False


def test_files_tie_to_their_cluster_among_many(tmp_path: Path) -> None:
    """With the samples' five clusters next to ours, the API service's pin is still compared
    with rayservice (through its HelmRelease's ray:// address), and nothing crosses clusters."""
    repo = _copy_repo(tmp_path)
    shutil.copytree(SAMPLES, tmp_path / "samples")
    clean = check([repo, tmp_path / "samples"])
    assert {f.code for f in clean.findings} == {"GB602"} and clean.not_compared == ()
    _edit(repo / REQUIREMENTS, "ray[client]==2.52.0", "ray[client]==2.51.0")
    result = check([repo, tmp_path / "samples"])
    gb101 = [f for f in result.findings if f.code == "GB101"]
    assert [(Path(f.path).name, f.line) for f in gb101] == [
        ("requirements.txt", _line_of(repo / REQUIREMENTS, "ray[client]==2.51.0"))
    ]
    lone = tmp_path / "lone" / "requirements.txt"
    lone.parent.mkdir()
    lone.write_text("ray[client]==2.40.0\n")
    unplaced = check([tmp_path / "samples", lone])
    assert "GB101" not in {f.code for f in unplaced.findings}
    assert any("requirements.txt" in item for item in unplaced.not_compared)


def test_odd_files_are_findings_or_ignored_never_a_crash(tmp_path: Path) -> None:
    odd = tmp_path / "odd"
    (odd / ".git").mkdir(parents=True)
    (odd / ".git" / "ray.yaml").write_text("kind: RayService\n: : :\n")  # skipped folder
    (odd / "weird.yaml").write_text(
        "apiVersion: ray.io/v1\nkind: RayService\nmetadata: 5\nspec:\n"
        "  rayClusterConfig:\n    workerGroupSpecs: oops\n    headGroupSpec: [1, 2]\n"
    )
    (odd / "list.yaml").write_text("kind: RayCluster\napiVersion: ray.io/v1\nspec: [a]\n")
    (odd / "chart.yaml").write_text("{{ .Values.x }}\nkind: Deployment\n")  # a Helm template
    (odd / "Dockerfile").write_bytes(b"\xff\xfe\x00FROM\n")
    (odd / "requirements.txt").write_text("-r other.txt\nray[client]==\n===\n")
    (odd / "bad.lock").write_text("# gpubuild: {not json\n")
    (odd / "manifest.json").write_text('{"format": 1, "digest": "x", "shards": [}')
    (odd / "azure-pipelines.yaml").write_text("extends: [\n")
    result = check([odd])
    assert sorted((Path(f.path).name, f.code) for f in result.findings) == [
        ("azure-pipelines.yaml", "GB001"),
        ("bad.lock", "GB001"),
        ("manifest.json", "GB001"),
    ]
    assert result.exit_code == 1


def test_missing_path_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no such file"):
        check([tmp_path / "nowhere"])


def test_shell_lines_split_like_sh() -> None:
    assert shell_commands('pip install -t /sp "numpy<2" 2>/dev/null || true; rm -rf x*') == [
        ["pip", "install", "-t", "/sp", "numpy<2"],
        ["true"],
        ["rm", "-rf", "x*"],
    ]
    assert shell_commands("if [ ! -f a ]; then wget -q b; fi") == [
        ["[", "!", "-f", "a", "]"],
        ["wget", "-q", "b"],
        ["fi"],
    ]


def test_cli_text_json_and_exit_status(tmp_path: Path) -> None:
    clean = run_cli("check", str(REPO))
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout == ""
    assert "0 error(s), 0 warning(s)" in clean.stderr

    repo = _copy_repo(tmp_path)
    _edit(repo / REQUIREMENTS, "ray[client]==2.52.0", "ray[client]==2.51.0")
    line = _line_of(repo / REQUIREMENTS, "ray[client]==2.51.0")
    text = run_cli("check", str(repo))
    assert text.returncode == 1
    assert text.stdout.startswith(f"{repo / REQUIREMENTS}:{line}: GB101 ")
    assert "    fix: use Ray 2.52.0 here" in text.stdout

    as_json = run_cli("check", str(repo), "--json")
    assert as_json.returncode == 1
    document = json.loads(as_json.stdout)
    assert document["summary"] == {"errors": 1, "warnings": 0, "files": 10}
    [finding] = document["findings"]
    assert finding == {
        "path": str(repo / REQUIREMENTS),
        "line": line,
        "code": "GB101",
        "severity": "error",
        "message": finding["message"],
        "fix": finding["fix"],
    }
    assert "Ray 2.51.0" in finding["message"] and "2.52.0" in finding["message"]
    assert document["rules"]["GB602"]["severity"] == "warning"

    missing = run_cli("check", str(tmp_path / "nowhere"))
    assert missing.returncode == 2


# --- hostile files: deep nesting, alias bombs, symlink loops, huge files ------------------


def _alias_bomb(key: str, indent: str, levels: int = 9, width: int = 9) -> str:
    """Lines of a YAML "billion laughs": each anchor is a list of `width` aliases of the one
    before, so the last one names width**levels strings while the text stays a few lines."""
    lines = [f"{indent}{key}0: &{key}0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        aliases = ", ".join([f"*{key}{level - 1}"] * width)
        lines.append(f"{indent}{key}{level}: &{key}{level} [{aliases}]")
    return "\n".join(lines) + "\n"


def _gb001(result: object, path: Path) -> Finding:
    findings = result.findings  # type: ignore[attr-defined]
    [found] = [f for f in findings if f.code == "GB001" and f.path == str(path)]
    return found


def test_deeply_nested_yaml_is_gb001_not_a_recursion_error(tmp_path: Path) -> None:
    repo = _copy_repo(tmp_path)
    deep = "[" * 300 + "]" * 300
    _edit(repo / HELM_RELEASE, "    replicaCount: 1\n", f"    replicaCount: 1\n    deep: {deep}\n")
    _edit(repo / RAY_SERVICE, "  name: rayservice\n", f"  name: rayservice\n  x: {deep}\n")
    result = check([repo])
    for name in (HELM_RELEASE, RAY_SERVICE):
        found = _gb001(check([repo / name]), repo / name)
        assert found.line == _line_of(repo / name, "[[[")
        assert "nested more than 100 levels" in found.message
    assert {(f.path, f.code) for f in result.findings} == {
        (str(repo / HELM_RELEASE), "GB001"),
        (str(repo / RAY_SERVICE), "GB001"),
    }

    cli = run_cli("check", str(repo / HELM_RELEASE))
    assert cli.returncode == 1 and "Traceback" not in cli.stderr
    assert cli.stdout.startswith(
        f"{repo / HELM_RELEASE}:{_line_of(repo / HELM_RELEASE, '[[[')}: GB001"
    )


def test_alias_bomb_is_gb001_within_the_expansion_bound(tmp_path: Path) -> None:
    """`_strings` walks a HelmRelease's values and `_mappings` a pipeline: fully expanded, 9**9
    strings took minutes. The loader refuses once aliases stand for more than its bound."""
    repo = _copy_repo(tmp_path)
    _edit(
        repo / HELM_RELEASE,
        "    replicaCount: 1\n",
        "    replicaCount: 1\n" + _alias_bomb("b", "    "),
    )
    pipeline = repo / "your-gpu-service" / "azure-pipelines.yaml"
    pipeline.write_text(pipeline.read_text() + _alias_bomb("lol", ""))
    result = check([repo / HELM_RELEASE, pipeline])
    for path, key in ((repo / HELM_RELEASE, "b"), (pipeline, "lol")):
        found = _gb001(result, path)
        assert _line_of(path, f"{key}1: &") < found.line <= _line_of(path, f"{key}8: &")
        assert "aliases" in found.message and "100000" in found.message

    # A safety net only: the bound makes this quick (it ran for minutes before).
    cli = subprocess.run(
        [sys.executable, "-m", "builder.cli", "check", str(pipeline)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 1 and "Traceback" not in cli.stderr
    assert f"{pipeline}:" in cli.stdout and "GB001" in cli.stdout


def test_symlink_loops_in_a_checkout_are_skipped_not_a_crash(tmp_path: Path) -> None:
    repo = _copy_repo(tmp_path)
    dev = repo / "draft-deployment" / "dev"
    (dev / "self.yaml").symlink_to("self.yaml")
    (dev / "a.yaml").symlink_to("b.yaml")
    (dev / "b.yaml").symlink_to("a.yaml")
    (dev / "up").symlink_to("..", target_is_directory=True)
    result = check([repo])
    assert result.findings == (), "\n".join(f.text() for f in result.findings)
    assert len(result.files) == 10

    cli = run_cli("check", str(repo))
    assert cli.returncode == 0 and "Traceback" not in cli.stderr, cli.stderr


def test_a_named_file_over_the_size_limit_is_an_error(tmp_path: Path) -> None:
    """A file the user names is one they want checked: not reading it is an error (GB001,
    exit 1) that names it and its size, never a silent pass."""
    path = tmp_path / "ray-service.yaml"
    text = (REPO / RAY_SERVICE).read_text()
    path.write_text(text + "# padding\n" * (9 * 1024 * 1024 // 10))
    size = path.stat().st_size
    result = check([path])
    found = _gb001(result, path)
    assert found.line == 1 and str(size) in found.message and "8 MiB" in found.message
    assert result.exit_code == 1

    cli = run_cli("check", str(path))
    assert cli.returncode == 1 and "Traceback" not in cli.stderr
    assert cli.stdout.startswith(f"{path}:1: GB001") and str(size) in cli.stdout


def test_a_walked_file_over_the_size_limit_is_a_warning(tmp_path: Path) -> None:
    repo = _copy_repo(tmp_path)
    huge = repo / "draft-deployment" / "dev" / "huge.yaml"
    huge.write_text("# generated\n" * (9 * 1024 * 1024 // 12))
    # Not a deployment file by its name: never read at any size, like every such file.
    (repo / "your-gpu-service" / "model.onnx").write_bytes(b"\0" * (9 * 1024 * 1024))
    result = check([repo])
    [found] = result.findings
    assert (found.path, found.line, found.code) == (str(huge), 1, "GB002")
    assert found.severity == "warning" and str(huge.stat().st_size) in found.message
    assert result.exit_code == 0


if __name__ == "__main__":
    write_gpubuild_files(REPO)
    print(f"rewrote the gpubuild lock and manifest of {REPO}")
