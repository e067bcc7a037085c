"""`gpubuild verify`: every blob a manifest references re-hashed (the .tar.zst and its tar),
missing and damaged blobs found (a damaged one of the same size too), and repaired from a local
pack; in a folder and in Azurite. Reading is streamed: memory does not grow with a blob."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import unquote

import blake3
import pytest
import zstandard

from builder.manifest import Shard, blob_key, manifest_key, manifest_to_bytes
from builder.pack import PackResult, write_artifact
from builder.publish import publish
from builder.stores import AzureStore, FileStore, Store, open_store
from builder.stores.sas import make_read_sas
from builder.verify import BlobHashes, hash_stream, judge
from tests.helpers import REPO, pack_wheels, run_cli
from tests.support.services import AzuriteEndpoint
from tests.support.wheels import build_wheel


@dataclass(frozen=True)
class Packs:
    folder: Path
    a: PackResult
    b: PackResult


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory) -> Packs:
    work = tmp_path_factory.mktemp("verify")
    noise = random.Random(3)
    wheels = work / "wheels"

    def wheel(name: str, size: int) -> Path:
        files = {f"{name.replace('-', '_')}/data.bin": noise.randbytes(size)}
        return build_wheel(wheels, name, "1.0", files=files)

    shared = wheel("shared-lib", 300_000)
    a = pack_wheels(work, work / "packs", [shared, wheel("app-a", 90_000)], "prof-a", "prof-a")
    b = pack_wheels(work, work / "packs", [shared, wheel("app-b", 80_000)], "prof-b", "prof-b")
    return Packs(work / "packs", a, b)


@dataclass(frozen=True)
class Target:
    store: Store
    url: str
    env: dict[str, str]


@pytest.fixture(params=["file", pytest.param("azure", marks=pytest.mark.azurite)])
def target(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Target:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_STORAGE_")}
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    if request.param == "file":
        url = (tmp_path / "store").as_uri()
    else:
        endpoint: AzuriteEndpoint = request.getfixturevalue("azurite_endpoint")
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", endpoint.connection_string)
        env["AZURE_STORAGE_CONNECTION_STRING"] = endpoint.connection_string
        url = f"az://{endpoint.account}/verify-{uuid.uuid4().hex[:12]}/cache"
    return Target(open_store(url), url, env)


def _read(store: Store, sha256: str) -> bytes:
    with store.open_blob(sha256) as stream:
        return stream.read()


def _overwrite(store: Store, sha256: str, data: bytes) -> None:
    """Put other bytes under a blob's name, behind the store's back (as a failing disk would)."""
    if isinstance(store, FileStore):
        path = store.root / blob_key(sha256)
        path.chmod(0o644)
        path.write_bytes(data)
        return
    assert isinstance(store, AzureStore)
    # The SDK itself: gpubuild's store refuses to upload bytes that are not their name.
    store._container.upload_blob(store._name(blob_key(sha256)), data, overwrite=True)


def _delete(store: Store, sha256: str) -> None:
    if isinstance(store, FileStore):
        (store.root / blob_key(sha256)).unlink()
    else:
        assert isinstance(store, AzureStore)
        store._container.delete_blob(store._name(blob_key(sha256)))


def test_verify_finds_a_damaged_and_a_missing_blob_and_repairs_them(
    packs: Packs, target: Target, tmp_path: Path
) -> None:
    store = target.store
    for pack in (packs.a, packs.b):
        publish(pack, store)
    clean = run_cli("verify", target.url, "--json", env=target.env)
    assert clean.returncode == 0, clean.stderr
    assert clean.json()["ok"] and {b["state"] for b in clean.json()["blobs"]} == {"ok"}
    assert len(clean.json()["manifests"]) == 2

    shared = max(packs.a.manifest.shards, key=lambda s: s.bytes)
    assert shared in packs.b.manifest.shards
    own = next(s for s in packs.b.manifest.shards if s not in packs.a.manifest.shards)
    data = bytearray(_read(store, shared.sha256))
    data[len(data) // 2] ^= 0x40  # one bit, same size: a size check cannot see it
    _overwrite(store, shared.sha256, bytes(data))
    assert store.has_blob(shared.sha256) == shared.bytes
    _delete(store, own.sha256)

    found = run_cli("verify", target.url, "--json", env=target.env)
    assert found.returncode == 1, found.stderr
    document = found.json()
    states = {b["sha256"]: b for b in document["blobs"]}
    assert states[shared.sha256]["state"] == "damaged"
    assert "sha256" in states[shared.sha256]["detail"]
    assert sorted(states[shared.sha256]["used_by"]) == [
        f"prof-a/{packs.a.manifest.digest}",
        f"prof-b/{packs.b.manifest.digest}",
    ]
    assert states[own.sha256]["state"] == "missing"
    blobs = len({s.sha256 for m in (packs.a.manifest, packs.b.manifest) for s in m.shards})
    # Two manifests and the other blobs are fine.
    assert not document["ok"]
    assert document["counts"] == {"damaged": 1, "missing": 1, "ok": 2 + blobs - 2}
    assert "damaged: " in found.stderr and "--repair-from" in found.stderr
    assert "Traceback" not in found.stderr

    # Only one profile: the missing blob is prof-b's alone.
    only_a = run_cli("verify", target.url, f"prof-a/{packs.a.manifest.digest[:12]}", "--json",
                     env=target.env)  # fmt: skip
    assert only_a.returncode == 1
    assert {b["state"] for b in only_a.json()["blobs"]} == {"damaged", "ok"}

    repaired = run_cli(
        "verify", target.url, "--repair-from", str(packs.folder), "--json", env=target.env
    )
    assert repaired.returncode == 0, repaired.stderr
    assert {b["sha256"]: b["state"] for b in repaired.json()["blobs"]}[shared.sha256] == "repaired"
    assert _read(store, shared.sha256) == (packs.folder / blob_key(shared.sha256)).read_bytes()
    assert store.has_blob(own.sha256) == own.bytes
    again = run_cli("verify", target.url, "--json", env=target.env)
    assert again.returncode == 0 and again.json()["counts"] == {"ok": 2 + blobs}


def test_a_blob_shared_by_manifests_is_judged_against_each_one_s_blake3_pin(
    packs: Packs, tmp_path: Path
) -> None:
    """prof-a's manifest (read first) pins no BLAKE3; prof-b's pins a wrong one for the blob
    they share: the genuine bytes are still reported, since pods of prof-b would refuse them."""
    store = FileStore(tmp_path / "store")
    publish(packs.a, store)
    publish(packs.b, store)
    shared = max(packs.a.manifest.shards, key=lambda s: s.bytes)
    assert shared in packs.b.manifest.shards and shared.blake3
    unpinned = tuple(dataclasses.replace(s, blake3="") for s in packs.a.manifest.shards)
    older = dataclasses.replace(packs.a.manifest, shards=unpinned)
    store.put_manifest("prof-a", older.digest, manifest_to_bytes(older))
    wrong = tuple(
        dataclasses.replace(s, blake3="f" * 64) if s == shared else s
        for s in packs.b.manifest.shards
    )
    lying = dataclasses.replace(packs.b.manifest, shards=wrong)
    store.put_manifest("prof-b", lying.digest, manifest_to_bytes(lying))

    found = run_cli("verify", store.display_url, "--json")
    assert found.returncode == 1, found.stderr
    blob = next(b for b in found.json()["blobs"] if b["sha256"] == shared.sha256)
    assert blob["state"] == "damaged"
    assert "BLAKE3" in blob["detail"] and "that manifest is wrong" in blob["detail"]
    others = [b["state"] for b in found.json()["blobs"] if b["sha256"] != shared.sha256]
    assert others and set(others) == {"ok"}


def test_repair_refuses_a_local_copy_that_is_damaged_too(packs: Packs, tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    publish(packs.a, store)
    shard = packs.a.manifest.shards[0]
    (store.root / blob_key(shard.sha256)).write_bytes(b"x" * shard.bytes)
    bad_pack = tmp_path / "bad-pack"
    (bad_pack / "blobs").mkdir(parents=True)
    (bad_pack / blob_key(shard.sha256)).write_bytes(b"y" * shard.bytes)
    result = run_cli("verify", store.display_url, "--repair-from", str(bad_pack), "--json")
    assert result.returncode == 1
    blob = next(b for b in result.json()["blobs"] if b["sha256"] == shard.sha256)
    assert blob["state"] == "damaged" and "no good copy" in blob["detail"]
    assert (store.root / blob_key(shard.sha256)).read_bytes() == b"x" * shard.bytes


def test_a_manifest_that_does_not_read_is_reported_and_repaired(
    packs: Packs, tmp_path: Path
) -> None:
    store = FileStore(tmp_path / "store")
    publish(packs.a, store)
    path = store.root / manifest_key("prof-a", packs.a.manifest.digest)
    path.write_text('{"format": 1, "digest": "nope"}')
    found = run_cli("verify", store.display_url, "--json")
    assert found.returncode == 1
    assert found.json()["manifests"][0]["state"] == "damaged"
    assert "manifest.json" in found.stderr and "Traceback" not in found.stderr
    fixed = run_cli("verify", store.display_url, "--repair-from", str(packs.folder), "--json")
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.json()["manifests"][0]["state"] == "repaired"
    assert path.read_bytes() == packs.a.manifest_path.read_bytes()


def test_selectors_that_name_nothing_or_nothing_valid(packs: Packs, tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    publish(packs.a, store)
    missing = run_cli("verify", store.display_url, "prof-z")
    assert missing.returncode == 1 and "no published digest matching prof-z" in missing.stderr
    for selector in ("Prof_A", "prof-a/xyz", "prof-a/abc"):
        bad = run_cli("verify", store.display_url, selector)
        assert bad.returncode == 2, (selector, bad.stderr)


def _zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def test_hashes_and_judgement_of_a_blob() -> None:
    tar = b"tar bytes " * 1000
    blob = _zst(tar)
    found = hash_stream(io.BytesIO(blob))
    assert found == BlobHashes(
        hashlib.sha256(blob).hexdigest(),
        len(blob),
        hashlib.sha256(tar).hexdigest(),
        len(tar),
        blake3=blake3.blake3(blob).hexdigest(),
    )
    not_zstd = hash_stream(io.BytesIO(b"\x00" * 100))
    assert not_zstd.tar_sha256 is None and not_zstd.error
    trailing = hash_stream(io.BytesIO(blob + b"junk"))
    assert trailing.bytes == len(blob) + 4 and trailing.sha256 != found.sha256

    shard = Shard(found.sha256, found.bytes, found.tar_sha256 or "", found.raw_bytes, 1, ())
    assert judge(shard, found) == ("ok", "")
    assert judge(shard, None)[0] == "missing"
    assert judge(shard, trailing)[0] == "damaged"
    assert "does not decompress" in judge(shard, not_zstd)[1]

    # A BLAKE3 pin is checked too: the bytes are genuine, so the pin is what is wrong.
    pinned = dataclasses.replace(shard, blake3=found.blake3)
    assert judge(pinned, found) == ("ok", "")
    state, detail = judge(dataclasses.replace(shard, blake3="0" * 64), found)
    assert state == "damaged" and "BLAKE3" in detail and "publish it again" in detail


_PEAK = """
import resource, subprocess, sys
subprocess.run([sys.executable, "-m", "builder.cli", "verify", sys.argv[1], "--json"],
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


@pytest.mark.azurite
def test_verifying_a_big_azure_blob_does_not_hold_it_in_memory(
    azurite_endpoint: AzuriteEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob four times bigger (128 MB against 32 MB) barely moves the peak memory of
    `gpubuild verify`: blobs are read in a stream, not held whole."""
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_endpoint.connection_string)
    peaks = {}
    for label, size in (("small", 32 * 2**20), ("big", 128 * 2**20)):
        tree = tmp_path / f"tree-{label}"
        (tree / "pkg").mkdir(parents=True)
        (tree / "pkg" / "data.bin").write_bytes(os.urandom(size))
        manifest = write_artifact(
            tree,
            tmp_path / f"pack-{label}",
            profile="mem",
            digest=hashlib.sha256(label.encode()).hexdigest(),
            python="3.11",
            platform="x86_64-manylinux_2_28",
            install_dir="/shared-packages",
        )
        url = f"az://{azurite_endpoint.account}/mem-{uuid.uuid4().hex[:12]}"
        pack = tmp_path / f"pack-{label}"
        publish(PackResult(manifest, pack / manifest_key("mem", manifest.digest), pack, False),
                open_store(url))  # fmt: skip
        peak = subprocess.run(
            [sys.executable, "-c", _PEAK, url],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=os.environ.copy(),
            check=True,
        )
        peaks[label] = int(peak.stdout.strip()) * 1024  # ru_maxrss is in kB
    assert peaks["big"] - peaks["small"] < 24 * 2**20, {k: v // 2**20 for k, v in peaks.items()}


@pytest.mark.azurite
def test_a_read_only_sas_cannot_list_and_is_never_printed(
    packs: Packs, azurite_endpoint: AzuriteEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pods' SAS may read blobs but not list them: verify (and gc) say what is missing
    instead of printing the token."""
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_endpoint.connection_string)
    container = f"verify-{uuid.uuid4().hex[:12]}"
    store = open_store(f"{azurite_endpoint.blob_url}/{container}")
    publish(packs.a, store)
    sas = make_read_sas(store, expiry=datetime.now(timezone.utc) + timedelta(hours=1))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_STORAGE_")}
    signature = sas.split("sig=", 1)[1].split("&", 1)[0]
    for command in ("verify", "gc"):
        result = run_cli(command, f"{azurite_endpoint.blob_url}/{container}?{sas}", env=env)
        assert result.returncode == 1, result.stderr
        assert "lacks the permission" in result.stderr or "was refused" in result.stderr
        assert signature not in result.stderr and unquote(signature) not in result.stderr
        assert "Traceback" not in result.stderr
