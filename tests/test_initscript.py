"""The init script, tested by running it: on this machine against a file:// store and Azurite,
and inside the image Dockerfile.init builds. Every fault must leave the target as it was (or
empty), exit non-zero and say what happened; the SAS must never be printed."""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import io
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote

import pytest
import zstandard

from builder.errors import BadInputError
from builder.fields import SHA256
from builder.initscript import leaf_directories, render_init_script
from builder.lock import Excluded, Lock, LockedPackage, read_lock, render_lock
from builder.manifest import Manifest, Shard, blob_key, manifest_to_bytes
from builder.pack import write_artifact
from builder.profile import load_profile
from builder.stores import open_store
from builder.stores.sas import make_read_sas
from builder.tools import run_uv
from tests.helpers import REPO, run_cli, write_profile
from tests.support.faults import Cut, ScriptedStore, Serve, Slow, Stall, Status, blob_path
from tests.support.filesystems import tmpfs
from tests.support.processes import kill_tree
from tests.support.services import free_port, nginx_serving, require_program
from tests.support.users import NONROOT_UID, as_nonroot, give_to_nonroot, is_root, nonroot_folder
from tests.support.wheels import build_wheel

PROFILE = "itest"
INSTALL_DIR = "/shared-packages"
BIG_BYTES = 12 * 1024 * 1024
STATE = ".gpubuild"


# --- building artifacts ------------------------------------------------------------------


def _alpha_files(version: str, modules: int) -> dict[str, bytes]:
    files = {f"alpha/m{i}.py": f"X = {i}\n".encode() for i in range(modules)}
    files["alpha/__init__.py"] = f"VERSION = {version!r}\n".encode()
    files["alpha/sub/deep/leaf.py"] = b"LEAF = True\n"
    files["alpha/data/table.txt"] = b"a b c\n" * 100
    return files


def build_wheels(dest: Path) -> dict[str, Path]:
    big = {
        "bigpkg/__init__.py": b"SIZE = 1\n",
        # Random bytes do not compress: a shard of its own, big enough to kill mid-download.
        "bigpkg/blob.bin": random.Random(1234).randbytes(BIG_BYTES),
    }
    return {
        "alpha1": build_wheel(dest, "alpha", "1.0", files=_alpha_files("1.0", 40)),
        "alpha2": build_wheel(dest, "alpha", "2.0", files=_alpha_files("2.0", 12)),
        "beta": build_wheel(dest, "beta", "1.0"),
        "bigpkg": build_wheel(dest, "bigpkg", "1.0", files=big),
    }


@dataclass(frozen=True)
class Artifact:
    manifest: Manifest
    tree: Path
    alpha_version: str


@dataclass(frozen=True)
class Artifacts:
    store: Path
    a: Artifact
    b: Artifact
    wheels: dict[str, Path]


def make_artifact(work: Path, store: Path, wheels: list[Path], seed: str, alpha: str) -> Artifact:
    tree = work / f"tree-{seed}"
    result = run_uv(
        ["pip", "install", "--target", str(tree), "--no-deps", "--no-index", *map(str, wheels)]
    )
    assert result.returncode == 0, result.stderr
    manifest = write_artifact(
        tree,
        store,
        profile=PROFILE,
        digest=hashlib.sha256(seed.encode()).hexdigest(),
        python="3.11",
        platform="x86_64-manylinux_2_28",
        install_dir=INSTALL_DIR,
        shard_threshold=1 << 20,
    )
    return Artifact(manifest, tree, alpha)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    return build_artifacts(tmp_path_factory.mktemp("artifacts"))


def build_artifacts(work: Path) -> Artifacts:
    """Two sets, A and B, that share the big package's shard, in one file store."""
    wheels = build_wheels(work / "wheels")
    store = work / "store"
    a = make_artifact(work, store, [wheels["alpha1"], wheels["beta"], wheels["bigpkg"]], "A", "1.0")
    b = make_artifact(work, store, [wheels["alpha2"], wheels["beta"], wheels["bigpkg"]], "B", "2.0")
    # The big package's shard is the same bytes in both: one blob.
    assert {s.sha256 for s in a.manifest.shards} & {s.sha256 for s in b.manifest.shards}
    return Artifacts(store, a, b, wheels)


@dataclass(frozen=True)
class AzuriteContainer:
    base_url: str
    sas: str
    account: str
    container: str


@pytest.fixture(scope="module")
def azure_store(azurite_endpoint: object, artifacts: Artifacts) -> AzuriteContainer:
    """Both artifacts uploaded to a fresh Azurite container with the store's own code."""
    container = f"initscript-{uuid.uuid4().hex[:12]}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_endpoint.connection_string)  # type: ignore[attr-defined]
        store = open_store(f"{azurite_endpoint.blob_url}/{container}")  # type: ignore[attr-defined]
        for artifact in (artifacts.a, artifacts.b):
            for shard in artifact.manifest.shards:
                store.put_blob(shard.sha256, artifacts.store / blob_key(shard.sha256))
            store.put_manifest(
                PROFILE, artifact.manifest.digest, manifest_to_bytes(artifact.manifest)
            )
        sas = make_read_sas(store, expiry=datetime.now(timezone.utc) + timedelta(hours=2))
    return AzuriteContainer(store.base_url, sas, azurite_endpoint.account, container)  # type: ignore[attr-defined]


@pytest.fixture
def b3sum() -> str:
    """b3sum, which checks the shards where the manifest pins BLAKE3 (the init image has it)."""
    return require_program("b3sum", "Debian package b3sum")


def write_script(folder: Path, manifest: Manifest, store_url: str, **kwargs: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"init-{manifest.digest[:8]}-{uuid.uuid4().hex[:6]}.sh"
    path.write_text(render_init_script(manifest, store_url, **kwargs))  # type: ignore[arg-type]
    path.chmod(0o755)
    return path


# --- running it and looking at the result -------------------------------------------------


def script_env(target: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "GPUBUILD_TARGET": str(target),
        "GPUBUILD_RETRIES": "2",
        "LANG": "C.UTF-8",
    }
    env.update(extra or {})
    return env


def run_init(
    script: Path, target: Path, extra: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script)],
        env=script_env(target, extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tree_state(root: Path) -> dict[str, tuple[str, str]]:
    """Every entry below root (the state folder left out): kind and content digest."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if relative == STATE or relative.startswith(STATE + "/"):
            continue
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            found[relative] = ("link", os.readlink(path))
        elif stat.S_ISDIR(mode):
            found[relative] = ("dir", "")
        else:
            found[relative] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def installed_marker(target: Path) -> str:
    marker = target / STATE / "installed"
    return marker.read_text().split()[0] if marker.exists() else ""


def assert_installed(target: Path, artifact: Artifact, *, clean: bool = True) -> None:
    """The live set is `artifact`, complete; `clean`: and nothing is left in staging."""
    assert installed_marker(target) == artifact.manifest.digest
    assert not (target / STATE / "incomplete").exists()
    assert tree_state(target) == tree_state(artifact.tree)
    if clean:
        assert not list((target / STATE).glob("staging-*"))
    probe = subprocess.run(
        [
            sys.executable,
            "-s",
            "-B",  # no __pycache__: the tree must stay exactly the installed set
            "-c",
            "import alpha, beta, bigpkg, alpha.sub.deep.leaf; print(alpha.VERSION)",
        ],
        env={"PYTHONPATH": str(target), "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == artifact.alpha_version


def assert_empty(target: Path) -> None:
    """Nothing installed: no live entries, no staging left behind."""
    assert tree_state(target) == {}
    assert installed_marker(target) == ""
    assert not list((target / STATE).glob("staging-*")) if (target / STATE).exists() else True


def signature(sas: str) -> str:
    return parse_qs(sas)["sig"][0]


def assert_no_secret(sas: str, *texts: str) -> None:
    sig = signature(sas)
    for text in texts:
        assert sig not in text
        assert unquote(sig) not in text
        assert sas not in text


# --- a store server that misbehaves on purpose --------------------------------------------


def big_shard(manifest: Manifest) -> str:
    return max(manifest.shards, key=lambda s: s.bytes).sha256


def shellcheck() -> str:
    """Debian's shellcheck, or an error that says where it comes from (like every program the
    tests need), instead of a bare FileNotFoundError."""
    return require_program("shellcheck", "the Debian package shellcheck")


# --- rendering ----------------------------------------------------------------------------


def test_render_pins_everything_and_is_shellcheck_clean(
    artifacts: Artifacts, tmp_path: Path
) -> None:
    manifest = artifacts.a.manifest
    text = render_init_script(manifest, artifacts.store.as_uri())
    assert text == render_init_script(manifest, artifacts.store.as_uri())
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert f"readonly DIGEST={manifest.digest}" in text
    for shard in manifest.shards:
        assert f"{shard.sha256} {shard.bytes} {shard.files} " in text
    for leaf in leaf_directories(manifest.directories):
        assert f"\n{leaf}\n" in text
    script = tmp_path / "init.sh"
    script.write_text(text)
    checked = subprocess.run(
        [shellcheck(), "--severity=style", str(script)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with_fallback = tmp_path / "fallback.sh"
    with_fallback.write_text(
        render_init_script(manifest, artifacts.store.as_uri(), fallback_lock=_lock_text(artifacts))
    )
    checked = subprocess.run([shellcheck(), str(with_fallback)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_leaf_directories_make_the_whole_skeleton() -> None:
    folders = ("a", "a/b", "a/b/c", "a/d", "ab", "e")
    assert leaf_directories(folders) == ["a/b/c", "a/d", "ab", "e"]
    with pytest.raises(Exception, match="unsafe"):
        leaf_directories(("../escape",))
    with pytest.raises(Exception, match="unsafe"):
        leaf_directories((".gpubuild/x",))


def test_a_store_url_with_a_secret_is_refused(artifacts: Artifacts) -> None:
    url = "https://acct.blob.core.windows.net/c/p?sv=2024&sig=c2VjcmV0"
    with pytest.raises(BadInputError) as caught:
        render_init_script(artifacts.a.manifest, url)
    assert "sig=" not in str(caught.value)
    assert "GPUBUILD_SAS" in str(caught.value)


# --- installing ---------------------------------------------------------------------------


def test_installs_from_a_file_store_and_a_second_run_touches_nothing(
    artifacts: Artifacts, tmp_path: Path
) -> None:
    target = tmp_path / "shared-packages"
    target.mkdir()
    script = write_script(tmp_path, artifacts.a.manifest, artifacts.store.as_uri())
    first = run_init(script, target)
    assert first.returncode == 0, first.stderr
    assert_installed(target, artifacts.a)
    count = len(artifacts.a.manifest.shards)
    assert f"shard {count}/{count} done" in first.stderr
    assert "MB/s" in first.stderr and "done: " in first.stderr

    before = {p: p.lstat().st_mtime_ns for p in target.rglob("*") if p.name != "lock"}
    second = run_init(script, target)
    assert second.returncode == 0, second.stderr
    assert "already installed" in second.stderr
    after = {p: p.lstat().st_mtime_ns for p in target.rglob("*") if p.name != "lock"}
    assert after == before


def _path_without(tmp_path: Path, *programs: str) -> str:
    """A PATH with every program of this one but `programs` (as in an image that lacks them)."""
    folder = tmp_path / f"bin-without-{'-'.join(programs)}"
    folder.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            link = folder / entry.name
            if entry.name not in programs and not link.exists() and os.access(entry.path, os.X_OK):
                link.symlink_to(entry.path)
    return str(folder)


def test_without_b3sum_and_openssl_sha256sum_checks_the_same_digests(
    artifacts: Artifacts, tmp_path: Path
) -> None:
    """Without b3sum the script checks the sha256: with OpenSSL when it can (faster), with
    sha256sum otherwise."""
    path = _path_without(tmp_path, "openssl", "b3sum")
    result = _installs_then_refuses_a_tampered_shard(artifacts, tmp_path, {"PATH": path})
    assert "checking sha256 (sha256sum)" in result.stderr


def _installs_then_refuses_a_tampered_shard(
    artifacts: Artifacts, tmp_path: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Set a installs under `env`; then set b, one shard's bytes flipped, is refused by its
    sha256 and a stays. Returns the install's result."""
    target = tmp_path / "vol"
    target.mkdir()
    script = write_script(tmp_path, artifacts.a.manifest, artifacts.store.as_uri())
    result = run_init(script, target, env)
    assert result.returncode == 0, result.stderr
    assert_installed(target, artifacts.a)
    tampered = _tampered_store(artifacts, tmp_path, artifacts.b.manifest)
    refused = run_init(write_script(tmp_path, artifacts.b.manifest, tampered.as_uri()), target, env)
    assert refused.returncode == 1 and "sha256 mismatch" in refused.stderr
    assert_installed(target, artifacts.a)
    return result


def test_b3sum_checks_the_blake3_pin_and_sha256_the_rest(
    artifacts: Artifacts, tmp_path: Path, b3sum: str
) -> None:
    """With b3sum the BLAKE3 pin is what is checked: a wrong one refuses the genuine bytes.
    Without b3sum, or for a manifest packed before BLAKE3 was recorded, the sha256 is."""
    manifest = artifacts.a.manifest
    assert all(SHA256.match(shard.blake3) for shard in manifest.shards)
    url = artifacts.store.as_uri()
    target = tmp_path / "vol-default"
    target.mkdir()
    result = run_init(write_script(tmp_path, manifest, url), target)
    assert result.returncode == 0, result.stderr
    assert "checking BLAKE3 (b3sum)" in result.stderr

    victim = min(manifest.shards, key=lambda s: s.bytes)
    wrong = tuple(
        dataclasses.replace(s, blake3="0" * 64) if s == victim else s for s in manifest.shards
    )
    wrong_pin = write_script(tmp_path, dataclasses.replace(manifest, shards=wrong), url)
    target = tmp_path / "vol-wrong-pin"
    target.mkdir()
    refused = run_init(wrong_pin, target)
    assert refused.returncode == 1
    assert f"BLAKE3 mismatch: got {victim.blake3}" in refused.stderr
    assert tree_state(target) == {}
    without_b3sum = {"PATH": _path_without(tmp_path, "b3sum")}
    installed = run_init(wrong_pin, target, without_b3sum)
    assert installed.returncode == 0, installed.stderr
    assert "checking sha256 (openssl)" in installed.stderr
    assert_installed(target, artifacts.a)

    unpinned = tuple(dataclasses.replace(s, blake3="") for s in artifacts.b.manifest.shards)
    older = dataclasses.replace(artifacts.b.manifest, shards=unpinned)
    tampered = _tampered_store(artifacts, tmp_path, older)
    result = run_init(write_script(tmp_path, older, tampered.as_uri()), target)
    assert result.returncode == 1
    assert "the manifest pins no BLAKE3" in result.stderr
    assert "sha256 mismatch" in result.stderr
    assert_installed(target, artifacts.a)


def test_a_manifest_pinning_blake3_for_some_shards_checks_each_by_its_own_pin(
    artifacts: Artifacts, tmp_path: Path, b3sum: str
) -> None:
    manifest = artifacts.a.manifest
    victim = min(manifest.shards, key=lambda s: s.bytes)
    mixed = tuple(dataclasses.replace(s, blake3="") if s == victim else s for s in manifest.shards)
    target = tmp_path / "vol"
    target.mkdir()
    result = run_init(
        write_script(
            tmp_path, dataclasses.replace(manifest, shards=mixed), artifacts.store.as_uri()
        ),
        target,
    )
    assert result.returncode == 0, result.stderr
    count = len(manifest.shards)
    assert f"BLAKE3 (b3sum) for {count - 1} of {count} shards, sha256 (openssl)" in result.stderr
    assert_installed(target, artifacts.a)


def _fake_b3sum(folder: Path, real: str, body: str) -> str:
    """A PATH whose b3sum runs `body` (bash) with the real one at $REAL."""
    folder.mkdir()
    fake = folder / "b3sum"
    fake.write_text(f"#!/bin/bash\nREAL={real}\n{body}\n")
    fake.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_a_b3sum_that_cannot_hash_files_falls_back_to_sha256_not_to_a_false_alarm(
    artifacts: Artifacts, tmp_path: Path, b3sum: str
) -> None:
    """A b3sum that passes the probe (a pipe) but fails on every file, as under a sandbox that
    refuses its memory map: each shard is checked by its sha256 instead, still refusing bad
    bytes. One that fails the probe is not used at all."""
    # The last argument is the file; the probe gives none.
    on_files = _fake_b3sum(
        tmp_path / "bin-map", b3sum, 'if [[ ${@: -1} == /* ]]; then exit 1; fi; exec $REAL "$@"'
    )
    result = _installs_then_refuses_a_tampered_shard(artifacts, tmp_path, {"PATH": on_files})
    assert "checking BLAKE3 (b3sum)" in result.stderr
    assert "b3sum could not hash the download; checking its sha256 instead" in result.stderr

    broken = _fake_b3sum(tmp_path / "bin-broken", b3sum, "echo 0000; exit 0")
    other = tmp_path / "vol-broken"
    other.mkdir()
    script = write_script(tmp_path, artifacts.a.manifest, artifacts.store.as_uri())
    result = run_init(script, other, {"PATH": broken})
    assert result.returncode == 0, result.stderr
    assert "checking sha256 (openssl)" in result.stderr and "b3sum could not" not in result.stderr
    assert_installed(other, artifacts.a)


def _shard_of(members: list[tarfile.TarInfo], store: Path) -> Shard:
    """A shard made by hand (pack never writes symlinks; an attacker might)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            data = b"pwned\n" if member.isfile() else None
            if data is not None:
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    compressed = zstandard.ZstdCompressor().compress(raw.getvalue())
    sha = hashlib.sha256(compressed).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / blob_key(sha)).write_bytes(compressed)
    return Shard(
        sha256=sha,
        bytes=len(compressed),
        tar_sha256=hashlib.sha256(raw.getvalue()).hexdigest(),
        raw_bytes=len(raw.getvalue()),
        files=len(members),
        packages=("evil",),
    )


def test_without_bsdtar_zstd_and_gnu_tar_unpack_the_same_tree(
    artifacts: Artifacts, tmp_path: Path
) -> None:
    """bsdtar (in-process zstd) when the image has it, zstd | GNU tar otherwise: same set."""
    script = write_script(tmp_path, artifacts.a.manifest, artifacts.store.as_uri())
    trees = {}
    for extractor, env in (
        ("bsdtar", {}),
        ("zstd | GNU tar", {"PATH": _path_without(tmp_path, "bsdtar")}),
    ):
        target = tmp_path / f"vol-{extractor.split()[0]}"
        target.mkdir()
        result = run_init(script, target, env)
        assert result.returncode == 0, result.stderr
        assert f"unpacking with {extractor}" in result.stderr
        assert_installed(target, artifacts.a)
        trees[extractor] = tree_state(target)
    assert trees["bsdtar"] == trees["zstd | GNU tar"]


@pytest.mark.parametrize("extractor", ["bsdtar", "gnu"])
def test_a_symlink_in_one_shard_cannot_carry_another_out_of_staging(
    artifacts: Artifacts, tmp_path: Path, extractor: str
) -> None:
    """Shards extract in parallel into one tree: a link from one must not lead another out,
    with either extractor."""
    env = {} if extractor == "bsdtar" else {"PATH": _path_without(tmp_path, "bsdtar")}
    target = tmp_path / "vol"
    target.mkdir()
    url = artifacts.store.as_uri()
    assert run_init(write_script(tmp_path, artifacts.a.manifest, url), target, env).returncode == 0
    before = tree_state(target)

    store = tmp_path / "evil-store"
    links = []
    for name, to in (("up", "../.."), ("abs", str(target))):
        link = tarfile.TarInfo(name)
        link.type, link.linkname = tarfile.SYMTYPE, to
        links.append(link)
    through = [tarfile.TarInfo("up/PWNED"), tarfile.TarInfo("abs/PWNED")]
    shards = (_shard_of(links, store), _shard_of(through, store))
    evil = dataclasses.replace(artifacts.a.manifest, digest="e" * 64, shards=shards, directories=())
    # The links come first, then the files through them, one at a time so the order holds.
    result = run_init(
        write_script(tmp_path, evil, store.as_uri()), target, {"GPUBUILD_PARALLEL": "1", **env}
    )
    assert not (target / "PWNED").exists() and not (target / STATE / "PWNED").exists()
    assert not list(tmp_path.glob("**/PWNED")) or all(
        STATE + "/staging-" in str(p) or "/__/" in str(p) for p in tmp_path.glob("**/PWNED")
    )
    if result.returncode == 0:  # the links were defused; what got installed stayed inside
        assert all(not os.path.isabs(os.readlink(target / n)) for n in ("up", "abs"))
    else:
        assert tree_state(target) == before


def test_upgrade_replaces_the_set(artifacts: Artifacts, tmp_path: Path) -> None:
    target = tmp_path / "vol"
    target.mkdir()
    url = artifacts.store.as_uri()
    assert run_init(write_script(tmp_path, artifacts.a.manifest, url), target).returncode == 0
    upgrade = run_init(write_script(tmp_path, artifacts.b.manifest, url), target)
    assert upgrade.returncode == 0, upgrade.stderr
    assert_installed(target, artifacts.b)
    assert not (target / "alpha" / "m30.py").exists()  # only in alpha 1.0


def test_installs_from_azurite_with_a_read_only_sas(
    artifacts: Artifacts, azure_store: AzuriteContainer, tmp_path: Path
) -> None:
    target = tmp_path / "vol"
    target.mkdir()
    script = write_script(tmp_path, artifacts.a.manifest, azure_store.base_url)
    sas_file = tmp_path / "sas"
    sas_file.write_text(azure_store.sas + "\n")
    result = run_init(
        script, target, {"GPUBUILD_SAS_FILE": str(sas_file), "GPUBUILD_PARALLEL": "3"}
    )
    assert result.returncode == 0, result.stderr
    assert_installed(target, artifacts.a)
    assert "GPUBUILD_SAS_FILE" in result.stderr
    assert_no_secret(azure_store.sas, result.stdout, result.stderr, script.read_text())

    # The SAS pasted into the store URL works too, and the URL is printed without it.
    other = tmp_path / "vol2"
    other.mkdir()
    result = run_init(
        script, other, {"GPUBUILD_STORE_URL": f"{azure_store.base_url}?{azure_store.sas}"}
    )
    assert result.returncode == 0, result.stderr
    assert_installed(other, artifacts.a)
    assert azure_store.base_url in result.stderr
    assert_no_secret(azure_store.sas, result.stdout, result.stderr)


def test_an_expired_sas_fails_clearly_without_printing_it(
    artifacts: Artifacts, azure_store: AzuriteContainer, tmp_path: Path
) -> None:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    from tests.support.services import AZURITE_KEY

    now = datetime.now(timezone.utc)
    expired = generate_container_sas(
        azure_store.account,
        azure_store.container,
        account_key=AZURITE_KEY,
        permission=ContainerSasPermissions(read=True),
        start=now - timedelta(hours=2),
        expiry=now - timedelta(hours=1),
    )
    target = tmp_path / "vol"
    target.mkdir()
    script = write_script(tmp_path, artifacts.a.manifest, azure_store.base_url)
    result = run_init(script, target, {"GPUBUILD_SAS": expired})
    assert result.returncode == 1
    assert "HTTP 403" in result.stderr and "expired" in result.stderr
    assert "nothing was changed" in result.stderr
    assert_no_secret(expired, result.stdout, result.stderr)
    assert_empty(target)


# --- faults -------------------------------------------------------------------------------


def _tampered_store(artifacts: Artifacts, tmp_path: Path, manifest: Manifest) -> Path:
    store = tmp_path / "tampered"
    shutil.copytree(artifacts.store, store)
    shard = min(manifest.shards, key=lambda s: s.bytes)
    blob = store / blob_key(shard.sha256)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    return store


def _lock_text(artifacts: Artifacts) -> str:
    packages = []
    for key in ("alpha1", "beta", "bigpkg"):
        wheel = artifacts.wheels[key]
        name, version = wheel.name.split("-")[:2]
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        packages.append(LockedPackage(name, version, (f"sha256:{digest}",)))
    lock = Lock(
        profile=PROFILE,
        python="3.11",
        platform="x86_64-manylinux_2_28",
        inputs="test",
        backend="uv",
        packages=tuple(packages),
        interpreter="/usr/bin/python3",
        install_dir=INSTALL_DIR,
        excluded=(Excluded("click", "8.1.7", ("alpha",)),),
    )
    return render_lock(lock, INSTALL_DIR)


def test_a_tampered_shard_is_refused_and_never_falls_back(
    artifacts: Artifacts, tmp_path: Path, b3sum: str
) -> None:
    target = tmp_path / "vol"
    target.mkdir()
    assert (
        run_init(
            write_script(tmp_path, artifacts.a.manifest, artifacts.store.as_uri()), target
        ).returncode
        == 0
    )
    store = _tampered_store(artifacts, tmp_path, artifacts.b.manifest)
    script = write_script(
        tmp_path, artifacts.b.manifest, store.as_uri(), fallback_lock=_lock_text(artifacts)
    )
    result = run_init(script, target)
    assert result.returncode == 1
    assert "BLAKE3 mismatch" in result.stderr
    assert "do not trust it" in result.stderr
    assert "falling back" not in result.stderr
    assert_installed(target, artifacts.a)


def hostile_blob(files: dict[str, bytes], folders: dict[str, int] | None = None) -> bytes:
    """A .tar.zst that is not what the manifest pins: what a lying store or a man in the middle
    of an http:// store serves. `folders` name -> mode adds folder entries."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, mode in (folders or {}).items():
            folder = tarfile.TarInfo(name)
            folder.type, folder.mode = tarfile.DIRTYPE, mode
            tar.addfile(folder)
        for name, data in files.items():
            member = tarfile.TarInfo(name)
            member.size, member.mode = len(data), 0o644
            tar.addfile(member, io.BytesIO(data))
    return zstandard.ZstdCompressor().compress(raw.getvalue())


def _victim(manifest: Manifest) -> Shard:
    """A small shard that does not hold bigpkg: its hostile copy overwrites bigpkg's files."""
    return min((s for s in manifest.shards if "bigpkg" not in s.packages), key=lambda s: s.bytes)


def test_a_shard_served_hostile_once_leaves_no_trace(
    artifacts: Artifacts, tmp_path: Path, b3sum: str
) -> None:
    """The store lies once: the bytes it sent must not survive the retry that gets good ones.

    The hostile copy overwrites a file of another shard (so the set's file count stays right)
    and arrives after that shard is unpacked; default parallelism."""
    manifest = artifacts.a.manifest
    victim = _victim(manifest)
    hostile = hostile_blob({"bigpkg/__init__.py": b"PWNED = True\n"})
    target = tmp_path / "vol"
    target.mkdir()
    with ScriptedStore(artifacts.store) as server:
        server.script(blob_path(victim.sha256), Serve(body=hostile, delay=2.0))
        result = run_init(write_script(tmp_path, manifest, server.url), target)
        served = server.served(blob_path(victim.sha256))
    assert result.returncode == 0, result.stderr
    assert "BLAKE3 mismatch" in result.stderr and "trying again" in result.stderr
    assert len(served) == 2
    assert_installed(target, artifacts.a)
    assert b"PWNED" not in (target / "bigpkg" / "__init__.py").read_bytes()
    assert not list(target.rglob("*PWNED*"))


def test_a_non_root_run_is_never_wedged_by_what_it_created(
    artifacts: Artifacts, tmp_path: Path
) -> None:
    """As a normal user: a hostile shard with a mode-0000 folder, and a killed run's staging
    folder holding one, must neither stop this run nor any later one."""
    manifest = artifacts.a.manifest
    victim = _victim(manifest)
    hostile = hostile_blob({"locked/x.py": b"X = 1\n"}, {"locked": 0o000})
    with nonroot_folder() as home:
        target = home / "vol"
        target.mkdir()
        script = home / "init.sh"
        script.write_text(render_init_script(manifest, "http://127.0.0.1:1"))
        # A killed run of another digest left this behind (its folders made unwritable).
        leftover = target / STATE / f"staging-{'f' * 64}" / "locked"
        leftover.mkdir(parents=True)
        (leftover / "x.py").write_text("X = 1\n")
        give_to_nonroot(home)
        leftover.chmod(0o000)
        with ScriptedStore(artifacts.store) as server:
            server.script(blob_path(victim.sha256), Serve(body=hostile))
            result = subprocess.run(
                as_nonroot(["bash", str(script)]),
                env=script_env(target, {"GPUBUILD_STORE_URL": server.url, "HOME": str(home)}),
                capture_output=True,
                text=True,
                timeout=180,
            )
        assert result.returncode == 0, result.stderr
        assert "Permission denied" not in result.stderr
        assert_installed(target, artifacts.a)
        assert not (target / STATE / f"staging-{'f' * 64}").exists()
        assert target.stat().st_uid == (NONROOT_UID if is_root() else os.geteuid())


@pytest.mark.skipif(not is_root(), reason="needs root to make a file another user cannot read")
def test_a_blob_the_user_cannot_read_is_told_apart_from_a_missing_one(
    artifacts: Artifacts, tmp_path: Path
) -> None:
    manifest = artifacts.a.manifest
    with nonroot_folder() as home:
        store = home / "store"
        shutil.copytree(artifacts.store, store)
        for blob in (store / "blobs").iterdir():
            blob.chmod(0o644)
        give_to_nonroot(home)
        shard = _victim(manifest)
        blob = store / blob_key(shard.sha256)
        os.chown(blob, 0, 0)
        blob.chmod(0o600)
        script = home / "init.sh"
        script.write_text(render_init_script(manifest, store.as_uri()))
        target = home / "vol"
        target.mkdir()
        give_to_nonroot(target)

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                as_nonroot(["bash", str(script)]),
                env=script_env(target, {"HOME": str(home)}),
                capture_output=True,
                text=True,
                timeout=180,
            )

        unreadable = run()
        assert unreadable.returncode == 1
        assert "may not read it" in unreadable.stderr and "unreadable" in unreadable.stderr
        assert "SAS" not in unreadable.stderr.split("ERROR:", 1)[1]
        blob.unlink()
        missing = run()
        assert missing.returncode == 1
        assert "missing" in missing.stderr and "publish" in missing.stderr
        assert "SAS" not in missing.stderr.split("ERROR:", 1)[1]


def test_a_store_behind_a_web_server_run_by_a_normal_user(
    artifacts: Artifacts, tmp_path: Path
) -> None:
    """Blobs as pack writes them can be served by a stock web server (workers not root); one
    it may not read is reported as forbidden, without blaming a SAS that nobody gave."""
    manifest = artifacts.a.manifest
    with nonroot_folder() as home:
        store = home / "store"
        write_artifact(
            artifacts.a.tree,
            store,
            profile=PROFILE,
            digest=manifest.digest,
            python="3.11",
            platform="x86_64-manylinux_2_28",
            install_dir=INSTALL_DIR,
            shard_threshold=1 << 20,
        )
        for folder in [store, *store.rglob("*")]:
            if folder.is_dir():
                folder.chmod(0o755)
        with nginx_serving(store, tmp_path / "nginx") as url:
            target = tmp_path / "vol"
            target.mkdir()
            served = run_init(write_script(tmp_path, manifest, url), target)
            assert served.returncode == 0, served.stderr
            assert_installed(target, artifacts.a)

            (store / blob_key(_victim(manifest).sha256)).chmod(0o600)
            other = tmp_path / "vol2"
            other.mkdir()
            refused = run_init(write_script(tmp_path, manifest, url), other)
        assert refused.returncode == 1
        error = refused.stderr.split("ERROR:", 1)[1]
        assert "HTTP 403, forbidden" in error and "no SAS was given" in error
        assert "expired" not in error
        assert_empty(other)


@pytest.mark.parametrize(
    "url",
    [
        "HTTPS://alice:S3cretPassw0rd@example.invalid/store",
        "https://alice:S3cret/Passw0rd@127.0.0.1:9/store",
        "https://alice:S3c@retPassw0rd@example.invalid/store",
        "https://[::1]:9/store#sig=S3cretPassw0rd",
    ],
)
def test_a_store_url_with_credentials_is_refused_without_printing_them(
    artifacts: Artifacts, tmp_path: Path, url: str
) -> None:
    target = tmp_path / "vol"
    target.mkdir()
    script = write_script(tmp_path, artifacts.a.manifest, artifacts.store.as_uri())
    result = run_init(script, target, {"GPUBUILD_STORE_URL": url})
    assert result.returncode == 1
    assert "GPUBUILD_STORE_URL" in result.stderr
    for fragment in ("S3cret", "Passw0rd", "retPass"):
        assert fragment not in result.stderr
    assert_empty(target)


@pytest.mark.parametrize("value", ["//", "/", "/usr/", "/shared/../..", "relative", "/proc/1"])
def test_a_target_that_is_not_a_folder_of_its_own_is_refused(
    artifacts: Artifacts, tmp_path: Path, value: str
) -> None:
    script = write_script(tmp_path, artifacts.a.manifest, artifacts.store.as_uri())
    result = run_init(script, tmp_path / "unused", {"GPUBUILD_TARGET": value})
    assert result.returncode == 1
    assert "GPUBUILD_TARGET" in result.stderr
    assert not Path("/.gpubuild").exists()


def test_a_missing_shard_fails_and_leaves_nothing(artifacts: Artifacts, tmp_path: Path) -> None:
    store = tmp_path / "partial"
    shutil.copytree(artifacts.store, store)
    gone = min(artifacts.a.manifest.shards, key=lambda s: s.bytes).sha256
    (store / blob_key(gone)).unlink()
    target = tmp_path / "vol"
    target.mkdir()
    result = run_init(write_script(tmp_path, artifacts.a.manifest, store.as_uri()), target)
    assert result.returncode == 1
    assert f"has no blobs/{gone}.tar.zst" in result.stderr
    assert "publish" in result.stderr
    assert_empty(target)


def test_a_stream_cut_once_is_retried(artifacts: Artifacts, tmp_path: Path) -> None:
    manifest = artifacts.a.manifest
    with ScriptedStore(artifacts.store) as server:
        server.script(blob_path(big_shard(manifest)), Cut(0.5))
        target = tmp_path / "vol"
        target.mkdir()
        result = run_init(write_script(tmp_path, manifest, server.url), target)
    assert result.returncode == 0, result.stderr
    assert "attempt 1 of 2 failed" in result.stderr and "trying again" in result.stderr
    assert_installed(target, artifacts.a)


def test_a_cut_download_resumes_instead_of_starting_again(
    artifacts: Artifacts, tmp_path: Path
) -> None:
    manifest = artifacts.a.manifest
    big = max(manifest.shards, key=lambda s: s.bytes)
    with ScriptedStore(artifacts.store) as server:
        server.script(blob_path(big.sha256), Cut(0.9))
        target = tmp_path / "vol"
        target.mkdir()
        result = run_init(write_script(tmp_path, manifest, server.url), target)
        served = server.served(blob_path(big.sha256))
    assert result.returncode == 0, result.stderr
    assert_installed(target, artifacts.a)
    assert [entry.range_start > 0 for entry in served] == [False, True]
    # The second request asked for the last tenth only: the blob crossed the wire once.
    assert sum(entry.bytes_sent for entry in served) == big.bytes
    assert served[1].bytes_sent < big.bytes // 5


def _request_times(server: ScriptedStore, path: str) -> list[float]:
    return [entry.at for entry in server.served(path)]


def _waits(stderr: str) -> list[float]:
    """The waits the script announced: "trying again in 1.234 s"."""
    return [float(m) for m in re.findall(r"trying again in ([0-9.]+) s", stderr)]


def test_retries_honour_retry_after_in_seconds_and_as_a_date(
    artifacts: Artifacts, tmp_path: Path
) -> None:
    manifest = artifacts.a.manifest
    path = blob_path(big_shard(manifest))
    soon = email.utils.formatdate(time.time() + 8, usegmt=True)
    with ScriptedStore(artifacts.store) as server:
        server.script(path, Status(503, retry_after=2), Status(429, retry_after=soon))
        target = tmp_path / "vol"
        target.mkdir()
        result = run_init(
            write_script(tmp_path, manifest, server.url),
            target,
            {"GPUBUILD_RETRIES": "3", "GPUBUILD_PARALLEL": "1"},
        )
        times = _request_times(server, path)
    assert result.returncode == 0, result.stderr
    assert_installed(target, artifacts.a)
    assert "HTTP 503" in result.stderr and "the store asked for 2 s: Retry-After" in result.stderr
    # Retry-After is a floor: the jitter comes on top (up to 1 s after attempt 1, 2 s after 2).
    # The date was 8 s ahead when the test began; about 5 s of it were left at the second try.
    first, second = _waits(result.stderr)
    assert 2.0 <= first <= 3.0 and 3.0 <= second <= 8.0
    assert times[1] - times[0] >= 2.0 and times[2] - times[0] >= 7.0


def test_a_retry_after_that_is_not_a_time_is_ignored_and_retries_stay_within_the_limit(
    artifacts: Artifacts, tmp_path: Path
) -> None:
    manifest = artifacts.a.manifest
    path = blob_path(big_shard(manifest))
    with ScriptedStore(artifacts.store) as server:
        server.script(path, *[Status(503, retry_after="$(touch /tmp/pwned); soon")] * 5)
        target = tmp_path / "vol"
        target.mkdir()
        result = run_init(
            write_script(tmp_path, manifest, server.url),
            target,
            {"GPUBUILD_RETRIES": "3", "GPUBUILD_PARALLEL": "1"},
        )
        requests = server.served(path)
    assert result.returncode == 1
    assert len(requests) == 3  # GPUBUILD_RETRIES attempts, not one more
    assert "No luck after 3 attempts" in result.stderr
    assert "Retry-After" not in result.stderr  # nothing was honoured
    assert all(wait <= 2.0 for wait in _waits(result.stderr))  # the backoff window alone
    assert_empty(target)


def _sas_with_expiry(expiry: str | None) -> str:
    fields = ["sv=2023-11-03", "sr=c", "sp=r"]
    if expiry is not None:
        fields.append(f"se={expiry}")
    return "&".join([*fields, "sig=c2VjcmV0LXNpZ25hdHVyZS12YWx1ZQ%3D%3D"])


@pytest.mark.parametrize(
    ("expires_in", "expected"),
    [
        (timedelta(days=30, minutes=30), "is valid for 30 days 0 hours"),
        (
            timedelta(days=3, minutes=5),
            "WARNING: the SAS from GPUBUILD_SAS expires in 3 days 0 hours",
        ),
        (timedelta(hours=-2), "WARNING: the SAS from GPUBUILD_SAS expired at"),
        (None, "names no expiry (se=)"),
        ("garbage", "is not a date"),
    ],
)
def test_the_script_says_how_long_its_sas_stays_valid_without_printing_it(
    artifacts: Artifacts, tmp_path: Path, expires_in: timedelta | str | None, expected: str
) -> None:
    if isinstance(expires_in, timedelta):
        moment = datetime.now(timezone.utc) + expires_in
        expiry: str | None = quote(moment.strftime("%Y-%m-%dT%H:%M:%SZ"), safe="")
    else:
        expiry = expires_in
    sas = _sas_with_expiry(expiry)
    manifest = artifacts.a.manifest
    with ScriptedStore(artifacts.store) as server:
        target = tmp_path / "vol"
        target.mkdir()
        result = run_init(
            write_script(tmp_path, manifest, server.url), target, {"GPUBUILD_SAS": sas}
        )
    # This store ignores the SAS: whatever its expiry, the set installs.
    assert result.returncode == 0, result.stderr
    assert expected in result.stderr
    if isinstance(expires_in, timedelta):
        assert moment.strftime("%Y-%m-%dT%H:%M:%SZ") in result.stderr
    assert_no_secret(sas, result.stderr)
    assert "c2VjcmV0" not in result.stderr


@pytest.mark.parametrize("mode", ["close", "stall"])
def test_a_store_that_breaks_mid_stream_fails_cleanly(
    artifacts: Artifacts, tmp_path: Path, mode: str
) -> None:
    target = tmp_path / "vol"
    target.mkdir()
    assert (
        run_init(
            write_script(tmp_path, artifacts.a.manifest, artifacts.store.as_uri()), target
        ).returncode
        == 0
    )
    manifest = artifacts.b.manifest
    with ScriptedStore(artifacts.store) as server:
        server.script(blob_path(big_shard(manifest)), Cut(0.5) if mode == "close" else Stall(0.5))
        result = run_init(
            write_script(tmp_path, manifest, server.url),
            target,
            # curl averages speed over its last ~5 s: a stall shows after about 6 s.
            {"GPUBUILD_STALL_SECONDS": "1", "GPUBUILD_PARALLEL": "1", "GPUBUILD_RETRIES": "1"},
        )
    assert result.returncode == 1
    assert "No luck after 1 attempts" in result.stderr
    assert "nothing was changed" in result.stderr
    assert_installed(target, artifacts.a)


def test_azurite_stopped_in_the_middle_of_a_download(
    artifacts: Artifacts, azure_store: AzuriteContainer, azurite_endpoint: object, tmp_path: Path
) -> None:
    manifest = artifacts.a.manifest
    target = tmp_path / "vol"
    target.mkdir()
    script = write_script(tmp_path, manifest, azure_store.base_url)
    proc = subprocess.Popen(
        ["bash", str(script)],
        env=script_env(target, {"GPUBUILD_SAS": azure_store.sas, "GPUBUILD_PARALLEL": "1"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    blob = target / STATE / "download" / f"{big_shard(manifest)}.part"
    # The biggest shard goes first: stop the store once its bytes are arriving.
    deadline = time.monotonic() + 60
    while not (blob.exists() and blob.stat().st_size > 0):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    with azurite_endpoint.stopped():  # type: ignore[attr-defined]
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert "No luck after 2 attempts" in stderr
    assert_no_secret(azure_store.sas, stderr)
    assert_empty(target)


def test_a_full_volume_is_caught_before_downloading(artifacts: Artifacts, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=256k") as target:
        result = run_init(
            write_script(tmp_path, artifacts.a.manifest, artifacts.store.as_uri()), target
        )
        assert result.returncode == 1
        assert "not enough space" in result.stderr and "sizeLimit" in result.stderr
        assert_empty(target)


def test_a_volume_that_fills_up_while_unpacking(artifacts: Artifacts, tmp_path: Path) -> None:
    # Room for the bytes but not for the files: the space check passes, tar hits ENOSPC.
    files = artifacts.a.manifest.total_files
    with tmpfs(tmp_path / "few-inodes", f"size=64m,nr_inodes={files // 2}") as target:
        result = run_init(
            write_script(tmp_path, artifacts.a.manifest, artifacts.store.as_uri()), target
        )
        assert result.returncode == 1
        assert "full" in result.stderr
        assert_empty(target)
        leftovers = [p for p in (target / STATE).iterdir() if p.name != "lock"]
        assert leftovers == []


def test_sigkill_mid_download_keeps_the_old_set_and_a_rerun_finishes(
    artifacts: Artifacts, tmp_path: Path
) -> None:
    target = tmp_path / "vol"
    target.mkdir()
    url = artifacts.store.as_uri()
    assert run_init(write_script(tmp_path, artifacts.a.manifest, url), target).returncode == 0
    manifest = artifacts.b.manifest
    with ScriptedStore(artifacts.store) as server:
        server.script(blob_path(big_shard(manifest)), Slow(2_000_000))
        script = write_script(tmp_path, manifest, server.url)
        proc = subprocess.Popen(
            ["bash", str(script)],
            env=script_env(target),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        blob = target / STATE / "download" / f"{big_shard(manifest)}.part"
        deadline = time.monotonic() + 60
        while not (blob.exists() and blob.stat().st_size > 1 << 20):
            assert proc.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.01)
        kill_tree(proc)
    # The old set is untouched; the killed run's staging folder and partial download wait for
    # the next run, which resumes the download.
    assert_installed(target, artifacts.a, clean=False)
    assert blob.stat().st_size > 1 << 20
    rerun = run_init(script, target, {"GPUBUILD_STORE_URL": url})
    assert rerun.returncode == 0, rerun.stderr
    assert_installed(target, artifacts.b)


def test_sigkill_at_any_moment_leaves_the_old_set_or_nothing(
    artifacts: Artifacts, tmp_path: Path
) -> None:
    url = artifacts.store.as_uri()
    script_a = write_script(tmp_path, artifacts.a.manifest, url)
    script_b = write_script(tmp_path, artifacts.b.manifest, url)
    target = tmp_path / "vol"
    target.mkdir()
    outcomes = set()
    for delay in (0.02, 0.15, 0.3, 0.45, 0.6, 0.8):
        assert run_init(script_a, target).returncode == 0
        proc = subprocess.Popen(
            ["bash", str(script_b)],
            env=script_env(target),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        time.sleep(delay)
        kill_tree(proc)
        state = target / STATE
        if (state / "incomplete").exists():
            outcomes.add("nothing")  # the next run clears the live set and starts over
        elif installed_marker(target) == artifacts.a.manifest.digest:
            assert tree_state(target) == tree_state(artifacts.a.tree)
            outcomes.add("old")
        else:
            assert installed_marker(target) == artifacts.b.manifest.digest
            assert tree_state(target) == tree_state(artifacts.b.tree)
            outcomes.add("new")
        rerun = run_init(script_b, target)
        assert rerun.returncode == 0, rerun.stderr
        assert_installed(target, artifacts.b)
    assert "old" in outcomes


def test_a_run_stopped_mid_switch_is_finished_by_the_next(
    artifacts: Artifacts, tmp_path: Path
) -> None:
    """The states a kill during the switch leaves, made by hand: the next run repairs them."""
    url = artifacts.store.as_uri()
    target = tmp_path / "vol"
    target.mkdir()
    assert run_init(write_script(tmp_path, artifacts.a.manifest, url), target).returncode == 0
    state = target / STATE
    # Killed after `incomplete` was written and half the old set moved aside.
    (state / "incomplete").write_text(artifacts.b.manifest.digest + "\n")
    (state / "installed").unlink()
    (state / "trash").mkdir()
    shutil.move(str(target / "alpha"), str(state / "trash" / "alpha"))
    # ... and after some staged entries had moved up: the staged copy is no longer whole,
    # whatever its verified- marker says.
    (state / f"staging-{artifacts.b.manifest.digest}" / "beta").mkdir(parents=True)
    (state / f"verified-{artifacts.b.manifest.digest}").write_text("store\n")
    result = run_init(write_script(tmp_path, artifacts.b.manifest, url), target)
    assert result.returncode == 0, result.stderr
    assert "clearing it" in result.stderr
    assert_installed(target, artifacts.b)
    assert sorted(p.name for p in state.iterdir()) == ["installed", "lock"]


def test_files_gpubuild_did_not_install_are_not_deleted(
    artifacts: Artifacts, tmp_path: Path
) -> None:
    target = tmp_path / "vol"
    (target / "torch").mkdir(parents=True)
    (target / "torch" / "__init__.py").write_text("")
    result = run_init(
        write_script(tmp_path, artifacts.a.manifest, artifacts.store.as_uri()), target
    )
    assert result.returncode == 1
    assert "did not install" in result.stderr
    assert (target / "torch" / "__init__.py").exists()


def test_two_copies_on_one_volume(artifacts: Artifacts, tmp_path: Path) -> None:
    target = tmp_path / "vol"
    target.mkdir()
    script = write_script(tmp_path, artifacts.a.manifest, artifacts.store.as_uri())
    procs = [
        subprocess.Popen(
            ["bash", str(script)],
            env=script_env(target),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=180)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    joined = "\n".join(outputs)
    assert joined.count("[gpubuild-init] done: ") == 1
    assert joined.count("already installed") == 1
    assert_installed(target, artifacts.a)


def test_pip_fallback_when_the_store_is_unreachable(
    artifacts: Artifacts, tmp_path: Path, local_index: object
) -> None:
    index = local_index([artifacts.wheels[k] for k in ("alpha1", "beta", "bigpkg")])  # type: ignore[operator]
    dead = f"http://127.0.0.1:{free_port()}/devstoreaccount1/gone"
    script = write_script(tmp_path, artifacts.a.manifest, dead, fallback_lock=_lock_text(artifacts))
    target = tmp_path / "vol"
    target.mkdir()
    result = run_init(
        script,
        target,
        {
            "GPUBUILD_RETRIES": "1",
            "GPUBUILD_PYTHON": sys.executable,
            "PIP_INDEX_URL": index,
            "PIP_NO_CACHE_DIR": "1",
        },
    )
    assert result.returncode == 0, result.stderr
    assert "falling back to pip" in result.stderr
    assert (target / STATE / "installed").read_text().split() == [
        artifacts.a.manifest.digest,
        "pip",
    ]
    probe = subprocess.run(
        [sys.executable, "-s", "-c", "import alpha, beta, bigpkg; print(alpha.VERSION)"],
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip() == "1.0", probe.stderr

    # The pip set is not the verified one: the next start tries the store again, keeps the pip
    # set while the store is still down, and replaces it once the store answers.
    again = run_init(script, target, {"GPUBUILD_RETRIES": "1", "GPUBUILD_PYTHON": sys.executable})
    assert again.returncode == 0, again.stderr
    assert "trying the verified store again" in again.stderr
    assert "keeping the set the pip fallback installed" in again.stderr
    back = write_script(tmp_path, artifacts.a.manifest, artifacts.store.as_uri())
    healed = run_init(back, target)
    assert healed.returncode == 0, healed.stderr
    assert "from the store" in healed.stderr
    assert (target / STATE / "installed").read_text().split()[0] == artifacts.a.manifest.digest
    assert_installed(target, artifacts.a)

    # Without the fallback built in, the same outage is a plain failure.
    plain = write_script(tmp_path, artifacts.a.manifest, dead)
    other = tmp_path / "vol2"
    other.mkdir()
    result = run_init(plain, other, {"GPUBUILD_RETRIES": "1"})
    assert result.returncode == 1
    assert "Couldn't connect" in result.stderr or "Failed to connect" in result.stderr
    assert_empty(other)


# --- the CLI ------------------------------------------------------------------------------


def test_cli_init_script_writes_script_and_snippet(artifacts: Artifacts, tmp_path: Path) -> None:
    from ruamel.yaml import YAML

    profile = write_profile(tmp_path / "profiles", heavy=["alpha"], name=PROFILE, python="3.11")
    # The fixture's lock, adopted by this profile as `gpubuild resolve` would have written it.
    loaded = load_profile(profile)
    adopted = dataclasses.replace(
        read_lock_text(_lock_text(artifacts), tmp_path),
        sources=loaded.sources,
        interpreter=loaded.target.interpreter,
        install_dir=loaded.target.install_dir,
    )
    profile.with_suffix(".lock").write_text(render_lock(adopted, INSTALL_DIR))
    lock = read_lock(profile.with_suffix(".lock"))
    store = tmp_path / "store"
    empty = tmp_path / "empty-store"
    empty.mkdir()
    missing = run_cli(
        "init-script", str(profile), "--store", empty.as_uri(), "-o", str(tmp_path / "x.sh")
    )
    assert missing.returncode == 1
    assert "publish-cache" in missing.stderr
    assert not (tmp_path / "x.sh").exists()

    manifest = write_artifact(
        artifacts.a.tree,
        store,
        profile=PROFILE,
        digest=lock.digest(),
        python="3.11",
        platform="x86_64-manylinux_2_28",
        install_dir=INSTALL_DIR,
        shard_threshold=1 << 20,
    )
    out = tmp_path / "out"
    result = run_cli(
        "init-script",
        str(profile),
        "--store",
        store.as_uri(),
        "-o",
        str(out / "init.sh"),
        "--k8s-out",
        str(out / "init-container.yaml"),
        "--fallback",
        "pip",
        "--image",
        "127.0.0.1:5000/data-ai/gpubuild-init:itest",
        "--secret",
        "gpubuild-sas",
    )
    assert result.returncode == 0, result.stderr
    script = out / "init.sh"
    assert script.stat().st_mode & 0o111
    text = script.read_text()
    assert manifest.digest in text and "readonly FALLBACK=pip" in text
    snippet = YAML(typ="safe").load((out / "init-container.yaml").read_text())
    init = snippet["initContainers"][0]
    assert init["image"] == "127.0.0.1:5000/data-ai/gpubuild-init:itest"
    assert {"name": "GPUBUILD_SAS_FILE", "value": "/var/run/gpubuild/sas"} in init["env"]
    assert snippet["containers"][0]["env"][0] == {
        "name": "PYTHONPATH",
        "value": "/shared-packages:/app",
    }
    target = tmp_path / "vol"
    target.mkdir()
    ran = run_init(script, target)
    assert ran.returncode == 0, ran.stderr
    assert tree_state(target) == tree_state(artifacts.a.tree)

    # A profile edited since its lock was written: the script would install the old set.
    profile.write_text(
        profile.read_text().replace('install_dir = "/shared-packages"', 'install_dir = "/deps"')
    )
    stale = run_cli(
        "init-script", str(profile), "--store", store.as_uri(), "-o", str(tmp_path / "s.sh")
    )
    assert stale.returncode == 2 and "is stale" in stale.stderr
    assert not (tmp_path / "s.sh").exists()


def test_pod_side_output_needs_an_explicit_store(tmp_path: Path) -> None:
    """The default store is this machine's cache folder: init-script and k8s patch must not
    bake it into what a pod runs unless the user names a store."""
    profile = write_profile(tmp_path / "profiles", heavy=["alpha"], name=PROFILE)
    service = tmp_path / "ray-service.yaml"
    shutil.copy(REPO / "tests" / "data" / "ray-service.yaml", service)
    before = service.read_bytes()
    script = tmp_path / "init.sh"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for args in (
        ["init-script", str(profile), "-o", str(script)],
        ["k8s", "patch", str(service), "--group", "gpu", "--profile", str(profile)],
    ):
        result = run_cli(*args, env=env)
        assert result.returncode == 2, result.stderr
        assert "--store" in result.stderr and "no pod can read" in result.stderr
        assert str(tmp_path / "cache") in result.stderr
    assert not script.exists()
    assert service.read_bytes() == before


def read_lock_text(text: str, folder: Path) -> Lock:
    path = folder / "fixture.lock"
    path.write_text(text)
    return read_lock(path)


# --- the image ----------------------------------------------------------------------------


def test_dockerfile_init_image_installs_from_azurite(
    artifacts: Artifacts,
    azure_store: AzuriteContainer,
    docker_client: object,
    base_image: str,
    tmp_path: Path,
) -> None:
    context = tmp_path / "context"
    (context / "certs").mkdir(parents=True)
    shutil.copy(REPO / "Dockerfile.init", context / "Dockerfile.init")
    shutil.copy(REPO / "certs" / ".keep", context / "certs" / ".keep")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=gpubuild test proxy CA",
            "-keyout", str(tmp_path / "ca.key"), "-out", str(context / "certs" / "proxy-ca.crt"),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (context / "init.sh").write_text(render_init_script(artifacts.a.manifest, azure_store.base_url))
    tag = f"gpubuild-test/init:{uuid.uuid4().hex[:8]}"
    image, _ = docker_client.images.build(  # type: ignore[attr-defined]
        path=str(context),
        dockerfile="Dockerfile.init",
        buildargs={"BASE_IMAGE": base_image},
        tag=tag,
        network_mode="host",
        rm=True,
    )
    try:
        size = image.attrs["Size"]
        base_size = docker_client.images.get(base_image).attrs["Size"]  # type: ignore[attr-defined]
        print(
            f"\nDockerfile.init on {base_image}: {size / 1e6:.1f} MB "
            f"({(size - base_size) / 1e3:.1f} kB over the base)"
        )
        assert size - base_size < 5_000_000  # nothing installed: the base has every tool
        tools = docker_client.containers.run(  # type: ignore[attr-defined]
            tag,
            entrypoint=["bash", "-c"],
            command=[
                "command -v flock curl zstd tar sha256sum find >/dev/null && "
                "grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt >/dev/null && "
                "ls /etc/ssl/certs | grep -c proxy-ca"
            ],
            network_mode="host",
            remove=True,
        )
        assert tools.strip() == b"1"

        volume = tmp_path / "volume"
        volume.mkdir()
        logs = []
        for _ in range(2):
            container = docker_client.containers.run(  # type: ignore[attr-defined]
                tag,
                environment={"GPUBUILD_SAS": azure_store.sas},
                volumes={str(volume): {"bind": INSTALL_DIR, "mode": "rw"}},
                network_mode="host",
                detach=True,
            )
            try:
                status = container.wait(timeout=300)
                logs.append(container.logs().decode())
            finally:
                container.remove(force=True)
            assert status["StatusCode"] == 0, logs[-1]
        assert "[gpubuild-init] done: " in logs[0]
        assert "unpacking with bsdtar" in logs[0]  # the image's tools: the in-process extractor
        assert "checking BLAKE3 (b3sum)" in logs[0]  # and b3sum, with the manifest's pins
        assert "already installed" in logs[1]
        assert_no_secret(azure_store.sas, *logs)
        assert_installed(volume, artifacts.a)
    finally:
        docker_client.images.remove(tag, force=True)  # type: ignore[attr-defined]
