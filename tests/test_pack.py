"""`gpubuild pack`: real uv installs of wheels built here, real zstd and tar to unpack."""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import pytest
import zstandard

from builder.errors import DiskFullError, PolicyViolationError
from builder.indexes import IndexSettings
from builder.install import check_tree, install_passes, materialise
from builder.lock import Lock, LockedPackage
from builder.manifest import Manifest, blob_key, manifest_from_bytes, manifest_key
from builder.pack import FIXED_MTIME, write_artifact
from builder.pipeline import pack_profile
from builder.profile import load_profile
from builder.tree import Ownership, fix_tree, plan_shards, shebang_for
from tests.helpers import REPO, run_cli, write_profile
from tests.support.wheels import build_wheel

PLATFORM_TAG = "cp310-cp310-manylinux_2_28_x86_64"
PLATFORM = "x86_64-manylinux_2_28"
INSTALL_DIR = "/shared-packages"
INTERPRETER = "/usr/bin/python3"  # what tests.helpers.write_profile puts in [target]
THRESHOLD = 64 * 1024  # small, so that big-pkg's 300 kB make it a shard of its own
HEAVY = [
    "tool-pkg==1.0",
    "nv-alpha==1.0",
    "nv-beta==1.0",
    "pth-pkg==1.0",
    "big-pkg==1.0",
    "small-a==1.0",
    "small-b==1.0",
]


def noise(size: int, seed: str) -> bytes:
    """Incompressible but reproducible bytes (so wheels, locks and shards are stable)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dest = tmp_path_factory.mktemp("pack-wheels")
    made = [
        build_wheel(
            dest,
            "tool-pkg",
            "1.0",
            files={
                "tool_pkg/__init__.py": b"def main():\n    return 0\n",
                # Some wheels ship bytecode; it is for the builder's python, never the target's.
                "tool_pkg/__pycache__/__init__.cpython-310.pyc": b"stale bytecode",
            },
            entry_points={"tool": "tool_pkg:main"},
        ),
        build_wheel(
            dest,
            "nv-alpha",
            "1.0",
            tag=PLATFORM_TAG,
            files={
                "nvidia/__init__.py": b"",
                "nvidia/alpha/__init__.py": b"",
                "nvidia/alpha/lib/libalpha.so.1": b"\x7fELF not really",
            },
        ),
        build_wheel(
            dest,
            "nv-beta",
            "1.0",
            tag=PLATFORM_TAG,
            files={
                "nvidia/__init__.py": b"",
                "nvidia/beta/lib/libbeta.so.12": b"\x7fELF not really either",
                "nvidia/beta/beta_ext.cpython-310-x86_64-linux-gnu.so": b"\x7fELF",
            },
        ),
        build_wheel(
            dest,
            "pth-pkg",
            "1.0",
            files={
                "pth_pkg.pth": b"# a path-list .pth\npth_extra\n",
                "pth_extra/extra_mod.py": b"X = 1\n",
            },
        ),
        build_wheel(
            dest,
            "big-pkg",
            "1.0",
            files={"big_pkg/__init__.py": b"", "big_pkg/blob.bin": noise(300_000, "big")},
        ),
        build_wheel(dest, "small-a", "1.0"),
        build_wheel(dest, "small-b", "1.0"),
        build_wheel(dest, "click", "8.1.7"),
        build_wheel(dest, "grpcio", "1.60.0", tag=PLATFORM_TAG),
        build_wheel(
            dest,
            "huge-pkg",
            "1.0",
            files={"huge_pkg/__init__.py": b"", "huge_pkg/blob.bin": noise(3_000_000, "huge")},
        ),
    ]
    return {path.name.split("-")[0].replace("_", "-"): path for path in made}


@pytest.fixture
def index(local_index: Callable[[list[Path]], str], wheels: dict[str, Path]) -> str:
    return local_index(list(wheels.values()))


def _profile(tmp_path: Path, heavy: list[str] = HEAVY, **extra: object):
    return load_profile(write_profile(tmp_path, heavy=heavy, **extra))  # type: ignore[arg-type]


def _pack(profile, index: str, out: Path, **kwargs: object):
    return pack_profile(
        profile,
        lock_path=profile.path.with_suffix(".lock"),
        out_dir=out,
        settings=IndexSettings(default_url=index),
        shard_threshold=THRESHOLD,
        **kwargs,  # type: ignore[arg-type]
    )


def _lock(wheels: dict[str, Path], names: list[str], index: str) -> Lock:
    packages = []
    for name in names:
        wheel = wheels[name]
        version = wheel.name.split("-")[1]
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        packages.append(LockedPackage(name, version, (f"sha256:{digest}",), index_url=index))
    return Lock("test-profile", "3.10", PLATFORM, "inputs", "test", tuple(packages))


def _materialise(wheels: dict[str, Path], names: list[str], index: str, dest: Path) -> Lock:
    lock = _lock(wheels, names, index)
    materialise(dest.parent / "lock.txt", lock, dest, python="3.10", platform=PLATFORM)
    return lock


def snapshot(root: Path) -> dict[str, tuple[str, bytes | str, bool]]:
    """Every file and symlink under root: kind, content or target, executable bit."""
    found: dict[str, tuple[str, bytes | str, bool]] = {}
    for folder, dirnames, filenames in os.walk(root):
        for name in [*filenames, *(d for d in dirnames if (Path(folder) / d).is_symlink())]:
            path = Path(folder) / name
            key = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[key] = ("link", os.readlink(path), False)
            else:
                found[key] = ("file", path.read_bytes(), bool(path.stat().st_mode & 0o111))
    return found


def all_dirs(root: Path) -> list[str]:
    return sorted(
        (Path(folder) / d).relative_to(root).as_posix()
        for folder, dirnames, _ in os.walk(root)
        for d in dirnames
        if not (Path(folder) / d).is_symlink()
    )


def unpack(out_dir: Path, manifest: Manifest, dest: Path) -> None:
    """What the init script does: the skeleton first, then `zstd -d | tar -x` per shard."""
    for folder in manifest.directories:
        (dest / folder).mkdir(parents=True, exist_ok=True)
    for shard in manifest.shards:
        blob = out_dir / blob_key(shard.sha256)
        script = 'zstd -q -d -c "$1" | tar -x -C "$2" -f -'
        subprocess.run(
            ["bash", "-o", "pipefail", "-c", script, "-", str(blob), str(dest)],
            check=True,
        )


def tar_members(out_dir: Path, sha256: str) -> list[tarfile.TarInfo]:
    data = (
        zstandard.ZstdDecompressor()
        .decompressobj()
        .decompress((out_dir / blob_key(sha256)).read_bytes())
    )
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return archive.getmembers()


def read_manifest(out_dir: Path, profile: str, digest: str) -> tuple[bytes, Manifest]:
    data = (out_dir / manifest_key(profile, digest)).read_bytes()
    return data, manifest_from_bytes(data)


def leftovers(out_dir: Path) -> list[str]:
    """Anything a failed run must not leave: partial blobs, work folders, temporary manifests."""
    return sorted(
        str(p.relative_to(out_dir))
        for p in out_dir.rglob("*")
        if p.name.endswith(".partial") or p.name.startswith(".pack-")
    )


# --- write_artifact on a hand-made tree (no uv) ----------------------------------------------


def _record(dist_info: Path, paths: list[str]) -> None:
    dist_info.mkdir(parents=True)
    name, version = dist_info.name[: -len(".dist-info")].split("-")
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    )
    rows = [*paths, f"{dist_info.name}/METADATA", f"{dist_info.name}/RECORD"]
    (dist_info / "RECORD").write_text("".join(f"{p},,\n" for p in rows))


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


@pytest.fixture
def hand_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    _write(tree / "a_pkg/__init__.py", b"")
    _write(tree / "a_pkg/data.bin", noise(200_000, "a"))
    _record(tree / "a_pkg-1.0.dist-info", ["a_pkg/__init__.py", "a_pkg/data.bin", "shared/x.py"])
    _write(tree / "b_pkg/__init__.py", b"B = 2\n", 0o664)
    _write(tree / "b_pkg/run.sh", b"#!/bin/sh\necho hi\n", 0o744)
    os.symlink("__init__.py", tree / "b_pkg/alias.py")
    _write(tree / "bin/b-tool", b"#!/bin/sh\n", 0o775)
    _write(tree / "shared/x.py", b"")
    _write(tree / "nvidia/x/lib/libx.so.3", b"\x7fELF")
    os.symlink("libx.so.3", tree / "nvidia/x/lib/libx.so")
    _write(tree / "torchish/lib/libtorchish.so", b"\x7fELF")
    _write(tree / "b_pkg/libb_ext.cpython-310-x86_64-linux-gnu.so", b"\x7fELF")
    _write(tree / "b_pkg.libs/libgfortran-4a5b6c.so.5", b"\x7fELF")
    # A full-scheme installer names scripts from site-packages: ../../bin/b-tool.
    b_files = ["b_pkg/__init__.py", "b_pkg/run.sh", "b_pkg/alias.py", "../../bin/b-tool"]
    b_files += [
        "b_pkg/libb_ext.cpython-310-x86_64-linux-gnu.so",
        "b_pkg.libs/libgfortran-4a5b6c.so.5",
    ]
    b_files += ["nvidia/x/lib/libx.so.3", "nvidia/x/lib/libx.so", "torchish/lib/libtorchish.so"]
    _record(tree / "b_pkg-2.0.dist-info", [*b_files, "shared/x.py"])
    _write(tree / "stray.txt", b"nobody claims me\n")
    (tree / "empty_dir").mkdir()
    return tree


def _artifact(tree: Path, out: Path) -> Manifest:
    return write_artifact(
        tree,
        out,
        profile="hand",
        digest="d" * 64,
        python="3.10",
        platform=PLATFORM,
        install_dir=INSTALL_DIR,
        shard_threshold=100_000,
    )


def test_write_artifact_shards_follow_distributions(hand_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    manifest = _artifact(hand_tree, out)
    by_packages = {shard.packages: shard for shard in manifest.shards}
    assert set(by_packages) == {("a-pkg",), ("b-pkg",), ("a-pkg", "b-pkg")}
    owned = {m.name for m in tar_members(out, by_packages[("a-pkg",)].sha256)}
    assert owned == {"a_pkg/__init__.py", "a_pkg/data.bin"} | {
        f"a_pkg-1.0.dist-info/{n}" for n in ("METADATA", "RECORD")
    }
    # The file both RECORDs claim and the file none claims share the leftover shard.
    leftover = [m.name for m in tar_members(out, by_packages[("a-pkg", "b-pkg")].sha256)]
    assert leftover == ["shared/x.py", "stray.txt"]
    assert any("stray.txt" in note for note in manifest.notes)
    assert any("shared/x.py" in note for note in manifest.notes)
    b_members = {m.name for m in tar_members(out, by_packages[("b-pkg",)].sha256)}
    assert "bin/b-tool" in b_members  # ../../bin/b-tool in RECORD means bin/b-tool

    for shard in manifest.shards:
        blob = out / blob_key(shard.sha256)
        data = blob.read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.bytes
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        assert hashlib.sha256(raw).hexdigest() == shard.tar_sha256 and len(raw) == shard.raw_bytes
        members = tar_members(out, shard.sha256)
        assert [m.name for m in members] == sorted(m.name for m in members)
        assert shard.files == len(members)
        for member in members:
            assert (member.mtime, member.uid, member.gid) == (FIXED_MTIME, 0, 0)
            assert (member.uname, member.gname) == ("", "")
            assert member.isfile() or member.issym()
            expected = 0o777 if member.issym() else None
            if member.isfile():
                expected = 0o755 if (hand_tree / member.name).stat().st_mode & 0o111 else 0o644
            assert member.mode == expected, member.name

    assert manifest.env == {
        "PYTHONPATH": INSTALL_DIR,
        "LD_LIBRARY_PATH": f"{INSTALL_DIR}/nvidia/x/lib:{INSTALL_DIR}/torchish/lib",
    }
    assert list(manifest.directories) == all_dirs(hand_tree)
    assert "empty_dir" in manifest.directories
    assert manifest.total_files == len(snapshot(hand_tree))
    assert {(p.name, p.version) for p in manifest.packages} == {("a-pkg", "1.0"), ("b-pkg", "2.0")}
    assert not leftovers(out)


def test_write_artifact_is_reproducible_and_unpacks_to_the_same_tree(
    hand_tree: Path, tmp_path: Path
) -> None:
    first = _artifact(hand_tree, tmp_path / "one")
    # Other times and group bits must not change a byte.
    for folder, _, filenames in os.walk(hand_tree):
        for name in filenames:
            path = Path(folder) / name
            os.utime(path, (1_700_000_000, 1_700_000_000))
            path.chmod(path.stat().st_mode | 0o060)
    second = _artifact(hand_tree, tmp_path / "two")
    assert first == second
    one = read_manifest(tmp_path / "one", "hand", "d" * 64)[0]
    assert one == read_manifest(tmp_path / "two", "hand", "d" * 64)[0]
    for shard in first.shards:
        key = blob_key(shard.sha256)
        data = (tmp_path / "one" / key).read_bytes()
        assert data == (tmp_path / "two" / key).read_bytes()
        # The init script's check where its image has b3sum: of the same bytes.
        assert shard.blake3 == blake3.blake3(data).hexdigest()

    dest = tmp_path / "unpacked"
    unpack(tmp_path / "one", first, dest)
    assert snapshot(dest) == snapshot(hand_tree)
    assert all_dirs(dest) == all_dirs(hand_tree)


def test_shards_store_literals_raw_for_a_cheaper_decode(tmp_path: Path) -> None:
    """Bytes from a skewed alphabet with few repeats: Huffman-coded literals would shrink them
    by a third, raw literals (what a pod decodes fastest) leave them near their size. The
    shard still decodes to the tar its manifest names (here with python-zstandard; the zstd
    CLI and bsdtar read such shards in the unpack and init-script tests)."""
    rng = random.Random(7)
    skewed = bytes(rng.choices(range(256), weights=[0.9**i for i in range(256)], k=300_000))
    tree = tmp_path / "tree"
    _write(tree / "s_pkg/table.bin", skewed)
    _record(tree / "s_pkg-1.0.dist-info", ["s_pkg/table.bin"])
    manifest = _artifact(tree, tmp_path / "out")
    (shard,) = [s for s in manifest.shards if s.packages == ("s-pkg",)]
    data = (tmp_path / "out" / blob_key(shard.sha256)).read_bytes()
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    assert hashlib.sha256(raw).hexdigest() == shard.tar_sha256
    huffman = zstandard.ZstdCompressor(level=9, write_checksum=False).compress(raw)
    assert len(huffman) < 0.7 * len(skewed)  # the data is what the test says it is
    assert shard.bytes > 0.9 * len(skewed)


def test_a_giant_distribution_is_packed_as_several_shards_that_unpack_to_it(
    hand_tree: Path, tmp_path: Path
) -> None:
    """a_pkg (200 kB of noise, above 64 kB) split at 64 kB: its big file alone, the rest
    together; the shards still unpack to the tree, and packing again gives the same bytes."""
    split = [
        write_artifact(
            hand_tree, tmp_path / name, profile="hand", digest="d" * 64, python="3.10",
            platform=PLATFORM, install_dir=INSTALL_DIR, shard_threshold=1_000,
            split_bytes=64_000,
        )
        for name in ("one", "two")
    ]  # fmt: skip
    assert split[0] == split[1]
    a_shards = [s for s in split[0].shards if s.packages == ("a-pkg",)]
    members = [{m.name for m in tar_members(tmp_path / "one", s.sha256)} for s in a_shards]
    assert {"a_pkg/data.bin"} in members and len(a_shards) == 2  # above the bound: alone
    assert all(s.raw_bytes <= 64_000 + 10_240 or s.files == 1 for s in split[0].shards)
    dest = tmp_path / "unpacked"
    unpack(tmp_path / "one", split[0], dest)
    assert snapshot(dest) == snapshot(hand_tree)


def test_plan_shards_keeps_groups_stable_when_one_small_package_changes() -> None:
    names = [f"pkg-{n:02d}" for n in range(40)]
    files = {f"{name}/f": 1000 for name in names}

    def groups(sizes: dict[str, int]) -> list[tuple[str, ...]]:
        ownership = Ownership({n: (f"{n}/f",) for n in names}, {}, ())
        return [p.packages for p in plan_shards(ownership, sizes, threshold=10_000)]

    before = groups(files)
    assert all(len(group) <= 10 for group in before) and len(before) > 4
    grown = groups({**files, "pkg-05/f": 9000})
    changed = [g for g in grown if g not in before]
    assert changed and len(changed) <= 3  # only up to the next boundary, not every later group
    assert sorted(n for g in before for n in g) == names


# --- materialise, fix, check: real uv into a --target tree ------------------------------------


def test_install_passes_route_each_package_to_its_own_index() -> None:
    lock = Lock(
        "p",
        "3.10",
        PLATFORM,
        "i",
        "b",
        (
            LockedPackage("torchlike", "2.3.1", ("sha256:" + "a" * 64,), "http://second/simple"),
            LockedPackage("numpy", "1.26.4", ("sha256:" + "b" * 64,), "http://main/simple"),
            LockedPackage("six", "1.16.0", ("sha256:" + "c" * 64,), "http://main/simple"),
            LockedPackage("unannotated", "1.0", ("sha256:" + "d" * 64,)),  # a pip-tools lock
        ),
    )
    passes = install_passes(
        lock, {"http://second/simple": "http://user:pw@second/simple"}, "http://default/simple"
    )
    assert [p.index_url for p in passes] == [
        "http://default/simple",
        "http://main/simple",
        "http://user:pw@second/simple",
    ]
    assert passes[0].requirements == f"unannotated==1.0 --hash=sha256:{'d' * 64}\n"
    assert passes[1].requirements.splitlines() == [
        f"numpy==1.26.4 --hash=sha256:{'b' * 64}",
        f"six==1.16.0 --hash=sha256:{'c' * 64}",
    ]
    assert passes[2].requirements.startswith("torchlike==2.3.1 ")


def test_pack_installs_a_routed_package_from_its_own_index_only(
    tmp_path: Path,
    wheels: dict[str, Path],
    index: str,
    local_index: Callable[[list[Path]], str],
) -> None:
    routed = build_wheel(tmp_path / "second", "routed-pkg", "1.0", tag=PLATFORM_TAG)
    second = local_index([routed])  # holds routed-pkg only; the main index lacks it
    profile = _profile(
        tmp_path,
        heavy=["routed-pkg==1.0", "small-a==1.0"],
        indexes=[{"name": "second", "url": second, "packages": ["routed-pkg"]}],
    )
    messages: list[str] = []
    result = _pack(
        profile, index, tmp_path / "store", on_progress=lambda m: messages.append(str(m))
    )
    assert {p.name for p in result.manifest.packages} == {"routed-pkg", "small-a"}
    assert sum("installing 1 package(s)" in m for m in messages) == 2, messages


def test_fix_tree_rewrites_shebangs_and_drops_bytecode(
    tmp_path: Path, wheels: dict[str, Path], index: str
) -> None:
    tree = tmp_path / "tree"
    _materialise(wheels, ["tool-pkg", "pth-pkg"], index, tree)
    assert (tree / "tool_pkg/__pycache__").is_dir()  # the wheel ships it
    fixes = fix_tree(tree, INTERPRETER)
    assert fixes.shebangs == ("bin/tool",)
    assert (tree / "bin/tool").read_text().splitlines()[0] == f"#!{INTERPRETER}"
    assert os.access(tree / "bin/tool", os.X_OK)
    record = (tree / "tool_pkg-1.0.dist-info/RECORD").read_text()
    line = next(r for r in record.splitlines() if r.startswith("bin/tool,"))
    assert line.endswith(f",{(tree / 'bin/tool').stat().st_size}")
    assert not list(tree.rglob("__pycache__")) and not list(tree.rglob("*.pyc"))
    assert not (tree / ".lock").exists()  # uv's own lock file is not part of the tree
    assert fixes.pth_notes and "pth_extra" in fixes.pth_notes[0]


@pytest.mark.parametrize(
    ("installed", "checked", "problem"),
    [
        (["small-a", "click"], ["small-a", "click"], "click==8.1.7 is excluded"),
        (["grpcio"], ["grpcio"], "would shadow the base image's grpcio==1.74.0"),
        (["small-a", "small-b"], ["small-a"], "small-b==1.0 is not in the lock"),
        (["small-a"], ["small-a", "small-b"], "small-b==1.0 is in the lock but was not installed"),
    ],
)
def test_check_tree_refuses_what_the_policy_or_lock_forbids(
    tmp_path: Path,
    wheels: dict[str, Path],
    index: str,
    installed: list[str],
    checked: list[str],
    problem: str,
) -> None:
    profile = _profile(tmp_path, heavy=["small-a==1.0"])
    tree = tmp_path / "tree"
    _materialise(wheels, installed, index, tree)
    with pytest.raises(PolicyViolationError) as caught:
        check_tree(tree, _lock(wheels, checked, index), profile)
    assert problem in str(caught.value)


def test_check_tree_accepts_the_lock(tmp_path: Path, wheels: dict[str, Path], index: str) -> None:
    profile = _profile(tmp_path, heavy=["small-a==1.0"])
    tree = tmp_path / "tree"
    lock = _materialise(wheels, ["small-a", "small-b"], index, tree)
    check_tree(tree, lock, profile)


def test_unpacked_shards_reproduce_the_materialised_tree(
    tmp_path: Path, wheels: dict[str, Path], index: str
) -> None:
    tree = tmp_path / "tree"
    _materialise(wheels, [n.split("==")[0] for n in HEAVY], index, tree)
    fix_tree(tree, INTERPRETER)
    out = tmp_path / "store"
    manifest = write_artifact(
        tree,
        out,
        profile="t",
        digest="e" * 64,
        python="3.10",
        platform=PLATFORM,
        install_dir=INSTALL_DIR,
        shard_threshold=THRESHOLD,
    )
    dest = tmp_path / "unpacked"
    unpack(out, manifest, dest)
    assert snapshot(dest) == snapshot(tree)
    assert all_dirs(dest) == all_dirs(tree)
    # nvidia/__init__.py comes with both nv-* wheels: packed once, in the leftover shard.
    holders = [s for s in manifest.shards if "nvidia/__init__.py" in _names(out, s.sha256)]
    assert len(holders) == 1 and holders[0].packages == ("nv-alpha", "nv-beta")


def _names(out: Path, sha256: str) -> list[str]:
    return [m.name for m in tar_members(out, sha256)]


# --- pack: the whole stage ----------------------------------------------------------------------


def test_pack_writes_a_manifest_the_pod_can_use(
    tmp_path: Path, wheels: dict[str, Path], index: str
) -> None:
    profile = _profile(tmp_path)
    out = tmp_path / "store"
    messages: list[str] = []
    result = _pack(profile, index, out, on_progress=lambda m: messages.append(str(m)))
    manifest = result.manifest
    assert not result.reused
    assert result.manifest_path == out / manifest_key(profile.name, manifest.digest)
    assert manifest_from_bytes(result.manifest_path.read_bytes()) == manifest
    assert {p.name for p in manifest.packages} == {h.split("==")[0] for h in HEAVY}
    assert ("big-pkg",) in {s.packages for s in manifest.shards}
    assert any(re.search(r"MB/s", m) for m in messages)

    dest = tmp_path / "unpacked"
    unpack(out, manifest, dest)
    assert (dest / "bin/tool").read_text().startswith(f"#!{INTERPRETER}\n")
    assert not list(dest.rglob("__pycache__")) and not list(dest.rglob("*.pyc"))
    library_path = manifest.env["LD_LIBRARY_PATH"].split(":")
    assert library_path == [f"{INSTALL_DIR}/nvidia/alpha/lib", f"{INSTALL_DIR}/nvidia/beta/lib"]
    for folder in library_path:
        local = dest / Path(folder).relative_to(INSTALL_DIR)
        assert any(re.search(r"\.so(\.\d+)*$", p.name) for p in local.iterdir())
    assert manifest.env["PYTHONPATH"] == f"{INSTALL_DIR}:{INSTALL_DIR}/pth_extra"
    assert any(n.startswith("pth_pkg.pth:") for n in manifest.notes)
    assert not leftovers(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(["blobs", profile.name])


def test_pack_twice_gives_identical_bytes_and_repack_reuses(
    tmp_path: Path, wheels: dict[str, Path], index: str
) -> None:
    profile = _profile(tmp_path)
    first = _pack(profile, index, tmp_path / "one")
    second = _pack(profile, index, tmp_path / "two")  # a second, separate install
    digest = first.manifest.digest
    assert (
        read_manifest(tmp_path / "one", profile.name, digest)[0]
        == (read_manifest(tmp_path / "two", profile.name, digest)[0])
    )
    for shard in first.manifest.shards:
        key = blob_key(shard.sha256)
        assert (tmp_path / "one" / key).read_bytes() == (tmp_path / "two" / key).read_bytes()
    assert second.manifest == first.manifest

    def stats(root: Path) -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*")}

    before = stats(tmp_path / "one")
    again = _pack(profile, index, tmp_path / "one")
    assert again.reused and again.manifest == first.manifest
    assert stats(tmp_path / "one") == before

    # A missing shard means not packed: the next run packs again.
    (tmp_path / "one" / blob_key(first.manifest.shards[0].sha256)).unlink()
    repaired = _pack(profile, index, tmp_path / "one")
    assert not repaired.reused and repaired.manifest == first.manifest


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_while_installing_leaves_nothing(
    tmp_path: Path, wheels: dict[str, Path], index: str, small_disk: Path
) -> None:
    profile = _profile(tmp_path, heavy=["huge-pkg==1.0", "small-a==1.0"])
    with pytest.raises(DiskFullError) as caught:
        _pack(profile, index, small_disk / "store")
    assert "out of disk space" in str(caught.value) and "free" in str(caught.value)
    assert caught.value.exit_code == 1
    assert not list((small_disk / "store").rglob("manifest.json"))
    assert not leftovers(small_disk / "store")
    assert not list((small_disk / "store").iterdir())


def test_disk_full_while_writing_shards_leaves_no_partial_blob(
    tmp_path: Path, wheels: dict[str, Path], index: str, small_disk: Path
) -> None:
    tree = tmp_path / "tree"
    _materialise(wheels, ["huge-pkg", "small-a"], index, tree)
    out = small_disk / "store"
    with pytest.raises(DiskFullError) as caught:
        write_artifact(
            tree,
            out,
            profile="t",
            digest="f" * 64,
            python="3.10",
            platform=PLATFORM,
            install_dir=INSTALL_DIR,
            shard_threshold=THRESHOLD,
        )
    message = str(caught.value)
    assert "out of disk space" in message and "3.0 MB installed" in message, message
    assert not (out / manifest_key("t", "f" * 64)).exists()
    assert not leftovers(out)
    for blob in (out / "blobs").iterdir():  # whatever is left is complete and named by its hash
        assert blob.name == f"{hashlib.sha256(blob.read_bytes()).hexdigest()}.tar.zst"


# --- the command line ---------------------------------------------------------------------------


def test_cli_pack_json(tmp_path: Path, wheels: dict[str, Path], index: str) -> None:
    path = write_profile(tmp_path, heavy=["small-a==1.0", "nv-alpha==1.0"])
    out = tmp_path / "store"
    result = run_cli("pack", str(path), "--out", str(out), "--index-url", index, "--json")
    assert result.returncode == 0, result.stderr
    document = result.json()
    assert Path(document["manifest"]).is_file()
    assert document["env"]["LD_LIBRARY_PATH"] == f"{INSTALL_DIR}/nvidia/alpha/lib"
    assert document["bytes"] == sum(s["bytes"] for s in document["shards"])
    assert not document["reused"]
    assert "MB/s" in result.stderr

    # The same folder named relative to the working directory.
    again = run_cli("pack", str(path), "--out", "store", "--index-url", index, "--json",
                    cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0 and again.json()["reused"], again.stderr
    assert again.json()["digest"] == document["digest"]


def test_cli_pack_without_the_cffi_backend_says_so_and_writes_no_artifact(
    tmp_path: Path, index: str
) -> None:
    """Raw literals come through python-zstandard's cffi backend: where it cannot be imported
    (no cffi), pack stops with a sentence naming what to install, not a traceback, and leaves
    no manifest and no partial blob behind."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nsys.modules['zstandard.backend_cffi'] = None  # import raises ImportError\n"
    )
    path = write_profile(tmp_path, heavy=["small-a==1.0", "nv-alpha==1.0"])
    out = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    result = run_cli("pack", str(path), "--out", str(out), "--index-url", index, env=env)
    assert result.returncode == 1, result.stderr
    assert "cffi backend is not importable" in result.stderr
    assert "install the cffi package" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(out.glob("*/*/manifest.json"))
    assert not leftovers(out)


def test_cli_pack_unknown_index_is_bad_input(tmp_path: Path) -> None:
    path = write_profile(tmp_path, heavy=["small-a==1.0"])
    result = run_cli("pack", str(path), "--out", str(tmp_path / "s"), "--index", "nope=http://x")
    assert result.returncode == 2
    assert "no [[index]] named 'nope'" in result.stderr
    assert not (tmp_path / "s").exists()


# --- the real thing -----------------------------------------------------------------------------


def _needed(library: Path) -> list[str]:
    output = subprocess.run(
        ["readelf", "-d", str(library)], capture_output=True, text=True, check=True
    ).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", output)


@pytest.mark.network
def test_onnx_gpu_profile_finds_every_cuda_library_onnxruntime_loads(tmp_path: Path) -> None:
    profile = load_profile(REPO / "profiles" / "onnx-gpu.toml")
    out = tmp_path / "store"
    try:
        result = pack_profile(profile, lock_path=tmp_path / "onnx-gpu.lock", out_dir=out)
        manifest = result.manifest
        dest = tmp_path / "unpacked"
        unpack(out, manifest, dest)
        folders = [
            dest / Path(folder).relative_to(profile.target.install_dir)
            for folder in manifest.env["LD_LIBRARY_PATH"].split(":")
        ]
        assert all(folder.is_dir() for folder in folders)
        provider = dest / "onnxruntime/capi/libonnxruntime_providers_cuda.so"
        needed = _needed(provider)
        cuda = [
            n for n in needed if re.match(r"lib(cudnn|cublas|cublasLt|cudart|cufft|curand)\.", n)
        ]
        assert {n.split(".so")[0] for n in cuda} >= {
            "libcudnn",
            "libcublas",
            "libcublasLt",
            "libcudart",
            "libcufft",
            "libcurand",
        }, needed
        missing = [n for n in cuda if not any((folder / n).exists() for folder in folders)]
        assert not missing, (
            f"onnxruntime's CUDA provider needs {missing}, which no LD_LIBRARY_PATH folder"
            f" ({manifest.env['LD_LIBRARY_PATH']}) holds: it would fall back to the CPU"
        )
        big = {s.packages for s in manifest.shards if len(s.packages) == 1}
        assert ("nvidia-cudnn-cu12",) in big and ("onnxruntime-gpu",) in big
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(tmp_path / "unpacked", ignore_errors=True)


def test_shebang_for_an_interpreter_path_with_a_space_still_runs(tmp_path: Path) -> None:
    folder = tmp_path / "my env" / "bin"
    folder.mkdir(parents=True)
    interpreter = folder / "python3"
    interpreter.symlink_to(sys.executable)
    script = tmp_path / "tool"
    script.write_bytes(shebang_for(str(interpreter)) + b"import sys; print(sys.argv[1:])\n")
    script.chmod(0o755)
    assert subprocess.run([str(script), "a b"], capture_output=True, text=True).stdout == (
        "['a b']\n"
    )
