"""`gpubuild ci`: pipeline files for CI services (Azure Pipelines)."""

from __future__ import annotations

from pathlib import Path

import click

import builder
from builder.cipipeline import (
    DEFAULT_BUDGET_GB,
    DEFAULT_CONNECTION,
    DEFAULT_PIPELINE_FILE,
    DEFAULT_SECRET,
    DEFAULT_VM_IMAGE,
    REGISTRY_DELIVERIES,
    check_index_names,
    plan_pipeline,
    spec_document,
)
from builder.cipipeline_yaml import render_azure_pipeline
from builder.cli.base import GpubuildGroup, emit_json, index_options, json_option, report
from builder.files import write_atomically
from builder.indexes import IndexSettings
from builder.profile import load_profile


@click.group("ci", cls=GpubuildGroup)
def ci_group() -> None:
    """Pipeline files that run gpubuild in CI."""


@ci_group.command("azure-pipelines")
@click.argument(
    "profiles", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path)
)
@click.option("--store", metavar="URL", help="Blob store to publish to (az://ACCOUNT/CONTAINER/PREFIX, an https blob URL, or file:///PATH on a self-hosted agent).")  # fmt: skip
@click.option("--registry", metavar="URL", help="Registry to publish to as images (oci://REGISTRY/REPOSITORY).")  # fmt: skip
@click.option(
    "--delivery",
    type=click.Choice(REGISTRY_DELIVERIES),
    default=REGISTRY_DELIVERIES[0],
    show_default=True,
    help="The pod snippet written for the registry.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path(DEFAULT_PIPELINE_FILE),
    show_default=True,
    help="The pipeline file (its own, beside the template pipeline).",
)
@click.option(
    "--root",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=Path("."),
    show_default=True,
    help="The repository root: the agent's working folder, which paths are relative to.",
)
@click.option(
    "--service-connection",
    default=DEFAULT_CONNECTION,
    show_default=True,
    help="Default of the parameter azureServiceConnection (an Azure Resource Manager"
    " service connection), for an Azure store or registry.",
)
@click.option(
    "--secret",
    default=DEFAULT_SECRET,
    show_default=True,
    help="The Kubernetes Secret (key 'sas') the blob snippet mounts.",
)
@click.option(
    "--code",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    metavar="PATH",
    help="Passed to `gpubuild dockerfile --code`. Repeatable.",
)
@click.option(
    "--budget-gb",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_BUDGET_GB,
    show_default=True,
    help="Default of the parameter diskBudgetGb: the agent's disk for the worker image.",
)
@click.option(
    "--gpubuild-package",
    metavar="REQUIREMENT",
    help="Default of the parameter gpubuildPackage, the pip requirement that installs"
    f" gpubuild on the agent (default: gpubuild=={builder.__version__}).",
)
@click.option(
    "--vm-image", default=DEFAULT_VM_IMAGE, show_default=True, help="Default agent image."
)
@index_options
@json_option
def azure_pipelines_command(
    profiles: tuple[Path, ...],
    store: str | None,
    registry: str | None,
    delivery: str,
    output: Path,
    root: Path,
    service_connection: str,
    secret: str,
    code: tuple[Path, ...],
    budget_gb: float,
    gpubuild_package: str | None,
    vm_image: str,
    settings: IndexSettings,
    as_json: bool,
) -> None:
    """Write an Azure Pipelines file that checks, publishes and hands over PROFILES.

    \b
    On pushes to main and dev that change a profile, its lock or its base snapshot:
    install gpubuild (pinned), restore the uv cache (Cache@2, keyed by the locks),
    `resolve --check` each profile (a stale lock fails the run), `publish-cache` to
    the store (through an AzureCLI@2 service connection for Azure: no key or SAS in
    the file), write each init script and Kubernetes snippet, `dockerfile` with its
    disk budget as a gate, and publish the snippets as the artifact 'gpubuild'.
    Index options are passed on to the profiles that have that [[index]].

    \b
    Example:
      gpubuild ci azure-pipelines profiles/onnx-gpu.toml --store az://acct/gpubuild/prod
    """
    loaded = [load_profile(path) for path in profiles]
    check_index_names(loaded, settings)
    spec = plan_pipeline(
        loaded,
        root=root,
        output=output,
        store=store,
        registry=registry,
        registry_delivery=delivery,
        service_connection=service_connection,
        secret=secret,
        code=code,
        budget_gb=budget_gb,
        gpubuild_package=gpubuild_package,
        settings=settings,
        version=builder.__version__,
        vm_image=vm_image,
    )
    write_atomically(output, render_azure_pipeline(spec))
    report(f"Azure pipeline written: {output} ({len(spec.profiles)} profile(s))")
    if as_json:
        emit_json(spec_document(spec, output))
