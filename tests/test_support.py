"""The test infrastructure itself: built archives, the local index, services."""

from __future__ import annotations

import hashlib
import http.client
import os
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import docker
import pytest
import uv
from azure.core.exceptions import ServiceRequestError
from azure.storage.blob import BlobServiceClient
from wheel.wheelfile import WheelFile

from tests.support import services
from tests.support.index import serve_directory, write_simple_index
from tests.support.services import AzuriteEndpoint
from tests.support.users import nonroot_folder
from tests.support.wheels import build_sdist, build_wheel

LocalIndex = Callable[[Iterable[Path]], str]


def _uv(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # Ignore any uv/pip settings of the machine, and keep no cache: a cached
    # page from an earlier index on the same port would hide what this one
    # serves.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "PIP_"))}
    return subprocess.run(
        [uv.find_uv_bin(), *args, "--no-config", "--no-cache"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


# -- wheels and sdists ------------------------------------------------------


def test_wheel_file_name_metadata_and_record(tmp_path: Path) -> None:
    wheel = build_wheel(
        tmp_path,
        "Demo.Pkg_Extra",
        "1.02",
        requires=["click>=8", "numpy<2; python_version < '3.12'"],
        tag="cp311-cp311-manylinux_2_28_x86_64",
        entry_points={"demo": "demo_pkg_extra.cli:main"},
        data_files={"scripts/demo-sh": b"#!/bin/sh\necho hi\n"},
        requires_python=">=3.10",
    )
    assert wheel.name == "demo_pkg_extra-1.2-cp311-cp311-manylinux_2_28_x86_64.whl"
    # WheelFile checks every member against its RECORD line while reading.
    with WheelFile(wheel) as wf:
        for name in wf.namelist():
            wf.read(name)
        metadata = wf.read("demo_pkg_extra-1.2.dist-info/METADATA").decode()
        wheel_meta = wf.read("demo_pkg_extra-1.2.dist-info/WHEEL").decode()
        assert wf.read("demo_pkg_extra/__init__.py") == b'__version__ = "1.02"\n'
    assert "Name: Demo.Pkg_Extra\n" in metadata
    assert "Requires-Dist: numpy<2; python_version < '3.12'\n" in metadata
    assert "Requires-Python: >=3.10\n" in metadata
    assert "Root-Is-Purelib: false\n" in wheel_meta
    assert "Tag: cp311-cp311-manylinux_2_28_x86_64\n" in wheel_meta
    with zipfile.ZipFile(wheel) as zf:
        assert zf.namelist()[-1] == "demo_pkg_extra-1.2.dist-info/RECORD"
        script = zf.getinfo("demo_pkg_extra-1.2.data/scripts/demo-sh")
        assert script.external_attr >> 16 & 0o777 == 0o755


def test_archives_are_deterministic(tmp_path: Path) -> None:
    first = build_wheel(tmp_path / "a", "same", "1.0", requires=["x"])
    second = build_wheel(tmp_path / "b", "same", "1.0", requires=["x"])
    assert first.read_bytes() == second.read_bytes()
    sdist_a = build_sdist(tmp_path / "a", "same", "1.0", requires=["x"])
    sdist_b = build_sdist(tmp_path / "b", "same", "1.0", requires=["x"])
    assert sdist_a.read_bytes() == sdist_b.read_bytes()


def test_sdist_layout(tmp_path: Path) -> None:
    sdist = build_sdist(tmp_path, "My.Project", "2.0", requires=["click"])
    assert sdist.name == "my_project-2.0.tar.gz"
    with tarfile.open(sdist) as tf:
        names = tf.getnames()
        pkg_info = tf.extractfile("my_project-2.0/PKG-INFO")
        assert pkg_info is not None
        text = pkg_info.read().decode()
    assert sorted(names) == [
        "my_project-2.0/PKG-INFO",
        "my_project-2.0/my_project.py",
        "my_project-2.0/setup.py",
    ]
    assert "Name: My.Project\n" in text
    assert "Requires-Dist: click\n" in text


# -- the local index -----------------------------------------------------------


def test_simple_index_pages(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "d", "Demo_Pkg", "1.0", requires_python=">=3.9,<4")
    write_simple_index([wheel], tmp_path / "idx")
    page = (tmp_path / "idx/simple/demo-pkg/index.html").read_text()
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert f'href="../../files/{wheel.name}#sha256={digest}"' in page
    assert 'data-requires-python="&gt;=3.9,&lt;4"' in page
    # A second call adds to the index instead of replacing it.
    write_simple_index([build_wheel(tmp_path / "d", "other", "1.0")], tmp_path / "idx")
    assert (tmp_path / "idx/simple/demo-pkg/index.html").exists()
    assert (tmp_path / "idx/simple/other/index.html").exists()


def test_served_files_support_range_requests(tmp_path: Path) -> None:
    (tmp_path / "blob").write_bytes(bytes(range(256)) * 4)
    with serve_directory(tmp_path) as base:
        request = urllib.request.Request(f"{base}/blob", headers={"Range": "bytes=10-19"})
        with urllib.request.urlopen(request) as response:
            assert response.status == 206
            assert response.headers["Content-Range"] == "bytes 10-19/1024"
            assert response.read() == bytes(range(10, 20))
        request = urllib.request.Request(f"{base}/blob", method="HEAD")
        with urllib.request.urlopen(request) as response:
            assert response.headers["Accept-Ranges"] == "bytes"
            assert response.headers["Content-Length"] == "1024"


def test_wheel_installs_from_local_index(tmp_path: Path, local_index: LocalIndex) -> None:
    dists = [
        build_wheel(
            tmp_path / "d",
            "Demo-Pkg",
            "1.2.0",
            requires=["dep-lib>=1"],
            files={
                "demo_pkg/__init__.py": b'__version__ = "1.2.0"\n',
                "demo_pkg/cli.py": b"def main():\n    print('demo ran')\n",
            },
            entry_points={"demo": "demo_pkg.cli:main"},
        ),
        build_wheel(tmp_path / "d", "dep_lib", "0.9"),
        build_wheel(tmp_path / "d", "dep_lib", "1.1"),
    ]
    index_url = local_index(dists)
    target = tmp_path / "target"
    result = _uv(
        "pip", "install", "--index-url", index_url, "--python", sys.executable,
        "--target", str(target), "demo-pkg",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    probe = subprocess.run(
        [sys.executable, "-c", "import demo_pkg, dep_lib; print(demo_pkg.__version__, dep_lib.__version__)"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(target)},
        check=True,
    )  # fmt: skip
    assert probe.stdout.split() == ["1.2.0", "1.1"]
    assert (target / "bin" / "demo").is_file()


def test_compile_against_local_index(tmp_path: Path, local_index: LocalIndex) -> None:
    dists = [
        build_wheel(tmp_path / "d", "needs-new", "1.0", requires=["lib>=2"]),
        build_wheel(tmp_path / "d", "lib", "1.5"),
        build_wheel(tmp_path / "d", "lib", "2.3"),
        build_wheel(tmp_path / "d", "lib", "3.0", requires_python=">=3.99"),
    ]
    (tmp_path / "req.in").write_text("needs-new\n")
    result = _uv(
        "pip", "compile", "--index-url", local_index(dists), "--python-version", "3.11",
        "--python-platform", "x86_64-manylinux_2_28", "--generate-hashes", str(tmp_path / "req.in"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # lib 3.0 is excluded by data-requires-python alone.
    assert "lib==2.3" in result.stdout
    assert "--hash=sha256:" in result.stdout


def test_sdist_only_package_fails_without_build(tmp_path: Path, local_index: LocalIndex) -> None:
    sdist = build_sdist(tmp_path / "d", "sdist-only", "1.0")
    (tmp_path / "req.in").write_text("sdist-only\n")
    args = [
        "pip", "compile", "--no-build", "--python-version", "3.11",
        "--python-platform", "x86_64-manylinux_2_28", str(tmp_path / "req.in"),
    ]  # fmt: skip

    failed = _uv(*args, "--index-url", local_index([sdist]))
    assert failed.returncode != 0
    assert "sdist-only" in failed.stderr

    # Control: the same request resolves once a wheel exists, so the failure
    # above came from the missing wheel and not from the index.
    wheel = build_wheel(tmp_path / "d", "sdist-only", "1.0")
    passed = _uv(*args, "--index-url", local_index([sdist, wheel]))
    assert passed.returncode == 0, passed.stderr
    assert "sdist-only==1.0" in passed.stdout


# -- Azurite -------------------------------------------------------------------


def test_azurite_round_trip_and_restart(azurite_endpoint: AzuriteEndpoint) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    service = BlobServiceClient.from_connection_string(azurite_endpoint.connection_string)
    container = service.get_container_client("support-test")
    if not container.exists():
        container.create_container()
    container.upload_blob("dir/blob.bin", payload, overwrite=True)
    assert container.download_blob("dir/blob.bin").readall() == payload

    old_pid = azurite_endpoint.pid
    with azurite_endpoint.stopped():
        assert azurite_endpoint.pid == 0
        down = BlobServiceClient.from_connection_string(
            azurite_endpoint.connection_string, retry_total=0
        )
        with pytest.raises(ServiceRequestError):
            down.get_container_client("support-test").download_blob("dir/blob.bin").readall()
    assert azurite_endpoint.pid not in (0, old_pid)
    # Same port, same data location: the blob survived the restart.
    restarted = BlobServiceClient.from_connection_string(azurite_endpoint.connection_string)
    blob = restarted.get_container_client("support-test").download_blob("dir/blob.bin")
    assert blob.readall() == payload


# -- Docker, the base image and the registry -----------------------------------


def test_base_image_runs_python_311(docker_client: docker.DockerClient, base_image: str) -> None:
    output = docker_client.containers.run(
        base_image,
        [
            "bash",
            "-c",
            "python3 -c 'import sys; print(sys.version_info[:2])' && command -v curl zstd pip3",
        ],
        network_mode="host",
        remove=True,
    )
    lines = output.decode().split()
    assert lines[0:2] == ["(3,", "11)"]
    assert [Path(p).name for p in lines[2:]] == ["curl", "zstd", "pip3"]


def test_push_and_pull_through_registry(
    docker_client: docker.DockerClient, base_image: str, registry_address: str
) -> None:
    repository = f"{registry_address}/data-ai/base"
    image = docker_client.images.get(base_image)
    assert image.tag(repository, "test")
    pushed_digest = None
    for event in docker_client.images.push(repository, "test", stream=True, decode=True):
        assert "error" not in event, event
        pushed_digest = event.get("aux", {}).get("Digest", pushed_digest)
    assert pushed_digest is not None and pushed_digest.startswith("sha256:")

    # The registry serves the manifest under the digest the engine reported.
    host, port = registry_address.split(":")
    conn = http.client.HTTPConnection(host, int(port))
    conn.request(
        "HEAD",
        "/v2/data-ai/base/manifests/test",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    assert conn.getresponse().getheader("Docker-Content-Digest") == pushed_digest
    conn.close()

    docker_client.images.remove(f"{repository}:test")
    pulled = docker_client.images.pull(repository, tag="test")
    assert f"{repository}@{pushed_digest}" in pulled.attrs["RepoDigests"]
    assert pulled.id == image.id
    docker_client.images.remove(f"{repository}:test")


# -- nginx and mirror discovery ----------------------------------------------


def test_nginx_serves_folder_as_a_normal_user(tmp_path: Path) -> None:
    payload = os.urandom(100_000)
    with nonroot_folder() as folder:
        (folder / "shard.bin").write_bytes(payload)
        (folder / "shard.bin").chmod(0o644)
        (folder / "private.bin").write_bytes(payload)
        (folder / "private.bin").chmod(0o600)
        with services.nginx_serving(folder, tmp_path / "nginx") as base:
            with urllib.request.urlopen(f"{base}/shard.bin") as response:
                assert response.read() == payload
            request = urllib.request.Request(f"{base}/shard.bin", headers={"Range": "bytes=-10"})
            with urllib.request.urlopen(request) as response:
                assert response.status == 206
                assert response.read() == payload[-10:]
            # Its workers are not root: a file only its owner may read is refused.
            if os.geteuid() == 0:
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(f"{base}/private.bin")
                assert refused.value.code == 403
    with pytest.raises(services.ServiceError, match="nonroot_folder"):
        if os.geteuid() != 0:
            raise services.ServiceError("nonroot_folder: only checked as root")
        with services.nginx_serving(tmp_path, tmp_path / "nginx2"):
            pass


def test_debian_mirror_from_both_source_formats(tmp_path: Path) -> None:
    deb822 = tmp_path / "deb822"
    (deb822 / "sources.list.d").mkdir(parents=True)
    (deb822 / "sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://disabled.example.invalid/debian\nSuites: bookworm\n"
        "Enabled: no\n\n"
        "Types: deb\nURIs: http://security.example.invalid/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "# Enabled: no\nTypes: deb deb-src\nURIs: http://mirror.example.invalid/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert services.debian_mirror("bookworm", deb822) == "http://mirror.example.invalid/debian"

    classic = tmp_path / "classic"
    (classic / "sources.list.d").mkdir(parents=True)
    (classic / "sources.list").write_text(
        "# deb http://old.example.invalid/debian bookworm main\n"
        "deb-src http://src.example.invalid/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] "
        "http://classic.example.invalid/debian bookworm main\n"
    )
    assert services.debian_mirror("bookworm", classic) == "http://classic.example.invalid/debian"


def test_missing_program_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeError, match="Debian package docker-registry"):
        services.require_program("docker-registry", "Debian package docker-registry")


def test_docker_host_points_at_engine(docker_client: docker.DockerClient) -> None:
    # Code under test builds its own client from the environment.
    from_env = docker.from_env(version="auto")
    try:
        assert from_env.info()["ID"] == docker_client.info()["ID"]
    finally:
        from_env.close()


def test_skips_fail_when_ci_is_set(tmp_path: Path) -> None:
    (tmp_path / "test_skipping.py").write_text(
        "import pytest\n\n"
        "def test_skipped():\n    pytest.skip('no engine')\n\n"
        "@pytest.mark.xfail(reason='known')\ndef test_xfail():\n    assert False\n"
    )
    argv = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider"]
    argv += ["-q", str(tmp_path / "test_skipping.py")]
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    repo = Path(__file__).resolve().parent.parent

    local = subprocess.run(argv, capture_output=True, text=True, cwd=repo, env=env)
    assert local.returncode == 0, local.stdout
    assert "1 skipped, 1 xfailed" in local.stdout

    ci = subprocess.run(argv, capture_output=True, text=True, cwd=repo, env={**env, "CI": "true"})
    assert ci.returncode == 1, ci.stdout
    assert "1 failed, 1 xfailed" in ci.stdout
    assert "skipped tests fail when CI is set" in ci.stdout


def test_a_missing_program_names_the_package_that_provides_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.test_initscript import shellcheck

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="Debian package shellcheck") as caught:
        shellcheck()
    assert ".ci/run installs it" in str(caught.value)
