"""publish-cache and fetch against Azurite and a local folder, with real wheels and real uv."""

from __future__ import annotations

import filecmp
import hashlib
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

from builder.errors import BadInputError, IntegrityError, NotPublishedError, StoreError
from builder.fetch import fetch
from builder.indexes import IndexSettings
from builder.install import materialise
from builder.manifest import blob_key
from builder.pipeline import publish_profile
from builder.profile import load_profile
from builder.resolve import ensure_lock
from builder.stores import AzureStore, open_store
from builder.stores.sas import make_read_sas
from builder.tree import fix_tree
from tests.helpers import run_cli, write_profile
from tests.support.index import serve_index
from tests.support.services import AzuriteEndpoint
from tests.support.wheels import build_wheel

# Above the default shard threshold (16 MB installed), so it is a shard of its own.
BIG = 17 * 2**20


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    dists = tmp_path_factory.mktemp("publish-dists")
    noise = random.Random(7).randbytes(BIG)  # incompressible, like a CUDA library
    wheels = [
        build_wheel(
            dists,
            "fake-cudnn",
            "8.9.2",
            tag="py3-none-manylinux_2_28_x86_64",
            files={
                "nvidia/cudnn/__init__.py": b"",
                "nvidia/cudnn/lib/libcudnn.so.8": noise,
            },
        ),
        build_wheel(dists, "model-a", "1.0", requires=["fake-cudnn==8.9.2", "click"]),
        build_wheel(
            dists,
            "model-b",
            "2.0",
            requires=["fake-cudnn==8.9.2"],
            entry_points={"model-b": "model_b:main"},
        ),
        build_wheel(dists, "click", "8.1.7"),
    ]
    root = tmp_path_factory.mktemp("publish-index")
    with serve_index(wheels, root) as url:
        yield url


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def az(azurite_endpoint: AzuriteEndpoint, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh container in Azurite, reached with the development account's key."""
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_endpoint.connection_string)
    return f"az://{azurite_endpoint.account}/p-{uuid.uuid4().hex[:12]}/cache"


def _profile(tmp_path: Path, name: str, heavy: list[str]):
    return load_profile(write_profile(tmp_path / name, name=name, heavy=heavy))


def _publish(profile, store: str, index: str, tmp_path: Path):
    return publish_profile(
        profile,
        store_url=store,
        settings=IndexSettings(default_url=index),
        pack_dir=tmp_path / "packs",
    )


def _etags(endpoint: AzuriteEndpoint, store_url: str) -> dict[str, str]:
    store = open_store(store_url)
    client = BlobServiceClient.from_connection_string(endpoint.connection_string)
    container = client.get_container_client(store.container)  # type: ignore[attr-defined]
    return {blob.name: blob.etag for blob in container.list_blobs()}


@pytest.mark.azurite
def test_publish_then_republish_uploads_nothing(
    tmp_path: Path, index: str, az: str, azurite_endpoint: AzuriteEndpoint
) -> None:
    profile = _profile(tmp_path, "prof-a", ["model-a==1.0"])
    first = _publish(profile, az, index, tmp_path)
    assert not first.already_published
    assert first.shards_uploaded == len(first.manifest.shards) >= 2
    state = _etags(azurite_endpoint, az)
    assert f"cache/prof-a/{first.digest}/manifest.json" in state
    assert {f"cache/{blob_key(s.sha256)}" for s in first.manifest.shards} <= set(state)

    second = _publish(profile, az, index, tmp_path)
    assert second.already_published and second.bytes_uploaded == 0
    assert _etags(azurite_endpoint, az) == state  # the store itself did not change


@pytest.mark.azurite
def test_a_second_profile_uploads_only_its_own_shards(
    tmp_path: Path, index: str, az: str, azurite_endpoint: AzuriteEndpoint
) -> None:
    first = _publish(_profile(tmp_path, "prof-a", ["model-a==1.0"]), az, index, tmp_path)
    big = next(s for s in first.manifest.shards if s.packages == ("fake-cudnn",))
    before = _etags(azurite_endpoint, az)

    second = _publish(_profile(tmp_path, "prof-b", ["model-b==2.0"]), az, index, tmp_path)
    assert big in second.manifest.shards
    assert second.shards_present == 1 and second.shards_uploaded == len(second.manifest.shards) - 1
    assert second.bytes_uploaded < big.bytes
    after = _etags(azurite_endpoint, az)
    assert after[f"cache/{blob_key(big.sha256)}"] == before[f"cache/{blob_key(big.sha256)}"]


@pytest.mark.azurite
def test_fetch_reproduces_the_materialised_tree(tmp_path: Path, index: str, az: str) -> None:
    profile = _profile(tmp_path, "prof-b", ["model-b==2.0"])
    published = _publish(profile, az, index, tmp_path)
    result = fetch(f"{az}/prof-b/{published.digest}", tmp_path / "fetched")
    assert result.files == published.manifest.total_files

    lock = ensure_lock(profile, settings=IndexSettings(default_url=index))
    reference = tmp_path / "reference"
    materialise(
        lock.lock_path,
        lock.lock,
        reference,
        python="3.10",
        platform="x86_64-manylinux_2_28",
        real_urls={index: index},
    )
    fix_tree(reference, profile.target.interpreter)
    _assert_same_tree(reference, tmp_path / "fetched")
    shebang = (tmp_path / "fetched" / "bin" / "model-b").read_text().splitlines()[0]
    assert shebang == "#!/usr/bin/python3"


def _assert_same_tree(left: Path, right: Path) -> None:
    def walk(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*")}

    assert walk(left) == walk(right)
    for relative in walk(left):
        a, b = left / relative, right / relative
        if a.is_file() and not a.is_symlink():
            assert filecmp.cmp(a, b, shallow=False), relative
            assert os.access(a, os.X_OK) == os.access(b, os.X_OK), relative


@pytest.mark.azurite
def test_a_tampered_shard_is_detected_and_nothing_is_unpacked(
    tmp_path: Path, index: str, az: str, azurite_endpoint: AzuriteEndpoint
) -> None:
    published = _publish(_profile(tmp_path, "prof-b", ["model-b==2.0"]), az, index, tmp_path)
    small = min(published.manifest.shards, key=lambda s: s.bytes)
    store = open_store(az)
    assert isinstance(store, AzureStore)
    name = f"{store.prefix}/{blob_key(small.sha256)}"
    blob = BlobServiceClient.from_connection_string(
        azurite_endpoint.connection_string
    ).get_blob_client(store.container, name)
    data = bytearray(blob.download_blob().readall())
    data[len(data) // 2] ^= 0xFF
    blob.upload_blob(bytes(data), overwrite=True)

    into = tmp_path / "fetched"
    with pytest.raises(IntegrityError, match=small.sha256[:16]):
        fetch(f"{az}/prof-b/{published.digest}", into)
    assert not into.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fetched")] == []


@pytest.mark.azurite
def test_a_missing_manifest_is_not_published(tmp_path: Path, az: str) -> None:
    with pytest.raises(NotPublishedError, match="publish it first"):
        fetch(f"{az}/prof-x/{'0' * 64}", tmp_path / "fetched")
    result = run_cli("fetch", f"{az}/prof-x/{'0' * 64}", "--into", str(tmp_path / "f2"))
    assert result.returncode == 1 and "publish it first" in result.stderr


@pytest.mark.azurite
def test_concurrent_publishers_both_succeed(
    tmp_path: Path, index: str, az: str, azurite_endpoint: AzuriteEndpoint
) -> None:
    profile = write_profile(tmp_path / "prof-a", name="prof-a", heavy=["model-a==1.0"])
    # Resolve once so both publishers pack the same lock (as CI jobs of one commit would).
    ensure_lock(load_profile(profile), settings=IndexSettings(default_url=index))
    env = {**os.environ, "AZURE_STORAGE_CONNECTION_STRING": azurite_endpoint.connection_string}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "builder.cli",
                "publish-cache",
                str(profile),
                "--store",
                az,
                "--index-url",
                index,
                "--json",
            ],
            env={**env, "XDG_CACHE_HOME": str(tmp_path / f"cache-{n}")},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in outputs]
    fetched = fetch(
        f"{az}/prof-a/{load_profile(profile).name and _digest(outputs[0][0])}", tmp_path / "f"
    )
    assert fetched.files > 0


def _digest(stdout: str) -> str:
    import json

    return json.loads(stdout)["digest"]


@pytest.mark.azurite
def test_an_expired_sas_is_a_clear_error(
    tmp_path: Path,
    index: str,
    az: str,
    monkeypatch: pytest.MonkeyPatch,
    azurite_endpoint: AzuriteEndpoint,
) -> None:
    published = _publish(_profile(tmp_path, "prof-b", ["model-b==2.0"]), az, index, tmp_path)
    store = open_store(az)
    # make_read_sas refuses a past expiry, so sign one the way a day-old token was signed.
    token = generate_container_sas(
        azurite_endpoint.account,
        store.container,  # type: ignore[attr-defined]
        account_key=azurite_endpoint.key,
        permission=ContainerSasPermissions(read=True),
        start=datetime.now(timezone.utc) - timedelta(days=1),
        expiry=datetime.now(timezone.utc) - timedelta(hours=1),
    )
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
    url = f"{azurite_endpoint.blob_url}/{store.container}/cache/prof-b/{published.digest}"  # type: ignore[attr-defined]
    with pytest.raises(StoreError, match="expired") as caught:
        fetch(url, tmp_path / "fetched", sas=token)
    assert token.split("sig=")[1].split("&")[0] not in str(caught.value)
    # A valid read-only SAS fetches the same digest.
    good = make_read_sas(store, expiry=datetime.now(timezone.utc) + timedelta(hours=1))
    assert fetch(url, tmp_path / "ok", sas=good).files == published.manifest.total_files


def test_local_store_publish_and_json(tmp_path: Path, index: str) -> None:
    profile = write_profile(tmp_path / "prof-a", name="prof-a", heavy=["model-a==1.0"])
    store = tmp_path / "store"
    result = run_cli(
        "publish-cache", str(profile), "--store", store.as_uri(), "--index-url", index, "--json"
    )
    assert result.returncode == 0, result.stderr
    document = result.json()
    assert (
        document["manifest_url"]
        == (store / "prof-a" / document["digest"] / "manifest.json").as_uri()
    )
    assert Path(document["manifest_url"][len("file://") :]).is_file()
    assert document["env"]["LD_LIBRARY_PATH"] == "/shared-packages/nvidia/cudnn/lib"
    again = run_cli(
        "publish-cache", str(profile), "--store", store.as_uri(), "--index-url", index, "--json"
    )
    assert again.returncode == 0 and again.json()["already_published"]
    assert "nothing to upload" in again.stderr
    assert document["shards_uploaded"] == document["shards"] >= 2
    assert again.json()["shards_uploaded"] == 0
    assert not list(store.glob(".pack-*")), "no work folder is left behind"


@pytest.mark.parametrize(
    ("store", "status", "words"),
    [
        ("ftp://example.invalid/x", 2, "file://PATH"),
        ("az://devstoreaccount1/c-unreachable", 1, "cannot reach"),
    ],
)
def test_bad_stores_are_clear_errors(
    tmp_path: Path, index: str, store: str, status: int, words: str
) -> None:
    profile = write_profile(tmp_path, heavy=["model-a==1.0"])
    # A closed loopback port stands for an unreachable account endpoint.
    env = {
        **os.environ,
        "AZURE_STORAGE_CONNECTION_STRING": "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;",
    }
    result = run_cli("publish-cache", str(profile), "--store", store, "--index-url", index, env=env)
    assert result.returncode == status, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "test-profile.lock").exists(), "nothing was resolved or written"


def test_split_artifact_url_rejects_bad_digests() -> None:
    from builder.fetch import split_artifact_url

    assert split_artifact_url(f"file:///s/p/{'a' * 64}") == ("file:///s", "p", "a" * 64)
    with pytest.raises(BadInputError, match="PROFILE/DIGEST"):
        split_artifact_url("file:///s/p/not-a-digest")


def test_repacking_repairs_a_damaged_local_blob(tmp_path: Path, index: str) -> None:
    """A re-pack writes its shards again instead of trusting a same-sized blob already there."""
    profile = _profile(tmp_path, "prof-b", ["model-b==2.0"])
    store = tmp_path / "store"
    published = _publish(profile, store.as_uri(), index, tmp_path)
    small = min(published.manifest.shards, key=lambda s: s.bytes)
    blob = store / blob_key(small.sha256)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="delete"):
        fetch(f"{store.as_uri()}/prof-b/{published.digest}", tmp_path / "broken")
    (store / "prof-b" / published.digest / "manifest.json").unlink()

    again = _publish(profile, store.as_uri(), index, tmp_path)
    assert again.digest == published.digest and not again.already_published
    assert fetch(f"{store.as_uri()}/prof-b/{published.digest}", tmp_path / "ok").files > 0


def _flip_middle_byte(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0xFF
    return bytes(damaged)


def test_repair_finds_a_same_size_damaged_blob_in_a_folder(tmp_path: Path, index: str) -> None:
    profile = _profile(tmp_path, "prof-b", ["model-b==2.0"])
    store = tmp_path / "store"
    published = _publish(profile, store.as_uri(), index, tmp_path)
    shard = min(published.manifest.shards, key=lambda s: s.bytes)
    blob = store / blob_key(shard.sha256)
    blob.write_bytes(_flip_middle_byte(blob.read_bytes()))
    # Sizes match, so a plain publish still takes it for published ...
    assert _publish(profile, store.as_uri(), index, tmp_path).already_published
    # ... and --repair re-hashes, finds it and writes it again.
    repaired = publish_profile(
        profile, store_url=store.as_uri(), settings=IndexSettings(default_url=index), repair=True
    )
    assert [s.sha256 for s in repaired.repaired] == [shard.sha256]
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == shard.sha256
    assert fetch(f"{store.as_uri()}/prof-b/{published.digest}", tmp_path / "ok").files > 0
    again = run_cli(
        "publish-cache", str(profile.path), "--store", store.as_uri(), "--repair",
        "--index-url", index, "--json",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert again.json()["repaired"] == [] and "matches its sha256" in again.stderr


@pytest.mark.azurite
def test_repair_finds_a_same_size_damaged_blob_in_azure(
    tmp_path: Path, index: str, az: str, azurite_endpoint: AzuriteEndpoint
) -> None:
    profile = _profile(tmp_path, "prof-b", ["model-b==2.0"])
    published = _publish(profile, az, index, tmp_path)
    shard = min(published.manifest.shards, key=lambda s: s.bytes)
    store = open_store(az)
    good = (tmp_path / "packs" / blob_key(shard.sha256)).read_bytes()
    client = BlobServiceClient.from_connection_string(azurite_endpoint.connection_string)
    blob = client.get_blob_client(store.container, f"{store.prefix}/{blob_key(shard.sha256)}")  # type: ignore[attr-defined]
    blob.upload_blob(_flip_middle_byte(good), overwrite=True)
    assert _publish(profile, az, index, tmp_path).already_published
    with pytest.raises(IntegrityError):
        fetch(f"{az}/prof-b/{published.digest}", tmp_path / "broken")

    repaired = publish_profile(
        profile,
        store_url=az,
        settings=IndexSettings(default_url=index),
        pack_dir=tmp_path / "packs",
        repair=True,
    )
    assert [s.sha256 for s in repaired.repaired] == [shard.sha256]
    assert repaired.shards_uploaded == 1
    assert blob.download_blob().readall() == good
    assert fetch(f"{az}/prof-b/{published.digest}", tmp_path / "ok").files > 0


@pytest.mark.azurite
def test_repair_packs_a_damaged_local_copy_again_before_uploading(
    tmp_path: Path, index: str, az: str, azurite_endpoint: AzuriteEndpoint
) -> None:
    """The local pack that feeds a remote store can be damaged too: a plain publish refuses to
    upload it, --repair packs it again and uploads the good bytes."""
    profile = _profile(tmp_path, "prof-b", ["model-b==2.0"])
    published = _publish(profile, az, index, tmp_path)
    shard = min(published.manifest.shards, key=lambda s: s.bytes)
    store = open_store(az)
    assert isinstance(store, AzureStore)
    client = BlobServiceClient.from_connection_string(azurite_endpoint.connection_string)
    client.get_blob_client(
        store.container, f"{store.prefix}/{blob_key(shard.sha256)}"
    ).delete_blob()
    local = tmp_path / "packs" / blob_key(shard.sha256)
    local.write_bytes(_flip_middle_byte(local.read_bytes()))
    with pytest.raises(IntegrityError, match="pack again"):
        _publish(profile, az, index, tmp_path)

    repaired = publish_profile(
        profile,
        store_url=az,
        settings=IndexSettings(default_url=index),
        pack_dir=tmp_path / "packs",
        repair=True,
    )
    assert repaired.shards_uploaded == 1
    assert hashlib.sha256(local.read_bytes()).hexdigest() == shard.sha256
    assert fetch(f"{az}/prof-b/{published.digest}", tmp_path / "ok").files > 0


def test_publish_resolves_once_and_a_rerun_not_at_all(
    tmp_path: Path, index: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stages run in order, each once: a spy on the one resolution counts its runs."""
    import builder.resolve

    real = builder.resolve.resolve

    calls: list[str] = []

    def counting(*args: object, **kwargs: object) -> object:
        calls.append("resolve")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builder.resolve, "resolve", counting)
    profile = _profile(tmp_path, "prof-b", ["model-b==2.0"])
    store = tmp_path / "store"
    first = _publish(profile, store.as_uri(), index, tmp_path)
    assert calls == ["resolve"] and not first.already_published
    again = _publish(profile, store.as_uri(), index, tmp_path)
    assert calls == ["resolve"] and again.already_published
