"""The fast layer: the pure parts of each stage, fed plain dataclasses, no files, no services.

Integration tests beside this folder run the same stages against uv, Azurite, Docker and real
wheels; these pin down the rules themselves, each in milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.backends import Job, constraint_lines, explain_conflict, project_toml
from builder.base import BaseSnapshot, parse_snapshot
from builder.errors import FormatError, IntegrityError, PolicyViolationError
from builder.fetch import member_problem
from builder.fields import install_dir_problem, relative_path_problem
from builder.initscript import leaf_directories, render_init_script, shard_label
from builder.lock import Excluded, Lock, LockedPackage, parse_lock, render_lock
from builder.manifest import Manifest, Shard, manifest_from_bytes, manifest_to_bytes
from builder.profile import Index, Policy, Profile, Target
from builder.resolve import inputs_digest, partition
from builder.secrets import redact_url, scrub
from builder.tree import Ownership, plan_shards, split_paths
from builder.units import megabytes, parse_duration, plural

SNAPSHOT = BaseSnapshot(
    Path("base.txt"),
    {"protobuf": "4.25.8", "numpy": "1.26.4", "click": "8.1.7", "grpcio": "1.74.0"},
    b"protobuf==4.25.8\nnumpy==1.26.4\nclick==8.1.7\ngrpcio==1.74.0\n",
)


def profile(**policy: tuple[str, ...]) -> Profile:
    return Profile(
        path=Path("unit.toml"),
        name="unit",
        description="",
        target=Target(
            base_image="base:1",
            base_packages=Path("base.txt"),
            python="3.10",
            platform="x86_64-manylinux_2_28",
            interpreter="/usr/bin/python3",
        ),
        heavy=("alpha==1.0",),
        policy=Policy(
            constraints=("protobuf<5", "numpy<2"),
            exclude=policy.get("exclude", ("click",)),
            allow_shadow=policy.get("allow_shadow", ()),
        ),
        indexes=(Index("torch", "https://torch.example.invalid/whl", ("torchlike",)),),
        data=b'name = "unit"\n',
        snapshot=SNAPSHOT,
    )


def pin(name: str, version: str, index: str | None = None) -> LockedPackage:
    return LockedPackage(name, version, ("sha256:" + "a" * 64,), index, ("(profile)",))


# --- resolution rules -------------------------------------------------------------------------


def test_partition_ships_only_what_the_base_lacks() -> None:
    resolved = [pin("alpha", "1.0"), pin("numpy", "1.26.4"), pin("click", "8.1.7")]
    shipped, provided, excluded, shadowed = partition(resolved, profile(), SNAPSHOT, ())
    assert [p.name for p in shipped] == ["alpha"]  # rule 5
    assert [p.name for p in provided] == ["numpy"]  # same version as the base
    assert [e.name for e in excluded] == ["click"]  # rule 2: never shipped
    assert shadowed == []


def test_partition_refuses_shadowing_unless_allowed() -> None:
    resolved = [pin("grpcio", "1.75.0")]
    with pytest.raises(PolicyViolationError, match=r"shadow the base image's grpcio==1\.74\.0"):
        partition(resolved, profile(), SNAPSHOT, ())
    shipped, _, _, shadowed = partition(resolved, profile(allow_shadow=("grpcio",)), SNAPSHOT, ())
    assert [p.name for p in shipped] == ["grpcio"]
    assert [(s.version, s.base_version) for s in shadowed] == [("1.75.0", "1.74.0")]


def test_partition_refuses_a_routed_package_from_another_index() -> None:
    unit = profile()
    routed = [pin("torchlike", "2.0", "https://torch.example.invalid/whl")]
    assert partition(routed, unit, SNAPSHOT, unit.indexes)[0][0].name == "torchlike"
    elsewhere = [pin("torchlike", "2.0", "https://default.example.invalid/simple")]
    with pytest.raises(PolicyViolationError, match="from index 'torch'"):  # rule 4
        partition(elsewhere, unit, SNAPSHOT, unit.indexes)


def test_constraints_pin_the_base_then_apply_the_policy() -> None:
    lines = constraint_lines(profile(allow_shadow=("grpcio",)), SNAPSHOT)
    assert "numpy==1.26.4" in lines and "protobuf<5" in lines
    assert not any(line.startswith("grpcio") for line in lines)  # allowed to be replaced
    toml = project_toml(profile(), profile().indexes)
    assert "explicit = true" in toml and '"torchlike" = { index = "torch" }' in toml


def test_a_conflict_is_explained_with_where_its_pins_come_from() -> None:
    text = explain_conflict(
        "Because wants-protobuf5 depends on protobuf>=5 and protobuf==4.25.8 ...",
        profile(),
        SNAPSHOT,
    )
    assert "protobuf==4.25.8 is pinned by the base image (base.txt)" in text  # rule 6
    assert "protobuf<5 comes from [policy] constraints" in text


def test_inputs_change_with_the_job_and_settings_not_otherwise() -> None:
    from builder.indexes import IndexSettings

    unit = profile()
    heavy = inputs_digest(unit, Job(), IndexSettings())
    assert heavy == inputs_digest(unit, Job(), IndexSettings())  # rule 7
    assert heavy != inputs_digest(unit, Job(), IndexSettings(default_url="https://x.invalid"))
    light = Job(requirements=("beta",), set_name="light", provided={"alpha": "1.0"})
    assert heavy != inputs_digest(unit, light, IndexSettings())


# --- the lock --------------------------------------------------------------------------------


def lock(unit: Profile) -> Lock:
    return Lock(
        profile=unit.name,
        python="3.10",
        platform="x86_64-manylinux_2_28",
        inputs="i",
        backend="uv 0.9",
        packages=(pin("alpha", "1.0"),),
        interpreter=unit.target.interpreter,
        install_dir=unit.target.install_dir,
        sources=unit.sources,
        excluded=(Excluded("click", "8.1.7", ("alpha",)),),
    )


def test_a_lock_is_written_and_read_back_unchanged() -> None:
    unit = profile()
    text = render_lock(lock(unit), unit.target.install_dir)
    again = parse_lock(text, "unit.lock")
    assert again == replace(lock(unit), packages=again.packages)
    assert again.digest() == lock(unit).digest()
    assert render_lock(again, unit.target.install_dir) == text


def test_one_freshness_rule_says_what_changed() -> None:
    unit = profile()
    assert lock(unit).staleness(unit) == ()
    edited = replace(unit, data=unit.data + b"# edited\n")
    assert "changed since it was written" in lock(unit).staleness(edited)[0]
    moved = replace(unit, target=replace(unit.target, install_dir="/deps"))
    assert any("install folder" in r for r in lock(unit).staleness(moved))
    assert lock(unit).staleness(unit, inputs="other") != ()


def test_a_lock_pin_without_a_hash_is_refused() -> None:
    unit = profile()
    text = render_lock(lock(unit), unit.target.install_dir)
    unhashed = "\n".join(line for line in text.splitlines() if "--hash" not in line) + "\n"
    with pytest.raises(FormatError, match="pin alpha"):
        parse_lock(unhashed.replace("alpha==1.0 \\", "alpha==1.0"), "unit.lock")


# --- shards and manifests --------------------------------------------------------------------


def test_large_distributions_get_a_shard_of_their_own() -> None:
    owned: dict[str, tuple[str, ...]] = {
        "big": ("big/a.so",),
        "s1": ("s1/x.py",),
        "s2": ("s2/x.py",),
    }
    sizes = {"big/a.so": 5000, "s1/x.py": 10, "s2/x.py": 10, "shared.txt": 3}
    plans = plan_shards(Ownership(owned, {"shared.txt": ("s1", "s2")}, ()), sizes, 1000)
    assert ("big",) in [p.packages for p in plans]
    assert sorted(path for p in plans for path in p.paths) == sorted(sizes)  # each once
    # Files several distributions claim go to one shard of their own, packed once.
    assert [p.paths for p in plans].count(("shared.txt",)) == 1


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=40),
    bound=st.integers(min_value=1, max_value=4000),
)
def test_a_giant_distribution_is_split_by_whole_files_under_the_bound(
    sizes: list[int], bound: int
) -> None:
    paths = [f"giant/f{n:03d}.so" for n in range(len(sizes))]
    file_sizes = dict(zip(paths, sizes, strict=True))
    parts = split_paths(paths, file_sizes, bound)
    assert sorted(p for part in parts for p in part) == paths  # every file once
    for part in parts:
        # Under the bound, but for a file larger than it alone.
        assert sum(file_sizes[p] for p in part) <= bound or len(part) == 1
        assert part == sorted(part)
    total = sum(sizes)
    if total <= bound:
        assert parts == [paths]
    else:
        alone = sum(1 for size in sizes if size > bound)
        rest = total - sum(size for size in sizes if size > bound)
        # Never much more than the fewest parts that could hold the rest.
        assert len(parts) - alone <= 2 * -(-rest // bound) + 1
    assert split_paths(paths, file_sizes, bound) == parts  # reproducible


def test_splitting_one_distribution_never_moves_another_ones_shards() -> None:
    owned = {
        "giant": tuple(f"giant/lib{n}.so" for n in range(6)),
        "other": ("other/a.so", "other/b.so"),
    }
    sizes = {**{p: 400 for p in owned["giant"]}, "other/a.so": 700, "other/b.so": 700}
    before = plan_shards(Ownership(owned, {}, ()), sizes, 100, split_bytes=1000)
    giant = [p.paths for p in before if p.packages == ("giant",)]
    assert len(giant) == 3 and all(len(paths) == 2 for paths in giant)
    sizes |= {"other/a.so": 900, "other/c.so": 50}  # "other" upgraded: bigger, one more file
    upgraded = plan_shards(
        Ownership({**owned, "other": (*owned["other"], "other/c.so")}, {}, ()),
        sizes, 100, split_bytes=1000,
    )  # fmt: skip
    assert [p.paths for p in upgraded if p.packages == ("giant",)] == giant


def manifest(**changes: object) -> Manifest:
    shard = Shard("b" * 64, 10, "c" * 64, 20, 2, ("alpha",))
    base = Manifest("d" * 64, "unit", "3.10", "x86_64-manylinux_2_28", "/shared-packages",
                    (shard,), {"PYTHONPATH": "/shared-packages"}, (), ("alpha", "alpha/sub"))  # fmt: skip
    return replace(base, **changes)  # type: ignore[arg-type]  # the fields are the Manifest's


def test_the_manifest_reader_takes_what_the_writer_writes_and_nothing_unsafe() -> None:
    assert manifest_from_bytes(manifest_to_bytes(manifest())) == manifest()
    for bad in (manifest(directories=("../x",)), manifest(install_dir="/")):
        with pytest.raises(FormatError):
            manifest_from_bytes(manifest_to_bytes(bad))


def test_a_shard_s_blake3_is_optional_in_a_manifest_and_checked_when_there() -> None:
    # A manifest packed before BLAKE3 was recorded has no such field, and keeps its bytes.
    assert b'"blake3"' not in manifest_to_bytes(manifest())
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    older = next((fixtures / "deploy-repo" / "store").rglob("manifest.json"))
    data = older.read_bytes()
    assert b'"blake3"' not in data
    assert manifest_to_bytes(manifest_from_bytes(data)) == data
    pinned = manifest(shards=(replace(manifest().shards[0], blake3="e" * 64),))
    data = manifest_to_bytes(pinned)
    assert b'"blake3": "' + b"e" * 64 + b'"' in data
    assert manifest_from_bytes(data) == pinned
    for wrong in ("E" * 64, "e" * 63, "e" * 64 + "\n", "", 7, None):
        document = json.loads(data)
        document["shards"][0]["blake3"] = wrong
        with pytest.raises(FormatError, match=r"shards\[0\]\.blake3"):
            manifest_from_bytes(json.dumps(document).encode(), where="m.json")
    text = render_init_script(pinned, "https://acct.blob.core.windows.net/c")
    assert f"{'b' * 64} 10 2 {'e' * 64} alpha" in text


def test_the_init_script_pins_the_manifest_and_refuses_a_secret_url() -> None:
    text = render_init_script(manifest(), "https://acct.blob.core.windows.net/c")
    assert "readonly DIGEST=" + "d" * 64 in text and "b" * 64 + " 10 2 - alpha" in text
    with pytest.raises(Exception, match="GPUBUILD_SAS"):
        render_init_script(manifest(), "https://acct.blob.core.windows.net/c?sig=abc")
    with pytest.raises(IntegrityError):
        render_init_script(replace(manifest(), digest="not-a-digest"), "https://a.invalid/c")
    assert leaf_directories(("a", "a/b", "c")) == ["a/b", "c"]
    assert shard_label(tuple(f"nvidia-lib-{n}" for n in range(20))).endswith("-more")


def test_fetch_judges_each_member_before_it_is_extracted() -> None:
    import tarfile

    ok = tarfile.TarInfo("alpha/x.py")
    assert member_problem(ok) is None
    link = tarfile.TarInfo("alpha/l")
    link.type, link.linkname = tarfile.SYMTYPE, "../../etc"
    assert "lead out" in (member_problem(link) or "")
    # An image layer's whiteout would hide files of the layers below in a registry image.
    for name in (".wh..wh..opq", "alpha/.wh.x.py", ".wh.alpha/x.py"):
        assert "whiteout" in (member_problem(tarfile.TarInfo(name)) or ""), name


# --- fields, secrets, units ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "ok"),
    [("/shared-packages", True), ("/opt/deps", True), ("/", False), ("/.", False),
     ("/a/../..", False), ("/usr", False), ("/proc/1", False), ("rel", False), ("/a/", False)],
)  # fmt: skip
def test_install_dir_rules(path: str, ok: bool) -> None:
    assert (install_dir_problem(path) is None) == ok


@pytest.mark.parametrize(
    "path", ["../x", "/x", "a//b", "a/./b", ".gpubuild/x", "a\nb", "", ".wh..wh..opq", "a/.wh.b"]
)
def test_relative_paths_that_could_leave_the_tree(path: str) -> None:
    assert relative_path_problem(path) is not None


def test_secrets_and_units() -> None:
    assert redact_url("https://u:p4ssword@h/x?t=1") == "https://h/x"
    assert "p4ssword" not in scrub("GET https://u:p4ssword@h/x failed")
    assert megabytes(50_000) == "50.0 kB" and megabytes(2_500_000) == "2.5 MB"
    assert plural(1, "file") == "1 file" and plural(2183, "file") == "2,183 files"
    assert parse_duration("24h").total_seconds() == 86400
    assert parse_snapshot("# c\nNumPy==1.26.4\n", "s.txt") == {"numpy": "1.26.4"}


# --- the heavy set as an OCI image -------------------------------------------------------------


def test_the_image_layers_are_the_shards_after_the_folders() -> None:
    import hashlib
    import json

    from builder.ociimage import (
        IMAGE_MANIFEST,
        LAYER_TAR,
        LAYER_ZSTD,
        TreeEntry,
        build_image,
        copier_layer,
    )

    heavy = build_image(manifest(), version="0.1.0")
    document = json.loads(heavy.manifest)
    assert document["mediaType"] == IMAGE_MANIFEST
    assert [layer["mediaType"] for layer in document["layers"]] == [LAYER_TAR, LAYER_ZSTD]
    assert document["layers"][1]["digest"] == "sha256:" + "b" * 64  # the shard itself
    config = json.loads(heavy.config.data)
    assert config["rootfs"]["diff_ids"][1] == "sha256:" + "c" * 64  # its tar_sha256
    assert config["gpubuild"]["digest"] == "d" * 64
    assert document["annotations"]["dev.gpubuild.digest"] == "d" * 64
    assert heavy.digest == "sha256:" + hashlib.sha256(heavy.manifest).hexdigest()
    assert build_image(manifest(), version="0.1.0") == heavy  # reproducible
    entries = (TreeEntry("alpha", manifest().total_files),)
    copier_blob = copier_layer(manifest(), b"\x7fELF", entries)
    copy = build_image(manifest(), version="0.1.0", copier=copier_blob)
    assert json.loads(copy.manifest)["layers"][:2] == document["layers"]
    # The copier lives in the state folder's name, which no tree may use.
    assert json.loads(copy.config.data)["config"]["Entrypoint"][-1] == "/.gpubuild/copy.sh"
    import io
    import tarfile

    copier = copy.extra_layers[-1]
    with tarfile.open(fileobj=io.BytesIO(copier.data)) as tar:
        names = tar.getnames()
        folders = tar.extractfile(".gpubuild/folders")
        assert folders is not None
        listed = folders.read().decode().splitlines()
    assert names == [
        ".gpubuild",
        ".gpubuild/busybox",
        ".gpubuild/copy.sh",
        ".gpubuild/folders",
        ".gpubuild/entries",
    ]
    assert listed == sorted(set(manifest().directories))


def test_the_image_names_the_platforms_architecture_and_checks_itself() -> None:
    import json

    from builder.ociimage import build_image, check_image, oci_architecture

    assert [
        oci_architecture(p) for p in ("x86_64-manylinux_2_28", "aarch64-manylinux2014", "linux")
    ] == [
        "amd64",
        "arm64",
        "amd64",
    ]
    arm = manifest(platform="aarch64-manylinux_2_28")
    image = build_image(arm, version="0.1.0")
    config = json.loads(image.config.data)
    assert config["architecture"] == "arm64"
    document = json.loads(image.manifest)
    check_image(document, config, arm, None, "image")  # what build_image makes passes
    with pytest.raises(IntegrityError, match="architecture"):
        check_image(document, {**config, "architecture": "amd64"}, arm, None, "image")
    with pytest.raises(IntegrityError, match="layers are not exactly"):
        extra = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:" + "e" * 64,
                 "size": 1, "urls": ["https://attacker.invalid/layer"]}  # fmt: skip
        check_image(
            {**document, "layers": [*document["layers"], extra]}, config, arm, None, "image"
        )
    with pytest.raises(IntegrityError, match="no image architecture"):
        build_image(manifest(platform="riscv64-linux"), version="0.1.0")


def test_only_a_static_executable_for_a_known_machine_is_a_busybox(tmp_path: Path) -> None:
    import struct

    from builder.ociimage import BUSYBOX_LIMIT, read_static_busybox, static_executable_architecture

    def elf(kind: int, machine: int, interpreter: bool = False) -> bytes:
        header = bytearray(64 + 56 * 2)
        header[:6] = b"\x7fELF\x02\x01"
        struct.pack_into("<HH", header, 0x10, kind, machine)
        struct.pack_into("<Q", header, 0x20, 64)  # program headers right after this one
        struct.pack_into("<HH", header, 0x36, 56, 2)
        struct.pack_into("<I", header, 64, 1)  # PT_LOAD
        struct.pack_into("<I", header, 64 + 56, 3 if interpreter else 1)  # PT_INTERP or PT_LOAD
        return bytes(header)

    assert static_executable_architecture(elf(2, 62)) == "amd64"
    assert static_executable_architecture(elf(3, 183)) == "arm64"  # a static-pie
    assert static_executable_architecture(elf(3, 62, interpreter=True)) is None  # dynamic
    assert static_executable_architecture(elf(1, 62)) is None  # a relocatable object
    assert static_executable_architecture(elf(2, 3)) is None  # i386
    assert static_executable_architecture(elf(2, 62) + bytes(BUSYBOX_LIMIT)) is None  # too big
    assert read_static_busybox(Path("/dev/zero")) is None  # not a file: never read to the end
    (tmp_path / "bb").write_bytes(elf(2, 183))
    found = read_static_busybox(tmp_path / "bb")
    assert found is not None and found.architecture == "arm64"


def test_registry_urls_are_read_strictly() -> None:
    from builder.errors import BadInputError
    from builder.stores.urls import parse_oci_url, parse_store_url

    digest = "sha256:" + "a" * 64
    for url in ("oci://reg.example.com/repo\n", f"oci://reg.example.com/repo@{digest}\n",
                "oci://reg.example.com/repo:tag\n", "oci://../repo", "oci://-/repo", "oci://./repo",
                "oci://reg:0/repo", "oci://reg:99999/repo", "oci+http://10.0.0.5:5000/repo",
                "oci+http://registry.example.com/repo", "oci://[::zz]:5000/repo"):  # fmt: skip
        with pytest.raises(BadInputError):
            parse_oci_url(url)
    # :443 is the registry itself: the Docker config and the kubelet know it without the port.
    assert parse_oci_url("oci://Reg.Example.com:443/repo")[0].registry == "reg.example.com"
    assert parse_oci_url("oci+http://localhost:5000/a")[0].api == "http://localhost:5000/v2/a"
    assert parse_oci_url("oci://[::1]:5000/a")[0].registry == "[::1]:5000"
    with pytest.raises(BadInputError) as refused:
        parse_store_url("oci://reg.example.com/re@po")
    assert "oci://reg.example.com/re:" in str(refused.value) and "'po'" in str(refused.value)


def test_registry_deliveries_name_an_image_the_kubelet_finds() -> None:
    from builder.errors import BadInputError
    from builder.k8s import pod_snippet

    digest = "@sha256:" + "1" * 64
    for image in ("[::1]:5000/gpubuild/x", "localhost/x", "reg.example.com/x", "reg:5000/x"):
        assert pod_snippet(manifest(), image=image + digest, delivery="image-volume").image
    with pytest.raises(BadInputError, match=r"docker\.io"):
        pod_snippet(manifest(), image="registry/x" + digest, delivery="init-copy")
    with pytest.raises(BadInputError, match="by digest"):
        pod_snippet(manifest(), image="reg.example.com/x" + digest + "\n", delivery="init-copy")


def test_a_token_realm_must_be_https_and_the_environments_credentials_stay_home() -> None:
    from builder.stores.registry_auth import RegistryCredentials, parse_challenge, realm_problem

    registry = ("https", "reg.example.com", 443)
    bound = RegistryCredentials("the Docker config", "u", "p")
    loose = RegistryCredentials(
        "GPUBUILD_REGISTRY_USERNAME/PASSWORD", "u", "p", bound_to_host=False
    )
    assert (
        realm_problem("https://auth.example.com/token", registry, bound, registry_is_http=False)
        is None
    )
    assert "plain HTTP" in (
        realm_problem("http://auth.example.com/t", registry, bound, registry_is_http=False) or ""
    )
    assert "another host" in (
        realm_problem("https://auth.example.com/t", registry, loose, registry_is_http=False) or ""
    )
    assert (
        realm_problem(
            "https://reg.example.com/oauth2/token", registry, loose, registry_is_http=False
        )
        is None
    )
    assert parse_challenge('Bearer realm="https://a/t",service="s",scope="x"').service == "s"
    assert parse_challenge("\x1b[2JEvil x").scheme == "unknown"
