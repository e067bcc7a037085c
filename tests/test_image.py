"""`gpubuild build-image` against a real Docker engine, a local base image and a local registry.

The worker image is built from the generated Dockerfile with the light set from a loopback
index, run (the light package and the code import, the proxy CA is trusted), pushed to a
registry on loopback and pulled back.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

import docker
import docker.errors

from tests.helpers import run_cli
from tests.test_dockerfile import worker_wheels, write_worker_profile

_CHECK = """
import json, os, sys
import light_app, small_util, app_tasks, app_pkg
try:
    import shared_dep
    shared = "in the image"
except ImportError:
    shared = "absent"
bundle = open("/etc/ssl/certs/ca-certificates.crt").read()
print(json.dumps({
    "light_app": light_app.VALUE,
    "code": app_tasks.RESULT,
    "pkg": app_pkg.NAME,
    "shared_dep": shared,
    "ca": os.environ["CA_BODY"] in bundle,
    "pythonpath": os.environ["PYTHONPATH"],
    "omp": os.environ["OMP_NUM_THREADS"],
    "sys_path_app": "/app" in sys.path,
}))
"""


def _proxy_ca(folder: Path) -> str:
    """A self-signed CA like an enterprise proxy's; returns its base64 body."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=gpubuild test proxy CA", "-keyout", str(folder.parent / "ca.key"),
         "-out", str(folder / "proxy-test-ca.crt")],
        check=True, capture_output=True,
    )  # fmt: skip
    lines = (folder / "proxy-test-ca.crt").read_text().splitlines()
    return "".join(line for line in lines if not line.startswith("-----"))[:64]


def _run(client: docker.DockerClient, image: str, ca_body: str) -> dict[str, object]:
    import json

    output = client.containers.run(
        image,
        ["python3", "-c", _CHECK],
        environment={"CA_BODY": ca_body},
        network_mode="host",
        remove=True,
    )
    return json.loads(output.decode().strip().splitlines()[-1])


def test_build_run_push_and_pull_the_worker_image(
    tmp_path: Path,
    docker_client: docker.DockerClient,
    base_image: str,
    registry_address: str,
    local_index: Callable[[Iterable[Path]], str],
) -> None:
    index = local_index(worker_wheels(tmp_path / "dists"))
    project = tmp_path / "project"
    project.mkdir()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    # The base snapshot comes from the base image itself, so "provided by the base" is true.
    snapshot = project / "bases" / "base.txt"
    made = run_cli("base-snapshot", base_image, "-o", str(snapshot), env=env)
    assert made.returncode == 0, made.stderr
    profile = write_worker_profile(
        project,
        heavy=["heavy-core==1.0"],
        light=["light-app==1.0", "big-light"],
        snapshot=snapshot.read_text(),
    )
    (project / "app_tasks.py").write_text(
        "import light_app\nRESULT = 'tasks see ' + light_app.VALUE\n"
    )
    (project / "app_pkg").mkdir()
    (project / "app_pkg" / "__init__.py").write_text("NAME = 'app_pkg'\n")
    ca_body = _proxy_ca(project / "certs")
    tag = f"{registry_address}/data-ai/gpubuild-worker-test:1"
    try:
        result = run_cli(
            "build-image", profile.name, "--code", "app_tasks.py", "--code", "app_pkg",
            "--tag", tag, "--push", "--index-url", index,
            "--build-arg", f"BASE_IMAGE={base_image}", "--build-arg", "APP_USER=root",
            "--json", cwd=project, env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        # Streamed build output, the budget, and measured vs estimated size on stderr.
        assert "Step 1/" in result.stderr and "Successfully installed" in result.stderr
        assert "disk budget of the build agent" in result.stderr
        assert "measured" in result.stderr and "estimated" in result.stderr
        document = result.json()
        base_bytes = docker_client.images.get(base_image).attrs["Size"]
        assert document["image_bytes"] == docker_client.images.get(tag).attrs["Size"]
        assert document["estimated_image_bytes"] > base_bytes
        # The light layer is 2 MB of incompressible data: the estimate must be close. What it
        # leaves out is the CA bundle update-ca-certificates rewrites (about 0.2 MB here).
        assert 2_000_000 < document["estimated_new_layers_bytes"] < 2_200_000
        missed = document["new_layers_bytes"] - document["estimated_new_layers_bytes"]
        assert 0 <= missed < 400_000, document
        assert abs(document["image_error"]) < 0.01, document
        assert document["pushed_digest"].startswith("sha256:")

        ran = _run(docker_client, tag, ca_body)
        assert ran == {
            "light_app": "light-app 1.0",
            "code": "tasks see light-app 1.0",
            "pkg": "app_pkg",
            "shared_dep": "absent",  # the heavy set's, mounted at run time
            "ca": True,
            "pythonpath": "/shared-packages:/app",
            "omp": "1",
            "sys_path_app": True,
        }

        docker_client.images.remove(tag, force=True)
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.get(tag)
            raise AssertionError(f"{tag} is still present locally")
        docker_client.images.pull(tag)
        pulled = docker_client.images.get(tag)
        assert (
            pulled.attrs["RepoDigests"]
            and document["pushed_digest"] in pulled.attrs["RepoDigests"][0]
        )
        assert _run(docker_client, tag, ca_body)["light_app"] == "light-app 1.0"
    finally:
        with contextlib.suppress(docker.errors.DockerException):
            docker_client.images.remove(tag, force=True)


def test_build_image_refuses_an_index_password_in_a_build_arg(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    profile = write_worker_profile(project, heavy=["heavy-core==1.0"], light=[])
    result = run_cli(
        "build-image", profile.name, "--tag", "gpubuild-test/never:1",
        "--lock", str(project / "worker.lock"),
        "--build-arg", "PIP_INDEX_URL=http://user:s3cret@127.0.0.1:9/simple",
        cwd=project, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "image history" in result.stderr and "s3cret" not in result.stderr
