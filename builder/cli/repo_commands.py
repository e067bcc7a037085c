"""Commands that look at what is already there: check, doctor and base-snapshot."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from builder import doctor
from builder.base import docker_client, render_snapshot, snapshot_image
from builder.check import check, result_document, result_text, summary_text
from builder.cli.base import emit_json, report
from builder.files import write_atomically


@click.command("check")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON on stdout.")
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A gpubuild profile to take into account besides those under PATHS. Repeatable.",
)
@click.option(
    "--store",
    metavar="DIR",
    help="A local store folder (or file://DIR) whose published manifests count as caches.",
)
def check_command(
    paths: tuple[Path, ...], as_json: bool, profiles: tuple[Path, ...], store: str | None
) -> None:
    """Read a deployment checkout and report the deployment guide's known mistakes.

    \b
    Reads RayService/RayCluster and HelmRelease YAML, Dockerfiles, requirements*.txt,
    azure-pipelines*.yaml, gpubuild profiles, locks and manifests under PATHS
    (skipping .git, .venv, node_modules). Each finding is `file:line: CODE message`
    with a fix; exit 1 when any finding is an error, 0 otherwise.

    \b
    Codes:
      GB001 file does not parse        GB002 file skipped: over 8 MiB
      GB101 Ray version mismatch       GB102 Ray image without version
      GB103 ray[client] not pinned ==  GB104 Python version mismatch
      GB201 LD_LIBRARY_PATH lacks library folders
      GB202 PYTHONPATH lacks /shared-packages   GB203 /app before /shared-packages
      GB301 Flux $imagepolicy marker missing    GB302 marker names the wrong field
      GB401 pip at pod start, cache published   GB402 rm -rf protobuf/click hack
      GB403 numpy<2 re-install hack    GB404 unquoted < or > in pip install
      GB405 SAS Secret, no rotation note        GB406 SAS written in the manifest
      GB501 ships protobuf>=5          GB502 ships click
      GB503 ships numpy>=2             GB504 shadows a base package
      GB601 GPU group, no nvidia.com/gpu limit  GB602 no nvidia.com/gpu toleration
      GB701 publish-cache before resolve --check  GB702 DockerFiles entry missing

    \b
    Example:
      gpubuild check draft-deployment/ your-gpu-service/ your-api-service/
      gpubuild check draft-deployment/ --profile profiles/onnx-gpu.toml --store ./store --json
    """
    result = check(list(paths), profiles=list(profiles), store=store)
    if as_json:
        emit_json(result_document(result))
    else:
        click.echo(result_text(result), nl=False)
    report(summary_text(result))
    sys.exit(result.exit_code)


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON on stdout.")
@click.option(
    "--shared",
    metavar="DIR",
    default=None,
    help="The shared packages folder (default: $GPUBUILD_TARGET or /shared-packages).",
)
def doctor_command(as_json: bool, shared: str | None) -> None:
    """Check a running worker container: sys.path, shadowed packages, libraries, GPU.

    \b
    Run it inside the Ray container with the image's python; it needs only the
    standard library, so where gpubuild is not installed use the file itself:
      kubectl exec -i POD -c ray-worker -- python3 - --json < builder/doctor.py
    Exit 1 when a check fails.
    """
    sys.exit(doctor.run(shared or doctor.default_shared(), as_json))


@click.command("base-snapshot")
@click.argument("image")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Snapshot file to write (name==version lines).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def base_snapshot(image: str, output: Path, as_json: bool) -> None:
    """List the Python distributions of IMAGE by running its own python through Docker.

    \b
    Example:
      gpubuild base-snapshot rayproject/ray:2.52.0-py310-cu121 \\
          -o profiles/bases/ray-2.52.0-py310-cu121.txt
    """
    interpreter, packages = snapshot_image(docker_client(), image)
    write_atomically(output, render_snapshot(image, interpreter, packages))
    report(f"{len(packages)} distributions from {image} ({interpreter}) -> {output}")
    if as_json:
        emit_json(
            {
                "image": image,
                "interpreter": interpreter,
                "output": str(output),
                "packages": packages,
            }
        )
