"""`gpubuild k8s patch` and the snippet: only the intended lines change, the result is a valid
RayService (KubeRay CRD), and other people's files (KubeRay's samples) come out intact."""

from __future__ import annotations

import difflib
import hashlib
import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from builder.errors import BadInputError
from builder.k8s import (
    PodSnippet,
    init_container_spec,
    parse_quantity,
    patch_ray_service,
    pod_snippet,
    render_snippet,
    schema_errors,
    size_limit,
    worker_env,
)
from builder.manifest import Manifest, Shard
from tests.helpers import run_cli, write_profile

DATA = Path(__file__).parent / "data"
GUIDE_FILE = DATA / "ray-service.yaml"
GUIDE_GROUP = "your-gpu-worker-group"
SAMPLES = DATA / "kuberay-samples"
GPU_SAMPLES = [
    ("ray-service.llm-serve.yaml", "gpu-group"),
    ("ray-service.stable-diffusion.yaml", "gpu-group"),
    ("ray-service.text-summarizer.yaml", "gpu-group"),
]
IMAGE = "cybersmartstg.azurecr.io/data-ai/gpubuild-init:onnx-gpu-0123456789ab"
CUDNN = "/shared-packages/nvidia/cudnn/lib"
CUBLAS = "/shared-packages/nvidia/cublas/lib"


def manifest(raw_bytes: int = 3 * 10**9, *, libraries: str = f"{CUDNN}:{CUBLAS}") -> Manifest:
    return Manifest(
        digest=hashlib.sha256(b"k8s").hexdigest(),
        profile="onnx-gpu",
        python="3.10",
        platform="x86_64-manylinux_2_28",
        install_dir="/shared-packages",
        shards=(Shard("b" * 64, raw_bytes // 2, "c" * 64, raw_bytes, 1000, ("onnxruntime-gpu",)),),
        env={"PYTHONPATH": "/shared-packages", "LD_LIBRARY_PATH": libraries},
        packages=(),
    )


def snippet(**kwargs: object) -> PodSnippet:
    return pod_snippet(manifest(), image=IMAGE, **kwargs)  # type: ignore[arg-type]


def load_all(text: str) -> list[object]:
    return list(YAML(typ="safe").load_all(text))


def diff_lines(old: str, new: str) -> tuple[list[str], list[str]]:
    removed, added = [], []
    for line in difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=0):
        if line.startswith(("---", "+++", "@@")):
            continue
        (removed if line.startswith("-") else added).append(line[1:])
    return removed, added


def group_pod(document: dict, group: str) -> dict:
    groups = document["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return next(g for g in groups if g["groupName"] == group)["template"]["spec"]


# --- the snippet --------------------------------------------------------------------------


def test_worker_env_puts_the_install_dir_first_and_keeps_existing_values() -> None:
    env = worker_env(manifest(), {"PYTHONPATH": "/app:/extra", "LD_LIBRARY_PATH": "/opt/lib"})
    assert env == [
        {"name": "PYTHONPATH", "value": "/shared-packages:/app:/extra"},
        {"name": "LD_LIBRARY_PATH", "value": f"{CUDNN}:{CUBLAS}:/opt/lib"},
    ]
    assert worker_env(manifest(libraries="")) == [
        {"name": "PYTHONPATH", "value": "/shared-packages:/app"}
    ]


def test_size_limit_has_headroom() -> None:
    limit = size_limit(manifest(raw_bytes=3 * 10**9))
    assert limit == "4Gi"
    assert parse_quantity(limit) >= 3 * 10**9 * 1.25
    assert parse_quantity("10Gi") == 10 * 2**30
    assert parse_quantity("500M") == 500e6
    assert size_limit(manifest(raw_bytes=1000)) == "1Gi"


def test_snippet_is_valid_and_reads_the_sas_from_a_secret() -> None:
    text = render_snippet(snippet(secret="gpubuild-sas"))
    assert text.startswith("# gpubuild initContainer for profile onnx-gpu")
    spec = YAML(typ="safe").load(text)
    init = spec["initContainers"][0]
    assert init == init_container_spec(manifest(), image=IMAGE, secret="gpubuild-sas")
    assert {"name": "GPUBUILD_SAS_FILE", "value": "/var/run/gpubuild/sas"} in init["env"]
    assert {"mountPath": "/shared-packages", "name": "python-packages"} in init["volumeMounts"]
    assert spec["volumes"][0] == {"name": "python-packages", "emptyDir": {"sizeLimit": "4Gi"}}
    assert spec["volumes"][1]["secret"]["secretName"] == "gpubuild-sas"
    with pytest.raises(BadInputError):
        snippet(secret="Not_A_Name")


# --- patching the deployment guide's file -------------------------------------------------


def test_patch_the_guide_file_changes_only_the_intended_lines(tmp_path: Path) -> None:
    path = tmp_path / "ray-service.yaml"
    shutil.copy(GUIDE_FILE, path)
    old = path.read_text()
    result = patch_ray_service(path, GUIDE_GROUP, snippet(secret="gpubuild-sas"))
    new = path.read_text()
    assert result.changed and result.text == new
    assert result.diff.startswith("--- a/ray-service.yaml\n+++ b/ray-service.yaml\n")

    removed, added = diff_lines(old, new)
    old_init = old.split("              - name: install-heavy-deps\n")[1].split(
        "            containers:\n"
    )[0]
    # Removed: only lines of the pip initContainer's body and the hand-written LD_LIBRARY_PATH
    # value (difflib keeps lines such as `volumeMounts:` that both versions have as context).
    ld_line = (
        '                    value: "/shared-packages/nvidia/cudnn/lib:'
        '/shared-packages/nvidia/cuda_runtime/lib"'
    )
    assert set(removed) <= {*old_init.splitlines(), ld_line}
    assert ld_line in removed
    assert "                    pip install --target=/shared-packages --no-cache-dir \\" in removed
    intended = [
        f"                image: {IMAGE}",
        "                imagePullPolicy: IfNotPresent",
        "                env:",
        "                  - name: GPUBUILD_TARGET",
        "                    value: /shared-packages",
        "                  - name: GPUBUILD_SAS_FILE",
        "                    value: /var/run/gpubuild/sas",
        "                volumeMounts:",
        "                  - mountPath: /shared-packages",
        "                    name: python-packages",
        "                  - mountPath: /var/run/gpubuild",
        "                    name: gpubuild-sas",
        "                    readOnly: true",
        "                resources:",
        "                  requests:",
        '                    cpu: "1"',
        "                    memory: 256Mi",
        "                  limits:",
        '                    cpu: "4"',
        "                    memory: 1Gi",
        # The file quotes every env value, so ours is quoted the same way.
        f'                    value: "{CUDNN}:{CUBLAS}:/shared-packages/nvidia/cuda_runtime/lib"',
        "              - name: gpubuild-sas",
        "                secret:",
        "                  secretName: gpubuild-sas",
        "                  defaultMode: 256",
    ]
    assert set(added) <= set(intended)
    for line in (intended[0], intended[5], intended[-5], intended[-4], intended[-1]):
        assert line in added
    # Everything else, Flux markers and comments included, is byte for byte the same.
    markers = [line for line in old.splitlines() if "$imagepolicy" in line]
    assert len(markers) == 3
    assert all(line in new.splitlines() for line in markers)
    assert old.split("\n---\n")[1] == new.split("\n---\n")[1]
    assert result.warnings and "model-cache" in result.warnings[0]

    documents = load_all(new)
    assert schema_errors(documents[0]) == []  # type: ignore[arg-type]
    pod = group_pod(documents[0], GUIDE_GROUP)  # type: ignore[arg-type]
    assert [c["name"] for c in pod["initContainers"]] == ["install-heavy-deps"]
    assert pod["initContainers"][0]["image"] == IMAGE
    # The existing 10Gi is more than the 4Gi needed: kept.
    assert {"name": "python-packages", "emptyDir": {"sizeLimit": "10Gi"}} in pod["volumes"]
    assert (
        load_all(old)[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        == documents[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    )  # type: ignore[index]

    again = patch_ray_service(path, GUIDE_GROUP, snippet(secret="gpubuild-sas"))
    assert not again.changed and again.diff == ""
    assert path.read_text() == new


def test_a_smaller_size_limit_is_raised(tmp_path: Path) -> None:
    path = tmp_path / "ray-service.yaml"
    path.write_text(GUIDE_FILE.read_text().replace("sizeLimit: 10Gi", "sizeLimit: 2Gi"))
    old = path.read_text()
    patch_ray_service(path, GUIDE_GROUP, snippet())
    removed, added = diff_lines(old, path.read_text())
    assert "                  sizeLimit: 2Gi" in removed
    assert "                  sizeLimit: 4Gi" in added


def test_unknown_group_lists_the_groups(tmp_path: Path) -> None:
    path = tmp_path / "ray-service.yaml"
    shutil.copy(GUIDE_FILE, path)
    with pytest.raises(BadInputError) as caught:
        patch_ray_service(path, "nope", snippet())
    assert "cpu-workers" in str(caught.value) and GUIDE_GROUP in str(caught.value)
    assert path.read_text() == GUIDE_FILE.read_text()


# --- patching KubeRay's own samples -------------------------------------------------------


@pytest.mark.parametrize(("name", "group"), GPU_SAMPLES)
def test_patch_kuberay_samples_only_adds_lines(tmp_path: Path, name: str, group: str) -> None:
    path = tmp_path / name
    shutil.copy(SAMPLES / name, path)
    old = path.read_text()
    result = patch_ray_service(path, group, snippet())
    new = path.read_text()
    removed, added = diff_lines(old, new)
    assert removed == []  # every line of theirs is still there, in order
    assert "- name: install-heavy-deps" in "\n".join(added)
    documents = load_all(new)
    old_documents = load_all(old)
    assert len(documents) == len(old_documents)
    for before, after in zip(old_documents, documents, strict=True):
        if isinstance(after, dict) and after.get("kind") == "RayService":
            assert schema_errors(after) == []
            pod = group_pod(after, group)
            old_pod = group_pod(before, group)  # type: ignore[arg-type]
            main, old_main = pod["containers"][0], old_pod["containers"][0]
            assert {"mountPath": "/shared-packages", "name": "python-packages"} in main[
                "volumeMounts"
            ]
            env = {e["name"]: e.get("value") for e in main["env"]}
            assert env["PYTHONPATH"] == "/shared-packages:/app"
            assert env["LD_LIBRARY_PATH"] == f"{CUDNN}:{CUBLAS}"
            # Everything that was there still is.
            for key, value in old_main.items():
                if key not in ("env", "volumeMounts"):
                    assert main[key] == value
            for item in old_main.get("env", []):
                assert item in main["env"]
        else:
            assert before == after
    assert result.warnings == ()
    assert not patch_ray_service(path, group, snippet()).changed


def test_patch_a_group_whose_pod_has_volumes_and_init_containers(tmp_path: Path) -> None:
    """The sample group with a `volumes:` list and a foreign initContainer: ours goes first."""
    text = (SAMPLES / "ray-service.stable-diffusion.yaml").read_text()
    text = text.replace(
        "          containers:\n          - name: ray-worker\n",
        "          initContainers:\n          - name: fetch-model\n            image: busybox\n"
        "          containers:\n          - name: ray-worker\n",
    ).replace(
        '            effect: "NoSchedule"\n',
        '            effect: "NoSchedule"\n          volumes: []\n',
    )
    path = tmp_path / "sd.yaml"
    path.write_text(text)
    patch_ray_service(path, "gpu-group", snippet())
    removed, _ = diff_lines(text, path.read_text())
    assert removed == ["          volumes: []"]
    pod = group_pod(load_all(path.read_text())[0], "gpu-group")  # type: ignore[arg-type]
    assert [c["name"] for c in pod["initContainers"]] == ["install-heavy-deps", "fetch-model"]
    assert pod["volumes"] == [{"name": "python-packages", "emptyDir": {"sizeLimit": "4Gi"}}]


# --- the CLI ------------------------------------------------------------------------------


def test_cli_k8s_patch(tmp_path: Path) -> None:
    from builder.lock import Lock, LockedPackage, render_lock
    from builder.manifest import manifest_key, manifest_to_bytes
    from builder.profile import load_profile
    from builder.resolve import sources_digest

    profile = write_profile(tmp_path / "profiles", heavy=["alpha"], name="onnx-gpu")
    loaded = load_profile(profile)
    lock = Lock(
        profile="onnx-gpu",
        python="3.10",
        platform="x86_64-manylinux_2_28",
        interpreter=loaded.target.interpreter,
        install_dir=loaded.target.install_dir,
        sources=sources_digest(loaded),
        inputs="test",
        backend="uv",
        packages=(LockedPackage("alpha", "1.0", ("sha256:" + "a" * 64,)),),
    )
    profile.with_suffix(".lock").write_text(render_lock(lock, "/shared-packages"))
    store = tmp_path / "store"
    path = tmp_path / "ray-service.yaml"
    shutil.copy(GUIDE_FILE, path)
    args = ["k8s", "patch", str(path), "--group", GUIDE_GROUP, "--profile", str(profile)]
    args += ["--store", store.as_uri(), "--image", IMAGE]

    missing = run_cli(*args)
    assert missing.returncode == 1 and "publish-cache" in missing.stderr
    assert path.read_text() == GUIDE_FILE.read_text()

    published = Manifest(**{**manifest().__dict__, "digest": lock.digest()})
    (store / manifest_key("onnx-gpu", lock.digest())).parent.mkdir(parents=True)
    (store / manifest_key("onnx-gpu", lock.digest())).write_bytes(manifest_to_bytes(published))

    bad_group = run_cli(*args[:4], "nope", *args[5:])
    assert bad_group.returncode == 2 and GUIDE_GROUP in bad_group.stderr

    dry = run_cli(*args, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert dry.json()["changed"] and not dry.json()["written"]
    assert path.read_text() == GUIDE_FILE.read_text()

    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert f"+                image: {IMAGE}" in done.stderr
    assert "warning: replaced initContainer" in done.stderr
    assert path.read_text() != GUIDE_FILE.read_text()
    assert "already up to date" in run_cli(*args).stderr
