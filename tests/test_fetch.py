"""fetch against hostile stores built here: manifests with escaping or mistyped fields, shards
whose links chain out of the tree, damaged shard tails. Every case must end in a clear error
(exit 2 for a malformed file, 1 for bytes that do not match), never a traceback, and nothing
may be written outside the folder fetch was given."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from builder.errors import FormatError, IntegrityError
from builder.fetch import fetch, split_artifact_url
from builder.manifest import Manifest, Shard, blob_key, manifest_key, manifest_to_bytes
from builder.pack import write_artifact
from tests.helpers import run_cli

PROFILE = "ftest"


def tree_files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, Manifest]:
    """A genuine store holding one small artifact."""
    tree = tmp_path / "tree"
    (tree / "pkg" / "sub").mkdir(parents=True)
    (tree / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (tree / "pkg" / "sub" / "data.txt").write_text("x" * 1000)
    root = tmp_path / "store"
    manifest = write_artifact(
        tree,
        root,
        profile=PROFILE,
        digest=hashlib.sha256(b"fetch-tests").hexdigest(),
        python="3.11",
        platform="x86_64-manylinux_2_28",
        install_dir="/shared-packages",
    )
    return root, manifest


def everything_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def publish_raw(root: Path, document: dict[str, object]) -> str:
    """Write a manifest document as given (no validation) and return the fetch URL."""
    path = root / manifest_key(PROFILE, str(document["digest"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return f"{root.as_uri()}/{PROFILE}/{document['digest']}"


def hostile_shard(root: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Shard:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in members:
            if data is not None:
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    compressed = zstandard.ZstdCompressor().compress(raw.getvalue())
    sha = hashlib.sha256(compressed).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / blob_key(sha)).write_bytes(compressed)
    files = sum(1 for member, _ in members if member.isfile() or member.issym())
    return Shard(
        sha,
        len(compressed),
        hashlib.sha256(raw.getvalue()).hexdigest(),
        len(raw.getvalue()),
        files,
        ("evil",),
    )


def link(name: str, to: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, to
    return info, None


def test_fetch_takes_the_manifest_url_publish_cache_prints(
    store: tuple[Path, Manifest], tmp_path: Path
) -> None:
    root, manifest = store
    manifest_url = f"{root.as_uri()}/{manifest_key(PROFILE, manifest.digest)}"
    result = run_cli("fetch", manifest_url, "--into", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    document = result.json()
    assert document["files"] == 2 and document["digest"] == manifest.digest
    assert document["raw_bytes"] > document["bytes"] > 0
    assert (tmp_path / "out" / "pkg" / "sub" / "data.txt").read_text() == "x" * 1000
    # Compressed and unpacked sizes are told apart, and counts are in good English.
    assert "from" in result.stderr and "of shards" in result.stderr
    assert "2 files" in result.stderr and "0.0 MB" not in result.stderr
    assert split_artifact_url(manifest_url)[1:] == (PROFILE, manifest.digest)


@pytest.mark.parametrize(
    "directories", [["../escaped"], ["/tmp/gpubuild-absolute-escape"], ["a/../../escaped"], [5]]
)
def test_a_manifest_with_escaping_folders_is_refused_before_anything_is_made(
    store: tuple[Path, Manifest], tmp_path: Path, directories: list[object]
) -> None:
    root, manifest = store
    document = json.loads(manifest_to_bytes(manifest))
    document["directories"] = directories
    url = publish_raw(root, document)
    before = everything_under(tmp_path)
    into = tmp_path / "work" / "into"
    result = run_cli("fetch", url, "--into", str(into))
    assert result.returncode == 2, result.stderr
    assert "[directories[0]]" in result.stderr and "manifest.json" in result.stderr
    assert "Traceback" not in result.stderr
    assert everything_under(tmp_path) - before <= {"work"}
    assert not Path("/tmp/gpubuild-absolute-escape").exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("packages", [1]),
        ("shards", [{"sha256": "0" * 64}]),
        ("env", {"PYTHONPATH": 5}),
        ("install_dir", "/shared/../.."),
        ("install_dir", "/."),
        ("digest", None),
        ("notes", "one note"),
    ],
)
def test_mistyped_manifest_fields_are_named(
    store: tuple[Path, Manifest], tmp_path: Path, field: str, value: object
) -> None:
    root, manifest = store
    document = json.loads(manifest_to_bytes(manifest))
    document[field] = value
    if field == "digest":
        document["digest"] = manifest.digest
        document["shards"][0]["bytes"] = "12"
        field = "shards[0].bytes"
    url = publish_raw(root, document)
    result = run_cli("fetch", url, "--into", str(tmp_path / "into"))
    assert result.returncode == 2, result.stderr
    assert f"[{field}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "into").exists()


def test_a_link_chain_out_of_the_tree_is_refused(
    store: tuple[Path, Manifest], tmp_path: Path
) -> None:
    """`x -> __/../outside` passes the tar filter while `__` does not exist; `__ -> .` then makes
    it lead out. Only the finished tree shows it."""
    root, _ = store
    shard = hostile_shard(root, [link("x", "__/../outside"), link("__", ".")])
    evil = Manifest(
        digest=hashlib.sha256(b"evil").hexdigest(),
        profile=PROFILE,
        python="3.11",
        platform="x86_64-manylinux_2_28",
        install_dir="/shared-packages",
        shards=(shard,),
        env={},
        packages=(),
    )
    (root / manifest_key(PROFILE, evil.digest)).parent.mkdir(parents=True)
    (root / manifest_key(PROFILE, evil.digest)).write_bytes(manifest_to_bytes(evil))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(IntegrityError, match="lead out"):
        fetch(f"{root.as_uri()}/{PROFILE}/{evil.digest}", work / "into")
    assert everything_under(work) == set()
    result = run_cli(
        "fetch", f"{root.as_uri()}/{PROFILE}/{evil.digest}", "--into", str(work / "into")
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert everything_under(work) == set()


def test_a_damaged_shard_tail_is_a_clear_error(
    store: tuple[Path, Manifest], tmp_path: Path
) -> None:
    root, manifest = store
    shard = manifest.shards[0]
    blob = root / blob_key(shard.sha256)
    blob.write_bytes(blob.read_bytes()[:-7])
    result = run_cli(
        "fetch", f"{root.as_uri()}/{PROFILE}/{manifest.digest}", "--into", str(tmp_path / "into")
    )
    assert result.returncode == 1, result.stderr
    assert "damaged" in result.stderr and "publish" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "into").exists()
    assert sorted(os.listdir(tmp_path)) == ["store", "tree"]


def test_a_manifest_that_is_not_json_or_not_an_object(store: tuple[Path, Manifest]) -> None:
    root, manifest = store
    path = root / manifest_key(PROFILE, manifest.digest)
    for data in (b"\xff\xfe not json", b"[1, 2]", b"[" * 100_000):
        path.write_bytes(data)
        with pytest.raises(FormatError, match=r"manifest\.json"):
            fetch(f"{root.as_uri()}/{PROFILE}/{manifest.digest}", root.parent / "into")


def test_a_long_link_chain_cve_2025_4517_writes_nothing_outside(tmp_path: Path) -> None:
    """The symlink chain longer than PATH_MAX that defeats tarfile's data filter (CVE-2025-4517):
    the store serves it with a manifest that pins it, so its sha256 matches. Every member is
    judged by gpubuild's own rules before it is extracted."""
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "flag").write_text("original\n")
    into = victim / "sub" / "into"
    store = tmp_path / "store"
    steps = "abcdefghijklmnop"
    component = "d" * ((4096 - len(str(into.parent)) - 22) // (len(steps) + 1))
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    path = ""
    for step in steps:
        folder = tarfile.TarInfo(os.path.join(path, component))
        folder.type, folder.mode = tarfile.DIRTYPE, 0o777
        members += [(folder, None), link(os.path.join(path, step), component)]
        path = os.path.join(path, component)
    deep = os.path.join(*steps, "l" * 254)
    members += [link(deep, os.path.join(*[".."] * len(steps))), link("escape", f"{deep}/..")]
    members.append((tarfile.TarInfo("escape/../PWNED"), b"outside\n"))
    shard = hostile_shard(store, members)
    evil = Manifest(
        digest=hashlib.sha256(b"cve").hexdigest(),
        profile=PROFILE,
        python="3.11",
        platform="x86_64-manylinux_2_28",
        install_dir="/shared-packages",
        shards=(shard,),
        env={},
        packages=(),
    )
    (store / manifest_key(PROFILE, evil.digest)).parent.mkdir(parents=True)
    (store / manifest_key(PROFILE, evil.digest)).write_bytes(manifest_to_bytes(evil))
    with pytest.raises(IntegrityError, match="could lead out"):
        fetch(f"{store.as_uri()}/{PROFILE}/{evil.digest}", into)
    assert sorted(p.relative_to(victim).as_posix() for p in victim.rglob("*")) == ["flag", "sub"]
    assert (victim / "flag").read_text() == "original\n"


@pytest.mark.parametrize(
    "member",
    [
        ("../x", tarfile.REGTYPE, ""),
        ("/abs", tarfile.REGTYPE, ""),
        ("hard", tarfile.LNKTYPE, "pkg/__init__.py"),
        ("dev", tarfile.CHRTYPE, ""),
        ("up", tarfile.SYMTYPE, "../.."),
        ("root", tarfile.SYMTYPE, "/etc"),
    ],
)
def test_members_a_shard_may_not_hold(tmp_path: Path, member: tuple[str, bytes, str]) -> None:
    name, kind, target = member
    store = tmp_path / "store"
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    shard = hostile_shard(store, [(info, b"x" if kind == tarfile.REGTYPE else None)])
    evil = Manifest(
        digest=hashlib.sha256(name.encode()).hexdigest(),
        profile=PROFILE,
        python="3.11",
        platform="x86_64-manylinux_2_28",
        install_dir="/shared-packages",
        shards=(shard,),
        env={},
        packages=(),
    )
    (store / manifest_key(PROFILE, evil.digest)).parent.mkdir(parents=True)
    (store / manifest_key(PROFILE, evil.digest)).write_bytes(manifest_to_bytes(evil))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(IntegrityError, match=r"member"):
        fetch(f"{store.as_uri()}/{PROFILE}/{evil.digest}", work / "into")
    assert list(work.iterdir()) == []
