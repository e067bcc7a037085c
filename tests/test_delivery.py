"""The three ways a pod gets the heavy set, each proven on real components where this machine
has them: the RayService each mode writes validates against KubeRay's CRD; containerd (what a
node's kubelet uses) pulls the init-copy image by digest from a local registry and runs it into
a host folder, which then matches the blob-path tree file for file; containerd pulls the heavy
image and `ctr image mount` shows the merged tree an image volume would see, from which the
host python imports the set. Image volumes themselves need a kubelet: only validated here."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from builder.fetch import fetch
from builder.indexes import IndexSettings
from builder.manifest import Manifest, Shard
from builder.pipeline import publish_profile
from builder.profile import load_profile
from builder.publish import PublishResult
from tests.helpers import REPO, run_cli, write_profile
from tests.support import services
from tests.support.wheels import build_wheel

GUIDE = REPO / "tests" / "data" / "ray-service.yaml"
GROUP = "your-gpu-worker-group"


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.support.index import serve_index

    dists = tmp_path_factory.mktemp("delivery-dists")
    wheels = [
        build_wheel(dists, "alpha", "1.0", files={
            "alpha/__init__.py": b"VALUE = 'alpha'\n",
            "alpha/sub/deep.py": b"DEEP = 1\n",
            "alpha/data/big.bin": os.urandom(400_000),
            "alpha_toplevel.py": b"TOP = True\n",  # a file at the tree's top level
            # A folder the runtime mounts into (/etc/hosts): copied around the mount point.
            "etc/alpha.cfg": b"[alpha]\n",
        }),
        build_wheel(dists, "beta", "2.0", files={"beta/__init__.py": b"VALUE = 'beta'\n"},
                    entry_points={"beta-tool": "beta:main"}),
    ]  # fmt: skip
    root = tmp_path_factory.mktemp("delivery-index")
    with serve_index(wheels, root) as url:
        yield url


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))


@pytest.fixture
def published(
    tmp_path: Path, index: str, registry_address: str
) -> tuple[Path, PublishResult, Path]:
    """A py3.11 profile (the host's) published to the registry, and its blob-path tree."""
    profile = write_profile(tmp_path / "profiles", name="deliver", heavy=["alpha==1.0", "beta==2.0"],
                            python="3.11")  # fmt: skip
    settings = IndexSettings(default_url=index)
    result = publish_profile(
        load_profile(profile),
        store_url=f"oci+http://{registry_address}/gpubuild/d{uuid.uuid4().hex[:8]}",
        settings=settings,
        pack_dir=tmp_path / "packs",
    )
    folder = publish_profile(load_profile(profile), store_url=(tmp_path / "store").as_uri(),
                             settings=settings)  # fmt: skip
    tree = tmp_path / "blob-tree"
    fetch(folder.fetch_url, tree)
    return profile, result, tree


def tree_state(root: Path, skip: tuple[str, ...] = (".gpubuild",)) -> dict[str, tuple[str, str]]:
    """Every entry below root: kind, mode for files and folders, content digest or link target."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if relative.split("/", 1)[0] in skip:
            continue
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            found[relative] = ("link", os.readlink(path))
        elif stat.S_ISDIR(mode):
            found[relative] = ("dir", oct(stat.S_IMODE(mode)))
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found[relative] = (f"file {oct(stat.S_IMODE(mode))}", digest)
    return found


def _patch(tmp_path: Path, profile: Path, store: str, delivery: str) -> tuple[Any, str]:
    target = tmp_path / f"ray-service-{delivery}.yaml"
    shutil.copy(GUIDE, target)
    result = run_cli(
        "k8s", "patch", str(target), "--group", GROUP, "--profile", str(profile),
        "--store", store, "--delivery", delivery,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = target.read_text()
    document = next(iter(YAML(typ="safe").load_all(text)))
    groups = document["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = next(g for g in groups if g["groupName"] == GROUP)["template"]["spec"]
    return pod, text


def test_each_delivery_writes_a_ray_service_the_crd_accepts(
    tmp_path: Path, published: tuple[Path, PublishResult, Path]
) -> None:
    profile, result, _ = published
    # Comments and Flux markers stay, but for those inside the pip initContainer's script,
    # which both modes remove with it.
    comments = [
        line
        for line in GUIDE.read_text().splitlines()
        if line.strip().startswith("#") and len(line) - len(line.lstrip()) < 20
    ]
    assert any("$imagepolicy" in line for line in GUIDE.read_text().splitlines())

    pod, text = _patch(tmp_path, profile, result.store, "image-volume")
    volume = next(v for v in pod["volumes"] if "image" in v)
    assert volume["image"] == {
        "reference": result.references["image"],
        "pullPolicy": "IfNotPresent",
    }
    assert "@sha256:" in volume["image"]["reference"]
    assert not any(c["name"] == "install-heavy-deps" for c in pod.get("initContainers") or [])
    mount = next(
        m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/shared-packages"
    )
    assert mount["readOnly"] is True and mount["name"] == volume["name"]
    assert all(line in text for line in comments)  # comments and Flux markers stay

    pod, text = _patch(tmp_path, profile, result.store, "init-copy")
    init = next(c for c in pod["initContainers"] if c["name"] == "install-heavy-deps")
    assert init["image"] == result.references["init-copy image"]
    assert {"name": "GPUBUILD_TARGET", "value": "/shared-packages"} in init["env"]
    assert all(line in text for line in comments)

    # A registry store has no blob path; a folder store has no images.
    refused = run_cli("k8s", "patch", str(tmp_path / "ray-service-init-copy.yaml"), "--group",
                      GROUP, "--profile", str(profile), "--store", result.store)  # fmt: skip
    assert refused.returncode == 2 and "image-volume or init-copy" in refused.stderr
    folder = (tmp_path / "store").as_uri()
    refused = run_cli("k8s", "patch", str(tmp_path / "ray-service-init-copy.yaml"), "--group",
                      GROUP, "--profile", str(profile), "--store", folder, "--delivery", "init-copy")  # fmt: skip
    assert refused.returncode == 2 and "registry store" in refused.stderr
    pod, _ = _patch(tmp_path, profile, folder, "blob")
    assert next(c for c in pod["initContainers"] if c["name"] == "install-heavy-deps")


def test_containerd_runs_the_init_copy_image_into_a_folder(
    tmp_path: Path, published: tuple[Path, PublishResult, Path]
) -> None:
    """As the kubelet would: containerd pulls the init-copy image by digest and runs it with
    the volume mounted; twice, the second finding the set installed. (Debian's Docker engine
    is 20.10, which cannot unpack zstd layers; Docker 23 and later, and containerd 1.5 and
    later, which Kubernetes nodes run, can.)"""
    _, result, tree = published
    reference = result.references["init-copy image"]
    volume = tmp_path / "volume"
    volume.mkdir()
    # What the kubelet mounts into every container: /etc/hosts (inside a folder the tree has)
    # and the service-account token (inside one it has not).
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    token = tmp_path / "serviceaccount"
    token.mkdir()
    (token / "token").write_text("not a real token\n")
    with services.containerd() as node:
        node.run("images", "pull", "--plain-http", reference)
        outputs = []
        for number in range(2):
            done = node.run(
                "run", "--rm",
                "--mount", f"type=bind,src={volume},dst=/shared-packages,options=rbind:rw",
                "--mount", f"type=bind,src={hosts},dst=/etc/hosts,options=rbind:ro",
                "--mount", f"type=bind,src={token},"
                "dst=/var/run/secrets/kubernetes.io/serviceaccount,options=rbind:ro",
                "--env", "GPUBUILD_TARGET=/shared-packages",
                reference, f"gpubuild-copy-{number}",
            )  # fmt: skip
            outputs.append(done.stdout + done.stderr)
    assert "copied into /shared-packages" in outputs[0]
    assert "already installed" in outputs[1]
    assert tree_state(volume) == tree_state(tree)
    assert (volume / "etc" / "alpha.cfg").is_file() and not (volume / "etc" / "hosts").exists()
    assert not (volume / "var").exists()
    assert (volume / ".gpubuild" / "installed").read_text().split() == [result.digest, "image"]


def test_containerd_mounts_the_image_an_image_volume_would_see(
    tmp_path: Path, published: tuple[Path, PublishResult, Path]
) -> None:
    _, result, tree = published
    reference = result.references["image"]
    mountpoint = tmp_path / "mounted"
    mountpoint.mkdir()
    with services.containerd() as node:
        node.run("images", "pull", "--plain-http", reference)
        node.run("images", "mount", reference, str(mountpoint))
        try:
            assert tree_state(mountpoint, skip=()) == tree_state(tree, skip=())
            probe = subprocess.run(
                [sys.executable, "-s", "-B", "-c",
                 "import alpha, beta, alpha.sub.deep, alpha_toplevel; print(alpha.VALUE, beta.VALUE)"],
                env={"PYTHONPATH": str(mountpoint), "PATH": os.environ["PATH"]},
                capture_output=True, text=True,
            )  # fmt: skip
            assert probe.returncode == 0, probe.stderr
            assert probe.stdout.split() == ["alpha", "beta"]
        finally:
            node.run("images", "unmount", str(mountpoint))


def test_init_script_writes_the_snippet_of_each_registry_delivery(
    tmp_path: Path, published: tuple[Path, PublishResult, Path]
) -> None:
    profile, result, _ = published
    for delivery, wanted in (("image-volume", "image"), ("init-copy", "init-copy image")):
        snippet = tmp_path / f"{delivery}.yaml"
        done = run_cli(
            "init-script", str(profile), "--store", result.store, "--delivery", delivery,
            "--k8s-out", str(snippet), "--json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.json()["image"] == result.references[wanted]
        assert done.json()["script"] is None and not (tmp_path / "init.sh").exists()
        assert result.references[wanted] in snippet.read_text()
    no_snippet = run_cli(
        "init-script", str(profile), "--store", result.store, "--delivery", "image-volume"
    )
    assert no_snippet.returncode == 2 and "--k8s-out" in no_snippet.stderr
    with_secret = run_cli(
        "init-script", str(profile), "--store", result.store, "--delivery", "init-copy",
        "--k8s-out", str(tmp_path / "x.yaml"), "--secret", "gpubuild-sas",
    )  # fmt: skip
    assert with_secret.returncode == 2 and "needs no SAS" in with_secret.stderr


# --- the init-copy script's protocol, run in a chroot as the runtime would lay it out ----------

BUSYBOX = Path("/bin/busybox")
# What a runtime mounts into the container: /proc, /dev/null, the pod's /etc/hosts (inside a
# folder the tree has), the service-account token (inside one it has not), and the volume;
# Docker also leaves /.dockerenv at the root.
_RUNTIME = """\
set -e
R=$1 T=$2 V=$3
mkdir -p "$R/proc" "$R/dev" "$R$T" "$R/var/run/secrets/kubernetes.io/serviceaccount"
touch "$R/etc/hosts" "$R/.dockerenv" "$R/dev/null"
mount -t proc proc "$R/proc"
mount --bind /dev/null "$R/dev/null"
mount --bind /etc/hosts "$R/etc/hosts"
mount -t tmpfs tmpfs "$R/var/run/secrets/kubernetes.io/serviceaccount"
mount --bind "$V" "$R$T"
exec env -i GPUBUILD_TARGET="$T" "$(command -v chroot)" "$R" /.gpubuild/busybox sh /.gpubuild/copy.sh
"""
_TREE: dict[str, bytes | str] = {
    "alpha/__init__.py": b"VALUE = 'alpha'\n",
    "alpha/sub/deep.py": b"DEEP = 1\n",
    "alpha/link.py": "__init__.py",  # a symlink
    "etc/alpha.cfg": b"[alpha]\n",  # beside the runtime's /etc/hosts
    "with space/x y.py": b"X = 1\n",
    "top.py": b"TOP = True\n",
}
_FOLDERS = ("alpha", "alpha/sub", "empty", "etc", "with space")


def _copy_image_root(
    root: Path, digest: str, tree: dict[str, bytes | str], install_dir: str
) -> Manifest:
    """The merged layers of an init-copy image for `tree`: the tree, and the copier layer."""
    import io
    import tarfile

    from builder.ociimage import copier_layer, read_static_busybox, tree_entries

    for folder in _FOLDERS:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for path, data in tree.items():
        if isinstance(data, str):
            (root / path).symlink_to(data)
        else:
            (root / path).write_bytes(data)
    shard = Shard("c" * 64, 1, "d" * 64, 1, len(tree), ("alpha",))
    manifest = Manifest(digest, "copy", "3.11", "x86_64-manylinux_2_28", install_dir, (shard,),
                        {}, (), _FOLDERS)  # fmt: skip
    busybox = read_static_busybox(BUSYBOX)
    assert busybox is not None
    entries = tree_entries([(path, True) for path in tree], _FOLDERS)
    layer = copier_layer(manifest, busybox.data, entries)
    with tarfile.open(fileobj=io.BytesIO(layer.data)) as tar:
        tar.extractall(root, filter="fully_trusted")
    return manifest


def _run_copy(root: Path, install_dir: str, volume: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", _RUNTIME, "runtime",
         str(root), install_dir, str(volume)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture
def copier_host(tmp_path: Path) -> Path:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("runs the copier in a chroot with its own mounts: needs root and unshare")
    if not BUSYBOX.is_file():
        pytest.skip("needs a static busybox (Debian's busybox-static)")
    return tmp_path


def test_the_copier_copies_the_listed_entries_around_mount_points(copier_host: Path) -> None:
    """An install folder with a space (\\040 in /proc/mounts), a runtime file at the root that
    is no part of the set, and /etc/hosts mounted beside a file of the tree: exactly the tree
    arrives, and a second run finds it installed."""
    root, volume = copier_host / "root", copier_host / "volume"
    volume.mkdir()
    manifest = _copy_image_root(root, "a" * 64, _TREE, "/shared packages")
    first = _run_copy(root, "/shared packages", volume)
    assert first.returncode == 0, first.stderr
    assert f"{manifest.total_files} files" in first.stderr
    assert _files(volume) == _expected(_TREE)
    assert sorted(p.name for p in volume.iterdir()) == [
        ".gpubuild", "alpha", "empty", "etc", "top.py", "with space",
    ]  # fmt: skip
    assert (volume / ".gpubuild" / "installed").read_text() == f"{'a' * 64} image\n"
    again = _run_copy(root, "/shared packages", volume)
    assert again.returncode == 0 and "already installed" in again.stderr
    assert sorted(p.name for p in (volume / ".gpubuild").iterdir()) == ["installed"]


def _expected(tree: dict[str, bytes | str]) -> dict[str, tuple[str, bytes | str]]:
    return {path: ("link", data) if isinstance(data, str) else ("file", data)
            for path, data in tree.items()}  # fmt: skip


def _files(root: Path) -> dict[str, tuple[str, bytes | str]]:
    found: dict[str, tuple[str, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(".gpubuild"):
            continue
        if path.is_symlink():
            found[relative] = ("link", os.readlink(path))
        elif path.is_file():
            found[relative] = ("file", path.read_bytes())
    return found


def test_a_new_set_replaces_the_old_one_whole_and_a_stopped_switch_is_finished(
    copier_host: Path,
) -> None:
    old_root, new_root = copier_host / "old", copier_host / "new"
    volume = copier_host / "volume"
    volume.mkdir()
    _copy_image_root(old_root, "a" * 64, {**_TREE, "old_only.py": b"OLD = 1\n"}, "/pkgs")
    new_tree = {**_TREE, "top.py": b"TOP = 2\n"}
    _copy_image_root(new_root, "b" * 64, new_tree, "/pkgs")
    assert _run_copy(old_root, "/pkgs", volume).returncode == 0
    assert (volume / "old_only.py").exists()
    switched = _run_copy(new_root, "/pkgs", volume)
    assert switched.returncode == 0, switched.stderr
    assert "old_only.py" not in _files(volume) and _files(volume)["top.py"] == (
        "file",
        b"TOP = 2\n",
    )
    assert (volume / ".gpubuild" / "installed").read_text().split() == ["b" * 64, "image"]

    # A run killed in its switch left: `incomplete`, half the old set, a staging folder of its
    # own and its lock. The next run of the pod clears the half set and installs whole.
    state = volume / ".gpubuild"
    (state / "incomplete").write_text("b" * 64 + "\n")
    shutil.rmtree(volume / "alpha")
    (volume / "stray.py").write_text("half\n")
    (state / "staging-Ab12Cd").mkdir()
    (state / "staging-Ab12Cd" / "x").write_text("partial\n")
    hostname = subprocess.run(["busybox", "hostname"], capture_output=True, text=True).stdout
    (state / "copy-lock").symlink_to(hostname.strip())
    finished = _run_copy(new_root, "/pkgs", volume)
    assert finished.returncode == 0, finished.stderr
    assert (
        "stopped while switching" in finished.stderr and "taking over its lock" in finished.stderr
    )
    assert _files(volume) == _expected(new_tree)  # the whole set, nothing stray
    assert sorted(p.name for p in state.iterdir()) == ["installed"]


def test_the_copier_changes_nothing_when_a_file_is_missing_or_another_pod_copies(
    copier_host: Path,
) -> None:
    """A file of the set missing from the image, offset by a file the runtime added in the same
    folder, is found by the per-entry count; the live set stays as it was. A lock another
    pod holds means a shared volume: refused."""
    old_root, new_root = copier_host / "old", copier_host / "new"
    volume = copier_host / "volume"
    volume.mkdir()
    _copy_image_root(old_root, "a" * 64, _TREE, "/pkgs")
    assert _run_copy(old_root, "/pkgs", volume).returncode == 0
    before = _files(volume)
    _copy_image_root(new_root, "b" * 64, {**_TREE, "top.py": b"TOP = 2\n"}, "/pkgs")
    (new_root / "alpha" / "sub" / "deep.py").unlink()
    (new_root / "etc" / "runtime.conf").write_text("not the tree's\n")
    failed = _run_copy(new_root, "/pkgs", volume)
    assert failed.returncode == 1
    assert "copied 2 files of /alpha where the image's list says 3" in failed.stderr
    assert _files(volume) == before
    assert (volume / ".gpubuild" / "installed").read_text().startswith("a" * 64)

    (volume / ".gpubuild" / "copy-lock").symlink_to("another-pod-7f9c")
    refused = _run_copy(old_root, "/pkgs", volume)
    assert refused.returncode == 1 and "pod another-pod-7f9c is copying" in refused.stderr
    assert _files(volume) == before


# --- k8s patch: from one delivery to another ----------------------------------------------------


def _unit_manifest() -> Manifest:
    shard = Shard("b" * 64, 10, "c" * 64, 20, 2, ("alpha",))
    return Manifest("d" * 64, "unit", "3.11", "x86_64-manylinux_2_28", "/shared-packages",
                    (shard,), {}, ())  # fmt: skip


def _pod(text: str) -> dict[str, Any]:
    document = next(iter(YAML(typ="safe").load_all(text)))
    groups = document["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod: dict[str, Any] = next(g for g in groups if g["groupName"] == GROUP)["template"]["spec"]
    return pod


def test_leaving_image_volume_delivery_replaces_the_image_volume_and_its_read_only_mount() -> None:
    from builder.k8s import pod_snippet
    from builder.k8s_patch import patch_text

    manifest = _unit_manifest()
    heavy = "registry.example.com/gpubuild/x@sha256:" + "1" * 64
    copy = "registry.example.com/gpubuild/x@sha256:" + "2" * 64
    as_volume, _ = patch_text(GUIDE.read_text(), GROUP,
                              pod_snippet(manifest, image=heavy, delivery="image-volume"))  # fmt: skip
    for delivery, image in (("init-copy", copy), ("blob", None)):
        text, warnings = patch_text(as_volume, GROUP,
                                    pod_snippet(manifest, image=image, delivery=delivery))  # fmt: skip
        pod = _pod(text)
        volume = next(v for v in pod["volumes"] if v["name"] == "python-packages")
        assert "image" not in volume and "emptyDir" in volume, delivery
        mount = next(m for m in pod["containers"][0]["volumeMounts"]
                     if m["mountPath"] == "/shared-packages")  # fmt: skip
        assert "readOnly" not in mount, delivery
        assert [c["name"] for c in pod["initContainers"]][:1] == ["install-heavy-deps"]
        assert warnings == ()


def test_init_copy_refuses_a_persistent_volume_at_the_install_folder() -> None:
    from builder.errors import BadInputError
    from builder.k8s import pod_snippet
    from builder.k8s_patch import patch_text

    text = GUIDE.read_text()
    volume = "- name: python-packages\n                emptyDir:\n                  sizeLimit: 10Gi"
    assert volume in text
    pod_text = text.replace(
        volume,
        "- name: python-packages\n                persistentVolumeClaim:\n"
        "                  claimName: packages",
    )
    copy = "registry.example.com/gpubuild/x@sha256:" + "2" * 64
    with pytest.raises(BadInputError, match="persistent volume is not supported"):
        patch_text(pod_text, GROUP, pod_snippet(_unit_manifest(), image=copy, delivery="init-copy"))
