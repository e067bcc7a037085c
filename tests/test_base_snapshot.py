"""`gpubuild base-snapshot` reads a real image through a real Docker engine."""

from __future__ import annotations

from pathlib import Path

import docker
import pytest

from builder.base import read_snapshot
from builder.errors import BadInputError
from tests.helpers import docker_context, run_cli
from tests.support.wheels import build_wheel


@pytest.mark.docker
def test_snapshot_of_an_image_built_here(
    tmp_path: Path, docker_client: docker.DockerClient, base_image: str
) -> None:
    wheel = build_wheel(tmp_path, "marker-dist", "3.1.4")
    dockerfile = (
        f"FROM {base_image}\n"
        f"COPY {wheel.name} /tmp/\n"
        f"RUN python3 -m pip install --no-index --no-deps --break-system-packages /tmp/{wheel.name}\n"
    ).encode()
    tag = "gpubuild-test/snapshot:latest"
    docker_client.images.build(
        fileobj=docker_context({"Dockerfile": dockerfile, wheel.name: wheel.read_bytes()}),
        custom_context=True,
        tag=tag,
        network_mode="host",
        rm=True,
    )
    try:
        out = tmp_path / "snap.txt"
        result = run_cli("base-snapshot", tag, "-o", str(out))
        assert result.returncode == 0, result.stderr
        snapshot = read_snapshot(out)
        assert snapshot.version_of("marker_dist") == "3.1.4"
        assert snapshot.version_of("pip") is not None
        assert out.read_text().startswith(f"# Python distributions in {tag}")
    finally:
        docker_client.images.remove(tag, force=True)


@pytest.mark.docker
def test_snapshot_of_a_missing_image_is_a_clear_error(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    out = tmp_path / "snap.txt"
    result = run_cli("base-snapshot", "gpubuild-test/does-not-exist:1", "-o", str(out))
    assert result.returncode == 1
    assert "gpubuild-test/does-not-exist:1" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_snapshot_lines_are_checked(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("# fine\nnumpy==1.26.4\nprotobuf>=4\n")
    with pytest.raises(BadInputError, match=r"bad.txt:3: expected name==version"):
        read_snapshot(bad)
    bad.write_text("numpy==not-a-version\n")
    with pytest.raises(BadInputError, match="is not a version"):
        read_snapshot(bad)
