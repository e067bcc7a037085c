"""`gpubuild resolve` against real uv and real (small, built-here) wheels on loopback indexes."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from builder.base import read_snapshot
from builder.errors import BackendUnavailableError, PolicyViolationError, ResolutionError
from builder.indexes import IndexSettings
from builder.lock import read_lock
from builder.profile import load_profile
from builder.resolve import ensure_lock
from tests.helpers import REPO, run_cli, write_profile
from tests.support.index import serve_index
from tests.support.wheels import build_sdist, build_wheel

PLATFORM_TAG = "cp310-cp310-manylinux_2_28_x86_64"


@pytest.fixture(scope="module")
def main_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    dists = tmp_path_factory.mktemp("main-dists")
    wheels = [
        build_wheel(dists, "protobuf", "4.25.8"),
        build_wheel(dists, "protobuf", "5.27.0"),
        build_wheel(dists, "numpy", "1.26.4", tag=PLATFORM_TAG),
        build_wheel(dists, "numpy", "2.1.0", tag=PLATFORM_TAG),
        build_wheel(dists, "click", "8.1.7"),
        build_wheel(dists, "packaging", "23.0"),
        build_wheel(dists, "grpcio", "1.74.0", tag=PLATFORM_TAG),
        build_wheel(dists, "grpcio", "1.60.0", tag=PLATFORM_TAG),
        build_wheel(dists, "wants-protobuf5", "1.0", requires=["protobuf>=5"]),
        build_wheel(dists, "pulls-numpy", "1.0", requires=["numpy"], tag=PLATFORM_TAG),
        build_wheel(dists, "needs-numpy2", "1.0", requires=["numpy>=2"]),
        build_wheel(dists, "uses-click", "1.0", requires=["click>=8"]),
        build_wheel(dists, "same-as-base", "1.0", requires=["packaging==23.0", "helper-lib"]),
        build_wheel(dists, "helper-lib", "0.3"),
        build_wheel(dists, "shadower", "1.0", requires=["grpcio==1.60.0"]),
        build_wheel(dists, "mac-only", "1.0", tag="cp310-cp310-macosx_11_0_arm64"),
        build_sdist(dists, "sdist-only", "1.0"),
        # A look-alike on the main index: routing must never pick it (dependency confusion).
        build_wheel(dists, "torchlike", "9.9"),
        build_wheel(dists, "uses-torchlike", "1.0", requires=["torchlike"]),
    ]
    root = tmp_path_factory.mktemp("main-index")
    with serve_index(wheels, root) as url:
        yield url


@pytest.fixture(scope="module")
def second_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    dists = tmp_path_factory.mktemp("second-dists")
    wheels = [build_wheel(dists, "torchlike", "2.3.1", requires=["numpy"], tag=PLATFORM_TAG)]
    root = tmp_path_factory.mktemp("second-index")
    with serve_index(wheels, root) as url:
        yield url


def _resolve(tmp_path: Path, index: str, **profile: object):
    path = write_profile(tmp_path, **profile)  # type: ignore[arg-type]
    return ensure_lock(load_profile(path), settings=IndexSettings(default_url=index))


def _shipped(result) -> dict[str, str]:
    return {p.name: p.version for p in result.lock.packages}


def test_protobuf5_conflict_names_both_sides(tmp_path: Path, main_index: str) -> None:
    with pytest.raises(ResolutionError) as caught:
        _resolve(tmp_path, main_index, heavy=["wants-protobuf5==1.0"])
    message = str(caught.value)
    assert "wants-protobuf5" in message and "protobuf>=5" in message
    assert "protobuf==4.25.8 is pinned by the base image" in message
    assert "protobuf<5 comes from [policy] constraints" in message
    assert not (tmp_path / "test-profile.lock").exists()


def test_numpy_is_held_below_2_and_not_shipped(tmp_path: Path, main_index: str) -> None:
    result = _resolve(tmp_path, main_index, heavy=["pulls-numpy==1.0"])
    assert "numpy" not in _shipped(result)
    assert ("numpy", "1.26.4") in {(p.name, p.version) for p in result.lock.provided_by_base}
    assert _shipped(result) == {"pulls-numpy": "1.0"}


def test_numpy2_requirement_fails_clearly(tmp_path: Path, main_index: str) -> None:
    with pytest.raises(ResolutionError) as caught:
        _resolve(tmp_path, main_index, heavy=["needs-numpy2==1.0"])
    message = str(caught.value)
    assert "numpy>=2" in message
    assert "numpy==1.26.4 is pinned by the base image" in message


def test_click_is_excluded_and_reported(tmp_path: Path, main_index: str) -> None:
    result = _resolve(tmp_path, main_index, heavy=["uses-click==1.0"])
    assert "click" not in _shipped(result)
    [excluded] = result.lock.excluded
    assert excluded.name == "click" and excluded.required_by == ("uses-click",)
    lock_text = result.lock_path.read_text()
    assert "\nclick==" not in lock_text


def test_dependency_in_base_at_same_version_is_not_shipped(tmp_path: Path, main_index: str) -> None:
    result = _resolve(tmp_path, main_index, heavy=["same-as-base==1.0"])
    assert _shipped(result) == {"helper-lib": "0.3", "same-as-base": "1.0"}
    assert [(p.name, p.version) for p in result.lock.provided_by_base] == [("packaging", "23.0")]


def test_shadowing_a_base_package_needs_allow_shadow(tmp_path: Path, main_index: str) -> None:
    with pytest.raises(ResolutionError, match=r"grpcio==1.74.0 is pinned by the base image"):
        _resolve(tmp_path, main_index, heavy=["shadower==1.0"])
    result = _resolve(tmp_path, main_index, heavy=["shadower==1.0"], allow_shadow=["grpcio"])
    assert _shipped(result)["grpcio"] == "1.60.0"
    [shadowed] = result.lock.shadowed
    assert (shadowed.name, shadowed.version, shadowed.base_version) == (
        "grpcio",
        "1.60.0",
        "1.74.0",
    )


def test_routed_package_comes_from_its_index_only(
    tmp_path: Path, main_index: str, second_index: str
) -> None:
    indexes = [{"name": "second", "url": second_index, "packages": ["torchlike"]}]
    result = _resolve(tmp_path, main_index, heavy=["torchlike"], indexes=indexes)
    torchlike = next(p for p in result.lock.packages if p.name == "torchlike")
    # The main index has a higher version; taking it would be dependency confusion.
    assert torchlike.version == "2.3.1"
    assert torchlike.index_url == second_index
    assert "numpy" not in _shipped(result)


def test_routed_package_pulled_in_by_another_comes_from_its_index(
    tmp_path: Path, main_index: str, second_index: str
) -> None:
    """uv routes direct dependencies only; gpubuild makes a routed dependency direct."""
    indexes = [{"name": "second", "url": second_index, "packages": ["torchlike"]}]
    result = _resolve(tmp_path, main_index, heavy=["uses-torchlike==1.0"], indexes=indexes)
    torchlike = next(p for p in result.lock.packages if p.name == "torchlike")
    assert (torchlike.version, torchlike.index_url) == ("2.3.1", second_index)


def test_index_override_from_command_line(
    tmp_path: Path, main_index: str, second_index: str
) -> None:
    """`--index NAME=URL` replaces an unreachable production index (as tests do for cu121)."""
    indexes = [
        {"name": "second", "url": "http://127.0.0.1:9/unreachable", "packages": ["torchlike"]}
    ]
    path = write_profile(tmp_path, heavy=["torchlike"], indexes=indexes)
    result = run_cli(
        "resolve",
        str(path),
        "--index-url",
        main_index,
        "--index",
        f"second={second_index}",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    shipped = {p["name"]: p["version"] for p in result.json()["shipped"]}
    assert shipped["torchlike"] == "2.3.1"


def test_sdist_only_package_is_a_clear_error(tmp_path: Path, main_index: str) -> None:
    with pytest.raises(ResolutionError) as caught:
        _resolve(tmp_path, main_index, heavy=["sdist-only==1.0"])
    assert "No wheel for python 3.10 on x86_64-manylinux_2_28: sdist-only" in str(caught.value)


def test_wrong_platform_wheel_is_a_clear_error(tmp_path: Path, main_index: str) -> None:
    with pytest.raises(ResolutionError) as caught:
        _resolve(tmp_path, main_index, heavy=["mac-only==1.0"])
    assert "mac-only" in str(caught.value)


def test_unchanged_inputs_rewrite_nothing(tmp_path: Path, main_index: str) -> None:
    first = _resolve(tmp_path, main_index, heavy=["uses-click==1.0", "pulls-numpy==1.0"])
    assert first.rewritten
    before = first.lock_path.stat()
    second = _resolve(tmp_path, main_index, heavy=["uses-click==1.0", "pulls-numpy==1.0"])
    assert not second.rewritten
    after = second.lock_path.stat()
    assert (before.st_mtime_ns, before.st_ino) == (after.st_mtime_ns, after.st_ino)
    assert second.lock == first.lock
    # A changed input resolves again.
    third = _resolve(tmp_path, main_index, heavy=["uses-click==1.0"])
    assert third.rewritten and "pulls-numpy" not in _shipped(third)


def test_cli_json_report_and_lock_installs_with_pip(tmp_path: Path, main_index: str) -> None:
    path = write_profile(
        tmp_path, heavy=["uses-click==1.0", "same-as-base==1.0", "pulls-numpy==1.0"]
    )
    lock = tmp_path / "out" / "my.lock"
    result = run_cli("resolve", str(path), "-o", str(lock), "--index-url", main_index, "--json")
    assert result.returncode == 0, result.stderr
    document = result.json()
    assert document["lock"] == str(lock)
    assert {p["name"] for p in document["shipped"]} == {
        "uses-click",
        "same-as-base",
        "helper-lib",
        "pulls-numpy",
    }
    assert document["excluded"] == [
        {"name": "click", "version": "8.1.7", "required_by": ["uses-click"]}
    ]
    assert {p["name"] for p in document["provided_by_base"]} == {"numpy", "packaging"}
    assert document["digest"] == read_lock(lock).digest()
    assert "excluded by policy (1)" in result.stderr
    # pip accepts the lock with --require-hashes (here for the pure-python part: pip installs for the host).
    pure = tmp_path / "pure.txt"
    text = lock.read_text()
    pure.write_text(
        text.split("pulls-numpy==")[0] + "same-as-base==" + text.split("same-as-base==")[1]
    )
    target = tmp_path / "target"
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    import subprocess

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--require-hashes",
            "--no-cache-dir",
            "--index-url",
            main_index,
            "--target",
            str(target),
            "-r",
            str(pure),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert (target / "uses_click" / "__init__.py").is_file()


def test_pip_tools_backend_for_the_host(tmp_path: Path, main_index: str) -> None:
    host = "{}.{}".format(*sys.version_info[:2])
    path = write_profile(tmp_path, heavy=["uses-click==1.0", "same-as-base==1.0"], python=host)
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    result = run_cli(
        "resolve", str(path), "--backend", "pip-tools", "--index-url", main_index, "--json", env=env
    )
    assert result.returncode == 0, result.stderr
    document = result.json()
    assert document["backend"].startswith("pip-tools")
    assert {p["name"] for p in document["shipped"]} == {"uses-click", "same-as-base", "helper-lib"}
    assert [e["name"] for e in document["excluded"]] == ["click"]


def test_pip_tools_backend_refuses_a_foreign_target(tmp_path: Path) -> None:
    path = write_profile(tmp_path, heavy=["x==1"], python="3.9")
    with pytest.raises(BackendUnavailableError, match="use --backend uv"):
        ensure_lock(load_profile(path), backend="pip-tools")
    result = run_cli("resolve", str(path), "--backend", "pip-tools")
    assert result.returncode == 2 and "resolves only for this machine" in result.stderr


def test_partition_refuses_unrouted_package_from_other_index(tmp_path: Path) -> None:
    from builder.indexes import effective_indexes
    from builder.lock import LockedPackage
    from builder.resolve import partition

    path = write_profile(
        tmp_path,
        heavy=["torchlike"],
        indexes=[{"name": "t", "url": "https://t.invalid/simple", "packages": ["torchlike"]}],
    )
    profile = load_profile(path)
    snapshot = read_snapshot(profile.target.base_packages)
    stray = LockedPackage(
        "torchlike", "9.9", ("sha256:" + "0" * 64,), index_url="https://other.invalid/simple"
    )
    with pytest.raises(PolicyViolationError, match="from index 't'"):
        partition([stray], profile, snapshot, effective_indexes(profile, IndexSettings()))


def _check_rules(document: dict, profile_path: Path) -> None:
    profile = load_profile(profile_path)
    base = read_snapshot(profile.target.base_packages)
    shipped = {p["name"]: Version(p["version"]) for p in document["shipped"]}
    assert "click" not in shipped
    assert shipped.get("protobuf", Version("4")) in SpecifierSet("<5")
    assert shipped.get("numpy", Version("1")) in SpecifierSet("<2")
    for name, version in shipped.items():
        base_version = base.version_of(name)
        assert base_version is None or Version(base_version) == version, name


@pytest.mark.network
def test_onnx_gpu_profile_against_the_public_index(tmp_path: Path) -> None:
    profile = REPO / "profiles" / "onnx-gpu.toml"
    result = run_cli("resolve", str(profile), "-o", str(tmp_path / "onnx.lock"), "--json")
    assert result.returncode == 0, result.stderr
    document = result.json()
    _check_rules(document, profile)
    shipped = {p["name"] for p in document["shipped"]}
    assert {"onnxruntime-gpu", "nvidia-cudnn-cu12", "nvidia-cublas-cu12"} <= shipped
    assert {"numpy", "protobuf"} <= {p["name"] for p in document["provided_by_base"]}


@pytest.mark.network
def test_torch_profile_against_the_public_index(tmp_path: Path) -> None:
    """The cu121 index is unreachable here; the public index has the same CUDA 12.1 builds."""
    profile = REPO / "profiles" / "torch-cu121.toml"
    result = run_cli(
        "resolve",
        str(profile),
        "-o",
        str(tmp_path / "torch.lock"),
        "--index",
        "pytorch-cu121=default",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    document = result.json()
    _check_rules(document, profile)
    shipped = {p["name"]: p["version"] for p in document["shipped"]}
    assert shipped["torch"] == "2.4.1"
    assert shipped["nvidia-cudnn-cu12"] == "9.1.0.70"
    assert shipped["nvidia-cuda-runtime-cu12"].startswith("12.1.")


def test_index_credentials_never_reach_the_error(tmp_path: Path) -> None:
    path = write_profile(tmp_path, heavy=["uses-click==1.0"])
    closed = "http://user:hunter2secret@127.0.0.1:9/simple?token=tok3nsecret"
    result = run_cli("resolve", str(path), "--index-url", closed)
    assert result.returncode == 1, result.stderr
    assert "127.0.0.1:9" in result.stderr
    assert "hunter2secret" not in result.stderr and "tok3nsecret" not in result.stderr


def test_a_lock_of_an_older_format_is_resolved_again(tmp_path: Path, main_index: str) -> None:
    first = _resolve(tmp_path, main_index, heavy=["uses-click==1.0"])
    text = first.lock_path.read_text()
    from builder.lock import LOCK_FORMAT

    older = text.replace(f'"format": {LOCK_FORMAT}', f'"format": {LOCK_FORMAT - 1}')
    assert older != text
    first.lock_path.write_text(older)
    again = _resolve(tmp_path, main_index, heavy=["uses-click==1.0"])
    assert again.rewritten and again.lock_path.read_text() == text
