"""`gpubuild k8s patch` and the snippet: only the intended lines change, the result is a valid
RayService (KubeRay CRD), and other people's files (KubeRay's samples) come out intact."""

from __future__ import annotations

import difflib
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from builder.errors import BadInputError
from builder.k8s import (
    PodSnippet,
    init_container_spec,
    pod_snippet,
    render_snippet,
    schema_errors,
    size_limit,
    worker_env,
)
from builder.k8s_patch import parse_quantity, patch_ray_service
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


def load_all(text: str) -> list[Any]:
    return list(YAML(typ="safe").load_all(text))


def diff_lines(old: str, new: str) -> tuple[list[str], list[str]]:
    removed: list[str] = []
    added: list[str] = []
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
    assert schema_errors(documents[0]) == []
    pod = group_pod(documents[0], GUIDE_GROUP)
    assert [c["name"] for c in pod["initContainers"]] == ["install-heavy-deps"]
    assert pod["initContainers"][0]["image"] == IMAGE
    # The existing 10Gi is more than the 4Gi needed: kept.
    assert {"name": "python-packages", "emptyDir": {"sizeLimit": "10Gi"}} in pod["volumes"]
    assert (
        load_all(old)[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        == documents[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    )

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
            old_pod = group_pod(before, group)
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
    pod = group_pod(load_all(path.read_text())[0], "gpu-group")
    assert [c["name"] for c in pod["initContainers"]] == ["install-heavy-deps", "fetch-model"]
    assert pod["volumes"] == [{"name": "python-packages", "emptyDir": {"sizeLimit": "4Gi"}}]


# --- the CLI ------------------------------------------------------------------------------


def _published_profile(tmp_path: Path, *, publish: bool = True) -> tuple[Path, Path, str]:
    """A profile with its lock and (when `publish`) its manifest in a file store; returns
    (profile, store folder, lock digest)."""
    from builder.lock import Lock, LockedPackage, render_lock
    from builder.profile import load_profile

    profile = write_profile(tmp_path / "profiles", heavy=["alpha"], name="onnx-gpu")
    loaded = load_profile(profile)
    lock = Lock(
        profile="onnx-gpu",
        python="3.10",
        platform="x86_64-manylinux_2_28",
        interpreter=loaded.target.interpreter,
        install_dir=loaded.target.install_dir,
        sources=loaded.sources,
        inputs="test",
        backend="uv",
        packages=(LockedPackage("alpha", "1.0", ("sha256:" + "a" * 64,)),),
    )
    profile.with_suffix(".lock").write_text(render_lock(lock, "/shared-packages"))
    store = tmp_path / "store"
    if publish:
        _publish(store, lock.digest())
    return profile, store, lock.digest()


def _publish(store: Path, digest: str) -> None:
    from builder.manifest import manifest_key, manifest_to_bytes

    published = Manifest(**{**manifest().__dict__, "digest": digest})
    (store / manifest_key("onnx-gpu", digest)).parent.mkdir(parents=True)
    (store / manifest_key("onnx-gpu", digest)).write_bytes(manifest_to_bytes(published))


def _patch_args(path: Path, group: str, profile: Path, store: Path) -> list[str]:
    args = ["k8s", "patch", str(path), "--group", group, "--profile", str(profile)]
    return [*args, "--store", store.as_uri(), "--image", IMAGE]


def test_cli_k8s_patch(tmp_path: Path) -> None:
    profile, store, digest = _published_profile(tmp_path, publish=False)
    path = tmp_path / "ray-service.yaml"
    shutil.copy(GUIDE_FILE, path)
    args = _patch_args(path, GUIDE_GROUP, profile, store)

    missing = run_cli(*args)
    assert missing.returncode == 1 and "publish-cache" in missing.stderr
    assert path.read_text() == GUIDE_FILE.read_text()

    _publish(store, digest)

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


# --- hostile YAML: deep nesting, alias bombs, aliases and merge keys ------------------------


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A "billion laughs" under the first document's metadata: width**levels strings when
    expanded, a few lines of text."""
    lines = [f"  lol0: &lol0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        lines.append(f"  lol{level}: &lol{level} [{', '.join([f'*lol{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def _into_guide(lines: str) -> str:
    """The guide file with `lines` added under its RayService's metadata."""
    text = GUIDE_FILE.read_text()
    head = "metadata:\n  name: rayservice\n"
    assert text.count(head) == 1
    return text.replace(head, "metadata:\n" + lines + "  name: rayservice\n")


HOSTILE = {
    "deep-flow": (_into_guide(f"  deep: {'[' * 300}{']' * 300}\n"), "nested more than 100"),
    "deep-block": (
        _into_guide("".join(f"{'  ' * (level + 1)}k{level}:\n" for level in range(300))),
        "nested more than 100",
    ),
    "alias-bomb": (_into_guide(_alias_bomb()), "aliases"),
    "recursive-alias": (_into_guide("  loop: &loop [a, *loop]\n"), "contains it"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_yaml_is_refused_naming_the_file(tmp_path: Path, case: str) -> None:
    text, problem = HOSTILE[case]
    path = tmp_path / "ray-service.yaml"
    path.write_text(text)
    with pytest.raises(BadInputError) as caught:
        patch_ray_service(path, GUIDE_GROUP, snippet())
    message = str(caught.value)
    assert message.startswith(f"{path}:") and problem in message
    line = int(message.removeprefix(f"{path}:").split(":", 1)[0])
    assert 5 <= line <= 306  # in the lines added under metadata, not line 1
    assert path.read_text() == text


def test_cli_hostile_yaml_exits_2_and_leaves_the_file(tmp_path: Path) -> None:
    profile, store, _ = _published_profile(tmp_path)
    for case in ("deep-flow", "alias-bomb"):
        text, problem = HOSTILE[case]
        path = tmp_path / f"{case}.yaml"
        path.write_text(text)
        # The timeout is a safety net only: the loader's bounds make this quick.
        done = subprocess.run(
            [sys.executable, "-m", "builder.cli", *_patch_args(path, GUIDE_GROUP, profile, store)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert f"gpubuild: error: {path}:" in done.stderr and problem in done.stderr
        assert path.read_text() == text


def _with_more_cpu(template: str) -> str:
    """The guide file with cpu-workers' template anchored (&cpu) and a group `more-cpu` whose
    template is `template`."""
    text = GUIDE_FILE.read_text()
    anchored = (
        "        groupName: cpu-workers\n        rayStartParams: {}\n        template: &cpu\n"
    )
    text = text.replace(anchored.replace(" &cpu", ""), anchored, 1)
    group = (
        "      - groupName: more-cpu\n        minReplicas: 0\n        maxReplicas: 1\n"
        f"        rayStartParams: {{}}\n        template:{template}"
    )
    return text.replace(
        "      # Your GPU worker group\n", group + "      # Your GPU worker group\n"
    )


ALIASED = _with_more_cpu(" *cpu\n")
# A merge key in the pod spec: `containers` comes from cpu-workers (this crashed with KeyError).
MERGED = _with_more_cpu(
    "\n          spec:\n            <<: *cpu_spec\n            priorityClassName: low\n"
).replace(
    "        template: &cpu\n          spec:\n",
    "        template: &cpu\n          spec: &cpu_spec\n",
)


# The whole list of groups is used again elsewhere: an edit of one group changes both.
LIST_ALIASED = (
    GUIDE_FILE.read_text()
    .replace("    workerGroupSpecs:\n", "    workerGroupSpecs: &groups\n", 1)
    .replace("\n---\n", "\nx-copy: *groups\n---\n", 1)
)


@pytest.mark.parametrize(
    ("text", "group", "needle"),
    [
        (ALIASED, "more-cpu", "template: *cpu"),
        (ALIASED, "cpu-workers", "&cpu"),  # patching it would change more-cpu too
        (MERGED, "more-cpu", "<<"),
        (MERGED, "cpu-workers", "&cpu_spec"),
        (LIST_ALIASED, GUIDE_GROUP, "x-copy: *groups"),
    ],
    ids=["alias", "anchor-of-alias", "merge-key", "anchor-of-merge", "list-alias"],
)
def test_patch_refuses_to_edit_through_an_alias_or_merge_key(
    tmp_path: Path, text: str, group: str, needle: str
) -> None:
    path = tmp_path / "ray-service.yaml"
    path.write_text(text)
    with pytest.raises(BadInputError) as caught:
        patch_ray_service(path, group, snippet())
    message = str(caught.value)
    line = next(n for n, t in enumerate(text.splitlines(), 1) if needle.split()[-1] in t)
    assert message.startswith(f"{path}:{line}: ")
    assert f"worker group {group!r}" in message and needle in message
    assert "write" in message and "out in full" in message
    assert path.read_text() == text


def test_a_group_that_shares_nothing_is_patched_beside_aliases(tmp_path: Path) -> None:
    """Anchors and aliases elsewhere in the file do not stop the patch of a group without any."""
    path = tmp_path / "ray-service.yaml"
    path.write_text(MERGED)
    result = patch_ray_service(path, GUIDE_GROUP, snippet())
    assert result.changed
    removed, _ = diff_lines(MERGED, path.read_text())
    guide = patch_ray_service(_copy(GUIDE_FILE, tmp_path / "guide.yaml"), GUIDE_GROUP, snippet())
    assert removed == diff_lines(GUIDE_FILE.read_text(), guide.text)[0]


def _copy(source: Path, target: Path) -> Path:
    shutil.copy(source, target)
    return target


def test_cli_refuses_an_alias_with_exit_2(tmp_path: Path) -> None:
    profile, store, _ = _published_profile(tmp_path)
    path = tmp_path / "ray-service.yaml"
    path.write_text(ALIASED)
    done = run_cli(*_patch_args(path, "more-cpu", profile, store))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{path}:" in done.stderr and "more-cpu" in done.stderr and "*cpu" in done.stderr
    assert path.read_text() == ALIASED


@pytest.mark.parametrize(
    ("plain_line", "tagged_line"),
    [
        ("priorityClassName: gpu-workload-high", "priorityClassName: !!str gpu-workload-high"),
        ("- name: install-heavy-deps", "- name: !!str install-heavy-deps"),
        ("- name: PYTHONPATH", "- name: !!str PYTHONPATH"),
    ],
)
def test_explicit_tags_in_the_pod_spec_are_kept_and_compared_by_value(
    tmp_path: Path, plain_line: str, tagged_line: str
) -> None:
    """ruamel reads `!!str x` as a TaggedScalar, equal only to itself: the check of the patched
    text raised AssertionError (a traceback), and a tagged name did not match ours."""
    text = GUIDE_FILE.read_text()
    assert text.count(plain_line) == 1
    path = tmp_path / "ray-service.yaml"
    path.write_text(text.replace(plain_line, tagged_line))
    result = patch_ray_service(path, GUIDE_GROUP, snippet())
    plain_path = tmp_path / "plain.yaml"
    plain_path.write_text(text)
    expected = patch_ray_service(plain_path, GUIDE_GROUP, snippet())
    assert result.changed and load_all(path.read_text()) == load_all(expected.text)
