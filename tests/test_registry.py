"""The registry store against the real CNCF distribution registry on 127.0.0.1: anonymous and
with htpasswd basic auth; push, re-push (nothing uploaded), the same shard digests as a folder
store, skopeo reading what was pushed, fetch by image digest, a tampered blob refused, and the
errors a user meets (bad URLs, refused or missing credentials, an unreachable registry)."""

from __future__ import annotations

import base64
import filecmp
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.errors import BadInputError, IntegrityError
from builder.fetch import fetch
from builder.ociimage import LAYER_TAR, LAYER_ZSTD
from tests.helpers import new_repository, publish_to, run_cli, write_profile
from tests.support import services
from tests.support.services import require_program
from tests.support.wheels import build_wheel


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.support.index import serve_index

    dists = tmp_path_factory.mktemp("registry-dists")
    wheels = [
        build_wheel(dists, "alpha", "1.0", files={"alpha/__init__.py": b"VALUE = 'alpha'\n",
                                                  "alpha/data/big.bin": os.urandom(300_000)}),
        build_wheel(dists, "beta", "2.0", files={"beta/__init__.py": b"VALUE = 'beta'\n"}),
    ]  # fmt: skip
    root = tmp_path_factory.mktemp("registry-index")
    with serve_index(wheels, root) as url:
        yield url


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    for name in ("GPUBUILD_REGISTRY_USERNAME", "GPUBUILD_REGISTRY_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


def _profile(tmp_path: Path, name: str = "oci-test") -> Path:
    # python 3.11, the host's: the containerd test imports the set with the host python.
    return write_profile(tmp_path / "profiles", name=name, heavy=["alpha==1.0", "beta==2.0"],
                         python="3.11")  # fmt: skip


def _skopeo(*args: str) -> dict:
    skopeo = require_program("skopeo", "the Debian package skopeo")
    out = subprocess.run([skopeo, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_publish_to_a_registry_then_again_uploads_nothing(
    tmp_path: Path, index: str, registry_address: str
) -> None:
    profile = _profile(tmp_path)
    store = f"oci+http://{registry_address}/{new_repository('t')}"
    first = publish_to(profile, store, index, tmp_path)
    assert not first.already_published and first.shards_uploaded == len(first.manifest.shards)
    assert set(first.references) == {"image", "init-copy image"}
    image = first.references["image"]
    assert image.startswith(f"{registry_address}/gpubuild/") and "@sha256:" in image
    again = publish_to(profile, store, index, tmp_path)
    assert again.already_published and again.bytes_uploaded == 0
    assert again.references == first.references

    # The same shards as in a folder store: one identity for the bytes everywhere.
    folder = publish_to(profile, (tmp_path / "store").as_uri(), index, tmp_path)
    assert {s.sha256 for s in folder.manifest.shards} == {s.sha256 for s in first.manifest.shards}

    # skopeo reads what was pushed: the layers are the shards, the config's diff_ids their tars.
    raw = _skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{image}")
    config = _skopeo("inspect", "--tls-verify=false", "--config", "--raw", f"docker://{image}")
    layers = raw["layers"]
    assert layers[0]["mediaType"] == LAYER_TAR  # the folders, with their modes
    assert [(layer["mediaType"], layer["digest"]) for layer in layers[1:]] == [
        (LAYER_ZSTD, f"sha256:{s.sha256}") for s in first.manifest.shards
    ]
    assert config["rootfs"]["diff_ids"][1:] == [
        f"sha256:{s.tar_sha256}" for s in first.manifest.shards
    ]
    assert raw["annotations"]["dev.gpubuild.digest"] == first.digest
    assert config["gpubuild"]["digest"] == first.digest


def test_without_busybox_only_the_heavy_image_and_a_later_publish_adds_the_copy_image(
    tmp_path: Path, index: str, registry_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    profile = _profile(tmp_path)
    store = f"oci+http://{registry_address}/{new_repository('t')}"
    monkeypatch.setenv("GPUBUILD_BUSYBOX", "none")
    first = publish_to(profile, store, index, tmp_path)
    assert set(first.references) == {"image"}
    refused = run_cli("init-script", str(profile), "--store", store, "--delivery", "init-copy",
                      "--k8s-out", str(tmp_path / "copy.yaml"))  # fmt: skip
    assert refused.returncode != 0 and "busybox" in refused.stderr
    assert not (tmp_path / "copy.yaml").exists()

    monkeypatch.setenv("GPUBUILD_BUSYBOX", str(tmp_path / "not-busybox"))
    (tmp_path / "not-busybox").write_bytes(b"#!/bin/sh\n")
    with pytest.raises(BadInputError, match="not a statically linked busybox"):
        publish_to(profile, store, index, tmp_path)

    monkeypatch.delenv("GPUBUILD_BUSYBOX")
    second = publish_to(profile, store, index, tmp_path)
    # The shards were there: only the copier layer, its config and the manifest went up.
    assert not second.already_published and second.shards_uploaded == 0
    assert set(second.references) == {"image", "init-copy image"}
    assert second.references["image"] == first.references["image"]
    assert publish_to(profile, store, index, tmp_path).already_published


def test_fetch_an_image_by_digest_gives_the_folder_store_tree(
    tmp_path: Path, index: str, registry_address: str
) -> None:
    profile = _profile(tmp_path)
    store = f"oci+http://{registry_address}/{new_repository('t')}"
    published = publish_to(profile, store, index, tmp_path)
    by_registry = run_cli("fetch", published.fetch_url, "--into", str(tmp_path / "a"), "--json")
    assert by_registry.returncode == 0, by_registry.stderr
    folder = publish_to(profile, (tmp_path / "store").as_uri(), index, tmp_path)
    fetch(folder.fetch_url, tmp_path / "b")
    compared = filecmp.dircmp(tmp_path / "a", tmp_path / "b")
    assert not compared.left_only and not compared.right_only and not compared.diff_files
    assert (tmp_path / "a" / "alpha" / "__init__.py").read_text() == "VALUE = 'alpha'\n"


def test_a_tampered_blob_in_the_registry_is_refused(
    tmp_path: Path, index: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with services.registry(tmp_path_factory.mktemp("tamper-registry")) as address:
        profile = _profile(tmp_path)
        store = f"oci+http://{address}/{new_repository('t')}"
        published = publish_to(profile, store, index, tmp_path)
        shard = max(published.manifest.shards, key=lambda s: s.bytes)
        root = next(Path(p) for p in tmp_path_factory.getbasetemp().glob("tamper-registry*"))
        data = (
            root
            / "registry"
            / "docker/registry/v2/blobs/sha256"
            / shard.sha256[:2]
            / shard.sha256
            / "data"
        )
        damaged = bytearray(data.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        data.write_bytes(bytes(damaged))
        work = tmp_path / "work"
        work.mkdir()
        # The advice fits a registry: it cannot replace a blob, so "delete blobs/..." would not do.
        with pytest.raises(IntegrityError, match="damaged or was replaced") as refused:
            fetch(published.fetch_url, work / "into")
        assert "a registry cannot replace a blob" in str(refused.value)
        assert "blobs/" not in str(refused.value)
        assert list(work.iterdir()) == []

        # --repair says what it cannot do there, rather than report the shard as repaired.
        repair = run_cli("publish-cache", str(profile), "--store", store, "--repair",
                         "--index-url", index)  # fmt: skip
        assert repair.returncode == 1, repair.stderr
        assert "a registry cannot replace a blob" in repair.stderr
        verified = run_cli("verify", store, "--repair-from", str(tmp_path / "packs"), "--json")
        assert verified.returncode == 1, verified.stderr
        blobs = {blob["sha256"]: blob for blob in verified.json()["blobs"]}
        assert blobs[shard.sha256]["state"] == "damaged"
        assert "not replaced" in blobs[shard.sha256]["detail"]


def test_basic_auth_with_credentials_from_the_environment_or_docker_config(
    tmp_path: Path,
    index: str,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    password = "s3cret-registry-pw"
    with services.registry(
        tmp_path_factory.mktemp("auth-registry"), users={"ci": password}
    ) as address:
        profile = _profile(tmp_path)
        store = f"oci+http://{address}/{new_repository('t')}"
        anonymous = run_cli("publish-cache", str(profile), "--store", store)
        assert anonymous.returncode == 1 and "wants credentials" in anonymous.stderr
        wrong = run_cli(
            "publish-cache", str(profile), "--store", store,
            env={**os.environ, "GPUBUILD_REGISTRY_USERNAME": "ci", "GPUBUILD_REGISTRY_PASSWORD": "nope-nope"},
        )  # fmt: skip
        assert wrong.returncode == 1 and "refused the credentials" in wrong.stderr
        assert "nope-nope" not in wrong.stderr

        monkeypatch.setenv("GPUBUILD_REGISTRY_USERNAME", "ci")
        monkeypatch.setenv("GPUBUILD_REGISTRY_PASSWORD", password)
        published = publish_to(profile, store, index, tmp_path)
        assert published.shards_uploaded > 0
        monkeypatch.delenv("GPUBUILD_REGISTRY_USERNAME")
        monkeypatch.delenv("GPUBUILD_REGISTRY_PASSWORD")

        # What `docker login` leaves in the Docker config file works the same.
        config = tmp_path / "docker-config"
        config.mkdir(exist_ok=True)
        token = base64.b64encode(f"ci:{password}".encode()).decode()
        (config / "config.json").write_text(json.dumps({"auths": {address: {"auth": token}}}))
        fetched = run_cli("fetch", published.fetch_url, "--into", str(tmp_path / "out"))
        assert fetched.returncode == 0, fetched.stderr
        assert password not in fetched.stderr + fetched.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["publish-cache", "PROFILE", "--store", "ocx://127.0.0.1:5000/a"], "unknown scheme"),
        (
            ["publish-cache", "PROFILE", "--store", "oci://127.0.0.1:5000/Upper/case"],
            "not a repository name",
        ),
        (["fetch", "oci+http://127.0.0.1:5000/gpubuild/x", "--into", "OUT"], "name the image"),
        (["fetch", "oci+http://127.0.0.1:5000/gpubuild/x@sha256:abc", "--into", "OUT"], "digest"),
    ],
)
def test_bad_registry_urls_are_bad_input(tmp_path: Path, args: list[str], words: str) -> None:
    profile = _profile(tmp_path)
    argv = [
        str(profile) if a == "PROFILE" else str(tmp_path / "out") if a == "OUT" else a for a in args
    ]
    result = run_cli(*argv)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_unreachable_registry_fails_with_what_to_do(tmp_path: Path) -> None:
    profile = _profile(tmp_path)
    result = run_cli(
        "publish-cache", str(profile), "--store", f"oci+http://127.0.0.1:{services.free_port()}/a/b"
    )
    assert result.returncode == 1
    assert "cannot reach the registry" in result.stderr and "Traceback" not in result.stderr


def test_bearer_token_challenges_with_a_password_or_an_identity_token(
    tmp_path: Path, index: str, registry_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ACR and Docker Hub answer with a Bearer challenge: the token comes from the realm, for
    the user and password, or for the identity token `az acr login` leaves in the config."""
    from tests.support.token_registry import token_registry

    refresh = "refresh-token-from-az-acr-login"
    with token_registry(registry_address, "ci", "bearer-pw-123", refresh) as front:
        address = front.url.split("://", 1)[1]
        store = f"oci+http://{address}/{new_repository('t')}"
        profile = _profile(tmp_path)
        monkeypatch.setenv("GPUBUILD_REGISTRY_USERNAME", "ci")
        monkeypatch.setenv("GPUBUILD_REGISTRY_PASSWORD", "bearer-pw-123")
        published = publish_to(profile, store, index, tmp_path)
        assert published.shards_uploaded > 0 and front.tokens_issued
        assert any(scope.endswith(":pull,push") for scope in front.scopes_asked)
        monkeypatch.delenv("GPUBUILD_REGISTRY_USERNAME")
        monkeypatch.delenv("GPUBUILD_REGISTRY_PASSWORD")

        config = tmp_path / "docker-config"
        config.mkdir(exist_ok=True)
        (config / "config.json").write_text(
            json.dumps({"auths": {address: {"auth": "", "identitytoken": refresh}}})
        )
        fetched = run_cli("fetch", published.fetch_url, "--into", str(tmp_path / "out"))
        assert fetched.returncode == 0, fetched.stderr
        text = fetched.stderr + fetched.stdout
        assert refresh not in text and not any(token in text for token in front.tokens_issued)

        (config / "config.json").write_text(
            json.dumps({"auths": {address: {"identitytoken": "stale-token"}}})
        )
        refused = run_cli("fetch", published.fetch_url, "--into", str(tmp_path / "out2"))
        assert refused.returncode == 1 and "refused the credentials" in refused.stderr
        assert "stale-token" not in refused.stderr
